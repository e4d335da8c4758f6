"""MoA prediction accuracy by nearest neighbours: NSC, NSCB and drop, per treatment and per MoA.

Treatment level (the BBBC021 convention, Ljosa et al. 2013): each treatment profile is a query;
its prediction is the MoA of its cosine nearest neighbour among the other treatments.

- NSC (not-same-compound): references exclude every treatment of the query's compound (its other
  doses too). Scored over all annotated treatments (103 for BBBC021).
- NSCB (not-same-compound-or-batch): references also exclude every treatment of the query's batch,
  and MoAs whose treatments all sit in one batch are left out entirely, as queries and as references
  (they could never be predicted correctly). 92 treatments for BBBC021.
- drop = NSC - NSCB (a fraction; positive when batch effects helped NSC).

Accuracies are means over treatments. Neighbours come from `neighbours.knn_excluding`, whose
documented tie rule picks, among equally similar references, the one earliest in the treatment
table (sorted by compound, then concentration).

Retrieval (`replicate_retrieval`, `moa_retrieval`): mean average precision through `copairs`
(the JUMP-era metric), cosine similarity, one-sided p-values against copairs' null distribution,
Benjamini-Hochberg corrected; a group counts as retrieved when its corrected p < alpha.

- replicate retrieval: each treated well ranks its treatment's other wells against the control
  wells (copairs' "phenotypic activity"); mAP per treatment (compound, dose).
- MoA retrieval: each annotated treatment profile ranks the treatments of its MoA from other
  compounds against those of other MoAs; mAP per MoA.

Cell level (`score_cells`): every cell of an annotated treatment votes with the MoAs of its k
nearest cells from other compounds (and other batches for the B variant); a treatment's prediction
is the MoA with most votes over all its cells (ties: the alphabetically first MoA).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fastcell.errors import InputError
from fastcell.evaluate.neighbours import knn_excluding


@dataclass
class Score:
    """One metric (NSC or NSCB): accuracy, the scored treatments and their predictions."""

    name: str
    accuracy: float | None
    table: pd.DataFrame  # one row per scored treatment: true moa, predicted moa, neighbour, correct
    left_out_moas: list[str]
    reason: str | None = None  # why accuracy is None, when the caller cannot tell (see `one_moa`)

    @property
    def n(self) -> int:
        return len(self.table)


SCORE_COLUMNS = ["compound", "concentration", "moa", "batch", "neighbour_compound", "neighbour_concentration",
                 "neighbour_moa", "similarity", "correct"]


def not_scored(name: str, left_out_moas: list[str] | None = None, reason: str | None = None) -> Score:
    """A score with nothing scored (a screen without MoA labels, NSCB with every MoA left out, one MoA):
    accuracy None, an empty table."""
    return Score(name, None, pd.DataFrame(columns=SCORE_COLUMNS), left_out_moas or [], reason)


def one_moa(name: str, moas: pd.Series, left_out: list[str]) -> Score | None:
    """`not_scored` when the treatments to score share one MoA: every neighbour would have it too, so the
    accuracy would be 1.0 whatever the profiles; else None (score them)."""
    if moas.nunique() > 1:
        return None
    return not_scored(name, left_out, f"the scored treatments share one MoA ({moas.iloc[0]}): every nearest "
                                      "neighbour would too, so its accuracy would be 1.0 whatever the profiles")


def multi_batch_moas(treatments: pd.DataFrame) -> set[str]:
    """MoAs whose treatments span more than one batch: the only ones NSCB can score."""
    per_moa = treatments.groupby("moa")["batch"].nunique()
    return set(per_moa[per_moa > 1].index)


def _check_single_batch(treatments: pd.DataFrame) -> None:
    multi = treatments["batch"].astype(str).str.contains(",")
    if multi.any():
        row = treatments[multi].iloc[0]
        raise InputError(
            f"treatment {row.compound} @ {row.concentration:g} spans batches {row.batch}; "
            "NSCB needs each treatment in one batch (choose --batch-column accordingly)"
        )


def nearest_treatment(
    treatments: pd.DataFrame, profiles: np.ndarray, *, across_batches: bool, device: str = "auto"
) -> Score:
    """NSC (across_batches=False) or NSCB (True) over the rows of `treatments` (compound, concentration,
    moa, batch), with `profiles` row-aligned to them."""
    treatments = treatments.reset_index(drop=True)
    if treatments["moa"].isna().any():
        bad = treatments[treatments["moa"].isna()].iloc[0]
        raise InputError(f"treatment {bad.compound} @ {bad.concentration:g} has no MoA; it cannot be scored")
    name = "nscb" if across_batches else "nsc"
    left_out: list[str] = []
    rows = np.arange(len(treatments))
    if across_batches:
        _check_single_batch(treatments)
        scorable = multi_batch_moas(treatments)
        left_out = sorted(set(treatments["moa"]) - scorable)
        rows = np.flatnonzero(treatments["moa"].isin(scorable).to_numpy())
    sub = treatments.iloc[rows].reset_index(drop=True)
    if len(sub) == 0:
        return not_scored(name, left_out)
    if sub["compound"].nunique() < 2:
        raise InputError(f"{name}: the treatments come from a single compound; there is nothing to compare")
    if (trivial := one_moa(name, sub["moa"], left_out)) is not None:
        return trivial
    labels = [sub["compound"].to_numpy()] + ([sub["batch"].to_numpy()] if across_batches else [])
    found = knn_excluding(profiles[rows], profiles[rows], 1, labels, labels, device=device)
    neighbour = found.index[:, 0]
    if (neighbour < 0).any():
        bad = sub.iloc[int(np.flatnonzero(neighbour < 0)[0])]
        raise InputError(f"{name}: treatment {bad.compound} @ {bad.concentration:g} has no allowed reference")
    table = sub[["compound", "concentration", "moa", "batch"]].copy()
    table["neighbour_compound"] = sub["compound"].to_numpy()[neighbour]
    table["neighbour_concentration"] = sub["concentration"].to_numpy()[neighbour]
    table["neighbour_moa"] = sub["moa"].to_numpy()[neighbour]
    table["similarity"] = found.similarity[:, 0]
    table["correct"] = table["neighbour_moa"].to_numpy() == table["moa"].to_numpy()
    return Score(name, float(table["correct"].mean()), table, left_out)


def per_moa(nsc: Score, nscb: Score) -> pd.DataFrame:
    """Accuracy per MoA for NSC and NSCB (NaN where a MoA is not scored)."""
    def summary(score: Score) -> pd.DataFrame:
        grouped = score.table.groupby("moa")["correct"]
        return pd.DataFrame({f"n_{score.name}": grouped.size(), score.name: grouped.mean().astype(float)})

    table = summary(nsc).join(summary(nscb), how="outer")
    for column in ("n_nsc", "n_nscb"):
        table[column] = table[column].astype("Int64")  # counts stay integers beside missing ones
    table.index.name = "moa"
    return table.reset_index()


def score_cells(
    cells: pd.DataFrame,
    features: np.ndarray,
    *,
    k: int,
    across_batches: bool,
    queries_per_treatment: int | None = None,
    seed: int = 0,
    device: str = "auto",
) -> tuple[Score, float | None]:
    """Cell-level k-NN MoA vote, scored per treatment. Returns (score, cell accuracy; None when not scored).

    `cells` (compound, concentration, moa, batch, role) is row-aligned with `features`; only cells
    of role "treatment" take part. `queries_per_treatment` caps the query cells of each treatment
    (a seeded sample; references are always all cells), to bound CPU time on large screens.
    """
    name = "nscb" if across_batches else "nsc"
    cells = cells.reset_index(drop=True)
    ref_rows = np.flatnonzero((cells["role"] == "treatment").to_numpy())
    if ref_rows.size == 0:
        raise InputError("cell level: no cells of an annotated treatment")
    treatment_ids, _ = pd.factorize(
        pd.MultiIndex.from_frame(cells.iloc[ref_rows][["compound", "concentration"]]), sort=True)
    per_treatment = cells.iloc[ref_rows].groupby(treatment_ids, sort=True).first()
    left_out: list[str] = []
    if across_batches:
        table = per_treatment[["compound", "concentration", "moa", "batch"]]
        per_treatment_batches = cells.iloc[ref_rows].groupby(treatment_ids)["batch"].nunique()
        if (per_treatment_batches > 1).any():
            raise InputError("cell level NSCB: a treatment spans several batches")
        scorable = multi_batch_moas(table)
        left_out = sorted(set(table["moa"]) - scorable)
        keep = cells.iloc[ref_rows]["moa"].isin(scorable).to_numpy()
        ref_rows, treatment_ids = ref_rows[keep], treatment_ids[keep]
        if ref_rows.size == 0:
            return not_scored(name, left_out), None
    if (trivial := one_moa(name, cells["moa"].iloc[ref_rows], left_out)) is not None:
        return trivial, None
    rng = np.random.default_rng(seed)
    query_pos = np.arange(ref_rows.size)
    if queries_per_treatment is not None:
        picks = [rng.permutation(np.flatnonzero(treatment_ids == t))[:queries_per_treatment]
                 for t in np.unique(treatment_ids)]
        query_pos = np.sort(np.concatenate(picks))
    ref_cells = cells.iloc[ref_rows]
    labels = [ref_cells["compound"].to_numpy()] + ([ref_cells["batch"].to_numpy()] if across_batches else [])
    query_labels = [lab[query_pos] for lab in labels]
    ref_x = np.asarray(features[ref_rows], dtype=np.float32)
    found = knn_excluding(ref_x, ref_x[query_pos], k, labels, query_labels, device=device)
    moas, moa_codes = np.unique(ref_cells["moa"].to_numpy().astype(str), return_inverse=True)
    votes_per_cell = np.zeros((query_pos.size, len(moas)), dtype=np.int64)
    for j in range(k):
        hit = found.index[:, j] >= 0
        np.add.at(votes_per_cell, (np.flatnonzero(hit), moa_codes[found.index[hit, j]]), 1)
    true_codes = moa_codes[query_pos]
    voted = votes_per_cell.sum(axis=1) > 0  # a cell without any allowed neighbour counts as wrong
    cell_accuracy = float((voted & (votes_per_cell.argmax(axis=1) == true_codes)).mean())  # ties: first MoA
    query_treatments = treatment_ids[query_pos]
    n_t = int(query_treatments.max()) + 1
    votes = np.zeros((n_t, len(moas)), dtype=np.int64)
    np.add.at(votes, query_treatments, votes_per_cell)
    scored = np.unique(query_treatments)
    predicted = moas[votes[scored].argmax(axis=1)]
    info = per_treatment.iloc[scored]
    table = pd.DataFrame({
        "compound": info["compound"].to_numpy(), "concentration": info["concentration"].to_numpy(),
        "moa": info["moa"].to_numpy(), "batch": info["batch"].to_numpy(),
        "n_query_cells": np.bincount(query_treatments)[scored], "predicted_moa": predicted,
        "vote_share": votes[scored].max(axis=1) / votes[scored].sum(axis=1).clip(1),
    })
    table["correct"] = table["predicted_moa"].to_numpy() == table["moa"].to_numpy()
    return Score(name, float(table["correct"].mean()), table, left_out), cell_accuracy


RETRIEVAL_COLUMNS = ["mean_average_precision", "mean_normalized_average_precision", "p_value",
                     "corrected_p_value", "retrieved"]
RETRIEVAL_GROUPS = {"replicate": ["compound", "concentration"], "moa": ["moa"]}  # what each task scores mAP per


@dataclass
class Retrieval:
    """One copairs retrieval task: mAP per group (treatment or MoA), p-values, and what could not be scored."""

    name: str  # "replicate" | "moa" (RETRIEVAL_GROUPS)
    table: pd.DataFrame  # one row per scored group: its RETRIEVAL_GROUPS columns, then RETRIEVAL_COLUMNS
    reason: str | None = None  # why nothing was scored (None when something was)
    unscored: list[str] = field(default_factory=list)  # groups without a positive pair

    @classmethod
    def not_applicable(cls, name: str, reason: str, unscored: list[str] | None = None) -> Retrieval:
        """A task with nothing scored, for `reason`: an empty table with the task's columns."""
        return cls(name, pd.DataFrame(columns=[*RETRIEVAL_GROUPS[name], *RETRIEVAL_COLUMNS]), reason, unscored or [])

    @property
    def map(self) -> float | None:
        return None if self.table.empty else float(self.table["mean_average_precision"].mean())

    @property
    def fraction_retrieved(self) -> float | None:
        return None if self.table.empty else float(self.table["retrieved"].mean())

    def summary(self) -> dict:
        """The task's figures as report.json holds them under retrieval.<name>."""
        return {"map": self.map, "fraction_retrieved": self.fraction_retrieved, "n": len(self.table),
                "not_applicable": self.reason, "unscored": self.unscored}


