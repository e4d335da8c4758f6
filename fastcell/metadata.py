"""The BBBC021 experimental design: which field shows which treatment, and its mechanism of action.

BBBC021 (Caie et al. 2010, Ljosa et al. 2012) is a screen of MCF-7 cells: 55 plates in 10 weekly
batches, 60 wells per plate, 4 sites per well, 3 channels (DAPI, tubulin, actin). Two tables
describe it and ship with fastcell as package data (`fastcell/resources/bbbc021/`):

- `BBBC021_v1_image.csv(.gz)`: one row per field (13,200), with the file name of each channel.
- `BBBC021_v1_moa.csv`: the 103 annotated treatments (compound, concentration) and their MoA
  (12 mechanisms), plus DMSO.

`load_image_table` adds normalised columns (plate, well, site, batch, compound, concentration);
`annotate` joins the MoA table and assigns each field a role, avoiding the taxol pitfall: taxol
0.3 uM is also the positive control on every plate, so a naive join would pull hundreds of control
wells into the benchmark. Only wells D03-D05 of the three Week1 plates below hold the annotated
taxol treatments.
"""

from __future__ import annotations

import io
import os
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from fastcell.errors import InputError

BBBC021_CHANNELS = ("DAPI", "Tubulin", "Actin")

IMAGE_TABLE_NAME = "BBBC021_v1_image.csv"
SYNTH_SETTINGS_NAME = "synth.json"  # `fastcell synth` marks its screens with it (written before any image)
MOA_TABLE_NAME = "BBBC021_v1_moa.csv"

# Real column names of the image table: the file and folder of each channel, then the design.
FILE_COLUMNS = {ch: f"Image_FileName_{ch}" for ch in BBBC021_CHANNELS}
PATH_COLUMNS = {ch: f"Image_PathName_{ch}" for ch in BBBC021_CHANNELS}
PLATE_COLUMN = "Image_Metadata_Plate_DAPI"
WELL_COLUMN = "Image_Metadata_Well_DAPI"
COMPOUND_COLUMN = "Image_Metadata_Compound"
CONCENTRATION_COLUMN = "Image_Metadata_Concentration"
IMAGE_COLUMNS = (
    "TableNumber",
    "ImageNumber",
    *(c for ch in BBBC021_CHANNELS for c in (FILE_COLUMNS[ch], PATH_COLUMNS[ch])),
    PLATE_COLUMN,
    WELL_COLUMN,
    "Replicate",
    COMPOUND_COLUMN,
    CONCENTRATION_COLUMN,
)
MOA_COLUMNS = ("compound", "concentration", "moa")

DMSO = "DMSO"

# The taxol pitfall: the annotated taxol treatments (3, 1, 0.3 uM) are these wells only.
TAXOL = "taxol"
TAXOL_TREATMENT_PLATES = ("Week1_22123", "Week1_22141", "Week1_22161")
TAXOL_TREATMENT_WELLS = ("D03", "D04", "D05")

_SITE_PATTERN = re.compile(r"_s(\d+)_")
_BATCH_PATTERN = re.compile(r"^(Week\d+)_")


def _resource(name: str) -> Path:
    """Path of a packaged BBBC021 table (the image table ships gzipped)."""
    folder = resources.files("fastcell.resources") / "bbbc021"
    for candidate in (name, name + ".gz"):
        entry = folder / candidate
        if entry.is_file():
            return Path(str(entry))
    raise InputError(f"{folder / name}: packaged BBBC021 table is missing; reinstall fastcell")


