"""The PyTorch reference backend: webdataset tar streaming + `torch.utils.data.DataLoader` workers,
with `AugmentSpec` implemented one crop at a time in torch (torchvision v2 functional ops on float
tensors, `torch_view`).

It serves users without DALI, is the loader benchmark's baseline and the independent reference that
the batched recipe (`augment.py`) is tested against. Same contract and the same
sample plan as the DALI backend (`ranks.py`): rank r reads its contiguous slice of the split; each
epoch a permutation seeded by (seed, epoch, rank) keeps `steps * batch_size` of it; worker w
makes the batches w, w + W, w + 2W, ... (the DataLoader returns workers' batches round-robin),
streaming the rank's tars in order through a shuffle buffer of `SHUFFLE_BUFFER` samples. Each
sample's two views come from a generator seeded by (seed, epoch, rank, id): an epoch is a
function of those and `num_workers` (which decides which samples share a batch), never of worker
timing. The buffer's choices depend only on how many samples pass through it, so a worker draws
its order over the positions before reading: an epoch started at batch k decodes and augments
the samples of batches k.. only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from random import Random

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fastcell.errors import InputError
from fastcell.format.folder import ID_EXT, ShardManifest, decode_id, decode_member
from fastcell.loaders.augment import fallback_crop, uniform
from fastcell.loaders.base import EvalLoaderBase, TrainLoaderBase, centre_crop_normalised, eval_affine
from fastcell.loaders.spec import AugmentSpec, Intensity

SHUFFLE_BUFFER = 1024  # samples held by each worker's shuffle buffer


def crop_box(height: int, width: int, scale, ratio, generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of one random resized crop by torchvision's rule, drawn from `generator`
    (the per-sample form of `augment.crop_boxes`: cheaper than a batched draw of one)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(uniform(scale, (), generator))
        aspect = math.exp(float(uniform(log_ratio, (), generator)))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    h, w = fallback_crop(height, width, ratio)
    return (height - h) // 2, (width - w) // 2, h, w


def blur_kernel_size(sigma: float) -> int:
    """DALI's default Gaussian window: 2 * ceil(3 sigma) + 1."""
    return 2 * math.ceil(3 * sigma) + 1


def torch_view(image: torch.Tensor, spec: AugmentSpec, it: Intensity, size: int, generator) -> torch.Tensor:
    """Steps 1-8 of `AugmentSpec` on one float32 C x H x W image of stored intensities, one step after the
    other with torchvision's functional ops: the per-sample reference that `augment.ViewRecipe`
    (batched, CPU and GPU) is tested against."""
    channels = image.shape[0]
    per_channel = lambda a: torch.from_numpy(a).view(-1, 1, 1)  # noqa: E731
    if spec.random_crop:
        top, left, h, w = crop_box(image.shape[1], image.shape[2], spec.crop_scale, spec.crop_ratio, generator)
        image = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    elif size != image.shape[-1]:
        image = TF.resize(image, [size, size], antialias=True)
    if spec.dihedral:
        transpose, horizontal, vertical = torch.rand(3, generator=generator) < 0.5
        if transpose:
            image = image.transpose(1, 2)
        if horizontal:
            image = image.flip(2)
        if vertical:
            image = image.flip(1)
    if spec.blur and float(torch.rand((), generator=generator)) < spec.blur_p:
        sigma = float(uniform(spec.blur_sigma, (), generator))
        k = blur_kernel_size(sigma)
        image = TF.gaussian_blur(image, [k, k], [sigma, sigma])
    v = image / per_channel(it.ref)
    if spec.jitter and float(torch.rand((), generator=generator)) < spec.jitter_p:
        pivot = per_channel(it.jitter_mean)
        gain = uniform(spec.gain, (channels, 1, 1), generator)
        contrast = uniform(spec.contrast, (channels, 1, 1), generator)
        v = (v * gain - pivot) * contrast + pivot
    if spec.gamma_in_batch:
        gamma = uniform(spec.gamma, (channels, 1, 1), generator)
        v = v.clamp(min=0) ** (gamma if float(torch.rand((), generator=generator)) < spec.jitter_p else 1.0)
    v = v * per_channel(it.scale) + per_channel(it.shift)
    if spec.noise and float(torch.rand((), generator=generator)) < spec.noise_p:
        v = v + torch.randn(v.shape, generator=generator) * per_channel(it.noise_unit * spec.noise_std)
    if spec.channel_drop_p > 0:
        keep = torch.rand(channels, generator=generator) >= spec.channel_drop_p
        v = v * (keep if keep.any() else torch.ones_like(keep)).view(-1, 1, 1)
    return v.contiguous()


