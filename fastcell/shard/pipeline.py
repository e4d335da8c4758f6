"""`shard_screen`: fields of a screen -> illumination-corrected single-cell crops in WebDataset shards.

Three passes, each parallel over a process pool and each resumable:

1. Illumination (when on): per plate and channel, `IlluminationAccumulator`s filled in chunks of
   `FIELD_CHUNK` fields (exact integer sums: the result does not depend on `--workers`) give the
   functions in `illumination.npz`, saved atomically beside the shards. With `--scaling
   plate-percentile`, exact histograms of every `SCALING_STRIDE`-th pixel of the corrected fields
   give each plate's low/high percentiles, saved in the same file.
2. Crops: per field, read -> correct -> locate cells (the locations table, else
   `detect_nuclei` on the corrected DNA channel, before scaling) -> scale -> crop; the crops go to
   `<out>/.work/fields/<key>.crops.npy` and the centres to `<key>.npz` (the completion marker,
   written last). A rerun skips fields whose marker exists.
3. Shards: ids 0..N-1 in a fixed order (sorted field keys, then cell order within the field); the
   split (random over cells, or whole plates) and a permutation of each split are drawn from
   `--seed`, so every shard mixes wells, plates and treatments. Each shard is written atomically by
   `ShardWriter`, its crops encoded by `--codec` (`fastcell.shard.codecs`); a rerun keeps shards that exist and verify.
   With `--scaling plate-dmso` each plate's DMSO crops are histogrammed first and every crop is
   referenced to its plate's DMSO background and mean as it is written. Channel statistics are exact, from
   per-shard 65,536-bin histograms of the training crops. `cells.parquet` (with each crop's CRC-32),
   `fields.parquet` (every field's cell counts, zero included: an empty field is data, not an
   error) and then `index.json` come last.

The same input, options and seed give byte-identical shards whatever `--workers`. A rerun into a
folder made with a different configuration (options or input tables) is refused unless `--overwrite`,
which builds the new shards in OUT/.staging and swaps them in when complete, removing only files
the old manifest lists (`_prepare_output`, `_swap_in`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fastcell.errors import InputError
from fastcell.io import atomic_path, output_folder, write_json_atomic
from fastcell.pool import process_pool, result_of
from fastcell.remote import as_path, resolved
from fastcell.shard.codecs import CODECS, DEFAULT_CODEC, LEGACY_CODEC
from fastcell.shard.format import (
    CELLS_TABLE_NAME,
    CHECKSUM_COLUMN,
    FIELDS_TABLE_NAME,
    MANIFEST_NAME,
    ShardInfo,
    ShardManifest,
    ShardWriter,
    crop_checksums,
    index_name,
    read_manifest,
    shard_name,
    verify_shard,
    write_manifest,
)
from fastcell.shard.sources import (
    DEFAULT_ROLES,
    Field,
    Locations,
    Screen,
    file_digest,
    load_locations,
    load_screen,
    probe_fields,
    read_field,
)

if TYPE_CHECKING:
    from fastcell.dask_pool import DaskExecutor

WORK_DIR = ".work"
ILLUMINATION_NAME = "illumination.npz"
FIELD_CHUNK = 16  # fields per task of the per-plate passes (illumination, scaling)
SCALING_STRIDE = 4  # the scaling histogram counts every 4th row and column of each corrected field
SHARD_TARGET_BYTES = 256 * 2**20  # default shard size: ~256 MiB of samples
TAR_OVERHEAD_PER_SAMPLE = 3 * 512 + 128  # two member headers, padding, the .npy header
HISTOGRAM_BINS = 65536  # uint16: exact channel statistics from integer histograms
RUN_OPTIONS = ("out", "workers", "dask", "on_error", "overwrite", "keep_work")  # do not change the output
BORDER_MODES = ("skip", "pad")
SCALING_METHODS = ("none", "plate-percentile", "plate-dmso")
SPLIT_METHODS = ("random", "plate")
ERROR_MODES = ("fail", "skip")
_OUR_FILES = re.compile(
    r"^((train|val)-\d{6}\.(tar|idx)|index\.json|cells\.parquet|fields\.parquet|illumination\.npz)$"
)  # the names of shard outputs
STAGING_DIR = ".staging"  # OUT/.staging: the replacement built by --overwrite until it is complete
SWAP_RECORD = ".swap.json"  # in the staging folder: what the swap replaces and brings in


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


@dataclass
class ShardConfig:
    """Everything `fastcell shard` needs; the CLI parses its options into this."""

    source: Path  # a BBBC021-layout folder, a field table CSV or an OME-Zarr plate (local, or a URL)
    out: Path
    locations: Path | None = None  # cell centres table; None: detect nuclei on the DNA channel
    channels: tuple[str, ...] | None = None  # None: BBBC021's three, or the table's image columns
    dna_channel: str | None = None  # None: the channel named like DNA/DAPI/Hoechst
    roles: tuple[str, ...] = DEFAULT_ROLES
    crop_size: int = 96
    border: str = "skip"
    illumination: bool = True
    scaling: str = "none"
    scaling_percentiles: tuple[float, float] = (0.1, 99.9)
    shard_size: int | None = None  # samples per shard; None: ~256 MiB per shard
    codec: str = DEFAULT_CODEC  # how crops are stored: a name in fastcell.shard.codecs.CODECS
    val_fraction: float = 0.0
    split: str = "random"
    seed: int = 0
    workers: int = field(default_factory=default_workers)
    dask: str | None = None  # None: a local process pool of `workers`; else `local:N` or a scheduler address
    on_error: str = "fail"
    overwrite: bool = False
    keep_work: bool = False

    def __post_init__(self) -> None:
        self.source, self.out = as_path(self.source), Path(self.out)  # inputs may be URLs (fastcell.remote)
        self.locations = None if self.locations is None else as_path(self.locations)
        self.channels = None if self.channels is None else tuple(self.channels)
        self.roles = tuple(self.roles)
        self.scaling_percentiles = tuple(self.scaling_percentiles)

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise InputError(message)

        need(self.crop_size >= 2, f"--crop must be at least 2 pixels, got {self.crop_size}")
        need(self.border in BORDER_MODES, f"--border must be one of {BORDER_MODES}, got {self.border!r}")
        need(
            self.scaling in SCALING_METHODS,
            f"--scaling must be one of {SCALING_METHODS}, got {self.scaling!r}",
        )
        lo, hi = self.scaling_percentiles
        need(0 <= lo < hi <= 100, f"scaling percentiles must satisfy 0 <= lo < hi <= 100, got {lo}, {hi}")
        need(self.split in SPLIT_METHODS, f"--split must be one of {SPLIT_METHODS}, got {self.split!r}")
        need(0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        need(self.on_error in ERROR_MODES, f"--on-error must be one of {ERROR_MODES}, got {self.on_error!r}")
        need(self.workers >= 1, f"--workers must be at least 1, got {self.workers}")
        need(
            self.shard_size is None or self.shard_size >= 1,
            f"--shard-size must be >= 1, got {self.shard_size}",
        )
        need(bool(self.roles), "--roles must name at least one role")
        if self.dask is not None:
            from fastcell.dask_pool import check_spec

            check_spec(self.dask)
        need(self.codec in CODECS, f"--codec must be one of {tuple(CODECS)}, got {self.codec!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("source", "out", "locations"):
            d[key] = None if d[key] is None else resolved(d[key])
        for key in ("channels", "roles", "scaling_percentiles"):
            d[key] = None if d[key] is None else list(d[key])
        return d


@dataclass
class ShardResult:
    """What `shard_screen` did: the manifest, counts, resume counters and the time spent per stage."""

    out: Path
    manifest: ShardManifest
    n_fields: int  # fields selected (by role) from the source
    n_cells: int  # samples in the shards, all splits
    fields_processed: int  # fields cropped in this call
    fields_reused: int  # fields whose crops an earlier, interrupted run had finished
    fields_skipped: list[dict]  # {image, plate, well, site, reason}
    fields_empty: int  # fields read and searched in which no cell was found or located (data, not errors)
    shards_written: int
    shards_reused: int  # complete, verified shards of an earlier run
    illumination_computed: bool
    up_to_date: bool  # the folder already held these shards: nothing was done
    # seconds: summed worker time per stage ("read", "illumination", "correct", "detect", "crop", "save",
    # "load", "write", "stats", "scaling") and wall time per pass ("wall_pool_start", "wall_illumination",
    # "wall_scaling", "wall_crops", "wall_shards", "wall_total")
    timings: dict[str, float]


# --- workers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _WorkerContext:
    """Read-only state every worker needs; sent once per process by the pool initializer."""

    out: Path
    illumination: bool
    crop_size: int
    border: str
    dna_index: int
    dna_channel: str
    n_channels: int
    codec: str
    dtypes: tuple  # per channel, the screen's pixel type (`probe_fields`): other bit depths are refused


_CONTEXT: _WorkerContext | None = None


# What the tasks import, loaded before any task runs: scikit-image loads submodules lazily, on first
# attribute access, so the attributes are touched too.
_PRELOAD = {
    "fastcell.shard.pipeline": (),
    "tifffile": (),
    "scipy.ndimage": (),
    "skimage.filters": ("gaussian", "threshold_otsu", "threshold_local"),
    "skimage.feature": ("peak_local_max",),
    "skimage.segmentation": ("watershed",),
    "skimage.transform": ("resize",),
}


def _init_worker(context: _WorkerContext) -> None:
    """Set the worker's context and import what the tasks use (so task timers measure work, not imports)."""
    global _CONTEXT
    _CONTEXT = context
    for name, attributes in _PRELOAD.items():
        module = importlib.import_module(name)
        for attribute in attributes:
            getattr(module, attribute)
    _illumination_of.cache_clear()
    _field_crops.cache_clear()


