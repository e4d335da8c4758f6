"""The packaged BBBC021 design: counts from the published benchmark and the taxol pitfall."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fastcell.errors import InputError
from fastcell.metadata import (
    BBBC021_CHANNELS,
    IMAGE_COLUMNS,
    annotate,
    batch_of_plate,
    find_column,
    load_image_table,
    load_moa_table,
    nscb_moas,
    site_of_filename,
    treatment_key,
)


@pytest.fixture(scope="module")
def design() -> pd.DataFrame:
    return annotate(load_image_table(), load_moa_table())


def test_image_table_shape_and_normalised_columns():
    images = load_image_table()
    assert len(images) == 13200
    assert set(IMAGE_COLUMNS) <= set(images.columns)
    assert images["plate"].nunique() == 55
    assert images["batch"].nunique() == 10
    assert sorted(images["site"].unique()) == [1, 2, 3, 4]
    assert images["compound"].nunique() == 113
    assert images["concentration"].dtype == float
    assert (images.groupby(["plate", "well"]).size() == 4).all()
    assert BBBC021_CHANNELS == ("DAPI", "Tubulin", "Actin")


def test_find_column_takes_the_first_alias_present_whatever_its_case():
    columns = ["ImageNumber", "metadata_plate", "Plate", "Well"]
    assert find_column(columns, ("Metadata_Plate", "plate")) == "metadata_plate"  # the aliases' order decides
    assert find_column(columns, ("plate", "Metadata_Plate")) == "Plate"
    assert find_column(columns, ("site", "field")) is None


def test_shard_and_eval_find_columns_with_find_column(monkeypatch):
    """The input tables of `shard` and the profile tables of `eval` name their columns alike: one lookup."""
    from fastcell import metadata
    from fastcell.evaluate.profiles import ProfileColumns, find_columns
    from fastcell.shard.sources import PLATE_ALIASES, _column

    asked, real = [], metadata.find_column
    monkeypatch.setattr(metadata, "find_column", lambda columns, aliases: asked.append(aliases) or real(columns, aliases))
    table = pd.DataFrame(columns=["METADATA_PLATE", "well"])
    assert _column(table, PLATE_ALIASES, "t.csv", "plate") == "METADATA_PLATE"
    assert find_columns(table.columns, ProfileColumns(), "p.csv") == {"plate": "METADATA_PLATE", "well": "well"}
    assert asked[0] == PLATE_ALIASES and len(asked) == 8


def test_small_parsers():
    assert batch_of_plate("Week10_40111") == "Week10"
    assert site_of_filename("G10_s3_w1BEDC2073.tif") == 3
    assert treatment_key("taxol", 0.30000000000000004) == treatment_key("taxol", 0.3)
    with pytest.raises(InputError, match="Week"):
        batch_of_plate("Plate7")


def test_benchmark_counts(design):
    treated = design[design["role"] == "treatment"]
    treatments = treated.groupby(["compound", "concentration"]).ngroups
    assert treatments == 103
    assert treated["compound"].nunique() == 38
    assert treated["moa"].nunique() == 12
    assert (design.loc[design["role"] == "dmso", "moa"] == "DMSO").all()
    # Kinase inhibitors and Cholesterol-lowering each sit in one week: NSCB scores 92 treatments.
    scored = nscb_moas(design)
    assert {"Kinase inhibitors", "Cholesterol-lowering"}.isdisjoint(scored)
    assert treated[treated["moa"].isin(scored)].groupby(["compound", "concentration"]).ngroups == 92
    # Each annotated compound sits in one week.
    assert (treated.groupby("compound")["batch"].nunique() == 1).all()


def test_taxol_pitfall(design):
    taxol = design[design["compound"] == "taxol"]
    treated = taxol[taxol["role"] == "treatment"]
    assert set(treated["plate"]) == {"Week1_22123", "Week1_22141", "Week1_22161"}
    assert set(treated["well"]) == {"D03", "D04", "D05"}
    assert np.allclose(sorted(treated["concentration"].unique()), [0.3, 1.0, 3.0])
    controls = taxol[taxol["role"] == "control"]
    assert controls.groupby(["plate", "well"]).ngroups == 330  # 6 positive-control wells per plate
    assert controls["moa"].isna().all()
    assert np.allclose(controls["concentration"], 0.3)


def test_missing_columns_named(tmp_path):
    bad = tmp_path / "BBBC021_v1_image.csv"
    load_image_table().drop(columns=["Image_FileName_Actin"]).to_csv(bad, index=False)
    with pytest.raises(InputError, match=r"BBBC021_v1_image\.csv.*Image_FileName_Actin"):
        load_image_table(bad)
    with pytest.raises(InputError, match="not found"):
        load_moa_table(tmp_path / "nope.csv")
