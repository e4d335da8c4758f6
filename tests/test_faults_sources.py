"""Faults of the non-BBBC021 shard sources: OME-Zarr plates, field and locations tables, URLs, Dask errors."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from shard_screens import write_screen
from test_shard_omezarr import write_plate

from fastcell.errors import InputError
from fastcell.remote import as_path, read_bytes
from fastcell.shard.sources import load_locations, load_screen, probe_fields, read_field


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> Path:
    return write_screen(tmp_path_factory.mktemp("screen"), plates=("P1",))


def _edit_attrs(group: Path, edit) -> None:
    """Apply `edit` to the (Zarr v2) attributes of `group`."""
    g = zarr.open_group(str(group), mode="r+")
    attrs = dict(g.attrs)
    edit(attrs)
    g.attrs.update(attrs)


def _replace_pixels(image: Path, pixels: np.ndarray, axes: list[str] | None = None) -> None:
    g = zarr.open_group(str(image), mode="r+")
    del g["0"]
    g.create_array("0", data=pixels, chunks=pixels.shape)
    if axes is not None:
        _edit_attrs(image, lambda a: a["multiscales"][0].__setitem__("axes", [{"name": n} for n in axes]))


def _pixels(image: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(image), mode="r")["0"][:])  # c, z, y, x


# --- OME-Zarr plates ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "entry", "message"),
    [
        ("", {"path": "C2"}, r"P1\.zarr: plate\.wells lists \{'path': 'C2'\}; expected"),
        ("", {"rowIndex": 0}, r"P1\.zarr: plate\.wells lists \{'rowIndex': 0\}; expected"),
        ("A/1", {"acquisition": 0}, r"P1\.zarr/A/1: well\.images lists \{'acquisition': 0\}; expected"),
    ],
)
def test_a_malformed_well_or_image_entry_is_named(screen, tmp_path, where, entry, message):
    """Before: ValueError / KeyError tracebacks from the plate metadata."""
    plate = write_plate(screen, tmp_path / "P1.zarr", "P1", 2)
    key = "well" if where else "plate"
    _edit_attrs(plate / where, lambda a: a[key]["images" if where else "wells"].append(entry))
    with pytest.raises(InputError, match=message):
        load_screen(plate)


def test_a_channel_name_given_twice_is_refused_not_read_twice(screen, tmp_path):
    """Before: channels ('DNA', 'DNA', 'Mito') with indices (0, 0, 2): channel 1 silently replaced by channel 0."""
    plate = write_plate(screen, tmp_path / "P1.zarr", "P1", 2)
    _edit_attrs(plate / "A/1/0", lambda a: a["omero"]["channels"][1].__setitem__("label", "DNA"))
    with pytest.raises(
        InputError, match=r"P1\.zarr/A/1/0: channel name\(s\) DNA given to more than one channel"
    ):
        load_screen(plate)


@pytest.mark.parametrize("n_channels", [2, 4])
def test_an_array_with_another_channel_count_than_its_names_is_named(screen, tmp_path, n_channels):
    """Before: 4 channels under 3 names were read as if the first 3 were the named ones (2: a bounds error)."""
    plate = write_plate(screen, tmp_path / "P1.zarr", "P1", 2)
    pixels = _pixels(plate / "A/1/0")
    _replace_pixels(plate / "A/1/0", np.concatenate([pixels, pixels])[:n_channels])
    field = load_screen(plate).fields[0]
    with pytest.raises(
        InputError, match=rf"P1\.zarr/A/1/0: {n_channels} channels in the array .* but 3 channel names"
    ):
        read_field(field)


def test_an_axis_of_several_planes_is_refused_not_read_at_its_first(screen, tmp_path):
    """Before: a 5-D field with an `angle` axis of 2 planes was read at angle 0 without a word."""
    plate = write_plate(screen, tmp_path / "P1.zarr", "P1", 2)
    pixels = _pixels(plate / "A/1/0")
    _replace_pixels(plate / "A/1/0", np.stack([pixels, pixels + 5]), ["angle", "c", "z", "y", "x"])
    field = load_screen(plate).fields[0]
    with pytest.raises(InputError, match=r"P1\.zarr/A/1/0: axis angle \(2\) of more than one plane"):
        read_field(field)


def test_a_field_stored_x_before_y_is_read_upright(screen, tmp_path):
    """Before: a field whose axes are (c, z, x, y) came back transposed, W x H, as if it were H x W."""
    plate = write_plate(screen, tmp_path / "P1.zarr", "P1", 2)
    pixels = _pixels(plate / "A/1/0")
    _replace_pixels(plate / "A/1/0", np.swapaxes(pixels, 2, 3), ["c", "z", "x", "y"])
    field = load_screen(plate).fields[0]
    assert np.array_equal(read_field(field), pixels[:, 0])


def test_a_big_endian_field_among_little_endian_ones_is_read(screen, tmp_path):
    """Before: refused as '16-bit (>u2) pixels, but this channel's other images are 16-bit (uint16)'."""
    plate = write_plate(screen, tmp_path / "P1.zarr", "P1", 2)
    pixels = _pixels(plate / "A/1/0")
    _replace_pixels(plate / "A/1/0", pixels.astype(">u2"))
    fields = load_screen(plate).fields
    assert probe_fields(fields[:1])[0] == (np.dtype(np.uint16),) * 3  # a plate mostly big-endian: the same
    dtypes, _ = probe_fields(fields)
    image = read_field(fields[0], dtypes)
    assert image.dtype == np.uint16 and np.array_equal(image, pixels[:, 0])


