"""`fastcell embed`: one embedding per cell from a trained (or untrained) encoder, written with its metadata.

    EMB/
      embeddings.npy   float32 (or float16) [N, D]; row i is the cell in row i of cells.parquet
      ids.npy          int64 [N]: the cell id of each row (eval checks cells.parquet against it)
      cells.parquet    the shards' cell table for the embedded cells, sorted by id
      embed.json       what made them: run, checkpoint (SHA-256, step), shards (manifest and cells
                       table SHA-256), model, precision, timings; written last: the folder is complete
      chunks/          (while running) part-00000.npy + part-00000.ids.npy, ... and spec.json

Cells are embedded through the eval loader (`fastcell.loaders.create_eval_loader`: deterministic
order, every sample once) under mixed precision on GPUs (bf16 where supported, else fp16; on the CPU
bf16 only where it has native bf16 units, else fp32: `--precision`). Features are written in chunks of
`chunk_size` cells, each atomically; a rerun with the same settings skips the model on complete chunks
(the loader still reads them, and their ids are checked against the stored ones), so an interrupted run
resumes. The final files are assembled at
the end, atomically, and the chunks removed. A rerun on a finished folder with the same settings
and inputs returns at once; when the settings or inputs differ (the run trained further, the
shards were re-made) it refuses, naming what changed, unless --overwrite, which recomputes and
replaces the old files only once the new ones are complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fastcell import __version__
from fastcell.errors import EnvironmentProblem, FastcellError, InputError, without_worker_traceback
from fastcell.io import atomic_path, check_output_folder, sha256_of, write_json_atomic
from fastcell.loaders import BACKENDS
from fastcell.precision import PRECISIONS
from fastcell.precision import autocast_dtype as precision_dtype
from fastcell.settings import setting, validate
from fastcell.train.encoders import ARCHS, FEATURE_DIMS, STEMS

if TYPE_CHECKING:
    pass

OUTPUT_DTYPES = ("float32", "float16")
DEVICES = ("auto", "cpu", "cuda")
SPEC_NAME = "spec.json"
IDS_NAME = "ids.npy"


@dataclass
class EmbedConfig:
    """Settings of `fastcell embed` (see its --help); types and ranges checked when made."""

    run: Path | None  # a training run folder or checkpoint; None only with random_init or handcrafted
    shards: Path
    out: Path
    projection: bool = False  # the projection head's output instead of the pooled encoder features
    random_init: bool = False  # an untrained network of the run's architecture (or arch/stem below)
    handcrafted: bool = False  # classical per-channel intensity/texture features instead of a network
    arch: str = setting("resnet18", str, choices=ARCHS)  # architecture for random_init without a run
    stem: str = setting("standard", str, choices=STEMS)
    batch_size: int = setting(512, int, low=1)
    backend: str = setting("dali", str, choices=BACKENDS)  # eval loader
    device: str = setting("auto", str, choices=DEVICES)
    precision: str = setting("auto", str, choices=PRECISIONS)
    dtype: str = setting("float32", str, choices=OUTPUT_DTYPES)  # of embeddings.npy
    chunk_size: int = setting(65536, int, low=1)
    split: str | None = None  # None: every split of the shards
    crop: int | None = setting(None, int, low=1, optional=True)  # centre crop given to the model; None: all
    num_workers: int = setting(2, int, low=0, option="--workers")  # loader threads / processes
    seed: int = setting(0, int, low=0)  # random_init weights
    overwrite: bool = False  # recompute when the folder holds embeddings or chunks of other inputs
    progress: bool = True

    def __post_init__(self) -> None:
        validate(self)


def embed_cells(
    forward: Callable, loader: Iterable, *, device, autocast_dtype=None, skip: Callable[[int, int], bool] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield (ids int64 [B], features float32 [B, D]) for each (images, ids) batch of `loader`.

    `forward` maps images to features (e.g. `model.encoder`). `skip(start_row, n)` -> True yields
    (ids, None) without running the model: rows already embedded by an earlier run.
    """
    import torch

    row = 0
    with torch.inference_mode():
        for images, ids in loader:
            ids_np = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids, dtype=np.int64).reshape(-1)
            if skip is not None and skip(row, len(ids_np)):
                yield ids_np, None
            else:
                images = images.to(device, non_blocking=True)
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):
                    features = forward(images)
                yield ids_np, features.float().cpu().numpy()
            row += len(ids_np)


