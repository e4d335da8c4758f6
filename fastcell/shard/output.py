"""The output folder of `fastcell shard`: which of its files are ours, resuming an interrupted run, and
`--overwrite`, which builds the new shards in OUT/.staging and swaps them in when complete, removing
only files the old manifest lists."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastcell.errors import InputError
from fastcell.format.codecs import LEGACY_CODEC
from fastcell.format.folder import MANIFEST_NAME, ShardManifest, read_manifest, verify_shard
from fastcell.io import output_folder, remove_unfinished_writes, sha256_of, write_json_atomic
from fastcell.shard.config import config_hash, describe_difference, moved_only

WORK_DIR = ".work"  # per-field crops and records of an unfinished run
ILLUMINATION_NAME = "illumination.npz"
OUR_FILES = re.compile(
    r"^((train|val)-\d{6}\.(tar|idx)|index\.json|cells\.parquet|fields\.parquet|illumination\.npz)$"
)  # the names of shard outputs
STAGING_DIR = ".staging"  # OUT/.staging: the replacement built by --overwrite until it is complete
SWAP_RECORD = ".swap.json"  # in the staging folder: what the swap replaces and brings in, for which build


def field_paths(out: Path, key: str) -> tuple[Path, Path]:
    """A field's crops and its completion marker (centres and counts) in the work folder."""
    folder = out / WORK_DIR / "fields"
    return folder / f"{key}.crops.npy", folder / f"{key}.npz"


