"""The split and the shard plan: ids 0..N-1 in a fixed order; the split (random over cells, or whole
plates) and a permutation of each split are drawn from `--seed`, so every shard mixes wells, plates
and treatments."""

from __future__ import annotations

import numpy as np

from fastcell.errors import InputError
from fastcell.format.folder import shard_name
from fastcell.shard.config import ShardConfig


def assign_splits(cells, config: ShardConfig) -> np.ndarray:
    """Per cell "train" or "val": a seeded draw of cells, or of whole plates with --split plate."""
    split = np.full(len(cells), "train", dtype=object)
    if config.val_fraction <= 0:
        return split
    if config.split == "random":
        n_val = int(round(config.val_fraction * len(cells)))
        if n_val == 0:  # an empty val split would pass unnoticed until training looks for it
            raise InputError(
                f"--val-fraction {config.val_fraction:g} of {len(cells)} cells is no cell: raise it to at least "
                f"{1 / len(cells):.2g}, or pass 0 for no validation split"
            )
        split[np.random.default_rng([config.seed, 1]).permutation(len(cells))[:n_val]] = "val"
        return split
    plates = np.array(sorted(cells["plate"].unique()))
    if len(plates) < 2:
        raise InputError(f"--split plate needs at least two plates; the screen has {len(plates)}")
    n_val = min(max(int(round(config.val_fraction * len(plates))), 1), len(plates) - 1)
    val_plates = np.random.default_rng([config.seed, 1]).permutation(plates)[:n_val]
    split[cells["plate"].isin(val_plates).to_numpy()] = "val"
    return split


def plan_shards(cells, config: ShardConfig, shard_size: int) -> list[tuple[str, str, np.ndarray]]:
    """(split, shard name, ids in sample order): a seeded permutation of each split, cut evenly."""
    plan = []
    for stream, split in enumerate(("train", "val"), start=2):
        ids = cells["id"].to_numpy()[cells["split"].to_numpy() == split]
        if len(ids) == 0:
            if split == "train":
                raise InputError("no training cells: lower --val-fraction or add fields")
            continue
        order = np.random.default_rng([config.seed, stream]).permutation(ids)
        n_shards = -(-len(order) // shard_size)
        for i, chunk in enumerate(np.array_split(order, n_shards)):
            plan.append((split, shard_name(split, i), chunk))
    return plan
