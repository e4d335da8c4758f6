"""Cosine k-nearest neighbours through FAISS, with excluded references and deterministic ties.

Cosine similarity is the inner product of L2-normalised float32 vectors, searched exactly with a
flat FAISS index: `GpuIndexFlatIP` when `faiss.get_num_gpus() > 0`, `IndexFlatIP` otherwise.

Exclusion: a query may not match references that share any of its exclusion labels (NSC: the
compound; NSCB: the compound and the batch). Every query first searches, in one pass, an index in
which each shared label lowers the inner product by 4 (one-hot label blocks appended to the vectors:
-4 on references, +1 on queries; cosines of allowed pairs are unchanged, excluded pairs fall below
-3), for `k + 4 * margin` candidates; excluded candidates are dropped. This settles nearly every query.
The others are grouped by their labels: a group whose excluded references are few searches the
full index again for `k + n_excluded + margin` candidates, a group that excludes many (a whole
batch, a large compound) an index of its allowed references only. Either way every query gets its
true top-k among allowed references.

Ranking and ties (documented rule): FAISS's float32 candidates are rescored in float64 from the
normalised float32 vectors, and neighbours are ranked by that similarity, descending; exactly equal
similarities (duplicate profiles, symmetric cases) are broken by the LOWER reference index, i.e.
the earlier row of the reference table. Candidates are fetched until no reference outside them
can reach the k-th similarity within `tolerance` (float32 rounding; generous on GPUs, which may use
TF32), so CPU and GPU indices give identical neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fastcell.errors import EnvironmentProblem, InputError

GPU_MAX_K = 2048  # largest k a FAISS GPU flat index answers
# Exclusion in the first pass: references carry -PENALTY x one-hot(labels), queries +one-hot, so the
# inner product drops by PENALTY per shared label and no excluded reference outranks an allowed one.
EXCLUSION_PENALTY = 4.0
MAX_PENALTY_LABELS = 512  # more distinct labels than this: exclusion by filtering and regrouping only
CPU_SUBSET_THRESHOLD = 16384  # more excluded references than this: search a copy holding the allowed ones
CPU_TOLERANCE = 1e-4
GPU_TOLERANCE = 2e-3


@dataclass
class Neighbours:
    """`index[q, j]`: the j-th nearest allowed reference of query q (-1 where there are fewer than k);
    `similarity[q, j]`: its cosine similarity (float64; -inf where index is -1)."""

    index: np.ndarray
    similarity: np.ndarray


def gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@lru_cache(maxsize=1)
def _gpu_resources():
    """One set of FAISS GPU resources (streams, scratch memory) shared by every index."""
    import faiss

    return faiss.StandardGpuResources()


def resolve_device(device: str) -> str:
    """"auto" -> "gpu" when FAISS sees a GPU, else "cpu"; "gpu" without one is an error."""
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be auto, cpu or gpu, not {device!r}")
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu" and not gpu_available():
        raise EnvironmentProblem("a FAISS GPU index was asked for, but FAISS sees no GPU (faiss-cpu build?)")
    return device


def l2_normalise(vectors: np.ndarray, what: str = "vectors") -> np.ndarray:
    """Rows scaled to unit length, as C-contiguous float32; zero or non-finite rows are an error."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InputError(f"{what}: {int((~np.isfinite(x).all(axis=1)).sum())} row(s) contain NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InputError(f"{what}: {int((norms == 0).sum())} all-zero row(s); cosine similarity is undefined")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


