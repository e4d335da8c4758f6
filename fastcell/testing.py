"""Small shard folders for tests and benchmarks, written by the production writer and statistics.

`make_shards(folder, crops, ...)` writes the crops (uint16, N x C x S x S) as a train split of
`shard_size`-sample tars with their DALI indices, a cell table with `fastcell shard`'s columns (each
crop's CRC-32 included, as the writer recorded it) and a manifest whose channel statistics are
`fastcell shard`'s (exact, from the crops' histograms), so a loader that normalises with the
manifest gives per-channel mean 0 and std 1 over the unaugmented training crops. `random_crops` makes cell-like crops to put in them.
`interrupting(make_loader, ...)` wraps a train-loader factory so that its loader is killed (or fails) at a given
batch, as a run cut short.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fastcell.format.codecs import Codec, get_codec
from fastcell.format.folder import (
    CELL_COLUMNS,
    CELLS_TABLE_NAME,
    CHECKSUM_COLUMN,
    ShardInfo,
    ShardManifest,
    ShardWriter,
    index_name,
    shard_name,
    write_manifest,
)
from fastcell.format.stats import HISTOGRAM_BINS, add_to_histogram, channel_stats_from_histogram


def channel_stats(crops: np.ndarray) -> dict[str, list[float]]:
    """The manifest's per-channel statistics of N x C x S x S uint16 crops, as `fastcell shard` computes them."""
    histogram = np.zeros((crops.shape[1], HISTOGRAM_BINS), np.int64)
    add_to_histogram(histogram, np.asarray(crops, dtype=np.uint16))
    return channel_stats_from_histogram(histogram)


def _write_split(root: Path, split: str, crops: np.ndarray, ids: np.ndarray, shard_size: int,
                 codec: Codec) -> tuple[list[ShardInfo], list[int]]:
    """Write crops[k] under ids[k], in that order, `shard_size` samples a shard; returns the shards and
    the CRC-32 of each crop member, in the order written."""
    shards, checksums = [], []
    for start in range(0, len(crops), shard_size):
        name = shard_name(split, len(shards))
        chunk = crops[start : start + shard_size]
        with ShardWriter(root / name, codec) as writer:
            for cell_id, crop in zip(ids[start : start + shard_size], chunk, strict=True):
                writer.add(int(cell_id), crop)
        shards.append(ShardInfo(name=name, index=index_name(name), count=len(chunk)))
        checksums += writer.checksums
    return shards, checksums


def make_shards(
    tmp_dir: str | Path,
    crops: np.ndarray,
    channels: list[str] | None = None,
    shard_size: int = 16,
    val: np.ndarray | None = None,
    codec: str = "npy",
    order: np.ndarray | None = None,
) -> Path:
    """Write `crops` (train ids 0..N-1) and optional `val` crops (ids N..) as a shard folder, crops stored by `codec`.

    `order`: a permutation of the train ids to write them in (crop i keeps id i), as `fastcell shard`
    interleaves cells; default by id."""
    root = Path(tmp_dir)
    root.mkdir(parents=True, exist_ok=True)
    crops = np.asarray(crops, dtype=np.uint16)
    channels = channels or [f"ch{i}" for i in range(crops.shape[1])]
    order = np.arange(len(crops)) if order is None else np.asarray(order)
    crop_codec = get_codec(codec)
    written = {"train": _write_split(root, "train", crops[order], order, shard_size, crop_codec)}
    if val is not None:
        val_ids = np.arange(len(crops), len(crops) + len(val))
        written["val"] = _write_split(root, "val", np.asarray(val, dtype=np.uint16), val_ids, shard_size, crop_codec)
    splits = {split: shards for split, (shards, _) in written.items()}
    checksums = [crc for _, sums in written.values() for crc in sums]
    manifest = ShardManifest(
        channels=list(channels), crop_size=crops.shape[-1], splits=splits, channel_stats=channel_stats(crops),
        codec=crop_codec,
    )
    write_cells_table(root, splits, np.argsort(order), checksums)
    write_manifest(root, manifest)
    return root


def write_cells_table(root: Path, splits: dict[str, list[ShardInfo]], train_positions: np.ndarray,
                      checksums: list[int]) -> None:
    """A cells.parquet with `fastcell shard`'s columns: every cell in one DMSO well of plate P1 (tests may overwrite).

    `train_positions[i]`: where train cell i was written (val cells follow in id order); `checksums`:
    each crop member's CRC-32, in the order written."""
    rows = [(split, s.name) for split, shards in splits.items() for s in shards for _ in range(s.count)]
    rows = [(*row, crc) for row, crc in zip(rows, checksums, strict=True)]
    n = len(rows)
    rows = [rows[i] for i in train_positions] + rows[len(train_positions):]
    columns = {
        "id": np.arange(n, dtype=np.int64), "split": [r[0] for r in rows], "shard": [r[1] for r in rows],
        "plate": "P1", "well": "A01", "site": 1, "batch": "B1", "compound": "DMSO", "concentration": 0.0,
        "moa": "DMSO", "role": "dmso", "x": 0.0, "y": 0.0, "image": "",
        CHECKSUM_COLUMN: np.array([r[2] for r in rows], dtype=np.int64),
    }  # fmt: skip
    pd.DataFrame(columns, columns=[*CELL_COLUMNS, CHECKSUM_COLUMN]).to_parquet(root / CELLS_TABLE_NAME, index=False)


def random_crops(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> np.ndarray:
    """Cell-like uint16 crops: a bright blob per channel on a noisy background, varying per sample."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    crops = np.empty((n, channels, size, size), dtype=np.uint16)
    for i in range(n):
        for c in range(channels):
            cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
            radius = rng.uniform(size * 0.1, size * 0.3)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
            level = 500 + 300 * c
            image = 200 + level * 20 * blob + rng.normal(0, 50, (size, size))
            crops[i, c] = np.clip(image, 0, 65535).astype(np.uint16)
    return crops


def interrupting(make_loader, interrupt_at: int | None = None, error: Exception | None = None,
                 events: list | None = None):
    """Wrap a loader factory: its loader raises `error` (else KeyboardInterrupt, i.e. a kill) instead of
    serving batch number `interrupt_at` (counted over the whole run). `events`, when given, receives
    ("epoch", e, the process's random states) at each `set_epoch(e)` and ("batch", e) per batch served.
    For the trainer's tests and the GPU check's resume row."""
    from fastcell.train.checkpoint import rng_states

    def make(config, env):
        loader = make_loader(config, env)
        served, epoch = [0], [None]

        def iterate():
            for batch in loader:
                if served[0] == interrupt_at:
                    raise error if error is not None else KeyboardInterrupt
                served[0] += 1
                if events is not None:
                    events.append(("batch", epoch[0]))
                yield batch

        def set_epoch(e, start_batch=0):
            epoch[0] = e
            if events is not None:
                events.append(("epoch", e, rng_states()))
            loader.set_epoch(e, start_batch)

        return WrappedLoader(loader, iterate, set_epoch)

    return make


class WrappedLoader:
    """Delegates the train-loader contract to `loader`, iterating through `iterate()` and setting epochs through
    `set_epoch` (e.g. to interrupt or record them)."""

    def __init__(self, loader, iterate, set_epoch):
        self._loader, self._iterate, self.set_epoch = loader, iterate, set_epoch
        self.channels, self.image_size = loader.channels, loader.image_size

    def __iter__(self):
        return self._iterate()

    def __len__(self):
        return len(self._loader)
