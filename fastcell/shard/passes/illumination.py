"""Illumination pass: per plate and channel, `IlluminationAccumulator`s filled in chunks of `FIELD_CHUNK`
fields (exact integer sums: the result does not depend on `--workers`) give the functions in
`illumination.npz`, saved atomically beside the shards."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from fastcell.errors import InputError
from fastcell.format.folder import ShardManifest
from fastcell.shard.output import ILLUMINATION_NAME, WORK_DIR
from fastcell.shard.passes.context import Run, Timer, worker_context
from fastcell.shard.sources import Field, read_field

FIELD_CHUNK = 16  # fields per task of the per-plate passes (illumination, scaling)
PLATE_FUNCTIONS_RECORD = "plate_functions.json"  # fields left out of illumination.npz when it was made


def plate_functions_reusable(out: Path, manifest: ShardManifest | None) -> bool:
    """Whether an existing illumination.npz was made from every field and still reads (so a rerun may keep it;
    else the rerun computes it again: it is derived from the fields alone); `manifest`: OUT's, as the run found it."""
    from fastcell.shard.illumination import check_illumination_file

    path = out / ILLUMINATION_NAME
    if not path.is_file():
        return False
    record = out / WORK_DIR / PLATE_FUNCTIONS_RECORD
    try:
        if record.is_file():
            complete = not json.loads(record.read_text())["skipped"]
        elif manifest is not None:  # a finished run; its work folder is gone
            complete = not manifest.skipped["fields"]
        else:
            return False  # interrupted between saving it and recording how it was made
        if complete:  # a truncated file or a flipped byte fails its zip checks
            check_illumination_file(path)
        return complete
    except (OSError, ValueError, KeyError, InputError):  # an unreadable record or file
        return False


def plate_chunks(fields: list[Field]) -> list[tuple[str, list[Field]]]:
    """(plate, up to FIELD_CHUNK of its fields): the tasks of the per-plate passes, fixed by the input alone."""
    by_plate: dict[str, list[Field]] = {}
    for f in fields:
        by_plate.setdefault(f.plate, []).append(f)
    chunks = []
    for plate, plate_fields in sorted(by_plate.items()):
        chunks += [
            (plate, plate_fields[i : i + FIELD_CHUNK]) for i in range(0, len(plate_fields), FIELD_CHUNK)
        ]
    return chunks


def illumination_task(plate: str, chunk: int, fields: list[Field]) -> dict:
    """Accumulate one chunk of a plate's fields, apart per image shape (which shape is the plate's is decided
    over all its chunks: `plate_functions`); per-field read errors are returned, not raised."""
    from fastcell.shard.illumination import IlluminationAccumulator

    timer = Timer()
    by_shape: dict[tuple, tuple] = {}  # shape -> (accumulator, keys of its fields)
    errors = []
    for f in fields:
        try:
            with timer("read"):
                image = read_field(f, worker_context().dtypes)
        except InputError as err:
            errors.append((f.key, str(err)))
            continue
        with timer("illumination"):
            if image.shape not in by_shape:
                by_shape[image.shape] = (IlluminationAccumulator(image.shape[0], image.shape[1:]), [])
            accumulator, keys = by_shape[image.shape]
            accumulator.add(image)
            keys.append(f.key)
    return {"plate": plate, "chunk": chunk, "by_shape": by_shape, "errors": errors, "timer": dict(timer.seconds)}


def plate_functions(run: Run, plate: str, chunks: list[dict], by_key: dict[str, Field]):
    """The plate's illumination function from its chunks' accumulators (merged in chunk order: the same sums
    whatever the workers). Its shape is the one most of its fields have; each field of another shape is
    reported (`Run.failed`) naming it and the plate's shape. None when no field of the plate was read."""
    merged: dict[tuple, tuple] = {}
    for chunk in chunks:
        for shape, (accumulator, keys) in chunk["by_shape"].items():
            if shape in merged:
                merged[shape][0].merge(accumulator)
                merged[shape][1].extend(keys)
            else:
                merged[shape] = (accumulator, list(keys))
    if not merged:
        return None
    shape = max(sorted(merged), key=lambda s: len(merged[s][1]))  # most fields; ties: the smaller shape
    accumulator, keys = merged[shape]
    for other, (_, odd_keys) in sorted(merged.items()):
        for key in odd_keys if other != shape else []:
            run.failed(by_key[key], f"{by_key[key].paths[0]}: field {key} is {other[1]}x{other[2]}, the other "
                                    f"{len(keys)} field(s) of plate {plate} are {shape[1]}x{shape[2]}")
    return accumulator.finish()


def illumination_pass(run: Run, fields: list[Field]) -> bool:
    """Compute and save illumination.npz unless an earlier run did; True when computed now."""
    from fastcell.shard.illumination import save_illumination

    path = run.config.out / ILLUMINATION_NAME
    if path.is_file():
        return False
    by_key = {f.key: f for f in fields}
    tasks = [(plate, chunk, members) for chunk, (plate, members) in enumerate(plate_chunks(fields))]
    parts: dict[str, dict[int, dict]] = defaultdict(dict)
    for result in run.tasks(illumination_task, tasks, "illumination"):
        for key, error in result["errors"]:
            run.failed(by_key[key], error)
        parts[result["plate"]][result["chunk"]] = result
    functions = {}
    for plate in sorted(parts):
        function = plate_functions(run, plate, [parts[plate][i] for i in sorted(parts[plate])], by_key)
        if function is not None:
            functions[plate] = function
    save_illumination(path, functions)  # atomic
    return True
