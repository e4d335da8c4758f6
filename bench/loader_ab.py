"""Loader rates of two fastcell checkouts side by side: before / after a change, on a shared machine.

Each repeat runs, for each checkout in turn, one fresh process that measures every (loader, codec) once with
`codec_bench.rate` (samples/s from the first batch to the last), so the two checkouts alternate and see the same
load; the table gives per checkout the median rate and the median of the per-repeat ratios to the first codec.
The shard folders are `FOLDER/<codec>` (the same cells sharded with each codec, e.g. by `fastcell shard --codec`).

    .venv/bin/python bench/loader_ab.py --folder /tmp/s6/96 --before /tmp/base --after . --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def one(kinds: list[str], codecs: list[str], folder: Path, epoch: int, batch: int, workers: int) -> dict:
    """Samples/s of each loader kind and codec in this process (the checkout on PYTHONPATH)."""
    import torch
    from codec_bench import rate

    from fastcell.loaders import AugmentSpec, create_eval_loader, create_train_loader

    out = {}
    for codec in codecs:
        for kind in kinds:
            if kind == "open":  # samples/s of opening the split (every shard checked against its index)
                from fastcell.loaders.base import open_split

                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    _, shards = open_split(folder / codec, None)
                    times.append(time.perf_counter() - start)
                out[f"{kind}/{codec}"] = sum(shard.count for shard in shards) / statistics.median(times)
                continue
            if kind == "eval":
                loader = create_eval_loader(folder / codec, batch, device="cpu", num_workers=workers)
            else:
                loader = create_train_loader(folder / codec, AugmentSpec(), batch, device="cpu", num_workers=workers)
                loader.set_epoch(epoch)
            out[f"{kind}/{codec}"] = rate(loader, torch.device("cpu"))[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="holds one shard folder per codec")
    parser.add_argument("--before", type=Path, required=True, help="a fastcell checkout (its root)")
    parser.add_argument("--after", type=Path, required=True, help="another fastcell checkout")
    parser.add_argument("--codecs", default="npy,blosc2,blosc2-lz4", help="the first is the ratios' baseline")
    parser.add_argument("--kinds", default="two_view,eval", help="two_view, eval, open (opening the split)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--one", type=int, metavar="EPOCH", help=argparse.SUPPRESS)  # a measuring process
    args = parser.parse_args()
    kinds, codecs = args.kinds.split(","), args.codecs.split(",")
    if args.one is not None:
        print(json.dumps(one(kinds, codecs, args.folder, args.one, args.batch_size, args.workers)))
        return
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for repeat in range(args.repeats):
        for version, root in (("before", args.before), ("after", args.after)):
            env = dict(os.environ, PYTHONPATH=str(root.resolve()))
            command = [sys.executable, __file__, *sys.argv[1:], "--one", str(repeat)]
            result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            runs[version].append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(repeat, version, {k: round(v) for k, v in runs[version][-1].items()},
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\n| loader | codec | before /s | vs {codecs[0]} | after /s | vs {codecs[0]} |\n|---|---|---:|---:|---:|---:|")
    for kind in kinds:
        for codec in codecs:
            cells = []
            for version in runs:
                rates = [r[f"{kind}/{codec}"] for r in runs[version]]
                ratios = [r[f"{kind}/{codec}"] / r[f"{kind}/{codecs[0]}"] for r in runs[version]]
                cells += [f"{statistics.median(rates):,.0f}", f"{statistics.median(ratios):.2f}"]
            print(f"| {kind} | {codec} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
