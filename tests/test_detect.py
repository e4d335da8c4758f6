"""Nuclei detection: measured on real nuclei (stardist-dsb, JUMP Cell Painting) and on synthetic cases."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from skimage import filters

from fastcell.shard.detect import (
    detect_nuclei,
    fill_holes,
    foreground_threshold,
    score_against_centres,
    score_against_mask,
)

DATA = Path(__file__).parent / "data"
JUMP_SITE = DATA / "jump-cpg0000" / "BR00116991" / "A01-1"


def disc_image(centres, radius, shape=(128, 128), level=1000, background=100, seed=0):
    """uint16 image of bright discs on a noisy background."""
    rng = np.random.default_rng(seed)
    rows, cols = np.indices(shape)
    image = np.full(shape, float(background))
    for x, y in centres:
        image[(cols - x) ** 2 + (rows - y) ** 2 <= radius**2] = level
    return (image + rng.normal(0, 10, shape)).clip(0, 65535).astype(np.uint16)


def test_stardist_recall_and_precision():
    """125 hand-labelled real nuclei; measured recall 0.912, precision 0.966 (bench/results)."""
    image = tifffile.imread(DATA / "stardist-dsb" / "img2d.tif")
    mask = tifffile.imread(DATA / "stardist-dsb" / "mask2d.tif")
    score = score_against_mask(detect_nuclei(image), mask)
    assert score.n_true == 125
    assert score.recall >= 0.87
    assert score.precision >= 0.93


def test_jump_dna_channel_against_cellprofiler():
    """The real Cell Painting DNA channel: CellProfiler's 109 nuclei found within 8 px (measured 106)."""
    dna = tifffile.imread(JUMP_SITE / "r01c01f01p01-ch5sk1fk1fl1.tiff")
    reference = pd.read_csv(JUMP_SITE / "Nuclei.csv")[["AreaShape_Center_X", "AreaShape_Center_Y"]].to_numpy()
    # CellProfiler drops nuclei touching the image edge; so does exclude_border.
    score = score_against_centres(detect_nuclei(dna, exclude_border=True), reference, max_distance=8.0)
    assert score.n_true == 109
    assert score.recall >= 0.95
    assert score.precision >= 0.85


def test_touching_discs_are_split():
    image = disc_image([(50, 64), (72, 64)], radius=12)  # centres 22 px apart: the discs overlap
    centres = detect_nuclei(image)
    assert centres.shape == (2, 2)
    np.testing.assert_allclose(centres, [[50, 64], [72, 64]], atol=2.0)


def test_bright_minority_does_not_hide_ordinary_nuclei():
    """8 of 36 nuclei 15x brighter (mitoses): a linear Otsu threshold would sit above the other 28."""
    grid = [(x, y) for x in range(20, 256, 40) for y in range(20, 256, 40)]
    bright = grid[::5][:8]
    ordinary = [c for c in grid if c not in bright]
    image = np.maximum(
        disc_image(ordinary, radius=10, shape=(256, 256)),
        disc_image(bright, radius=7, level=15000, shape=(256, 256), seed=1),
    )
    smooth = filters.gaussian(image.astype(np.float32), sigma=2.0, preserve_range=True)
    assert filters.threshold_otsu(smooth) > 1000  # the trap is set
    assert foreground_threshold(smooth, min_area=30) < 1000
    centres = detect_nuclei(image)
    assert score_against_centres(centres, np.array(grid, float), max_distance=1.5).matched == len(grid) == 36


def test_output_is_sorted_by_y_then_x_float64():
    truth = [(100, 30), (20, 30), (60, 90), (30, 100)]
    centres = detect_nuclei(disc_image(truth, radius=8))
    assert centres.dtype == np.float64
    expected = sorted(truth, key=lambda c: (c[1], c[0]))
    np.testing.assert_allclose(centres, expected, atol=1.0)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((128, 128), np.uint16),
        np.full((64, 96), 500, np.uint16),
        np.random.default_rng(1).normal(500, 20, (128, 128)).astype(np.uint16),
        np.random.default_rng(2).poisson(50, (128, 128)).astype(np.uint16),
    ],
    ids=["zeros", "flat", "gaussian-noise", "poisson-noise"],
)
def test_no_nuclei_gives_no_detections(image):
    centres = detect_nuclei(image)
    assert centres.shape == (0, 2)
    assert centres.dtype == np.float64


def test_size_filter_and_border_exclusion():
    image = disc_image([(30, 30), (90, 90), (0, 64)], radius=10)
    image = np.maximum(image, disc_image([(90, 30)], radius=3))  # a small speck
    assert len(detect_nuclei(image, min_area=5)) == 4
    np.testing.assert_allclose(detect_nuclei(image), [[30, 30], [0, 64], [90, 90]], atol=5.0)
    np.testing.assert_allclose(detect_nuclei(image, max_area=200), [[0, 64]], atol=5.0)  # half disc: ~170 px
    np.testing.assert_allclose(detect_nuclei(image, exclude_border=True), [[30, 30], [90, 90]], atol=1.0)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        detect_nuclei(np.zeros((3, 32, 32), np.uint16))
    with pytest.raises(ValueError, match="NaN"):
        detect_nuclei(np.full((32, 32), np.nan))


def test_scores_are_one_to_one():
    mask = np.zeros((10, 10), np.int32)
    mask[1:4, 1:4] = 1
    mask[6:9, 6:9] = 2
    centres = np.array([[2.0, 2.0], [2.4, 2.6], [5.0, 0.0]])  # two in nucleus 1, one on background
    score = score_against_mask(centres, mask)
    assert (score.n_true, score.n_detected, score.matched) == (2, 3, 1)
    assert score.recall == 0.5 and score.precision == pytest.approx(1 / 3)

    reference = np.array([[0.0, 0.0], [10.0, 0.0]])
    # Nearest-first in detection order would pair (4, 0) with (0, 0) and lose (10, 0); optimal keeps both.
    score = score_against_centres(np.array([[4.0, 0.0], [-3.0, 0.0]]), reference, max_distance=6.0)
    assert score.matched == 2


def test_fill_holes_matches_scipy():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    for level in (0.45, 0.5, 0.55):
        mask = ndi.gaussian_filter(rng.random((97, 131)), 2) > level
        np.testing.assert_array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))