def _copairs_map(name: str, meta: pd.DataFrame, x: np.ndarray, query: np.ndarray, pairs: dict,
                 null_size: int, alpha: float, seed: int, unscored: list[str]) -> Retrieval:
    """copairs average precision of every row, then mAP per the task's group over the `query` rows."""
    from copairs.map import average_precision, mean_average_precision

    ap = average_precision(meta.reset_index(drop=True), np.asarray(x, dtype=np.float64), progress_bar=False,
                           **pairs)
    with tempfile.TemporaryDirectory(prefix="fastcell-copairs-") as cache:  # copairs caches nulls in ~ otherwise
        table = mean_average_precision(ap[query], RETRIEVAL_GROUPS[name], null_size=null_size, threshold=alpha,
                                       seed=seed, progress_bar=False, cache_dir=cache)
    table = table.rename(columns={"below_corrected_p": "retrieved"})
    return Retrieval(name, table[RETRIEVAL_GROUPS[name] + RETRIEVAL_COLUMNS].reset_index(drop=True), None, unscored)


def replicate_retrieval(wells: pd.DataFrame, x: np.ndarray, *, null_size: int = 10000, alpha: float = 0.05,
                        seed: int = 0) -> Retrieval:
    """Per treatment (compound, dose): do its wells retrieve each other ahead of the control wells?

    `wells` (compound, concentration, role) is row-aligned with x. Queries are the wells of role
    "treatment" or "unannotated"; references their treatment's other wells (positives) and the
    "dmso" wells (negatives). Treatments with a single well cannot be scored and are listed.
    """
    from copairs.matching import assign_reference_index

    wells = wells.reset_index(drop=True)
    use = np.flatnonzero(wells["role"].isin(["treatment", "unannotated", "dmso"]).to_numpy())
    meta = wells.iloc[use][["compound", "concentration"]].reset_index(drop=True)
    meta["concentration"] = meta["concentration"].astype(float).round(9)
    control = (wells.iloc[use]["role"] == "dmso").to_numpy()
    if not control.any() or control.all():
        return Retrieval.not_applicable("replicate", f"no {'control' if not control.any() else 'treated'} wells")
    # each control well its own reference index (no one's replicate), -1 for the treated wells
    meta = assign_reference_index(meta, meta.index[control], reference_col="reference")
    sizes = meta[~control].groupby(["compound", "concentration"]).size()
    single = [f"{c} @ {d:g}" for c, d in sizes[sizes < 2].index]
    if len(single) == len(sizes):
        return Retrieval.not_applicable("replicate", "no treatment has two or more wells", single)
    pairs = {"pos_sameby": ["compound", "concentration", "reference"], "pos_diffby": [],
             "neg_sameby": [], "neg_diffby": ["compound", "reference"]}
    return _copairs_map("replicate", meta, x[use], ~control, pairs, null_size, alpha, seed, single)


