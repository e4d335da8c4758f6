"""What the passes of `shard_screen` share: the read-only context every worker gets once, the state of
one run (pool, progress, skipped fields, timings) and the per-stage timer."""

from __future__ import annotations

import importlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from fastcell.errors import InputError
from fastcell.format.codecs import Codec
from fastcell.pool import WorkerPool
from fastcell.progress import Progress
from fastcell.shard.config import ShardConfig
from fastcell.shard.output import ILLUMINATION_NAME
from fastcell.shard.sources import Field, Screen


@dataclass(frozen=True)
class WorkerContext:
    """Read-only state every worker needs; sent once per process by the pool initializer."""

    out: Path
    illumination: bool
    crop_size: int
    border: str
    dna_index: int
    n_channels: int
    codec: Codec  # how the crops are stored
    dtypes: tuple  # per channel, the screen's pixel type (`probe_fields`): other bit depths are refused


_CONTEXT: WorkerContext | None = None


def worker_context() -> WorkerContext:
    """This process's context, set by `init_worker`."""
    return _CONTEXT


# What the tasks import, loaded before any task runs: scikit-image loads submodules lazily, on first
# attribute access, so the attributes are touched too.
PRELOAD = {
    "fastcell.shard.passes.illumination": (),
    "fastcell.shard.passes.scaling": (),
    "fastcell.shard.passes.crops": (),
    "fastcell.shard.passes.write": (),
    "tifffile": (),
    "scipy.ndimage": (),
    "skimage.filters": ("gaussian", "threshold_otsu", "threshold_local"),
    "skimage.feature": ("peak_local_max",),
    "skimage.segmentation": ("watershed",),
    "skimage.transform": ("resize",),
}


def init_worker(context: WorkerContext) -> None:
    """Set the worker's context and import what the tasks use (so task timers measure work, not imports)."""
    global _CONTEXT
    _CONTEXT = context
    for name, attributes in PRELOAD.items():
        module = importlib.import_module(name)
        for attribute in attributes:
            getattr(module, attribute)
    _illumination_of.cache_clear()
    field_crops.cache_clear()


def worker_pool(workers: int, context: WorkerContext, dask: str | None = None) -> WorkerPool:
    """The pool the passes run on: forkserver workers that imported PRELOAD once (safe beside the
    progress bar's thread), or a Dask cluster (`--dask`)."""
    return WorkerPool(workers, init_worker, (context,), preload=list(PRELOAD), dask=dask)


@lru_cache(maxsize=4)
def _illumination_of(path: str, mtime_ns: int) -> dict[str, np.ndarray]:
    from fastcell.shard.illumination import load_illumination

    return load_illumination(path)


@lru_cache(maxsize=256)
def field_crops(path: str) -> np.ndarray:
    """A field's crops from the work folder, memory-mapped (cached: a shard reads many cells of a field)."""
    return np.load(path, mmap_mode="r")


class Timer:
    """Accumulates seconds per stage: `with timer("read"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def __call__(self, stage: str) -> Timer:
        self._stage = stage
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.seconds[self._stage] += time.perf_counter() - self._start


def corrected(f: Field, image: np.ndarray, timer: Timer) -> np.ndarray:
    """The field divided by its plate's illumination function (unchanged with --no-illum)."""
    from fastcell.shard.illumination import correct_illumination

    ctx = worker_context()
    with timer("correct"):
        if ctx.illumination:
            path = ctx.out / ILLUMINATION_NAME
            illum = _illumination_of(str(path), path.stat().st_mtime_ns)[f.plate]
            if illum.shape != image.shape:
                raise InputError(
                    f"{f.paths[0]}: field {f.key} is {image.shape[1]}x{image.shape[2]}, the illumination "
                    f"function of plate {f.plate} is {illum.shape[1]}x{illum.shape[2]}"
                )
            image = correct_illumination(image, illum)
    return image


@dataclass
class Run:
    """State shared by the passes of one `shard_screen` call."""

    config: ShardConfig
    screen: Screen
    pool: WorkerPool
    progress: Progress
    timer: Timer
    skipped: dict[str, dict] = field(default_factory=dict)  # field key -> manifest record

    def failed(self, f: Field, error: str) -> None:
        """A field cannot be used: stop (--on-error fail) or record it and go on (skip)."""
        if self.config.on_error == "fail":
            raise InputError(
                f"{error}\n(rerun with --on-error skip to leave such fields out; they are recorded)"
            )
        self.skipped[f.key] = {
            "image": f.image,
            "plate": f.plate,
            "well": f.well,
            "site": f.site,
            "reason": error,
        }

    def usable(self, fields: list[Field]) -> list[Field]:
        return [f for f in fields if f.key not in self.skipped]

    def collect(self, result: dict) -> dict:
        for stage, seconds in result["timer"].items():
            self.timer.seconds[stage] += seconds
        return result

    def tasks(self, fn, tasks: list[tuple], description: str):
        """fn(*task) for every task on the pool, with a progress bar; task timings are collected."""
        for result in self.progress.track(self.pool.run(fn, tasks), len(tasks), description):
            yield self.collect(result)
