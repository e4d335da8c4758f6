"""The DALI backend (default): `fn.readers.webdataset` over fastcell's shards and `.idx` files,
the crops decoded by the shards' codec (`_Graph.read`: npy parsed on the CPU; tiff-deflate decoded
on the GPU by nvTIFF, or on the CPU), then both views' augmentations on the GPU when the loader's device
is CUDA. Without a GPU (`device_id=None`), DALI reads, decodes and shuffles, and the views are
made batched in torch (`batch_steps.BatchViews`): per-sample DALI operators on 2 CPU cores were
the bottleneck.

Shuffling: the reader streams the rank's slice of the shards in order through a buffer of
`SHUFFLE_BUFFER` samples and emits a random one of them each time (`initial_fill`). Shards are
written interleaved across the screen, so a buffer-local shuffle already mixes wells and plates.
Each epoch builds a fresh pipeline seeded from (seed, epoch, rank), so an epoch is a deterministic
function of those and the reader's first pass gives every sample of the slice exactly once.

DALI details that shape the GPU graph (checked on these machines, see docs/design.md):
- crop, flip and transpose run on the uint16 planes (CHW throughout: the npy layout, no
  transposes); blur on float with `fn.gaussian_blur`;
- the rotations are a conditional transpose (needs `enable_conditionals`) plus random flips;
- gain, contrast and normalisation are one per-channel affine map, done by a single
  `crop_mirror_normalize` with per-sample mean/std (far faster than broadcast arithmetic);
- the PyTorch iterator cannot return uint16 (the pipeline outputs float32, or float16 when asked;
  bfloat16 is a cast in torch); gamma, noise and channel drop-out run batched in torch
  (`batch_steps.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fastcell.errors import EnvironmentProblem, InputError
from fastcell.loaders.base import EvalLoaderBase, TrainLoaderBase
from fastcell.loaders.batch_steps import BatchViews, batch_generator
from fastcell.loaders.spec import AugmentSpec, Intensity
from fastcell.shard.codecs import get_codec
from fastcell.shard.format import ID_EXT, find_bad_sample

SHUFFLE_BUFFER = 4096  # samples held by the reader's shuffle buffer (per rank)
READER_NAME = "reader"
DATA_OPERATORS = ("fn.readers.webdataset", "fn.decoders.")  # their errors are about the shards' bytes


def import_dali():
    """Import DALI or explain how to get it (or how to do without)."""
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as err:
        raise EnvironmentProblem(
            f"NVIDIA DALI is not installed ({err}); install it with `pip install nvidia-dali-cuda130` "
            "(works without a GPU too) or use the PyTorch loader: --loader torch"
        ) from err
    return fn, pipeline_def, types, DALIGenericIterator, LastBatchPolicy


class _Graph:
    """Builds the DALI operators of a pipeline on the CPU or the GPU."""

    def __init__(self, intensity: Intensity, gpu: bool):
        self.fn, _, self.types, _, _ = import_dali()
        self.intensity = intensity
        self.gpu = gpu
        self.channels = intensity.channels

    def read(self, shards, *, codec: str, shuffle: bool, shard_id: int = 0, num_shards: int = 1):
        """The uint16 CHW crops (on the GPU when the graph is) and int64 ids of the shards.

        `npy` crops are parsed on the CPU (`fn.decoders.numpy`, CHW) and copied to the GPU; image
        codecs are decoded by `fn.decoders.image` with `device="mixed"` on the GPU (nvTIFF), else on
        the CPU (libtiff), all channels kept (ANY_DATA) at 16 bits (UINT16), HWC, then transposed to CHW.
        """
        fn, types = self.fn, self.types
        crop_codec = get_codec(codec)
        data, ids = fn.readers.webdataset(
            paths=[str(tar) for _, tar, _, _ in shards],
            index_paths=[str(idx) for _, _, idx, _ in shards],
            ext=[crop_codec.ext, ID_EXT],
            dtypes=[types.UINT8, types.INT64],
            random_shuffle=shuffle,
            initial_fill=SHUFFLE_BUFFER,
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=True,
            name=READER_NAME,
        )
        if crop_codec.dali_decoder == "numpy":
            images = fn.reshape(fn.decoders.numpy(data), layout="CHW")
            return (images.gpu() if self.gpu else images), ids
        hwc = fn.decoders.image(data, device="mixed" if self.gpu else "cpu", output_type=types.ANY_DATA,
                                dtype=types.UINT16)
        return fn.transpose(hwc, perm=[2, 0, 1], output_layout="CHW"), ids

    def constant(self, values):
        """A per-channel float32 constant [C] on the CPU (for per-sample operator arguments)."""
        return self.types.Constant(np.asarray(values, dtype=np.float32).reshape(self.channels), device="cpu")

    def uniform(self, value_range, shape=None):
        """Per-sample random values in `value_range` on the CPU (a number when the range is one value)."""
        if value_range[0] == value_range[1]:
            return float(value_range[0])
        return self.fn.random.uniform(range=list(value_range), shape=shape)

    def coin(self, probability: float, dtype=None):
        return self.fn.random.coin_flip(probability=probability, dtype=dtype or self.types.BOOL)

    def affine(self, image, scale, shift):
        """`image * scale + shift` per channel as one `crop_mirror_normalize` (float32 CHW out).

        CMN computes `(x - mean) / std`: mean = -shift / scale, std = 1 / scale; `scale` and
        `shift` are [C] vectors, constant or per sample (argument inputs stay on the CPU).
        """
        return self.fn.crop_mirror_normalize(image, mean=-shift / scale, std=1.0 / scale, output_layout="CHW",
                                             dtype=self.types.FLOAT)

    def output(self, node, spec: AugmentSpec, dtype: torch.dtype):
        """float16 when asked for, unless the batch steps (gamma) still need float32."""
        if dtype == torch.float16 and not spec.gamma_in_batch:
            return self.fn.cast(node, dtype=self.types.FLOAT16)
        return node

    def view(self, image, spec: AugmentSpec, crop_size: int, size: int, dtype: torch.dtype):
        """Steps 1-4 of `AugmentSpec` on a uint16 CHW image on the GPU (on the CPU `BatchViews` makes
        the views), and 6 unless gamma (5) follows in torch.

        Gain and contrast are per-channel affine maps of the stored intensity x:
        `v = (x / ref * gain - m) * contrast + m` is `x * A + B` with A = gain * contrast / ref,
        B = m (1 - contrast); so are they followed by the normalisation (`* scale + shift`). One
        `crop_mirror_normalize` with per-sample mean/std does all of it.
        """
        fn, types, it, channels = self.fn, self.types, self.intensity, self.channels
        if spec.random_crop:
            # output no larger than the crop: the window is only ever enlarged, antialiasing is a no-op
            image = fn.random_resized_crop(image, size=[size, size], random_area=list(spec.crop_scale),
                                           random_aspect_ratio=list(spec.crop_ratio), antialias=size < crop_size)
        elif size != crop_size:
            image = fn.resize(image, size=[size, size])
        if spec.dihedral:
            if self.coin(0.5):
                image = fn.transpose(image, perm=[0, 2, 1], transpose_layout=False)
            image = fn.flip(image, horizontal=self.coin(0.5, types.INT32), vertical=self.coin(0.5, types.INT32))
        if spec.blur:  # both branches must give one type: float (blurred uint16 would round)
            if self.coin(spec.blur_p):
                image = fn.gaussian_blur(image, sigma=self.uniform(spec.blur_sigma), dtype=types.FLOAT)
            else:
                image = fn.cast(image, dtype=types.FLOAT)
        slope = self.constant(1.0 / it.ref)
        offset = 0.0
        if spec.jitter:
            on = self.coin(spec.jitter_p, types.INT32)
            gain = 1.0 + on * (self.uniform(spec.gain, [channels]) - 1.0)
            contrast = 1.0 + on * (self.uniform(spec.contrast, [channels]) - 1.0)
            slope = slope * gain * contrast
            offset = self.constant(it.jitter_mean) * (1.0 - contrast)
        if not spec.gamma_in_batch:
            slope = slope * self.constant(it.scale)
            offset = offset * self.constant(it.scale) + self.constant(it.shift)
        if isinstance(offset, float):
            offset = self.constant(np.full(channels, offset))
        return self.output(self.affine(image, slope, offset), spec, dtype)


def _iterate(pipe, output_names, policy, loader):
    """DALI's torch iterator over `pipe`; a failure to read or decode `loader`'s shards becomes an InputError."""
    _, _, _, DALIGenericIterator, _ = import_dali()
    try:
        yield from DALIGenericIterator([pipe], output_names, reader_name=READER_NAME, last_batch_policy=policy,
                                       auto_reset=False)
    except UnicodeDecodeError as err:  # DALI's message quoted the damaged bytes, which are not UTF-8
        raise _shard_error(RuntimeError("its message quoted the damaged bytes, which are not text"), loader) from err
    except RuntimeError as err:
        if not any(op in str(err) for op in DATA_OPERATORS):
            raise
        raise _shard_error(err, loader) from err


def _shard_error(err: RuntimeError, loader) -> InputError:
    """DALI's reader or decoder failed; its message names neither shard nor sample (`nvImageCodec failure: '#4'`),
    so decode the loader's shards with NumPy to name the first bad sample."""
    message = str(err)
    detail = message.split("encountered:", 1)[-1].split("Current pipeline object", 1)[0].strip()
    tars = [tar for _, tar, _, _ in loader.shards]
    found = find_bad_sample(tars, loader.manifest.codec, loader.manifest.crop_shape)
    if found:
        return InputError(f"{found} (DALI: {detail})")
    names = ", ".join(map(str, tars[:3])) + (f" and {len(tars) - 3} more" if len(tars) > 3 else "")
    return InputError(f"DALI failed reading the shards {names}: {detail}; every sample decodes with NumPy, "
                      f"so check that the files did not change while being read")