def moa_retrieval(treatments: pd.DataFrame, x: np.ndarray, *, null_size: int = 10000, alpha: float = 0.05,
                  seed: int = 0) -> Retrieval:
    """Per MoA: do its treatments retrieve the other compounds of the MoA ahead of other MoAs' treatments?

    `treatments` (compound, moa) is row-aligned with x; rows without a MoA take no part. Positives
    are treatments of the same MoA and another compound (as for NSC); MoAs with one compound are listed.
    """
    treatments = treatments.reset_index(drop=True)
    use = np.flatnonzero(treatments["moa"].notna().to_numpy())
    meta = treatments.iloc[use][["compound", "moa"]].astype(str).reset_index(drop=True)
    if meta["moa"].nunique() < 2:
        return Retrieval.not_applicable("moa", "fewer than two MoAs among the annotated treatments")
    compounds = meta.groupby("moa")["compound"].nunique()
    single = sorted(compounds[compounds < 2].index)
    if len(single) == len(compounds):
        return Retrieval.not_applicable("moa", "no MoA has two or more compounds", single)
    pairs = {"pos_sameby": ["moa"], "pos_diffby": ["compound"], "neg_sameby": [], "neg_diffby": ["moa"]}
    return _copairs_map("moa", meta, x[use], np.ones(len(meta), bool), pairs, null_size, alpha, seed, single)
