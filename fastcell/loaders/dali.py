"""The DALI backend (default): `fn.readers.webdataset` over fastcell's shards and `.idx` files reads,
shuffles and decodes the crops (`_Graph.read`: npy parsed on the CPU; tiff-deflate decoded on the GPU
by nvTIFF, or on the CPU; the blosc2 codecs, which no DALI operator decodes, read straight from the
memory-mapped tars through the `.idx` files (`ShardMembers`: in shard order for evaluation, by the ids
DALI's reader shuffles for training) and decoded batch-wise by `HostDecoder` in threads, ahead of their
use) and hands them to torch as float32 (on the GPU when the loader's device is CUDA), where
`augment.ViewRecipe` makes both views batched, the same code on the CPU and the GPU. (DALI's own
per-sample augmentation operators cost several times the read + decode path on single-cell crops:
`augment.py`.) On CUDA a background thread prepares batches ahead on its own stream (`prefetch.py`), so
loading and augmentation overlap the training step.

Shuffling: the reader streams the rank's slice of the shards in order through a buffer of
`SHUFFLE_BUFFER` samples and emits a random one of them each time (`initial_fill`). Shards are
written interleaved across the screen, so a buffer-local shuffle already mixes wells and plates.
Each epoch builds a fresh pipeline seeded from (seed, epoch, rank), so an epoch is a deterministic
function of those and the reader's first pass gives every sample of the slice exactly once. The next
epoch's pipeline is built and started (its shuffle buffer filled) in the background while an epoch runs,
so epochs follow each other without that wait.

The PyTorch iterator cannot return uint16: the pipelines output float32 (float16 when an eval
loader asks for it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager, nullcontext
from typing import Any

import numpy as np
import torch

from fastcell.errors import EnvironmentProblem, InputError
from fastcell.format.codecs import BadSample, Codec
from fastcell.format.folder import ID_EXT, find_bad_sample, sample_key
from fastcell.loaders.augment import ViewRecipe, seeded_generator
from fastcell.loaders.base import (
    EvalLoaderBase,
    OpenShard,
    TrainLoaderBase,
    centre_crop_normalised,
    eval_affine,
    uint16_as_float,
)
from fastcell.loaders.prefetch import prefetch
from fastcell.loaders.spec import AugmentSpec, Intensity, derive_seed

SHUFFLE_BUFFER = 4096  # samples held by the reader's shuffle buffer (per rank)
PREFETCH_DEPTH = 3  # batches prepared ahead on CUDA
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
        self.gpu = gpu
        self.channels = intensity.channels

    def _reader(self, shards, exts: list[str], shuffle: bool, rank: int, world_size: int):
        """The members `exts` of the shards' samples (uint8; ids int64), shuffled through `SHUFFLE_BUFFER` samples or
        not. The order of the samples depends on the shards, the seed and the rank only, not on `exts`."""
        return self.fn.readers.webdataset(
            paths=[str(shard.tar) for shard in shards],
            index_paths=[str(shard.idx) for shard in shards],
            ext=exts,
            dtypes=[self.types.INT64 if ext == ID_EXT else self.types.UINT8 for ext in exts],
            random_shuffle=shuffle,
            initial_fill=SHUFFLE_BUFFER,
            shard_id=rank,  # DALI calls a rank's part of the data its shard
            num_shards=world_size,
            pad_last_batch=True,
            name=READER_NAME,
        )

    def read(self, shards, *, codec: Codec, shuffle: bool, rank: int = 0, world_size: int = 1):
        """The uint16 CHW crops (on the GPU when the graph is) and int64 ids of the shards.

        `npy` crops are parsed on the CPU (`fn.decoders.numpy`, CHW) and copied to the GPU; image
        codecs are decoded by `fn.decoders.image` with `device="mixed"` on the GPU (nvTIFF), else on
        the CPU (libtiff), all channels kept (ANY_DATA) at 16 bits (UINT16), HWC, then transposed to CHW.
        Codecs DALI cannot decode are found by `ids` and `ShardMembers` instead.
        """
        fn, types = self.fn, self.types
        data, ids = self._reader(shards, [codec.ext, ID_EXT], shuffle, rank, world_size)
        if codec.dali_decoder == "numpy":
            images = fn.reshape(fn.decoders.numpy(data), layout="CHW")
            return (images.gpu() if self.gpu else images), ids
        hwc = fn.decoders.image(data, device="mixed" if self.gpu else "cpu", output_type=types.ANY_DATA,
                                dtype=types.UINT16)
        return fn.transpose(hwc, perm=[2, 0, 1], output_layout="CHW"), ids

    def ids(self, shards, *, shuffle: bool, rank: int = 0, world_size: int = 1):
        """The int64 ids alone, in `read`'s order: for a codec that `HostDecoder` decodes, whose members the loader
        finds by id (`ShardMembers`; DALI's reading, padding and handing over the members cost ~20 µs a sample)."""
        return self._reader(shards, [ID_EXT], shuffle, rank, world_size)

    def constant(self, values):
        """A per-channel float32 constant [C] on the CPU (for per-sample operator arguments)."""
        return self.types.Constant(np.asarray(values, dtype=np.float32).reshape(self.channels), device="cpu")

    def affine(self, image, scale, shift):
        """`image * scale + shift` per channel as one `crop_mirror_normalize` (float32 CHW out).

        CMN computes `(x - mean) / std`: mean = -shift / scale, std = 1 / scale; `scale` and
        `shift` are constant [C] vectors.
        """
        return self.fn.crop_mirror_normalize(image, mean=-shift / scale, std=1.0 / scale, output_layout="CHW",
                                             dtype=self.types.FLOAT)

    def output(self, node, dtype: torch.dtype):
        """float16 when asked for (else float32; bfloat16 is a cast in torch)."""
        if dtype == torch.float16:
            return self.fn.cast(node, dtype=self.types.FLOAT16)
        return node


@contextmanager
def _shard_errors(loader):
    """A failure of DALI to read or decode `loader`'s shards becomes an InputError naming the sample."""
    try:
        yield
    except UnicodeDecodeError as err:  # DALI's message quoted the damaged bytes, which are not UTF-8
        raise _shard_error(RuntimeError("its message quoted the damaged bytes, which are not text"), loader) from err
    except RuntimeError as err:
        if not any(op in str(err) for op in DATA_OPERATORS):
            raise
        raise _shard_error(err, loader) from err


def _start(pipe, output_names, policy, loader):
    """DALI's torch iterator over `pipe`, started: the reader has filled its shuffle buffer and the first batch
    is ready (DALI prepares it when the iterator is made)."""
    _, _, _, DALIGenericIterator, _ = import_dali()
    with _shard_errors(loader):
        return DALIGenericIterator([pipe], output_names, reader_name=READER_NAME, last_batch_policy=policy,
                                   auto_reset=False)


def _iterate(iterator, loader):
    """The batches of a `_start`ed iterator; read and decode failures become InputErrors."""
    with _shard_errors(loader):
        yield from iterator


def _shard_error(err: RuntimeError, loader) -> InputError:
    """DALI's reader or decoder failed; its message names neither shard nor sample (`nvImageCodec failure: '#4'`),
    so decode the loader's shards with NumPy to name the first bad sample."""
    message = str(err)
    detail = message.split("encountered:", 1)[-1].split("Current pipeline object", 1)[0].strip()
    tars = [shard.tar for shard in loader.shards]
    found = find_bad_sample(tars, loader.manifest.codec, loader.manifest.crop_shape)
    if found:
        return InputError(f"{found} (DALI: {detail})")
    names = ", ".join(map(str, tars[:3])) + (f" and {len(tars) - 3} more" if len(tars) > 3 else "")
    return InputError(f"DALI failed reading the shards {names}: {detail}; every sample decodes with NumPy, "
                      f"so check that the files did not change while being read")


class HostDecoder:
    """Decodes the batches of a codec no DALI operator decodes (`Codec.host_decoded`: blosc2).

    `decode(members, ids)` decodes a batch of members (views into the tars from `ShardMembers`) with
    `Codec.decode_members` in `threads` threads (one decompresses, the others finish) into a preallocated uint16
    [B, C, S, S] tensor. For a CUDA loader the buffers are pinned and the batch is copied over asynchronously;
    two buffers alternate, each reused once its copy has finished. A member that does not decode is named with
    its shard and sample (InputError). Use as a context manager (the threads).
    """

    def __init__(self, loader, threads: int):
        self.loader, self.codec = loader, loader.manifest.codec
        self.device = loader.device
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="fastcell-decode")
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

    def decode(self, members: list, ids: torch.Tensor, then: Callable[[np.ndarray, slice], Any] | None = None
               ) -> torch.Tensor:
        """The uint16 crops of a batch of members (bytes-like) with their ids [B], on the loader's device.
        `then(crops, where)` runs in the decoding threads on each group of crops as it is decoded (`crops`: the
        NumPy view `buffer[where]`)."""
        buffer = self._buffer(len(members))
        crops = buffer.numpy()
        after = None if then is None else (lambda start, stop: then(crops[start:stop], slice(start, stop)))
        try:
            self.codec.decode_members(members, crops, self.pool, after)
        except BadSample as err:
            raise bad_member(self.loader, int(ids[err.index]), err) from err
        if self.device.type != "cuda":
            return buffer
        images = buffer.to(self.device, non_blocking=True)
        self.copied[self.turn] = torch.cuda.Event()
        self.copied[self.turn].record()
        return images


