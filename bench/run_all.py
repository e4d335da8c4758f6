"""Run every throughput benchmark in turn (`make bench`); each records bench/results/<name>.{json,md}.

The machines are noisy: each script measures its candidate and its baseline in the same run,
interleaved, and reports medians and the ratio. Expect about 15-20 minutes on a 2-core CPU.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SCRIPTS = [
    "shard_bench.py",  # fields/s and cells/s, 1 vs 2 workers, per-stage shares
    "detection_bench.py",  # nuclei detection recall/precision on real images, s/MP
    "loader_bench.py",  # two-view samples/s, DALI vs torch reference
    "epoch_start.py",  # wait for an epoch's first batch: next epoch started in the background vs on demand
    "train_bench.py",  # SimCLR samples/s, bf16 vs fp32, DALI vs torch loader, MFU
    "knn_bench.py",  # FAISS vs scikit-learn brute-force 1-NN
]


def main() -> int:
    failed = []
    for script in SCRIPTS:
        print(f"\n=== bench/{script}", flush=True)
        start = time.perf_counter()
        if subprocess.run([sys.executable, str(BENCH / script)]).returncode != 0:
            failed.append(script)
        print(f"=== bench/{script}: {time.perf_counter() - start:.0f} s", flush=True)
    print("\nresults in bench/results/" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