def stream_samples(shards, owned: np.ndarray, manifest: ShardManifest) -> Iterator[tuple[int, np.ndarray, int]]:
    """(position, uint16 crop, id) of the owned positions, streaming the tars in order with webdataset;
    crops decoded by the manifest's codec. InputError naming the shard and the sample when one is bad."""
    import webdataset as wds

    codec = manifest.codec
    start = 0
    for shard in shards:
        tar, count = shard.tar, shard.count
        if owned[start : start + count].any():
            read = 0
            for k, sample in enumerate(wds.tarfile_samples([{"url": str(tar)}])):
                read = k + 1
                if read > count:
                    break
                if owned[start + k]:
                    key = sample["__key__"]
                    if codec.ext not in sample or ID_EXT not in sample:
                        found = ", ".join(f"{key}.{ext}" for ext in sample if not ext.startswith("__"))
                        raise InputError(f"{tar}: sample {key} holds {found}; the manifest's codec "
                                         f"{codec.name!r} needs {key}.{codec.ext} and {key}.{ID_EXT}")
                    crop = decode_member(codec, sample[codec.ext], manifest.crop_shape, tar, f"{key}.{codec.ext}")
                    yield start + k, crop, decode_id(sample[ID_EXT])
            if read != count:  # webdataset stops without a word at a damaged tar header
                raise InputError(f"{tar}: reading the tar's headers finds {'more than ' * (read > count)}"
                                 f"{min(read, count)} samples, its index {count} (a damaged tar header?); "
                                 f"`fastcell info {tar.parent} --verify` names the member")
        start += count


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _TwoViewEpoch(IterableDataset):
    """One epoch of one rank as batches, from batch `start` on; each DataLoader worker makes its share (see
    module doc). The DataLoader asks its workers in turn from worker 0, so DataLoader worker j plays worker
    (j + start) % W: the one whose first batch is `start`."""

    def __init__(self, loader: TorchTrainLoader, kept: np.ndarray, start: int = 0):
        self.loader, self.kept, self.start = loader, kept, start

    def __iter__(self):
        loader, batch = self.loader, self.loader.batch_size
        worker, workers = _worker()
        worker = (worker + self.start) % workers
        my_steps = range(worker, loader.steps, workers)
        first = sum(len(range(w, loader.steps, workers)) for w in range(worker)) * batch
        mine = np.sort(self.kept[first : first + len(my_steps) * batch]).tolist()  # in stream order
        order = list(_buffer_shuffle(iter(mine), SHUFFLE_BUFFER, Random(loader.epoch_seed(worker, 0x5B))))
        wanted = order[sum(step < self.start for step in my_steps) * batch :]
        owned = np.zeros(loader.total, dtype=bool)
        owned[wanted] = True
        samples = _in_order(stream_samples(loader.shards, owned, loader.manifest), wanted)
        for _ in range(len(wanted) // batch):
            views1, views2, ids = [], [], []
            for crop, cell_id in (next(samples) for _ in range(batch)):
                generator = torch.Generator().manual_seed(loader.epoch_seed(cell_id))
                image = torch.from_numpy(crop.astype(np.float32))
                views1.append(torch_view(image, loader.spec, loader.intensity, loader.image_size, generator))
                views2.append(torch_view(image, loader.spec, loader.intensity, loader.image_size, generator))
                ids.append(cell_id)
            yield (torch.stack(views1).to(loader.dtype), torch.stack(views2).to(loader.dtype),
                   torch.tensor(ids, dtype=torch.int64))


def _buffer_shuffle(items: Iterator, size: int, rng: Random) -> Iterator:
    """Emit a random element of a buffer of `size` items, refilling from `items` (webdataset's rule)."""
    import webdataset as wds

    return iter(wds.shuffle(bufsize=size, initial=size, rng=rng)(items))


def _in_order(samples: Iterator[tuple[int, np.ndarray, int]], order: list[int]) -> Iterator[tuple[np.ndarray, int]]:
    """(crop, id) of `samples` (position, crop, id) in the order of the positions `order`, holding those read
    early (as many as the shuffle buffer would)."""
    held = {}
    for position in order:
        while position not in held:
            at, crop, cell_id = next(samples)
            held[at] = crop, cell_id
        yield held.pop(position)


class TorchTrainLoader(TrainLoaderBase):
    """Two-view SimCLR batches from webdataset + DataLoader workers; see `create_train_loader`."""

    def epoch_plan(self) -> np.ndarray:
        """The positions this rank reads this epoch (shuffled; the first steps * batch_size kept)."""
        rng = np.random.default_rng(self.epoch_seed(0x91A))
        return rng.permutation(np.asarray(self.positions))[: self.steps * self.batch_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        loader = DataLoader(_TwoViewEpoch(self, self.epoch_plan(), self.start_batch), batch_size=None,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        for view1, view2, ids in loader:
            yield view1.to(self.device, non_blocking=True), view2.to(self.device, non_blocking=True), ids


class _EvalEpoch(IterableDataset):
    def __init__(self, loader: TorchEvalLoader):
        self.loader = loader

    def __iter__(self):
        loader, batch = self.loader, self.loader.batch_size
        worker, workers = _worker()
        affine = eval_affine(loader.intensity, torch.device("cpu"))  # the worker normalises on the CPU
        owned = np.zeros(loader.total, dtype=bool)
        for step in range(worker, len(loader), workers):
            owned[step * batch : (step + 1) * batch] = True
        crops, ids = [], []
        for position, crop, cell_id in stream_samples(loader.shards, owned, loader.manifest):
            crops.append(crop)
            ids.append(cell_id)
            if len(ids) == batch or position == loader.total - 1:
                images = centre_crop_normalised(torch.from_numpy(np.stack(crops)), affine, loader.image_size)
                yield images.to(loader.dtype), torch.tensor(ids, dtype=torch.int64)
                crops, ids = [], []


class TorchEvalLoader(EvalLoaderBase):
    """Centre-cropped, normalised images and ids in shard order; see `create_eval_loader`."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(_EvalEpoch(self), batch_size=None, num_workers=min(self.num_workers, len(self)),
                            pin_memory=self.device.type == "cuda")
        for images, ids in loader:
            yield images.to(self.device, non_blocking=True), ids
