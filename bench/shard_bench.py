"""Throughput of `fastcell shard` on a synthetic BBBC021 screen, with 1 and 2 worker processes.

Generates a fixed subset of the synthetic screen once (Week1, one plate, annotated treatments and
DMSO, 2 sites per well, 256 x 320 px fields), then shards it from scratch `--repeats` times per
worker count (nuclei detection, illumination correction, 96 px crops). Reports the median
fields/s and cells/s, the ratio 2 workers / 1 worker measured in the same run, and where the
worker time goes (decode, illumination, correction, detection, cropping, work-file saving, shard
writing, statistics), from the per-stage timers `shard_screen` returns.

    .venv/bin/python bench/shard_bench.py            # writes bench/results/shard_bench.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from machine import cpu_model

from fastcell.shard.pipeline import ShardConfig, shard_screen
from fastcell.synth.design import SynthConfig
from fastcell.synth.screen import generate_screen

RESULTS = Path(__file__).parent / "results"
# Worker-time stages, in pipeline order, with the names the report uses.
STAGES = {
    "read": "decode",
    "illumination": "illumination fit",
    "correct": "correction",
    "detect": "detection",
    "crop": "cropping",
    "save": "work files",
    "load": "crop loading",
    "write": "shard writing",
    "stats": "statistics",
}


def run_once(screen: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = shard_screen(ShardConfig(source=screen, out=out, workers=workers, crop_size=96))
    wall = result.timings["wall_total"]
    working = wall - result.timings["wall_pool_start"]
    stage_seconds = {stage: result.timings.get(stage, 0.0) for stage in STAGES}
    return {
        "workers": workers,
        "wall_s": wall,
        "fields": result.n_fields,
        "cells": result.n_cells,
        "fields_per_s": result.n_fields / wall,
        "cells_per_s": result.n_cells / wall,
        "pool_start_s": result.timings["wall_pool_start"],
        "fields_per_s_after_start": result.n_fields / working,
        "cells_per_s_after_start": result.n_cells / working,
        "stage_s": stage_seconds,
        "pass_wall_s": {k: v for k, v in result.timings.items() if k.startswith("wall_")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    started = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="shard_bench_") as tmp:
        screen = Path(tmp) / "screen"
        synth = generate_screen(
            SynthConfig(out_dir=screen, weeks=("Week1",), plates_per_week=1, sites_per_well=2,
                        field_size=(256, 320), seed=0, workers=2),
            progress=False,
        )  # fmt: skip
        runs = []
        for repeat in range(args.repeats):
            for workers in args.workers:  # interleaved, so a load change on the machine hits both alike
                run = run_once(screen, Path(tmp) / f"out-{workers}", workers)
                run["repeat"] = repeat
                runs.append(run)
                print(f"repeat {repeat} workers {workers}: {run['fields_per_s']:.2f} fields/s, "
                      f"{run['cells_per_s']:.1f} cells/s ({run['wall_s']:.1f} s)")  # fmt: skip

    summary = {}
    for workers in args.workers:
        mine = [r for r in runs if r["workers"] == workers]
        totals = {stage: statistics.median(r["stage_s"][stage] for r in mine) for stage in STAGES}
        worker_time = sum(totals.values())
        summary[str(workers)] = {
            "fields_per_s": statistics.median(r["fields_per_s"] for r in mine),
            "cells_per_s": statistics.median(r["cells_per_s"] for r in mine),
            "wall_s": statistics.median(r["wall_s"] for r in mine),
            "pool_start_s": statistics.median(r["pool_start_s"] for r in mine),
            "fields_per_s_after_start": statistics.median(r["fields_per_s_after_start"] for r in mine),
            "cells_per_s_after_start": statistics.median(r["cells_per_s_after_start"] for r in mine),
            "stage_share": {stage: totals[stage] / worker_time for stage in STAGES},
        }
    base, other = str(args.workers[0]), str(args.workers[-1])
    ratio = summary[other]["fields_per_s"] / summary[base]["fields_per_s"]
    ratio_after_start = summary[other]["fields_per_s_after_start"] / summary[base]["fields_per_s_after_start"]
    record = {
        "benchmark": "shard_bench",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version()},
        "screen": {
            "source": "fastcell synth: Week1, 1 plate, annotated + DMSO, 2 sites/well, 256x320 px",
            "fields": synth.n_fields,
            "true_cells": synth.n_cells,
        },  # fmt: skip
        "options": {"crop": 96, "illumination": True, "detection": "detect_nuclei", "repeats": args.repeats},
        "median": summary,
        "ratio_fields_per_s": {f"{other}w/{base}w": ratio},
        "ratio_fields_per_s_after_start": {f"{other}w/{base}w": ratio_after_start},
        "load_average": {
            "before": load_before,
            "after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shard_bench.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "shard_bench.md").write_text(markdown(record, args.workers))
    print(markdown(record, args.workers))


def markdown(record: dict, workers: list[int]) -> str:
    m = record["machine"]
    lines = [
        "# fastcell shard throughput",
        "",
        f"{record['date']}; {m['nproc']} CPUs ({m['cpu']}); {record['screen']['source']}: "
        f"{record['screen']['fields']} fields. Median of {record['options']['repeats']} runs from scratch "
        "(illumination pass, nuclei detection, 96 px crops, shards, manifest; pool start-up included).",
        "",
        "| workers | fields/s | cells/s | wall s | pool start s | fields/s after start | cells/s after start |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in workers:
        s = record["median"][str(w)]
        lines.append(
            f"| {w} | {s['fields_per_s']:.2f} | {s['cells_per_s']:.1f} | {s['wall_s']:.1f} | {s['pool_start_s']:.1f} "
            f"| {s['fields_per_s_after_start']:.2f} | {s['cells_per_s_after_start']:.1f} |"
        )
    lines += ["", "Share of summed worker time per stage (%):", "",
              "| workers | " + " | ".join(STAGES.values()) + " |", "|---|" + "---|" * len(STAGES)]  # fmt: skip
    for w in workers:
        shares = record["median"][str(w)]["stage_share"]
        lines.append(f"| {w} | " + " | ".join(f"{100 * shares[stage]:.0f}" for stage in STAGES) + " |")
    ((name, ratio),) = record["ratio_fields_per_s"].items()
    ((_, after_start),) = record["ratio_fields_per_s_after_start"].items()
    load = record["load_average"]
    lines += [
        "",
        f"Ratio {name} (fields/s): **{ratio:.2f}x** end to end, {after_start:.2f}x after the pool has started. "
        f"Load average {load['before']:.1f} before, {load['after']:.1f} after (other jobs share the CPUs).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
