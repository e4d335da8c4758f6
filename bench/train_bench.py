"""SimCLR training throughput on this machine: bf16 vs fp32, DALI vs torch loader, and model only.

    .venv/bin/python bench/train_bench.py                       # ResNet-18, standard stem, 96 px, batch 16
    .venv/bin/python bench/train_bench.py --crop 64 --batch 64 --name train_bench_64px

Every configuration runs the trainer's own step (fastcell.train.throughput.measure_training):
1 untimed warm-up step, then `--repeats` x `--steps` timed steps; samples/s (cells, two views
each) is the median over repeats, data wait the share of timed wall time spent in the loader.
Rows: fp32 with the DALI loader, the torch loader and stubbed data, and bf16 with DALI (bf16
autocast is several times slower than fp32 on an AVX2 CPU; one row shows it, more would break
the 5-minute budget). Loader rows read synthetic-blob shards (written to a temp folder with the real ShardWriter)
through fastcell.loaders with the default augmentations; "model only" rows hand out one stubbed
batch (nanoGPT's bench.py) and give model FLOPs utilisation: FLOPs of forward + backward counted
by torch.utils.flop_counter, against the CPU's FP32 FMA peak (cores x clock x 32 FLOP/cycle for
AVX2 with two 256-bit FMA units; bf16 has no faster units on an AVX2 CPU, so the same peak).
Writes bench/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from loader_bench import machine  # noqa: E402

from fastcell.io import write_bytes_atomic, write_json_atomic  # noqa: E402
from fastcell.loaders import AugmentSpec, create_train_loader  # noqa: E402
from fastcell.testing import make_shards, random_crops  # noqa: E402
from fastcell.train.throughput import measure_training  # noqa: E402

FMA_FLOPS_PER_CYCLE = 32  # AVX2: 2 FMA units x 8 float32 lanes x 2 FLOP


def cpu_peak_flops() -> float:
    mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("cpu MHz")]
    return (os.cpu_count() or 1) * (max(mhz) if mhz else 2000.0) * 1e6 * FMA_FLOPS_PER_CYCLE


def run(args) -> dict:
    peak = cpu_peak_flops()
    common = dict(arch=args.arch, stem=args.stem, batch_size=args.batch, crop_size=args.crop, steps=args.steps,
                  repeats=args.repeats, warmup=1, peak_flops=peak)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n = args.batch * (args.steps * args.repeats + 2) * 2  # enough cells for every step without a repeat
        shards = make_shards(Path(tmp) / "shards", random_crops(min(n, 4096), channels=3, size=args.crop),
                             ["DNA", "Tubulin", "Actin"], shard_size=256)
        # bf16 autocast is several times slower than fp32 on an AVX2 CPU: one bf16 row keeps the run short
        for precision, backend in (("fp32", "dali"), ("fp32", "torch"), ("fp32", None), ("bf16", "dali")):
            loader = None if backend is None else create_train_loader(
                shards, AugmentSpec(), args.batch, backend=backend, device="cpu", num_workers=args.workers)
            result = measure_training(precision=precision, loader=loader, **common)
            result["loader"] = backend or "model only"
            rows.append(result)
            print(f"{precision} {result['loader']:10s} {result['samples_per_s']:7.1f} samples/s  "
                  f"wait {result['data_wait']:5.1%}  MFU {result['mfu']:.1%}", flush=True)
    by = {(r["precision"], r["loader"]): r["samples_per_s"] for r in rows}
    return {
        "config": {**{k: v for k, v in common.items() if k != "peak_flops"}, "workers": args.workers,
                   "cpu_peak_tflops_fp32": peak / 1e12},
        "rows": rows,
        "ratios": {
            "bf16_over_fp32_dali": by[("bf16", "dali")] / by[("fp32", "dali")],
            "dali_over_torch_fp32": by[("fp32", "dali")] / by[("fp32", "torch")],
            "dali_over_model_only_fp32": by[("fp32", "dali")] / by[("fp32", "model only")],
        },
    }


def markdown(result: dict) -> str:
    m, c = result["machine"], result["config"]
    lines = [
        f"# SimCLR training throughput ({c['arch']}, {c['stem']} stem, {c['crop_size']} px, batch {c['batch_size']})",
        "",
        f"{result['date']}; {m['nproc']} CPU cores ({m['cpu']}); GPU: {m['gpu'] or 'none'}; torch {m['torch']}; "
        f"load average at start {result['load_average']}. Medians over {c['repeats']} repeats of {c['steps']} "
        f"steps; a sample is one cell (two views). MFU against {c['cpu_peak_tflops_fp32']:.3f} TFLOP/s "
        "(FP32 FMA peak).",
        "",
        "| precision | data | samples/s | data wait | ms/step | GFLOP/step | MFU |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['precision']} | {r['loader']} | {r['samples_per_s']:.1f} | {r['data_wait']:.1%} | "
                     f"{r['step_ms']:.0f} | {r['flops_per_step'] / 1e9:.0f} | {r['mfu']:.1%} |")
    lines += ["", "Ratios (same run): " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--stem", default="standard")
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--name", default="train_bench")
    args = parser.parse_args()
    load = os.getloadavg()
    result = run(args)
    result.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine(),
                  load_average=[round(x, 2) for x in load])
    out = ROOT / "bench" / "results"
    write_json_atomic(out / f"{args.name}.json", result)
    write_bytes_atomic(out / f"{args.name}.md", markdown(result).encode())
    print(markdown(result))


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
