"""Illumination correction and intensity scaling."""

import numpy as np
import pytest

from fastcell.errors import InputError
from fastcell.shard.illumination import (
    IlluminationAccumulator,
    IntensityHistogram,
    apply_scaling,
    correct_illumination,
    fit_percentile_scaling,
    load_illumination,
    load_scaling,
    save_illumination,
)

SHAPE = (96, 128)


def vignette(shape=SHAPE, strength=0.5):
    """A radial fall-off: 1 in the centre, 1 - strength in the corners."""
    rows, cols = np.indices(shape)
    r2 = ((rows - shape[0] / 2) / (shape[0] / 2)) ** 2 + ((cols - shape[1] / 2) / (shape[1] / 2)) ** 2
    return 1.0 - strength * r2 / 2


def vignetted_fields(n, seed=0):
    """Two-channel fields: background + 8 random bright cells, times a different vignette per channel."""
    rng = np.random.default_rng(seed)
    rows, cols = np.indices(SHAPE)
    gains = np.stack([vignette(strength=0.5), vignette(strength=0.4)])
    fields = []
    for _ in range(n):
        scene = np.full((2, *SHAPE), [[[1000.0]], [[400.0]]])
        for x, y in rng.uniform((0, 0), (SHAPE[1], SHAPE[0]), size=(8, 2)):
            scene[:, (cols - x) ** 2 + (rows - y) ** 2 <= 9] += [[3000.0], [1500.0]]
        fields.append(rng.poisson(scene * gains).astype(np.uint16))
    return fields, gains


def accumulate(fields):
    acc = IlluminationAccumulator(fields[0].shape[0], fields[0].shape[1:])
    for f in fields:
        acc.add(f)
    return acc


def test_vignetting_is_recovered_and_flattened():
    fields, gains = vignetted_fields(80)
    illum = accumulate(fields).finish(sigma=12)
    assert illum.dtype == np.float32 and illum.shape == (2, *SHAPE)
    for c in range(2):
        assert np.corrcoef(illum[c].ravel(), gains[c].ravel())[0, 1] > 0.99
        assert np.median(illum[c]) == pytest.approx(1.0, abs=1e-6)
    corner, centre = (slice(0, 12), slice(0, 12)), (slice(42, 54), slice(58, 70))
    raw_median = np.median(np.stack(fields), axis=0)
    corrected_median = np.median(np.stack([correct_illumination(f, illum) for f in fields]), axis=0)
    for c in range(2):
        raw_ratio = np.median(raw_median[c][corner]) / np.median(raw_median[c][centre])
        flat_ratio = np.median(corrected_median[c][corner]) / np.median(corrected_median[c][centre])
        assert raw_ratio < 0.8  # the vignette is there ...
        assert flat_ratio == pytest.approx(1.0, abs=0.03)  # ... and gone after correction


def test_bright_outliers_are_clipped_out():
    fields, _ = vignetted_fields(10)
    spiked = [f.copy() for f in fields]
    spiked[0][:, 40:44, 60:64] = 65535  # saturated debris, 16 px (< 1% of the field)
    clean, with_debris = accumulate(fields).finish(sigma=8), accumulate(spiked).finish(sigma=8)
    np.testing.assert_allclose(with_debris, clean, rtol=0.02)


def test_order_independent_and_mergeable():
    fields, _ = vignetted_fields(12, seed=3)
    forward = accumulate(fields)
    backward = accumulate(fields[::-1])
    merged = accumulate(fields[:5]).merge(accumulate(fields[5:]))
    assert merged.count == forward.count == 12
    np.testing.assert_array_equal(forward.total, backward.total)
    np.testing.assert_array_equal(forward.total, merged.total)
    np.testing.assert_array_equal(forward.finish(), merged.finish())


def test_accumulator_rejects_mismatches():
    acc = IlluminationAccumulator(2, SHAPE)
    with pytest.raises(ValueError, match="uint16"):
        acc.add(np.zeros((2, *SHAPE), np.float32))
    with pytest.raises(ValueError, match="expected 96x128"):
        acc.add(np.zeros((2, 64, 64), np.uint16))
    with pytest.raises(ValueError, match="no fields"):
        acc.finish()
    with pytest.raises(ValueError, match="cannot merge"):
        acc.merge(IlluminationAccumulator(3, SHAPE))


def test_correction_rounds_half_to_even_and_clips():
    field = np.array([[[5, 7, 60000, 3, 0]]], np.uint16)
    illum = np.array([[[2.0, 2.0, 0.5, 4.0, 0.1]]], np.float32)
    out = correct_illumination(field, illum)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, [[[2, 4, 65535, 1, 0]]])  # 2.5 -> 2, 3.5 -> 4, 0.75 -> 1
    with pytest.raises(ValueError, match="differ in shape"):
        correct_illumination(field, illum[:, :, :3])


