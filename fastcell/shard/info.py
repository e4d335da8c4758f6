"""`fastcell info SHARDS`: what a shard folder holds, and a montage of random crops to look at.

`summarize` reads the manifest and the cell table: counts per split and shard, channels, the
codec and the bytes on disk, the per-channel statistics, the intensity treatment, what was
skipped, and the shards whose size disagrees with their index or the manifest (`check_shards`:
truncated or replaced tars); with `--verify`, the same pass over the shards also checks every crop
against the CRC-32 recorded in cells.parquet and decodes it. `write_montage` draws random samples
(seeded) straight from the tars through their DALI indices and writes one PNG panel per channel,
each channel scaled by its p01..p99 from the manifest.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fastcell.errors import InputError
from fastcell.format.folder import (
    CELLS_TABLE_NAME,
    CHECKSUM_COLUMN,
    ShardManifest,
    decode_member,
    read_dali_index,
    read_manifest,
    read_samples,
    sample_key,
    verify_shard,
)
from fastcell.io import atomic_path
from fastcell.shard.output import missing_outputs, orphaned_outputs, orphans_remedy

GAP_COLOUR = "#4a6fa5"


def summarize(
    shard_dir: str | os.PathLike,
    *,
    montage: str | os.PathLike | None = None,
    n: int = 64,
    seed: int = 0,
    verify: bool = False,
) -> dict[str, Any]:
    """A JSON-ready summary of a shard folder; with `montage`, also write the montage PNG there;
    with `verify`, check and decode every crop first (`check_shards`)."""
    root = Path(shard_dir)
    if root.is_dir() and (orphans := orphaned_outputs(root)):  # index.json deleted: say what works
        raise InputError(orphans_remedy(root, orphans))
    manifest = read_manifest(shard_dir)
    cells = read_cell_table(manifest, ["split", "plate", "well", "compound"] + (["id", "shard"] if verify else []),
                            checksums=verify)
    table_counts = cells["split"].value_counts().to_dict()
    for split in manifest.splits:
        if table_counts.get(split, 0) != manifest.count(split):
            raise InputError(
                f"{manifest.cells_table}: lists {table_counts.get(split, 0)} {split} cells, "
                f"the manifest {manifest.count(split)}"
            )
    checksums = recorded_checksums(cells) if verify else None
    shard_of = dict(zip(cells["id"].tolist(), cells["shard"].tolist(), strict=True)) if verify else None
    problems, verified = check_shards(manifest, verify=verify, checksums=checksums, shard_of=shard_of)
    missing = missing_outputs(manifest.root, manifest)  # fields.parquet, illumination.npz: the shards were checked
    problems += [f"{manifest.root / name}: listed in index.json but missing" for name in missing]
    if verify and manifest.illumination and manifest.illumination not in missing:
        problems += _unreadable_illumination(manifest.root / manifest.illumination)
    skipped_fields = manifest.skipped.get("fields", [])
    n_cells = sum(manifest.count(split) for split in manifest.splits)
    shard_bytes = sum(tar.stat().st_size for split in manifest.splits for tar in manifest.tar_paths(split))
    summary: dict[str, Any] = {
        "path": str(Path(shard_dir)),
        "channels": list(manifest.channels),
        "crop_size": manifest.crop_size,
        "codec": manifest.codec.name,
        "codec_params": manifest.codec.params,
        "shard_bytes": shard_bytes,
        "bytes_per_cell": shard_bytes / n_cells if n_cells else 0.0,
        "cells": n_cells,
        "splits": {
            split: {"cells": manifest.count(split), "shards": len(shards)}
            for split, shards in manifest.splits.items()
        },
        "plates": int(cells["plate"].nunique()),
        "wells": int(cells[["plate", "well"]].drop_duplicates().shape[0]),
        "compounds": int(cells["compound"].nunique()),
        "channel_stats": {
            name: {stat: values[c] for stat, values in manifest.channel_stats.items()}
            for c, name in enumerate(manifest.channels)
        },
        "illumination": manifest.illumination,
        "scaling": manifest.scaling,
        "skipped": {
            "fields": len(skipped_fields),
            "fields_by_reason": dict(Counter(f.get("reason", "unknown") for f in skipped_fields)),
            "empty_fields": manifest.skipped.get("empty_fields", 0),
            "cells": dict(manifest.skipped.get("cells", {})),
        },
        "problems": problems,
    }
    if verify:
        summary["verified"], summary["checksums"] = verified, checksums is not None
    if montage is not None:
        summary["montage"] = str(write_montage(shard_dir, montage, n=n, seed=seed, manifest=manifest))
    return summary


def check_shards(manifest: ShardManifest, *, verify: bool = False, checksums=None,
                 shard_of: dict[int, str] | None = None) -> tuple[list[str], int]:
    """What is wrong with each shard, read from sizes alone: a tar shorter than its index needs, a sample
    count other than the manifest's, a size other than the one recorded when it was written; and the
    number of crops checked.

    With `verify`, the same pass (each index read once) also checks every crop against its recorded
    CRC-32 (`checksums`: id -> CRC-32, `recorded_checksums`; None for folders from before they were
    recorded: decoded only) and decodes it with its id (members of the codec, pixels, shape), and checks that
    each cell is in one sample of the folder, in the shard the cell table says (`shard_of`: id -> shard name;
    a shard copied over another of the same size, or an index line repeated, passes every other check), raising
    InputError naming the shard and the sample of the first bad one. Stricter than the loaders, which
    check neither the checksums nor (DALI) deflate's own.
    """
    problems, checked, seen = [], 0, {}
    for split in manifest.splits:
        for info, tar in zip(manifest.split_shards(split), manifest.tar_paths(split), strict=True):
            try:
                if verify:
                    for cell_id, _ in read_samples(tar, manifest.codec, manifest.crop_shape, checksums, info.count):
                        _check_place(tar, cell_id, seen, shard_of)
                        checked += 1
                else:
                    verify_shard(tar, info.count, manifest.codec)
            except InputError as err:
                if verify:
                    raise
                problems.append(str(err))
                continue
            size = tar.stat().st_size
            if info.bytes is not None and size != info.bytes:
                problems.append(f"{tar}: {size} bytes, written as {info.bytes} (truncated, extended or replaced)")
    return problems, checked


def _check_place(tar: Path, cell_id: int, seen: dict[int, str], shard_of: dict[int, str] | None) -> None:
    """InputError when cell `cell_id`, read from `tar`, was read before (`seen`: id -> shard) or belongs to another
    shard by the cell table (`shard_of`)."""
    key = sample_key(cell_id)
    if cell_id in seen:
        raise InputError(f"{tar}: sample {key} is also in {seen[cell_id]} (a shard copied over another, or an index "
                         f"line repeated?); copy the shards again, or delete them and rerun `fastcell shard`")
    seen[cell_id] = tar.name
    if shard_of is not None and shard_of.get(cell_id, tar.name) != tar.name:
        raise InputError(f"{tar}: sample {key} belongs to {shard_of[cell_id]} by {CELLS_TABLE_NAME} (a shard copied "
                         "over another?); copy the shards again, or delete them and rerun `fastcell shard`")


def _unreadable_illumination(path: Path) -> list[str]:
    """[the problem] when the illumination file does not read whole (a rerun on a complete folder keeps it, so
    only --verify can tell; deleting it and rerunning `fastcell shard` makes it again), else []."""
    from fastcell.shard.illumination import check_illumination_file

    try:
        check_illumination_file(path)
    except InputError as err:
        return [str(err)]
    return []


def damage_report(shard_dir: str | os.PathLike, problems: list[str]) -> str:
    """The error for a folder with damaged shards or missing files: how many, the first, and what to do."""
    return (
        f"{shard_dir}: {len(problems)} damaged or missing file(s), e.g. {problems[0]}; copy them again, or delete "
        "the damaged ones and rerun `fastcell shard` with the same options (it makes them again)"
    )


def read_cell_table(manifest: ShardManifest, columns: list[str], *, checksums: bool = False):
    """`columns` of cells.parquet, read once; with `checksums`, also the ids and their CRC-32 where the table
    records them (folders from before it did have none). InputError naming the table if it cannot be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(manifest.cells_table)
        if checksums and CHECKSUM_COLUMN in table.schema_arrow.names:
            columns = [*columns, *(name for name in ("id", CHECKSUM_COLUMN) if name not in columns)]
        return table.read(columns=columns).to_pandas()
    except (OSError, ValueError, KeyError, pa.ArrowException) as err:
        raise InputError(f"{manifest.cells_table}: unreadable cell table ({err})") from err


