"""Time to the first trained batch of a resumed epoch: `set_epoch(e, start_batch=k)` against replaying the k batches
(iterate, throw away, then take the next: what the trainer did before), and a fresh epoch for scale.

Per backend and codec (DALI npy, DALI blosc2, torch npy) on the same synthetic crops, the three ways alternate in
each repeat; medians over repeats and the median per-repeat ratio replay / start_batch.

    .venv/bin/python bench/resume_bench.py            # writes bench/results/resume_bench.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from machine import machine

from fastcell.io import write_bytes_atomic, write_json_atomic
from fastcell.loaders import AugmentSpec, create_train_loader
from fastcell.testing import make_shards, random_crops

RESULTS = Path(__file__).resolve().parent / "results"
CASES = (("dali", "npy"), ("dali", "blosc2"), ("torch", "npy"))


def first_batch_s(loader, epoch: int, start: int, replay: bool) -> float:
    """Seconds from the epoch's start to the first batch it trains on."""
    begin = time.perf_counter()
    loader.set_epoch(epoch, start_batch=0 if replay else start)
    batches = iter(loader)
    for _ in range(start if replay else 0):
        next(batches)
    next(batches)
    elapsed = time.perf_counter() - begin
    if hasattr(batches, "close"):
        batches.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=2048)
    parser.add_argument("--crop", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--start", type=int, default=24, help="the batch the resumed epoch starts at")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    crops = random_crops(args.cells, channels=3, size=args.crop, seed=0)
    runs = {f"{b}/{c}": {"fresh": [], "start_batch": [], "replay": []} for b, c in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {codec: make_shards(Path(tmp) / codec, crops, codec=codec) for codec in {c for _, c in CASES}}
        loaders = {f"{b}/{c}": create_train_loader(folders[c], AugmentSpec(), args.batch_size, backend=b, device="cpu",
                                                   num_workers=args.workers) for b, c in CASES}
        for repeat in range(args.repeats):
            for case, loader in loaders.items():
                for way, start, replay in (("fresh", 0, False), ("start_batch", args.start, False),
                                           ("replay", args.start, True)):
                    runs[case][way].append(first_batch_s(loader, repeat, start, replay))
                print(repeat, case, {k: round(v[-1], 3) for k, v in runs[case].items()}, flush=True)
    record = {"benchmark": "resume_bench", "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
              "machine": machine(), "cells": args.cells, "crop": args.crop, "batch_size": args.batch_size,
              "start": args.start, "workers": args.workers, "repeats": args.repeats,
              "cases": {case: {way: {"median_s": statistics.median(v), "runs": v} for way, v in r.items()}
                        | {"replay_over_start": statistics.median(a / b for a, b in zip(r["replay"], r["start_batch"],
                                                                                        strict=True))}
                        for case, r in runs.items()}}
    write_json_atomic(RESULTS / "resume_bench.json", record)
    m = record["machine"]
    lines = ["# Resumed epoch: time to its first trained batch", "",
             f"- {record['date']}; {m['nproc']} CPU cores ({m['cpu']}), load average {m['load_average_1min']:.1f} at "
             f"the end; {args.cells} crops of 3 x {args.crop} x {args.crop}, batch {args.batch_size}, resumed at batch "
             f"{args.start}, {args.workers} workers, {args.repeats} repeats (medians).", "",
             "| loader | fresh epoch s | start_batch s | replay s | replay / start_batch |", "|---|---:|---:|---:|---:|"]
    for case, r in record["cases"].items():
        lines.append(f"| {case} | {r['fresh']['median_s']:.3f} | {r['start_batch']['median_s']:.3f} | "
                     f"{r['replay']['median_s']:.3f} | {r['replay_over_start']:.1f}x |")
    lines += ["", "Produced by `bench/resume_bench.py`."]
    write_bytes_atomic(RESULTS / "resume_bench.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