# --- field and locations tables -------------------------------------------------------------------


def test_names_that_look_like_numbers_keep_their_zeros(screen, tmp_path):
    """Before: pandas read plate 007 and compound 0123 as the numbers 7 and 123."""
    table = pd.read_csv(screen, dtype=str)
    table["plate"], table["treatment"] = "007", "0123"
    table.to_csv(screen.parent / "zeros.csv", index=False)
    fields = load_screen(screen.parent / "zeros.csv").fields
    assert {(f.plate, f.compound, f.batch) for f in fields} == {("007", "0123", "007")}
    assert fields[0].key.startswith("007_")


@pytest.mark.parametrize("number", ["1.5", "x"])
def test_a_field_table_image_number_must_be_whole(screen, tmp_path, number):
    """Before: ImageNumber 1.5 became image 1 (its cells matched another field's); 'x' a ValueError traceback."""
    table = pd.read_csv(screen).astype({"ImageNumber": object})
    table.loc[1, "ImageNumber"] = number
    table.to_csv(screen.parent / "numbers.csv", index=False)
    with pytest.raises(InputError, match=rf"numbers\.csv: row 3 has a non-integer ImageNumber '?{number}'?"):
        load_screen(screen.parent / "numbers.csv")


@pytest.mark.parametrize(
    ("rows", "unknown"),
    [
        ({"plate": ["P1"], "well": ["A01"], "site": [1.5]}, "P1/A01/s1.5"),
        ({"ImageNumber": [1.5]}, "ImageNumber 1.5"),
        ({"ImageNumber": [None]}, "ImageNumber nan"),
    ],
)
def test_a_locations_site_or_image_number_is_never_truncated(screen, tmp_path, rows, unknown):
    """Before: site 1.5 / ImageNumber 1.5 gave field 1's cells; an empty ImageNumber a ValueError traceback."""
    pd.DataFrame({**rows, "x": [1.0], "y": [2.0]}).to_csv(tmp_path / "cells.csv", index=False)
    with pytest.raises(InputError, match=rf"cells\.csv names 1 unknown image\(s\), e\.g\. {unknown}"):
        load_locations(tmp_path / "cells.csv", load_screen(screen))


def test_locations_plate_and_well_names_are_stripped_as_the_field_tables_are(screen, tmp_path):
    """Before: ' A01' (a space after the comma) named an unknown image, though the field table strips it."""
    pd.DataFrame({"plate": ["P1 "], "well": [" A01"], "site": [1], "x": [1.0], "y": [2.0]}).to_csv(
        tmp_path / "cells.csv", index=False
    )
    centres = load_locations(tmp_path / "cells.csv", load_screen(screen)).centres
    assert list(centres) == ["P1_A01_s1"]


def test_a_cell_listed_twice_in_a_locations_table_is_refused(screen, tmp_path):
    """Before: a repeated row (a table concatenated twice) became a second cell, the same crop twice in the shards.
    Two cells of one field at other centres, and one centre in two fields, are fine."""
    rows = {"plate": ["P1"] * 4, "well": ["A01", "A01", "A01", "A02"], "site": [1] * 4,
            "x": [5.0, 9.0, 5.0, 5.0], "y": [7.0, 7.0, 7.0, 7.0]}
    pd.DataFrame(rows).to_csv(tmp_path / "cells.csv", index=False)
    with pytest.raises(InputError, match=r"cells\.csv: 1 row\(s\) repeat .* rows 2, 4 \(P1/A01/s1 at x 5, y 7\)"):
        load_locations(tmp_path / "cells.csv", load_screen(screen))
    pd.DataFrame(rows).drop(index=2).to_csv(tmp_path / "cells.csv", index=False)
    centres = load_locations(tmp_path / "cells.csv", load_screen(screen)).centres
    assert {key: len(c) for key, c in centres.items()} == {"P1_A01_s1": 2, "P1_A02_s1": 1}