def _listing(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def missing_outputs(folder: Path, manifest: ShardManifest) -> list[str]:
    """The files `manifest` lists (shards, tables, illumination.npz) that `folder` lacks."""
    return [name for name in manifest.files() if not (folder / name).is_file()]


def orphaned_outputs(out: Path) -> list[str]:
    """Names of the shard outputs in `out` when it holds some beside neither a manifest nor a work record: most
    likely a fastcell shard folder whose index.json was deleted (a cells.parquet alone may be an embedding's)."""
    if (out / MANIFEST_NAME).exists() or (out / WORK_DIR / "config.json").is_file():
        return []
    names = sorted(e.name for e in out.iterdir() if OUR_FILES.match(e.name))
    return names if set(names) - {"cells.parquet"} else []


def orphans_remedy(out: Path, names: list[str]) -> str:
    """What to do with `orphaned_outputs`: the shared advice of `fastcell shard` and `fastcell info`."""
    return (
        f"{out}: holds {_listing(names)}, which no fastcell shard manifest lists (the outputs of a fastcell shard "
        "whose index.json was deleted?); restore index.json, or delete these files (train-*/val-* .tar and .idx, "
        "cells.parquet, fields.parquet, illumination.npz) and rerun `fastcell shard`, or choose another folder"
    )


def _manifest_of(out: Path) -> ShardManifest | None:
    """OUT's manifest (its shards not checked), or None when it has none; read once per run and passed on."""
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        return read_manifest(out, verify=False)
    except InputError as err:
        raise InputError(f"{err}; fastcell cannot tell which files of {out} it wrote: choose another folder") from None


def _owned(out: Path, manifest: ShardManifest | None) -> set[str]:
    """Names of OUT's entries that fastcell shard wrote: what its manifest lists and, while a run is
    unfinished (its work record exists), the work folder and every file named like a shard output
    (a run refuses to start beside other files of those names, so these are its own)."""
    owned = set(manifest.files()) if manifest is not None else set()
    if (out / WORK_DIR / "config.json").is_file():
        owned |= {WORK_DIR} | {e.name for e in out.iterdir() if OUR_FILES.match(e.name)}
    return owned


def _previous_config(folder: Path, manifest: ShardManifest | None) -> dict | None:
    """The configuration record of what fastcell shard wrote in `folder` (its work record, else that of
    `manifest`, the folder's); {} when the work record is unreadable; None when there is none."""
    work_record = folder / WORK_DIR / "config.json"
    if work_record.is_file():
        try:
            record = json.loads(work_record.read_text())
        except (OSError, ValueError):
            return {}
    elif manifest is not None:
        record = manifest.config
    else:
        return None
    return {"codec": LEGACY_CODEC, **record}  # recorded before codecs existed: npy


def _remove(folder: Path, names) -> None:
    """Delete these entries of `folder` (files or the work folder), the manifest first."""
    for name in sorted(names, key=lambda n: n != MANIFEST_NAME):
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Build:
    """Where a run writes its outputs, and what `prepare_output` found there."""

    folder: Path  # OUT, or OUT/.staging
    up_to_date: bool  # it already holds exactly these, complete, shards: nothing to do
    # shards checked against their index on the way: name -> samples, or None when broken (the write
    # pass does not check them again)
    verified: dict[str, int | None]
    manifest: ShardManifest | None  # the folder's index.json as this run found it (read once), or None


def prepare_output(out: Path, record: dict, overwrite: bool,
                   skips_stand: Callable[[list[dict]], bool] | None = None) -> Build:
    """Decide where this run writes (see `Build`).

    `skips_stand(records)`: whether the fields a finished run skipped (its manifest's records) would be skipped
    again, so that its shards are still these (None: a finished run that skipped any is never up to date).

    The build folder is OUT, except when --overwrite replaces shards of another configuration: the new
    ones are then built in OUT/.staging and swapped in at the end (`swap_in`), so the old ones stay
    until their replacement is complete. Files fastcell did not write are never touched: beside them a
    run needs --overwrite (they are kept), and files named like a shard output are refused outright.
    An unfinished run of another configuration that wrote no shard yet (it stopped on a bad option)
    is discarded without asking: its work is fastcell's and of no use to this configuration.
    """
    output_folder(out)
    staging = out / STAGING_DIR
    if (staging / MANIFEST_NAME).is_file():
        swap_in(out, staging)  # an earlier --overwrite run finished its build but not its swap
    elif (staging / SWAP_RECORD).is_file():
        _discard_finished_swap(staging)
    manifest = _manifest_of(out)
    owned = _owned(out, manifest)
    foreign = sorted(e.name for e in out.iterdir() if not e.name.startswith(".") and e.name not in owned)
    clashing = [name for name in foreign if OUR_FILES.match(name)]
    if clashing and orphaned_outputs(out):
        raise InputError(orphans_remedy(out, clashing))
    if clashing:
        raise InputError(
            f"{out}: holds {_listing(clashing)}, which no fastcell shard manifest lists (another tool's output?) "
            "and which fastcell shard would replace; choose another folder, or move them away"
        )
    previous = _previous_config(out, manifest)
    if previous is None:
        if foreign and not overwrite:
            raise InputError(
                f"{out}: holds files fastcell shard did not write ({_listing(foreign)}); choose an empty folder, "
                "or pass --overwrite to write the shards beside them (they are kept)"
            )
        return _resume(out, record, manifest, skips_stand)
    if config_hash(previous) == record["hash"] or moved_only(previous, record):
        return _resume(out, record, manifest, skips_stand)
    if not any(name.endswith((".tar", ".idx")) or name == MANIFEST_NAME for name in owned):
        _remove(out, owned)
        return _resume(out, record, None, skips_stand)
    if not overwrite:
        raise InputError(
            f"{out}: holds shards made with a different configuration ({describe_difference(previous, record)}); "
            "use --overwrite to replace them (the new shards are built beside them and swapped in when "
            "complete), or choose another folder"
        )
    # the staging folder holds no manifest here: one there was swapped in above
    staged = _previous_config(staging, None)
    if staged is not None and config_hash(staged) != record["hash"]:
        shutil.rmtree(staging)  # a replacement begun for yet another configuration: all of it fastcell's
    return _resume(staging, record, None, skips_stand)


def _resume(folder: Path, record: dict, manifest: ShardManifest | None,
            skips_stand: Callable[[list[dict]], bool] | None) -> Build:
    """Ready `folder` (whose manifest is `manifest`) for this configuration's run: clear interrupted writes
    and record the configuration; up to date when it already holds exactly these, complete, shards. Each
    shard is verified at most once per run: here, until one fails, or else by the write pass. A file the manifest
    lists that is gone (fields.parquet, illumination.npz) is made again."""
    folder.mkdir(exist_ok=True)
    for where in (folder, folder / WORK_DIR / "fields"):
        remove_unfinished_writes(where)  # leftovers of writes an interrupted run never finished
    verified: dict[str, int | None] = {}
    # fields skipped last time that read now (the user fixed them) make a new build: the write pass then checks
    # the shards, so they are not checked here
    skipped = manifest.skipped.get("fields", []) if manifest is not None else []
    if (manifest is not None and not missing_outputs(folder, manifest)
            and (not skipped or (skips_stand is not None and skips_stand(skipped)))):
        try:
            for split in manifest.splits:
                for shard in manifest.split_shards(split):
                    verified[shard.name] = None
                    verify_shard(folder / shard.name, shard.count, manifest.codec)
                    verified[shard.name] = shard.count
            return Build(folder, True, verified, manifest)
        except InputError:
            pass  # a shard is missing or broken: finish the job below
    write_json_atomic(folder / WORK_DIR / "config.json", record)
    return Build(folder, False, verified, manifest)


def _discard_finished_swap(staging: Path) -> None:
    """Delete the swap record of a swap that moved everything in but was stopped before removing `staging`.

    The staged manifest moves last, so a record without it describes a swap with nothing left to do;
    kept, it would be replayed for the next build staged here. The folder goes too when nothing else is in it.
    """
    (staging / SWAP_RECORD).unlink()
    if not any(staging.iterdir()):
        staging.rmdir()


def _swap_plan(out: Path, staging: Path) -> dict:
    """What the swap of `staging` into OUT removes and brings in: the saved record when it was made for this
    build (the hash of its manifest), else a new one, saved before anything moves. A record of an older
    fastcell names no build: it is this build's when OUT's manifest, which its swap removed first, is gone."""
    plan_path = staging / SWAP_RECORD
    build = sha256_of([staging / MANIFEST_NAME])
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        unfinished_older_swap = "build" not in plan and not (out / MANIFEST_NAME).is_file()
        if plan.get("build") == build or unfinished_older_swap:
            return plan
    incoming = [e.name for e in staging.iterdir() if not e.name.startswith(".") or e.name == WORK_DIR]
    plan = {"build": build, "old": sorted(_owned(out, _manifest_of(out))), "new": sorted(incoming)}
    write_json_atomic(plan_path, plan)
    return plan


def swap_in(out: Path, staging: Path) -> None:
    """Replace the previous configuration's outputs in OUT by the complete build in `staging`.

    What is replaced and what comes in are saved in the staging folder before anything is deleted,
    so an interrupted swap is finished by the next run; OUT's old manifest goes first, so OUT never
    lists old shards beside new ones. Files fastcell did not write stay where they are.
    """
    plan = _swap_plan(out, staging)
    pending = [name for name in plan["new"] if (staging / name).exists()]
    moved = set(plan["new"]) - set(pending)
    _remove(out, [name for name in plan["old"] if name not in moved])
    for name in sorted(pending, key=lambda n: n == MANIFEST_NAME):  # the manifest last: it marks completion
        os.replace(staging / name, out / name)
    shutil.rmtree(staging)
