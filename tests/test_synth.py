"""`fastcell synth`: real design, BBBC021 layout, deterministic and resumable pixels, MoA and batch effects."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
import typer
from typer.testing import CliRunner

from fastcell.errors import InputError
from fastcell.metadata import (
    IMAGE_COLUMNS,
    MOA_COLUMNS,
    load_annotated_design,
    load_image_table,
    load_moa_table,
    treatment_key,
)
from fastcell.synth.cli import synth
from fastcell.synth.design import SynthConfig, parse_count, parse_field_size, parse_weeks, select_fields
from fastcell.synth.phenotypes import DMSO_PHENOTYPE, Compound, as_dict, treatment_phenotype
from fastcell.synth.render import draw_cells, layout_cells
from fastcell.synth.screen import CELL_COLUMNS, generate_screen

SMALL = dict(weeks=("Week1", "Week2"), plates_per_week=1, field_size=(96, 128), cell_size=16)


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """A small screen: one plate of Week1 and one of Week2, benchmark wells, 96x128 fields, 2 workers."""
    out = tmp_path_factory.mktemp("synth") / "screen"
    result = generate_screen(SynthConfig(out, workers=2, **SMALL), progress=False)
    return out, result


def _tiff_paths(root, table):
    return [root / row[f"Image_PathName_{ch}"] / row[f"Image_FileName_{ch}"]
            for _, row in table.iterrows() for ch in ("DAPI", "Tubulin", "Actin")]


def test_layout_and_tables_follow_the_real_design(screen):
    root, result = screen
    images = pd.read_csv(root / "BBBC021_v1_image.csv")
    assert list(images.columns) == list(IMAGE_COLUMNS)
    key = ["TableNumber", "ImageNumber"]  # ImageNumber alone repeats across the weekly tables
    real = load_image_table().set_index(key)[list(IMAGE_COLUMNS[2:])]
    assert images["Image_Metadata_Plate_DAPI"].str.startswith(("Week1_", "Week2_")).all()
    assert images["Image_Metadata_Plate_DAPI"].nunique() == 2
    chosen = images.set_index(key)
    pd.testing.assert_frame_equal(chosen[list(IMAGE_COLUMNS[2:])], real.loc[chosen.index], check_dtype=False)
    assert result.n_fields == len(images) == result.n_rendered

    moa = pd.read_csv(root / "BBBC021_v1_moa.csv")
    assert list(moa.columns) == list(MOA_COLUMNS)
    def rows(table, *columns):
        return {(treatment_key(c, x), *rest) for c, x, *rest in table[list(columns)].itertuples(index=False)}

    assert rows(moa, "compound", "concentration", "moa") <= rows(load_moa_table(), "compound", "concentration", "moa")
    assert "DMSO" in set(moa["compound"])
    assert rows(moa, "compound", "concentration") <= rows(images, "Image_Metadata_Compound",
                                                            "Image_Metadata_Concentration")

    for path in _tiff_paths(root, images):
        pixels = tifffile.imread(path)
        assert pixels.dtype == np.uint16 and pixels.shape == (96, 128)

    cells = pd.read_csv(root / "synth_cells.csv")
    assert list(cells.columns) == list(CELL_COLUMNS)
    assert len(cells) == result.n_cells > 5 * result.n_fields
    assert set(zip(cells["TableNumber"], cells["ImageNumber"], strict=True)) <= set(chosen.index)
    assert cells["x"].between(0, 127).all() and cells["y"].between(0, 95).all()
    assert (root / cells["image"].iloc[0]).is_file()


def test_default_covers_every_annotated_treatment_in_replicate_wells():
    design = load_annotated_design()
    selection = select_fields(design, SynthConfig("unused"))
    treated = selection[selection["role"] == "treatment"]
    wells_per_treatment = treated.groupby(["compound", "concentration"])["well"].size()
    assert len(wells_per_treatment) == 103
    assert wells_per_treatment.min() >= 2
    assert set(selection["role"]) == {"treatment", "dmso"}
    assert (selection["site"] == 1).all()
    # Two plates per week still cover every treatment: the ranking covers both plate sets of a week.
    two = select_fields(design, SynthConfig("unused", plates_per_week=2))
    assert two[two["role"] == "treatment"].groupby(["compound", "concentration"]).ngroups == 103


def test_same_pixels_for_a_subset_with_one_worker(screen, tmp_path):
    root, _ = screen
    subset = generate_screen(SynthConfig(tmp_path / "w1", workers=1, **{**SMALL, "weeks": ("Week2",)}),
                             progress=False)
    images = pd.read_csv(subset.out_dir / "BBBC021_v1_image.csv")
    for path in _tiff_paths(subset.out_dir, images):
        assert path.read_bytes() == (root / path.relative_to(subset.out_dir)).read_bytes()
    other = generate_screen(SynthConfig(tmp_path / "seed1", seed=1, workers=1, **{**SMALL, "weeks": ("Week2",)}),
                            progress=False)
    first = _tiff_paths(other.out_dir, images)[0]
    assert first.read_bytes() != (root / first.relative_to(other.out_dir)).read_bytes()


def test_resume_skips_complete_fields_and_remakes_missing_ones(screen, tmp_path):
    root, result = screen
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    images = pd.read_csv(copy / "BBBC021_v1_image.csv")
    missing = _tiff_paths(copy, images)[4]  # one channel of the second field
    missing.unlink()
    resumed = generate_screen(SynthConfig(copy, workers=1, **SMALL), progress=False)
    assert (resumed.n_rendered, resumed.n_skipped) == (1, result.n_fields - 1)
    assert missing.read_bytes() == (root / missing.relative_to(copy)).read_bytes()
    assert (copy / "synth_cells.csv").read_bytes() == (root / "synth_cells.csv").read_bytes()
    with pytest.raises(InputError, match="seed"):
        generate_screen(SynthConfig(copy, seed=7, workers=1, **SMALL), progress=False)


def _cells(moa: str, seed: int = 0):
    phenotype = as_dict(treatment_phenotype(Compound("drug", moa, ec50=0.1), 10.0, seed=0))
    rng = np.random.default_rng(seed)
    layout = layout_cells(phenotype, rng, 256, 320, 1.0)
    return layout, draw_cells(layout, rng, 256, 320)


def test_moa_moves_cells_the_expected_way():
    assert as_dict(treatment_phenotype(Compound("drug", "DNA damage", 1.0), 0.0, 0)) == as_dict(DMSO_PHENOTYPE)
    dmso, dmso_pixels = _cells("DMSO")
    damaged, _ = _cells("DNA damage")
    nuclear_area = [np.mean([np.pi * (n[:, 2] ** 2).sum() for n in lay.nuclei]) for lay in (dmso, damaged)]
    assert nuclear_area[1] > 1.3 * nuclear_area[0]

    stabilised, stabilised_pixels = _cells("Microtubule stabilizers")
    tubulin = [pixels[1][pixels[1] > 0.05].mean() for pixels in (dmso_pixels, stabilised_pixels)]
    assert tubulin[1] > 1.2 * tubulin[0]
    aurora, _ = _cells("Aurora kinase inhibitors")
    assert len(aurora) < len(dmso)
    assert np.mean([len(n) > 1 for n in aurora.nuclei]) > 0.2 > np.mean([len(n) > 1 for n in dmso.nuclei])


def test_weeks_differ_in_dmso_intensity(screen):
    root, _ = screen
    images = pd.read_csv(root / "BBBC021_v1_image.csv")
    dmso = images[images["Image_Metadata_Compound"] == "DMSO"]
    means = {}
    for _, row in dmso.iterrows():
        week = row["Image_Metadata_Plate_DAPI"].split("_")[0]
        field = [tifffile.imread(root / row[f"Image_PathName_{c}"] / row[f"Image_FileName_{c}"]).mean()
                 for c in ("DAPI", "Tubulin", "Actin")]
        means.setdefault(week, []).append(field)
    week1, week2 = (np.log(np.array(means[w])) for w in ("Week1", "Week2"))
    gap = np.abs(week1.mean(0) - week2.mean(0))
    spread = np.maximum(week1.std(0), week2.std(0))
    assert (gap > 2 * spread).any()


def test_bad_options_are_named():
    design = load_annotated_design()
    with pytest.raises(InputError, match="Week11"):
        select_fields(design, SynthConfig("x", weeks=parse_weeks("1,11")))
    with pytest.raises(InputError, match="--field-size"):
        SynthConfig("x", field_size=(32, 320))
    with pytest.raises(InputError, match="HEIGHTxWIDTH"):
        parse_field_size("256")
    with pytest.raises(InputError, match="4 sites"):
        SynthConfig("x", sites_per_well=5)
    with pytest.raises(InputError, match="plates-per-week"):
        SynthConfig("x", plates_per_week=parse_count("0", "--plates-per-week"))
    with pytest.raises(InputError, match="whole number"):
        parse_count("many", "--sites-per-well")
    assert parse_weeks("Week3, 1") == ("Week3", "Week1") and parse_weeks("all") is None


def test_cli_makes_a_screen_and_reports_bad_options(tmp_path):
    app = typer.Typer()
    app.command("synth")(synth)
    app.command("other")(lambda: None)  # two commands, so the verb is named as under `fastcell`
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["synth", str(out), "--weeks", "10", "--plates-per-week", "1", "--field-size", "64x80", "--workers", "1"]
    ran = runner.invoke(app, args)
    assert ran.exit_code == 0, ran.output
    assert "fields" in ran.output and (out / "synth_cells.csv").is_file()
    again = runner.invoke(app, args)
    assert "skipped" in again.output
    bad = runner.invoke(app, ["synth", str(tmp_path / "bad"), "--weeks", "0x"])
    assert isinstance(bad.exception, InputError) and "--weeks" in str(bad.exception)
