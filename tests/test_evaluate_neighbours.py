"""FAISS k-NN with exclusions against a brute-force NumPy reference (and the documented tie rule)."""

import numpy as np
import pytest

from fastcell.errors import InputError
from fastcell.evaluate import neighbours
from fastcell.evaluate.neighbours import check_gpu_index, gpu_available, knn_excluding


def brute_force(refs, queries, k, ref_labels, query_labels):
    """Reference: float64 cosine, excluded labels masked, ties to the lower reference index."""
    r = refs / np.linalg.norm(refs, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ r.T
    out = np.full((len(q), k), -1)
    for i in range(len(q)):
        allowed = np.ones(len(r), dtype=bool)
        for rl, ql in zip(ref_labels, query_labels, strict=True):
            allowed &= rl != ql[i]
        candidates = np.flatnonzero(allowed)
        ranked = candidates[np.lexsort((candidates, -sims[i, candidates]))][:k]
        out[i, : len(ranked)] = ranked
    return out


@pytest.mark.parametrize("penalty", [True, False])  # False: exclusion by filtering and regrouping only
@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_random_data(seed, penalty, monkeypatch):
    if not penalty:
        monkeypatch.setattr(neighbours, "MAX_PENALTY_LABELS", 0)
    rng = np.random.default_rng(seed)
    n, nq, d, k = rng.integers(50, 600), rng.integers(1, 80), rng.integers(2, 40), int(rng.integers(1, 8))
    refs, queries = rng.standard_normal((n, d)), rng.standard_normal((nq, d))
    labels_r = [rng.integers(0, 6, n), rng.integers(0, 3, n)]
    labels_q = [rng.integers(0, 6, nq), rng.integers(0, 3, nq)]
    # a small threshold sends large exclusion groups through the subset-index path, a large one never
    threshold = int(rng.integers(0, n))
    found = knn_excluding(refs, queries, k, labels_r, labels_q, subset_threshold=threshold, margin=int(seed % 3))
    assert np.array_equal(found.index, brute_force(refs, queries, k, labels_r, labels_q))
    valid = found.index >= 0
    assert (np.diff(np.where(valid, found.similarity, -2), axis=1) <= 1e-12).all()  # best first


def test_exact_ties_go_to_the_lower_reference_index():
    rng = np.random.default_rng(1)
    refs = rng.standard_normal((40, 5))
    refs[[7, 3, 30]] = refs[12]  # four identical references: 3, 7, 12, 30
    query = refs[12] + 0.0
    found = knn_excluding(refs, query[None], 4, [np.zeros(40)], [np.ones(1)])
    assert found.index[0].tolist() == [3, 7, 12, 30]
    # excluding 3's label leaves 7 first
    labels = np.zeros(40)
    labels[3] = 1
    assert knn_excluding(refs, query[None], 1, [labels], [np.ones(1)]).index[0, 0] == 7
    # symmetric references at equal angle from the query: the lower index wins either way round
    sym = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    assert knn_excluding(sym, sym[:1], 1, [np.arange(3)], [np.array([0])]).index[0, 0] == 1
    assert knn_excluding(sym[[0, 2, 1]], sym[:1], 1, [np.arange(3)], [np.array([0])]).index[0, 0] == 1


@pytest.mark.parametrize("subset_threshold", [0, None])  # 0: through an index of the allowed references
def test_many_exact_duplicates_beyond_the_first_candidates(subset_threshold):
    """300 identical references tie; the lowest-index allowed ones win even past the search margin."""
    rng = np.random.default_rng(2)
    refs = rng.standard_normal((1000, 8))
    refs[500:800] = refs[0]
    labels = np.zeros(1000)
    labels[:600] = 1  # excluded for the query, leaving 600..799 as the tied best
    found = knn_excluding(refs, refs[:1], 3, [labels], [np.ones(1)], margin=0, subset_threshold=subset_threshold)
    assert found.index[0].tolist() == [600, 601, 602]


def test_fewer_allowed_references_than_k_pads_with_minus_one():
    refs = np.eye(4)
    found = knn_excluding(refs, refs[:1], 3, [np.array([0, 0, 1, 0])], [np.array([0])])
    assert found.index[0].tolist() == [2, -1, -1]
    assert np.isneginf(found.similarity[0, 1:]).all()


def test_zero_and_nan_vectors_are_errors():
    refs = np.ones((3, 2))
    with pytest.raises(InputError, match="all-zero"):
        knn_excluding(np.vstack([refs, [0, 0]]), refs, 1)
    with pytest.raises(InputError, match="NaN"):
        knn_excluding(refs, np.array([[np.nan, 1.0]]), 1)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="FAISS sees no GPU (faiss-cpu build or no device)")
def test_gpu_and_cpu_indices_give_the_same_neighbours():
    assert check_gpu_index(n=3000, n_queries=200, dim=64)["identical_neighbours"]


@pytest.mark.skipif(gpu_available(), reason="checks the report of a machine without a GPU")
def test_gpu_check_says_why_it_skipped_without_a_gpu():
    assert "no GPU" in check_gpu_index(n=3000, n_queries=200, dim=64)["skipped"]
