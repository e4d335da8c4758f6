"""zscore / whiten / TVN: the properties the BBBC021 convention relies on, and their errors."""

import numpy as np
import pytest
import scipy.linalg

from fastcell.errors import InputError
from fastcell.evaluate.pipeline import EvalConfig
from fastcell.evaluate.postprocess import fit_postprocess, postprocess


def screen(seed=0, n=900, d=6):
    """Profiles with per-batch shifts and scalings, a DMSO flag and batch labels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 4
    batch = rng.choice(np.array(["Week1", "Week2", "Week3"]), n)
    x[batch == "Week2"] = 3 * x[batch == "Week2"] + 1
    x[batch == "Week3"] = x[batch == "Week3"] @ rng.standard_normal((d, d)) - 2
    return x, rng.random(n) < 0.4, batch


def test_zscore_standardises_every_feature():
    x, dmso, batch = screen()
    y = postprocess(x, "zscore", is_dmso=dmso, batch=batch, reg=0)
    assert np.allclose(y.mean(0), 0) and np.allclose(y.std(0), 1)


def test_whiten_gives_dmso_zero_mean_identity_covariance():
    x, dmso, batch = screen()
    y = postprocess(x, "whiten", is_dmso=dmso, batch=batch, reg=0)
    assert np.allclose(y[dmso].mean(0), 0, atol=1e-9)
    assert np.allclose(np.cov(y[dmso], rowvar=False), np.eye(x.shape[1]), atol=1e-8)
    assert not np.allclose(np.cov(y[dmso & (batch == "Week2")], rowvar=False), np.eye(x.shape[1]), atol=0.1)


def test_tvn_gives_each_batch_dmso_zero_mean_identity_covariance():
    x, dmso, batch = screen()
    y = postprocess(x, "tvn", is_dmso=dmso, batch=batch, reg=0, coral_reg=0)
    for b in np.unique(batch):
        rows = dmso & (batch == b)
        assert np.allclose(y[rows].mean(0), 0, atol=1e-9)
        assert np.allclose(np.cov(y[rows], rowvar=False), np.eye(x.shape[1]), atol=1e-8)


def test_regularised_whitening_shrinks_eigenvalues_as_documented():
    x, dmso, batch = screen()
    reg = 0.5
    cov = np.cov(x[dmso], rowvar=False)
    eigval = np.linalg.eigvalsh(cov)
    y = postprocess(x, "whiten", is_dmso=dmso, batch=batch, reg=reg)
    expected = np.sort(eigval / (eigval + reg * eigval.mean()))
    assert np.allclose(np.linalg.eigvalsh(np.cov(y[dmso], rowvar=False)), expected, atol=1e-9)


def test_fitted_transform_applies_in_chunks_to_new_rows():
    x, dmso, batch = screen()
    transform = fit_postprocess(x, "tvn", is_dmso=dmso, batch=batch)
    assert np.allclose(transform.apply(x, batch, chunk=37), transform.apply(x, batch))


def test_errors_no_dmso_batch_without_dmso_singular_constant():
    x, dmso, batch = screen()
    with pytest.raises(InputError, match="no DMSO"):
        postprocess(x, "whiten", is_dmso=np.zeros(len(x), bool), batch=batch, reg=0.1)
    with pytest.raises(InputError, match="Week3.*no DMSO"):
        postprocess(x, "tvn", is_dmso=dmso & (batch != "Week3"), batch=batch, reg=0.1)
    few = np.zeros(len(x), bool)
    few[np.flatnonzero(dmso)[:3]] = True  # 3 DMSO rows, 6 features: singular without regularisation
    with pytest.raises(InputError, match="singular"):
        postprocess(x, "whiten", is_dmso=few, batch=batch, reg=0)
    assert np.isfinite(postprocess(x, "whiten", is_dmso=few, batch=batch, reg=0.1)).all()
    x[:, 2] = 5.0
    with pytest.raises(InputError, match="constant"):
        postprocess(x, "zscore", is_dmso=dmso, batch=batch, reg=0)


def inverse_sqrt(cov: np.ndarray, reg: float) -> np.ndarray:
    """(C + eps I)^-1/2 with eps = reg * mean eigenvalue (trace / d), by scipy's matrix square root."""
    d = len(cov)
    return np.linalg.inv(np.real(scipy.linalg.sqrtm(cov + reg * np.trace(cov) / d * np.eye(d))))


def tvn_reference(x, dmso, batch, reg, coral_reg):
    """TVN as documented: PCA (ZCA) whitening fitted on all DMSO wells, then per batch CORAL fitted on the
    batch's whitened DMSO wells (centre on their mean, times their regularised inverse square-root covariance)."""
    white = (x - x[dmso].mean(0)) @ inverse_sqrt(np.cov(x[dmso], rowvar=False), reg)
    out = np.empty_like(white)
    for b in np.unique(batch):
        ref = white[dmso & (batch == b)]
        out[batch == b] = (white[batch == b] - ref.mean(0)) @ inverse_sqrt(np.cov(ref, rowvar=False), coral_reg)
    return out


@pytest.mark.parametrize("coral_reg", [None, 0.0])  # None: the defaults, whose per-batch step is CORAL's C + I
def test_tvn_matches_its_definition(coral_reg):
    """Values, not only properties: per-batch whitening alone also gives each batch's DMSO identity covariance,
    but (without the global stage) rotates every batch differently, which changes cosines across batches."""
    x, dmso, batch = screen(d=8)
    settings = EvalConfig(source="unused")
    assert (settings.reg, settings.coral_reg) == (0.1, 1.0)  # the documented defaults of --reg / --coral-reg
    if coral_reg is None:
        y = postprocess(x, "tvn", is_dmso=dmso, batch=batch)
        coral_reg = settings.coral_reg
    else:
        y = postprocess(x, "tvn", is_dmso=dmso, batch=batch, reg=settings.reg, coral_reg=coral_reg)
    expected = tvn_reference(x, dmso, batch, settings.reg, coral_reg)
    np.testing.assert_allclose(y, expected, rtol=1e-7, atol=1e-9)
