"""NSC / NSCB / cell-level votes against an independent brute-force reference, and crafted cases; what
retrieval mAP reports when it cannot score."""

import numpy as np
import pandas as pd
import pytest

from fastcell.errors import InputError
from fastcell.evaluate.metrics import (
    RETRIEVAL_COLUMNS,
    moa_retrieval,
    nearest_treatment,
    per_moa,
    replicate_retrieval,
    score_cells,
)


def brute_force_accuracy(table, x, across_batches):
    """Independent reference: float64 cosine, plain loops, ties to the lower row."""
    t = table.reset_index(drop=True)
    keep = np.ones(len(t), bool)
    if across_batches:
        batches_per_moa = t.groupby("moa")["batch"].nunique()
        keep = t["moa"].map(batches_per_moa).to_numpy() > 1
    t, x = t[keep].reset_index(drop=True), x[keep]
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn @ xn.T
    compound, batch, moa = (t[c].to_numpy() for c in ("compound", "batch", "moa"))
    excluded = compound[:, None] == compound[None, :]
    if across_batches:
        excluded |= batch[:, None] == batch[None, :]
    sims[excluded] = -np.inf
    nearest = sims.argmax(axis=1)  # first maximum: the lower row on ties
    return float(np.mean(moa[nearest] == moa)), len(t)


def random_treatments(seed, n_compounds=25, n_moas=5, n_batches=4, d=12):
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_compounds):
        moa, batch = f"moa{rng.integers(n_moas)}", f"Week{rng.integers(n_batches)}"
        for dose in rng.choice([0.1, 0.3, 1.0, 3.0], rng.integers(1, 4), replace=False):
            rows.append({"compound": f"c{c:02d}", "concentration": float(dose), "moa": moa, "batch": batch})
    table = pd.DataFrame(rows).sort_values(["compound", "concentration"]).reset_index(drop=True)
    centres = {m: rng.standard_normal(d) for m in table.moa.unique()}
    x = np.stack([centres[m] for m in table.moa]) + rng.standard_normal((len(table), d)) * 1.2
    return table, x


@pytest.mark.parametrize("seed", range(5))
def test_nsc_nscb_match_brute_force(seed):
    table, x = random_treatments(seed)
    for across in (False, True):
        score = nearest_treatment(table, x, across_batches=across)
        expected, n = brute_force_accuracy(table, x, across)
        assert score.n == n
        assert score.accuracy == pytest.approx(expected)
        assert 0 <= score.accuracy <= 1


def test_own_other_doses_never_count_as_neighbours():
    # compound A at three doses is far from everything but itself; its only other-compound
    # neighbour has another MoA, so NSC must call A wrong although its doses are identical.
    table = pd.DataFrame({
        "compound": ["A", "A", "A", "B", "C"], "concentration": [0.1, 1.0, 10.0, 1.0, 1.0],
        "moa": ["m1", "m1", "m1", "m2", "m1"], "batch": ["W1", "W1", "W1", "W2", "W2"],
    })
    x = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0.9, 0.1, 0], [0, 1, 0]], float)
    score = nearest_treatment(table, x, across_batches=False)
    assert score.table.loc[:2, "neighbour_compound"].tolist() == ["B", "B", "B"]
    assert not score.table.loc[:2, "correct"].any()
    assert (score.table["neighbour_compound"] != score.table["compound"]).all()


