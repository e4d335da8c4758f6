"""Generate a synthetic BBBC021 screen on disk: `generate_screen(SynthConfig(...))`.

Output (OUT_DIR), laid out like the real download so `fastcell shard` reads both alike:

    BBBC021_v1_image.csv    the selected rows of the real image table, real columns
    BBBC021_v1_moa.csv      the annotated treatments present (compound, concentration, moa) + DMSO
    Week1/Week1_22123/<Image_FileName_DAPI|Tubulin|Actin>   uint16 single-channel TIFFs
    synth_cells.csv         ground truth, one row per cell (columns in `CELL_COLUMNS`)
    synth.json              the render settings from the start (it marks the folder as synth's); the
                            options and the counts once the run completes

Every field is seeded from (seed, plate, well, site) alone, so subsets, supersets and worker
counts give identical pixels. A field whose three TIFFs exist and are whole (a uint16 image of the
field's size whose pixel data lies within the file: `_tiff_whole`) is complete and is skipped on a
rerun; a missing, truncated or unreadable TIFF is rendered again. Its ground truth is recomputed
from the cheap layout step. The three tables are written after the last TIFF (and `synth.json` gets its
counts last), so an interrupted run leaves no image table listing fields it never rendered; a rerun
also deletes the temporary files that a killed run's writes left (so two runs must not share OUT_DIR at
once). OUT_DIR must be new, empty, or an earlier synth screen (it has `synth.json`): a synth run never writes
into another tool's folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from fastcell.errors import InputError
from fastcell.io import (
    atomic_path,
    output_folder,
    remove_unfinished_writes,
    write_bytes_atomic,
    write_json_atomic,
)
from fastcell.metadata import (
    BBBC021_CHANNELS,
    FILE_COLUMNS,
    IMAGE_COLUMNS,
    IMAGE_TABLE_NAME,
    MOA_COLUMNS,
    MOA_TABLE_NAME,
    PATH_COLUMNS,
    SYNTH_SETTINGS_NAME,
    load_annotated_design,
    load_moa_table,
    treatment_key,
)
from fastcell.pool import WorkerPool
from fastcell.progress import Progress
from fastcell.synth.design import SynthConfig, select_fields
from fastcell.synth.phenotypes import Compound, as_dict, compound_catalogue, stable_hash, treatment_phenotype
from fastcell.synth.render import batch_effects, cell_table, draw_cells, image_field, layout_cells

CELLS_TABLE_NAME = "synth_cells.csv"
# synth_cells.csv, one row per cell. The field: TableNumber and ImageNumber (a field's key only
# together: ImageNumber repeats across the weekly tables), image (its DAPI file relative to
# OUT_DIR, also unique), plate, well, site, batch, and its treatment: compound, concentration,
# moa (empty unless annotated), role (treatment, dmso, control, unannotated).
FIELD_COLUMNS = ("TableNumber", "ImageNumber", "image", "plate", "well", "site", "batch", "compound",
                 "concentration", "moa", "role")
# The cell: its index in the field, its nuclear centroid x, y in px (0 = centre of the left/top
# pixel), state (interphase, mitotic, fragmented, multinucleate, monoaster), number of nuclei,
# cell and nuclear area in px.
GROUND_TRUTH_COLUMNS = ("cell", "x", "y", "state", "n_nuclei", "cell_area", "nucleus_area")
CELL_COLUMNS = FIELD_COLUMNS + GROUND_TRUTH_COLUMNS


@dataclass(frozen=True)
class SynthResult:
    """What `generate_screen` made."""

    out_dir: Path
    n_fields: int
    n_rendered: int
    n_skipped: int  # complete fields found from an earlier run
    n_cells: int
    n_treatments: int
    seconds: float


@dataclass(frozen=True)
class _Field:
    """One field to make: its identity, treatment and the paths of its three TIFFs."""

    index: int  # row of the selection (ImageNumber repeats across the weekly tables)
    plate: str
    well: str
    site: int
    batch: str
    compound: str
    concentration: float
    paths: tuple[str, ...]


_context: dict = {}


def _init_worker(out_dir: Path, config: SynthConfig, catalogue: dict[str, Compound]) -> None:
    _context.update(out_dir=out_dir, config=config, catalogue=catalogue)


def _field_generators(seed: int, field: _Field) -> tuple[np.random.Generator, np.random.Generator, float]:
    """Layout and pixel generators of a field, and its well's gain, all from (seed, plate, well, site)."""
    layout_seq, pixel_seq = np.random.SeedSequence(
        [seed, stable_hash("field", field.plate, field.well, field.site)]).spawn(2)
    well_rng = np.random.default_rng([seed, stable_hash("well", field.plate, field.well)])
    well_gain = float(np.exp(well_rng.normal(0, 0.04)))
    return np.random.default_rng(layout_seq), np.random.default_rng(pixel_seq), well_gain


