"""The DALI backend (default): `fn.readers.webdataset` over fastcell's shards and `.idx` files,
the crops decoded by the shards' codec (`_Graph.read`: npy parsed on the CPU; tiff-deflate decoded
on the GPU by nvTIFF, or on the CPU; blosc2, which no DALI operator decodes, read as bytes by
`_Graph.members` and decoded batch-wise by `HostDecoder` in threads), then both views' augmentations
on the GPU when the loader's device is CUDA. Without a GPU (`device_id=None`), DALI reads, decodes and shuffles, and the views are
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
from contextlib import contextmanager

import numpy as np
import torch

from fastcell.errors import EnvironmentProblem, InputError
from fastcell.loaders.base import EvalLoaderBase, TrainLoaderBase
from fastcell.loaders.batch_steps import BatchViews, batch_generator
from fastcell.loaders.spec import AugmentSpec, Intensity
from fastcell.loaders.torch_ref import centre_crop_normalised
from fastcell.shard.codecs import BadSample, get_codec
from fastcell.shard.format import ID_EXT, find_bad_sample, read_dali_index, sample_key

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

    def _reader(self, shards, crop_codec, shuffle: bool, shard_id: int, num_shards: int):
        """The crop members (uint8) and int64 ids of the shards, shuffled through `SHUFFLE_BUFFER` samples or not."""
        return self.fn.readers.webdataset(
            paths=[str(tar) for _, tar, _, _ in shards],
            index_paths=[str(idx) for _, _, idx, _ in shards],
            ext=[crop_codec.ext, ID_EXT],
            dtypes=[self.types.UINT8, self.types.INT64],
            random_shuffle=shuffle,
            initial_fill=SHUFFLE_BUFFER,
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=True,
            name=READER_NAME,
        )

    def read(self, shards, *, codec: str, shuffle: bool, shard_id: int = 0, num_shards: int = 1):
        """The uint16 CHW crops (on the GPU when the graph is) and int64 ids of the shards.

        `npy` crops are parsed on the CPU (`fn.decoders.numpy`, CHW) and copied to the GPU; image
        codecs are decoded by `fn.decoders.image` with `device="mixed"` on the GPU (nvTIFF), else on
        the CPU (libtiff), all channels kept (ANY_DATA) at 16 bits (UINT16), HWC, then transposed to CHW.
        Codecs DALI cannot decode are read by `members` instead.
        """
        fn, types = self.fn, self.types
        crop_codec = get_codec(codec)
        data, ids = self._reader(shards, crop_codec, shuffle, shard_id, num_shards)
        if crop_codec.dali_decoder == "numpy":
            images = fn.reshape(fn.decoders.numpy(data), layout="CHW")
            return (images.gpu() if self.gpu else images), ids
        hwc = fn.decoders.image(data, device="mixed" if self.gpu else "cpu", output_type=types.ANY_DATA,
                                dtype=types.UINT16)
        return fn.transpose(hwc, perm=[2, 0, 1], output_layout="CHW"), ids

    def members(self, shards, *, codec: str, shuffle: bool, shard_id: int = 0, num_shards: int = 1):
        """The crop members of a codec that `HostDecoder` decodes: the bytes zero-padded to the batch's longest
        member (DALI's torch iterator takes no ragged batch), their int32 lengths [1] and the int64 ids."""
        data, ids = self._reader(shards, get_codec(codec), shuffle, shard_id, num_shards)
        return self.fn.pad(data, fill_value=0), data.shape(dtype=self.types.INT32), ids

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


def _iterate(pipe, output_names, policy, loader, reader: bool = True):
    """DALI's torch iterator over `pipe` (epochs set by its reader; `reader=False`: endless, for a pipeline fed by
    an external source); a failure to read or decode `loader`'s shards becomes an InputError."""
    _, _, _, DALIGenericIterator, _ = import_dali()
    epoch = {"reader_name": READER_NAME} if reader else {"size": -1}
    try:
        yield from DALIGenericIterator([pipe], output_names, last_batch_policy=policy, auto_reset=False, **epoch)
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


class HostDecoder:
    """Decodes the batches of a codec no DALI operator decodes (`Codec.dali_decoder == "host"`: blosc2).

    DALI reads and shuffles the members (`_Graph.members`: bytes padded to the batch's longest, lengths, ids);
    `decode(outputs)` decodes them with `Codec.decode_batch` in `threads` threads (the decoder releases the
    GIL) into a preallocated uint16 [B, C, S, S] tensor. For a CUDA loader the buffers are pinned and the batch
    is copied over asynchronously; two buffers alternate, each reused once its copy has finished. A member that
    does not decode is named with its shard and sample (InputError). Use as a context manager (the threads).
    """

    def __init__(self, loader, threads: int):
        self.loader, self.codec = loader, get_codec(loader.manifest.codec)
        self.device = loader.device
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads))
        self.buffers: list[torch.Tensor] = []
        self.copied: list = []  # per buffer: the CUDA event of its last copy
        self.turn = 0

    def __enter__(self) -> HostDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)

    def _buffer(self, n: int) -> torch.Tensor:
        cuda = self.device.type == "cuda"
        if not self.buffers or len(self.buffers[0]) < n:
            shape = (n, *self.loader.manifest.crop_shape)
            self.buffers = [torch.empty(shape, dtype=torch.uint16, pin_memory=cuda) for _ in range(2 if cuda else 1)]
            self.copied = [None] * len(self.buffers)
        self.turn = (self.turn + 1) % len(self.buffers)
        if self.copied[self.turn] is not None:
            self.copied[self.turn].synchronize()
        return self.buffers[self.turn][:n]

    def decode_arrays(self, data: np.ndarray, lengths: np.ndarray, ids: np.ndarray) -> torch.Tensor:
        """The uint16 crops of one batch of members, in a host buffer (pinned for a CUDA loader)."""
        buffer = self._buffer(len(lengths))
        try:
            self.codec.decode_batch(data, lengths.reshape(-1), buffer.numpy(), self.pool)
        except BadSample as err:
            raise bad_member(self.loader, int(ids.reshape(-1)[err.index]), err) from err
        return buffer

    def decode(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The uint16 crops of a batch of the torch iterator (`data`, `lengths`, `ids`), on the loader's device."""
        buffer = self.decode_arrays(outputs["data"].numpy(), outputs["lengths"].numpy(), outputs["ids"].numpy())
        if self.device.type != "cuda":
            return buffer
        images = buffer.to(self.device, non_blocking=True)
        self.copied[self.turn] = torch.cuda.Event()
        self.copied[self.turn].record()
        return images

    def source(self, pipe):
        """Batches (uint16 crops, ids) decoded from a members pipeline, for `fn.external_source` (endless: the
        reader wraps around; the train loader stops after its steps)."""
        while True:
            data, lengths, ids = (out.as_array() for out in pipe.run())
            yield self.decode_arrays(data, lengths, ids).numpy(), ids  # external_source copies it


@contextmanager
def one_torch_thread():
    """torch ops on one thread meanwhile: next to the decode threads, torch's OpenMP threads (which spin while
    they wait) halved the CPU eval rate of blosc2 shards on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def bad_member(loader, cell_id: int, err: Exception) -> InputError:
    """The InputError of a crop member of `loader`'s shards that did not decode: its shard, found through the
    indices (or, when the id itself is damaged, by decoding the shards with NumPy), and the decoder's reason."""
    ext = get_codec(loader.manifest.codec).ext
    member = f"{sample_key(cell_id)}.{ext}" if 0 <= cell_id < 10**12 else None
    for _, tar, idx, _ in loader.shards:
        if member is not None and any(name == member for sample in read_dali_index(idx) for *_, name in sample):
            return InputError(f"{tar}: member {member} is corrupt ({err})")
    found = find_bad_sample([tar for _, tar, _, _ in loader.shards], loader.manifest.codec, loader.manifest.crop_shape)
    return InputError(found or f"a crop of {loader.shards[0][1].parent} does not decode ({err})")


class DaliTrainLoader(TrainLoaderBase):
    """Two-view SimCLR batches from DALI; see `fastcell.loaders.create_train_loader`."""

    def __init__(self, shard_dir, spec: AugmentSpec, batch_size: int, **kwargs):
        import_dali()
        super().__init__(shard_dir, spec, batch_size, **kwargs)
        self.gpu = self.device.type == "cuda"
        self.host_decoded = get_codec(self.manifest.codec).dali_decoder == "host"
        self.batch_views = None if self.gpu else BatchViews(spec, self.intensity, self.crop_size)

    def members_pipeline(self):
        """A CPU pipeline of the epoch's shuffled crop members, padded, with their lengths and ids (host codecs)."""
        _, pipeline_def, _, _, _ = import_dali()

        @pipeline_def
        def members():
            return _Graph(self.intensity, False).members(self.shards, codec=self.manifest.codec, shuffle=True,
                                                         shard_id=self.shard_id, num_shards=self.num_shards)

        pipe = members(batch_size=self.batch_size, num_threads=self.num_workers, device_id=None,
                       seed=self.epoch_seed())
        pipe.build()
        return pipe

    def build_pipeline(self, decoder: HostDecoder | None = None):
        """The DALI pipeline of the current epoch (a fresh one each call, seeded per epoch and rank):
        on the GPU it outputs both views, on the CPU the float32 crops (`BatchViews` makes the views).
        For a codec DALI cannot decode, on the CPU it is `members_pipeline` (the loader decodes each batch);
        on the GPU `decoder` feeds the view graph the crops it decodes from a members pipeline."""
        _, pipeline_def, types, _, _ = import_dali()
        gpu = self.gpu
        graph = _Graph(self.intensity, gpu)
        if self.host_decoded and not gpu:
            return self.members_pipeline()

        def read():
            if self.host_decoded:
                images, ids = graph.fn.external_source(source=decoder.source(self.members_pipeline()), num_outputs=2,
                                                       batch=True, dtype=[types.UINT16, types.INT64],
                                                       layout=["CHW", ""])
                return images.gpu(), ids
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
        names = ["view1", "view2", "ids"] if self.gpu else ["data", "lengths", "ids"] if self.host_decoded else [
            "images", "ids"]
        with HostDecoder(self, self.num_workers) as decoder, ThreadPoolExecutor(max_workers=2) as pool:
            pipe = self.build_pipeline(decoder)
            batches = _iterate(pipe, names, LastBatchPolicy.DROP, self, reader=not (self.gpu and self.host_decoded))
            for step, outputs in zip(range(self.steps), batches, strict=False):
                out = outputs[0]
                if self.gpu:
                    view1, view2 = out["view1"], out["view2"]
                    if view1.data_ptr() == view2.data_ptr():  # DALI merges identical graphs (no random ops)
                        view2 = view2.clone()
                    view1, view2 = self.post_process((view1, view2), step)
                else:
                    if self.host_decoded:
                        with one_torch_thread():
                            images = decoder.decode(out).float()
                    else:
                        images = out["images"]
                    view1, view2 = self.cpu_views(images, step, pool)
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
        """Centre-cropped, normalised crops and ids; for a codec DALI cannot decode, the padded members, their
        lengths and ids (`__iter__` decodes them and normalises in torch, as the torch backend does)."""
        fn, pipeline_def, _, _, _ = import_dali()
        gpu = self.device.type == "cuda"
        graph = _Graph(self.intensity, gpu)
        it = self.intensity

        @pipeline_def
        def members():
            return _Graph(self.intensity, False).members(self.shards, codec=self.manifest.codec, shuffle=False)

        @pipeline_def
        def centre_crops():
            images, ids = graph.read(self.shards, codec=self.manifest.codec, shuffle=False)
            if self.crop_size != self.manifest.crop_size:
                images = fn.crop(images, crop=[self.crop_size, self.crop_size])  # centred
            out = graph.affine(images, graph.constant(it.scale / it.ref), graph.constant(it.shift))
            return graph.output(out, AugmentSpec.identity(), self.dtype), ids

        host = get_codec(self.manifest.codec).dali_decoder == "host"
        pipe = (members if host else centre_crops)(batch_size=self.batch_size, num_threads=self.num_workers,
                                                   device_id=None if host or not gpu else self.device.index, seed=0)
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        *_, LastBatchPolicy = import_dali()
        host = get_codec(self.manifest.codec).dali_decoder == "host"
        names = ["data", "lengths", "ids"] if host else ["images", "ids"]
        with HostDecoder(self, self.num_workers) as decoder:
            for outputs in _iterate(self.build_pipeline(), names, LastBatchPolicy.PARTIAL, self):
                out = outputs[0]
                if host:
                    with one_torch_thread():
                        images = centre_crop_normalised(decoder.decode(out), self.intensity, self.crop_size)
                else:
                    images = out["images"]
                yield images.to(self.dtype), out["ids"].view(-1)
