"""From cells (or a profile table) to well profiles, annotated with the screen's design, to treatments.

The BBBC021 convention: cell embeddings -> mean per well (or mean per image, then per well) ->
post-processing (see `postprocess`) -> median per treatment (compound, concentration).

Inputs are either an `embed` output folder (`embeddings.npy` + `cells.parquet`) or a table of
profiles keyed by `plate` and `well` (+ `site` for image-level rows), CSV or parquet, such as
CellProfiler per-well mean features. Either way the wells are joined on (plate, well) to the
design (`fastcell.metadata.annotate` of the image and MoA tables), which gives every well its
compound, concentration, batch, MoA and role; compound or concentration columns present in the
input must agree with the design, so a table that does not match the profiles is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fastcell import metadata
from fastcell.errors import InputError

EMBEDDINGS_NAME = "embeddings.npy"
CELLS_NAME = "cells.parquet"
AGGREGATES = ("well", "image")
TREATMENT_STATS = ("median", "mean")
NAN_POLICIES = ("drop", "error")
# Columns of a profile table that are never features.
NON_FEATURE_COLUMNS = {
    "id", "plate", "well", "site", "batch", "compound", "concentration", "moa", "role", "x", "y",
    "image", "split", "shard", "TableNumber", "ImageNumber", "Replicate", "ObjectNumber",
}


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
    for column in ("plate", "well"):
        if column not in cells.columns:
            raise InputError(f"{folder / CELLS_NAME}: missing column {column!r}")
    return cells, emb


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


def aggregate_to_wells(
    rows: pd.DataFrame, x: np.ndarray, aggregate: str, source: Path, carry: tuple[str, ...] = ()
) -> tuple[pd.DataFrame, np.ndarray]:
    """Mean per well of the rows of x; with aggregate="image", mean per (plate, well, site) first.

    Columns in `carry` (compound, batch, ...) must be constant within a well and are kept.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, not {aggregate!r}")
    keys = ["plate", "well"]
    rows = rows.reset_index(drop=True)
    if aggregate == "image":
        if "site" not in rows.columns:
            raise InputError(f"{source}: --aggregate image needs a 'site' column")
        image_codes, images = pd.factorize(pd.MultiIndex.from_frame(rows[keys + ["site"]].astype(str)), sort=True)
        x = group_means(image_codes, len(images), x)
        rows = rows.groupby(image_codes, sort=True).first().reset_index(drop=True)
    codes, wells = pd.factorize(pd.MultiIndex.from_frame(rows[keys].astype(str)), sort=True)
    means = group_means(codes, len(wells), x)
    per_well = rows.groupby(codes, sort=True)
    table = pd.DataFrame({"plate": wells.get_level_values(0), "well": wells.get_level_values(1)})
    table["n_rows"] = np.bincount(codes, minlength=len(wells))
    for column in dict.fromkeys(carry):
        if column in rows.columns:
            distinct = per_well[column].nunique(dropna=False)
            if (distinct > 1).any():
                bad = table.iloc[int(np.flatnonzero(distinct.to_numpy() > 1)[0])]
                raise InputError(f"{source}: well {bad.plate} {bad.well} has several values of {column!r}")
            table[column] = per_well[column].first().to_numpy()
    return table, means


def feature_columns(table: pd.DataFrame, pattern: str | None, source: Path) -> list[str]:
    """Numeric columns that are features: matching `pattern` (a regex) if given, else all but metadata."""
    numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c]) and c not in NON_FEATURE_COLUMNS]
    if pattern is not None:
        regex = re.compile(pattern)
        numeric = [c for c in numeric if regex.search(str(c))]
    if not numeric:
        raise InputError(f"{source}: no numeric feature columns" + (f" match {pattern!r}" if pattern else ""))
    return numeric


def wells_design(images: Path | None, moa: Path | None) -> pd.DataFrame:
    """The annotated design (fastcell.metadata) reduced to one row per (plate, well)."""
    design = metadata.annotate(metadata.load_image_table(images), metadata.load_moa_table(moa))
    columns = ["plate", "well", "compound", "concentration", "batch", "moa", "role"]
    return design.drop_duplicates(["plate", "well"])[columns].reset_index(drop=True)


