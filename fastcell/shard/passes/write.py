"""Write pass: each planned shard written atomically by `ShardWriter`, its crops encoded by `--codec`;
a rerun keeps shards that exist, verify and whose crops match their recorded checksums, and removes
those planned from other cells."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from fastcell.errors import InputError
from fastcell.format.folder import (
    CELL_COLUMNS,
    CELLS_TABLE_NAME,
    CHECKSUM_COLUMN,
    ShardInfo,
    ShardWriter,
    crop_checksums,
    index_name,
    verify_shard,
)
from fastcell.format.stats import HISTOGRAM_BINS, add_to_histogram, channel_stats_from_histogram
from fastcell.io import write_json_atomic
from fastcell.shard.output import OUR_FILES, WORK_DIR, field_paths
from fastcell.shard.passes.context import Run, Timer, field_crops, worker_context

PLAN_COLUMNS = ["id", "shard", "plate", "well", "site", "x", "y"]


def _shard_record(out: Path, name: str) -> Path:
    """The CRC-32 of each crop of shard `name`, saved in the work folder right after the shard was written."""
    return out / WORK_DIR / "shards" / f"{name}.json"


def remove_shards(out: Path) -> None:
    """Delete the shards (tars and indices) in `out` and their checksum records: they were made from other
    cells or other crops, and none may be kept."""
    for entry in out.iterdir():
        if entry.suffix in (".tar", ".idx") and OUR_FILES.match(entry.name):
            entry.unlink()
    shutil.rmtree(out / WORK_DIR / "shards", ignore_errors=True)


def _keep_or_remove_shards(out: Path, cells) -> np.ndarray | None:
    """Delete shards an earlier run wrote for a different set of cells (e.g. before a skipped field was fixed);
    returns the CRC-32 of each cell's crop that the finished run before recorded in the cell table, when it
    planned these same cells (a kept shard is checked against them), else None.

    Shards are kept on a rerun only when they were planned from the same cells: the plan digest in
    `.work/plan.json` (or, after a finished run, the cell table) must match; when neither exists,
    no shard on disk can be trusted.
    """
    digest = hashlib.sha256(cells[PLAN_COLUMNS].to_csv(index=False).encode()).hexdigest()
    plan_file = out / WORK_DIR / "plan.json"
    same_table, recorded = False, None
    table = out / CELLS_TABLE_NAME
    if table.is_file():
        import pandas as pd
        import pyarrow.parquet as pq

        names = pq.read_schema(table).names
        if names[: len(CELL_COLUMNS)] == list(CELL_COLUMNS):  # only the columns compared are read
            old = pd.read_parquet(table, columns=PLAN_COLUMNS + [CHECKSUM_COLUMN] * (CHECKSUM_COLUMN in names))
            same_table = old[PLAN_COLUMNS].equals(cells[PLAN_COLUMNS].reset_index(drop=True))
            if same_table and CHECKSUM_COLUMN in names:  # tables of an older fastcell have none
                recorded = old[CHECKSUM_COLUMN].to_numpy()
    if plan_file.is_file():
        same = json.loads(plan_file.read_text()).get("digest") == digest
    else:
        same = same_table
    if not same:
        remove_shards(out)
    write_json_atomic(plan_file, {"digest": digest})
    return recorded if same else None


def shard_task(
    name: str,
    ids: np.ndarray,
    fields: list[tuple[str, str, np.ndarray, np.ndarray]],
    with_histogram: bool,
    dmso_scaling: dict[str, tuple[np.ndarray, np.ndarray]] | None,
    complete: bool | None,
    recorded: list[int] | None,
) -> dict:
    """Write one shard, or keep it when an earlier run completed it; returns its pixel histogram,
    the CRC-32 of each crop member (for cells.parquet), the tar's size and whether a kept shard was damaged.

    The sample at position i of the shard has id `ids[i]`; `fields` lists the fields its samples come
    from, each as (field key, plate, positions in the shard, rows of the field's crops), so each
    field's crop file is opened once and its rows taken at once: the task holds the shard's crops in
    memory (about the size of an npy shard). `dmso_scaling`: each plate's (background, DMSO mean)
    with `--scaling plate-dmso`. `complete`: whether the tar on disk held these samples when the run
    began (`fastcell.shard.output` checked it against its index), or None when it was not checked then
    (it is checked here). `recorded`: the CRC-32 of its crops in the cell table of the finished run
    before, or None. A shard is kept only when its crops match what was recorded when it was written
    (its record in the work folder, else `recorded`; none: kept as it is): one that does not is damaged,
    and written again, so the damage is not hidden under fresh checksums.
    """
    from fastcell.shard.illumination import apply_dmso_scaling

    filled = np.sort(np.concatenate([positions for _, _, positions, _ in fields] or [np.zeros(0, np.int64)]))
    if not np.array_equal(filled, np.arange(len(ids))):  # `crops` is np.empty: every sample must be filled once
        raise RuntimeError(f"internal error: the fields of shard {name} fill {len(filled)} positions, "
                           f"not each of its {len(ids)} samples once")  # fmt: skip
    ctx = worker_context()
    timer = Timer()
    tar = ctx.out / name
    if complete is None and tar.is_file():
        try:
            verify_shard(tar, len(ids), ctx.codec)
            complete = True
        except InputError:
            complete = False  # no index or truncated: write it again
    reused = bool(complete) and tar.is_file()
    damaged = False
    if reused:
        checksums = crop_checksums(tar, ctx.codec)
        record = _shard_record(ctx.out, name)
        if record.is_file():
            try:
                recorded = json.loads(record.read_text())["checksums"]
            except (OSError, ValueError, KeyError):
                recorded = []  # written atomically, so damaged too: it cannot vouch for the shard
        damaged = recorded is not None and checksums != list(recorded)
        reused = not damaged
    done = {"name": name, "reused": reused, "damaged": damaged}
    if reused:
        done.update(checksums=checksums, bytes=tar.stat().st_size)
        if not with_histogram:
            return {**done, "histogram": None, "timer": {}}
    start = time.perf_counter()
    crops = np.empty((len(ids), ctx.n_channels, ctx.crop_size, ctx.crop_size), np.uint16)
    for key, plate, positions, rows in fields:
        with timer("load"):
            block = field_crops(str(field_paths(ctx.out, key)[0]))[rows]
        crops[positions] = block if dmso_scaling is None else apply_dmso_scaling(block, *dmso_scaling[plate])
    histogram = None
    if with_histogram:
        with timer("stats"):
            histogram = np.zeros((ctx.n_channels, HISTOGRAM_BINS), np.int64)
            add_to_histogram(histogram, crops)
    if not reused:
        with ShardWriter(tar, ctx.codec) as writer:
            for cell_id, crop in zip(ids, crops, strict=True):
                writer.add(int(cell_id), crop)
        write_json_atomic(_shard_record(ctx.out, name), {"checksums": writer.checksums})
        # scaling the crops, adding the samples, closing and renaming the tar and its index
        timer.seconds["write"] = time.perf_counter() - start - timer.seconds["load"] - timer.seconds["stats"]
        done.update(checksums=writer.checksums, bytes=tar.stat().st_size)
    return {**done, "histogram": histogram, "timer": dict(timer.seconds)}


def _fields_of_shards(cells, plan) -> dict[str, list[tuple[str, str, np.ndarray, np.ndarray]]]:
    """Per shard of the plan, the fields its samples come from: (field key, plate, positions of the
    field's samples in the shard, their rows in the field's crops), grouped once for all shards. The
    fields of a shard are listed in the order the shard first needs them (random), so a worker that
    writes several shards finds the fields of the last ones still open (`field_crops`) as often as
    when each crop was read in sample order."""
    import pandas as pd

    order = np.concatenate([ids for _, _, ids in plan])
    members = pd.DataFrame({
        "shard": np.concatenate([[name] * len(ids) for _, name, ids in plan]),
        "field": cells["field"].to_numpy()[order], "plate": cells["plate"].to_numpy()[order],
        "position": np.concatenate([np.arange(len(ids)) for _, _, ids in plan]), "row": cells["row"].to_numpy()[order],
    })  # fmt: skip
    fields: dict[str, list] = {name: [] for _, name, _ in plan}
    # dropna=False: a NaN plate must not drop its cells from the shard (they would be left unfilled)
    for (name, key, plate), group in members.groupby(["shard", "field", "plate"], sort=False, dropna=False):
        fields[name].append((key, plate, group["position"].to_numpy(), group["row"].to_numpy()))
    return fields


def shard_pass(
    run: Run,
    cells,
    plan,
    dmso_scaling: dict[str, tuple[np.ndarray, np.ndarray]] | None,
    verified: dict[str, int | None],
) -> tuple[dict[str, list[ShardInfo]], dict[str, list[float]], int, int, list[str]]:
    """Write the planned shards; returns the manifest's splits, the channel statistics, the counts of
    shards written and kept, and the names of kept shards found damaged (written again); adds each
    crop's CRC-32 to `cells`. `verified`: the shards checked when the run began (`Build`)."""
    recorded = _keep_or_remove_shards(run.config.out, cells)
    fields = _fields_of_shards(cells, plan)
    tasks = []
    for split, name, ids in plan:
        plates = {plate for _, plate, _, _ in fields[name]}
        scaling = None if dmso_scaling is None else {p: dmso_scaling[p] for p in sorted(plates)}
        complete = verified[name] == len(ids) if name in verified else None
        shard_recorded = None if recorded is None else recorded[ids].tolist()
        tasks.append((name, ids, fields[name], split == "train", scaling, complete, shard_recorded))
    histogram = np.zeros((len(run.screen.channels), HISTOGRAM_BINS), np.int64)
    written = reused = 0
    damaged = []
    ids_of = {name: ids for _, name, ids in plan}
    checksums, sizes = np.zeros(len(cells), np.int64), {}
    for result in run.tasks(shard_task, tasks, "shards"):
        reused += result["reused"]
        written += not result["reused"]
        if result["damaged"]:
            damaged.append(result["name"])
        checksums[ids_of[result["name"]]] = result["checksums"]
        sizes[result["name"]] = result["bytes"]
        if result["histogram"] is not None:
            histogram += result["histogram"]  # integer counts: exact in any order
    cells[CHECKSUM_COLUMN] = checksums
    splits: dict[str, list[ShardInfo]] = defaultdict(list)
    for split, name, ids in plan:
        splits[split].append(ShardInfo(name=name, index=index_name(name), count=len(ids), bytes=sizes[name]))
    return dict(splits), channel_stats_from_histogram(histogram), written, reused, sorted(damaged)