def test_moa_in_one_batch_is_left_out_of_nscb_as_query_and_reference():
    table = pd.DataFrame({
        "compound": ["A", "B", "C", "D", "E", "F", "G"], "concentration": [1.0] * 7,
        "moa": ["m1", "m1", "solo", "solo", "m2", "m3", "m3"], "batch": ["W1", "W2", "W3", "W3", "W3", "W1", "W2"],
    })
    # A's nearest other-batch treatment is C (MoA "solo"), which NSCB must not offer as a reference
    x = np.array([[1, 0], [0.5, 0.5], [1, 0.01], [0.99, 0.02], [0, 1], [0, -1], [0.1, -1]], float)
    nscb = nearest_treatment(table, x, across_batches=True)
    assert nscb.left_out_moas == ["m2", "solo"]  # m2 also sits in one batch
    assert nscb.table["compound"].tolist() == ["A", "B", "F", "G"]
    assert nscb.table["neighbour_compound"].tolist() == ["B", "A", "G", "F"] and nscb.accuracy == 1.0
    nsc = nearest_treatment(table, x, across_batches=False)
    assert nsc.table.loc[0, "neighbour_compound"] == "C"


def test_tie_between_references_goes_to_the_earlier_treatment():
    table = pd.DataFrame({
        "compound": ["A", "B", "C"], "concentration": [1.0] * 3, "moa": ["m1", "m2", "m1"], "batch": ["W1"] * 3,
    })
    x = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])  # B and C equally similar to A
    assert nearest_treatment(table, x, across_batches=False).table.loc[0, "neighbour_compound"] == "B"


def test_bad_treatment_tables():
    table = pd.DataFrame({"compound": ["A", "B"], "concentration": [1.0, 1.0], "moa": ["m1", None],
                          "batch": ["W1", "W2"]})
    with pytest.raises(InputError, match="has no MoA"):
        nearest_treatment(table, np.eye(2), across_batches=False)
    table["moa"] = "m1"
    table["compound"] = "A"
    with pytest.raises(InputError, match="single compound"):
        nearest_treatment(table, np.eye(2), across_batches=False)
    table["batch"] = ["W1,W2", "W1"]
    table["compound"] = ["A", "B"]
    with pytest.raises(InputError, match="spans batches"):
        nearest_treatment(table, np.eye(2), across_batches=True)


def test_per_moa_table_counts():
    table, x = random_treatments(3)
    nsc, nscb = (nearest_treatment(table, x, across_batches=a) for a in (False, True))
    moa_table = per_moa(nsc, nscb)
    assert moa_table["n_nsc"].sum() == nsc.n
    weighted = (moa_table["nsc"] * moa_table["n_nsc"]).sum() / nsc.n
    assert weighted == pytest.approx(nsc.accuracy)


def test_cell_level_vote_matches_brute_force():
    rng = np.random.default_rng(4)
    table, centres = random_treatments(5, n_compounds=12, d=8)
    cells = table.loc[np.repeat(table.index, 15)].reset_index(drop=True)
    cells["role"] = "treatment"
    x = np.repeat(centres, 15, axis=0) + rng.standard_normal((len(cells), 8))
    dmso = pd.DataFrame({"compound": "DMSO", "concentration": 0.0, "moa": "DMSO", "batch": "Week0",
                         "role": "dmso"}, index=range(20))
    cells = pd.concat([cells, dmso], ignore_index=True)
    x = np.vstack([x, np.tile(x[:1], (20, 1))])  # DMSO cells identical to cell 0: must never be neighbours
    k = 5
    for across in (False, True):
        score, cell_acc = score_cells(cells, x, k=k, across_batches=across, device="cpu")
        # reference: plain loops over treatment cells
        treated = np.flatnonzero(cells.role == "treatment")
        if across:
            per_moa_batches = cells.iloc[treated].groupby("moa")["batch"].nunique()
            treated = treated[cells.moa.iloc[treated].map(per_moa_batches).to_numpy() > 1]
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        compound, batch, moa = (cells[c].to_numpy() for c in ("compound", "batch", "moa"))
        moas = sorted(set(moa[treated]))
        votes, cell_right = {}, []
        for i in treated:
            ok = treated[(compound[treated] != compound[i]) & ((not across) | (batch[treated] != batch[i]))]
            sims = xn[ok] @ xn[i]
            nearest = ok[np.lexsort((ok, -sims))][:k]
            counts = np.array([(moa[nearest] == m).sum() for m in moas])
            cell_right.append(moas[int(counts.argmax())] == moa[i])
            key = (compound[i], cells.concentration[i])
            votes[key] = votes.get(key, 0) + counts
        predicted = {key: moas[int(v.argmax())] for key, v in votes.items()}
        got = dict(zip(zip(score.table.compound, score.table.concentration, strict=True),
                       score.table.predicted_moa, strict=True))
        assert got == predicted
        assert cell_acc == pytest.approx(np.mean(cell_right))


