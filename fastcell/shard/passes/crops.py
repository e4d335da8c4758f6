"""Crop pass: per field, read -> correct -> locate cells (the locations table, else `detect_nuclei` on the
corrected DNA channel, before scaling) -> scale -> crop; the crops go to `<out>/.work/fields/<key>.crops.npy`
and the centres to `<key>.npz` (the completion marker, written last). A rerun skips fields whose marker
and crops both exist (a cleanup stopped halfway, or a user, may have deleted either). Then `cells_table`
lists the cropped cells (ids in a fixed order) and every field's counts."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from fastcell.errors import InputError
from fastcell.io import atomic_path
from fastcell.shard.output import field_paths
from fastcell.shard.passes.context import Run, Timer, corrected, worker_context
from fastcell.shard.sources import Field, Locations, read_field

FIELD_COLUMNS = ("plate", "well", "site", "batch", "compound", "concentration", "moa", "role", "image")


def crop_task(f: Field, centres: np.ndarray | None, scaling: tuple | None) -> dict:
    """Crop one field into the work folder. Returns its timings, or the reason it failed.

    `centres` come from the locations table ((0, 2) when it lists none for this field); None means
    detect nuclei on the illumination-corrected DNA channel (before any intensity scaling). A field
    without cells is data (an empty field, a toxic dose), not a failure: it is saved with no crops.
    """
    from fastcell.shard.crops import extract_crops
    from fastcell.shard.detect import detect_nuclei
    from fastcell.shard.illumination import apply_scaling

    ctx = worker_context()
    timer = Timer()
    try:
        with timer("read"):
            image = read_field(f, ctx.dtypes)
        image = corrected(f, image, timer)
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
    crops_path, meta_path = field_paths(ctx.out, f.key)
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


def crop_pass(
    run: Run, fields: list[Field], locations: Locations | None, scaling: dict | None
) -> tuple[int, int]:
    """Crop every field not cropped yet; returns (fields cropped now, fields an earlier run cropped). A field
    whose marker exists without its crops file (removed since) is cropped again."""
    todo = [f for f in fields if not all(p.is_file() for p in field_paths(run.config.out, f.key))]
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
    for result in run.tasks(crop_task, tasks, "crops (fields)"):
        if result["error"]:
            run.failed(by_key[result["key"]], result["error"])
        else:
            processed += 1
    return processed, len(fields) - len(todo)


def cells_table(run: Run, fields: list[Field]):
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
            with np.load(field_paths(run.config.out, f.key)[1]) as meta:
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
