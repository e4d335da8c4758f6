"""From cells (or a profile table) to well profiles, annotated with the screen's design, to treatments.

Inputs are an `embed` output folder (`embeddings.npy` + `cells.parquet`) or a table of well- or
image-level profiles (CSV or parquet), such as CellProfiler per-well means or pycytominer output.
Key columns are found under the names CellProfiler and pycytominer use (`Metadata_Plate` /
`Metadata_Well`, `Image_Metadata_Plate` / `Image_Metadata_Well`, `plate` / `well`, and a site
column for image-level rows) or named by `ProfileColumns`. Columns starting with `Metadata_` are
never features.

Each well's design (compound, dose, MoA, batch, role) comes from one of two places:

- "bbbc021": the BBBC021 image and MoA tables (packaged, or the screen's own in that format),
  joined on (plate, well) by `fastcell.metadata.annotate`; compound or dose columns present in the
  input must agree with them, so a table that does not match the profiles is an error.
- "table": the input's own metadata columns (compound, dose, MoA, batch); rows whose compound is
  the control value (DMSO by default) are the negative control.

"auto" is bbbc021 for BBBC021 input (tables given, or plates of the packaged design) and table
otherwise. Roles: "dmso" (negative control), "treatment" (has a MoA), "control" (BBBC021's taxol
plate controls), "unannotated" (a treatment without MoA). The BBBC021 convention then follows:
mean per well (or per image, then per well) -> post-processing (see `postprocess`) -> median per
treatment (compound, dose).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fastcell import metadata
from fastcell.errors import InputError
from fastcell.io import atomic_path, output_folder

EMBEDDINGS_NAME = "embeddings.npy"
CELLS_NAME = "cells.parquet"
AGGREGATES = ("well", "image")
TREATMENT_STATS = ("median", "mean")
NAN_POLICIES = ("drop", "error")
DESIGNS = ("auto", "bbbc021", "table")
# Columns of a profile table that are never features (besides the key and metadata columns found).
NON_FEATURE_COLUMNS = {
    "id", "plate", "well", "site", "batch", "compound", "concentration", "moa", "role", "x", "y",
    "image", "split", "shard", "TableNumber", "ImageNumber", "Replicate", "ObjectNumber",
}
METADATA_PREFIXES = ("Metadata_", "Image_Metadata_")
TREATMENT_PLATE = "-"  # the plate of the rows of a treatment-level table


@dataclass(frozen=True)
class Lookup:
    """Where one key or metadata column is looked for: the usual names, and the option naming another."""

    field: str  # ProfileColumns field
    aliases: tuple[str, ...]  # matched case-insensitively, first present wins
    option: str


KEYS = ("plate", "well", "site")
# Standard name inside fastcell -> how the input's column is found.
LOOKUPS = {
    "plate": Lookup("plate", ("Metadata_Plate", "Image_Metadata_Plate", "plate"), "--plate-column"),
    "well": Lookup("well", ("Metadata_Well", "Image_Metadata_Well", "well"), "--well-column"),
    "site": Lookup("site", ("Metadata_Site", "Image_Metadata_Site", "site"), "--site-column"),
    "compound": Lookup("compound", (
        "Metadata_Compound", "Metadata_pert_iname", "Metadata_broad_sample", "Metadata_JCP2022",
        "Image_Metadata_Compound", "compound", "Metadata_Treatment", "treatment"), "--compound-column"),
    "concentration": Lookup("dose", (
        "Metadata_Concentration", "Metadata_mmoles_per_liter", "Metadata_dose", "Image_Metadata_Concentration",
        "concentration"), "--dose-column"),
    "moa": Lookup("moa", ("Metadata_moa", "moa"), "--moa-column"),
    "batch": Lookup("batch", ("Metadata_Batch", "batch"), "--batch-column"),
}


@dataclass(frozen=True)
class ProfileColumns:
    """The input's key and metadata columns; None: the first of the usual names present (LOOKUPS)."""

    plate: str | None = None
    well: str | None = None
    site: str | None = None
    compound: str | None = None  # treatment identity (with the dose)
    dose: str | None = None
    moa: str | None = None
    batch: str | None = None
    control: str = metadata.DMSO  # compound value of the negative-control rows


