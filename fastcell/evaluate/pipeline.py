"""`fastcell eval` as a library call: profiles -> post-processing -> treatments -> NSC / NSCB -> report.

    from fastcell.evaluate.pipeline import EvalConfig, run_eval
    summary = run_eval(EvalConfig(source=Path("emb"), out=Path("report")))
    summary["nsc"], summary["nscb"], summary["drop"]
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fastcell import __version__
from fastcell.errors import InputError
from fastcell.evaluate import metrics, postprocess, profiles, report
from fastcell.evaluate.embed import input_identity
from fastcell.evaluate.neighbours import resolve_device

LEVELS = ("treatment", "cell")


@dataclass
class EvalConfig:
    """Everything `fastcell eval` needs; defaults follow the BBBC021 convention."""

    source: Path  # an `embed` folder or a well-/image-level profile table (CSV or parquet)
    out: Path | None = None  # report folder; None writes nothing
    images: Path | None = None  # image table (BBBC021_v1_image.csv format); None: the packaged one
    moa: Path | None = None  # MoA table (compound, concentration, moa); None: the packaged one
    level: str = "treatment"  # "treatment": 1-NN over treatment profiles; "cell": k-NN vote over cells
    post: str = "tvn"  # none | zscore | whiten | tvn
    reg: float = 0.1  # whitening regularisation, a fraction of the mean eigenvalue (see postprocess)
    coral_reg: float = 1.0  # tvn's per-batch CORAL regularisation (1 = CORAL's C + I)
    aggregate: str = "well"  # well: mean of a well's rows; image: mean per image, then per well
    treatment_stat: str = "median"  # median | mean of the wells of a treatment
    batch_column: str = "batch"  # from the profiles if present, else the image table (BBBC021: week)
    features: str | None = None  # regex selecting the feature columns of a profile table
    nan_policy: str = "drop"  # drop: features with NaN/inf are dropped (listed in the report); error
    k: int = 10  # cell level: neighbours per cell
    queries_per_treatment: int | None = None  # cell level: cap on query cells per treatment
    map: str = "pca"  # 2-D map of treatment profiles: pca | tsne
    device: str = "auto"  # FAISS index: auto | cpu | gpu
    seed: int = 0

    def check(self) -> None:
        if self.level not in LEVELS:
            raise InputError(f"--level must be one of {', '.join(LEVELS)}, not {self.level!r}")
        if self.post not in postprocess.POST_METHODS:
            raise InputError(f"--post must be one of {', '.join(postprocess.POST_METHODS)}, not {self.post!r}")
        for name, value, allowed in (("aggregate", self.aggregate, profiles.AGGREGATES),
                                     ("treatment-stat", self.treatment_stat, profiles.TREATMENT_STATS),
                                     ("nan-policy", self.nan_policy, profiles.NAN_POLICIES),
                                     ("map", self.map, report.MAPS)):
            if value not in allowed:
                raise InputError(f"--{name} must be one of {', '.join(allowed)}, not {value!r}")
        if self.reg < 0 or self.coral_reg < 0 or self.k < 1:
            raise InputError("--reg and --coral-reg must be >= 0 and --k >= 1")
        if self.queries_per_treatment is not None and self.queries_per_treatment < 1:
            raise InputError(f"--queries-per-treatment must be at least 1, got {self.queries_per_treatment}")
        if self.features is not None:
            try:
                re.compile(self.features)
            except re.error as err:
                raise InputError(f"--features {self.features!r}: not a valid regular expression ({err})") from None
        source = Path(self.source)
        if source.is_dir() and not profiles.is_embedding_folder(source):
            missing = [n for n in (profiles.EMBEDDINGS_NAME, profiles.CELLS_NAME) if not (source / n).is_file()]
            raise InputError(f"{source}: a folder without {' and '.join(missing)}; eval reads a `fastcell embed` "
                             "output folder (embeddings.npy + cells.parquet) or a profile table (CSV/parquet)")
        if self.level == "cell" and not profiles.is_embedding_folder(Path(self.source)):
            raise InputError(f"{self.source}: --level cell needs an embed folder (embeddings.npy + cells.parquet)")


def _summarise_notes(notes: dict) -> dict:
    """Long lists (dropped features) as a count plus the first names."""
    out = {}
    for key, value in notes.items():
        if isinstance(value, list) and len(value) > 10:
            out[key] = {"count": len(value), "first": [str(v) for v in value[:10]]}
        else:
            out[key] = value
    return out


def _treatment_level(cfg: EvalConfig, wells: profiles.Profiles, device: str):
    rows = wells.rows
    transform = postprocess.fit_postprocess(
        wells.features, cfg.post, is_dmso=(rows["role"] == "dmso").to_numpy(),
        batch=rows["batch"].to_numpy(), reg=cfg.reg, coral_reg=cfg.coral_reg)
    wells.features = transform.apply(wells.features, rows["batch"].to_numpy())
    treatments = profiles.treatment_profiles(wells, cfg.treatment_stat)
    nsc = metrics.nearest_treatment(treatments.rows, treatments.features, across_batches=False, device=device)
    nscb = metrics.nearest_treatment(treatments.rows, treatments.features, across_batches=True, device=device)
    return treatments, nsc, nscb, {}


def _cell_level(cfg: EvalConfig, design, device: str):
    cells, emb = profiles.load_embeddings(Path(cfg.source))
    cells = profiles.attach_design(cells[[c for c in cells.columns if c not in ("moa", "role")]], design,
                                   cfg.batch_column, Path(cfg.source))
    x = np.asarray(emb, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InputError(f"{cfg.source}: embeddings contain NaN or inf (cell level does not drop features)")
    batch = cells["batch"].to_numpy()
    transform = postprocess.fit_postprocess(
        x, cfg.post, is_dmso=(cells["role"] == "dmso").to_numpy(), batch=batch, reg=cfg.reg,
        coral_reg=cfg.coral_reg)
    x = transform.apply(x, batch, dtype=np.float32)
    kwargs = dict(k=cfg.k, queries_per_treatment=cfg.queries_per_treatment, seed=cfg.seed, device=device)
    nsc, nsc_cells = metrics.score_cells(cells, x, across_batches=False, **kwargs)
    nscb, nscb_cells = metrics.score_cells(cells, x, across_batches=True, **kwargs)
    extra = {"cell_accuracy_nsc": nsc_cells, "cell_accuracy_nscb": nscb_cells,
             "n_query_cells": int(nsc.table["n_query_cells"].sum())}
    return nsc.table[["compound", "concentration", "moa"]], nsc, nscb, extra


def run_eval(cfg: EvalConfig) -> dict:
    """Score a representation by MoA nearest neighbours; write the report when cfg.out is set.

    Returns the summary written to report.json: nsc, nscb, drop (fractions), n_nsc, n_nscb, the
    settings, counts of wells by role, and notes on anything dropped.
    """
    started = time.perf_counter()
    cfg.check()
    source = Path(cfg.source)
    device = resolve_device(cfg.device)
    design = profiles.wells_design(cfg.images, cfg.moa)
    wells = profiles.load_wells(source, design, aggregate=cfg.aggregate, batch_column=cfg.batch_column,
                                features=cfg.features, nan_policy=cfg.nan_policy)
    roles = wells.rows["role"].value_counts().to_dict()
    notes = _summarise_notes(wells.notes)
    if cfg.level == "treatment":
        treatments, nsc, nscb, extra = _treatment_level(cfg, wells, device)
        treatment_rows, treatment_x = treatments.rows, treatments.features
    else:
        treatment_rows, nsc, nscb, extra = _cell_level(cfg, design, device)
        treatment_x = None
    drop = None if nsc.accuracy is None or nscb.accuracy is None else nsc.accuracy - nscb.accuracy
    summary = {
        "nsc": nsc.accuracy, "nscb": nscb.accuracy, "drop": drop, "n_nsc": nsc.n, "n_nscb": nscb.n,
        **extra,
        "nscb_left_out_moas": nscb.left_out_moas,
        "n_moas": int(nsc.table["moa"].nunique()),
        "n_wells": int(len(wells.rows)), "wells_by_role": {str(k): int(v) for k, v in roles.items()},
        "n_features": len(wells.feature_names),
        "source": str(source), "inputs": input_identity(source), "level": cfg.level, "post": cfg.post,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "faiss_device": device, "notes": notes, "seconds": round(time.perf_counter() - started, 3),
        "created_by": f"fastcell {__version__}",
    }
    if cfg.out is not None:
        report.write_report(Path(cfg.out), summary, nsc, nscb, metrics.per_moa(nsc, nscb), treatment_rows,
                            treatment_x, cfg.map, cfg.seed)
    return summary
