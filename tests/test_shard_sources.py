"""Reading a screen for `fastcell shard`: field tables, BBBC021 folders, locations tables, bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
from shard_screens import write_screen

from fastcell import metadata
from fastcell.errors import InputError
from fastcell.shard.sources import DEFAULT_ROLES, load_locations, load_screen, read_field


@pytest.fixture(scope="module")
def screen_table(tmp_path_factory):
    return write_screen(tmp_path_factory.mktemp("screen"), plates=("P1",), wells=("A01", "A02"), sites=2)


def test_field_table_is_normalised(screen_table):
    screen = load_screen(screen_table)
    assert screen.kind == "table"
    assert screen.channels == ("DNA", "AGP", "Mito")  # the image columns, in table order
    assert screen.dna_channel == "DNA"
    assert [f.key for f in screen.fields] == sorted(f.key for f in screen.fields)
    first = screen.fields[0]
    assert (first.plate, first.well, first.site, first.batch) == ("P1", "A01", 1, "P1")
    assert (first.compound, first.role, first.moa) == ("DMSO", "dmso", "DMSO")
    assert all(p.is_file() for f in screen.fields for p in f.paths)
    assert first.image == "P1/A01/s1_DNA.tif"
    image = read_field(first)
    assert image.shape == (3, 96, 128) and image.dtype == np.uint16
    # channels chosen and ordered by option; the DNA channel must be one of them
    assert load_screen(screen_table, channels=["Mito", "DNA"]).channels == ("Mito", "DNA")
    with pytest.raises(InputError, match="DNA channel 'ER'"):
        load_screen(screen_table, dna_channel="ER")


def _edited_table(screen_table, tmp_path, edit):
    table = edit(pd.read_csv(screen_table))
    path = tmp_path / "fields.csv"
    table["DNA"] = [str(screen_table.parent / p) for p in table["DNA"]]  # absolute paths work too
    table["AGP"] = [str(screen_table.parent / p) for p in table["AGP"]]
    table["Mito"] = [str(screen_table.parent / p) for p in table["Mito"]]
    table.to_csv(path, index=False)
    return path


def test_field_table_errors_name_the_file_and_row(screen_table, tmp_path):
    path = _edited_table(screen_table, tmp_path, lambda t: t.drop(columns=["well"]))
    with pytest.raises(InputError, match=r"fields\.csv: missing the well column"):
        load_screen(path)
    path = _edited_table(screen_table, tmp_path, lambda t: t.assign(treatment=["DMSO", "", "x", "y"]))
    with pytest.raises(InputError, match=r"fields\.csv: row 3 has an empty treatment"):
        load_screen(path)
    path = _edited_table(screen_table, tmp_path, lambda t: t.assign(site=[1, 1, 1, 2]))
    with pytest.raises(InputError, match=r"fields\.csv: two rows describe field P1_A01_s1"):
        load_screen(path)
    with pytest.raises(InputError, match="no such folder or field table"):
        load_screen(tmp_path / "nowhere.csv")


def test_read_field_errors_name_the_file(screen_table, tmp_path):
    field = load_screen(screen_table).fields[0]
    broken = tmp_path / "broken"
    shutil.copytree(screen_table.parent, broken)
    screen = load_screen(broken / "fields.csv")
    field = screen.fields[0]
    field.paths[1].unlink()
    with pytest.raises(InputError, match=r"s1_AGP\.tif: image file not found"):
        read_field(field)
    field.paths[1].write_bytes(b"not a tiff")
    with pytest.raises(InputError, match=r"s1_AGP\.tif: unreadable image"):
        read_field(field)
    tifffile.imwrite(field.paths[1], np.zeros((50, 60), np.uint16))
    with pytest.raises(InputError, match="channels of field P1_A01_s1 differ in shape"):
        read_field(field)


def _bbbc021_folder(root, plate_folders=False):
    """A BBBC021-layout folder: four real rows of the image table (one per role), tiny TIFFs."""
    design = metadata.load_annotated_design()
    rows = []
    for role in ("treatment", "dmso", "control", "unannotated"):
        rows.append(design[design["role"] == role].index[0])
    images = pd.read_csv(metadata._resource(metadata.IMAGE_TABLE_NAME)).loc[rows]
    images.to_csv(root / metadata.IMAGE_TABLE_NAME, index=False)
    shutil.copy(metadata._resource(metadata.MOA_TABLE_NAME), root / metadata.MOA_TABLE_NAME)
    for row in images.to_dict("records"):
        for channel in metadata.BBBC021_CHANNELS:
            folder = (
                row["Image_Metadata_Plate_DAPI"] if plate_folders else row[metadata.PATH_COLUMNS[channel]]
            )
            path = root / folder / row[metadata.FILE_COLUMNS[channel]]
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, np.full((8, 8), 100, np.uint16))
    return design.loc[rows]


@pytest.mark.parametrize("plate_folders", [False, True], ids=["table-paths", "plate-folders"])
def test_bbbc021_folder(tmp_path, plate_folders):
    expected = _bbbc021_folder(tmp_path, plate_folders)
    screen = load_screen(tmp_path)
    assert screen.kind == "bbbc021"
    assert screen.channels == metadata.BBBC021_CHANNELS and screen.dna_channel == "DAPI"
    assert sorted(f.role for f in screen.fields) == ["control", "dmso", "treatment", "unannotated"]
    # an unannotated compound is not an error: it is kept out by the default roles, and recorded as such
    assert {f.role for f in screen.select(DEFAULT_ROLES)} == {"treatment", "dmso", "control"}
    treated = next(f for f in screen.fields if f.role == "treatment")
    row = expected[expected["role"] == "treatment"].iloc[0]
    assert (treated.plate, treated.well, treated.batch, treated.moa) == (
        row.plate,
        row.well,
        row.batch,
        row.moa,
    )
    assert (treated.table_number, treated.image_number) == (row.TableNumber, row.ImageNumber)
    assert all(p.is_file() for f in screen.fields for p in f.paths)
    assert read_field(treated).shape == (3, 8, 8)
    with pytest.raises(InputError, match="unknown role"):
        screen.select(["treatment", "bogus"])


def test_a_missing_first_image_of_plate_folders_is_named_not_the_layout_changed(tmp_path):
    """The published zips' <plate>/<file> layout is recognised from the rows whose images exist: the first row's
    missing image is that image missing, the other rows keep their (existing) paths."""
    expected = _bbbc021_folder(tmp_path, plate_folders=True)
    first = expected.iloc[0]
    missing = tmp_path / first.plate / first[metadata.FILE_COLUMNS["DAPI"]]
    missing.unlink()
    screen = load_screen(tmp_path)
    assert sorted(p for f in screen.fields for p in f.paths if not p.is_file()) == [missing]
    field = next(f for f in screen.fields if missing in f.paths)
    with pytest.raises(InputError, match=str(missing)):
        read_field(field)


def test_bbbc021_folder_needs_its_image_table(tmp_path):
    with pytest.raises(InputError, match="not a BBBC021-layout folder"):
        load_screen(tmp_path)


def test_locations_keyed_by_image_number_file_name_or_plate_well_site(screen_table, tmp_path):
    screen = load_screen(screen_table)
    truth = pd.read_csv(screen_table.parent / "cells.csv")
    by_number = load_locations(screen_table.parent / "cells.csv", screen)
    assert sum(len(v) for v in by_number.centres.values()) == len(truth)
    first = screen.fields[0]
    expected = truth[truth.ImageNumber == first.image_number][["AreaShape_Center_X", "AreaShape_Center_Y"]]
    np.testing.assert_array_equal(by_number.centres[first.key], expected.to_numpy())

    number_to_field = {f.image_number: f for f in screen.fields}
    renamed = truth.rename(columns={"AreaShape_Center_X": "Nuclei_Location_Center_X",
                                    "AreaShape_Center_Y": "Nuclei_Location_Center_Y"})  # fmt: skip
    # file names repeat across wells here, so a bare name is ambiguous; the path relative to the source is not
    ambiguous = renamed.assign(FileName_DNA=[number_to_field[n].paths[0].name for n in truth.ImageNumber])
    ambiguous.drop(columns=["ImageNumber"]).to_csv(tmp_path / "ambiguous.csv", index=False)
    with pytest.raises(InputError, match="'s1_DNA.tif' matches several fields"):
        load_locations(tmp_path / "ambiguous.csv", screen)
    by_file = renamed.assign(FileName_DNA=[number_to_field[n].image for n in truth.ImageNumber])
    by_file = by_file.drop(columns=["ImageNumber"])
    by_file.loc[0, "Nuclei_Location_Center_X"] = np.nan  # a row without a centre is dropped and counted
    by_file.to_csv(tmp_path / "by_file.csv", index=False)
    located = load_locations(tmp_path / "by_file.csv", screen)
    assert located.n_invalid == 1
    assert sum(len(v) for v in located.centres.values()) == len(truth) - 1

    by_site = truth.assign(
        Metadata_Plate=[number_to_field[n].plate for n in truth.ImageNumber],
        Metadata_Well=[number_to_field[n].well for n in truth.ImageNumber],
        Metadata_Site=[number_to_field[n].site for n in truth.ImageNumber],
    ).drop(columns=["ImageNumber"])
    by_site.to_csv(tmp_path / "by_site.csv", index=False)
    for key, centres in load_locations(tmp_path / "by_site.csv", screen).centres.items():
        np.testing.assert_array_equal(centres, by_number.centres[key])


def test_locations_naming_unknown_images_is_an_error(screen_table, tmp_path):
    screen = load_screen(screen_table)
    truth = pd.read_csv(screen_table.parent / "cells.csv")
    truth.loc[:2, "ImageNumber"] = 999
    truth.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(
        InputError, match=r"locations table .*bad\.csv names 1 unknown image\(s\), e\.g\. ImageNumber 999"
    ):
        load_locations(tmp_path / "bad.csv", screen)
    truth.drop(columns=["AreaShape_Center_X"]).to_csv(tmp_path / "nocentre.csv", index=False)
    with pytest.raises(InputError, match=r"nocentre\.csv: no cell centre columns"):
        load_locations(tmp_path / "nocentre.csv", screen)


def test_local_tables_are_read_once_and_hashed_from_those_bytes(screen_table, tmp_path, opened):
    """Each table is opened once: the SHA-256 recorded for it is of the bytes parsed, not of a second read."""
    import hashlib

    _bbbc021_folder(tmp_path)
    tables = [screen_table, screen_table.parent / "cells.csv", *(tmp_path / n for n in (metadata.IMAGE_TABLE_NAME,
                                                                                     metadata.MOA_TABLE_NAME))]  # fmt: skip
    start = len(opened)
    screen = load_screen(screen_table)
    digests = {**screen.tables, tables[1]: load_locations(tables[1], screen).digest, **load_screen(tmp_path).tables}
    assert sorted(p for p in opened[start:] if p.endswith(".csv")) == sorted(str(t) for t in tables)
    assert digests == {t: hashlib.sha256(t.read_bytes()).hexdigest() for t in tables}


def test_an_unreadable_local_table_is_named(screen_table, monkeypatch):
    from pathlib import Path

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(InputError, match=r"fields\.csv: cannot read \(Permission denied\)$"):
        load_screen(screen_table)
