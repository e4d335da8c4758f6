"""OME-Zarr HCS plates as a `fastcell shard` source: the same crops as the same pixels in TIFFs; bad plates."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from shard_screens import CHANNELS, write_screen

from fastcell.errors import InputError
from fastcell.shard.pipeline import ShardConfig, shard_screen
from fastcell.shard.sources import load_screen, read_field


def write_plate(table: Path, out: Path, plate: str, zarr_format: int, omero: bool = True) -> Path:
    """One plate of a `write_screen` field table as an NGFF HCS plate: 0.4 (Zarr v2) or 0.5 (Zarr v3)."""
    fields = pd.read_csv(table)
    fields = fields[fields["plate"] == plate]
    channels = [c for c in CHANNELS if c in fields.columns]
    root = zarr.open_group(str(out), mode="w", zarr_format=zarr_format)
    wells = sorted(set(fields["well"]))
    rows, columns = sorted({w[0] for w in wells}), sorted({str(int(w[1:])) for w in wells}, key=int)

    def ngff(group, **attrs):
        group.attrs.update({"ome": {"version": "0.5", **attrs}} if zarr_format == 3 else attrs)

    ngff(root, plate={
        "version": "0.4", "name": plate, "field_count": int(fields["site"].max()),
        "rows": [{"name": r} for r in rows], "columns": [{"name": c} for c in columns],
        "wells": [{"path": f"{w[0]}/{int(w[1:])}", "rowIndex": rows.index(w[0]),
                   "columnIndex": columns.index(str(int(w[1:])))} for w in wells],
    })  # fmt: skip
    for well in wells:
        sites = fields[fields["well"] == well].sort_values("site")
        well_group = root.create_group(f"{well[0]}/{int(well[1:])}")
        ngff(well_group, well={"images": [{"path": str(i)} for i in range(len(sites))]})
        for i, row in enumerate(sites.to_dict("records")):
            pixels = np.stack([tifffile.imread(table.parent / row[c]) for c in channels])[
                :, None
            ]  # c, z, y, x
            image = well_group.create_group(str(i))
            image.create_array("0", data=pixels, chunks=(1, 1, 64, 64))
            attrs = {"multiscales": [{
                "axes": [{"name": "c", "type": "channel"}, {"name": "z", "type": "space"},
                         {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1] * 4}]}],
            }]}  # fmt: skip
            if omero:
                attrs["omero"] = {"channels": [{"label": c, "color": "FFFFFF"} for c in channels]}
            ngff(image, **attrs)
    return out


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> Path:
    return write_screen(tmp_path_factory.mktemp("screen"), plates=("P1",))


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_plate_gives_the_crops_of_the_same_pixels_in_tiffs(screen, tmp_path, zarr_format):
    plate = write_plate(screen, tmp_path / "P1.zarr", "P1", zarr_format)
    loaded = load_screen(plate)
    assert (
        loaded.kind == "ome-zarr"
        and loaded.channels == ("DNA", "AGP", "Mito")
        and loaded.dna_channel == "DNA"
    )
    tiffs = load_screen(screen)
    assert [f.key for f in loaded.fields] == [f.key for f in tiffs.fields]  # P1_A01_s1 ...: same wells, sites
    assert np.array_equal(read_field(loaded.fields[3]), read_field(tiffs.fields[3]))
    subset = load_screen(plate, channels=("Mito", "DNA"))
    assert np.array_equal(read_field(subset.fields[0]), read_field(tiffs.fields[0])[[2, 0]])

    options = dict(crop_size=24, shard_size=10, workers=1)
    from_zarr = shard_screen(
        ShardConfig(source=plate, out=tmp_path / "zarr", roles=("unannotated",), **options)
    )
    from_tiffs = shard_screen(ShardConfig(source=screen, out=tmp_path / "tiffs", **options))
    assert from_zarr.n_cells == from_tiffs.n_cells > 0
    names = sorted(p.name for p in from_tiffs.out.iterdir() if p.suffix in (".tar", ".idx", ".npz"))
    for name in names:
        assert (from_zarr.out / name).read_bytes() == (from_tiffs.out / name).read_bytes(), name
    cells = pd.read_parquet(from_zarr.out / "cells.parquet")
    assert set(cells["role"]) == {"unannotated"} and set(cells["image"]) >= {"A/1/0", "A/1/1"}


def test_a_plate_without_channel_names_is_named(screen, tmp_path):
    plate = write_plate(screen, tmp_path / "unnamed.zarr", "P1", 2, omero=False)
    with pytest.raises(
        InputError, match=r"unnamed\.zarr: OME-Zarr plate without channel names: image A/1/0 .*omero"
    ):
        load_screen(plate)


def test_a_damaged_field_is_skipped_and_recorded(screen, tmp_path):
    plate = write_plate(screen, tmp_path / "P1.zarr", "P1", 2)
    shutil.rmtree(plate / "B" / "1" / "0" / "0")  # the pixels of one field
    result = shard_screen(ShardConfig(source=plate, out=tmp_path / "out", crop_size=24, workers=1,
                                      roles=("unannotated",), on_error="skip"))  # fmt: skip
    assert [f["image"] for f in result.fields_skipped] == ["B/1/0"]
    assert "P1.zarr/B/1/0" in result.fields_skipped[0]["reason"]
    with pytest.raises(InputError, match=r"P1\.zarr/B/1/0"):
        shard_screen(ShardConfig(source=plate, out=tmp_path / "fail", crop_size=24, workers=1,
                                 roles=("unannotated",)))  # fmt: skip


def test_a_zarr_group_that_is_not_a_plate_is_refused(tmp_path):
    zarr.open_group(str(tmp_path / "image.zarr"), mode="w", zarr_format=2).attrs["multiscales"] = []
    with pytest.raises(InputError, match=r"image\.zarr: a Zarr group but not an OME-Zarr HCS plate"):
        load_screen(tmp_path / "image.zarr")


def test_probing_opens_each_field_once(screen, tmp_path, monkeypatch):
    """Every channel's pixel type and size come from one opening of each probed field's image."""
    from fastcell.shard import omezarr
    from fastcell.shard.sources import probe_fields

    fields = load_screen(write_plate(screen, tmp_path / "P1.zarr", "P1", 2)).fields
    opened, real = [], omezarr._open
    monkeypatch.setattr(omezarr, "_open", lambda path, what: opened.append(path) or real(path, what))
    assert probe_fields(fields, sample=2) == ((np.dtype(np.uint16),) * 3, (96, 128))
    assert opened == [f.paths[0] for f in fields[:2]]


@pytest.mark.parametrize(("zarr_format", "metadata"), [(2, ".zattrs"), (3, "zarr.json")])
def test_the_plate_metadata_is_read_once_and_hashed_from_those_bytes(screen, tmp_path, opened, zarr_format, metadata):
    """The SHA-256 recorded for the plate is of its metadata as zarr read it: one read, no second for the hash."""
    import hashlib

    plate = write_plate(screen, tmp_path / "P1.zarr", "P1", zarr_format)
    start = len(opened)
    tables = load_screen(plate).tables
    assert opened[start:].count(str(plate / metadata)) == 1
    assert tables == {plate / metadata: hashlib.sha256((plate / metadata).read_bytes()).hexdigest()}