class DaliTrainLoader(TrainLoaderBase):
    """Two-view SimCLR batches from DALI; see `fastcell.loaders.create_train_loader`."""

    def __init__(self, shard_dir, spec: AugmentSpec, batch_size: int, **kwargs):
        import_dali()
        super().__init__(shard_dir, spec, batch_size, **kwargs)
        self.gpu = self.device.type == "cuda"
        self.batch_views = None if self.gpu else BatchViews(spec, self.intensity, self.crop_size)

    def build_pipeline(self):
        """The DALI pipeline of the current epoch (a fresh one each call, seeded per epoch and rank):
        on the GPU it outputs both views, on the CPU the float32 crops (`BatchViews` makes the views)."""
        _, pipeline_def, types, _, _ = import_dali()
        gpu = self.gpu
        graph = _Graph(self.intensity, gpu)

        def read():
            return graph.read(self.shards, codec=self.manifest.codec, shuffle=True, shard_id=self.shard_id,
                              num_shards=self.num_shards)

        @pipeline_def(enable_conditionals=True)
        def two_views():
            images, ids = read()
            view1, view2 = [
                graph.view(images, self.spec, self.manifest.crop_size, self.crop_size, self.dtype) for _ in range(2)
            ]
            return view1, view2, ids

        @pipeline_def
        def float_crops():
            images, ids = read()
            return graph.fn.cast(images, dtype=types.FLOAT), ids

        pipe = (two_views if gpu else float_crops)(batch_size=self.batch_size, num_threads=self.num_workers,
                                                   device_id=self.device.index if gpu else None,
                                                   seed=self.epoch_seed())
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        *_, LastBatchPolicy = import_dali()
        names = ["view1", "view2", "ids"] if self.gpu else ["images", "ids"]
        batches = _iterate(self.build_pipeline(), names, LastBatchPolicy.DROP, self)
        with ThreadPoolExecutor(max_workers=2) as pool:
            for step, outputs in zip(range(self.steps), batches, strict=False):
                out = outputs[0]
                if self.gpu:
                    view1, view2 = out["view1"], out["view2"]
                    if view1.data_ptr() == view2.data_ptr():  # DALI merges identical graphs (no random ops)
                        view2 = view2.clone()
                    view1, view2 = self.post_process((view1, view2), step)
                else:
                    view1, view2 = self.cpu_views(out["images"], step, pool)
                yield view1, view2, out["ids"].view(-1)

    def cpu_views(self, images: torch.Tensor, step: int, pool: ThreadPoolExecutor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views of batch `step` from its float32 crops: all the steps in torch, one view per thread
        of `pool`, each with half of torch's intra-op threads. (On 2 cores, two single-threaded views
        beat one view at a time on 2 OpenMP threads, most of all on a busy machine.)"""
        threads = torch.get_num_threads()

        def view(index: int) -> torch.Tensor:
            torch.set_num_threads(max(1, threads // 2))
            generator = batch_generator(self.device, self.epoch_seed(step, 0x7135, index))
            return self.finish_view(self.batch_views(images, generator), step, index)

        try:
            return tuple(pool.map(view, (0, 1)))
        finally:
            torch.set_num_threads(threads)


class DaliEvalLoader(EvalLoaderBase):
    """Centre-cropped, normalised images and ids in shard order; see `create_eval_loader`."""

    def __init__(self, shard_dir, batch_size: int, **kwargs):
        import_dali()
        super().__init__(shard_dir, batch_size, **kwargs)

    def build_pipeline(self):
        fn, pipeline_def, _, _, _ = import_dali()
        gpu = self.device.type == "cuda"
        graph = _Graph(self.intensity, gpu)
        it = self.intensity

        @pipeline_def
        def centre_crops():
            images, ids = graph.read(self.shards, codec=self.manifest.codec, shuffle=False)
            if self.crop_size != self.manifest.crop_size:
                images = fn.crop(images, crop=[self.crop_size, self.crop_size])  # centred
            out = graph.affine(images, graph.constant(it.scale / it.ref), graph.constant(it.shift))
            return graph.output(out, AugmentSpec.identity(), self.dtype), ids

        pipe = centre_crops(batch_size=self.batch_size, num_threads=self.num_workers,
                            device_id=self.device.index if gpu else None, seed=0)
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        *_, LastBatchPolicy = import_dali()
        for outputs in _iterate(self.build_pipeline(), ["images", "ids"], LastBatchPolicy.PARTIAL, self):
            out = outputs[0]
            yield out["images"].to(self.dtype), out["ids"].view(-1)