def recorded_checksums(cells) -> dict[int, int] | None:
    """id -> CRC-32 of each crop member from a `read_cell_table(..., checksums=True)` table; None when the folder
    predates them."""
    if CHECKSUM_COLUMN not in cells:
        return None
    return dict(zip(cells["id"].tolist(), cells[CHECKSUM_COLUMN].tolist(), strict=True))


def sample_crops(manifest: ShardManifest, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` random crops (all of them if fewer) over every split: (crops (n, C, S, S), ids (n,))."""
    codec = manifest.codec
    locations = []  # (tar path, data offset, size, member name) of each sample's crop
    for split in manifest.splits:
        for tar_path, idx_path in zip(manifest.tar_paths(split), manifest.index_paths(split), strict=True):
            for members in read_dali_index(idx_path):
                crop_member = [(o, s, m) for ext, o, s, m in members if ext == codec.ext]
                if not crop_member:
                    verify_shard(tar_path, codec=manifest.codec)  # names the sample and the codec
                locations.append((tar_path, *crop_member[0]))
    if not locations:
        raise InputError(f"{manifest.root}: the shards hold no samples")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(locations), size=min(n, len(locations)), replace=False))
    crops, ids = [], []
    for i in chosen:
        tar_path, offset, size, name = locations[i]
        with open(tar_path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        crops.append(decode_member(codec, data, manifest.crop_shape, tar_path, name))
        ids.append(int(name.split(".")[0]))
    return np.stack(crops), np.asarray(ids, dtype=np.int64)


def montage_grid(crops: np.ndarray, lo: float, hi: float, columns: int) -> np.ndarray:
    """One channel of (n, S, S) crops tiled into a float grid in [0, 1] (lo -> 0, hi -> 1), NaN gaps of 1 px."""
    n, size, _ = crops.shape
    rows = -(-n // columns)
    grid = np.full((rows * (size + 1) - 1, columns * (size + 1) - 1), np.nan, dtype=np.float32)
    scaled = np.clip((crops.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    for k, crop in enumerate(scaled):
        r, c = divmod(k, columns)
        grid[r * (size + 1) : r * (size + 1) + size, c * (size + 1) : c * (size + 1) + size] = crop
    return grid


def write_montage(
    shard_dir: str | os.PathLike,
    png_path: str | os.PathLike,
    n: int = 64,
    seed: int = 0,
    *,
    manifest: ShardManifest | None = None,
) -> Path:
    """Write a PNG of `n` random crops: one panel per channel (side by side), the same cells in each."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    if n < 1:
        raise InputError(f"--n must be at least 1 (crops in the montage), got {n}")
    manifest = manifest or read_manifest(shard_dir)
    crops, _ = sample_crops(manifest, n, seed)
    columns = int(np.ceil(np.sqrt(len(crops))))
    n_channels = len(manifest.channels)
    gray = colormaps["gray"].with_extremes(bad=GAP_COLOUR)  # gaps stand out from black and white crops
    fig = Figure(figsize=(4 * n_channels, 4.4))
    axes = fig.subplots(1, n_channels, squeeze=False)
    for c, (ax, name) in enumerate(zip(axes[0], manifest.channels, strict=True)):
        lo, hi = manifest.channel_stats["p01"][c], manifest.channel_stats["p99"][c]
        ax.imshow(montage_grid(crops[:, c], lo, hi, columns), cmap=gray, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}  (p01 {lo:.0f} .. p99 {hi:.0f})", fontsize=10)
        ax.axis("off")
    fig.suptitle(f"{Path(shard_dir).name}: {len(crops)} random crops (seed {seed})", fontsize=11)
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    return png_path
