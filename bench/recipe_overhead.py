"""Host cost of the view recipe per two-view batch: the torch ops it dispatches, its Python + dispatch time
on crops so small that compute is negligible, and the draw time (issue 12: at 60,000 two-view samples/s a
GPU batch of 512 has 8.5 ms of host time, shared with the training loop's Python by the GIL).

    PYTHONPATH=. python bench/recipe_overhead.py                              # this checkout's recipe
    PYTHONPATH=. python bench/recipe_overhead.py --compare a6147d2 --real 5   # and a commit's, interleaved

Each op on a GPU tensor is a kernel launch (several us of Python, dispatch and launch) whatever its size,
so the count of ops on the images' device stands in for the GPU path's launches: the recipe runs with its
images on the 'meta' device (shapes only, no compute, and no value can be read back), where the ops on
meta tensors are the kernels a GPU would launch. The time of a two-view batch of 32 tiny CPU crops (torch
on one thread; compute negligible) is its Python + dispatch cost with the draws; of 512, with some compute
(on the CPU the resampling lines are built in chunks, so more ops than on a GPU). `gpu_check.py`'s
view-steps-gpu row counts the CUDA kernels and times the host on a GPU itself (`recipe_host_cost`). `--real`
also times both views of real-size batches on the CPU, as the DALI CPU loader makes them. Writes
bench/results/recipe_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastcell.loaders.dispatch import count_ops  # noqa: E402
from fastcell.loaders.spec import AugmentSpec, Intensity  # noqa: E402


def toy_intensity(channels: int = 3) -> Intensity:
    """Per-channel constants of a typical 16-bit screen (the values do not change the op count)."""
    return Intensity.from_stats({"mean": [900.0, 2500.0, 300.0][:channels], "std": [200.0, 700.0, 90.0][:channels],
                                 "p99": [1800.0, 5000.0, 600.0][:channels]}, normalize=True)


def batched_draws(module) -> bool:
    """Whether `module`'s recipe draws both views in one call (this checkout's) or one view per call (a6147d2's)."""
    return "views" in module.ViewRecipe.draw.__code__.co_varnames


def two_views(module, spec: AugmentSpec, size: int, seed: int = 0) -> tuple[Callable, Callable]:
    """(`draw(n)`, `batch(images)`): every random choice of both views of n crops, and both views of a batch,
    by the recipe of `module` (fastcell.loaders.augment of this checkout or of an older commit, whose
    `draw` took two generators per view and whose `apply` made one view), as the GPU loader makes them."""
    recipe, gen = module.ViewRecipe(spec, toy_intensity(), size), module.seeded_generator
    if batched_draws(module):
        def draw(n):
            return recipe.draw(n, size, size, gen(seed), views=2)

        def batch(images):
            return recipe.apply(images, draw(len(images)))
    else:
        def draw(n):
            return [recipe.draw(n, size, size, gen(seed + 2 * v), gen(seed + 2 * v + 1)) for v in (0, 1)]

        def batch(images):
            return [recipe.apply(images, d) for d in draw(len(images))]
    return draw, batch


def host_cost(run: Callable[[], object], repeats: int = 5) -> dict:
    """The ops of `run()` in steady state (after one call, which fills the caches) and its median wall ms."""
    run()
    return {**count_ops(run).summary(), "host_ms": wall_ms(run, repeats)}


def measure(modules: dict, spec: AugmentSpec, n: int, tiny: int, repeats: int, few: int = 32) -> dict:
    """Per recipe, for two-view batches of n: the ops with the images on 'meta' (device kernels and views,
    host ops, reads back), and, interleaved across recipes, the median ms of a batch of n tiny CPU crops, of
    `few` of them (compute negligible: Python and dispatch) and of the draws alone."""
    meta = torch.empty((n, 3, 96, 96), device="meta")
    tiny_images = torch.rand((n, 3, tiny, tiny)) * 3000
    result, runs = {}, {}
    for name, module in modules.items():
        draw, batch = two_views(module, spec, 96)
        try:
            result[name] = host_cost(lambda batch=batch: batch(meta))
        except (RuntimeError, NotImplementedError) as err:  # an older recipe may mix devices
            result[name] = {"meta_error": str(err).splitlines()[0][:100]}
        result[name]["draw_ops"] = count_ops(lambda draw=draw: draw(n)).summary()["host_ops"]
        _, tiny_batch = two_views(module, spec, tiny)
        runs[name] = {"tiny_ms": lambda b=tiny_batch: b(tiny_images), "few_ms": lambda b=tiny_batch: b(tiny_images[:few]),
                      "draw_ms": lambda d=draw: d(n)}
    times = {name: {k: [] for k in r} for name, r in runs.items()}
    for _ in range(repeats):  # interleaved
        for name, timed in runs.items():
            for key, run in timed.items():
                times[name][key].append(wall_ms(run))
    for name in modules:
        result[name].update({k: statistics.median(v) for k, v in times[name].items()})
    return result


def wall_ms(run: Callable[[], object], calls: int = 3) -> float:
    """Median wall ms of `calls` calls of `run()`."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def real_rate(module, images: torch.Tensor, pool: ThreadPoolExecutor) -> tuple[float, float]:
    """(two-view samples/s, CPU ms per batch) of `module`'s recipe on a real-size CPU batch, one view per thread
    of one torch thread each, as the DALI CPU loader makes them. The CPU time (every thread's, summed) does
    not count the time other jobs of a shared machine hold the cores."""
    recipe, gen = module.ViewRecipe(AugmentSpec(), toy_intensity(), images.shape[-1]), module.seeded_generator
    n, _, h, w = images.shape

    def timed(view_of):
        def one(v):
            torch.set_num_threads(1)
            start = time.thread_time()
            view_of(v)
            return time.thread_time() - start
        return one

    if batched_draws(module):
        def batch():
            start = time.thread_time()
            draws = recipe.draw(n, h, w, gen(0), views=2)
            drawn = time.thread_time() - start
            return drawn + sum(pool.map(timed(lambda v: recipe.apply(images, draws.part(v, n))), (0, 1)))
    else:
        def batch():
            return sum(pool.map(timed(lambda v: recipe.apply(images, recipe.draw(n, h, w, gen(v), gen(v + 2)))),
                                (0, 1)))
    batch()
    walls, cpus = [], []
    for _ in range(2):
        start = time.perf_counter()
        cpus.append(1000 * batch())
        walls.append(time.perf_counter() - start)
    return n / statistics.median(walls), statistics.median(cpus)


def load_commit(commit: str):
    """fastcell/loaders/augment.py of `commit` as a module of its own."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:fastcell/loaders/augment.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"augment_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", help="a commit whose recipe to measure alongside (e.g. a6147d2)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--tiny", type=int, default=8, help="side of the tiny crops")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--real", type=int, default=0, help="also time this many repeats of batch 256 x 3 x 96 x 96")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "recipe_overhead.json")
    args = parser.parse_args()
    import fastcell.loaders.augment as current

    modules = {"now": current}
    if args.compare:
        modules = {args.compare: load_commit(args.compare), "now": current}
    load_start = os.getloadavg()[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP wake-ups on a busy machine would swamp the dispatch cost of tiny ops
    specs = {"default": AugmentSpec(), "default, no noise": AugmentSpec(noise_p=0.0)}
    results = {label: measure(modules, spec, args.batch, args.tiny, args.repeats) for label, spec in specs.items()}
    torch.set_num_threads(threads)
    lines = [f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}; {os.cpu_count()} CPU cores, load average "
             f"{load_start:.1f} at the start; torch {torch.__version__}; two-view batches of {args.batch}; "
             f"{args.repeats} interleaved repeats (medians)", "",
             "| recipe | spec | device kernels (meta) | device views | host ops | of them draws | reads back "
             f"| ms, {args.batch} x 3x{args.tiny}x{args.tiny} CPU | ms, 32 x 3x{args.tiny}x{args.tiny} CPU "
             "| draw ms |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, found in results.items():
        for name, r in found.items():
            meta = (f"{r['device_kernels']} | {r['device_views']} | {r['host_ops']} | {r['draw_ops']} | "
                    f"{len(r['syncs'])}" if "device_kernels" in r else f"fails: {r['meta_error']} | | | "
                                                                         f"{r['draw_ops']} |")
            lines.append(f"| {name} | {label} | {meta} | {r['tiny_ms']:.2f} | {r['few_ms']:.2f} | "
                         f"{r['draw_ms']:.2f} |")
    if args.real:
        images = torch.from_numpy(np.random.default_rng(0).integers(100, 5000, (256, 3, 96, 96)).astype(np.float32))
        runs = {name: [] for name in modules}
        with ThreadPoolExecutor(max_workers=2) as pool:
            for _ in range(args.real):
                for name, module in modules.items():
                    runs[name].append(real_rate(module, images, pool))
        real = {k: {"two_view_samples_per_s": statistics.median(r for r, _ in v),
                    "cpu_ms_per_batch": statistics.median(c for _, c in v)} for k, v in runs.items()}
        results["real"] = real
        lines += ["", f"CPU, batch 256 x 3 x 96 x 96, default spec, one torch thread per view (as the DALI CPU "
                  f"loader), {args.real} interleaved repeats, medians: "
                  + "; ".join(f"{k}: {v['two_view_samples_per_s']:.0f} two-view samples/s, "
                              f"{v['cpu_ms_per_batch']:.0f} CPU ms a batch" for k, v in real.items())]
    lines.append(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    print("\n".join(lines))
    from fastcell.io import write_bytes_atomic, write_json_atomic

    write_json_atomic(args.out, {"batch": args.batch, "tiny": args.tiny, "results": results, "table": lines})
    write_bytes_atomic(args.out.with_suffix(".md"), ("# View recipe host cost\n\n" + "\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
