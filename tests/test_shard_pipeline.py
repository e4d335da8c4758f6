"""`shard_screen` end to end on a tiny screen: content, readers, determinism, resume, splits, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from shard_screens import read_tars, write_screen

from fastcell.errors import InputError
from fastcell.format.folder import decode_crop, decode_id, read_manifest, verify_shard
from fastcell.shard import output
from fastcell.shard.crops import crop_origins
from fastcell.shard.illumination import correct_illumination, load_illumination
from fastcell.shard.output import field_paths
from fastcell.shard.passes import crops, write
from fastcell.shard.passes.split import plan_shards
from fastcell.shard.pipeline import ShardConfig, shard_screen
from fastcell.shard.sources import field_key, load_screen, read_field

CROP = 24


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> Path:
    """2 plates x 3 wells x 2 sites of 96 x 128 px, 6 cells each: 12 fields, 72 cells."""
    return write_screen(tmp_path_factory.mktemp("screen"))


@pytest.fixture(scope="module")
def base(screen, tmp_path_factory) -> ShardConfig:
    return ShardConfig(source=screen, out=tmp_path_factory.mktemp("out") / "base", crop_size=CROP, shard_size=10,
                       workers=1, keep_work=True)  # fmt: skip


@pytest.fixture(scope="module")
def sharded(base):
    """One run with nuclei detection, one worker, the work folder kept (the reference output)."""
    return shard_screen(base)


def test_output_matches_the_format(sharded, base):
    out = base.out
    manifest = read_manifest(out)
    assert manifest.channels == ["DNA", "AGP", "Mito"] and manifest.crop_size == CROP
    assert manifest.illumination == "illumination.npz" and (out / "illumination.npz").is_file()
    assert manifest.scaling == {"method": "none"}
    shards = manifest.split_shards("train")
    assert [s.count for s in shards] == [
        len(c) for c in np.array_split(np.arange(sharded.n_cells), len(shards))
    ]
    assert all(s.count <= 10 for s in shards)
    for s in shards:
        verify_shard(out / s.name, s.count)
    # every located cell is cropped or counted as a border cell: nothing dropped silently
    assert sharded.n_cells + manifest.skipped["cells"]["border"] >= 0.9 * 72
    assert manifest.skipped["fields"] == []
    assert manifest.config["crop_size"] == CROP and manifest.config["channels"] == ["DNA", "AGP", "Mito"]
    assert len(manifest.config["hash"]) == 16 and str(base.source.resolve()) in manifest.config["inputs"]

    cells = pd.read_parquet(out / "cells.parquet")
    assert list(cells.columns[:3]) == ["id", "split", "shard"]
    assert cells["id"].tolist() == list(range(sharded.n_cells))
    assert set(cells["moa"]) == {"DMSO", "MoA-A", "MoA-B"} and set(cells["split"]) == {"train"}
    samples = read_tars(manifest.tar_paths("train"))
    assert sorted(samples) == cells["id"].tolist()
    for s in shards:  # the table says which shard holds each cell
        assert set(cells.loc[cells["shard"] == s.name, "id"]) == set(read_tars([out / s.name]))
    assert all(c.shape == (3, CROP, CROP) and c.dtype == np.uint16 for c in samples.values())

    # channel statistics: exact over the training crops as stored
    pixels = np.stack(list(samples.values())).transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64)
    stats = manifest.channel_stats
    np.testing.assert_allclose(stats["mean"], pixels.mean(1), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], pixels.std(1), rtol=1e-9)
    np.testing.assert_array_equal(stats["min"], pixels.min(1))
    np.testing.assert_array_equal(stats["max"], pixels.max(1))
    np.testing.assert_array_equal(stats["p01"], np.percentile(pixels, 1, axis=1, method="inverted_cdf"))
    np.testing.assert_array_equal(stats["p99"], np.percentile(pixels, 99, axis=1, method="inverted_cdf"))


def test_crops_are_exact_windows_of_the_corrected_field(sharded, base):
    screen = load_screen(base.source)
    illumination = load_illumination(base.out / "illumination.npz")
    cells = pd.read_parquet(base.out / "cells.parquet")
    samples = read_tars(read_manifest(base.out).tar_paths("train"))
    field = next(f for f in screen.fields if f.key == "P2_A02_s1")
    corrected = correct_illumination(read_field(field), illumination["P2"])
    rows = cells[(cells.plate == "P2") & (cells.well == "A02") & (cells.site == 1)]
    assert len(rows) > 0
    origins = crop_origins(rows[["x", "y"]].to_numpy(), CROP)
    for cell_id, (x0, y0) in zip(rows["id"], origins, strict=True):
        np.testing.assert_array_equal(samples[cell_id], corrected[:, y0 : y0 + CROP, x0 : x0 + CROP])


def test_each_shard_holds_the_planned_crops_in_the_planned_order(sharded, base):
    """The write pass gathers a shard's crops field by field; its samples still come in the plan's order, each
    the crop its field saved in the work folder."""
    cells = pd.read_parquet(base.out / "cells.parquet")
    row = cells.groupby(["plate", "well", "site"], sort=False).cumcount().to_numpy()  # ids run field by field
    plan = plan_shards(cells, base, base.shard_size)
    assert [name for _, name, _ in plan] == [s.name for s in read_manifest(base.out).split_shards("train")]
    for _, name, ids in plan:
        samples = read_tars([base.out / name])
        assert list(samples) == ids.tolist(), name
        for cell_id in ids:
            cell = cells.loc[cell_id]
            key = field_key(cell["plate"], cell["well"], int(cell["site"]))
            saved = np.load(field_paths(base.out, key)[0], mmap_mode="r")[row[cell_id]]
            np.testing.assert_array_equal(samples[cell_id], saved)


def test_interleaved_no_shard_holds_one_well(sharded, base):
    cells = pd.read_parquet(base.out / "cells.parquet")
    for _, group in cells.groupby("shard"):
        assert group[["plate", "well"]].drop_duplicates().shape[0] > 1
        assert group["compound"].nunique() > 1


def test_webdataset_reads_the_shards(sharded, base):
    import webdataset as wds

    tars = read_manifest(base.out).tar_paths("train")
    expected = read_tars(tars)
    seen = 0
    for sample in wds.WebDataset([str(t) for t in tars], shardshuffle=False):
        cell_id = decode_id(sample["id"])
        assert sample["__key__"] == f"{cell_id:012d}"
        np.testing.assert_array_equal(decode_crop(sample["npy"]), expected[cell_id])
        seen += 1
    assert seen == sharded.n_cells


def test_dali_reads_the_shards_with_fastcell_indices(sharded, base):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    manifest = read_manifest(base.out)
    tars, idxs = manifest.tar_paths("train"), manifest.index_paths("train")

    @pipeline_def(batch_size=sharded.n_cells, num_threads=1, device_id=None)
    def reader():
        crop, cell_id = fn.readers.webdataset(
            paths=[str(t) for t in tars], index_paths=[str(i) for i in idxs], ext=["npy", "id"],
            dtypes=[types.UINT8, types.INT64], random_shuffle=False, name="reader",
        )  # fmt: skip
        return fn.decoders.numpy(crop), cell_id

    pipe = reader()
    pipe.build()
    crops, ids = pipe.run()
    expected = read_tars(tars)
    for i in range(sharded.n_cells):
        cell_id = int(np.asarray(ids.at(i)).reshape(-1)[0])
        np.testing.assert_array_equal(np.asarray(crops.at(i)), expected[cell_id])
    # the index equals what DALI's own tool writes
    wds2idx = Path(sys.executable).parent / "wds2idx"
    if wds2idx.is_file():
        theirs = base.out.parent / "theirs.idx"
        subprocess.run([str(wds2idx), str(tars[0]), str(theirs)], check=True, capture_output=True)
        assert theirs.read_text().split() == idxs[0].read_text().split()


def test_two_workers_give_byte_identical_shards(sharded, base):
    other = shard_screen(replace(base, out=base.out.parent / "two-workers", workers=2, keep_work=False))
    assert other.n_cells == sharded.n_cells
    names = sorted(p.name for p in base.out.iterdir() if p.suffix in (".tar", ".idx"))
    assert names == sorted(p.name for p in other.out.iterdir() if p.suffix in (".tar", ".idx"))
    for name in [*names, "illumination.npz"]:
        assert (base.out / name).read_bytes() == (other.out / name).read_bytes(), name
    assert not (other.out / ".work").exists()  # removed at the end without --keep-work


def test_rerun_redoes_only_what_is_missing(sharded, base):
    out = base.out.parent / "resume"
    shutil.copytree(base.out, out)
    config = replace(base, out=out)
    assert shard_screen(config).up_to_date  # complete: nothing to do

    shard = read_manifest(out).split_shards("train")[1].name
    (out / shard).unlink()
    (out / shard).with_suffix(".idx").unlink()
    for path in (out / ".work" / "fields").glob("P1_A02_s2.*"):
        path.unlink()
    result = shard_screen(config)
    assert (result.fields_processed, result.fields_reused) == (1, 11)
    assert (result.shards_written, result.shards_reused) == (
        1,
        len(read_manifest(out).split_shards("train")) - 1,
    )
    assert not result.illumination_computed
    assert (out / shard).read_bytes() == (base.out / shard).read_bytes()


@pytest.mark.parametrize("change", ["truncated-shard", "skipped-field"])
def test_a_rerun_verifies_each_shard_once(sharded, base, monkeypatch, change):
    """A rerun into a complete folder that cannot be kept as it is (a damaged shard; a field skipped last time,
    tried again) checks each shard against its index once: on the way in, or in the write pass."""
    out = base.out.parent / f"verify-once-{change}"
    shutil.copytree(base.out, out)
    names = [s.name for s in read_manifest(out).split_shards("train")]
    if change == "truncated-shard":
        os.truncate(out / names[-1], (out / names[-1]).stat().st_size // 2)
    else:
        manifest = json.loads((out / "index.json").read_text())
        manifest["skipped"]["fields"] = [{"image": "x.tif", "plate": "P1", "well": "A01", "site": 9, "reason": "x"}]
        (out / "index.json").write_text(json.dumps(manifest))
    checked, real = [], output.verify_shard
    counting = lambda tar, *args: checked.append(Path(tar).name) or real(tar, *args)  # noqa: E731
    monkeypatch.setattr(output, "verify_shard", counting)
    monkeypatch.setattr(write, "verify_shard", counting)
    result = shard_screen(replace(base, out=out))
    assert sorted(checked) == sorted(names)
    assert (result.shards_written, result.shards_reused) == ((1, len(names) - 1) if change == "truncated-shard"
                                                             else (0, len(names)))  # fmt: skip
    for name in [*names, "cells.parquet"]:
        assert (out / name).read_bytes() == (base.out / name).read_bytes(), name


@pytest.mark.parametrize("up_to_date", [True, False])
def test_a_rerun_reads_the_manifest_once(sharded, base, opened, up_to_date):
    """A rerun into a finished folder parses its index.json once and passes it on: to the up-to-date
    result, or (a field skipped last time, tried again) to the passes."""
    out = base.out.parent / f"manifest-once-{up_to_date}"
    shutil.copytree(base.out, out)
    if not up_to_date:
        manifest = json.loads((out / "index.json").read_text())
        manifest["skipped"]["fields"] = [{"image": "x.tif", "plate": "P1", "well": "A01", "site": 9, "reason": "x"}]
        (out / "index.json").write_text(json.dumps(manifest))
    start = len(opened)
    result = shard_screen(replace(base, out=out))
    assert opened[start:].count(str(out / "index.json")) == 1
    assert result.up_to_date == up_to_date and result.manifest.root == out
    assert result.manifest.to_json() == read_manifest(out).to_json()


def test_resume_after_an_interruption_in_the_crop_pass(base, monkeypatch):
    config = replace(base, out=base.out.parent / "interrupted", illumination=False, keep_work=False)
    real_task, calls = crops.crop_task, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # like Ctrl-C during the 5th field
        return real_task(*args)

    monkeypatch.setattr(crops, "crop_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shard_screen(config)
    assert not list(config.out.glob("*.tar")) and not (config.out / "index.json").exists()
    monkeypatch.setattr(crops, "crop_task", real_task)
    result = shard_screen(config)
    assert (result.fields_processed, result.fields_reused) == (8, 4)
    assert result.shards_written == len(read_manifest(config.out).split_shards("train"))


def test_a_different_configuration_is_refused_unless_overwrite(sharded, base):
    with pytest.raises(InputError, match=r"different configuration \(crop_size: 24 -> 32\).*--overwrite"):
        shard_screen(replace(base, crop_size=32))
    not_ours = base.out.parent / "not-ours"
    not_ours.mkdir()
    (not_ours / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"holds files fastcell shard did not write \(notes.txt\).*--overwrite"):
        shard_screen(replace(base, out=not_ours))
    assert shard_screen(replace(base, out=not_ours, overwrite=True, keep_work=False)).n_cells == sharded.n_cells
    assert (not_ours / "notes.txt").read_text() == "mine"  # written beside, never removed


def test_split_by_plate_with_locations_and_scaling(screen, base):
    config = replace(base, out=base.out.parent / "by-plate", locations=screen.parent / "cells.csv",
                     val_fraction=0.5, split="plate", scaling="plate-percentile", keep_work=False)  # fmt: skip
    result = shard_screen(config)
    manifest = result.manifest
    assert result.n_cells + manifest.skipped["cells"]["border"] == 72  # all located cells accounted for
    assert manifest.skipped["cells"]["invalid_location"] == 0
    cells = pd.read_parquet(config.out / "cells.parquet")
    train, val = (set(cells.loc[cells.split == s, "plate"]) for s in ("train", "val"))
    assert len(train) == len(val) == 1 and not train & val
    assert manifest.count("val") == (cells.split == "val").sum() and manifest.split_shards("val")
    assert manifest.scaling["method"] == "plate-percentile" and manifest.scaling["percentiles"] == [0.1, 99.9]
    assert set(manifest.scaling["plates"]) == {"P1", "P2"}
    samples = np.stack(list(read_tars(manifest.tar_paths("train")).values()))
    assert samples.max() == 65535  # scaled to the full range, the brightest pixels clipped


def test_scaling_does_not_change_which_cells_are_detected(sharded, base):
    scaled = replace(base, out=base.out.parent / "scaled", scaling="plate-percentile", keep_work=False)
    assert shard_screen(scaled).n_cells == sharded.n_cells
    cells = [pd.read_parquet(out / "cells.parquet").sort_values(["image", "x", "y"]) for out in (base.out, scaled.out)]
    np.testing.assert_array_equal(cells[0][["x", "y"]].to_numpy(), cells[1][["x", "y"]].to_numpy())


@pytest.fixture
def small_screen(tmp_path) -> Path:
    return write_screen(tmp_path / "screen", plates=("P1",), wells=("A01", "B01"), sites=2)


def test_bad_fields_fail_before_any_shard_or_are_skipped_and_recorded(small_screen, tmp_path):
    missing = small_screen.parent / "P1/A01/s2_AGP.tif"
    missing.unlink()
    blank = small_screen.parent / "P1/B01/s1_DNA.tif"
    tifffile.imwrite(blank, np.full((96, 128), 200, np.uint16))  # no nuclei
    config = ShardConfig(source=small_screen, out=tmp_path / "out", crop_size=CROP, workers=1)
    with pytest.raises(InputError, match=r"(?s)s2_AGP\.tif: image file not found.*--on-error skip"):
        shard_screen(config)
    assert not list(config.out.glob("*.tar")) and not (config.out / "index.json").exists()

    result = shard_screen(replace(config, on_error="skip"))
    skipped = {f["image"]: f["reason"] for f in result.manifest.skipped["fields"]}
    assert set(skipped) == {"P1/A01/s2_DNA.tif"}  # the field without nuclei is data, not an error
    assert "image file not found" in skipped["P1/A01/s2_DNA.tif"]
    assert result.fields_empty == 1 and result.manifest.skipped["empty_fields"] == 1
    fields = pd.read_parquet(config.out / "fields.parquet").set_index("field")
    assert fields.loc["P1_B01_s1", ["status", "found", "cells"]].tolist() == ["ok", 0, 0]
    assert fields.loc["P1_A01_s2", "status"] == "skipped" and "not found" in fields.loc["P1_A01_s2", "reason"]
    cells = pd.read_parquet(config.out / "cells.parquet")
    assert set(zip(cells.well, cells.site, strict=True)) == {("A01", 1), ("B01", 2)}
    assert json.loads((config.out / "index.json").read_text())["skipped"]["fields"][0]["plate"] == "P1"

    # a rerun tries the skipped fields again: one unreadable as before leaves the folder as it is ...
    again = shard_screen(replace(config, on_error="skip"))
    assert again.up_to_date and again.fields_skipped == result.fields_skipped
    with pytest.raises(InputError, match=r"s2_AGP\.tif: image file not found"):  # all fields or an error
        shard_screen(config)
    # ... one that fails another way is a change: the run builds again and records the new reason
    missing.write_bytes(b"not a tiff")
    again = shard_screen(replace(config, on_error="skip"))
    assert not again.up_to_date and again.illumination_computed
    assert "image file not found" not in again.fields_skipped[0]["reason"], again.fields_skipped
    assert again.fields_skipped[0]["reason"].startswith(f"{missing}: unreadable image"), again.fields_skipped
    assert shard_screen(replace(config, on_error="skip")).up_to_date
    # ... and the fixed one joins, the shards are rewritten to match
    shutil.copy(small_screen.parent / "P1/A01/s1_AGP.tif", missing)
    again = shard_screen(replace(config, on_error="skip"))
    assert again.fields_skipped == [] and again.fields_empty == 1
    assert again.illumination_computed and again.fields_processed == 4  # now from all four fields
    cells = pd.read_parquet(config.out / "cells.parquet")
    assert ("A01", 2) in set(zip(cells.well, cells.site, strict=True))
    assert sorted(read_tars(again.manifest.tar_paths("train"))) == cells["id"].tolist()


def test_channels_of_different_shapes_name_the_field(small_screen, tmp_path):
    tifffile.imwrite(small_screen.parent / "P1/B01/s2_Mito.tif", np.zeros((90, 128), np.uint16))
    with pytest.raises(InputError, match=r"P1/B01: channels of field P1_B01_s2 differ in shape"):
        shard_screen(ShardConfig(source=small_screen, out=tmp_path / "out", crop_size=CROP, workers=1))


def test_options_are_checked(base):
    with pytest.raises(InputError, match="--border"):
        shard_screen(replace(base, border="wrap"))
    with pytest.raises(InputError, match="--val-fraction"):
        shard_screen(replace(base, val_fraction=1.0))
    with pytest.raises(InputError, match="no fields with role"):
        shard_screen(replace(base, roles=("control",)))


def test_plate_dmso_scaling_removes_a_plates_gain(screen, base, tmp_path):
    """The same plate imaged 1.7x brighter gives the same crops under --scaling plate-dmso; each plate's
    DMSO crops end with the documented background and mean."""
    from fastcell.shard.illumination import DMSO_LEVEL, DMSO_PEDESTAL

    bright = tmp_path / "bright"
    shutil.copytree(screen.parent, bright)
    for tif in (bright / "P2").rglob("*.tif"):
        tifffile.imwrite(tif, np.clip(np.rint(tifffile.imread(tif) * 1.7), 0, 65535).astype(np.uint16))
    crops, tables = {}, {}
    for name, root in (("original", screen.parent), ("bright", bright)):
        for scaling in ("none", "plate-dmso"):
            config = replace(base, source=root / "fields.csv", out=tmp_path / f"{name}-{scaling}", scaling=scaling,
                             locations=root / "cells.csv", keep_work=False)  # fmt: skip
            manifest = shard_screen(config).manifest
            crops[name, scaling] = read_tars(manifest.tar_paths("train"))
            tables[name] = pd.read_parquet(config.out / "cells.parquet")
    assert manifest.scaling["method"] == "plate-dmso" and set(manifest.scaling["plates"]) == {"P1", "P2"}

    p2 = tables["original"].loc[tables["original"].plate == "P2", "id"].to_numpy()
    for scaling, most in (("none", 0.3), ("plate-dmso", 0.01)):  # relative to the DMSO level
        diff = np.stack([np.abs(crops["bright", scaling][i].astype(float) - crops["original", scaling][i])
                         for i in p2])
        assert (np.percentile(diff, 99) < most * DMSO_LEVEL) == (scaling == "plate-dmso"), scaling
    scaled = crops["bright", "plate-dmso"]
    for plate, rows in tables["bright"][tables["bright"].role == "dmso"].groupby("plate"):
        mean = np.stack([scaled[i] for i in rows["id"]]).mean(axis=(0, 2, 3))
        np.testing.assert_allclose(mean, DMSO_PEDESTAL + DMSO_LEVEL, atol=2, err_msg=plate)


def test_plate_dmso_scaling_needs_dmso_on_every_plate(base, tmp_path):
    config = replace(base, out=tmp_path / "no-dmso", scaling="plate-dmso", roles=("treatment",), keep_work=False)
    with pytest.raises(InputError, match=r"plate-dmso needs DMSO cells on every plate; none on P1, P2"):
        shard_screen(config)
    assert not (config.out / "index.json").exists()


def test_cells_with_a_nan_plate_are_still_placed_in_their_shard():
    """The shard buffer is np.empty: grouping the fields must not drop cells whose plate is NaN."""
    cells = pd.DataFrame({"field": ["a", "a", "b", "b"], "plate": ["p1", "p1", np.nan, np.nan], "row": [0, 1, 0, 1]})
    plan = [("train", "train-000000.tar", np.array([2, 0, 3, 1]))]
    fields = write._fields_of_shards(cells, plan)["train-000000.tar"]
    positions = np.sort(np.concatenate([p for _, _, p, _ in fields]))
    assert positions.tolist() == [0, 1, 2, 3]
    rows = {(key, int(pos)): int(row) for key, _, ps, rs in fields for pos, row in zip(ps, rs, strict=True)}
    assert rows == {("b", 0): 0, ("a", 1): 0, ("b", 2): 1, ("a", 3): 1}


@pytest.mark.parametrize("positions", [[0, 1], [0, 1, 1, 2, 3]], ids=["missing", "twice"])
def test_a_shard_whose_fields_do_not_fill_every_sample_is_not_written(positions, tmp_path):
    fields = [("a", "p1", np.array(positions), np.arange(len(positions)))]
    with pytest.raises(RuntimeError, match="internal error: .*shard train-000000.tar"):
        write.shard_task("train-000000.tar", np.arange(4), fields, False, None, None, None)