def read_csv(path: Path, required: tuple[str, ...] = (), data: bytes | None = None,
             text: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a CSV (`.gz`: gzipped) and check that it has the `required` columns, naming the file if not.
    `data`: the file's bytes when the caller has read them already (to hash the bytes it parses). Columns named
    in `text` (case-insensitive) are read as text: names such as plate 007 or compound 0123 keep their zeros."""
    if data is None and not path.is_file():
        raise InputError(f"{path}: file not found")

    def parse(**options) -> pd.DataFrame:
        source = path if data is None else io.BytesIO(data)
        return pd.read_csv(source, compression="gzip" if path.suffix == ".gz" else "infer", **options)

    try:
        names = {name.lower() for name in text}
        as_text = {c: str for c in parse(nrows=0).columns if str(c).lower() in names} if names else None
        table = parse(dtype=as_text)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: cannot read as CSV ({err})") from err
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    return table


def find_column(columns, aliases) -> str | None:
    """The column of `columns` named by the first of `aliases` that is present (case-insensitive), or None:
    how shard's input tables and eval's profile tables find a column under its usual names."""
    lower = {str(c).lower(): c for c in columns}
    return next((lower[a.lower()] for a in aliases if a.lower() in lower), None)


def batch_of_plate(plate: str) -> str:
    """The batch of a BBBC021 plate: its `WeekN` prefix ("Week4_27481" -> "Week4")."""
    match = _BATCH_PATTERN.match(plate)
    if match is None:
        raise InputError(f"plate {plate!r}: expected a name like 'Week4_27481' (batch prefix WeekN_)")
    return match.group(1)


def site_of_filename(filename: str) -> int:
    """The site number of a BBBC021 file name ("G10_s3_w1....tif" -> 3)."""
    match = _SITE_PATTERN.search(filename)
    if match is None:
        raise InputError(f"file name {filename!r}: no site tag '_s<N>_'")
    return int(match.group(1))


def load_image_table(path: str | os.PathLike | None = None, data: bytes | None = None) -> pd.DataFrame:
    """The BBBC021 image table (real columns) plus plate, well, site, batch, compound, concentration.

    `path` is a `BBBC021_v1_image.csv` or `.csv.gz`; None reads the packaged copy. `data`: see `read_csv`.
    """
    path = _resource(IMAGE_TABLE_NAME) if path is None else Path(path)
    table = read_csv(path, IMAGE_COLUMNS, data)
    table["plate"] = table[PLATE_COLUMN].astype(str)
    table["well"] = table[WELL_COLUMN].astype(str)
    try:
        table["site"] = [site_of_filename(name) for name in table[FILE_COLUMNS["DAPI"]].astype(str)]
        table["batch"] = [batch_of_plate(plate) for plate in table["plate"]]
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    table["compound"] = table[COMPOUND_COLUMN].astype(str)
    table["concentration"] = pd.to_numeric(table[CONCENTRATION_COLUMN], errors="coerce").astype(float)
    if table["concentration"].isna().any():
        row = int(np.flatnonzero(table["concentration"].isna().to_numpy())[0])
        raise InputError(f"{path}: row {row + 2} has a non-numeric {CONCENTRATION_COLUMN}")
    return table


def load_moa_table(path: str | os.PathLike | None = None, data: bytes | None = None) -> pd.DataFrame:
    """The BBBC021 MoA table: compound, concentration (float), moa. None reads the packaged copy;
    `data`: see `read_csv`."""
    path = _resource(MOA_TABLE_NAME) if path is None else Path(path)
    table = read_csv(path, MOA_COLUMNS, data)
    table = table[list(MOA_COLUMNS)].copy()
    table["compound"] = table["compound"].astype(str)
    table["moa"] = table["moa"].astype(str)
    table["concentration"] = pd.to_numeric(table["concentration"], errors="coerce").astype(float)
    if table["concentration"].isna().any():
        raise InputError(f"{path}: non-numeric concentration in the MoA table")
    return table


def treatment_key(compound: str, concentration: float) -> tuple[str, float]:
    """A hashable treatment identity: the compound and its concentration rounded to 1e-9 uM.

    Concentrations come from CSVs as floats (0.3 vs 0.30000000000000004); rounding makes equal
    doses equal keys, so dicts and groupbys over treatments are safe.
    """
    return str(compound), round(float(concentration), 9)


def is_taxol_treatment_well(plate: pd.Series, well: pd.Series) -> np.ndarray:
    """True where (plate, well) is one of the nine annotated taxol treatment wells."""
    return (plate.isin(TAXOL_TREATMENT_PLATES) & well.isin(TAXOL_TREATMENT_WELLS)).to_numpy()


def annotate(images: pd.DataFrame, moa: pd.DataFrame) -> pd.DataFrame:
    """Add `moa` and `role` to an image table (from `load_image_table`), avoiding the taxol pitfall.

    Roles: "dmso" (moa "DMSO"); "treatment" (the (compound, concentration) is in the MoA table,
    concentrations matched with np.isclose); "control" (taxol at a plate's positive-control
    dose outside the annotated taxol wells; no moa); "unannotated" (anything else; no moa).
    """
    out = images.copy()
    compounds = out["compound"].to_numpy()
    concentrations = out["concentration"].to_numpy(dtype=float)
    moa_of_row = np.full(len(out), None, dtype=object)
    for compound, concentration, mechanism in moa[list(MOA_COLUMNS)].itertuples(index=False):
        hit = (compounds == compound) & np.isclose(concentrations, float(concentration), rtol=1e-6, atol=1e-9)
        moa_of_row[hit] = mechanism

    is_dmso = compounds == DMSO
    is_taxol = compounds == TAXOL
    taxol_treatment = is_taxol & is_taxol_treatment_well(out["plate"], out["well"])
    taxol_control_doses = moa.loc[moa["compound"] == TAXOL, "concentration"].to_numpy(dtype=float)
    taxol_control = (
        is_taxol
        & ~taxol_treatment
        & np.isclose(concentrations[:, None], taxol_control_doses[None, :], rtol=1e-6, atol=1e-9).any(axis=1)
    )
    moa_of_row[is_taxol & ~taxol_treatment] = None
    moa_of_row[is_dmso] = DMSO

    role = np.full(len(out), "unannotated", dtype=object)
    role[pd.notna(moa_of_row) & ~is_dmso] = "treatment"
    role[is_dmso] = "dmso"
    role[taxol_control] = "control"
    out["moa"] = pd.Series(moa_of_row, index=out.index, dtype=object)
    out["role"] = pd.Series(role, index=out.index, dtype=object)
    return out


def load_annotated_design(
    image_table: str | os.PathLike | None = None, moa_table: str | os.PathLike | None = None
) -> pd.DataFrame:
    """`annotate(load_image_table(image_table), load_moa_table(moa_table))`: one call for the design."""
    return annotate(load_image_table(image_table), load_moa_table(moa_table))


def nscb_moas(design: pd.DataFrame) -> set[str]:
    """MoAs whose annotated treatments span more than one batch: the only ones NSCB can score."""
    treated = design[design["role"] == "treatment"]
    batches_per_moa = treated.groupby("moa")["batch"].nunique()
    return set(batches_per_moa[batches_per_moa > 1].index)
