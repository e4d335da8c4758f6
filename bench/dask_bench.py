"""`fastcell shard` on the process pool vs a Dask LocalCluster: Dask's overhead per field, and the
projected time for the full BBBC021 screen.

Generates one synthetic plate of BBBC021-sized fields (1024 x 1280 px, 3 channels; `fastcell
synth`, annotated treatments and DMSO, 1 site per well) once, then shards it from scratch with the
process pool (`--workers 2`) and with `--dask local:2`, interleaved, `--repeats` times each
(illumination, nuclei detection, 96 px crops). Reports per executor: fields/s end to end and after
the workers have started, the core-seconds per field (wall after start x workers / fields), and
the difference per field (Dask's overhead). Projects the full BBBC021 screen (39,600 fields) on 16
and 64 cores as fields x core-seconds per field / cores, i.e. assuming the work scales linearly and
storage keeps up (reading 39,600 x 7.5 MiB is ~290 GiB).

    .venv/bin/python bench/dask_bench.py        # writes bench/results/dask_bench.{json,md}
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from machine import machine

from fastcell.shard.pipeline import ShardConfig, shard_screen
from fastcell.synth.design import SynthConfig
from fastcell.synth.screen import generate_screen

RESULTS = Path(__file__).parent / "results"
BBBC021_FIELDS = 39_600
PROJECTED_CORES = (16, 64)
EXECUTORS = {"process pool": {"workers": 2}, "dask local:2": {"dask": "local:2"}}
WORKERS = 2
STAGES = ("read", "illumination", "correct", "detect", "crop", "save", "load", "write", "stats")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # this process: the client (and Dask's scheduler)
    return usage.ru_utime + usage.ru_stime


def run_once(screen: Path, out: Path, options: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cpu = _cpu_seconds()
    result = shard_screen(ShardConfig(source=screen, out=out, crop_size=96, **options))
    cpu = _cpu_seconds() - cpu
    wall, start = result.timings["wall_total"], result.timings["wall_pool_start"]
    return {
        "client_cpu_s": cpu, "task_s_per_field": sum(result.timings.get(s, 0.0) for s in STAGES) / result.n_fields,
        "wall_s": wall, "start_s": start, "fields": result.n_fields, "cells": result.n_cells,
        "fields_per_s": result.n_fields / wall, "fields_per_s_after_start": result.n_fields / (wall - start),
        "core_s_per_field": (wall - start) * WORKERS / result.n_fields,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--plates", type=int, default=1, help="synthetic plates (more fields)")
    args = parser.parse_args()

    started = time.perf_counter()
    before = machine()
    runs: dict[str, list[dict]] = {name: [] for name in EXECUTORS}
    with tempfile.TemporaryDirectory(prefix="dask_bench_") as tmp:
        screen = Path(tmp) / "screen"
        synth = generate_screen(
            SynthConfig(out_dir=screen, weeks=("Week1",), plates_per_week=args.plates, sites_per_well=1,
                        field_size=(1024, 1280), seed=0, workers=WORKERS),
            progress=False,
        )  # fmt: skip
        for repeat in range(args.repeats):
            for name, options in EXECUTORS.items():  # interleaved: a load change on the machine hits both
                run = run_once(screen, Path(tmp) / "out", options)
                runs[name].append(run)
                print(f"repeat {repeat} {name}: {run['fields_per_s']:.2f} fields/s, {run['wall_s']:.1f} s "
                      f"(start {run['start_s']:.1f} s)")  # fmt: skip

    median = {
        name: {key: statistics.median(r[key] for r in mine) for key in mine[0]} for name, mine in runs.items()
    }
    pool, dask = median["process pool"], median["dask local:2"]
    record = {
        "benchmark": "dask_bench",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": before,
        "load_average_1min_after": machine()["load_average_1min"],
        "screen": {"source": "fastcell synth: Week1, annotated + DMSO, 1 site/well, 1024x1280x3 px",
                   "plates": args.plates, "fields": synth.n_fields},  # fmt: skip
        "options": {"crop": 96, "illumination": True, "detection": "detect_nuclei", "workers": WORKERS,
                    "repeats": args.repeats},  # fmt: skip
        "median": median,
        "dask_overhead_s_per_field": (dask["core_s_per_field"] - pool["core_s_per_field"]) / WORKERS,
        "projection_bbbc021_h": {
            name: {str(cores): BBBC021_FIELDS * m["core_s_per_field"] / cores / 3600 for cores in PROJECTED_CORES}
            for name, m in median.items()
        },
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dask_bench.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "dask_bench.md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict) -> str:
    m = record["machine"]
    lines = [
        "# fastcell shard: process pool vs Dask LocalCluster",
        "",
        f"{record['date']}; {m['nproc']} CPUs ({m['cpu']}), load average {m['load_average_1min']:.1f} before, "
        f"{record['load_average_1min_after']:.1f} after (other jobs share the CPUs); {record['screen']['source']}: "
        f"{record['screen']['fields']} fields. Median of {record['options']['repeats']} runs from scratch, "
        f"{WORKERS} workers each (illumination, nuclei detection, 96 px crops, shards).",
        "",
        "| executor | fields/s | wall s | worker start s | fields/s after start | core-s per field "
        "| task s per field | client CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in record["median"].items():
        lines.append(f"| {name} | {s['fields_per_s']:.2f} | {s['wall_s']:.1f} | {s['start_s']:.1f} "
                     f"| {s['fields_per_s_after_start']:.2f} | {s['core_s_per_field']:.2f} "
                     f"| {s['task_s_per_field']:.2f} | {s['client_cpu_s']:.1f} |")  # fmt: skip
    lines += [
        "",
        f"Dask's overhead after start: **{1000 * record['dask_overhead_s_per_field']:+.0f} ms per field** "
        "(wall seconds per field, same fields and worker count). Task s per field: the tasks' own timers "
        "(read, correct, detect, crop, write) summed, per field; client CPU s: the CPU time of the calling "
        "process, which with `local:N` also runs Dask's scheduler: where these grow, the overhead is CPU "
        "taken from the workers by the scheduler and the workers' event loops, which on a machine with few "
        "cores competes with the tasks (on a cluster the scheduler has a core of its own).",
        "",
        f"Projected full BBBC021 ({BBBC021_FIELDS:,} fields of 1024x1280x3), core-seconds per field x fields / "
        "cores (linear scaling, storage keeping up):",
        "",
        "| executor | " + " | ".join(f"{c} cores" for c in PROJECTED_CORES) + " |",
        "|---|" + "---|" * len(PROJECTED_CORES),
    ]
    for name, hours in record["projection_bbbc021_h"].items():
        lines.append(f"| {name} | " + " | ".join(f"{hours[str(c)]:.2f} h" for c in PROJECTED_CORES) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