@pytest.mark.parametrize("kind", ["absolute", "url", "remote table"])
def test_locations_by_file_name_when_images_lie_elsewhere(screen, tmp_path, kind):
    """Images named by absolute paths outside the table's folder, or by URL, or a table read by URL: before, a
    locations table keyed by file name raised ValueError / TypeError from `relative_to` (or matched nothing)."""
    table = pd.read_csv(screen)
    for channel in ("DNA", "AGP", "Mito"):
        if kind == "absolute":
            table[channel] = [str(screen.parent / name) for name in table[channel]]
        elif kind == "url":
            table[channel] = [f"file://{screen.parent / name}" for name in table[channel]]
    if kind == "remote table":
        source = f"file://{screen}"
        name = "P1/A01/s2_DNA.tif"  # relative to the remote table, as the table names it
    else:
        table.to_csv(tmp_path / "fields.csv", index=False)
        source = tmp_path / "fields.csv"
        name = table["DNA"][1]  # the path or URL as the field table gives it
    pd.DataFrame({"FileName_DNA": [name], "x": [1.0], "y": [2.0]}).to_csv(tmp_path / "cells.csv", index=False)
    centres = load_locations(tmp_path / "cells.csv", load_screen(source)).centres
    assert {k: v.tolist() for k, v in centres.items()} == {"P1_A01_s2": [[1.0, 2.0]]}


# --- URLs -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A local HTTP server of a folder holding `a.tif`; yields (base URL, {name part: (status, methods)}) to make
    requests fail."""
    import tifffile

    root = tmp_path_factory.mktemp("http")
    tifffile.imwrite(root / "a.tif", np.zeros((8, 8), np.uint16))
    failing: dict[str, tuple[int, tuple[str, ...]]] = {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _failed(self, method: str) -> bool:
            for part, (status, methods) in failing.items():
                if part in self.path and method in methods:
                    self.send_error(status)
                    return True
            return False

        def do_GET(self):
            if not self._failed("GET"):
                super().do_GET()

        def do_HEAD(self):
            if not self._failed("HEAD"):
                super().do_HEAD()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", failing
    httpd.shutdown()


@pytest.mark.parametrize(
    ("status", "methods", "message"),
    [
        (503, ("HEAD", "GET"), "cannot read (the server answered HTTP 503)"),
        (403, ("HEAD", "GET"), "cannot read (the server answered HTTP 403)"),
        (500, ("GET",), "cannot read (the server answered HTTP 500)"),  # found, then failing in mid-read
        (404, ("GET",), "not found"),
        (404, ("HEAD", "GET"), "not found"),
    ],
)
def test_http_failures_are_named_with_their_status(server, status, methods, message):
    """Before: every failure fsspec's HTTP reader met was 'not found' (a 503 too), and one after the file was found
    escaped as aiohttp's ClientResponseError (a traceback; in a worker process, an unpicklable error)."""
    base, failing = server
    failing.clear()
    failing["a.tif"] = (status, methods)
    try:
        with pytest.raises(InputError) as caught:
            read_bytes(as_path(f"{base}/a.tif"))
    finally:
        failing.clear()
    assert str(caught.value) == f"{base}/a.tif: {message}"


# --- Dask -----------------------------------------------------------------------------------------


class _Unpicklable(Exception):
    """An error holding a lock: as an aiohttp response error holds its headers, which cannot be pickled."""

    def __init__(self, message: str):
        super().__init__(message)
        self.lock = threading.Lock()


def _unreadable_field(name: str):
    try:
        raise _Unpicklable("HTTP 500 for chunk 0.0.0.0")
    except _Unpicklable as err:
        raise InputError(f"{name}: unreadable pixels (_Unpicklable: {err})") from err


def test_an_input_error_with_an_unpicklable_cause_reaches_the_client_as_itself():
    """Before: distributed pickles an error with its causes; one it cannot pickle made the InputError a bare
    `Exception("InputError(...)")`, which --on-error skip does not skip and the CLI prints as a traceback."""
    from fastcell.pool import WorkerPool

    with (
        WorkerPool(1, dask="local:1") as pool,
        pytest.raises(InputError, match=r"^plate\.zarr/A/1/0: unreadable"),
    ):
        list(pool.run(_unreadable_field, [("plate.zarr/A/1/0",)]))