class ShardMembers:
    """The crop members of shards, as views into the memory-mapped tars (no copy), located through the spans
    the loader parsed from the shards' indices when it opened them (`open_split`): in shard order for an eval
    loader (`batches`), by id for a train loader
    whose DALI reader yields the shuffled ids only (`find`). Reading, padding and handing over the members through
    DALI cost about as much CPU time per sample as reading, decoding and normalising npy crops
    (`bench/results/codec_bench.md`)."""

    def __init__(self, shards: list[OpenShard]):
        self.tars = [shard.tar for shard in shards]
        self.data, spans = [], []
        for k, (tar, found) in enumerate((shard.tar, shard.spans) for shard in shards):
            data = np.memmap(tar, dtype=np.uint8, mode="r").view(np.ndarray)  # the views keep the map open
            ids = data[found.id_at[:, None] + np.arange(8)].view("<i8").ravel()
            keys = found.keys()
            if np.any(ids != keys):  # a damaged id member: its crop would be taken for another cell's
                bad = int(np.argmax(ids != keys))
                raise InputError(f"{tar}: member {found.names[bad]} is corrupt (not the 8-byte id {keys[bad]})")
            self.data.append(data)
            spans.append((np.full(len(ids), k), found.crop_at, found.crop_at + found.crop_size, ids))
        self.shard, self.start, self.stop, self.ids = (np.concatenate(column) for column in zip(*spans, strict=True))
        self._by_id = None  # (sorted ids, their rows), made by the first `find`

    def members(self, rows: np.ndarray) -> list[np.ndarray]:
        """The crop members of the table's rows (positions in shard order)."""
        return [self.data[k][a:b] for k, a, b in zip(self.shard[rows].tolist(), self.start[rows].tolist(),
                                                     self.stop[rows].tolist(), strict=True)]

    def batches(self, batch_size: int) -> Iterator[tuple[list[np.ndarray], torch.Tensor]]:
        """(members, ids) in shard order, in batches of `batch_size` (the last one partial)."""
        for first in range(0, len(self.ids), batch_size):
            rows = np.arange(first, min(first + batch_size, len(self.ids)))
            yield self.members(rows), torch.from_numpy(self.ids[rows])

    def find(self, ids: np.ndarray) -> list[np.ndarray]:
        """The members of the samples `ids` [B]. InputError for an id listed twice (which member would be meant?)
        or by no index (the ids were checked against the indices when the table was made: the files changed)."""
        if self._by_id is None:
            order = np.argsort(self.ids, kind="stable")
            known = self.ids[order]
            twice = known[1:] == known[:-1]
            if twice.any():
                raise InputError(f"{self.tars[0].parent}: cell id {int(known[1:][twice][0])} is in more than one "
                                 "sample of the shards; reshard the folder")
            self._by_id = known, order
        known, order = self._by_id
        at = np.minimum(np.searchsorted(known, ids), len(known) - 1)
        missing = known[at] != ids
        if missing.any():
            raise InputError(f"{self.tars[0].parent}: DALI read cell id {int(ids[missing.argmax()])}, which no shard "
                             "index lists: did the shards change while being read?")
        return self.members(order[at])


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
    for shard in loader.shards:
        if 0 <= cell_id < 10**12 and np.any(shard.spans.keys() == cell_id):
            member = f"{sample_key(cell_id)}.{loader.manifest.codec.ext}"
            return InputError(f"{shard.tar}: member {member} is corrupt ({err})")
    found = find_bad_sample([shard.tar for shard in loader.shards], loader.manifest.codec, loader.manifest.crop_shape)
    return InputError(found or f"a crop of {loader.shards[0].tar.parent} does not decode ({err})")


