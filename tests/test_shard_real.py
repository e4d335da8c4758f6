"""A real 5-channel Cell Painting field (cpg0000 JUMP pilot, BR00116991 A01 site 1) through `fastcell shard`.

A generic field table names its five TIFFs; CellProfiler's Nuclei.csv gives the 109 nuclei. Every
nucleus must be cropped or counted as a border cell, and every crop must equal a direct NumPy
window of the illumination-corrected field.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from shard_screens import read_tars

from fastcell.shard.crops import crop_origins
from fastcell.shard.illumination import correct_illumination, load_illumination
from fastcell.shard.pipeline import ShardConfig, shard_screen

FIELD = Path(__file__).parent / "data" / "jump-cpg0000" / "BR00116991" / "A01-1"
DYES = {"DNA": "ch5", "ER": "ch4", "RNA": "ch3", "AGP": "ch1", "Mito": "ch2"}  # Cell Painting channel order
CROP = 96


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    if not (FIELD / "Nuclei.csv").is_file():
        pytest.fail(f"{FIELD}: the real Cell Painting test field is missing from the repository")
    root = tmp_path_factory.mktemp("jump")
    files = {dye: str(FIELD / f"r01c01f01p01-{ch}sk1fk1fl1.tiff") for dye, ch in DYES.items()}
    table = root / "fields.csv"
    pd.DataFrame(
        [dict(plate="BR00116991", well="A01", site=1, treatment="untreated", ImageNumber=1, **files)]
    ).to_csv(table, index=False)
    config = ShardConfig(source=table, out=root / "shards", locations=FIELD / "Nuclei.csv", channels=tuple(DYES),
                         dna_channel="DNA", crop_size=CROP, shard_size=40, workers=1)  # fmt: skip
    return config, shard_screen(config)


def test_every_nucleus_is_cropped_or_counted(sharded):
    config, result = sharded
    nuclei = pd.read_csv(FIELD / "Nuclei.csv")
    assert len(nuclei) == 109
    border = result.manifest.skipped["cells"]["border"]
    assert result.n_cells + border == 109 and result.n_cells > 80
    assert result.manifest.channels == list(DYES)
    assert [s.count for s in result.manifest.split_shards("train")] == [
        len(c) for c in np.array_split(np.arange(result.n_cells), -(-result.n_cells // 40))
    ]
    # the cropped cells are exactly the nuclei whose window fits in the 1080 x 1080 field
    origins = crop_origins(nuclei[["AreaShape_Center_X", "AreaShape_Center_Y"]].to_numpy(), CROP)
    fits = ((origins >= 0) & (origins + CROP <= 1080)).all(axis=1)
    assert fits.sum() == result.n_cells


def test_crops_are_bit_exact_windows_of_the_corrected_field(sharded):
    config, result = sharded
    raw = np.stack([tifffile.imread(FIELD / f"r01c01f01p01-{ch}sk1fk1fl1.tiff") for ch in DYES.values()])
    corrected = correct_illumination(raw, load_illumination(config.out / "illumination.npz")["BR00116991"])
    cells = pd.read_parquet(config.out / "cells.parquet").set_index("id")
    samples = read_tars(result.manifest.tar_paths("train"))
    assert sorted(samples) == list(range(result.n_cells))
    origins = crop_origins(cells.loc[sorted(samples), ["x", "y"]].to_numpy(), CROP)
    for cell_id, (x0, y0) in zip(sorted(samples), origins, strict=True):
        np.testing.assert_array_equal(samples[cell_id], corrected[:, y0 : y0 + CROP, x0 : x0 + CROP])
    assert not np.array_equal(corrected, raw)  # the correction did change the pixels