@lru_cache(maxsize=4)
def _illumination_of(path: str, mtime_ns: int) -> dict[str, np.ndarray]:
    from fastcell.shard.illumination import load_illumination

    return load_illumination(path)


def _plate_illumination(plate: str) -> np.ndarray:
    path = _CONTEXT.out / ILLUMINATION_NAME
    return _illumination_of(str(path), path.stat().st_mtime_ns)[plate]


class _Timer:
    """Accumulates seconds per stage: `with timer("read"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def __call__(self, stage: str) -> _Timer:
        self._stage = stage
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.seconds[self._stage] += time.perf_counter() - self._start


def _illumination_task(plate: str, chunk: int, fields: list[Field]) -> dict:
    """Accumulate one chunk of a plate's fields; per-field read errors are returned, not raised."""
    from fastcell.shard.illumination import IlluminationAccumulator

    timer = _Timer()
    accumulator, shape, errors = None, None, []
    for f in fields:
        try:
            with timer("read"):
                image = read_field(f, _CONTEXT.dtypes)
            if shape is not None and image.shape != shape:
                raise InputError(
                    f"{f.paths[0]}: field {f.key} is {image.shape[1]}x{image.shape[2]}, other fields of plate "
                    f"{plate} are {shape[1]}x{shape[2]}"
                )
        except InputError as err:
            errors.append((f.key, str(err)))
            continue
        with timer("illumination"):
            if accumulator is None:
                shape = image.shape
                accumulator = IlluminationAccumulator(image.shape[0], image.shape[1:])
            accumulator.add(image)
    return {
        "plate": plate,
        "chunk": chunk,
        "accumulator": accumulator,
        "shape": shape,
        "errors": errors,
        "timer": dict(timer.seconds),
    }


def _corrected(f: Field, image: np.ndarray, timer: _Timer) -> np.ndarray:
    """The field divided by its plate's illumination function (unchanged with --no-illum)."""
    from fastcell.shard.illumination import correct_illumination

    with timer("correct"):
        if _CONTEXT.illumination:
            illum = _plate_illumination(f.plate)
            if illum.shape != image.shape:
                raise InputError(
                    f"{f.paths[0]}: field {f.key} is {image.shape[1]}x{image.shape[2]}, the illumination "
                    f"function of plate {f.plate} is {illum.shape[1]}x{illum.shape[2]}"
                )
            image = correct_illumination(image, illum)
    return image


