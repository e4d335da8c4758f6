"""What the DALI and torch loaders share: opening shards, the device and dtype, epochs and ranks.

A training loader yields one epoch of `(view1, view2, ids)` per `iter()`: two independently
augmented views [B, C, S, S] (dtype and device as asked) and the int64 ids [B]; `len()` is the
number of batches, equal on every rank. `set_epoch(e)` makes the epoch's order and augmentations
a deterministic function of (seed, e, rank); iterating twice without it replays the epoch (from the same
start batch).
`set_epoch(e, start_batch=k)` starts the epoch at batch k (a resumed run): batches k.. are exactly
those of the whole epoch, and the ones before k are not augmented.
An eval loader yields `(images, ids)` over every sample once, in shard order, last batch partial.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from fastcell.errors import EnvironmentProblem, InputError
from fastcell.format.folder import MANIFEST_NAME, MemberSpans, ShardManifest, checked_spans, read_manifest
from fastcell.loaders.ranks import rank_slice, train_steps
from fastcell.loaders.spec import AugmentSpec, Intensity, derive_seed

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device to load onto; a CUDA device must exist."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EnvironmentProblem(
                f"device {device} requested but no CUDA GPU is visible to torch; use device='cpu' (CLI: --device cpu)"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise EnvironmentProblem(f"device {device} requested but only {torch.cuda.device_count()} GPU(s) are visible")
    elif device.type != "cpu":
        raise EnvironmentProblem(f"device {device}: the loaders run on 'cpu' or 'cuda[:N]'")
    return device


def check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in DTYPES:
        raise InputError(f"loader dtype must be one of {', '.join(map(str, DTYPES))}, got {dtype}")
    return dtype


class OpenShard(NamedTuple):
    """A shard a loader reads, checked against its index and the manifest when the loader was made."""

    split: str
    tar: Path
    idx: Path
    count: int
    spans: MemberSpans  # where its crop and id members lie (parsed once, for the loader's life)


def open_split(shard_dir: str | Path, split: str | None) -> tuple[ShardManifest, list[OpenShard]]:
    """Read the manifest and check the shards of `split` (None: all splits, sorted) against their indices
    and the manifest's codec (`checked_spans`). Returns the manifest and the shards in reading order."""
    manifest = read_manifest(shard_dir, verify=False)
    splits = [split] if split is not None else sorted(manifest.splits)
    shards = []
    for name in splits:
        for info, tar, idx in zip(
            manifest.split_shards(name), manifest.tar_paths(name), manifest.index_paths(name), strict=True
        ):
            shards.append(OpenShard(name, tar, idx, info.count, checked_spans(tar, manifest.codec, info.count)))
    if not shards:
        raise InputError(f"{Path(shard_dir) / MANIFEST_NAME}: split {split!r} lists no shards")
    return manifest, shards


def uint16_as_float(images: torch.Tensor) -> torch.Tensor:
    """float32 values of a uint16 tensor on any device. The CPU converts uint16 directly; on CUDA (where torch's
    uint16 has few kernels) the bits are read as int16 and the negatives wrapped back (a remainder the CPU path
    does without)."""
    if images.device.type == "cpu":
        return images.float()
    return images.view(torch.int16).float().remainder_(65536.0)


def eval_affine(it: Intensity, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval map's per-channel scale and shift [C, 1, 1] on `device`: made once per loader, not per batch."""
    return tuple(torch.from_numpy(a).to(device).view(-1, 1, 1) for a in (it.stored_scale, it.shift))


def centre_crop_normalised(images: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor], crop: int) -> torch.Tensor:
    """The eval transform of a batch of uint16 crops [B, C, S, S] (any device): centre crop, normalised (float32)
    with `affine` (`eval_affine`, on the crops' device)."""
    offset = (images.shape[-1] - crop) // 2
    images = uint16_as_float(images[..., offset : offset + crop, offset : offset + crop])
    scale, shift = affine
    return images * scale + shift


def checked_start_batch(start_batch: int, steps: int) -> int:
    """`start_batch` of an epoch of `steps` batches; InputError outside [0, steps]."""
    if not 0 <= start_batch <= steps:
        raise InputError(f"start_batch {start_batch} must lie in [0, {steps}] (the batches of an epoch)")
    return int(start_batch)


class TrainLoaderBase:
    """Epochs, ranks, output size, seeds and the batch post-processing shared by both backends."""

    def __init__(self, shard_dir, spec: AugmentSpec, batch_size: int, *, device, dtype, rank: int,
                 world_size: int, seed: int, num_workers: int, split: str):
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        self.manifest, self.shards = open_split(shard_dir, split)
        self.spec = spec
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.dtype = check_dtype(dtype)
        self.seed, self.epoch, self.start_batch = seed, 0, 0
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, num_workers)
        self.channels = list(self.manifest.channels)
        self.image_size = spec.output_size or self.manifest.crop_size  # the views' side
        self.total = sum(shard.count for shard in self.shards)
        self.positions = rank_slice(self.total, rank, world_size)
        self.steps = train_steps(self.total, batch_size, world_size, where=str(Path(shard_dir)))
        self.intensity = Intensity.from_stats(
            self.manifest.channel_stats, spec.normalize, where=str(Path(shard_dir) / MANIFEST_NAME)
        )

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch `epoch` from its batch `start_batch` on (0: the whole epoch)."""
        self.epoch, self.start_batch = int(epoch), checked_start_batch(start_batch, self.steps)

    def close(self) -> None:
        """Let go of what outlives an epoch (the DALI loader: its next epoch started ahead); call it when no
        epoch follows. Here nothing does."""

    def epoch_seed(self, *more: int, epoch: int | None = None) -> int:
        """The seed of this epoch (or of `epoch`) on this rank, and of a step or worker within it."""
        return derive_seed(self.seed, self.epoch if epoch is None else epoch, self.rank, *more)


class EvalLoaderBase:
    """Eval loading shared by both backends: every sample of the split(s) once, in shard order."""

    def __init__(self, shard_dir, batch_size: int, *, device, dtype, split: str | None, crop: int | None,
                 num_workers: int):
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        self.manifest, self.shards = open_split(shard_dir, split)
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.dtype = check_dtype(dtype)
        self.num_workers = max(1, num_workers)
        self.channels = list(self.manifest.channels)
        self.image_size = crop or self.manifest.crop_size  # the eval crop's side
        if not 0 < self.image_size <= self.manifest.crop_size:
            raise InputError(f"eval crop {crop} must lie in [1, {self.manifest.crop_size}] (the shards' crop size)")
        self.total = sum(shard.count for shard in self.shards)
        self.intensity = Intensity.from_stats(
            self.manifest.channel_stats, normalize=True, where=str(Path(shard_dir) / MANIFEST_NAME)
        )

    def __len__(self) -> int:
        return -(-self.total // self.batch_size)