def _reraised_without_worker_traceback(batches: Iterator) -> Iterator:
    """The batches; a loader worker's FastcellError re-raised with its own message only."""
    try:
        yield from batches
    except FastcellError as err:
        raise without_worker_traceback(err) from None


def load_network(cfg: EmbedConfig, channels: list[str]):
    """(model with .encoder and .projector, description) from the run, or freshly initialised, for shards of
    `channels`: InputError when the run's trained weights were trained on other channels, or on these in another
    order (each input channel of the first convolution would read another stain)."""
    import torch

    from fastcell.train.checkpoint import load_trained, untrained_like
    from fastcell.train.model import SimCLR, create_encoder

    if cfg.run is None and not cfg.random_init:
        raise InputError("embed needs a run folder or checkpoint (or --random-init)")
    if not cfg.random_init:
        model, config, identity = load_trained(cfg.run)
        described = {"run": str(cfg.run), "arch": config.arch, "stem": config.stem, "trained": True,
                     "checkpoint_step": identity["step"], "checkpoint_sha256": identity["sha256"]}
    else:
        torch.manual_seed(cfg.seed)
        if cfg.run is not None:
            model, config = untrained_like(cfg.run)
            described = {"run": str(cfg.run), "arch": config.arch, "stem": config.stem}
        else:
            model = SimCLR(create_encoder(cfg.arch, len(channels), cfg.stem), FEATURE_DIMS[cfg.arch])
            described = {"run": None, "arch": cfg.arch, "stem": cfg.stem}
        described |= {"trained": False, "seed": cfg.seed}
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    if first_conv.in_channels != len(channels):
        raise InputError(f"{cfg.shards}: the shards have {len(channels)} channels, the model takes "
                         f"{first_conv.in_channels}")
    if not cfg.random_init and config.channels and list(config.channels) != list(channels):  # random weights: any
        raise InputError(f"{cfg.shards}: the shards' channels are {', '.join(channels)}; {cfg.run} was trained on "
                         f"{', '.join(config.channels)} (in that order)")
    return model.eval(), described


def same_work(old: dict, new: dict) -> bool:
    """Whether two embed specs describe the same work wherever its inputs lie: equal but for the paths of the run
    and the shards (a project folder moved or copied elsewhere), whose contents the checkpoint's and the shards'
    SHA-256 identify."""
    def located_nowhere(spec: dict) -> dict:
        model = spec.get("model")
        model = {**model, "run": None} if isinstance(model, dict) else model
        return {**spec, "run": None, "shards": None, "model": model}

    return located_nowhere(old) == located_nowhere(new)


