"""`shard_screen`: fields of a screen -> illumination-corrected single-cell crops in WebDataset shards.

A short orchestrator over the passes in `fastcell.shard.passes` (illumination, scaling, crops, split,
write, manifest), each parallel over one `fastcell.pool.WorkerPool` and each resumable. The same input,
options and seed give byte-identical shards whatever `--workers`. A rerun into a folder made with a
different configuration (options or input tables) is refused unless `--overwrite`
(`fastcell.shard.output`).
"""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from fastcell.errors import InputError
from fastcell.format.codecs import Codec, get_codec
from fastcell.format.folder import FIELDS_TABLE_NAME, ShardManifest
from fastcell.io import write_json_atomic
from fastcell.progress import Progress
from fastcell.shard.config import ShardConfig, auto_shard_size, config_record
from fastcell.shard.output import ILLUMINATION_NAME, WORK_DIR, prepare_output, swap_in
from fastcell.shard.passes.context import Run, Timer, WorkerContext, worker_pool
from fastcell.shard.passes.crops import cells_table, crop_pass
from fastcell.shard.passes.illumination import (
    PLATE_FUNCTIONS_RECORD,
    illumination_pass,
    plate_functions_reusable,
)
from fastcell.shard.passes.manifest import write_outputs
from fastcell.shard.passes.scaling import dmso_scaling_pass, percentile_scaling_pass, scaling_record
from fastcell.shard.passes.split import assign_splits, plan_shards
from fastcell.shard.passes.write import remove_shards, shard_pass
from fastcell.shard.sources import Field, load_locations, load_screen, probe_fields, read_field


@dataclass
class ShardResult:
    """What `shard_screen` did: the manifest, counts, resume counters and the time spent per stage."""

    out: Path
    manifest: ShardManifest
    n_fields: int  # fields selected (by role) from the source
    n_cells: int  # samples in the shards, all splits
    fields_processed: int  # fields cropped in this call
    fields_reused: int  # fields whose crops an earlier, interrupted run had finished
    fields_skipped: list[dict]  # {image, plate, well, site, reason}
    fields_empty: int  # fields read and searched in which no cell was found or located (data, not errors)
    # per role not taken (--roles): its number of fields and their distinct treatments ("compound @ dose")
    fields_left_out: dict[str, tuple[int, list[str]]]
    shards_written: int
    shards_reused: int  # complete, verified shards of an earlier run
    # kept shards whose crops no longer matched the checksums recorded when they were written: written again
    # (counted in shards_written)
    shards_repaired: list[str]
    illumination_computed: bool
    up_to_date: bool  # the folder already held these shards: nothing was done
    # seconds: summed worker time per stage ("read", "illumination", "correct", "detect", "crop", "save",
    # "load", "write", "stats", "scaling") and wall time per pass ("wall_pool_start", "wall_illumination",
    # "wall_scaling", "wall_crops", "wall_shards", "wall_total")
    timings: dict[str, float]