def find_columns(columns, spec: ProfileColumns, where: Path) -> dict[str, str]:
    """Standard name -> the input's column, for every key or metadata column present.

    A column named in `spec` must exist (the batch excepted: it may come from an image table);
    otherwise the first usual name present is taken.
    """
    found = {}
    for name, lookup in LOOKUPS.items():
        named = getattr(spec, lookup.field)
        if named is not None:
            if named in columns:
                found[name] = named
            elif name != "batch":
                raise InputError(f"{where}: no column {named!r} (named by {lookup.option})")
            continue
        hit = metadata.find_column(columns, lookup.aliases)
        if hit is not None:
            found[name] = hit
    return found


def require_columns(found: dict[str, str], names: tuple[str, ...], where: Path, why: str) -> None:
    """An error listing every missing column, the names looked for and the option that names it."""
    missing = [n for n in names if n not in found]
    if missing:
        parts = [f"{'key' if n in KEYS else 'metadata'} column {n!r} (looked for {', '.join(LOOKUPS[n].aliases)}; "
                 f"name it with {LOOKUPS[n].option})" for n in missing]
        raise InputError(f"{where}: missing {'; '.join(parts)}: {why}")


@dataclass
class Profiles:
    """Rows (wells, or cells at cell level) with their design, and a feature matrix row-aligned to them."""

    rows: pd.DataFrame
    features: np.ndarray
    feature_names: list[str]
    notes: dict = field(default_factory=dict)


def is_embedding_folder(path: Path) -> bool:
    return path.is_dir() and (path / EMBEDDINGS_NAME).is_file() and (path / CELLS_NAME).is_file()


def read_table(path: Path) -> pd.DataFrame:
    """A CSV (optionally compressed) or parquet table, with a clear error when unreadable."""
    if not path.is_file():
        raise InputError(f"{path}: file not found (expected an embed folder or a profile table)")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as err:  # pandas and pyarrow raise many types for a bad file
        raise InputError(f"{path}: cannot read as {'parquet' if path.suffix == '.parquet' else 'CSV'} ({err})") from err