def _scaling_task(plate: str, fields: list[Field]) -> dict:
    """Pixel histogram (every SCALING_STRIDE-th row and column) of a chunk of a plate's corrected fields."""
    from fastcell.shard.illumination import IntensityHistogram

    timer = _Timer()
    histogram, errors = IntensityHistogram(_CONTEXT.n_channels), []
    for f in fields:
        try:
            with timer("read"):
                image = read_field(f, _CONTEXT.dtypes)
            image = _corrected(f, image, timer)
        except InputError as err:
            errors.append((f.key, str(err)))
            continue
        with timer("scaling"):
            histogram.add(image, stride=SCALING_STRIDE)
    return {"plate": plate, "histogram": histogram, "errors": errors, "timer": dict(timer.seconds)}


def _field_paths(out: Path, key: str) -> tuple[Path, Path]:
    folder = out / WORK_DIR / "fields"
    return folder / f"{key}.crops.npy", folder / f"{key}.npz"


def _crop_task(f: Field, centres: np.ndarray | None, scaling: tuple | None) -> dict:
    """Crop one field into the work folder. Returns its timings, or the reason it failed.

    `centres` come from the locations table ((0, 2) when it lists none for this field); None means
    detect nuclei on the illumination-corrected DNA channel (before any intensity scaling). A field
    without cells is data (an empty field, a toxic dose), not a failure: it is saved with no crops.
    """
    from fastcell.shard.crops import extract_crops
    from fastcell.shard.detect import detect_nuclei
    from fastcell.shard.illumination import apply_scaling

    ctx = _CONTEXT
    timer = _Timer()
    try:
        with timer("read"):
            image = read_field(f, ctx.dtypes)
        image = _corrected(f, image, timer)
    except InputError as err:
        return {"key": f.key, "error": str(err), "timer": dict(timer.seconds)}
    if centres is None:  # on the unscaled field: the scaling's clipping would change what is found
        with timer("detect"):
            centres = detect_nuclei(image[ctx.dna_index])
    if scaling is not None:
        with timer("correct"):
            image = apply_scaling(image, np.asarray(scaling[0]), np.asarray(scaling[1]))
    with timer("crop"):
        try:
            result = extract_crops(image, centres, ctx.crop_size, border=ctx.border)
        except ValueError as err:  # centres from a locations table that lie off the field
            return {
                "key": f.key,
                "error": f"{f.paths[0]}: field {f.key}: {err}",
                "timer": dict(timer.seconds),
            }
    crops_path, meta_path = _field_paths(ctx.out, f.key)
    with timer("save"):
        with atomic_path(crops_path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(result.crops, dtype=np.uint16), allow_pickle=False)
        with atomic_path(meta_path) as tmp:  # the completion marker: written last
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    centres=np.asarray(centres, dtype=np.float64)[np.asarray(result.kept, dtype=np.intp)],
                    n_found=np.int64(len(centres)),
                    n_border=np.int64(result.n_border),
                )
    return {"key": f.key, "error": None, "timer": dict(timer.seconds)}


@lru_cache(maxsize=256)
def _field_crops(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def _shard_task(name: str, members: list[tuple[str, int]], ids: np.ndarray, with_histogram: bool,
                dmso_scaling: np.ndarray | None) -> dict:
    """Write one shard, or keep it when an earlier run completed it; returns its pixel histogram,
    the CRC-32 of each crop member (for cells.parquet) and the tar's size.

    `members[i]` = (field key, row in the field's crops) of the sample with id `ids[i]`;
    `dmso_scaling[i]` = its plate's (background, DMSO mean) [2, C] with `--scaling plate-dmso`.
    """
    from fastcell.shard.illumination import apply_dmso_scaling

    ctx = _CONTEXT
    timer = _Timer()
    tar = ctx.out / name
    reused = False
    if tar.is_file():
        try:
            verify_shard(tar, len(ids), ctx.codec)
            reused = True
        except InputError:
            pass  # no index or truncated: write it again
    histogram = np.zeros((ctx.n_channels, HISTOGRAM_BINS), np.int64) if with_histogram else None
    done = {"name": name, "reused": reused}
    if reused:
        done.update(checksums=crop_checksums(tar, ctx.codec), bytes=tar.stat().st_size)
        if histogram is None:
            return {**done, "histogram": None, "timer": {}}
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        writer = None if reused else stack.enter_context(ShardWriter(tar, ctx.codec))
        for i, (cell_id, (key, row)) in enumerate(zip(ids, members, strict=True)):
            with timer("load"):
                crop = np.array(_field_crops(str(_field_paths(ctx.out, key)[0]))[row])
            if dmso_scaling is not None:
                crop = apply_dmso_scaling(crop, *dmso_scaling[i])
            if writer is not None:
                writer.add(int(cell_id), crop)
            if histogram is not None:
                with timer("stats"):
                    for c in range(ctx.n_channels):
                        histogram[c] += np.bincount(crop[c].ravel(), minlength=HISTOGRAM_BINS)
    if not reused:  # adding samples, closing and renaming the tar and its index
        timer.seconds["write"] = time.perf_counter() - start - timer.seconds["load"] - timer.seconds["stats"]
        done.update(checksums=writer.checksums, bytes=tar.stat().st_size)
    return {**done, "histogram": histogram, "timer": dict(timer.seconds)}


# --- the pool -------------------------------------------------------------------------------------


class _Pool:
    """A process pool (or, with one worker, the calling process; or a Dask cluster with `dask`, see
    `fastcell.dask_pool`) yielding task results as they finish."""

    def __init__(self, workers: int, context: _WorkerContext, dask: str | None = None):
        self.workers = workers
        self.context = context
        self.dask = dask
        self._executor: ProcessPoolExecutor | DaskExecutor | None = None
        self._stack = contextlib.ExitStack()
        self.startup_seconds = 0.0
        _init_worker(context)  # with one worker the calling process runs the tasks itself

    def __enter__(self) -> _Pool:
        start = time.perf_counter()  # workers start now, so pass timings measure work
        if self.dask is not None:
            from fastcell.dask_pool import dask_pool

            self._executor = self._stack.enter_context(dask_pool(self.dask, _init_worker, (self.context,)))
            self.workers = self._executor.workers  # keeps 4 tasks per worker thread in flight
        elif self.workers > 1:
            # forkserver: workers fork from a clean server process that imported _PRELOAD once,
            # safe beside the progress bar's thread
            self._executor = self._stack.enter_context(
                process_pool(self.workers, _init_worker, (self.context,), preload=list(_PRELOAD))
            )
        self.startup_seconds = time.perf_counter() - start
        return self

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)

    def run(self, fn: Callable, tasks: list[tuple]) -> Iterator[dict]:
        """fn(*task) for every task, in completion order (at most 4 tasks per worker in flight)."""
        if self._executor is None:
            for task in tasks:
                yield fn(*task)
            return
        pending: set = set()
        position = 0
        while position < len(tasks) or pending:
            while position < len(tasks) and len(pending) < 4 * self.workers:
                pending.add(self._executor.submit(fn, *tasks[position]))
                position += 1
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield result_of(future)


