"""A synthetic stand-in for the training loader: the model-only benchmark, the GPU check, tests.

`SyntheticPairLoader` follows the contract of `fastcell.loaders.create_train_loader`'s result:
iterating yields one epoch of `(view1, view2, ids)`, `len()` is batches per epoch, and
`set_epoch(epoch, start_batch=0)` makes the epoch's order and "augmentations" a function of
(seed, epoch, rank) and starts it at batch `start_batch` (each batch's noise has its own seed).
Each rank (`rank` of `world_size`) sees a disjoint part of a fixed random dataset; the last
partial batch is dropped. With `noise=0` and `num_samples == batch_size` every step gets the same
samples (shuffled: one gather on the device; data cost ~0, nanoGPT style).
"""

from __future__ import annotations

import torch

from fastcell.loaders.base import checked_start_batch


class SyntheticPairLoader:
    def __init__(self, num_samples: int, batch_size: int, channels: int = 3, image_size: int = 32, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                 rank: int = 0, world_size: int = 1, noise: float = 0.1):
        self.batch_size, self.noise, self.seed = batch_size, noise, seed
        self.rank, self.world_size = rank, world_size
        self.device, self.dtype = torch.device(device), dtype
        self.channels = [f"ch{i}" for i in range(channels)]
        self.image_size = image_size
        self.num_samples = num_samples
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randn(num_samples, channels, image_size, image_size, generator=g).to(self.device, dtype)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), checked_start_batch(start_batch, len(self))

    def __len__(self) -> int:
        return (self.num_samples // self.world_size) // self.batch_size

    def _generator(self, *key: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(hash((self.seed, self.epoch, *key)) % 2**62)

    def __iter__(self):
        # one order for all shards (so their parts are disjoint), noise of each shard its own
        order = torch.randperm(self.num_samples, generator=self._generator(), device=self.device)
        mine = order[self.rank :: self.world_size]
        for b in range(self.start_batch, len(self)):
            ids = mine[b * self.batch_size : (b + 1) * self.batch_size]
            base = self.data[ids]
            if self.noise:
                g = self._generator(self.rank, b)
                view1 = base + self.noise * torch.randn(base.shape, generator=g, device=self.device, dtype=self.dtype)
                view2 = base + self.noise * torch.randn(base.shape, generator=g, device=self.device, dtype=self.dtype)
            else:
                view1, view2 = base, base
            yield view1, view2, ids.to(torch.int64)
