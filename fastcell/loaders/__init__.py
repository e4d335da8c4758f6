"""Two-view contrastive augmentation loaders over fastcell shards, and the eval loader.

Backends (`--loader dali|torch`):
- `dali` (default): NVIDIA DALI reads the WebDataset shards with fastcell's `.idx` files, shuffles
  and decodes the crops (npy on the CPU; tiff-deflate on the GPU with nvTIFF) and hands them to
  torch on the loader's device, where `augment.ViewRecipe` makes both views batched: one
  implementation for the CPU and the GPU. On CUDA batches are prepared ahead on a side stream.
- `torch`: webdataset + DataLoader workers, each view made one crop at a time with torchvision's
  functional ops (`torch_ref.torch_view`); for machines without DALI, the benchmark's baseline and
  the independent reference of the recipe's tests.

    spec = AugmentSpec()                                   # SimCLR recipe + rotations
    train = create_train_loader("shards/bbbc021", spec, 256, device="cuda")
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for view1, view2, ids in train: ...
    for images, ids in create_eval_loader("shards/bbbc021", 512, device="cuda"): ...

Where things live: the recipe's settings in `spec.py` (`AugmentSpec`), its batched steps in
`augment.py`, the rank split and last-batch policy in `ranks.py`, the background loading in
`prefetch.py`, the backends in `dali.py` and `torch_ref.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastcell.errors import InputError
from fastcell.loaders.spec import AugmentSpec

if TYPE_CHECKING:
    import torch

BACKENDS = ("dali", "torch")

__all__ = ["AugmentSpec", "BACKENDS", "create_eval_loader", "create_train_loader"]


def _backend(backend: str):
    """The (train, eval) loader classes of a backend name in BACKENDS."""
    if backend == "dali":
        from fastcell.loaders import dali

        return dali.DaliTrainLoader, dali.DaliEvalLoader
    if backend == "torch":
        from fastcell.loaders import torch_ref

        return torch_ref.TorchTrainLoader, torch_ref.TorchEvalLoader
    raise InputError(f"loader backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def _dtype(dtype):
    import torch

    return torch.float32 if dtype is None else dtype


def create_train_loader(
    shard_dir: str | Path,
    spec: AugmentSpec,
    batch_size: int,
    *,
    backend: str = "dali",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,  # None: float32 (torch is imported with the backend, not here)
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 2,
    split: str = "train",
):
    """A training loader: each `iter()` is one epoch of `(view1, view2, ids)`.

    view1, view2: [B, C, S, S] `dtype` tensors on `device` (None: CUDA if present, else CPU),
    S = `spec.output_size` or the shards' crop size; ids: int64 [B] on the CPU. `len()` batches per epoch,
    the same on every rank; the last partial batch is dropped (`ranks.py` says exactly which
    samples an epoch reads). `set_epoch(e)` makes order and augmentations a function of
    (seed, e, rank); `set_epoch(e, start_batch=k)` starts epoch e at its batch k (resuming). `close()`
    when no epoch follows (DALI starts the next epoch's pipeline during an epoch).
    `num_workers`: DALI CPU threads or torch DataLoader worker processes.
    Attributes: `channels` (names), `image_size` (S; the shards' own crop side is `manifest.crop_size`).
    """
    train_cls, _ = _backend(backend)
    return train_cls(shard_dir, spec, batch_size, device=device, dtype=_dtype(dtype), rank=rank,
                     world_size=world_size, seed=seed, num_workers=num_workers, split=split)


def create_eval_loader(
    shard_dir: str | Path,
    batch_size: int,
    *,
    backend: str = "dali",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,  # None: float32 (torch is imported with the backend, not here)
    split: str | None = None,
    crop: int | None = None,
    num_workers: int = 2,
):
    """An eval loader: `(images, ids)` batches, every sample of `split` (None: all splits, sorted
    by name) exactly once in shard order, the last batch partial; images are centre crops of side
    `crop` (None: the full crop), normalised with the manifest's per-channel mean/std; ids int64
    on the CPU."""
    _, eval_cls = _backend(backend)
    return eval_cls(shard_dir, batch_size, device=device, dtype=_dtype(dtype), split=split, crop=crop,
                    num_workers=num_workers)