def attach_design(rows: pd.DataFrame, design: pd.DataFrame, batch_column: str, source: Path) -> pd.DataFrame:
    """Join rows (with plate, well) to the per-well design; check agreement; set `batch`.

    The batch is the input's `batch_column` when it has one, else the design's (BBBC021: the week).
    """
    rows = rows.drop(columns=[c for c in ("moa", "role") if c in rows.columns])  # the design's are authoritative
    rows["plate"], rows["well"] = rows["plate"].astype(str), rows["well"].astype(str)
    joined = rows.merge(design, on=["plate", "well"], how="left", suffixes=("", "_design"), indicator=True)
    missing = joined["_merge"] == "left_only"
    if missing.any():
        examples = ", ".join(f"{p} {w}" for p, w in joined.loc[missing, ["plate", "well"]].head(3).itertuples(index=False))
        raise InputError(
            f"{source}: {int(missing.sum())} well(s) are not in the image table (e.g. {examples}); "
            "pass the screen's own table with --images"
        )
    for column in ("compound", "concentration"):
        if column in rows.columns:
            ours, theirs = joined[column], joined[f"{column}_design"]
            if column == "concentration":
                differ = ~np.isclose(ours.astype(float), theirs.astype(float), rtol=1e-6, atol=1e-9)
            else:
                differ = (ours.astype(str) != theirs.astype(str)).to_numpy()
            if differ.any():
                first = joined[differ].iloc[0]
                raise InputError(
                    f"{source}: {int(differ.sum())} well(s) disagree with the image table on {column} "
                    f"(e.g. {first.plate} {first.well}: {first[column]!r} vs {first[column + '_design']!r}); "
                    "the metadata does not match these profiles"
                )
            joined[column] = theirs
    if batch_column in rows.columns:
        batch = rows[batch_column]
    elif batch_column in design.columns:
        batch = joined[batch_column]
    else:
        raise InputError(f"{source}: no batch column {batch_column!r} in the profiles nor in the image table")
    joined["batch"] = batch.astype(str).to_numpy()
    return joined.drop(columns=[c for c in joined.columns if c.endswith("_design") or c == "_merge"])


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
    constant = finite & (np.nanmax(x, axis=0) == np.nanmin(x, axis=0))
    if constant.any():
        notes["dropped_constant_features"] = [names[i] for i in np.flatnonzero(constant)]
    keep = finite & ~constant
    if not keep.any():
        raise InputError(f"{source}: no usable features left after dropping NaN and constant ones")
    return x[:, keep], [n for n, k in zip(names, keep, strict=True) if k], notes


def load_wells(
    source: Path,
    design: pd.DataFrame,
    *,
    aggregate: str = "well",
    batch_column: str = "batch",
    features: str | None = None,
    nan_policy: str = "drop",
) -> Profiles:
    """Well profiles from an embed folder or a profile table, annotated and cleaned."""
    carry = ("compound", "concentration", batch_column)
    if is_embedding_folder(source):
        cells, emb = load_embeddings(source)
        wells, x = aggregate_to_wells(cells, emb, aggregate, source, carry)
        names = [f"f{i}" for i in range(x.shape[1])]
    else:
        table = read_table(source)
        for column in ("plate", "well"):
            if column not in table.columns:
                raise InputError(f"{source}: missing key column {column!r} (profiles are keyed by plate and well)")
        names = feature_columns(table, features, source)
        values = table[names].to_numpy(dtype=np.float64)
        if aggregate == "image" or "site" in table.columns:
            wells, x = aggregate_to_wells(table, values, aggregate, source, carry)
        else:
            duplicated = table.duplicated(["plate", "well"])
            if duplicated.any():
                raise InputError(f"{source}: {int(duplicated.sum())} duplicate (plate, well) rows and no 'site' column")
            keep = [c for c in ("plate", "well", *carry) if c in table.columns]
            wells, x = table[list(dict.fromkeys(keep))].reset_index(drop=True), values
    x, names, notes = clean_features(x, names, nan_policy, source)
    wells = attach_design(wells, design, batch_column, source)
    return Profiles(wells, x, names, notes)


def treatment_profiles(wells: Profiles, stat: str = "median") -> Profiles:
    """One profile per treatment (compound, concentration) over its wells of role "treatment".

    Rows are sorted by compound, then concentration: this order is the reference index that breaks
    exact ties in the nearest-neighbour search. DMSO, controls and unannotated wells are left out.
    """
    if stat not in TREATMENT_STATS:
        raise ValueError(f"treatment statistic must be one of {TREATMENT_STATS}")
    rows = wells.rows.reset_index(drop=True)
    treated = np.flatnonzero((rows["role"] == "treatment").to_numpy())
    if treated.size == 0:
        raise InputError("no wells of an annotated treatment (role 'treatment') in the profiles")
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
    })
    return Profiles(table, features, wells.feature_names, dict(wells.notes))
