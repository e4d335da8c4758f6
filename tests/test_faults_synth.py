"""Fault sweep of `fastcell synth`: bad options refused by name before any work, a foreign OUT_DIR left
alone, an interrupted run that leaves no table a later `fastcell shard` would take for a whole screen."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import tifffile
from fault_helpers import assert_refused, cli_runner, snapshot

from fastcell.errors import InputError
from fastcell.synth.design import SynthConfig

cli = pytest.fixture(cli_runner)

TINY = ["--weeks", "1", "--plates-per-week", "1", "--field-size", "32x40", "--cell-size", "8", "--workers", "1"]


def test_a_negative_seed_is_refused_by_name(cli, tmp_path):
    # numpy seeds must be non-negative: before, --seed -1 ended in numpy's ValueError traceback.
    outcome = cli("synth", tmp_path / "s", *TINY, "--seed", "-1")
    assert_refused(outcome, "--seed must be at least 0")
    assert not (tmp_path / "s").exists()


def test_a_field_of_too_many_cells_is_refused_before_work():
    # 8192x8192 px at --cell-size 8 is ~300k cells per field: hours of cell placement per field before.
    with pytest.raises(InputError, match="--field-size 8192x8192 with --cell-size 8"):
        SynthConfig("x", field_size=(8192, 8192), cell_size=8)
    SynthConfig("x", field_size=(2048, 2048), cell_size=8)  # the largest area allowed at this cell size
    SynthConfig("x", field_size=(1024, 1280), cell_size=64)  # the full screen of the help


def test_a_folder_of_something_else_is_left_alone(cli, tmp_path):
    # Before, synth wrote into any folder: the real download's BBBC021_v1_image.csv was replaced by the
    # synthetic selection, and its TIFFs overwritten (or, at the same size, kept and mixed with synthetic ones).
    download = tmp_path / "bbbc021"
    (download / "Week1" / "Week1_22123").mkdir(parents=True)
    (download / "BBBC021_v1_image.csv").write_text("TableNumber,ImageNumber\n1,1\n")
    before = snapshot(download)
    outcome = cli("synth", download, *TINY)
    assert_refused(outcome, f"{download}: holds BBBC021_v1_image.csv, Week1 but no synth.json")
    assert snapshot(download) == before and sorted(p.name for p in download.iterdir()) == [
        "BBBC021_v1_image.csv", "Week1"]


def test_an_interrupted_run_leaves_no_image_table_and_a_rerun_completes_it(cli, monkeypatch, tmp_path):
    out = tmp_path / "screen"
    write, calls = tifffile.imwrite, []

    def interrupted_after_two_fields(*args, **kwargs):
        calls.append(args[0])
        if len(calls) > 6:  # 3 TIFFs per field
            raise KeyboardInterrupt
        write(*args, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", interrupted_after_two_fields)
    assert cli("synth", out, *TINY).code == 130
    # Before, BBBC021_v1_image.csv (and the MoA table) came first, listing every field: `fastcell shard` took
    # the folder for a screen and failed on the first missing TIFF, or with --on-error skip sharded a part.
    assert sorted(p.name for p in out.iterdir()) == ["Week1", "synth.json"]
    assert "counts" not in json.loads((out / "synth.json").read_text())
    refused = cli("shard", out, tmp_path / "shards")
    assert refused.code == 2 and "an unfinished `fastcell synth` screen" in refused.err, refused.err

    monkeypatch.setattr(tifffile, "imwrite", write)
    resumed = cli("synth", out, *TINY)
    assert resumed.code == 0 and "2 already complete and skipped" in resumed.out, resumed.err
    images = pd.read_csv(out / "BBBC021_v1_image.csv")
    cells = pd.read_csv(out / "synth_cells.csv")
    assert set(cells["image"]) <= set(images["Image_PathName_DAPI"] + "/" + images["Image_FileName_DAPI"])
    assert json.loads((out / "synth.json").read_text())["counts"]["fields"] == len(images)


def test_a_rerun_removes_what_a_killed_run_was_writing(cli, tmp_path):
    out = tmp_path / "screen"
    assert cli("synth", out, *TINY).code == 0
    plate = next((out / "Week1").iterdir())
    stale = [plate / ".Week1_x.tif.k3j2.tmp", out / ".synth_cells.csv.a1b2.tmp"]  # SIGKILL during atomic writes
    for path in stale:
        path.write_bytes(b"half")
    assert cli("synth", out, *TINY).code == 0
    assert not any(path.exists() for path in stale)


def test_n_nuclei_stays_whole_when_a_field_has_no_cell(cli, tmp_path):
    # A field of 2 cell diameters often holds no cell; its empty per-cell array was float, so the CSV said 3.0.
    out = tmp_path / "screen"
    assert cli("synth", out, *TINY, "--field-size", "16x16").code == 0  # the last --field-size counts
    cells = pd.read_csv(out / "synth_cells.csv")
    images = pd.read_csv(out / "BBBC021_v1_image.csv")
    assert cells["image"].nunique() < len(images)  # some field has no cell
    assert cells["n_nuclei"].dtype.kind == "i" and (cells["n_nuclei"] >= 1).all()