class _Progress:
    """One rich progress bar per pass, or nothing when disabled."""

    def __init__(self, enabled: bool):
        self._progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
            )

    def __enter__(self) -> _Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def track(self, results: Iterator[dict], total: int, description: str) -> Iterator[dict]:
        if self._progress is None:
            yield from results
            return
        task = self._progress.add_task(description, total=total)
        for result in results:
            self._progress.advance(task)
            yield result


# --- the output folder ----------------------------------------------------------------------------


def _config_record(config: ShardConfig, screen: Screen, locations: Locations | None, shard_size: int) -> dict:
    """The configuration as the manifest records it: options, resolved channels, input table digests."""
    record = config.to_dict()
    tables = [*screen.tables, *([locations.path] if locations else [])]
    record.update(
        channels=list(screen.channels),
        dna_channel=screen.dna_channel,
        shard_size=shard_size,
        source_kind=screen.kind,
        inputs={resolved(p): file_digest(p) for p in tables},
    )
    record["hash"] = _config_hash(record)
    return record


def _config_hash(record: dict) -> str:
    """Hash of what determines the output: every option except how the run is carried out."""
    essential = {k: v for k, v in record.items() if k not in (*RUN_OPTIONS, "hash")}
    return hashlib.sha256(json.dumps(essential, sort_keys=True).encode()).hexdigest()[:16]


def _describe_difference(old: dict, new: dict) -> str:
    keys = sorted(
        k for k in set(old) | set(new) if k not in (*RUN_OPTIONS, "hash") and old.get(k) != new.get(k)
    )
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) or "unrecorded settings"


