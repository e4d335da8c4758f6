"""The wait for an epoch's first batch: the DALI train loader starting the next epoch in the background (halfway
through the one before) against starting it on demand, in one run, alternating.

A training-like loop on one loader: epoch after epoch, a simulated step after each batch (`--step-ms` of sleep,
which releases the GIL as a GPU step does). For each epoch after the first: the wait for its first batch and the
median wait for its other batches; the epoch start's cost is the difference. Baseline: the same loader with the
background start turned off (`DaliTrainLoader._start_ahead` a no-op), so every epoch builds its pipeline and
fills its shuffle buffer before its first batch.

    .venv/bin/python bench/epoch_start.py            # writes bench/results/epoch_start.{json,md}
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from machine import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastcell.io import write_bytes_atomic, write_json_atomic  # noqa: E402
from fastcell.loaders import AugmentSpec, create_train_loader  # noqa: E402
from fastcell.loaders.dali import DaliTrainLoader  # noqa: E402
from fastcell.testing import make_shards, random_crops  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODES = ("on demand", "started ahead")


def epoch_waits(loader, epochs: int, step_s: float) -> list[tuple[float, float, float]]:
    """(first-batch wait, median wait of the other batches, mean wait of all) of epochs 1..epochs-1 (epoch 0
    starts cold in both modes). The mean counts what the background start costs the batches it runs beside."""
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        waits, batches = [], iter(loader)
        while True:
            start = time.perf_counter()
            try:
                next(batches)
            except StopIteration:
                break
            waits.append(time.perf_counter() - start)
            time.sleep(step_s)
        if epoch:
            out.append((waits[0], statistics.median(waits[1:]), statistics.fmean(waits)))
    return out


def measure(folder: Path, mode: str, args) -> list[tuple[float, float, float]]:
    real = DaliTrainLoader._start_ahead
    if mode == "on demand":
        DaliTrainLoader._start_ahead = lambda self, epoch: None
    try:
        loader = create_train_loader(folder, AugmentSpec(output_size=args.crop), args.batch_size, device="cpu",
                                     num_workers=args.workers)
        try:
            return epoch_waits(loader, args.epochs, args.step_ms / 1000)
        finally:
            loader.close()
    finally:
        DaliTrainLoader._start_ahead = real


def markdown(record: dict) -> str:
    lines = ["# Epoch starts: the next epoch started in the background vs on demand", "",
             f"- {record['date']}; {record['machine']['nproc']} CPU cores ({record['machine']['cpu']}), "
             f"load average {record['load_end']:.1f} at the end; {record['cells']} cells 3x{record['crop']}x"
             f"{record['crop']}, batch {record['batch_size']}, {record['workers']} DALI threads, a simulated "
             f"{record['step_ms']} ms step per batch, {record['epochs']} epochs x {record['repeats']} repeats "
             "(modes alternating); medians over the epochs after the first.", "",
             "| codec | mode | first batch ms | other batches ms | epoch start cost ms | mean batch ms |",
             "|---|---|---:|---:|---:|---:|"]
    for codec, modes in record["codecs"].items():
        for mode in MODES:
            r = modes[mode]
            lines.append(f"| {codec} | {mode} | {r['first_ms']:.0f} | {r['other_ms']:.0f} | {r['start_cost_ms']:.0f} | "
                         f"{r['mean_ms']:.1f} |")
        lines.append(f"| {codec} | on demand / started ahead | {modes['ratio_first']:.2f}x | | | "
                     f"{modes['ratio_mean']:.2f}x |")
    lines += ["", "Produced by `bench/epoch_start.py`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", default="npy,blosc2-lz4")
    parser.add_argument("--cells", type=int, default=4096)
    parser.add_argument("--crop", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=20.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    record = {"benchmark": "epoch_start", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine(gpu=None, torch=torch.__version__), "cells": args.cells, "crop": args.crop,
              "batch_size": args.batch_size, "workers": args.workers, "epochs": args.epochs,
              "repeats": args.repeats, "step_ms": args.step_ms, "codecs": {}}
    with tempfile.TemporaryDirectory(prefix="epoch_start_") as tmp:
        crops = random_crops(args.cells, 3, args.crop, seed=0)
        for codec in args.codecs.split(","):
            folder = make_shards(Path(tmp) / codec, crops, ["DNA", "Tubulin", "Actin"], shard_size=1024, codec=codec)
            found: dict[str, list] = {mode: [] for mode in MODES}
            for repeat in range(args.repeats):
                for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                    found[mode] += measure(folder, mode, args)
            modes: dict = {}
            for mode, waits in found.items():
                first, other, mean = (1000 * statistics.median(w[i] for w in waits) for i in (0, 1, 2))
                cost = statistics.median(1000 * (a - b) for a, b, _ in waits)
                modes[mode] = {"first_ms": first, "other_ms": other, "start_cost_ms": cost, "mean_ms": mean,
                               "waits_s": waits}
                print(f"{codec:12s} {mode:14s} first batch {first:6.1f} ms, others {other:6.1f} ms, start {cost:6.1f} ms",
                      flush=True)
            modes["ratio_first"] = modes["on demand"]["first_ms"] / modes["started ahead"]["first_ms"]
            modes["ratio_mean"] = modes["on demand"]["mean_ms"] / modes["started ahead"]["mean_ms"]
            record["codecs"][codec] = modes
    record["load_end"] = os.getloadavg()[0]
    write_json_atomic(RESULTS / "epoch_start.json", record)
    write_bytes_atomic(RESULTS / "epoch_start.md", markdown(record).encode())
    print(markdown(record))


if __name__ == "__main__":
    main()
