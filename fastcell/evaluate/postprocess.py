"""Post-processing of well profiles before treatments are compared: zscore, whiten, TVN.

All transforms act on a matrix X [n_wells, n_features] and are fitted on the negative-control
(DMSO) rows where they need a reference population:

- `zscore`: each feature standardised over all wells (mean 0, standard deviation 1).
- `whiten`: PCA whitening fitted on all DMSO wells: X -> (X - mu_dmso) W with
  W = U diag(1 / sqrt(lambda + eps)) U^T from the DMSO covariance U diag(lambda) U^T (the ZCA form;
  cosine similarity is invariant to the rotation that separates it from PCA whitening).
- `tvn` (typical variation normalisation, Ando et al. 2017): `whiten`, then per batch CORAL fitted on
  that batch's DMSO wells: centre on the batch's DMSO mean and multiply by its (regularised)
  inverse square-root covariance, so each batch's DMSO ends with zero mean and ~identity covariance.

Regularisation: eps = reg * trace(C) / n_features, a fraction of the mean eigenvalue, added to the
covariance before its inverse square root; with reg = 0 the covariance must be full rank. `reg`
(default 0.1) regularises the whitening, `coral_reg` (default 1.0) the per-batch step: after
whitening the mean eigenvalue is ~1, so coral_reg = 1 is CORAL's "C + I" (Sun et al. 2016), needed
because a batch has few DMSO wells (18-36 in BBBC021) against hundreds of features. After the
transform, DMSO (of each batch, for tvn) has zero mean and covariance lambda / (lambda + eps) per
eigen-direction: the identity when the regularisation is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fastcell.errors import InputError

POST_METHODS = ("none", "zscore", "whiten", "tvn")


@dataclass
class AffineStage:
    """y = (x - shift) @ matrix, with one (shift, matrix) for all rows (key None) or per batch."""

    shift: dict
    matrix: dict

    def apply(self, x: np.ndarray, batch: np.ndarray) -> np.ndarray:
        if None in self.shift:
            return (x - self.shift[None]) @ self.matrix[None]
        out = np.empty((len(x), self.matrix[next(iter(self.matrix))].shape[1]), dtype=np.result_type(x, np.float64))
        for b in np.unique(batch):
            if b not in self.shift:
                raise InputError(f"tvn: batch {b!r} has no DMSO wells to fit its correction on")
            rows = batch == b
            out[rows] = (x[rows] - self.shift[b]) @ self.matrix[b]
        return out


@dataclass
class PostTransform:
    """A fitted post-processing: a chain of affine stages, applied to any rows (in chunks if large)."""

    method: str
    stages: list[AffineStage] = field(default_factory=list)

    def apply(self, x: np.ndarray, batch: np.ndarray, chunk: int = 1 << 16, dtype=np.float64) -> np.ndarray:
        """The transformed rows of x (computed in float64, stored as `dtype`)."""
        if not self.stages:
            return np.asarray(x, dtype=dtype)
        out = np.empty((len(x), x.shape[1]), dtype=dtype)
        for lo in range(0, len(x), chunk):
            y = np.asarray(x[lo : lo + chunk], dtype=np.float64)
            for stage in self.stages:
                y = stage.apply(y, batch[lo : lo + chunk])
            out[lo : lo + chunk] = y
        return out


def inverse_sqrt_covariance(x: np.ndarray, reg: float, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, C^-1/2) of the rows of x with eps = reg * mean eigenvalue added to C."""
    n, d = x.shape
    if n < 2:
        raise InputError(f"{what}: {n} DMSO row(s); whitening needs at least 2")
    mean = x.mean(axis=0)
    cov = np.cov(x, rowvar=False).reshape(d, d)
    eigval, eigvec = np.linalg.eigh(cov)
    eigval = np.clip(eigval, 0, None)
    if eigval.max() <= 0:
        raise InputError(f"{what}: the DMSO profiles do not vary; cannot whiten")
    if reg == 0 and eigval.min() <= 1e-10 * eigval.max():
        raise InputError(
            f"{what}: the DMSO covariance is singular ({n} rows, {d} features); use a regularisation > 0"
        )
    floor = eigval + reg * eigval.sum() / d
    return mean, (eigvec / np.sqrt(floor)) @ eigvec.T


def fit_postprocess(
    x: np.ndarray, method: str, *, is_dmso: np.ndarray, batch: np.ndarray, reg: float = 0.1, coral_reg: float = 1.0
) -> PostTransform:
    """Fit `method` (one of POST_METHODS) on profiles x [n, d] (DMSO rows where it needs them)."""
    if method not in POST_METHODS:
        raise ValueError(f"post-processing must be one of {', '.join(POST_METHODS)}, not {method!r}")
    if reg < 0 or coral_reg < 0:
        raise ValueError("regularisation must be >= 0")
    if method == "none":
        return PostTransform(method)
    if method == "zscore":
        x = np.asarray(x, dtype=np.float64)
        std = x.std(axis=0)
        if (std == 0).any():
            raise InputError(f"zscore: {int((std == 0).sum())} constant feature(s); drop them first")
        return PostTransform(method, [AffineStage({None: x.mean(axis=0)}, {None: np.diag(1 / std)})])
    if not is_dmso.any():
        raise InputError(f"{method}: no DMSO wells in the profiles; use --post none or zscore")
    dmso = np.asarray(x[is_dmso], dtype=np.float64)
    mean, matrix = inverse_sqrt_covariance(dmso, reg, method)
    stages = [AffineStage({None: mean}, {None: matrix})]
    if method == "tvn":
        white = stages[0].apply(dmso, batch[is_dmso])
        dmso_batch = batch[is_dmso]
        shifts, matrices = {}, {}
        for b in np.unique(batch):
            if not (dmso_batch == b).any():
                raise InputError(f"tvn: batch {b!r} has no DMSO wells to fit its correction on")
            shifts[b], matrices[b] = inverse_sqrt_covariance(white[dmso_batch == b], coral_reg, f"tvn, batch {b!r}")
        stages.append(AffineStage(shifts, matrices))
    return PostTransform(method, stages)


def postprocess(x: np.ndarray, method: str, *, is_dmso: np.ndarray, batch: np.ndarray, reg: float = 0.1,
                coral_reg: float = 1.0) -> np.ndarray:
    """Fit `method` on x and apply it to x: the well-level case."""
    batch = np.asarray(batch)
    return fit_postprocess(x, method, is_dmso=is_dmso, batch=batch, reg=reg, coral_reg=coral_reg).apply(x, batch)