def load_embeddings(folder: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The cells table and the (memory-mapped) embeddings of an `embed` folder, checked to agree."""
    from fastcell.evaluate.embed import check_row_ids

    cells = read_table(folder / CELLS_NAME)
    check_row_ids(folder, cells)
    try:
        emb = np.load(folder / EMBEDDINGS_NAME, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise InputError(f"{folder / EMBEDDINGS_NAME}: cannot read ({err})") from err
    if emb.ndim != 2 or len(emb) != len(cells):
        raise InputError(
            f"{folder}: {EMBEDDINGS_NAME} has shape {emb.shape} but {CELLS_NAME} has {len(cells)} rows"
        )
    if not len(emb):
        raise InputError(f"{folder / EMBEDDINGS_NAME}: no cells (0 rows); nothing to evaluate")
    check_finite_rows(folder / EMBEDDINGS_NAME, emb, cells)
    return cells, emb


def check_finite_rows(path: Path, emb: np.ndarray, cells: pd.DataFrame, chunk: int = 1 << 16) -> None:
    """InputError naming the cells whose embedding holds NaN or inf (read in chunks: it may be a memmap).

    Refused rather than dropped: one such cell would make its well's mean, and so every feature
    (dropped when any well has NaN), unusable; and a model that emits NaN is a fault to see, not to score.
    """
    bad = np.concatenate([lo + np.flatnonzero(~np.isfinite(np.asarray(emb[lo : lo + chunk])).all(axis=1))
                          for lo in range(0, len(emb), chunk)])
    if len(bad):
        label, ids = ("ids", cells["id"].to_numpy()[bad]) if "id" in cells.columns else ("rows", bad)
        shown = ", ".join(map(str, ids[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise InputError(f"{path}: {len(bad)} of {len(emb)} cell(s) have NaN or inf in their embedding "
                         f"({label} {shown}); every feature of their wells would be lost: rerun `fastcell embed` "
                         "(a diverged model?)")


def group_means(codes: np.ndarray, n_groups: int, x: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Mean of the rows of x per group code (float64), reading x in chunks (it may be a memmap)."""
    from scipy import sparse

    sums = np.zeros((n_groups, x.shape[1]))
    for lo in range(0, len(x), chunk):
        block = np.asarray(x[lo : lo + chunk], dtype=np.float64)
        member = sparse.csr_matrix((np.ones(len(block)), (codes[lo : lo + chunk], np.arange(len(block)))),
                                   shape=(n_groups, len(block)))
        sums += member @ block
    counts = np.bincount(codes, minlength=n_groups)
    return sums / counts[:, None]


@dataclass
class Source:
    """An input read and keyed: rows with standard column names, features row-aligned to them."""

    path: Path  # the folder or table given
    where: Path  # the file the rows came from (cells.parquet of an embed folder, else the table)
    rows: pd.DataFrame  # plate, well (str) and those of site, compound, concentration, moa, batch found
    x: np.ndarray  # [rows, features]; a memmap for an embed folder
    names: list[str]
    columns: dict[str, str]  # standard name -> the input's column
    level: str = "well"  # "treatment": a table of one row per treatment (no plate/well), e.g. a consensus
    notes: dict = field(default_factory=dict)  # for the report: columns of a table left out of the features

    def column(self, name: str) -> str:
        """The input's name of a standard column, for messages."""
        return self.columns.get(name, name)

    @property
    def features_at(self) -> Path:
        """The file the features came from (embeddings.npy of an embed folder, else the table), for messages."""
        return self.path / EMBEDDINGS_NAME if is_embedding_folder(self.path) else self.where


def read_source(source: Path, spec: ProfileColumns = ProfileColumns(), features: str | None = None) -> Source:
    """An embed folder or a profile table, with its key and metadata columns found (see LOOKUPS)."""
    source = Path(source)
    if is_embedding_folder(source):
        table, x = load_embeddings(source)
        where = source / CELLS_NAME
        found = find_columns(table.columns, spec, where)
        names = [f"f{i}" for i in range(x.shape[1])]
    else:
        table = read_table(source)
        where = source
        if not len(table):  # before the features: an empty CSV's columns are all non-numeric
            raise InputError(f"{source}: no rows; nothing to evaluate")
        found = find_columns(table.columns, spec, where)
        names = feature_columns(table, features, source, exclude=set(found.values()))
        x = table[names].to_numpy(dtype=np.float64)
    rows = pd.DataFrame({name: table[column].to_numpy() for name, column in found.items()})
    notes = {} if is_embedding_folder(source) else non_numeric_notes(table, names, features, set(found.values()))
    level = "well"
    if "plate" not in found and "well" not in found and "compound" in found and not is_embedding_folder(source):
        level = "treatment"  # e.g. a consensus table: one row per treatment, each its own "well"
        dose = rows["concentration"].astype(str) if "concentration" in rows.columns else ""
        rows["plate"], rows["well"] = TREATMENT_PLATE, rows["compound"].astype(str).str.strip() + " @ " + dose
        repeated = rows.duplicated("well")
        if repeated.any():
            raise InputError(f"{where}: no plate/well columns, and {int(repeated.sum())} row(s) repeat a treatment "
                             f"(e.g. {rows.loc[repeated, 'well'].iloc[0]}); a table without plate and well must have "
                             f"one row per treatment; name the key columns with --plate-column and --well-column")
    else:
        require_columns(found, ("plate", "well"), where,
                        "profiles are keyed by plate and well (a table with neither holds one row per treatment)")
        if not is_embedding_folder(source):
            for key in ("plate", "well"):
                refuse_missing(rows, key, found[key], where)
    rows["plate"], rows["well"] = rows["plate"].astype(str), rows["well"].astype(str)
    return Source(source, where, rows, x, names, found, level, notes)


def missing_values(values: pd.Series) -> np.ndarray:
    """True where a key or metadata value is absent: NaN/None, or an empty or blank string."""
    return (values.isna() | (values.astype(str).str.strip() == "")).to_numpy()


def refuse_missing(rows: pd.DataFrame, name: str, column: str, where: Path, among=None) -> None:
    """InputError naming the rows (of the `among` mask, default all) without a value of a key or metadata column.

    Refused rather than kept: pandas keeps NaN through astype(str), so a row without a plate (or
    site, or batch) would become a well, image or batch of its own (or crash a sort) without a word.
    """
    empty = missing_values(rows[name]) & (True if among is None else np.asarray(among))
    if empty.any():
        shown = (f"data rows {', '.join(str(i + 1) for i in np.flatnonzero(empty)[:5])}, counted from 1 below "
                 "the header" if name in ("plate", "well") else f"e.g. {_examples(rows, empty)}")
        raise InputError(f"{where}: {int(empty.sum())} row(s) without a value of {column!r} ({shown})")


def aggregate_to_wells(src: Source, aggregate: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Mean per well of the rows of src.x; with aggregate="image", mean per (plate, well, site) first.

    Metadata columns (compound, dose, MoA, batch) must be constant within a well and are kept;
    n_rows counts the rows (cells) of each well.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, not {aggregate!r}")
    keys = ["plate", "well"]
    rows = src.rows
    codes, wells = pd.factorize(pd.MultiIndex.from_frame(rows[keys]), sort=True)
    per_well = rows.groupby(codes, sort=True)
    table = pd.DataFrame({"plate": wells.get_level_values(0), "well": wells.get_level_values(1)})
    table["n_rows"] = np.bincount(codes, minlength=len(wells))
    for column in ("compound", "concentration", "moa", "batch"):
        if column in rows.columns:
            distinct = per_well[column].nunique(dropna=False)
            if (distinct > 1).any():
                bad = table.iloc[int(np.flatnonzero(distinct.to_numpy() > 1)[0])]
                values = sorted(map(str, rows.loc[codes == bad.name, column].unique()))
                raise InputError(f"{src.where}: well {bad.plate} {bad.well} has several values of "
                                 f"{src.column(column)!r} ({', '.join(values[:5])}); a well is one treatment")
            table[column] = per_well[column].first().to_numpy()
    if aggregate == "well":
        return table, group_means(codes, len(wells), src.x)
    if "site" not in rows.columns:
        require_columns(src.columns, ("site",), src.where, "--aggregate image averages each image first")
    refuse_missing(rows, "site", src.column("site"), src.where)
    image_codes, images = pd.factorize(pd.MultiIndex.from_frame(rows[keys + ["site"]].astype(str)), sort=True)
    image_means = group_means(image_codes, len(images), src.x)
    well_of_image = pd.Series(codes).groupby(image_codes, sort=True).first().to_numpy()
    return table, group_means(well_of_image, len(wells), image_means)


def feature_columns(table: pd.DataFrame, pattern: str | None, source: Path, exclude: set = frozenset()) -> list[str]:
    """Numeric columns that are features: matching `pattern` (a regex) if given, else all but metadata."""
    candidates = [c for c in table.columns if c not in NON_FEATURE_COLUMNS and c not in exclude
                  and not str(c).startswith(METADATA_PREFIXES)]
    numeric = [c for c in candidates if pd.api.types.is_numeric_dtype(table[c])]
    if pattern is not None:
        regex = re.compile(pattern)
        numeric = [c for c in numeric if regex.search(str(c))]
    if not numeric:
        other = [str(c) for c in candidates if c not in numeric]
        raise InputError(f"{source}: no numeric feature columns" + (f" match {pattern!r}" if pattern else "") +
                         (f" (non-numeric: {', '.join(other[:5])})" if other else "") +
                         "; features are the numeric columns other than keys and Metadata_ columns")
    return numeric


def non_numeric_notes(table: pd.DataFrame, names: list[str], pattern: str | None, keys: set) -> dict:
    """A note listing the columns that could be features but are not numeric, so none is left out unseen.

    One stray string (e.g. "#DIV/0!") makes pandas read a whole feature column as text, and a text
    column is not a feature: without this note the feature would vanish from the scores silently.
    """
    regex = None if pattern is None else re.compile(pattern)
    left = [str(c) for c in table.columns if c not in names and c not in keys and c not in NON_FEATURE_COLUMNS
            and not str(c).startswith(METADATA_PREFIXES) and (regex is None or regex.search(str(c)))]
    return {"ignored_non_numeric_columns": left} if left else {}


def wells_design(images: Path | None, moa: Path | None) -> pd.DataFrame:
    """The annotated design (fastcell.metadata) reduced to one row per (plate, well)."""
    design = metadata.annotate(metadata.load_image_table(images), metadata.load_moa_table(moa))
    columns = ["plate", "well", "compound", "concentration", "batch", "moa", "role"]
    return design.drop_duplicates(["plate", "well"])[columns].reset_index(drop=True)


def choose_design(mode: str, plates: pd.Series, images: Path | None, moa: Path | None) -> pd.DataFrame | None:
    """The BBBC021 per-well design, or None when the input's own metadata columns are the design.

    "auto": BBBC021 when image or MoA tables are given or any plate is a plate of the packaged design.
    """
    if mode == "table":
        if images is not None or moa is not None:
            raise InputError("--images and --moa give a BBBC021-style design; they do not go with --design table")
        return None
    design = wells_design(images, moa)
    if mode == "auto" and images is None and moa is None and not plates.isin(set(design["plate"])).any():
        return None
    return design


def attach_design(rows: pd.DataFrame, design: pd.DataFrame, batch_column: str | None, src: Source) -> pd.DataFrame:
    """Join rows (with plate, well) to the per-well design; check agreement; set `batch`.

    The batch is the input's batch column when it has one, else the design's (BBBC021: the week).
    """
    rows = rows.drop(columns=[c for c in ("moa", "role") if c in rows.columns])  # the design's are authoritative
    joined = rows.merge(design, on=["plate", "well"], how="left", suffixes=("", "_design"), indicator=True)
    missing = joined["_merge"] == "left_only"
    if missing.any():
        examples = ", ".join(f"{p} {w}" for p, w in joined.loc[missing, ["plate", "well"]].head(3).itertuples(index=False))
        raise InputError(
            f"{src.where}: {int(missing.sum())} well(s) are not in the image table (e.g. {examples}); "
            "pass the screen's own table with --images, or use its own metadata columns with --design table"
        )
    for column in ("compound", "concentration"):
        if column in rows.columns:
            ours, theirs = joined[column], joined[f"{column}_design"]
            if column == "concentration":
                differ = ~np.isclose(pd.to_numeric(ours, errors="coerce"), theirs.astype(float), rtol=1e-6, atol=1e-9)
            else:
                differ = (ours.astype(str) != theirs.astype(str)).to_numpy()
            if differ.any():
                first = joined[differ].iloc[0]
                raise InputError(
                    f"{src.where}: {int(differ.sum())} well(s) disagree with the image table on {src.column(column)} "
                    f"(e.g. {first.plate} {first.well}: {first[column]!r} vs {first[column + '_design']!r}); "
                    "the metadata does not match these profiles"
                )
            joined[column] = theirs
    if "batch" in rows.columns:
        refuse_missing(rows, "batch", src.column("batch"), src.where)
        batch = rows["batch"]
    elif batch_column in (None, "batch"):
        batch = joined["batch_design"] if "batch_design" in joined.columns else joined["batch"]
    else:
        raise InputError(f"{src.where}: no batch column {batch_column!r} in the profiles nor in the image table")
    joined["batch"] = batch.astype(str).to_numpy()
    return joined.drop(columns=[c for c in joined.columns if c.endswith("_design") or c == "_merge"])


def _examples(rows: pd.DataFrame, mask) -> str:
    return ", ".join(f"{p} {w}" for p, w in rows.loc[mask, ["plate", "well"]].head(3).itertuples(index=False))


def own_design(rows: pd.DataFrame, spec: ProfileColumns, src: Source) -> pd.DataFrame:
    """Compound, dose, MoA, batch and role of each row from the input's own metadata columns.

    Rows whose compound is `spec.control` are the negative control ("dmso"); the others are
    "treatment" when they have a MoA, else "unannotated". No dose column: every dose is 0; no
    batch column: one batch.
    """
    require_columns(src.columns, ("compound",), src.where,
                    "without BBBC021 tables the treatment of each row comes from the profiles")
    rows = rows.drop(columns=[c for c in ("role",) if c in rows.columns]).copy()
    refuse_missing(rows, "compound", src.column("compound"), src.where)
    # Surrounding blanks are typing, not identity (MoAs are stripped too): "brd-1 " kept apart from
    # "brd-1" would be another compound, a valid NSC neighbour of its own wells.
    rows["compound"] = rows["compound"].astype(str).str.strip()
    control = spec.control.strip()
    is_control = (rows["compound"] == control).to_numpy()
    other_case = ~is_control & (rows["compound"].str.casefold() == control.casefold()).to_numpy()
    spelled = ", ".join(sorted(set(rows.loc[other_case, "compound"])))
    if not is_control.any():
        seen = ", ".join(sorted(rows["compound"].unique())[:5])
        hint = f" ({spelled} differs only in case)" if other_case.any() else ""
        raise InputError(f"{src.where}: no row has {src.column('compound')!r} = {spec.control!r}, the negative "
                         f"control (values: {seen}, ...); name the control value with --control{hint}")
    if other_case.any():  # "dmso" beside "DMSO": those wells would be scored as a treatment without a word
        raise InputError(f"{src.where}: {int(other_case.sum())} row(s) have {src.column('compound')!r} = {spelled}, "
                         f"the control {control!r} spelled in another case (e.g. {_examples(rows, other_case)}); "
                         "they would be scored as a treatment: spell the control one way in the table")
    if "concentration" in rows.columns:
        dose = pd.to_numeric(rows["concentration"], errors="coerce")
        bad = dose.isna().to_numpy() & ~is_control
        if bad.any():
            raise InputError(f"{src.where}: {int(bad.sum())} treated row(s) with an empty or non-numeric "
                             f"{src.column('concentration')!r} (e.g. {_examples(rows, bad)})")
        rows["concentration"] = dose.fillna(0.0).astype(float)
    else:
        rows["concentration"] = 0.0
    moa = rows["moa"] if "moa" in rows.columns else pd.Series(None, index=rows.index, dtype=object)
    moa = [None if control or pd.isna(m) or str(m).strip() == "" else str(m).strip()
           for m, control in zip(moa, is_control, strict=True)]
    rows["moa"] = pd.Series(moa, index=rows.index, dtype=object)
    if "moa" in src.columns:
        per_treatment = rows[~is_control].groupby(["compound", "concentration"])["moa"]
        several = per_treatment.nunique(dropna=False) > 1  # an empty MoA beside a given one counts too
        if several.any():
            compound, dose = several[several].index[0]
            values = sorted(map(str, per_treatment.get_group((compound, dose)).unique()))
            raise InputError(f"{src.where}: treatment {compound} @ {dose:g} has several values of "
                             f"{src.column('moa')!r} ({', '.join(values)}); a treatment has one MoA")
    if "batch" in rows.columns:  # the control of a treatment-level table (no wells, no tvn) needs no batch
        needs_batch = ~is_control if src.level == "treatment" else None
        refuse_missing(rows, "batch", src.column("batch"), src.where, needs_batch)
        rows["batch"] = rows["batch"].astype(str)
    elif spec.batch is not None:
        raise InputError(f"{src.where}: no batch column {spec.batch!r} (named by --batch-column)")
    else:
        rows["batch"] = "all"
    rows["role"] = np.where(is_control, "dmso", np.where(rows["moa"].notna(), "treatment", "unannotated"))
    return rows


def annotate_rows(rows: pd.DataFrame, design: pd.DataFrame | None, spec: ProfileColumns, src: Source) -> pd.DataFrame:
    """Rows with compound, concentration, moa, batch and role: from the BBBC021 design, or (None) their own."""
    if design is None:
        return own_design(rows, spec, src)
    return attach_design(rows, design, spec.batch, src)


def clean_features(x: np.ndarray, names: list[str], nan_policy: str, source: Path) -> tuple[np.ndarray, list[str], dict]:
    """Drop (or refuse) features with NaN/inf, and drop constant features; say what was dropped."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan policy must be one of {NAN_POLICIES}")
    finite = np.isfinite(x).all(axis=0)
    notes: dict = {}
    if not finite.all():
        bad = [names[i] for i in np.flatnonzero(~finite)]
        if nan_policy == "error":
            raise InputError(f"{source}: {len(bad)} feature(s) contain NaN or inf (e.g. {', '.join(map(str, bad[:5]))})")
        notes["dropped_nan_features"] = bad
    constant = np.zeros(len(names), dtype=bool)
    constant[finite] = np.ptp(x[:, finite], axis=0) == 0
    if constant.any():
        notes["dropped_constant_features"] = [names[i] for i in np.flatnonzero(constant)]
    keep = finite & ~constant
    if not keep.any():
        raise InputError(f"{source}: no usable features left after dropping NaN and constant ones "
                         f"({len(names)} feature columns, all NaN/inf or constant)")
    return x[:, keep], [n for n, k in zip(names, keep, strict=True) if k], notes


def wells_of(src: Source, design: pd.DataFrame | None, *, aggregate: str = "well",
             columns: ProfileColumns = ProfileColumns(), nan_policy: str = "drop") -> Profiles:
    """Well profiles of a read input, annotated (BBBC021 design, or None: its own columns) and cleaned."""
    if is_embedding_folder(src.path) or aggregate == "image" or "site" in src.rows.columns:
        wells, x = aggregate_to_wells(src, aggregate)
    else:
        duplicated = src.rows.duplicated(["plate", "well"])
        if duplicated.any():
            raise InputError(
                f"{src.where}: {int(duplicated.sum())} row(s) repeat a ({src.column('plate')}, {src.column('well')}) "
                f"pair (e.g. {_examples(src.rows, duplicated)}) and there is no site column to tell them apart; "
                f"name it with {LOOKUPS['site'].option}")
        wells, x = src.rows.reset_index(drop=True), src.x
    x, names, notes = clean_features(x, src.names, nan_policy, src.features_at)
    return Profiles(annotate_rows(wells, design, columns, src), x, names, src.notes | notes)


def load_wells(source: Path, design: pd.DataFrame | None, *, aggregate: str = "well",
               columns: ProfileColumns = ProfileColumns(), features: str | None = None,
               nan_policy: str = "drop") -> Profiles:
    """Well profiles from an embed folder or a profile table, annotated and cleaned."""
    return wells_of(read_source(Path(source), columns, features), design, aggregate=aggregate, columns=columns,
                    nan_policy=nan_policy)


def treatment_profiles(wells: Profiles, stat: str = "median", roles: tuple[str, ...] = ("treatment",)) -> Profiles:
    """One profile per treatment (compound, concentration) over its wells of the given roles.

    Rows are sorted by compound, then concentration: this order is the reference index that breaks
    exact ties in the nearest-neighbour search. By default DMSO, controls and unannotated wells are
    left out; "control" wells (BBBC021's taxol plate controls) never join a treatment.
    """
    if stat not in TREATMENT_STATS:
        raise ValueError(f"treatment statistic must be one of {TREATMENT_STATS}")
    if "control" in roles:
        raise ValueError("plate control wells share a treatment key with real treatments; leave them out")
    rows = wells.rows.reset_index(drop=True)
    treated = np.flatnonzero(rows["role"].isin(roles).to_numpy())
    if treated.size == 0:
        raise InputError(f"no wells of role {' or '.join(map(repr, roles))} in the profiles")
    sub = rows.iloc[treated]
    keys = [metadata.treatment_key(c, v) for c, v in zip(sub["compound"], sub["concentration"], strict=True)]
    order = sorted(set(keys))
    position = {key: i for i, key in enumerate(order)}
    codes = np.array([position[key] for key in keys])
    reduce = np.median if stat == "median" else np.mean
    features = np.stack([reduce(wells.features[treated[codes == i]], axis=0) for i in range(len(order))])
    grouped = sub.groupby(codes, sort=True)
    batches = grouped["batch"].agg(lambda s: ",".join(sorted(set(map(str, s)))))
    table = pd.DataFrame({
        "compound": [c for c, _ in order],
        "concentration": [v for _, v in order],
        "moa": grouped["moa"].first().to_numpy(),
        "batch": batches.to_numpy(),
        "n_wells": np.bincount(codes, minlength=len(order)),
        "role": grouped["role"].first().to_numpy(),
    })
    return Profiles(table, features, wells.feature_names, dict(wells.notes))


# Standard names -> pycytominer's Metadata_ columns in the tables `write_profile_tables` writes.
PYCYTOMINER_METADATA = {
    "plate": "Metadata_Plate", "well": "Metadata_Well", "compound": "Metadata_Compound",
    "concentration": "Metadata_Concentration", "moa": "Metadata_moa", "batch": "Metadata_Batch",
    "role": "Metadata_role", "n_rows": "Metadata_Object_Count", "n_wells": "Metadata_n_wells",
}
PROFILE_TABLES = ("wells.parquet", "wells_normalized.parquet", "treatments.parquet")


def pycytominer_table(rows: pd.DataFrame, x: np.ndarray, names: list[str]) -> pd.DataFrame:
    """Metadata_ columns then one column per feature: the layout pycytominer and copairs expect."""
    meta = rows[[c for c in PYCYTOMINER_METADATA if c in rows.columns]].rename(columns=PYCYTOMINER_METADATA)
    features = pd.DataFrame(np.asarray(x, dtype=np.float64), columns=[str(n) for n in names])
    return pd.concat([meta.reset_index(drop=True), features], axis=1)


def write_profile_tables(out: Path, wells: Profiles, raw: np.ndarray, stat: str) -> list[Path]:
    """Well- and treatment-level profiles as parquet tables in pycytominer's conventions.

    OUT/wells.parquet: the well means (before post-processing; pycytominer `aggregate` output);
    OUT/wells_normalized.parquet: the same after --post; OUT/treatments.parquet: the --treatment-stat
    of the normalised wells per treatment, controls and unannotated treatments included (pycytominer
    `consensus`). Features keep their names (f0, f1, ... for embeddings). Each reads back into eval.
    `wells` are wells (run_eval refuses --profiles-out on a treatment-level table before any work).
    """
    treatments = treatment_profiles(wells, stat, roles=("treatment", "unannotated", "dmso"))
    tables = (pycytominer_table(wells.rows, raw, wells.feature_names),
              pycytominer_table(wells.rows, wells.features, wells.feature_names),
              pycytominer_table(treatments.rows, treatments.features, treatments.feature_names))
    output_folder(out)  # a file in the way is an InputError, not a traceback
    for name, table in zip(PROFILE_TABLES, tables, strict=True):
        with atomic_path(out / name) as tmp:
            table.to_parquet(tmp, index=False)
    return [out / name for name in PROFILE_TABLES]
