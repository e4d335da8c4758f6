"""`fastcell eval` as a library call: profiles -> post-processing -> treatments -> NSC / NSCB, mAP -> report.

    from fastcell.evaluate.pipeline import EvalConfig, run_eval
    summary = run_eval(EvalConfig(source=Path("emb"), out=Path("report")))
    summary["nsc"], summary["nscb"], summary["drop"], summary["retrieval"]["replicate"]["map"]
    run_eval(EvalConfig(source=Path("profiles.parquet"), compound_column="Metadata_broad_sample"))
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fastcell import __version__
from fastcell.errors import InputError
from fastcell.evaluate import metrics, postprocess, profiles, report
from fastcell.evaluate.embed import input_identity
from fastcell.evaluate.neighbours import resolve_device
from fastcell.io import check_output_folder
from fastcell.settings import named_as_options, setting, validate

LEVELS = ("treatment", "cell")


@dataclass
class EvalConfig:
    """Everything `fastcell eval` needs; defaults follow the BBBC021 convention."""

    source: Path  # an `embed` folder or a well-/image-/treatment-level profile table (CSV or parquet)
    out: Path | None = None  # report folder; None writes nothing
    images: Path | None = None  # image table (BBBC021_v1_image.csv format); None: the packaged one
    moa: Path | None = None  # MoA table (compound, concentration, moa); None: the packaged one
    design: str = setting("auto", str, choices=profiles.DESIGNS)  # auto | bbbc021 (the image/MoA tables) | table (the input's own metadata columns)
    plate_column: str | None = None  # key and metadata columns; None: the usual names (profiles.LOOKUPS)
    well_column: str | None = None
    site_column: str | None = None
    compound_column: str | None = None
    dose_column: str | None = None
    moa_column: str | None = None
    batch_column: str | None = None  # None: the input's batch column, else the image table's (BBBC021: week)
    control: str = "DMSO"  # compound value of the negative-control rows (--design table)
    level: str = setting("treatment", str, choices=LEVELS)  # "treatment": 1-NN over treatment profiles; "cell": k-NN vote over cells
    post: str = setting("tvn", str, choices=postprocess.POST_METHODS)  # none | zscore | whiten | tvn
    reg: float = setting(0.1, float, low=0)  # whitening regularisation, a fraction of the mean eigenvalue (see postprocess)
    coral_reg: float = setting(1.0, float, low=0)  # tvn's per-batch CORAL regularisation (1 = CORAL's C + I)
    aggregate: str = setting("well", str, choices=profiles.AGGREGATES)  # well: mean of a well's rows; image: mean per image, then per well
    treatment_stat: str = setting("median", str, choices=profiles.TREATMENT_STATS)  # median | mean of the wells of a treatment
    features: str | None = None  # regex selecting the feature columns of a profile table
    nan_policy: str = setting("drop", str, choices=profiles.NAN_POLICIES)  # drop: features with NaN/inf are dropped (listed in the report); error
    k: int = setting(10, int, low=1)  # cell level: neighbours per cell
    queries_per_treatment: int | None = setting(None, int, low=1, optional=True)  # cell level: cap on query cells per treatment
    retrieval: bool = True  # mAP of replicate and MoA retrieval (copairs)
    null_size: int = setting(10000, int, low=1)  # copairs null distribution size (the smallest p-value is 1 / (null_size + 1))
    alpha: float = setting(0.05, float, low=0, high=1, low_open=True, high_open=True)  # a group counts as retrieved when its corrected p-value is below alpha
    profiles_out: Path | None = None  # folder for pycytominer-style wells/treatments parquet tables
    map: str = setting("pca", str, choices=report.MAPS)  # 2-D map of treatment profiles: pca | tsne
    device: str = "auto"  # FAISS index: auto | cpu | gpu
    seed: int = 0

    def columns(self) -> profiles.ProfileColumns:
        return profiles.ProfileColumns(
            plate=self.plate_column, well=self.well_column, site=self.site_column, compound=self.compound_column,
            dose=self.dose_column, moa=self.moa_column, batch=self.batch_column, control=self.control)

    def check(self) -> None:
        """InputError naming the option of the first setting out of its choices or range, or a bad input."""
        with named_as_options(EvalConfig):
            validate(self)
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
        if self.profiles_out is not None:  # before the work, not a traceback from mkdir at its end
            check_output_folder(self.profiles_out)


def _one_compound_moas(nsc: metrics.Score) -> dict:
    """A note naming the MoAs NSC scores that have a single compound: no reference of another compound shares
    their MoA, so their treatments are wrong whatever the representation (BBBC021 has none; a design table may)."""
    if nsc.accuracy is None:
        return {}
    compounds = nsc.table.groupby("moa")["compound"].nunique()
    lonely = sorted(compounds[compounds < 2].index)
    return {"nsc_moas_with_one_compound": lonely} if lonely else {}


def _summarise_notes(notes: dict) -> dict:
    """Long lists (dropped features) as a count plus the first names."""
    out = {}
    for key, value in notes.items():
        if isinstance(value, list) and len(value) > 10:
            out[key] = {"count": len(value), "first": [str(v) for v in value[:10]]}
        else:
            out[key] = value
    return out


@contextmanager
def _naming(source: Path):
    """InputErrors of the steps that do not know the input (post-processing, metrics) start with its path."""
    try:
        yield
    except InputError as err:
        raise InputError(f"{source}: {err}") from err


def _post_process(cfg: EvalConfig, rows, x, dtype=np.float64) -> np.ndarray:
    """cfg.post fitted on rows and applied; its errors (no DMSO in a batch, ...) name the input."""
    batch = rows["batch"].to_numpy()
    with _naming(cfg.source):
        transform = postprocess.fit_postprocess(x, cfg.post, is_dmso=(rows["role"] == "dmso").to_numpy(),
                                                batch=batch, reg=cfg.reg, coral_reg=cfg.coral_reg)
        return transform.apply(x, batch, dtype=dtype)


def _treatment_level(cfg: EvalConfig, treatments: profiles.Profiles | None,
                     device: str) -> tuple[metrics.Score, metrics.Score]:
    if treatments is None:
        return metrics.not_scored("nsc"), metrics.not_scored("nscb")
    with _naming(cfg.source):  # a single compound, a treatment in two batches, ...
        nsc = metrics.nearest_treatment(treatments.rows, treatments.features, across_batches=False, device=device)
        nscb = metrics.nearest_treatment(treatments.rows, treatments.features, across_batches=True, device=device)
    return nsc, nscb


def _cell_level(cfg: EvalConfig, src: profiles.Source, design, device: str):
    cells = profiles.annotate_rows(src.rows, design, cfg.columns(), src)
    x = np.asarray(src.x, dtype=np.float32)  # finite: read_source refuses cells with NaN or inf
    x = _post_process(cfg, cells, x, dtype=np.float32)
    kwargs = dict(k=cfg.k, queries_per_treatment=cfg.queries_per_treatment, seed=cfg.seed, device=device)
    with _naming(cfg.source):
        nsc, nsc_cells = metrics.score_cells(cells, x, across_batches=False, **kwargs)
        nscb, nscb_cells = metrics.score_cells(cells, x, across_batches=True, **kwargs)
    extra = {"cell_accuracy_nsc": nsc_cells, "cell_accuracy_nscb": nscb_cells,
             "n_query_cells": int(nsc.table["n_query_cells"].sum()) if nsc.accuracy is not None else 0}
    return nsc, nscb, extra


def _not_applicable(wells, nsc: metrics.Score, nscb: metrics.Score, has_moa_column: bool) -> dict:
    """Why NSC or NSCB has no value, for the report (empty when both have one)."""
    reasons = {score.name: score.reason for score in (nsc, nscb) if score.accuracy is None and score.reason}
    if nsc.accuracy is None and "nsc" not in reasons:  # no MoA at all: neither is scored
        reasons["nsc"] = reasons["nscb"] = (
            "no treatment has a MoA" if has_moa_column else "no MoA labels: name the MoA column with --moa-column")
    elif nscb.accuracy is None and "nscb" not in reasons:
        batches = sorted(set(wells.rows.loc[wells.rows["role"] == "treatment", "batch"]))
        reasons["nscb"] = (f"one batch ({batches[0]}): NSCB needs treatments in two or more batches; name the "
                           "batch column with --batch-column" if len(batches) == 1
                           else "no MoA has treatments in more than one batch")
    return reasons


def _retrieval(cfg: EvalConfig, wells, treatments) -> dict[str, metrics.Retrieval]:
    if not cfg.retrieval:
        return {}
    kwargs = dict(null_size=cfg.null_size, alpha=cfg.alpha, seed=cfg.seed)
    found = {"replicate": metrics.replicate_retrieval(wells.rows, wells.features, **kwargs)}
    found["moa"] = (metrics.moa_retrieval(treatments.rows, treatments.features, **kwargs) if treatments is not None
                    else metrics.Retrieval.not_applicable("moa", "no treatment has a MoA"))
    return found


def _check_treatment_level(cfg: EvalConfig, design) -> None:
    """Refuse, before any work, what a treatment-level table (e.g. a consensus table) cannot do."""
    table = f"{cfg.source}: a treatment-level table (one row per treatment, no plate/well)"
    if cfg.post != "none":
        raise InputError(f"{table} is scored as it is; post-processing needs wells: pass --post none")
    if design is not None:
        raise InputError(f"{table} has no plate/well to join the BBBC021 tables on; use --design table")
    if cfg.profiles_out is not None:
        raise InputError(f"{table} has no wells to write profile tables of (its rows are the treatment "
                         "profiles already): drop --profiles-out")


def run_eval(cfg: EvalConfig) -> dict:
    """Score a representation by MoA nearest neighbours and retrieval mAP; write the report when cfg.out is set.

    Returns the summary written to report.json: nsc, nscb, drop (fractions; None with a reason in
    not_applicable when a screen cannot have them), n_nsc, n_nscb, retrieval ({"settings": {null_size,
    alpha}, "replicate": {map, fraction_retrieved, n, not_applicable, unscored}, "moa": {...}}; {} with
    retrieval off), the settings, counts of wells by role, and notes on anything dropped.
    """
    started = time.perf_counter()
    cfg.check()
    source = Path(cfg.source)
    device = resolve_device(cfg.device)
    spec = cfg.columns()
    src = profiles.read_source(source, spec, cfg.features)
    design = profiles.choose_design(cfg.design, src.rows["plate"], cfg.images, cfg.moa)
    if src.level == "treatment":
        _check_treatment_level(cfg, design)
    wells = profiles.wells_of(src, design, aggregate=cfg.aggregate, columns=spec, nan_policy=cfg.nan_policy)
    raw_features = wells.features
    wells.features = _post_process(cfg, wells.rows, wells.features)
    treatments = (profiles.treatment_profiles(wells, cfg.treatment_stat)
                  if wells.rows["role"].eq("treatment").any() else None)
    if cfg.level == "treatment":
        nsc, nscb = _treatment_level(cfg, treatments, device)
        extra = {}
    else:
        nsc, nscb, extra = _cell_level(cfg, src, design, device)
    retrieval = _retrieval(cfg, wells, treatments)
    if cfg.profiles_out is not None:
        profiles.write_profile_tables(Path(cfg.profiles_out), wells, raw_features, cfg.treatment_stat)
    roles = wells.rows["role"].value_counts().to_dict()
    drop = None if nsc.accuracy is None or nscb.accuracy is None else nsc.accuracy - nscb.accuracy
    summary = {
        "nsc": nsc.accuracy, "nscb": nscb.accuracy, "drop": drop, "n_nsc": nsc.n, "n_nscb": nscb.n,
        **extra,
        "nscb_left_out_moas": nscb.left_out_moas,
        "not_applicable": _not_applicable(wells, nsc, nscb, has_moa_column=design is not None or "moa" in src.columns),
        "n_moas": int(nsc.table["moa"].nunique()),
    }
    summary |= {
        "retrieval": ({"settings": {"null_size": cfg.null_size, "alpha": cfg.alpha}} if retrieval else {})
        | {name: found.summary() for name, found in retrieval.items()},
        "n_wells": int(len(wells.rows)), "wells_by_role": {str(k): int(v) for k, v in roles.items()},
        "n_features": len(wells.feature_names),
        "source": str(source), "inputs": input_identity(source), "input_level": src.level,
        "design": "table" if design is None else "bbbc021", "columns": src.columns, "level": cfg.level, "post": cfg.post,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "faiss_device": device, "notes": _summarise_notes(wells.notes | _one_compound_moas(nsc)),
        "seconds": round(time.perf_counter() - started, 3), "created_by": f"fastcell {__version__}",
    }
    if cfg.out is not None:
        mapped = treatments if cfg.level == "treatment" else None  # the 2-D map shows treatment profiles
        report.write_report(Path(cfg.out), summary, nsc, nscb, metrics.per_moa(nsc, nscb),
                            None if mapped is None else mapped.rows, None if mapped is None else mapped.features,
                            cfg.map, cfg.seed, retrieval)
    return summary
