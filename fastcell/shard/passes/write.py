"""Write pass: each planned shard written atomically by `ShardWriter`, its crops encoded by `--codec`;
a rerun keeps shards that exist and verify, and removes those planned from other cells."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from fastcell.errors import InputError
from fastcell.format.folder import (
    CELLS_TABLE_NAME,
    CHECKSUM_COLUMN,
    ShardInfo,
    ShardWriter,
    crop_checksums,
    index_name,
    verify_shard,
)
from fastcell.io import write_json_atomic
from fastcell.shard.output import OUR_FILES, WORK_DIR, field_paths
from fastcell.shard.passes.context import Run, Timer, field_crops, worker_context
from fastcell.shard.passes.stats import HISTOGRAM_BINS, add_to_histogram, channel_stats_from_histogram

CELL_COLUMNS = ("id", "split", "shard", "plate", "well", "site", "batch", "compound", "concentration", "moa",
                "role", "x", "y", "image")  # fmt: skip
PLAN_COLUMNS = ["id", "shard", "plate", "well", "site", "x", "y"]


def _remove_stale_shards(out: Path, cells) -> None:
    """Delete shards an earlier run wrote for a different set of cells (e.g. before a skipped field was fixed).

    Shards are kept on a rerun only when they were planned from the same cells: the plan digest in
    `.work/plan.json` (or, after a finished run, the cell table) must match; when neither exists,
    no shard on disk can be trusted.
    """
    digest = hashlib.sha256(cells[PLAN_COLUMNS].to_csv(index=False).encode()).hexdigest()
    plan_file = out / WORK_DIR / "plan.json"
    if plan_file.is_file():
        same = json.loads(plan_file.read_text()).get("digest") == digest
    elif (out / CELLS_TABLE_NAME).is_file():
        import pandas as pd

        old = pd.read_parquet(out / CELLS_TABLE_NAME)
        same = list(old.columns[: len(CELL_COLUMNS)]) == list(CELL_COLUMNS) and old[PLAN_COLUMNS].equals(
            cells[PLAN_COLUMNS].reset_index(drop=True)
        )
    else:
        same = False
    if not same:
        for entry in out.iterdir():
            if entry.suffix in (".tar", ".idx") and OUR_FILES.match(entry.name):
                entry.unlink()
    write_json_atomic(plan_file, {"digest": digest})


def shard_task(
    name: str,
    members: list[tuple[str, int]],
    ids: np.ndarray,
    with_histogram: bool,
    dmso_scaling: np.ndarray | None,
) -> dict:
    """Write one shard, or keep it when an earlier run completed it; returns its pixel histogram,
    the CRC-32 of each crop member (for cells.parquet) and the tar's size.

    `members[i]` = (field key, row in the field's crops) of the sample with id `ids[i]`;
    `dmso_scaling[i]` = its plate's (background, DMSO mean) [2, C] with `--scaling plate-dmso`.
    """
    from fastcell.shard.illumination import apply_dmso_scaling

    ctx = worker_context()
    timer = Timer()
    tar = ctx.out / name
    reused = False
    if tar.is_file():
        try:
            verify_shard(tar, len(ids), ctx.codec)
            reused = True
        except InputError:
            pass  # no index or truncated: write it again
    histogram = np.zeros((ctx.n_channels, HISTOGRAM_BINS), np.int64) if with_histogram else None
    done = {"name": name, "reused": reused}
    if reused:
        done.update(checksums=crop_checksums(tar, ctx.codec), bytes=tar.stat().st_size)
        if histogram is None:
            return {**done, "histogram": None, "timer": {}}
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        writer = None if reused else stack.enter_context(ShardWriter(tar, ctx.codec))
        for i, (cell_id, (key, row)) in enumerate(zip(ids, members, strict=True)):
            with timer("load"):
                crop = np.array(field_crops(str(field_paths(ctx.out, key)[0]))[row])
            if dmso_scaling is not None:
                crop = apply_dmso_scaling(crop, *dmso_scaling[i])
            if writer is not None:
                writer.add(int(cell_id), crop)
            if histogram is not None:
                with timer("stats"):
                    add_to_histogram(histogram, crop)
    if not reused:  # adding samples, closing and renaming the tar and its index
        timer.seconds["write"] = time.perf_counter() - start - timer.seconds["load"] - timer.seconds["stats"]
        done.update(checksums=writer.checksums, bytes=tar.stat().st_size)
    return {**done, "histogram": histogram, "timer": dict(timer.seconds)}


def shard_pass(
    run: Run, cells, plan, dmso_scaling: dict[str, tuple[np.ndarray, np.ndarray]] | None
) -> tuple[dict[str, list[ShardInfo]], dict[str, list[float]], int, int]:
    """Write the planned shards; returns the manifest's splits, the channel statistics and counts, and
    adds each crop's CRC-32 to `cells`."""
    _remove_stale_shards(run.config.out, cells)
    fields_of = cells["field"].to_numpy()
    rows_of = cells["row"].to_numpy()
    per_cell = None
    if dmso_scaling is not None:
        plates = cells["plate"].to_numpy()
        per_cell = np.stack([np.stack(dmso_scaling[p]) for p in plates])  # [n_cells, 2, C]
    tasks = [
        (
            name,
            list(zip(fields_of[ids].tolist(), rows_of[ids].tolist(), strict=True)),
            ids,
            split == "train",
            None if per_cell is None else per_cell[ids],
        )
        for split, name, ids in plan
    ]
    histogram = np.zeros((len(run.screen.channels), HISTOGRAM_BINS), np.int64)
    written = reused = 0
    ids_of = {name: ids for _, name, ids in plan}
    checksums, sizes = np.zeros(len(cells), np.int64), {}
    for result in run.tasks(shard_task, tasks, "shards"):
        reused += result["reused"]
        written += not result["reused"]
        checksums[ids_of[result["name"]]] = result["checksums"]
        sizes[result["name"]] = result["bytes"]
        if result["histogram"] is not None:
            histogram += result["histogram"]  # integer counts: exact in any order
    cells[CHECKSUM_COLUMN] = checksums
    splits: dict[str, list[ShardInfo]] = defaultdict(list)
    for split, name, ids in plan:
        splits[split].append(ShardInfo(name=name, index=index_name(name), count=len(ids), bytes=sizes[name]))
    return dict(splits), channel_stats_from_histogram(histogram), written, reused