def read_spec(path: Path) -> dict:
    """A JSON file fastcell wrote (embed.json, chunks/spec.json); InputError naming it when damaged."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable ({err}); remove it or rerun with --overwrite") from err


class ChunkStore:
    """Resumable chunked output: chunks/part-NNNNN.npy (features) + part-NNNNN.ids.npy, and spec.json."""

    def __init__(self, folder: Path, spec: dict, chunk_size: int, dtype: str, overwrite: bool):
        self.folder, self.chunk_size, self.dtype = folder, chunk_size, dtype
        spec_path = folder / SPEC_NAME
        if spec_path.is_file() and not same_work(old := read_spec(spec_path), spec):
            if not overwrite:
                raise InputError(
                    f"{folder}: chunks from a run with other inputs or settings ({'; '.join(spec_changes(old, spec))}); "
                    "use another --out or --overwrite"
                )
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(spec_path, spec)
        self.complete = 0
        while self._readable(self.complete):
            self.complete += 1
        self._stored_ids: dict[int, np.ndarray] = {}

    def _readable(self, i: int) -> bool:
        """Whether chunk `i` is complete and whole: both files there, and as many rows of ids as of features. The
        first chunk that is not, and every one after it, is computed (and written over) again."""
        if not (self._ids_path(i).is_file() and self._features_path(i).is_file()):
            return False
        try:
            ids, features = np.load(self._ids_path(i), mmap_mode="r"), np.load(self._features_path(i), mmap_mode="r")
        except (OSError, ValueError, EOFError):
            return False
        return ids.ndim == 1 and features.ndim == 2 and len(ids) == len(features) > 0

    def _features_path(self, i: int) -> Path:
        return self.folder / f"part-{i:05d}.npy"

    def _ids_path(self, i: int) -> Path:
        return self.folder / f"part-{i:05d}.ids.npy"

    @property
    def done_rows(self) -> int:
        return self.complete * self.chunk_size

    def stored_ids(self, start: int, n: int) -> np.ndarray:
        """Ids of rows [start, start + n) of the complete chunks."""
        parts = []
        for i in range(start // self.chunk_size, (start + n - 1) // self.chunk_size + 1):
            if i not in self._stored_ids:
                self._stored_ids = {i: np.load(self._ids_path(i))}
            lo = max(start - i * self.chunk_size, 0)
            hi = min(start + n - i * self.chunk_size, self.chunk_size)
            parts.append(self._stored_ids[i][lo:hi])
        return np.concatenate(parts)

    def write(self, index: int, ids: np.ndarray, features: np.ndarray) -> None:
        """Write chunk `index` (ids last: a chunk is complete when both files exist)."""
        with atomic_path(self._features_path(index)) as tmp, open(tmp, "wb") as f:
            np.save(f, features.astype(self.dtype))
        with atomic_path(self._ids_path(index)) as tmp, open(tmp, "wb") as f:
            np.save(f, ids.astype(np.int64))

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        i = 0
        while self._ids_path(i).is_file():
            yield np.load(self._ids_path(i)), np.load(self._features_path(i), mmap_mode="r")
            i += 1


def assemble(store: ChunkStore, cells, out: Path) -> tuple[int, int]:
    """Write embeddings.npy (rows sorted by cell id) and the matching cells.parquet; return (N, D)."""
    import pandas as pd

    all_ids = np.concatenate([ids for ids, _ in store.chunks()])
    if len(np.unique(all_ids)) != len(all_ids):
        raise InputError(f"{out}: the loader yielded some cells twice ({len(all_ids)} rows, "
                         f"{len(np.unique(all_ids))} distinct ids)")
    table = cells.set_index("id", drop=False)
    missing_from_table = np.setdiff1d(all_ids, table.index.to_numpy())
    if missing_from_table.size:
        raise InputError(f"{out}: {missing_from_table.size} embedded ids are not in the shards' cells.parquet "
                         f"(e.g. {missing_from_table[:3].tolist()})")
    if len(all_ids) != len(cells):
        raise InputError(f"{out}: the loader yielded {len(all_ids)} cells, the cells table has {len(cells)}")
    sorted_ids = np.sort(all_ids)
    dim = next(store.chunks())[1].shape[1]
    # The three files are written beside the old ones and renamed together at the end; embed.json,
    # which marks the folder complete, goes first and is rewritten last by the caller.
    with ExitStack() as stack:
        tmp_matrix, tmp_ids, tmp_cells = (stack.enter_context(atomic_path(out / name))
                                          for name in ("embeddings.npy", IDS_NAME, "cells.parquet"))
        matrix = np.lib.format.open_memmap(tmp_matrix, mode="w+", dtype=store.dtype, shape=(len(all_ids), dim))
        for ids, features in store.chunks():
            matrix[np.searchsorted(sorted_ids, ids)] = features
        matrix.flush()
        del matrix
        with open(tmp_ids, "wb") as f:  # np.save on a path would add ".npy" to the temporary name
            np.save(f, sorted_ids)
        pd.DataFrame(table.loc[sorted_ids]).reset_index(drop=True).to_parquet(tmp_cells, index=False)
        (out / "embed.json").unlink(missing_ok=True)
    return len(all_ids), dim


def check_row_ids(folder: Path, cells) -> None:
    """InputError when the rows of `folder`'s cells table are not the cells of its embeddings' rows.

    `embed` stores the cell id of every embedding row in ids.npy; a cells.parquet reordered,
    filtered or swapped for another afterwards no longer matches it. Folders without ids.npy
    (made by hand or by older fastcell) are not checked.
    """
    ids_path = folder / IDS_NAME
    if not ids_path.is_file():
        return
    try:
        ids = np.load(ids_path)
    except (OSError, ValueError, EOFError) as err:
        raise InputError(f"{ids_path}: cannot read ({err})") from err
    if "id" not in cells.columns:
        raise InputError(f"{folder / 'cells.parquet'}: no 'id' column, so its rows cannot be matched to {ids_path}")
    table_ids = cells["id"].to_numpy()
    if len(table_ids) != len(ids) or not np.array_equal(table_ids, ids):
        n_bad = len(ids) if len(table_ids) != len(ids) else int((table_ids != ids).sum())
        raise InputError(
            f"{folder / 'cells.parquet'}: its rows are not the cells of the embeddings' rows ({n_bad} of {len(ids)} "
            f"differ from {IDS_NAME}; was it reordered, filtered or replaced?); rerun `fastcell embed` or restore it"
        )


def input_identity(source: Path) -> dict:
    """What a report was computed from: an embed folder's recorded inputs (checkpoint and shards
    SHA-256, step) and the SHA-256 of its ids, or the SHA-256 of a profile table."""

    if source.is_dir():
        spec = read_spec(source / "embed.json").get("spec", {}) if (source / "embed.json").is_file() else {}
        ids = [source / IDS_NAME] if (source / IDS_NAME).is_file() else []
        return {"embed_folder": str(source.resolve()), "model": spec.get("model"),
                "shards_sha256": spec.get("shards_sha256"), "ids_sha256": sha256_of(ids) if ids else None}
    return {"table": str(source.resolve()), "sha256": sha256_of([source])}


def spec_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'name: old -> new' for every (nested) entry of two specs that differs."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += spec_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def run_embed(cfg: EmbedConfig, loader_factory: Callable | None = None) -> dict:
    """Embed every cell of `cfg.shards` (or of one split) into `cfg.out`; returns embed.json's content.

    `loader_factory(shard_dir, batch_size, backend=, device=, dtype=, split=, crop=, num_workers=)`
    defaults to `fastcell.loaders.create_eval_loader`; tests pass a fake one.
    """
    import pandas as pd
    import torch
    from tqdm import tqdm

    from fastcell.format.folder import MANIFEST_NAME, read_manifest, read_manifest_bytes

    started = time.perf_counter()
    out = Path(cfg.out)
    check_output_folder(out, "embeddings.npy, ids.npy, cells.parquet and embed.json")
    if (out / MANIFEST_NAME).is_file():  # its cells.parquet would be replaced by the embedded cells' table
        raise InputError(f"{out}: holds shards ({MANIFEST_NAME}); --out names a folder of its own for the embeddings")
    # index.json and cells.parquet are read once each: parsed from the bytes hashed into shards_sha256
    manifest_bytes = read_manifest_bytes(cfg.shards)
    manifest = read_manifest(cfg.shards, data=manifest_bytes)
    try:
        cells_bytes = manifest.cells_table.read_bytes()
    except OSError as err:
        raise InputError(f"{manifest.cells_table}: cannot read ({err.strerror or err})") from err
    cells = pd.read_parquet(io.BytesIO(cells_bytes))
    shards_digest = hashlib.sha256(manifest_bytes)
    shards_digest.update(cells_bytes)  # as sha256_of([index.json, cells.parquet]), which earlier runs recorded
    if cfg.split is not None:
        manifest.split_shards(cfg.split)  # a clear error for an unknown split
        cells = cells[cells["split"] == cfg.split]
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise EnvironmentProblem("--device cuda: no CUDA GPU is visible to torch on this machine; "
                                 "use --device cpu (or auto, which takes the GPU when there is one)")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if cfg.handcrafted:
        from fastcell.evaluate.handcrafted import feature_names, handcrafted_features

        autocast_dtype, forward = None, handcrafted_features
        described = {"handcrafted": feature_names(manifest.channels)}
    else:
        autocast_dtype = precision_dtype(cfg.precision, device)
        model, described = load_network(cfg, list(manifest.channels))
        model = model.to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        forward = (lambda x: model.projector(model.encoder(x))) if cfg.projection else model.encoder

    spec = {"run": str(cfg.run), "shards": str(Path(cfg.shards).resolve()),
            "shards_sha256": shards_digest.hexdigest(),
            "projection": cfg.projection,
            "random_init": cfg.random_init, "handcrafted": cfg.handcrafted, "model": described, "split": cfg.split, "crop": cfg.crop,
            "chunk_size": cfg.chunk_size, "dtype": cfg.dtype, "n_cells": len(cells),
            "precision": str(autocast_dtype).replace("torch.", "") if autocast_dtype else "fp32"}
    finished = out / "embed.json"
    if finished.is_file() and (out / "embeddings.npy").is_file() and not cfg.overwrite:
        previous = read_spec(finished)
        if same_work(previous.get("spec") or {}, spec):
            return previous | {"cells_embedded_this_run": 0}
        raise InputError(
            f"{out}: holds embeddings of other inputs or settings ({'; '.join(spec_changes(previous.get('spec') or {}, spec))}); "
            "pass --overwrite to recompute them (the old files stay until the new ones are complete) or use another --out"
        )
    store = ChunkStore(out / "chunks", spec, cfg.chunk_size, cfg.dtype, cfg.overwrite)

    if loader_factory is None:
        from fastcell.loaders import create_eval_loader as loader_factory
    loader = loader_factory(cfg.shards, cfg.batch_size, backend=cfg.backend, device=device,
                            dtype=torch.float32, split=cfg.split, crop=cfg.crop, num_workers=cfg.num_workers)
    buffer_ids: list[np.ndarray] = []
    buffer_features: list[np.ndarray] = []
    row, chunk_index, computed = 0, store.complete, 0
    compute_started = time.perf_counter()
    bar = tqdm(total=len(cells), unit="cell", desc="embed", disable=not cfg.progress, initial=0)
    batches = embed_cells(forward, loader, device=device, autocast_dtype=autocast_dtype,
                          skip=lambda start, n: start + n <= store.done_rows)
    for ids, features in _reraised_without_worker_traceback(batches):
        done = max(0, min(len(ids), store.done_rows - row))  # rows already in complete chunks
        if done and not np.array_equal(store.stored_ids(row, done), ids[:done]):
            raise InputError(f"{store.folder}: the loader order differs from the stored chunks; rerun with --overwrite")
        if features is not None:
            buffer_ids.append(ids[done:])
            buffer_features.append(features[done:])
            computed += len(ids) - done
        row += len(ids)
        bar.update(len(ids))
        while sum(map(len, buffer_ids)) >= cfg.chunk_size:
            chunk_ids, chunk_features = np.concatenate(buffer_ids), np.concatenate(buffer_features)
            store.write(chunk_index, chunk_ids[: cfg.chunk_size], chunk_features[: cfg.chunk_size])
            buffer_ids, buffer_features = [chunk_ids[cfg.chunk_size:]], [chunk_features[cfg.chunk_size:]]
            chunk_index += 1
    bar.close()
    if buffer_ids and sum(map(len, buffer_ids)):
        store.write(chunk_index, np.concatenate(buffer_ids), np.concatenate(buffer_features))
    compute_seconds = time.perf_counter() - compute_started
    n, dim = assemble(store, cells, out)
    info = {
        "n_cells": n, "dim": dim, "dtype": cfg.dtype,
        "features": "handcrafted" if cfg.handcrafted else ("projection" if cfg.projection else "encoder"),
        "model": described, "device": str(device),
        "precision": spec["precision"], "cells_embedded_this_run": computed,
        "seconds": round(time.perf_counter() - started, 3),
        "cells_per_second": round(computed / compute_seconds, 1) if compute_seconds > 0 else None,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "spec": spec, "created_by": f"fastcell {__version__}",
    }
    write_json_atomic(finished, info)
    shutil.rmtree(store.folder)
    return info