def _listing(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _owned(out: Path) -> set[str]:
    """Names of OUT's entries that fastcell shard wrote: what its manifest lists and, while a run is
    unfinished (its work record exists), the work folder and every file named like a shard output
    (a run refuses to start beside other files of those names, so these are its own)."""
    owned: set[str] = set()
    if (out / MANIFEST_NAME).is_file():
        try:
            owned |= set(read_manifest(out, verify=False).files())
        except InputError as err:
            raise InputError(
                f"{err}; fastcell cannot tell which files of {out} it wrote: choose another folder"
            ) from None
    if (out / WORK_DIR / "config.json").is_file():
        owned |= {WORK_DIR} | {e.name for e in out.iterdir() if _OUR_FILES.match(e.name)}
    return owned


def _previous_config(folder: Path) -> dict | None:
    """The configuration record of what fastcell shard wrote in `folder` (its work record, else its
    manifest's); {} when unreadable; None when there is none."""
    for path, key in ((folder / WORK_DIR / "config.json", None), (folder / MANIFEST_NAME, "config")):
        if path.is_file():
            try:
                record = json.loads(path.read_text())
                record = record.get(key, {}) if key else record
            except (OSError, ValueError, AttributeError):
                return {}
            return {"codec": LEGACY_CODEC, **record}  # recorded before codecs existed: npy
    return None


def _remove(folder: Path, names) -> None:
    """Delete these entries of `folder` (files or the work folder), the manifest first."""
    for name in sorted(names, key=lambda n: n != MANIFEST_NAME):
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _prepare_output(out: Path, record: dict, overwrite: bool) -> tuple[Path, bool]:
    """Decide where this run writes; returns (build folder, whether OUT already holds these complete shards).

    The build folder is OUT, except when --overwrite replaces shards of another configuration: the new
    ones are then built in OUT/.staging and swapped in at the end (`_swap_in`), so the old ones stay
    until their replacement is complete. Files fastcell did not write are never touched: beside them a
    run needs --overwrite (they are kept), and files named like a shard output are refused outright.
    An unfinished run of another configuration that wrote no shard yet (it stopped on a bad option)
    is discarded without asking: its work is fastcell's and of no use to this configuration.
    """
    output_folder(out)
    staging = out / STAGING_DIR
    if (staging / MANIFEST_NAME).is_file():
        _swap_in(out, staging)  # an earlier --overwrite run finished its build but not its swap
    owned = _owned(out)
    foreign = sorted(e.name for e in out.iterdir() if not e.name.startswith(".") and e.name not in owned)
    clashing = [name for name in foreign if _OUR_FILES.match(name)]
    if clashing:
        raise InputError(
            f"{out}: holds {_listing(clashing)}, which no fastcell shard manifest lists (another tool's output?) "
            "and which fastcell shard would replace; choose another folder, or move them away"
        )
    previous = _previous_config(out)
    if previous is None:
        if foreign and not overwrite:
            raise InputError(
                f"{out}: holds files fastcell shard did not write ({_listing(foreign)}); choose an empty folder, "
                "or pass --overwrite to write the shards beside them (they are kept)"
            )
        return out, _resume(out, record)
    if _config_hash(previous) == record["hash"]:
        return out, _resume(out, record)
    if not any(name.endswith((".tar", ".idx")) or name == MANIFEST_NAME for name in owned):
        _remove(out, owned)
        return out, _resume(out, record)
    if not overwrite:
        raise InputError(
            f"{out}: holds shards made with a different configuration ({_describe_difference(previous, record)}); "
            "use --overwrite to replace them (the new shards are built beside them and swapped in when "
            "complete), or choose another folder"
        )
    staged = _previous_config(staging)
    if staged is not None and _config_hash(staged) != record["hash"]:
        shutil.rmtree(staging)  # a replacement begun for yet another configuration: all of it fastcell's
    return staging, _resume(staging, record)


def _resume(folder: Path, record: dict) -> bool:
    """Ready `folder` for this configuration's run: clear interrupted writes and record the configuration;
    True when it already holds exactly these, complete, shards."""
    folder.mkdir(exist_ok=True)
    for entry in [*folder.glob(".*.tmp"), *(folder / WORK_DIR / "fields").glob(".*.tmp")]:
        entry.unlink()  # leftovers of writes an interrupted run never finished
    if (folder / MANIFEST_NAME).is_file():
        try:
            manifest = read_manifest(folder)
            for split in manifest.splits:
                for shard in manifest.split_shards(split):
                    verify_shard(folder / shard.name, shard.count, manifest.codec)
            if not manifest.skipped.get("fields"):
                return True
            # fields skipped last time are tried again: the user may have fixed them
        except InputError:
            pass  # a shard is missing or broken: finish the job below
    write_json_atomic(folder / WORK_DIR / "config.json", record)
    return False


def _swap_in(out: Path, staging: Path) -> None:
    """Replace the previous configuration's outputs in OUT by the complete build in `staging`.

    What is replaced and what comes in are saved in the staging folder before anything is deleted,
    so an interrupted swap is finished by the next run; OUT's old manifest goes first, so OUT never
    lists old shards beside new ones. Files fastcell did not write stay where they are.
    """
    plan_path = staging / SWAP_RECORD
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
    else:
        incoming = [e.name for e in staging.iterdir() if not e.name.startswith(".") or e.name == WORK_DIR]
        plan = {"old": sorted(_owned(out)), "new": sorted(incoming)}
        write_json_atomic(plan_path, plan)
    pending = [name for name in plan["new"] if (staging / name).exists()]
    moved = set(plan["new"]) - set(pending)
    _remove(out, [name for name in plan["old"] if name not in moved])
    for name in sorted(pending, key=lambda n: n == MANIFEST_NAME):  # the manifest last: it marks completion
        os.replace(staging / name, out / name)
    shutil.rmtree(staging)


# --- the passes -----------------------------------------------------------------------------------


@dataclass
class _Run:
    """State shared by the passes of one `shard_screen` call."""

    config: ShardConfig
    screen: Screen
    pool: _Pool
    progress: _Progress
    timer: _Timer
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


PLATE_FUNCTIONS_RECORD = "plate_functions.json"  # fields left out of illumination.npz when it was made


def _plate_functions_reusable(out: Path) -> bool:
    """Whether an existing illumination.npz was made from every field (so a rerun may keep it)."""
    if not (out / ILLUMINATION_NAME).is_file():
        return False
    record = out / WORK_DIR / PLATE_FUNCTIONS_RECORD
    if record.is_file():
        return not json.loads(record.read_text())["skipped"]
    if (out / MANIFEST_NAME).is_file():  # a finished run; its work folder is gone
        return not json.loads((out / MANIFEST_NAME).read_text())["skipped"]["fields"]
    return False  # interrupted between saving it and recording how it was made


def _plate_chunks(fields: list[Field]) -> list[tuple[str, list[Field]]]:
    """(plate, up to FIELD_CHUNK of its fields): the tasks of the per-plate passes, fixed by the input alone."""
    chunks = []
    for plate in sorted({f.plate for f in fields}):
        plate_fields = [f for f in fields if f.plate == plate]
        chunks += [
            (plate, plate_fields[i : i + FIELD_CHUNK]) for i in range(0, len(plate_fields), FIELD_CHUNK)
        ]
    return chunks


def _illumination_pass(run: _Run, fields: list[Field]) -> bool:
    """Compute and save illumination.npz unless an earlier run did; True when computed now."""
    from fastcell.shard.illumination import save_illumination

    path = run.config.out / ILLUMINATION_NAME
    if path.is_file():
        return False
    by_key = {f.key: f for f in fields}
    tasks = [(plate, chunk, members) for chunk, (plate, members) in enumerate(_plate_chunks(fields))]
    parts: dict[str, dict[int, dict]] = defaultdict(dict)
    for result in run.progress.track(run.pool.run(_illumination_task, tasks), len(tasks), "illumination"):
        run.collect(result)
        for key, error in result["errors"]:
            run.failed(by_key[key], error)
        if result["accumulator"] is not None:
            parts[result["plate"]][result["chunk"]] = result
    functions = {}
    for plate in sorted(parts):
        chunks = [parts[plate][i] for i in sorted(parts[plate])]  # fixed merge order
        shapes = {tuple(c["shape"]) for c in chunks}
        if len(shapes) > 1:
            raise InputError(f"plate {plate}: its fields have different shapes {sorted(shapes)}")
        total = chunks[0]["accumulator"]
        for c in chunks[1:]:
            total.merge(c["accumulator"])
        functions[plate] = total.finish()
    save_illumination(path, functions)  # atomic
    return True


def _scaling_pass(run: _Run, fields: list[Field]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per plate and channel (lo, hi): percentiles of the plate's corrected pixels (saved in illumination.npz)."""
    from fastcell.shard.illumination import (
        IntensityHistogram,
        fit_percentile_scaling,
        load_illumination,
        load_scaling,
        save_illumination,
    )

    path = run.config.out / ILLUMINATION_NAME
    if path.is_file():
        saved = load_scaling(path)
        if saved:
            return saved
    by_key = {f.key: f for f in fields}
    tasks = _plate_chunks(fields)
    histograms: dict[str, IntensityHistogram] = {}
    for result in run.progress.track(run.pool.run(_scaling_task, tasks), len(tasks), "intensity scaling"):
        run.collect(result)
        for key, error in result["errors"]:
            run.failed(by_key[key], error)
        if result["plate"] in histograms:
            histograms[result["plate"]].merge(result["histogram"])  # integer counts: any order
        else:
            histograms[result["plate"]] = result["histogram"]
    low, high = run.config.scaling_percentiles
    scaling = {
        plate: fit_percentile_scaling(h, low, high)
        for plate, h in sorted(histograms.items())
        if h.counts.any()
    }
    save_illumination(path, load_illumination(path) if path.is_file() else {}, scaling)
    return scaling


def _crop_pass(
    run: _Run, fields: list[Field], locations: Locations | None, scaling: dict | None
) -> tuple[int, int]:
    """Crop every field not cropped yet; returns (fields cropped now, fields an earlier run cropped)."""
    todo = [f for f in fields if not _field_paths(run.config.out, f.key)[1].is_file()]
    empty = np.zeros((0, 2), np.float64)
    tasks = [
        (
            f,
            None if locations is None else locations.centres.get(f.key, empty),
            None if scaling is None else scaling.get(f.plate),
        )
        for f in todo
    ]
    by_key = {f.key: f for f in fields}
    processed = 0
    for result in run.progress.track(run.pool.run(_crop_task, tasks), len(tasks), "crops (fields)"):
        run.collect(result)
        if result["error"]:
            run.failed(by_key[result["key"]], result["error"])
        else:
            processed += 1
    return processed, len(fields) - len(todo)


FIELD_COLUMNS = ("plate", "well", "site", "batch", "compound", "concentration", "moa", "role", "image")


def _cells_table(run: _Run, fields: list[Field]):
    """(cells, fields): one row per cropped cell, in id order (sorted field keys, then the cell order
    within each field), and one row per field, skipped or not, with its cell counts (zero included):
    `found` cells located or detected, `cells` cropped into the shards, `border` skipped or padded."""
    import pandas as pd

    columns: dict[str, list] = defaultdict(list)
    per_field: dict[str, list] = defaultdict(list)
    for f in fields:
        skipped = run.skipped.get(f.key)
        centres, found, border = np.zeros((0, 2)), 0, 0
        if skipped is None:
            with np.load(_field_paths(run.config.out, f.key)[1]) as meta:
                centres, found, border = meta["centres"], int(meta["n_found"]), int(meta["n_border"])
        n = len(centres)
        for name in ("field", *FIELD_COLUMNS):
            per_field[name].append(f.key if name == "field" else getattr(f, name))
        per_field["status"].append("ok" if skipped is None else "skipped")
        per_field["found"].append(found)
        per_field["cells"].append(n)
        per_field["border"].append(border)
        per_field["reason"].append("" if skipped is None else skipped["reason"])
        columns["field"] += [f.key] * n
        columns["row"] += list(range(n))
        columns["x"] += centres[:, 0].tolist()
        columns["y"] += centres[:, 1].tolist()
        for name in FIELD_COLUMNS:
            columns[name] += [getattr(f, name)] * n
    cells = pd.DataFrame(columns, columns=["field", "row", "x", "y", *FIELD_COLUMNS])
    cells.insert(0, "id", np.arange(len(cells), dtype=np.int64))
    return cells, pd.DataFrame(per_field)


def _assign_splits(cells, config: ShardConfig) -> np.ndarray:
    """Per cell "train" or "val": a seeded draw of cells, or of whole plates with --split plate."""
    split = np.full(len(cells), "train", dtype=object)
    if config.val_fraction <= 0:
        return split
    if config.split == "random":
        n_val = int(round(config.val_fraction * len(cells)))
        split[np.random.default_rng([config.seed, 1]).permutation(len(cells))[:n_val]] = "val"
        return split
    plates = np.array(sorted(cells["plate"].unique()))
    if len(plates) < 2:
        raise InputError(f"--split plate needs at least two plates; the screen has {len(plates)}")
    n_val = min(max(int(round(config.val_fraction * len(plates))), 1), len(plates) - 1)
    val_plates = np.random.default_rng([config.seed, 1]).permutation(plates)[:n_val]
    split[cells["plate"].isin(val_plates).to_numpy()] = "val"
    return split


def _plan_shards(cells, config: ShardConfig, shard_size: int) -> list[tuple[str, str, np.ndarray]]:
    """(split, shard name, ids in sample order): a seeded permutation of each split, cut evenly."""
    plan = []
    for stream, split in enumerate(("train", "val"), start=2):
        ids = cells["id"].to_numpy()[cells["split"].to_numpy() == split]
        if len(ids) == 0:
            if split == "train":
                raise InputError("no training cells: lower --val-fraction or add fields")
            continue
        order = np.random.default_rng([config.seed, stream]).permutation(ids)
        n_shards = -(-len(order) // shard_size)
        for i, chunk in enumerate(np.array_split(order, n_shards)):
            plan.append((split, shard_name(split, i), chunk))
    return plan


def channel_stats_from_histogram(histogram: np.ndarray) -> dict[str, list[float]]:
    """Exact per-channel mean, std, min, max, p01, p99 of uint16 pixels from their (C, 65536) counts.

    Percentiles are nearest-rank: the smallest value with at least q% of the pixels at or below it.
    """
    values = np.arange(histogram.shape[1], dtype=np.float64)
    stats: dict[str, list[float]] = defaultdict(list)
    for counts in histogram:
        n = int(counts.sum())
        mean = float(counts @ values) / n
        stats["mean"].append(mean)
        stats["std"].append(float(np.sqrt((counts @ (values - mean) ** 2) / n)))
        nonzero = np.flatnonzero(counts)
        stats["min"].append(float(nonzero[0]))
        stats["max"].append(float(nonzero[-1]))
        cumulative = np.cumsum(counts)
        for name, q in (("p01", 0.01), ("p99", 0.99)):
            stats[name].append(float(np.searchsorted(cumulative, max(1, int(np.ceil(q * n))))))
    return dict(stats)


PLAN_COLUMNS = ["id", "shard", "plate", "well", "site", "x", "y"]


def _remove_stale_shards(out: Path, cells) -> None:
    """Delete shards an earlier run wrote for a different set of cells (e.g. before a skipped field was fixed).

    Shards are kept on a rerun only when they were planned from the same cells: the plan digest in
    `.work/plan.json` (or, after a finished run, the cell table) must match; when neither exists,
    no shard on disk can be trusted.
    """
    digest = hashlib.sha256(cells[PLAN_COLUMNS].to_csv(index=False).encode()).hexdigest()
    plan_file = out / WORK_DIR / "plan.json"
    if plan_file.is_file():
        same = json.loads(plan_file.read_text()).get("digest") == digest
    elif (out / CELLS_TABLE_NAME).is_file():
        import pandas as pd

        old = pd.read_parquet(out / CELLS_TABLE_NAME)
        same = list(old.columns[: len(CELL_COLUMNS)]) == list(CELL_COLUMNS) and old[PLAN_COLUMNS].equals(
            cells[PLAN_COLUMNS].reset_index(drop=True)
        )
    else:
        same = False
    if not same:
        for entry in out.iterdir():
            if entry.suffix in (".tar", ".idx") and _OUR_FILES.match(entry.name):
                entry.unlink()
    write_json_atomic(plan_file, {"digest": digest})


def _dmso_scaling_pass(run: _Run, cells) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per plate and channel (background, DMSO mean) of the plate's DMSO crops (`--scaling plate-dmso`)."""
    from fastcell.shard.illumination import IntensityHistogram, fit_dmso_scaling

    dmso = cells[cells["role"] == "dmso"]
    missing = sorted(set(cells["plate"]) - set(dmso["plate"]))
    if missing:
        raise InputError(
            f"{run.config.source}: --scaling plate-dmso needs DMSO cells on every plate; none on "
            f"{', '.join(missing[:5])}{' and more' if len(missing) > 5 else ''} (include the dmso role, or "
            f"use --scaling none or plate-percentile)"
        )
    histograms: dict[str, IntensityHistogram] = {}
    groups = dmso.groupby(["plate", "field"], sort=True)
    for (plate, key), rows in run.progress.track(iter(groups), groups.ngroups, "DMSO reference"):
        crops = _field_crops(str(_field_paths(run.config.out, key)[0]))[np.sort(rows["row"].to_numpy())]
        n, c, size, _ = crops.shape
        tiled = np.ascontiguousarray(crops.transpose(1, 0, 2, 3)).reshape(c, n * size, size)
        histograms.setdefault(plate, IntensityHistogram(c)).add(tiled)
    return {plate: fit_dmso_scaling(h) for plate, h in sorted(histograms.items())}


def _shard_pass(
    run: _Run, cells, plan, dmso_scaling: dict[str, tuple[np.ndarray, np.ndarray]] | None
) -> tuple[dict[str, list[ShardInfo]], dict[str, list[float]], int, int]:
    """Write the planned shards; returns the manifest's splits, the channel statistics and counts, and
    adds each crop's CRC-32 to `cells`."""
    _remove_stale_shards(run.config.out, cells)
    fields_of = cells["field"].to_numpy()
    rows_of = cells["row"].to_numpy()
    per_cell = None
    if dmso_scaling is not None:
        plates = cells["plate"].to_numpy()
        per_cell = np.stack([np.stack(dmso_scaling[p]) for p in plates])  # [n_cells, 2, C]
    tasks = [
        (name, list(zip(fields_of[ids].tolist(), rows_of[ids].tolist(), strict=True)), ids, split == "train",
         None if per_cell is None else per_cell[ids])
        for split, name, ids in plan
    ]
    histogram = np.zeros((len(run.screen.channels), HISTOGRAM_BINS), np.int64)
    written = reused = 0
    ids_of = {name: ids for _, name, ids in plan}
    checksums, sizes = np.zeros(len(cells), np.int64), {}
    for result in run.progress.track(run.pool.run(_shard_task, tasks), len(tasks), "shards"):
        run.collect(result)
        reused += result["reused"]
        written += not result["reused"]
        checksums[ids_of[result["name"]]] = result["checksums"]
        sizes[result["name"]] = result["bytes"]
        if result["histogram"] is not None:
            histogram += result["histogram"]  # integer counts: exact in any order
    cells[CHECKSUM_COLUMN] = checksums
    splits: dict[str, list[ShardInfo]] = defaultdict(list)
    for split, name, ids in plan:
        splits[split].append(ShardInfo(name=name, index=index_name(name), count=len(ids), bytes=sizes[name]))
    return dict(splits), channel_stats_from_histogram(histogram), written, reused


CELL_COLUMNS = ("id", "split", "shard", "plate", "well", "site", "batch", "compound", "concentration", "moa",
                "role", "x", "y", "image")  # fmt: skip


def _write_table(table, path: Path) -> None:
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)


def auto_shard_size(n_channels: int, crop_size: int) -> int:
    """Samples per shard for ~SHARD_TARGET_BYTES shards (4,712 for 3 x 96 x 96 crops, 2,861 for 5 x 96 x 96)."""
    per_sample = n_channels * crop_size * crop_size * 2 + TAR_OVERHEAD_PER_SAMPLE
    return max(1, SHARD_TARGET_BYTES // per_sample)


def shard_screen(config: ShardConfig, *, progress: bool = False) -> ShardResult:
    """Turn the fields of a screen into single-cell crops in WebDataset shards (see the module doc)."""
    started = time.perf_counter()
    config.validate()
    out = Path(config.out)
    screen = load_screen(config.source, config.channels, config.dna_channel)
    fields = screen.select(config.roles)
    if not fields:
        raise InputError(f"{config.source}: no fields with role(s) {', '.join(config.roles)}")
    dtypes, (height, width) = probe_fields(fields)
    if config.border == "skip" and config.crop_size > min(height, width):
        raise InputError(
            f"{fields[0].paths[0]}: --crop {config.crop_size} is larger than the fields ({height}x{width} px): "
            "every cell would be a border cell; lower --crop, or keep border cells with --border pad"
        )
    locations = load_locations(config.locations, screen) if config.locations else None
    shard_size = config.shard_size or auto_shard_size(len(screen.channels), config.crop_size)
    record = _config_record(config, screen, locations, shard_size)
    build, up_to_date = _prepare_output(out, record, config.overwrite)
    if up_to_date:
        manifest = read_manifest(out)
        return ShardResult(
            out=out, manifest=manifest, n_fields=len(fields),
            n_cells=sum(manifest.count(s) for s in manifest.splits), fields_processed=0, fields_reused=0,
            fields_skipped=manifest.skipped.get("fields", []), fields_empty=manifest.skipped.get("empty_fields", 0),
            shards_written=0, shards_reused=sum(len(v) for v in manifest.splits.values()),
            illumination_computed=False, up_to_date=True, timings={"wall_total": time.perf_counter() - started},
        )  # fmt: skip

    config = replace(config, out=build)  # OUT itself, or OUT/.staging when --overwrite replaces other shards
    context = _WorkerContext(
        out=build, illumination=config.illumination, crop_size=config.crop_size, border=config.border,
        dna_index=screen.dna_index, dna_channel=screen.dna_channel, n_channels=len(screen.channels),
        codec=config.codec, dtypes=dtypes,
    )  # fmt: skip
    walls: dict[str, float] = {}
    scaling_on = config.scaling == "plate-percentile"
    with _Pool(config.workers, context, config.dask) as pool, _Progress(progress) as bars:
        run = _Run(config, screen, pool, bars, _Timer())

        def timed(name: str, fn: Callable, *args):
            t = time.perf_counter()
            value = fn(*args)
            walls[f"wall_{name}"] = time.perf_counter() - t
            return value

        illumination_computed = False
        if (config.illumination or scaling_on) and not _plate_functions_reusable(build):
            # made while some fields were unreadable (they may be fixed now), or never finished:
            # compute again, and the crops made with the old functions too
            (build / ILLUMINATION_NAME).unlink(missing_ok=True)
            shutil.rmtree(build / WORK_DIR / "fields", ignore_errors=True)
        if config.illumination:
            illumination_computed = timed("illumination", _illumination_pass, run, fields)
        scaling = None
        if scaling_on:
            scaling = timed("scaling", _scaling_pass, run, run.usable(fields))
        if config.illumination or scaling_on:
            write_json_atomic(build / WORK_DIR / PLATE_FUNCTIONS_RECORD, {"skipped": sorted(run.skipped)})
        processed, reused = timed("crops", _crop_pass, run, run.usable(fields), locations, scaling)
        if not run.usable(fields):
            raise InputError(
                f"{config.source}: every field was skipped; see the reasons with --on-error fail"
            )
        cells, per_field = _cells_table(run, fields)
        if len(cells) == 0:
            raise InputError(
                f"{config.source}: no cell is far enough from the field borders; try --border pad"
                if per_field["found"].sum()
                else f"{config.source}: no cells in any of the {len(fields)} fields (nuclei detection on channel "
                f"{screen.dna_channel} found none{'; the locations table lists none' if locations else ''})"
            )
        cells["split"] = _assign_splits(cells, config)
        plan = _plan_shards(cells, config, shard_size)
        cells["shard"] = ""
        for _, name, ids in plan:
            cells.loc[ids, "shard"] = name
        dmso_scaling = None
        if config.scaling == "plate-dmso":
            dmso_scaling = timed("scaling", _dmso_scaling_pass, run, cells)
        splits, stats, written, kept = timed("shards", _shard_pass, run, cells, plan, dmso_scaling)

    skipped_cells = {"border": int(per_field["border"].sum())}
    if locations is not None:
        skipped_cells["invalid_location"] = locations.n_invalid
    scaling_record: dict[str, Any] = {"method": config.scaling}
    if scaling is not None:
        scaling_record.update(
            percentiles=list(config.scaling_percentiles),
            plates={p: {"lo": lo.tolist(), "hi": hi.tolist()} for p, (lo, hi) in sorted(scaling.items())},
        )
    if dmso_scaling is not None:
        from fastcell.shard.illumination import DMSO_BACKGROUND_PERCENTILE, DMSO_LEVEL, DMSO_PEDESTAL

        scaling_record.update(
            background_percentile=DMSO_BACKGROUND_PERCENTILE, pedestal=DMSO_PEDESTAL, level=DMSO_LEVEL,
            plates={p: {"background": bg.tolist(), "dmso_mean": mean.tolist()}
                    for p, (bg, mean) in dmso_scaling.items()},
        )
    n_empty = int(((per_field["status"] == "ok") & (per_field["cells"] == 0)).sum())
    manifest = ShardManifest(
        channels=list(screen.channels),
        crop_size=config.crop_size,
        splits=splits,
        channel_stats=stats,
        illumination=ILLUMINATION_NAME if config.illumination else None,
        scaling=scaling_record,
        skipped={"fields": [run.skipped[k] for k in sorted(run.skipped)], "cells": skipped_cells,
                 "empty_fields": n_empty},
        config=record,
        codec=config.codec,
        fields_table=FIELDS_TABLE_NAME,
    )
    _write_table(cells[[*CELL_COLUMNS, CHECKSUM_COLUMN]], build / CELLS_TABLE_NAME)
    _write_table(per_field, build / FIELDS_TABLE_NAME)
    write_manifest(build, manifest)  # last: its presence marks the folder complete
    if not config.keep_work:
        shutil.rmtree(build / WORK_DIR, ignore_errors=True)
    if build != out:
        _swap_in(out, build)
    manifest.root = out
    walls["wall_total"] = time.perf_counter() - started
    return ShardResult(
        out=out, manifest=manifest, n_fields=len(fields), n_cells=len(cells), fields_processed=processed,
        fields_reused=reused, fields_skipped=manifest.skipped["fields"], fields_empty=n_empty,
        shards_written=written, shards_reused=kept, illumination_computed=illumination_computed,
        up_to_date=False,
        timings={**dict(sorted(run.timer.seconds.items())), "wall_pool_start": pool.startup_seconds, **walls},
    )  # fmt: skip