def shard_screen(config: ShardConfig, *, progress: bool = False) -> ShardResult:
    """Turn the fields of a screen into single-cell crops in WebDataset shards (see the module doc)."""
    started = time.perf_counter()
    config.validate()
    out = Path(config.out)
    screen, fields, dtypes, locations = _load_inputs(config)
    left_out = _left_out(screen.fields, config.roles)
    shard_size = config.shard_size or auto_shard_size(len(screen.channels), config.crop_size)
    record = config_record(config, screen, locations, shard_size)
    # without --on-error skip a rerun must read every field or fail: a folder with skipped fields is never done
    stand = partial(skipped_fields_stand, fields, dtypes) if config.on_error == "skip" else None
    target = prepare_output(out, record, config.overwrite, stand)
    if target.up_to_date:
        return _up_to_date(target.manifest, len(fields), left_out, started)
    build = target.folder

    config = replace(config, out=build)  # OUT itself, or OUT/.staging when --overwrite replaces other shards
    context = WorkerContext(
        out=build, illumination=config.illumination, crop_size=config.crop_size, border=config.border,
        dna_index=screen.dna_index, n_channels=len(screen.channels),
        codec=get_codec(config.codec), dtypes=dtypes,
    )  # fmt: skip
    walls = Timer()  # wall seconds of each pass, as the workers' Timer counts their stages
    scaling_on = config.scaling == "plate-percentile"
    with worker_pool(config.workers, context, config.dask) as pool, Progress(progress) as bars:
        run = Run(config, screen, pool, bars, Timer())

        illumination_computed = False
        if (config.illumination or scaling_on) and not plate_functions_reusable(build, target.manifest):
            # made while some fields were unreadable (they may be fixed now), or never finished, or damaged:
            # compute again, and the crops made with the old functions too, and the shards made of those crops
            # (the same cells, other pixels: their recorded checksums cannot tell)
            (build / ILLUMINATION_NAME).unlink(missing_ok=True)
            shutil.rmtree(build / WORK_DIR / "fields", ignore_errors=True)
            remove_shards(build)
        if config.illumination:
            with walls("illumination"):
                illumination_computed = illumination_pass(run, fields)
        scaling = None
        if scaling_on:
            with walls("scaling"):
                scaling = percentile_scaling_pass(run, run.usable(fields))
        if config.illumination or scaling_on:
            write_json_atomic(build / WORK_DIR / PLATE_FUNCTIONS_RECORD, {"skipped": sorted(run.skipped)})
        with walls("crops"):
            processed, reused = crop_pass(run, run.usable(fields), locations, scaling)
        if not run.usable(fields):
            raise InputError(
                f"{config.source}: every field was skipped; see the reasons with --on-error fail"
            )
        cells, per_field = cells_table(run, fields)
        if len(cells) == 0:
            raise InputError(
                f"{config.source}: no cell is far enough from the field borders; try --border pad"
                if per_field["found"].sum()
                else f"{config.source}: no cells in any of the {len(fields)} fields (nuclei detection on channel "
                f"{screen.dna_channel} found none{'; the locations table lists none' if locations else ''})"
            )
        cells["split"] = assign_splits(cells, config)
        plan = plan_shards(cells, config, shard_size)
        cells["shard"] = ""
        for _, name, ids in plan:
            cells.loc[ids, "shard"] = name
        dmso_scaling = None
        if config.scaling == "plate-dmso":
            with walls("scaling"):
                dmso_scaling = dmso_scaling_pass(run, cells)
        with walls("shards"):
            splits, stats, written, kept, repaired = shard_pass(run, cells, plan, dmso_scaling, target.verified)

    manifest = _manifest(
        config,
        screen,
        run,
        per_field,
        locations,
        record,
        splits,
        stats,
        scaling_record(config.scaling, config.scaling_percentiles, scaling, dmso_scaling),
        context.codec,
    )
    write_outputs(build, manifest, cells, per_field)
    if not config.keep_work:
        shutil.rmtree(build / WORK_DIR, ignore_errors=True)
    if build != out:
        swap_in(out, build)
    manifest.root = out
    walls.seconds["total"] = time.perf_counter() - started
    return ShardResult(
        out=out, manifest=manifest, n_fields=len(fields), n_cells=len(cells), fields_processed=processed,
        fields_reused=reused, fields_skipped=manifest.skipped["fields"], fields_empty=manifest.skipped["empty_fields"],
        fields_left_out=left_out, shards_written=written, shards_reused=kept, shards_repaired=repaired,
        illumination_computed=illumination_computed,
        up_to_date=False,
        timings={**dict(sorted(run.timer.seconds.items())), "wall_pool_start": pool.startup_seconds,
                 **{f"wall_{stage}": seconds for stage, seconds in walls.seconds.items()}},
    )  # fmt: skip