def test_percentiles_match_numpy_and_scaling_maps_range():
    rng = np.random.default_rng(0)
    fields = [rng.gamma(2.0, [[[300.0]], [[50.0]]], size=(2, 40, 50)).astype(np.uint16) for _ in range(3)]
    hist = IntensityHistogram(2)
    for f in fields:
        hist.add(f)
    pixels = np.concatenate([f.reshape(2, -1) for f in fields], axis=1)
    lo, hi = fit_percentile_scaling(hist, 0.1, 99.9)
    np.testing.assert_array_equal(lo, np.percentile(pixels, 0.1, axis=1, method="inverted_cdf"))
    np.testing.assert_array_equal(hi, np.percentile(pixels, 99.9, axis=1, method="inverted_cdf"))
    halves = IntensityHistogram(2).merge(IntensityHistogram(2))
    for f in fields[::-1]:
        halves.add(f)
    np.testing.assert_array_equal(halves.counts, hist.counts)

    scaled = apply_scaling(fields[0], lo, hi)
    assert scaled.dtype == np.uint16
    expected = np.clip(np.rint((fields[0] - lo[:, None, None]) / (hi - lo)[:, None, None] * 65535), 0, 65535)
    np.testing.assert_array_equal(scaled, expected)
    edges = apply_scaling(np.array([[[10, 20, 30, 0, 65535]]], np.uint16), np.array([10.0]), np.array([30.0]))
    np.testing.assert_array_equal(edges, [[[0, 32768, 65535, 0, 65535]]])  # 32767.5 rounds to even


def test_flat_channel_scaling_does_not_divide_by_zero():
    hist = IntensityHistogram(1)
    hist.add(np.full((1, 8, 8), 700, np.uint16))
    lo, hi = fit_percentile_scaling(hist)
    assert (lo[0], hi[0]) == (700, 701)
    with pytest.raises(ValueError, match="no pixels"):
        IntensityHistogram(1).percentiles([50])


def test_save_load_roundtrip_is_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    illum = {"Week1_22123": rng.uniform(0.5, 1.5, (3, 8, 10)).astype(np.float32), "plate/odd name": np.ones((3, 8, 10))}
    scaling = {"Week1_22123": (np.array([1.0, 2, 3]), np.array([100.0, 200, 300]))}
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    save_illumination(a, illum, scaling=scaling)
    save_illumination(b, dict(reversed(illum.items())), scaling=scaling)
    assert a.read_bytes() == b.read_bytes()
    loaded = load_illumination(a)
    assert sorted(loaded) == sorted(illum)
    for plate, function in illum.items():
        assert loaded[plate].dtype == np.float32
        np.testing.assert_array_equal(loaded[plate], function.astype(np.float32))
    lo, hi = load_scaling(a)["Week1_22123"]
    np.testing.assert_array_equal(lo, scaling["Week1_22123"][0])
    np.testing.assert_array_equal(hi, scaling["Week1_22123"][1])
    assert load_scaling(tmp_path / "a.npz").keys() == {"Week1_22123"}
    assert sorted(tmp_path.iterdir()) == [a, b]  # no temporary file left behind


def test_load_reports_missing_or_damaged_file(tmp_path):
    with pytest.raises(InputError, match="missing.npz"):
        load_illumination(tmp_path / "missing.npz")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="broken.npz"):
        load_illumination(broken)


def test_dmso_scaling_maps_background_and_mean():
    from fastcell.shard.illumination import (
        DMSO_LEVEL,
        DMSO_PEDESTAL,
        IntensityHistogram,
        apply_dmso_scaling,
        fit_dmso_scaling,
    )

    rng = np.random.default_rng(0)
    crops = rng.integers(100, 3000, size=(50, 2, 8, 8)).astype(np.uint16)
    crops[:, 1] //= 3  # a dimmer second channel
    histogram = IntensityHistogram(2)
    histogram.add(np.ascontiguousarray(crops.transpose(1, 0, 2, 3)).reshape(2, -1, 8))
    np.testing.assert_allclose(histogram.mean(), crops.mean(axis=(0, 2, 3)))
    background, mean = fit_dmso_scaling(histogram)
    np.testing.assert_array_equal(background, np.percentile(crops.transpose(1, 0, 2, 3).reshape(2, -1), 1,
                                                            axis=1, method="inverted_cdf"))
    scaled = apply_dmso_scaling(crops, background, mean)
    assert scaled.dtype == np.uint16
    np.testing.assert_allclose(scaled.mean(axis=(0, 2, 3)), DMSO_PEDESTAL + DMSO_LEVEL, atol=0.5)
    brighter = apply_dmso_scaling(np.minimum(crops.astype(np.int64) * 2, 65535).astype(np.uint16),
                                  background * 2, mean * 2)
    assert np.abs(brighter.astype(int) - scaled).max() <= 1  # a plate's gain cancels