class DaliTrainLoader(TrainLoaderBase):
    """Two-view SimCLR batches: DALI reads and decodes, `ViewRecipe` makes the views; see
    `fastcell.loaders.create_train_loader`."""

    def __init__(self, shard_dir, spec: AugmentSpec, batch_size: int, **kwargs):
        import_dali()
        super().__init__(shard_dir, spec, batch_size, **kwargs)
        self.gpu = self.device.type == "cuda"
        self.recipe = ViewRecipe(spec, self.intensity, self.image_size, noise_seed=derive_seed(self.seed, 0x4E015E))
        self._starter: ThreadPoolExecutor | None = None  # starts the next epoch's pipeline (`_start_ahead`)
        self._ahead: tuple[int, Any] | None = None  # (epoch, future of its started iterator)
        self._view_pool: ThreadPoolExecutor | None = None
        # a host-decoded codec: the shards' members (the tars mapped, the ids checked), kept from epoch to epoch
        self.members = ShardMembers(self.shards) if self.manifest.codec.host_decoded else None

    def build_pipeline(self, epoch: int | None = None):
        """The DALI pipeline of an epoch (a fresh one each call, seeded per epoch and rank): the shuffled
        crops as float32 (on the GPU when the loader's device is CUDA) and their ids; for a codec DALI
        cannot decode, the shuffled ids alone (the loader finds and decodes their members)."""
        _, pipeline_def, types, _, _ = import_dali()
        host = self.manifest.codec.host_decoded
        graph = _Graph(self.intensity, self.gpu and not host)

        @pipeline_def
        def crops():
            where = dict(shuffle=True, rank=self.rank, world_size=self.world_size)
            if host:
                return graph.ids(self.shards, **where)
            images, ids = graph.read(self.shards, codec=self.manifest.codec, **where)
            return graph.fn.cast(images, dtype=types.FLOAT), ids

        pipe = crops(batch_size=self.batch_size, num_threads=self.num_workers,
                     device_id=self.device.index if self.gpu and not host else None,
                     seed=self.epoch_seed(epoch=epoch))
        pipe.build()
        return pipe

    def _started(self, epoch: int):
        """Epoch `epoch`'s DALI iterator, `_start`ed (its pipeline built, its reader's shuffle buffer filled, its first
        batch ready): what an epoch otherwise waits for before its first batch (~0.1 s on 2 CPU cores)."""
        *_, LastBatchPolicy = import_dali()
        host = self.manifest.codec.host_decoded
        on_gpu = self.gpu and not host
        if on_gpu:
            torch.cuda.set_device(self.device)
        iterator = _start(self.build_pipeline(epoch), ["ids"] if host else ["images", "ids"], LastBatchPolicy.DROP,
                          self)
        if on_gpu:  # its first batch was made on this thread's (and DALI's) streams: done before another uses it
            torch.cuda.synchronize(self.device)  # blocks this thread only, never the training step
        return iterator

    def _epoch_iterator(self, epoch: int):
        """Epoch `epoch`'s `_started` iterator: the one `_start_ahead` started during the epoch
        before, else one started now. Both are the same pipeline, seeded by the epoch: the same batches. An error
        starting it in the background is raised here, when its epoch begins."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == epoch:
            return ahead[1].result()
        if ahead is not None:
            ahead[1].cancel()  # another epoch's: not started yet, it never will be; started, it is dropped
        return self._started(epoch)

    def _view_threads(self) -> ThreadPoolExecutor:
        """The two threads that make the views on the CPU (one each), kept from epoch to epoch."""
        if self._view_pool is None:
            self._view_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fastcell-views")
        return self._view_pool

    def _start_ahead(self, epoch: int) -> None:
        """Start epoch `epoch`'s iterator in the background (one thread), so that an epoch that follows the one
        running does not wait for its pipeline's start. Called halfway through an epoch (or at the first batch
        of one resumed past its half): at its start, filling another pipeline's buffer would compete with this
        one's first batches for the CPU."""
        if self._starter is None:
            self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastcell-next-epoch")
        self._ahead = (epoch, self._starter.submit(self._started, epoch))

    def close(self) -> None:
        """Let go of what outlives an epoch: the next epoch's pipeline started ahead (cancelled if it has not begun)
        and the starter and view threads. Call it when no epoch follows (the trainer does); iterating again
        makes them anew."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[1].cancel()
        for pool in (self._starter, self._view_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._starter = self._view_pool = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self.start_batch  # read now: a prefetching thread must not see a later set_epoch
        if self.gpu:
            return prefetch(lambda: self.batches(epoch, start), PREFETCH_DEPTH, self.device)
        return self.batches(epoch, start)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches of `epoch` from batch `start` on: (view1, view2, ids). The reader still streams the
        batches before `start` (the shuffle is the same only so) but they are not augmented, nor decoded when
        the codec is host-decoded."""
        host = self.manifest.codec.host_decoded
        batches = _iterate(self._epoch_iterator(epoch), self)
        for _ in range(start):
            next(batches)  # passed over: read only
        pool = None if self.gpu else self._view_threads()  # the GPU makes both views in one call
        with HostDecoder(self, self.num_workers) if host else nullcontext() as decoder:
            if not host:
                images = ((out["images"], out["ids"].view(-1)) for out, in batches)
            elif self.gpu:
                images = self._gpu_decoded(batches, self.members, decoder)
            else:  # the next batch decodes in the decoding threads while this one's views are made
                images = prefetch(lambda: (self._cpu_decoded(outputs, self.members, decoder) for outputs in batches),
                                  1, self.device)
            ahead_at = max(start, self.steps // 2)
            with closing(images):  # an epoch stopped early leaves no batch decoding in the background
                for step, (crops, ids) in zip(range(start, self.steps), images, strict=False):
                    if step == ahead_at:
                        self._start_ahead(epoch + 1)
                    view1, view2 = self.views(crops, epoch, step, pool)
                    yield view1, view2, ids

    @staticmethod
    def _cpu_decoded(outputs, members: ShardMembers, decoder: HostDecoder) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 crops and ids of a batch of ids, converted by the decoding threads as they finish them."""
        ids = outputs[0]["ids"].view(-1)
        found = members.find(ids.numpy())
        images = np.empty((len(ids), *decoder.loader.manifest.crop_shape), dtype=np.float32)
        decoder.decode(found, ids, lambda crops, where: np.copyto(images[where], crops))
        return torch.from_numpy(images), ids

    @staticmethod
    def _gpu_decoded(batches, members: ShardMembers, decoder: HostDecoder
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for outputs in batches:
            ids = outputs[0]["ids"].view(-1)
            with one_torch_thread():  # not across the yield: the caller's torch keeps its threads
                images = uint16_as_float(decoder.decode(members.find(ids.numpy()), ids))
            yield images, ids

    def views(self, images: torch.Tensor, epoch: int, step: int, pool: ThreadPoolExecutor | None):
        """Both views of a batch, in the loader's dtype, drawn in one call from a generator seeded by (seed, epoch,
        rank, step). On the GPU made in one call too (one set of kernel launches for both); on the CPU one view
        per thread of `pool`, each with half of torch's intra-op threads (on 2 cores, two single-threaded views
        beat one view at a time on 2 OpenMP threads, most of all on a busy machine). The draws (and on the GPU
        all of the recipe's host side) are small CPU tensors, made on one torch thread: OpenMP's fork and join
        beside DALI's threads only stalls them (both views' draws of 512 on a busy 2-core machine: 0.9 ms on one
        thread, up to 48 ms on two)."""
        n, _, height, width = images.shape
        generator = seeded_generator(self.epoch_seed(step, 0x7135, epoch=epoch))
        with one_torch_thread():
            draws = self.recipe.draw(n, height, width, generator, views=2)
            if self.gpu:
                both = self.recipe.apply(images, draws).to(self.dtype)
                return both[:n], both[n:]
        threads = torch.get_num_threads()

        def one(index: int) -> torch.Tensor:
            torch.set_num_threads(max(1, threads // 2))
            return self.recipe.apply(images, draws.part(index, n)).to(self.dtype)

        try:
            return tuple(pool.map(one, (0, 1)))
        finally:
            torch.set_num_threads(threads)


class DaliEvalLoader(EvalLoaderBase):
    """Centre-cropped, normalised images and ids in shard order; see `create_eval_loader`."""

    def __init__(self, shard_dir, batch_size: int, **kwargs):
        import_dali()
        super().__init__(shard_dir, batch_size, **kwargs)

    def build_pipeline(self):
        """Centre-cropped, normalised crops and ids (codecs DALI decodes)."""
        fn, pipeline_def, _, _, _ = import_dali()
        gpu = self.device.type == "cuda"
        graph = _Graph(self.intensity, gpu)
        it = self.intensity

        @pipeline_def
        def centre_crops():
            images, ids = graph.read(self.shards, codec=self.manifest.codec, shuffle=False)
            if self.image_size != self.manifest.crop_size:
                images = fn.crop(images, crop=[self.image_size, self.image_size])  # centred
            out = graph.affine(images, graph.constant(it.stored_scale), graph.constant(it.shift))
            return graph.output(out, self.dtype), ids

        pipe = centre_crops(batch_size=self.batch_size, num_threads=self.num_workers,
                            device_id=self.device.index if gpu else None, seed=0)
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """DALI reads, decodes and normalises; a codec DALI cannot decode is read through the shards' indices
        (`ShardMembers`: no DALI), decoded by `HostDecoder` and normalised with the torch backend's arithmetic."""
        if self.manifest.codec.host_decoded:
            yield from self._host_batches()
            return
        *_, LastBatchPolicy = import_dali()
        for outputs in _iterate(_start(self.build_pipeline(), ["images", "ids"], LastBatchPolicy.PARTIAL, self), self):
            yield outputs[0]["images"].to(self.dtype), outputs[0]["ids"].view(-1)

    def _host_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The next batches decode in a background thread (`prefetch`) while the caller uses this one. On the CPU the
        decoding threads also normalise their crops (`normalise_into`, straight after decoding them, in cache); on
        CUDA the uint16 batch is copied over and normalised there."""
        size, cpu = self.image_size, self.device.type == "cpu"
        affine = eval_affine(self.intensity, self.device)  # once: the decoding threads' NumPy reads the CPU pair
        scale, shift = (a.numpy() for a in affine) if cpu else (None, None)

        def decode(members: list, ids: torch.Tensor) -> torch.Tensor:
            if not cpu:
                return centre_crop_normalised(decoder.decode(members, ids), affine, size)
            images = np.empty((len(members), len(self.channels), size, size), dtype=np.float32)
            decoder.decode(members, ids, lambda crops, where: normalise_into(crops, images[where], scale, shift))
            return torch.from_numpy(images)

        batches = ShardMembers(self.shards).batches(self.batch_size)
        with HostDecoder(self, self.num_workers) as decoder, \
                closing(prefetch(lambda: ((decode(*batch), batch[1]) for batch in batches), 1, self.device)) as decoded:
            for images, ids in decoded:  # stopped early: the batch ahead finishes before the decoder closes
                yield images.to(self.dtype), ids


def normalise_into(crops: np.ndarray, out: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """`centre_crop_normalised` of uint16 crops [B, C, S, S] in NumPy, into `out` [B, C, s, s] float32 (the centre s x s;
    `scale`, `shift`: `eval_affine`'s, [C, 1, 1]): the same float32 operations, so the same values, without torch's
    intra-op threads beside the decoding threads."""
    offset = (crops.shape[-1] - out.shape[-1]) // 2
    out[...] = crops[..., offset : offset + out.shape[-2], offset : offset + out.shape[-1]]  # exact; float32 ops next
    out *= scale
    out += shift
    return out