def _load_inputs(config: ShardConfig):
    """(screen, its fields of the chosen roles, their pixel types, the locations table or None)."""
    screen = load_screen(config.source, config.channels, config.dna_channel)
    fields = screen.select(config.roles)
    if not fields:
        raise InputError(f"{config.source}: no fields with role(s) {', '.join(config.roles)}")
    dtypes, (height, width) = probe_fields(fields)
    if config.border == "skip" and config.crop_size > min(height, width):
        raise InputError(
            f"{fields[0].paths[0]}: --crop {config.crop_size} is larger than the fields ({height}x{width} px): "
            "every cell would be a border cell; lower --crop, or keep border cells with --border pad"
        )
    locations = load_locations(config.locations, screen) if config.locations else None
    return screen, fields, dtypes, locations


def skipped_fields_stand(fields: list[Field], dtypes, records: list[dict]) -> bool:
    """Whether every field a finished run skipped (its manifest's `records`) still fails to read with the very
    error recorded, so that its illumination, crops and shards stand and a rerun has nothing to do (a screen's
    few unreadable fields no longer make every rerun compute the whole screen again). A field that reads now
    (fixed), fails otherwise, or was skipped for a reason found after reading (e.g. an odd image size) makes
    the rerun build again."""
    by_place = {(f.plate, f.well, f.site): f for f in fields}
    for record in records:
        f = by_place.get((record["plate"], record["well"], record["site"]))
        if f is None:
            return False
        try:
            read_field(f, dtypes)
        except InputError as err:
            if _named_by_file(str(err), f) == _named_by_file(record["reason"], f):
                continue
        return False
    return True


def _named_by_file(reason: str, f: Field) -> str:
    """`reason` with the folders of the field's files left out: a screen moved with its shards (the same
    configuration) gives the same reasons, under another folder."""
    for name in {Path(str(p)).name for p in f.paths}:
        reason = re.sub(rf"\S*/{re.escape(name)}\b", name, reason)
    return reason


def _left_out(fields, roles) -> dict[str, tuple[int, list[str]]]:
    """Per role not in `roles`: its number of fields and their distinct treatments (a compound or dose misspelt in
    the image table makes its fields unannotated, which the default roles leave out: the run says so)."""
    counts, treatments = Counter(), defaultdict(set)
    for f in fields:
        if f.role not in roles:
            counts[f.role] += 1
            treatments[f.role].add(f"{f.compound} @ {f.concentration:g}")
    return {role: (counts[role], sorted(treatments[role])) for role in sorted(counts)}


def _up_to_date(manifest: ShardManifest, n_fields: int, left_out: dict, started: float) -> ShardResult:
    """The result of a call that found OUT (the manifest's folder) already holding these complete shards."""
    return ShardResult(
        out=manifest.root, manifest=manifest, n_fields=n_fields,
        n_cells=sum(manifest.count(s) for s in manifest.splits), fields_processed=0, fields_reused=0,
        fields_skipped=manifest.skipped.get("fields", []), fields_empty=manifest.skipped.get("empty_fields", 0),
        fields_left_out=left_out, shards_written=0, shards_reused=sum(len(v) for v in manifest.splits.values()),
        shards_repaired=[],
        illumination_computed=False, up_to_date=True, timings={"wall_total": time.perf_counter() - started},
    )  # fmt: skip


def _manifest(
    config: ShardConfig,
    screen,
    run: Run,
    per_field,
    locations,
    record: dict,
    splits,
    stats,
    scaling: dict,
    codec: Codec,
) -> ShardManifest:
    """index.json of the finished shards: channels, splits, statistics, scaling, what was skipped, the config."""
    skipped_cells = {"border": int(per_field["border"].sum())}
    if locations is not None:
        skipped_cells["invalid_location"] = locations.n_invalid
    n_empty = int(((per_field["status"] == "ok") & (per_field["cells"] == 0)).sum())
    return ShardManifest(
        channels=list(screen.channels),
        crop_size=config.crop_size,
        splits=splits,
        channel_stats=stats,
        illumination=ILLUMINATION_NAME if config.illumination else None,
        scaling=scaling,
        skipped={
            "fields": [run.skipped[k] for k in sorted(run.skipped)],
            "cells": skipped_cells,
            "empty_fields": n_empty,
        },
        config=record,
        codec=codec,
        fields_table=FIELDS_TABLE_NAME,
    )
