"""Single-cell crops: exact slices, border handling, and the real Cell Painting field."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from fastcell.shard.crops import extract_crops
from fastcell.shard.illumination import IlluminationAccumulator, correct_illumination

JUMP_SITE = Path(__file__).parent / "data" / "jump-cpg0000" / "BR00116991" / "A01-1"
JUMP_CHANNELS = (5, 4, 3, 1, 2)  # DNA, ER, RNA, AGP, Mito (see the README there)


def direct_crop(field, x, y, size):
    """The convention spelled out: rows floor(y + 0.5) - S // 2 .. + S, columns likewise."""
    y0, x0 = int(np.floor(y + 0.5)) - size // 2, int(np.floor(x + 0.5)) - size // 2
    return field[:, y0 : y0 + size, x0 : x0 + size]


@pytest.fixture
def field():
    return np.random.default_rng(0).integers(0, 65536, size=(3, 60, 80), dtype=np.uint16)


@pytest.mark.parametrize("size", [16, 15])
def test_interior_crops_are_exact_slices(field, size):
    centres = np.array([[40.0, 30.0], [10.49, 20.5], [69.5, 51.2], [35.7, 8.0]])
    result = extract_crops(field, centres, size)
    assert result.crops.shape == (4, 3, size, size) and result.crops.dtype == np.uint16
    assert result.crops.flags.c_contiguous
    np.testing.assert_array_equal(result.kept, [0, 1, 2, 3])
    assert result.n_border == 0
    for crop, (x, y) in zip(result.crops, centres, strict=True):
        np.testing.assert_array_equal(crop, direct_crop(field, x, y, size))
    # the centre pixel sits at index S // 2: (40, 30) -> field[:, 30, 40]
    np.testing.assert_array_equal(result.crops[0][:, size // 2, size // 2], field[:, 30, 40])
    np.testing.assert_array_equal(result.crops[1][:, size // 2, size // 2], field[:, 21, 10])  # halves round up


def test_border_cells_are_skipped_and_counted(field):
    centres = np.array([[40.0, 30.0], [3.0, 30.0], [40.0, 58.0], [20.0, 20.0], [79.0, 0.0]])
    result = extract_crops(field, centres, 24, border="skip")
    np.testing.assert_array_equal(result.kept, [0, 3])
    assert result.n_border == 3
    assert result.crops.shape == (2, 3, 24, 24)
    np.testing.assert_array_equal(result.crops[1], direct_crop(field, 20, 20, 24))


def test_border_cells_are_zero_padded_and_counted(field):
    centres = np.array([[40.0, 30.0], [3.0, 30.0], [79.0, 0.0]])
    result = extract_crops(field, centres, 24, border="pad")
    np.testing.assert_array_equal(result.kept, [0, 1, 2])
    assert result.n_border == 2
    padded = np.pad(field, ((0, 0), (24, 24), (24, 24)))
    for crop, (x, y) in zip(result.crops, centres, strict=True):
        np.testing.assert_array_equal(crop, direct_crop(padded, x + 24, y + 24, 24))
    assert (result.crops[1][:, :, :9] == 0).all()  # x0 = 3 - 12 = -9: nine columns outside
    assert (result.crops[2][:, :12, :] == 0).all() and (result.crops[2][:, :, 13:] == 0).all()


def test_no_cells_and_bad_arguments(field):
    empty = extract_crops(field, np.zeros((0, 2)), 16)
    assert empty.crops.shape == (0, 3, 16, 16) and empty.n_border == 0 and len(empty.kept) == 0
    with pytest.raises(ValueError, match=r"off the 80x60 field, e.g. \(x, y\) = \(80, 10.5\)$"):
        extract_crops(field, np.array([[80.0, 10.5]]), 16)
    with pytest.raises(ValueError, match="off the"):
        extract_crops(field, np.array([[np.nan, 10.0]]), 16)
    with pytest.raises(ValueError, match="border"):
        extract_crops(field, np.array([[40.0, 30.0]]), 16, border="wrap")
    with pytest.raises(ValueError, match="C, H, W"):
        extract_crops(field[0], np.array([[40.0, 30.0]]), 16)


def test_real_cell_painting_field_against_cellprofiler_nuclei():
    """All 109 CellProfiler nuclei are cropped or counted as border; crops match the corrected image."""
    field = np.stack([tifffile.imread(JUMP_SITE / f"r01c01f01p01-ch{c}sk1fk1fl1.tiff") for c in JUMP_CHANNELS])
    assert field.shape == (5, 1080, 1080) and field.dtype == np.uint16
    nuclei = pd.read_csv(JUMP_SITE / "Nuclei.csv")
    centres = nuclei[["AreaShape_Center_X", "AreaShape_Center_Y"]].to_numpy()
    assert len(centres) == 109

    accumulator = IlluminationAccumulator(5, field.shape[1:])
    accumulator.add(field)
    corrected = correct_illumination(field, accumulator.finish())

    size = 96
    skipped = extract_crops(corrected, centres, size, border="skip")
    assert len(skipped.kept) + skipped.n_border == 109
    assert 0 < skipped.n_border < 109
    for crop, i in zip(skipped.crops, skipped.kept, strict=True):
        np.testing.assert_array_equal(crop, direct_crop(corrected, *centres[i], size))
    near_edge = (np.floor(centres + 0.5) - size // 2 < 0) | (np.floor(centres + 0.5) - size // 2 + size > 1080)
    assert skipped.n_border == int(near_edge.any(axis=1).sum())

    padded = extract_crops(corrected, centres, size, border="pad")
    assert len(padded.kept) == 109 and padded.n_border == skipped.n_border
    np.testing.assert_array_equal(padded.crops[skipped.kept], skipped.crops)