def _make_field(field: _Field) -> tuple[int, dict[str, np.ndarray], bool]:
    """Lay out (and unless complete on disk, render and write) one field; return its cells."""
    out_dir, config, catalogue = _context["out_dir"], _context["config"], _context["catalogue"]
    height, width = config.field_size
    phenotype = as_dict(treatment_phenotype(catalogue[field.compound], field.concentration, config.seed))
    layout_rng, pixel_rng, well_gain = _field_generators(config.seed, field)
    layout = layout_cells(phenotype, layout_rng, height, width, config.scale)
    targets = [out_dir / p for p in field.paths]
    complete = all(_tiff_whole(t, (height, width)) for t in targets)
    if not complete:
        stains = draw_cells(layout, pixel_rng, height, width)
        effects = batch_effects(config.seed, field.batch, field.plate)
        image = image_field(stains, effects, pixel_rng, config.scale, well_gain)
        for target, channel in zip(targets, image, strict=True):
            with atomic_path(target) as tmp:
                tifffile.imwrite(tmp, channel, photometric="minisblack")
    return field.index, cell_table(layout), not complete


def _tiff_whole(path: Path, shape: tuple[int, int]) -> bool:
    """Whether `path` is a readable uint16 TIFF of `shape` whose pixel data lies within the file
    (a header check: a truncated or overwritten file fails it, flipped pixel bits do not)."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            end = max(o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True))
            return page.shape == shape and page.dtype == np.uint16 and end <= path.stat().st_size
    except (OSError, ValueError, IndexError):  # tifffile.TiffFileError is a ValueError
        return False


def _fields(selection: pd.DataFrame) -> list[_Field]:
    """The fields of a selection, with their TIFF paths relative to OUT_DIR (`PathName/FileName`)."""
    fields = []
    for index, row in enumerate(selection.to_dict("records")):
        paths = tuple(f"{row[PATH_COLUMNS[ch]]}/{row[FILE_COLUMNS[ch]]}" for ch in BBBC021_CHANNELS)
        fields.append(_Field(index, row["plate"], row["well"], int(row["site"]), row["batch"], row["compound"],
                             float(row["concentration"]), paths))
    return fields


def _check_settings(out_dir: Path, config: SynthConfig) -> None:
    """Refuse to resume a screen whose pixels were made with other render settings, and to write into a
    folder of something else (the real BBBC021 download: its image table and TIFFs would be replaced)."""
    settings = out_dir / SYNTH_SETTINGS_NAME
    if not settings.is_file():
        others = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(".")) if out_dir.is_dir() else []
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise InputError(
                f"{out_dir}: holds {shown} but no {SYNTH_SETTINGS_NAME}, so it is not a fastcell synth screen; "
                "synth writes only into a new or empty folder or resumes its own: choose another OUT_DIR"
            )
        return
    try:
        earlier = json.loads(settings.read_text())["render"]
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{settings}: unreadable settings of an earlier run ({err}); use a new OUT_DIR") from None
    if earlier != config.render_settings():
        raise InputError(
            f"{settings}: {out_dir} holds a screen made with {earlier}, not {config.render_settings()}; "
            "use a new OUT_DIR or the same --seed, --field-size and --cell-size"
        )


def _moa_rows(selection: pd.DataFrame) -> pd.DataFrame:
    """The MoA table rows of the annotated treatments (and DMSO) that the selection holds."""
    moa = load_moa_table()
    annotated = selection[selection["role"].isin(["treatment", "dmso"])]
    present = {treatment_key(c, x) for c, x in zip(annotated["compound"], annotated["concentration"], strict=True)}
    keep = [treatment_key(c, x) in present for c, x in zip(moa["compound"], moa["concentration"], strict=True)]
    return moa[keep][list(MOA_COLUMNS)]


def _write_csv(path: Path, table: pd.DataFrame) -> None:
    write_bytes_atomic(path, table.to_csv(index=False).encode())


def generate_screen(config: SynthConfig, progress: bool = True) -> SynthResult:
    """Write the synthetic screen that `config` describes (see the module docstring); resumable."""
    start = time.perf_counter()
    out_dir = config.out_dir
    design = load_annotated_design()
    selection = select_fields(design, config)
    if selection.empty:
        raise InputError("the options select no fields; widen --weeks or use --all-compounds")
    catalogue = compound_catalogue(design, config.seed)
    _check_settings(out_dir, config)
    output_folder(out_dir)
    settings = {"render": config.render_settings(), "options": _options(config)}
    if not (out_dir / SYNTH_SETTINGS_NAME).is_file():  # marks OUT_DIR as synth's (an earlier one describes its tables)
        write_json_atomic(out_dir / SYNTH_SETTINGS_NAME, {"render": config.render_settings()})

    fields = _fields(selection)
    for folder in {out_dir, *((out_dir / f.paths[0]).parent for f in fields)}:
        remove_unfinished_writes(folder)  # what a killed run's atomic writes left
    workers = min(config.resolved_workers(), len(fields))
    cells: dict[int, dict[str, np.ndarray]] = {}  # by field index: tables do not depend on completion order
    rendered = 0
    with WorkerPool(workers, _init_worker, (out_dir, config, catalogue)) as pool, Progress(progress) as bars:
        made_fields = pool.run(_make_field, [(f,) for f in fields])
        for index, table, made in bars.track(made_fields, len(fields), "synth fields"):
            cells[index], rendered = table, rendered + made

    cell_rows = _cell_rows(selection, cells)
    # The tables only now, after every TIFF: an interrupted run must not leave an image table that lists
    # fields it never rendered (`fastcell shard` would take the folder for a whole screen).
    _write_csv(out_dir / IMAGE_TABLE_NAME, selection[list(IMAGE_COLUMNS)])
    _write_csv(out_dir / MOA_TABLE_NAME, _moa_rows(selection))
    _write_csv(out_dir / CELLS_TABLE_NAME, cell_rows)
    treated = selection[selection["role"] == "treatment"]
    result = SynthResult(out_dir, len(fields), rendered, len(fields) - rendered, len(cell_rows),
                         treated.groupby(["compound", "concentration"]).ngroups, time.perf_counter() - start)
    settings["counts"] = {"fields": result.n_fields, "cells": result.n_cells, "plates": int(selection["plate"].nunique()),
                          "weeks": int(selection["batch"].nunique()), "treatments": result.n_treatments}
    write_json_atomic(out_dir / SYNTH_SETTINGS_NAME, settings)
    return result


def _options(config: SynthConfig) -> dict:
    return {"weeks": list(config.weeks) if config.weeks else "all",
            "plates_per_week": config.plates_per_week or "all",
            "sites_per_well": config.sites_per_well or "all",
            "annotated_only": config.annotated_only}


def _cell_rows(selection: pd.DataFrame, cells: dict[int, dict[str, np.ndarray]]) -> pd.DataFrame:
    """One row per cell: the field's design columns joined to its ground-truth cells."""
    fields = selection.assign(image=selection[PATH_COLUMNS["DAPI"]] + "/" + selection[FILE_COLUMNS["DAPI"]])
    fields = fields[list(FIELD_COLUMNS)].reset_index(drop=True)
    per_field = [cells[i] for i in range(len(fields))]
    counts = np.array([len(c["x"]) for c in per_field], dtype=int)
    rows = fields.loc[fields.index.repeat(counts)].reset_index(drop=True)
    rows["cell"] = np.concatenate([np.arange(n) for n in counts])
    for column in GROUND_TRUTH_COLUMNS[1:]:
        rows[column] = np.concatenate([c[column] for c in per_field])
    return rows