class FlatIndex:
    """An exact inner-product index on a CPU or GPU, searched in query chunks."""

    def __init__(self, vectors: np.ndarray, device: str = "auto"):
        import faiss

        self.device = resolve_device(device)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.ntotal, dim = self.vectors.shape
        self._cpu = None
        if self.device == "gpu":
            self._index = faiss.GpuIndexFlatIP(_gpu_resources(), dim)
        else:
            self._index = faiss.IndexFlatIP(dim)
        self._index.add(self.vectors)

    @property
    def tolerance(self) -> float:
        return GPU_TOLERANCE if self.device == "gpu" else CPU_TOLERANCE

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's top-k (float32 similarities, int64 indices) for each query, best first."""
        import faiss

        k = min(k, self.ntotal)
        index = self._index
        if self.device == "gpu" and k > GPU_MAX_K:  # rare: many exact ties; the CPU answers any k
            if self._cpu is None:
                self._cpu = faiss.IndexFlatIP(self.vectors.shape[1])
                self._cpu.add(self.vectors)
            index = self._cpu
        return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def _encode_labels(
    ref_labels: Sequence[np.ndarray], query_labels: Sequence[np.ndarray], n_refs: int, n_queries: int
) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes [n, n_columns] for refs and queries, shared per column."""
    if len(ref_labels) != len(query_labels):
        raise ValueError("ref_labels and query_labels need the same columns")
    ref_codes = np.zeros((n_refs, len(ref_labels)), dtype=np.int64)
    query_codes = np.zeros((n_queries, len(ref_labels)), dtype=np.int64)
    for col, (r, q) in enumerate(zip(ref_labels, query_labels, strict=True)):
        r, q = np.asarray(r), np.asarray(q)
        if len(r) != n_refs or len(q) != n_queries:
            raise ValueError("each label column needs one entry per reference / query")
        _, inverse = np.unique(np.concatenate([r.astype(str), q.astype(str)]), return_inverse=True)
        ref_codes[:, col], query_codes[:, col] = inverse[:n_refs], inverse[n_refs:]
    return ref_codes, query_codes


def _one_hot(codes: np.ndarray, widths: list[int]) -> np.ndarray:
    """float32 one-hot of each label column (column c has widths[c] labels), blocks side by side."""
    blocks = []
    for c, width in enumerate(widths):
        block = np.zeros((len(codes), width), dtype=np.float32)
        block[np.arange(len(codes)), codes[:, c]] = 1
        blocks.append(block)
    return np.hstack(blocks)


def _rank_candidates(
    queries: np.ndarray,
    vectors: np.ndarray,
    cand_sim: np.ndarray,
    cand_idx: np.ndarray,
    valid: np.ndarray,
    need: np.ndarray,
    k: int,
    complete: bool,
    tolerance: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply the ranking rule to FAISS's candidates.

    `valid[q, j]`: candidate j of query q is a reference it may match; `need[q]`: how many it must
    get (k, or fewer when fewer references are allowed). Returns (index [q, k], similarity [q, k],
    settled [q]): a query is settled when no reference outside its candidates can reach its k-th
    similarity (or the candidates are all references).
    """
    nq = len(queries)
    n_valid = valid.sum(axis=1)
    # k-th allowed float32 similarity (FAISS returns candidates best first).
    rank = np.cumsum(valid, axis=1)
    kth_pos = np.argmax(valid & (rank == np.maximum(need, 1)[:, None]), axis=1)
    kth_sim = np.where(n_valid >= need, cand_sim[np.arange(nq), kth_pos], -np.inf)
    settled = complete | (need == 0) | ((n_valid >= need) & (kth_sim - tolerance > cand_sim[:, -1]))
    # Rescore in float64 every allowed candidate that could be among the top k.
    keep = valid & (cand_sim >= (kth_sim - 2 * tolerance)[:, None])
    width = max(int(keep.sum(axis=1).max(initial=0)), 1)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
    picked = np.take_along_axis(cand_idx, order, axis=1)
    picked_ok = np.take_along_axis(keep, order, axis=1)
    sim64 = np.full(picked.shape, -np.inf)
    rows_per_step = max(1, (1 << 22) // (width * vectors.shape[1]))  # bounds the gathered block's memory
    for lo in range(0, nq, rows_per_step):
        hi = min(lo + rows_per_step, nq)
        block = vectors[np.clip(picked[lo:hi], 0, None)].astype(np.float64)
        sim64[lo:hi] = np.einsum("qd,qwd->qw", queries[lo:hi].astype(np.float64), block)
    sim64 = np.where(picked_ok, sim64, -np.inf)
    picked = np.where(picked_ok, picked, np.iinfo(np.int64).max)
    # Sort each row by similarity descending, then reference index ascending.
    rows = np.repeat(np.arange(nq), width)
    flat = np.lexsort((picked.ravel(), -sim64.ravel(), rows)).reshape(nq, width)
    flat = flat - (np.arange(nq) * width)[:, None]
    best_idx = np.take_along_axis(picked, flat, axis=1)[:, :k]
    best_sim = np.take_along_axis(sim64, flat, axis=1)[:, :k]
    if best_idx.shape[1] < k:
        pad = k - best_idx.shape[1]
        best_idx = np.pad(best_idx, ((0, 0), (0, pad)), constant_values=-1)
        best_sim = np.pad(best_sim, ((0, 0), (0, pad)), constant_values=-np.inf)
    best_idx = np.where(np.isfinite(best_sim), best_idx, -1)
    return best_idx, best_sim, settled


def _search_group(
    index: FlatIndex, queries: np.ndarray, k: int, allowed: np.ndarray | None, first_k: int, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k allowed references of `queries` in `index`, widening the search until settled."""
    out_idx = np.full((len(queries), k), -1, dtype=np.int64)
    out_sim = np.full((len(queries), k), -np.inf)
    chunk = max(1, min(chunk, (1 << 22) // max(first_k, 1)))  # bounds the candidate arrays' memory
    for start in range(0, len(queries), chunk):
        pending = np.arange(start, min(start + chunk, len(queries)))
        width = first_k
        while pending.size:
            width = min(width, index.ntotal)
            cand_sim, cand_idx = index.search(queries[pending], width)
            valid = cand_idx >= 0
            if allowed is not None:
                valid &= allowed[np.clip(cand_idx, 0, None)]
            need = np.full(len(pending), min(k, index.ntotal if allowed is None else int(allowed.sum())))
            idx, sim, settled = _rank_candidates(
                queries[pending], index.vectors, cand_sim, cand_idx, valid, need, k,
                complete=width >= index.ntotal, tolerance=index.tolerance,
            )
            out_idx[pending[settled]] = idx[settled]
            out_sim[pending[settled]] = sim[settled]
            pending = pending[~settled]
            width *= 2
    return out_idx, out_sim


def knn_excluding(
    references: np.ndarray,
    queries: np.ndarray,
    k: int,
    ref_labels: Sequence[np.ndarray] = (),
    query_labels: Sequence[np.ndarray] = (),
    *,
    device: str = "auto",
    subset_threshold: int | None = None,
    margin: int = 16,
    chunk: int = 4096,
) -> Neighbours:
    """The k most cosine-similar references of each query, skipping references that share a label.

    `references`, `queries`: [n, d] arrays (normalised here). `ref_labels[c]`, `query_labels[c]`:
    the c-th exclusion label of each reference / query; reference r is allowed for query q only if
    `ref_labels[c][r] != query_labels[c][q]` for every c. Ranking and ties: see the module docstring.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    refs = l2_normalise(references, "references")
    qs = l2_normalise(queries, "queries")
    if refs.shape[1] != qs.shape[1]:
        raise ValueError(f"references have {refs.shape[1]} dims, queries {qs.shape[1]}")
    ref_codes, query_codes = _encode_labels(ref_labels, query_labels, len(refs), len(qs))
    device = resolve_device(device)
    if subset_threshold is None:  # wide searches of the full index beat copying it, up to GPU FAISS's k limit
        subset_threshold = max(GPU_MAX_K - k - margin, 0) if device == "gpu" else CPU_SUBSET_THRESHOLD
    out = Neighbours(np.full((len(qs), k), -1, dtype=np.int64), np.full((len(qs), k), -np.inf))
    groups, group_of_query = np.unique(query_codes, axis=0, return_inverse=True)
    group_of_query = group_of_query.ravel()
    n_allowed = np.array([int(np.all(ref_codes != key, axis=1).sum()) for key in groups])
    # First pass: every query at once, in an index whose inner products penalise excluded references.
    widths = [int(max(ref_codes[:, c].max(initial=0), query_codes[:, c].max(initial=0))) + 1
              for c in range(ref_codes.shape[1])]
    full = None
    if widths and sum(widths) <= MAX_PENALTY_LABELS:
        first_index = FlatIndex(np.hstack([refs, -EXCLUSION_PENALTY * _one_hot(ref_codes, widths)]), device)
        first_queries = np.hstack([qs, _one_hot(query_codes, widths)])
    else:
        first_index = full = FlatIndex(refs, device)
        first_queries = qs
    settled = np.zeros(len(qs), dtype=bool)
    first_k = min(k + 4 * margin, len(refs))
    for start in range(0, len(qs), chunk):
        rows = np.arange(start, min(start + chunk, len(qs)))
        cand_sim, cand_idx = first_index.search(first_queries[rows], first_k)
        valid = (cand_idx >= 0) & np.all(
            ref_codes[np.clip(cand_idx, 0, None)] != query_codes[rows][:, None, :], axis=2)
        need = np.minimum(k, n_allowed[group_of_query[rows]])
        idx, sim, done = _rank_candidates(qs[rows], refs, cand_sim, cand_idx, valid, need, k,
                                          complete=first_k >= len(refs), tolerance=first_index.tolerance)
        out.index[rows[done]], out.similarity[rows[done]] = idx[done], sim[done]
        settled[rows[done]] = True
    # The rest, group by group: the full index with a wider search, or an index of the allowed references.
    pending = np.flatnonzero(~settled)
    if pending.size and full is None:
        del first_index  # free the penalised copy before building the plain one
        full = FlatIndex(refs, device)
    order = pending[np.argsort(group_of_query[pending], kind="stable")]
    bounds = np.searchsorted(group_of_query[order], np.arange(len(groups) + 1))
    for g, key in enumerate(groups):
        members = order[bounds[g] : bounds[g + 1]]
        if members.size == 0:
            continue
        allowed = np.all(ref_codes != key, axis=1)
        n_excluded = len(refs) - int(allowed.sum())
        if n_excluded <= subset_threshold:
            idx, sim = _search_group(full, qs[members], k, allowed, k + n_excluded + margin, chunk)
        else:
            subset = np.flatnonzero(allowed)
            if subset.size == 0:
                continue
            idx, sim = _search_group(FlatIndex(refs[subset], device), qs[members], k, None, k + margin, chunk)
            idx = np.where(idx >= 0, subset[np.clip(idx, 0, None)], -1)
        out.index[members], out.similarity[members] = idx, sim
    return out


def check_gpu_index(n: int = 20000, n_queries: int = 2000, dim: int = 512, k: int = 10, seed: int = 0) -> dict:
    """CPU and GPU FAISS flat indices on the same data must give the same neighbours.

    Raw FAISS top-1 agreement is reported (float32 near-ties may swap); fastcell's ranking
    (`knn_excluding`) must agree exactly, including with compound exclusion. Raises AssertionError
    on a mismatch; returns {"skipped": reason} where FAISS sees no GPU.
    """
    if not gpu_available():
        return {"skipped": "FAISS sees no GPU (faiss-cpu build or no device)"}
    rng = np.random.default_rng(seed)
    refs = l2_normalise(rng.standard_normal((n, dim)))
    queries = l2_normalise(refs[rng.choice(n, n_queries, replace=False)]
                           + 0.5 * rng.standard_normal((n_queries, dim)) / np.sqrt(dim))
    compounds = rng.integers(0, 50, n)
    raw_cpu = FlatIndex(refs, "cpu").search(queries, k)
    raw_gpu = FlatIndex(refs, "gpu").search(queries, k)
    top1_agreement = float((raw_cpu[1][:, 0] == raw_gpu[1][:, 0]).mean())
    max_sim_diff = float(np.abs(raw_cpu[0] - raw_gpu[0]).max())
    query_compounds = rng.integers(0, 50, n_queries)
    cpu = knn_excluding(refs, queries, k, [compounds], [query_compounds], device="cpu")
    gpu = knn_excluding(refs, queries, k, [compounds], [query_compounds], device="gpu")
    assert np.array_equal(cpu.index, gpu.index), "GPU and CPU FAISS indices disagree on the neighbours"
    assert np.allclose(cpu.similarity, gpu.similarity, rtol=0, atol=1e-12)
    assert top1_agreement > 0.999, f"raw FAISS top-1 agreement only {top1_agreement:.4f}"
    return {"n": n, "n_queries": n_queries, "dim": dim, "k": k,
            "raw_top1_agreement": top1_agreement, "raw_max_similarity_diff": max_sim_diff,
            "identical_neighbours": True}
