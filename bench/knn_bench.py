"""Cosine 1-NN: FAISS flat inner-product index vs scikit-learn's brute-force KNeighborsClassifier.

Same data for both: N reference vectors of 512 dims (random Gaussian, float32) and a fixed subset
of Q query vectors, for N = 100k, 300k and 1M (1M runs only when the time measured so far says it
fits the budget). Each method's time covers building its index / fitting and searching the top-1
neighbour of every query; medians over repeats. The neighbours are compared (they must agree
except for float32 near-ties). FAISS: `IndexFlatIP` on L2-normalised vectors; scikit-learn:
`KNeighborsClassifier(n_neighbors=1, algorithm="brute", metric="cosine", n_jobs=-1)`.

    .venv/bin/python bench/knn_bench.py [--queries 500] [--repeats 3] [--budget-s 300]

Writes bench/results/knn_bench.json and bench/results/knn_bench.md. The GPU check script calls
`check_gpu_index()` (re-exported here): CPU and GPU FAISS indices must give the same neighbours.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_model  # noqa: E402

from fastcell.evaluate.neighbours import check_gpu_index  # noqa: E402  (re-exported for the GPU check)
from fastcell.io import write_bytes_atomic, write_json_atomic  # noqa: E402

__all__ = ["check_gpu_index", "main"]

RESULTS = Path(__file__).resolve().parent / "results"
DIM = 512


def faiss_1nn(refs: np.ndarray, queries: np.ndarray) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(refs.shape[1])
    index.add(refs)
    return index.search(queries, 1)[1][:, 0]


def sklearn_1nn(refs: np.ndarray, queries: np.ndarray, labels: np.ndarray) -> np.ndarray:
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=1, algorithm="brute", metric="cosine", n_jobs=-1)
    knn.fit(refs, labels)
    return knn.kneighbors(queries, return_distance=False)[:, 0]


def timed(fn, *args) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,300000,1000000")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip sizes projected to overrun this")
    args = parser.parse_args()
    import faiss

    started = time.perf_counter()
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in args.sizes.split(",")]
    all_refs = rng.standard_normal((max(sizes), DIM), dtype=np.float32)
    all_refs /= np.linalg.norm(all_refs, axis=1, keepdims=True)
    labels = rng.integers(0, 12, max(sizes))
    rows, skipped = [], []
    seconds_per_vector = None
    for n in sizes:
        refs = all_refs[:n]
        queries = np.ascontiguousarray(refs[rng.choice(n, args.queries, replace=False)]
                                       + 0.5 * rng.standard_normal((args.queries, DIM), dtype=np.float32) / DIM**0.5)
        repeats = args.repeats
        if seconds_per_vector is not None:
            projected = seconds_per_vector * n
            left = args.budget_s - (time.perf_counter() - started)
            repeats = min(repeats, int(left // projected))
            if repeats < 1:
                skipped.append({"n": n, "reason": f"projected {projected:.0f} s per repeat, {left:.0f} s left"})
                continue
        faiss_times, sklearn_times = [], []
        for _ in range(repeats):
            t, faiss_nn = timed(faiss_1nn, refs, queries)
            faiss_times.append(t)
            t, sklearn_nn = timed(sklearn_1nn, refs, queries, labels[:n])
            sklearn_times.append(t)
        per_repeat = (sum(faiss_times) + sum(sklearn_times)) / repeats
        seconds_per_vector = per_repeat / n
        row = {
            "n_refs": n, "n_queries": args.queries, "dim": DIM, "repeats": repeats,
            "faiss_s": statistics.median(faiss_times), "sklearn_s": statistics.median(sklearn_times),
            "faiss_times": faiss_times, "sklearn_times": sklearn_times,
            "same_neighbour_fraction": float((faiss_nn == sklearn_nn).mean()),
        }
        row["speedup"] = row["sklearn_s"] / row["faiss_s"]
        row["faiss_queries_per_s"] = args.queries / row["faiss_s"]
        rows.append(row)
        print(f"N={n:>8}: faiss {row['faiss_s']:.2f} s, sklearn {row['sklearn_s']:.2f} s, "
              f"speedup x{row['speedup']:.1f}, same neighbour {row['same_neighbour_fraction']:.4f}", flush=True)

    import sklearn

    result = {
        "benchmark": "cosine 1-NN, FAISS IndexFlatIP vs sklearn KNeighborsClassifier(brute, cosine)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"nproc": len(os.sched_getaffinity(0)), "load_avg_1min": os.getloadavg()[0], "cpu": cpu_model(), "python": platform.python_version(),
                    "faiss": faiss.__version__, "sklearn": sklearn.__version__,
                    "faiss_threads": faiss.omp_get_max_threads()},
        "queries_note": f"{args.queries} queries (noisy copies of references) against N references",
        "results": rows, "skipped": skipped, "total_s": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "knn_bench.json", result)
    lines = [
        "# Cosine 1-NN: FAISS vs scikit-learn brute force",
        "",
        f"{result['date']}; {result['machine']['nproc']} CPUs ({result['machine']['cpu']}); "
        f"faiss {faiss.__version__}, scikit-learn {sklearn.__version__}. {result['queries_note']}, "
        f"{DIM} dims; time = index build / fit + search; median of repeats.",
        "",
        "| references | repeats | FAISS (s) | scikit-learn (s) | speedup | same neighbour |",
        "|---|---|---|---|---|---|",
        *(f"| {r['n_refs']:,} | {r['repeats']} | {r['faiss_s']:.2f} | {r['sklearn_s']:.2f} | "
          f"x{r['speedup']:.1f} | {r['same_neighbour_fraction']:.4f} |" for r in rows),
        "",
        *(f"Skipped N={s['n']:,}: {s['reason']}." for s in skipped),
        "",
    ]
    write_bytes_atomic(RESULTS / "knn_bench.md", "\n".join(lines).encode())


if __name__ == "__main__":
    main()
