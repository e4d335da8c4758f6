"""Two-view samples/s of the DALI loader against the PyTorch reference, same shards, spec and batch.

    .venv/bin/python bench/loader_bench.py                    # synthetic 3 x 96 x 96 crops in a temp folder
    .venv/bin/python bench/loader_bench.py --shards shards/bbbc021 --repeats 5

DALI runs on the GPU when CUDA is present (else on the CPU); the torch loader uses DataLoader
workers. Repeats alternate the backends. Each repeat times one epoch: `steady` is the rate from
the first batch to the last (pipeline build / worker start excluded), `epoch` includes them.
Writes bench/results/loader_bench.json and .md (medians and the DALI / torch ratio).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from machine import cpu_model  # noqa: E402

from fastcell.io import write_bytes_atomic, write_json_atomic  # noqa: E402
from fastcell.loaders import AugmentSpec, create_train_loader  # noqa: E402
from fastcell.testing import make_shards, random_crops  # noqa: E402


def machine() -> dict:
    cpu = cpu_model()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"nproc": os.cpu_count(), "cpu": cpu, "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "load_average_1min_at_end": os.getloadavg()[0]}


def time_epoch(loader) -> dict:
    """One epoch: samples/s from the first batch to the last, and for the whole epoch."""
    start = time.perf_counter()
    first = None
    batches = 0
    for view1, _, _ in loader:
        if view1.is_cuda:
            torch.cuda.synchronize()
        batches += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    size = loader.batch_size
    return {"steady": (batches - 1) * size / (end - first), "epoch": batches * size / (end - start)}


def run(shards: Path, batch_size: int, repeats: int, workers: int, device: str) -> dict:
    spec = AugmentSpec()
    loaders = {backend: create_train_loader(shards, spec, batch_size, backend=backend, device=device,
                                            num_workers=workers) for backend in ("dali", "torch")}
    runs = {backend: [] for backend in loaders}
    for repeat in range(repeats):
        for backend, loader in loaders.items():
            loader.set_epoch(repeat)
            runs[backend].append(time_epoch(loader))
            print(f"repeat {repeat} {backend:5s} steady {runs[backend][-1]['steady']:8.0f}/s "
                  f"epoch {runs[backend][-1]['epoch']:8.0f}/s", flush=True)
    medians = {b: {k: statistics.median(r[k] for r in rs) for k in ("steady", "epoch")} for b, rs in runs.items()}
    return {
        "spec": vars(spec),
        "samples_per_epoch": len(loaders["dali"]) * batch_size,
        "crop": [len(loaders["dali"].channels), loaders["dali"].image_size, loaders["dali"].image_size],
        "runs": runs,
        "median_two_view_samples_per_s": medians,
        "ratio_dali_over_torch": {k: medians["dali"][k] / medians["torch"][k] for k in ("steady", "epoch")},
    }


def markdown(result: dict) -> str:
    med, ratio = result["median_two_view_samples_per_s"], result["ratio_dali_over_torch"]
    m = result["machine"]
    lines = [
        "# Loader benchmark: two-view samples/s",
        "",
        f"{result['date']}; {m['nproc']} CPU cores ({m['cpu']}, load average {m['load_average_1min_at_end']:.1f} "
        f"at the end, this benchmark's own threads included); GPU: {m['gpu'] or 'none'}; "
        f"DALI device: {result['dali_device']}; crops {'x'.join(map(str, result['crop']))}, batch "
        f"{result['batch_size']}, {result['samples_per_epoch']} samples/epoch, {result['workers']} workers/threads, "
        f"{result['repeats']} repeats (medians), default `AugmentSpec`.",
        "",
        "| loader | steady samples/s | epoch samples/s (incl. start-up) |",
        "|---|---:|---:|",
        *(f"| {b} | {med[b]['steady']:.0f} | {med[b]['epoch']:.0f} |" for b in ("dali", "torch")),
        f"| ratio dali / torch | {ratio['steady']:.2f} | {ratio['epoch']:.2f} |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="a shard folder (default: synthetic crops in a temp folder)")
    parser.add_argument("--samples", type=int, default=4096, help="synthetic crops to write")
    parser.add_argument("--size", type=int, default=96, help="synthetic crop size")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DALI threads / torch DataLoader workers")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "loader_bench.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            print(f"writing {args.samples} synthetic 3x{args.size}x{args.size} crops ...", flush=True)
            shards = make_shards(tmp, random_crops(args.samples, 3, args.size, seed=0), shard_size=1024)
        result = run(shards, args.batch_size, args.repeats, args.workers, device)
    result.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine(),
                  dali_device=device, batch_size=args.batch_size, repeats=args.repeats, workers=args.workers,
                  shards=str(args.shards) if args.shards else f"synthetic {args.samples} crops")
    write_json_atomic(args.out, result)
    write_bytes_atomic(args.out.with_suffix(".md"), markdown(result).encode())
    print(markdown(result))


if __name__ == "__main__":
    main()