def test_cell_level_query_sample_is_capped_per_treatment():
    table, centres = random_treatments(6, n_compounds=8, d=6)
    cells = table.loc[np.repeat(table.index, 12)].reset_index(drop=True)
    cells["role"] = "treatment"
    x = np.repeat(centres, 12, axis=0) + np.random.default_rng(0).standard_normal((len(cells), 6))
    score, _ = score_cells(cells, x, k=3, across_batches=False, queries_per_treatment=4, device="cpu")
    assert (score.table["n_query_cells"] == 4).all() and score.n == len(table)


def test_retrieval_that_cannot_score_has_the_scored_tables_columns():
    wells = pd.DataFrame({"compound": ["a", "a", "b", "b", "DMSO", "DMSO"], "concentration": [1.0] * 4 + [0.0] * 2,
                          "moa": ["m1", "m1", "m2", "m2", None, None],
                          "role": ["treatment"] * 4 + ["dmso"] * 2})
    x = np.random.default_rng(0).standard_normal((6, 8))
    scored = replicate_retrieval(wells, x, null_size=100)
    assert scored.reason is None and len(scored.table) == 2
    assert list(scored.table.columns) == ["compound", "concentration", *RETRIEVAL_COLUMNS]
    cases = [(replicate_retrieval(wells[:4], x[:4]), "no control wells"),
             (replicate_retrieval(wells.iloc[[0, 2, 4, 5]], x[[0, 2, 4, 5]]), "no treatment has two or more wells"),
             (moa_retrieval(wells[:2], x[:2]), "fewer than two MoAs among the annotated treatments"),
             (moa_retrieval(wells[:4], x[:4]), "no MoA has two or more compounds")]
    for found, reason in cases:
        assert found.reason == reason and found.map is None and found.fraction_retrieved is None
        assert found.summary() | {"unscored": []} == {"map": None, "fraction_retrieved": None, "n": 0,
                                                      "not_applicable": reason, "unscored": []}
        group = ["compound", "concentration"] if found.name == "replicate" else ["moa"]
        assert list(found.table.columns) == [*group, *RETRIEVAL_COLUMNS]
    assert cases[1][0].unscored == ["a @ 1", "b @ 1"] and cases[3][0].unscored == ["m1", "m2"]


def test_cell_level_scores_of_one_moa_or_no_multi_batch_moa_are_not_scored():
    """One MoA among the scored cells made every vote right (accuracy 1.0 whatever the features); NSCB with no
    MoA in two batches crashed on an empty query set."""
    table, centres = random_treatments(7, n_compounds=6, d=6)
    cells = table.loc[np.repeat(table.index, 5)].reset_index(drop=True)
    cells["role"] = "treatment"
    x = np.repeat(centres, 5, axis=0) + np.random.default_rng(1).standard_normal((len(cells), 6))
    one_moa = cells.assign(moa="m0")
    for across in (False, True):
        score, cell_acc = score_cells(one_moa, x, k=3, across_batches=across, device="cpu")
        assert score.accuracy is None and cell_acc is None and "share one MoA (m0)" in score.reason
    one_batch = cells.assign(batch="Week1")
    score, cell_acc = score_cells(one_batch, x, k=3, across_batches=True, device="cpu")
    assert score.accuracy is None and cell_acc is None and score.left_out_moas == sorted(set(cells.moa))
    assert score_cells(one_batch, x, k=3, across_batches=False, device="cpu")[0].accuracy is not None
