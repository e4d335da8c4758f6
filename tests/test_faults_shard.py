"""Fault injection for `fastcell shard`, `info` and `synth` through the command line's error boundary.

Each case breaks one thing (a foreign file in OUT, a damaged shard, a bad field table, a full disk,
an interrupted swap, a killed run) and asserts the message, the exit status and that every byte
that existed before is still there. The CLI runs in-process through `fastcell.cli.run` (the
console entry point) with one worker, except the cases about worker processes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from shard_screens import write_screen

from fastcell.cli import run
from fastcell.errors import InputError, describe_os_error
from fastcell.pool import process_pool, result_of
from fastcell.shard import pipeline
from fastcell.shard.illumination import load_illumination
from fastcell.shard.info import summarize

SHARD = ["--crop", "24", "--shard-size", "8", "--workers", "1", "--no-progress"]


def cli(capsys, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `fastcell ARGS`, output with rich's line wrapping undone."""
    try:
        run([str(a) for a in args])
        code = 0
    except SystemExit as done:
        code = done.code or 0
    out, err = capsys.readouterr()
    return code, " ".join(out.split()), " ".join(err.split())


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (hidden ones too), by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_kept(before: dict[str, str], folder: Path) -> None:
    """Every file of `before` is still in `folder` with the same bytes."""
    after = snapshot(folder)
    changed = {name for name, digest in before.items() if after.get(name) != digest}
    assert not changed, f"lost or changed: {sorted(changed)}"


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> Path:
    """A field table of 2 plates x 2 wells, one 96x128 site each, 3 channels (DNA, AGP, Mito)."""
    return write_screen(tmp_path_factory.mktemp("faults") / "screen", wells=("A01", "B01"), sites=1)


@pytest.fixture(scope="module")
def done(screen, tmp_path_factory) -> Path:
    """A finished shard folder of `screen` (crop 24); copy it before changing it."""
    out = tmp_path_factory.mktemp("done") / "shards"
    code = run_quiet(["shard", screen, out, *SHARD])
    assert code == 0
    return out


def run_quiet(args) -> int:
    try:
        run([str(a) for a in args])
    except SystemExit as finished:
        return finished.code or 0
    return 0


@pytest.fixture
def own_screen(screen, tmp_path) -> Path:
    """A copy of `screen` that a test may damage."""
    shutil.copytree(screen.parent, tmp_path / "screen")
    return tmp_path / "screen" / "fields.csv"


@pytest.fixture
def own_shards(done, tmp_path) -> Path:
    shutil.copytree(done, tmp_path / "shards")
    return tmp_path / "shards"


# --- --overwrite never deletes what fastcell did not write, never destroys before the replacement exists


def test_overwrite_keeps_a_montage_and_replaces_only_the_manifest_files(capsys, screen, own_shards):
    assert cli(capsys, "info", own_shards, "--montage", own_shards / "montage.png", "--n", "4")[0] == 0
    montage = (own_shards / "montage.png").read_bytes()
    old = json.loads((own_shards / "index.json").read_text())
    code, out, err = cli(capsys, "shard", screen, own_shards, *SHARD, "--crop", "20", "--shard-size", "100",
                         "--overwrite")  # fmt: skip
    assert code == 0, err
    assert (own_shards / "montage.png").read_bytes() == montage
    new = json.loads((own_shards / "index.json").read_text())
    assert new["crop_size"] == 20 and old["crop_size"] == 24 and len(old["splits"]["train"]["shards"]) == 2
    listed = {s["name"] for s in new["splits"]["train"]["shards"]}
    assert {p.name for p in own_shards.glob("*.tar")} == listed  # no shard of the old run is left
    assert not (own_shards / ".staging").exists()
    assert cli(capsys, "info", own_shards, "--verify")[0] == 0


@pytest.mark.parametrize(
    "files, overwrite, message",
    [
        ({"cells.parquet": b"embed", "embeddings.npy": b"x", "embed.json": b"{}"}, True,
         "holds cells.parquet, which no fastcell shard manifest lists"),
        ({"train-000000.tar": b"someone else's"}, True, "holds train-000000.tar, which no fastcell shard manifest"),
        ({"notes.txt": b"mine"}, False, "holds files fastcell shard did not write (notes.txt)"),
        ({"index.json": b"{not json"}, True, "cannot tell which files"),
        ({"index.json": b'{"format": "web-app"}'}, True, "not a fastcell-shards"),
    ],
    ids=["embed-folder", "foreign-shard-name", "foreign-file", "garbage-manifest", "other-index-json"],
)
def test_foreign_folders_are_refused_untouched(capsys, screen, tmp_path, files, overwrite, message):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    before = snapshot(out)
    code, _, err = cli(capsys, "shard", screen, out, *SHARD, *(["--overwrite"] if overwrite else []))
    assert code == 2 and err.startswith("fastcell: error:") and message in err, err
    assert snapshot(out) == before


def test_foreign_files_are_kept_when_shards_are_written_beside_them(capsys, screen, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, "shard", screen, out, *SHARD, "--overwrite")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "index.json").is_file()


def test_another_configuration_is_refused_without_overwrite(capsys, screen, own_shards):
    before = snapshot(own_shards)
    code, _, err = cli(capsys, "shard", screen, own_shards, *SHARD, "--crop", "20")
    assert code == 2 and "different configuration (crop_size: 24 -> 20)" in err and "--overwrite" in err
    assert snapshot(own_shards) == before


def test_a_failed_overwrite_leaves_the_old_shards_whole_and_a_rerun_finishes(capsys, monkeypatch, screen, own_shards):
    before = {k: v for k, v in snapshot(own_shards).items() if not k.startswith(".")}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    real = tarfile.TarFile.addfile
    monkeypatch.setattr(tarfile.TarFile, "addfile", full)
    code, _, err = cli(capsys, "shard", screen, own_shards, *SHARD, "--crop", "20", "--overwrite")
    assert code == 2 and "the disk is full" in err and ".staging/train-000000.tar" in err, err
    assert_kept(before, own_shards)  # the old shards are all there, byte for byte
    assert not list(own_shards.rglob(".*.tmp"))
    monkeypatch.setattr(tarfile.TarFile, "addfile", real)
    assert cli(capsys, "shard", screen, own_shards, *SHARD, "--crop", "20", "--overwrite")[0] == 0
    assert json.loads((own_shards / "index.json").read_text())["crop_size"] == 20


def test_an_interrupted_swap_is_finished_by_the_next_run(capsys, monkeypatch, screen, own_shards):
    (own_shards / "montage.png").write_bytes(b"png")
    real, moves = os.replace, []

    def crash_after_two(src, dst):  # the swap moves from OUT/.staging into OUT: stop it after two files
        if ".staging" in str(src) and ".staging" not in str(dst):
            if len(moves) == 2:
                raise KeyboardInterrupt
            moves.append(dst)
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_after_two)
    code, _, err = cli(capsys, "shard", screen, own_shards, *SHARD, "--crop", "20", "--overwrite")
    assert code == 130 and "interrupted" in err
    assert (own_shards / ".staging" / "index.json").is_file() and not (own_shards / "index.json").exists()
    monkeypatch.setattr(os, "replace", real)
    code, out, err = cli(capsys, "shard", screen, own_shards, *SHARD, "--crop", "20", "--overwrite")
    assert code == 0 and "already complete" in out, err
    assert (own_shards / "montage.png").read_bytes() == b"png" and not (own_shards / ".staging").exists()
    assert cli(capsys, "info", own_shards, "--verify")[0] == 0


def test_a_rerun_after_a_bad_option_is_not_refused(capsys, screen, tmp_path):
    out = tmp_path / "out"
    code, _, err = cli(capsys, "shard", screen, out, *SHARD, "--scaling", "plate-dmso", "--roles", "treatment")
    assert code == 2 and "needs DMSO cells on every plate" in err
    code, _, err = cli(capsys, "shard", screen, out, *SHARD, "--roles", "treatment")
    assert code == 0, err



def test_workers_zero_is_refused_not_taken_as_the_default(capsys, screen, tmp_path):
    options = [o for o in SHARD if o not in ("--workers", "1")]
    code, _, err = cli(capsys, "shard", screen, tmp_path / "out", *options, "--workers", "0")
    assert code == 2 and "--workers must be at least 1, got 0" in err
    assert not (tmp_path / "out").exists()


# --- integrity: checksums per crop, sizes per shard


def _flip_byte_in_crop(shards: Path, shard: str = "train-000001", sample: int = 1) -> str:
    """Flip one pixel byte of a sample's npy member; returns the sample key."""
    line = (shards / f"{shard}.idx").read_text().splitlines()[1 + sample].split()
    offset, size, member = int(line[1]), int(line[2]), line[3]
    data = bytearray((shards / f"{shard}.tar").read_bytes())
    data[offset + size - 7] ^= 0x10  # inside the pixels, past the npy header
    (shards / f"{shard}.tar").write_bytes(bytes(data))
    return member.split(".")[0]


def test_verify_names_the_shard_and_sample_of_a_damaged_pixel(capsys, own_shards):
    key = _flip_byte_in_crop(own_shards)
    assert cli(capsys, "info", own_shards)[0] == 0  # sizes are fine: only the checksum sees it
    code, _, err = cli(capsys, "info", own_shards, "--verify")
    assert code == 2 and f"train-000001.tar: sample {key} is damaged" in err and "checksum" in err


def test_a_deleted_shard_is_rewritten_and_kept_shards_keep_their_checksums(capsys, screen, own_shards):
    kept = (own_shards / "train-000000.tar").read_bytes()
    (own_shards / "train-000001.tar").unlink()
    assert cli(capsys, "info", own_shards)[0] == 2  # listed but missing
    code, out, err = cli(capsys, "shard", screen, own_shards, *SHARD)
    assert code == 0 and "(1 written, 1 kept)" in out, err
    assert (own_shards / "train-000000.tar").read_bytes() == kept
    code, out, _ = cli(capsys, "info", own_shards, "--verify")
    assert code == 0 and "match their checksums" in out


def test_shards_without_checksums_still_verify_and_say_so(capsys, own_shards):
    """A folder written by a fastcell from before checksums (no crc32 column): decoded only, and said so. (The
    folders of `fastcell.testing` record checksums, as `fastcell shard` does: this is the test of the old kind.)"""
    cells = pd.read_parquet(own_shards / "cells.parquet").drop(columns="crc32")
    cells.to_parquet(own_shards / "cells.parquet", index=False)
    code, out, _ = cli(capsys, "info", own_shards, "--verify")
    assert code == 0 and "no checksums recorded" in out and "decode to uint16" in out


def test_a_sample_missing_from_the_cell_table_is_named(own_shards):
    cells = pd.read_parquet(own_shards / "cells.parquet")
    cells.loc[cells["id"] == 0, "id"] = 999
    cells.to_parquet(own_shards / "cells.parquet", index=False)
    with pytest.raises(InputError, match=r"sample 000000000000 is not listed in cells.parquet"):
        summarize(own_shards, verify=True)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda tar: os.truncate(tar, 3000), "truncated (3000 bytes; its index needs"),
        (lambda tar: os.truncate(tar, tar.stat().st_size - 1024), "written as"),
        (lambda tar: tar.open("ab").write(b"\0" * 512), "(truncated, extended or replaced)"),
        (lambda tar: tar.with_suffix(".idx").write_text("v1.2 1\nnpy 0 1 x.npy\n"), "holds 1 samples"),
    ],
    ids=["truncated-data", "truncated-padding", "extended", "index-rewritten"],
)
def test_plain_info_reports_damaged_tars(capsys, own_shards, damage, message):
    damage(own_shards / "train-000000.tar")
    code, out, err = cli(capsys, "info", own_shards)
    assert code == 2 and "1 damaged or missing file(s)" in err and message in err, err
    assert "damaged: " in out and "per-channel statistics" in out  # the summary is still printed


def test_info_names_a_missing_shard(capsys, own_shards):
    (own_shards / "train-000001.idx").unlink()
    code, _, err = cli(capsys, "info", own_shards)
    assert code == 2 and "train-000001.idx: listed in" in err and "but missing" in err


@pytest.mark.parametrize("name", ["fields.parquet", "illumination.npz"])
def test_info_names_a_missing_table_or_illumination_file_and_a_rerun_remakes_it(capsys, screen, own_shards, name):
    (own_shards / name).unlink()
    code, _, err = cli(capsys, "info", own_shards)
    assert code == 2 and f"{name}: listed in index.json but missing" in err and "rerun `fastcell shard`" in err, err
    assert cli(capsys, "shard", screen, own_shards, *SHARD)[0] == 0
    assert (own_shards / name).is_file() and cli(capsys, "info", own_shards, "--verify")[0] == 0


# --- the field table: channels, empty cells, bit depths, empty fields, locations


def test_an_empty_channel_cell_is_an_error_naming_row_and_column(capsys, own_screen, tmp_path):
    table = pd.read_csv(own_screen)
    table.loc[2, "AGP"] = None
    table.to_csv(own_screen, index=False)
    code, _, err = cli(capsys, "shard", own_screen, tmp_path / "out", *SHARD)
    assert code == 2 and "fields.csv: row 4 has an empty file for channel AGP (column 'AGP')" in err, err


def test_a_non_image_cell_keeps_the_channel_and_is_recorded_by_on_error(capsys, own_screen, tmp_path):
    table = pd.read_csv(own_screen)
    table.loc[1, "Mito"] = "P1/B01/notes.txt"
    table.to_csv(own_screen, index=False)
    code, _, err = cli(capsys, "shard", own_screen, tmp_path / "out", *SHARD)
    assert code == 2 and "notes.txt: image file not found" in err
    code, out, err = cli(capsys, "shard", own_screen, tmp_path / "out", *SHARD, "--on-error", "skip")
    assert code == 0 and "1 field(s) skipped" in out, err
    manifest = json.loads((tmp_path / "out" / "index.json").read_text())
    assert manifest["channels"] == ["DNA", "AGP", "Mito"]  # the channel was not dropped
    code, out, err = cli(capsys, "shard", own_screen, tmp_path / "out", *SHARD, "--on-error", "skip")
    assert code == 0 and "nothing to do" in out and "1 field(s) still skipped" in " ".join(out.split()), err


@pytest.mark.parametrize("on_error, code", [("fail", 2), ("skip", 0)])
def test_an_8_bit_tiff_among_16_bit_ones_is_refused(capsys, own_screen, tmp_path, on_error, code):
    image = own_screen.parent / "P2/A01/s1_AGP.tif"
    tifffile.imwrite(image, (tifffile.imread(image) >> 8).astype(np.uint8))
    status, out, err = cli(capsys, "shard", own_screen, tmp_path / "out", *SHARD, "--on-error", on_error)
    assert status == code, err
    text = err if code else json.dumps(json.loads((tmp_path / "out" / "index.json").read_text())["skipped"])
    assert "s1_AGP.tif: 8-bit (uint8) pixels, but this channel's other images are 16-bit (uint16)" in text


def test_a_screen_8_bit_throughout_is_read(capsys, own_screen, tmp_path):
    for image in own_screen.parent.rglob("*.tif"):
        tifffile.imwrite(image, (tifffile.imread(image) >> 4).clip(0, 255).astype(np.uint8))
    code, _, err = cli(capsys, "shard", own_screen, tmp_path / "out", *SHARD)
    assert code == 0, err


def test_a_field_without_nuclei_is_data(capsys, own_screen, tmp_path):
    tifffile.imwrite(own_screen.parent / "P1/B01/s1_DNA.tif", np.full((96, 128), 200, np.uint16))
    code, out, err = cli(capsys, "shard", own_screen, tmp_path / "out", *SHARD)
    assert code == 0 and "fields with no cells: 1" in out, err
    fields = pd.read_parquet(tmp_path / "out" / "fields.parquet").set_index("field")
    assert len(fields) == 4 and fields.loc["P1_B01_s1", ["status", "found", "cells"]].tolist() == ["ok", 0, 0]
    assert (fields["cells"] > 0).sum() == 3
    code, out, _ = cli(capsys, "info", tmp_path / "out")
    assert code == 0 and "fields with no cells: 1" in out


def test_no_cells_anywhere_is_an_error(capsys, own_screen, tmp_path):
    for image in own_screen.parent.rglob("*_DNA.tif"):
        tifffile.imwrite(image, np.full((96, 128), 200, np.uint16))
    code, _, err = cli(capsys, "shard", own_screen, tmp_path / "out", *SHARD)
    assert code == 2 and "no cells in any of the 4 fields" in err, err


def test_cells_without_a_location_are_counted(capsys, own_screen, tmp_path):
    locations = pd.read_csv(own_screen.parent / "cells.csv")
    locations.loc[[0, 5], "AreaShape_Center_X"] = np.nan
    locations.to_csv(own_screen.parent / "cells.csv", index=False)
    code, out, err = cli(capsys, "shard", own_screen, tmp_path / "out", *SHARD, "--locations",
                         own_screen.parent / "cells.csv")
    assert code == 0 and "cells dropped for a missing or non-numeric location: 2" in out, err
    assert json.loads((tmp_path / "out" / "index.json").read_text())["skipped"]["cells"]["invalid_location"] == 2


def test_a_crop_larger_than_the_field_is_a_message(capsys, screen, tmp_path):
    code, _, err = cli(capsys, "shard", screen, tmp_path / "out", *SHARD, "--crop", "200")
    assert code == 2 and "--crop 200 is larger than the fields (96x128 px)" in err and "Traceback" not in err


# --- paths, disks and permissions: messages, not tracebacks


@pytest.mark.parametrize("where", ["file", "below-a-file"])
def test_out_that_cannot_be_a_folder(capsys, screen, tmp_path, where):
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    out = blocker if where == "file" else blocker / "shards"
    code, _, err = cli(capsys, "shard", screen, out, *SHARD)
    assert code == 2 and f"{blocker}" in err and "is a file" in err
    assert blocker.read_text() == "a file"


@pytest.mark.parametrize(
    "target, attribute, options, written",
    [
        (np, "save", [], "illumination.npz"),
        (np, "save", ["--no-illum"], ".work/fields/P1_A01_s1.crops.npy"),
        (tarfile.TarFile, "addfile", [], "train-000000.tar"),
        (pd.DataFrame, "to_parquet", [], "cells.parquet"),
    ],
    ids=["illumination", "crops", "shard", "cell-table"],
)
def test_a_full_disk_is_a_message_naming_the_file(capsys, monkeypatch, screen, tmp_path, target, attribute, options,
                                                  written):  # fmt: skip
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(target, attribute, full)
    out = tmp_path / "out"
    code, _, err = cli(capsys, "shard", screen, out, *SHARD, *options)
    assert code == 2 and f"{out / written}: the disk is full" in err, err
    assert not list(out.rglob(".*.tmp")) and not (out / "index.json").exists()


@pytest.mark.parametrize("verb", ["info", "shard", "synth"])
def test_an_unwritable_folder_is_a_message(capsys, monkeypatch, screen, done, tmp_path, verb):
    import tempfile

    def denied(*args, dir=None, **kwargs):  # what a folder without write permission does (tests run as root)
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, ".x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    out = tmp_path / "m"
    args = {"info": ["info", done, "--montage", out / "montage.png", "--n", "2"],
            "shard": ["shard", screen, out, *SHARD], "synth": ["synth", out, *SYNTH]}[verb]  # fmt: skip
    code, _, err = cli(capsys, *args)
    assert code == 2 and err.startswith(f"fastcell: error: {out}") and ": permission denied" in err, err


def test_a_montage_onto_a_folder_is_a_message(capsys, done, tmp_path):
    (tmp_path / "montage.png").mkdir()
    code, _, err = cli(capsys, "info", done, "--montage", tmp_path / "montage.png", "--n", "2")
    assert code == 2 and err == f"fastcell: error: {tmp_path / 'montage.png'}: is a folder, not a file", err
    assert not list(tmp_path.glob(".*.tmp"))


def test_info_n_zero_is_a_usage_error(capsys, done):
    code, _, err = cli(capsys, "info", done, "--n", "0")
    assert code == 2 and "--n" in err and "Traceback" not in err
    with pytest.raises(InputError, match="--n must be at least 1"):
        summarize(done, montage=done / "m.png", n=0)


def test_an_interrupt_is_one_line_and_status_130(capsys, monkeypatch, screen, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "crop_pass", interrupted)
    code, _, err = cli(capsys, "shard", screen, tmp_path / "out", *SHARD)
    assert code == 130 and err.startswith("fastcell: error: interrupted; rerun the same command to resume")


def test_a_bug_keeps_its_traceback(monkeypatch, screen, tmp_path):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pipeline, "crop_pass", bug)
    with pytest.raises(ZeroDivisionError):
        run(["shard", str(screen), str(tmp_path / "out"), *SHARD])


@pytest.mark.parametrize(
    "error, message",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/d/x.tar"), "/d/x.tar: the disk is full"),
        (PermissionError(errno.EACCES, "Permission denied", "/d"), "/d: permission denied"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/d/m.png"), "/d/m.png: is a folder, not a file"),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"), "/f/x: a part of the path is a file"),
        (OSError(errno.EROFS, "Read-only file system", "/ro"), "/ro: the file system is read-only"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "the disk quota is exceeded"),
    ],
)
def test_os_errors_a_user_can_fix_become_messages(error, message):
    assert describe_os_error(error).startswith(message)


def test_other_os_errors_stay_bugs():
    assert describe_os_error(OSError(errno.EBADF, "Bad file descriptor")) is None


def test_a_worker_error_comes_without_the_worker_traceback():
    with process_pool(2) as pool:
        future = pool.submit(os.stat, "/no/such/file")
        with pytest.raises(FileNotFoundError) as raised:
            result_of(future)
    shown = "".join(traceback.format_exception(raised.value))
    assert raised.value.__cause__ is None and "Traceback" in shown  # the caller's frames, none of the worker's
    assert "_RemoteTraceback" not in shown and "concurrent/futures/process.py" not in shown


def test_a_dead_worker_is_a_message():
    from concurrent.futures.process import BrokenProcessPool

    future = Future()
    future.set_exception(BrokenProcessPool("gone"))
    with pytest.raises(Exception, match="a worker process died"):
        result_of(future)


# --- synth


SYNTH = ["--weeks", "1", "--plates-per-week", "1", "--field-size", "48x64", "--cell-size", "16", "--workers", "1"]


@pytest.fixture(scope="module")
def synth_screen(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "screen"
    assert run_quiet(["synth", out, *SYNTH]) == 0
    return out


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: os.truncate(p, p.stat().st_size // 2),
        lambda p: p.write_bytes(b"\0" * p.stat().st_size),
        lambda p: tifffile.imwrite(p, np.zeros((10, 10), np.uint16)),
        lambda p: p.unlink(),
    ],
    ids=["truncated", "zeroed", "wrong-shape", "deleted"],
)
def test_synth_rerun_remakes_a_damaged_tiff(capsys, synth_screen, tmp_path, damage):
    screen = tmp_path / "screen"
    shutil.copytree(synth_screen, screen)
    tiff = sorted(screen.rglob("*.tif"))[3]
    original = tiff.read_bytes()
    damage(tiff)
    code, out, err = cli(capsys, "synth", screen, *SYNTH)
    assert code == 0 and "1 rendered" in out, err
    assert tiff.read_bytes() == original


def test_synth_out_that_is_a_file(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    code, _, err = cli(capsys, "synth", tmp_path / "f", *SYNTH)
    assert code == 2 and "is a file, not a folder" in err


def test_synth_full_disk_is_a_message(capsys, monkeypatch, tmp_path):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", full)
    code, _, err = cli(capsys, "synth", tmp_path / "s", *SYNTH)
    assert code == 2 and "the disk is full" in err and ".tif" in err, err
    assert not list((tmp_path / "s").rglob("*.tif*"))


# --- killing a run with workers leaves no process behind


def _session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def large_screen(tmp_path_factory) -> Path:
    """36 fields of 256x320: a few seconds of work for two workers."""
    return write_screen(tmp_path_factory.mktemp("kill") / "screen", plates=("P1", "P2", "P3"),
                        wells=("A01", "B01", "C01", "A02"), sites=3, shape=(256, 320), cells_per_field=12)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    "sig, when",
    [(signal.SIGTERM, "working"), (signal.SIGINT, "working"), (signal.SIGKILL, "working"),
     (signal.SIGTERM, "starting"), (signal.SIGINT, "starting")],
)  # fmt: skip
def test_killing_shard_with_workers_leaves_no_process(large_screen, tmp_path, sig, when):
    """Killed while the workers crop ("working") or while the pool starts ("starting")."""
    table, out = large_screen, tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    process = subprocess.Popen(
        [sys.executable, "-c", "from fastcell.cli import run; run()", "shard", str(table), str(out), "--workers", "2",
         "--no-progress"],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    if when == "starting":
        while len(_session_processes(process.pid)) < 3 and time.monotonic() < deadline:  # the forkserver is up
            time.sleep(0.02)
    else:
        while not (out / "illumination.npz").exists() and time.monotonic() < deadline:  # the workers crop
            time.sleep(0.1)
        assert len(_session_processes(process.pid)) >= 3  # the run, the forkserver, its workers
    os.kill(process.pid, sig)
    _, err = process.communicate(timeout=30)
    if sig != signal.SIGKILL:
        assert process.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    deadline = time.monotonic() + 10
    while _session_processes(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _session_processes(process.pid) == []


@pytest.mark.parametrize("centres", [np.zeros((0, 2)), np.array([[10.0, 10.0], [50.0, 40.0]])])
def test_a_field_smaller_than_the_crop_gives_border_cells_not_a_numpy_error(centres):
    from fastcell.shard.crops import extract_crops

    result = extract_crops(np.ones((2, 48, 64), np.uint16), centres, 96, border="skip")
    assert result.crops.shape == (0, 2, 96, 96) and result.n_border == len(centres)


def test_a_field_of_another_size_is_the_one_named_and_skipped(capsys, tmp_path):
    """The plate's shape is the one most of its fields have, whichever field is read first: the odd field is named
    (not a good one after it) and, with --on-error skip, the only one left out."""
    table = write_screen(tmp_path / "screen", plates=("P1",), wells=("A01", "A02", "B01"), sites=1)
    first = pd.read_csv(table).iloc[0]
    for channel in ("DNA", "AGP", "Mito"):
        path = tmp_path / "screen" / first[channel]
        tifffile.imwrite(path, tifffile.imread(path)[:64, :96])
    code, _, err = cli(capsys, "shard", table, tmp_path / "out", *SHARD)
    assert code == 2 and f"field {first['plate']}_{first['well']}_s1 is 64x96, the other 2 field(s) of plate P1 are " \
                          "96x128" in err, err
    code, out, err = cli(capsys, "shard", table, tmp_path / "skipped", *SHARD, "--on-error", "skip")
    assert code == 0, err
    skipped = read_manifest_skipped(tmp_path / "skipped")
    assert [(f["well"], f["reason"].split(": ", 1)[1]) for f in skipped] == [
        ("A01", f"field {first['plate']}_A01_s1 is 64x96, the other 2 field(s) of plate P1 are 96x128")]


def read_manifest_skipped(folder: Path) -> list[dict]:
    """The fields index.json records as skipped."""
    return json.loads((folder / "index.json").read_text())["skipped"]["fields"]


def test_fields_the_roles_leave_out_are_counted_and_named(capsys, tmp_path):
    """A field whose treatment the MoA table does not list (a misspelt compound or dose, in BBBC021's image table)
    is unannotated, which the default --roles leave out: the run says how many and which treatments."""
    table = write_screen(tmp_path / "screen", plates=("P1",), wells=("A01", "A02", "B01"), sites=1)
    fields = pd.read_csv(table)
    fields["role"] = np.where(fields["well"] == "A02", "unannotated", "")
    fields.to_csv(table, index=False)
    code, out, err = cli(capsys, "shard", table, tmp_path / "out", *SHARD)
    assert code == 0, err
    assert "fields left out by --roles treatment,dmso,control: 1 unannotated (their compound and dose are not in " \
           "the MoA table: misspelt?): cmpA @ 1" in out, out
    code, out, err = cli(capsys, "shard", table, tmp_path / "all", *SHARD, "--roles", "all")
    assert code == 0 and "left out" not in out, err


# --- resuming after part of the work folder was removed


def test_a_field_whose_crops_file_is_gone_is_cropped_again(capsys, screen, tmp_path):
    out = tmp_path / "out"
    assert cli(capsys, "shard", screen, out, *SHARD, "--keep-work")[0] == 0
    (out / "index.json").unlink()  # as if stopped before the manifest, while a cleanup removed some crops
    crops = sorted((out / ".work" / "fields").glob("*.crops.npy"))
    crops[0].unlink()
    code, out_text, err = cli(capsys, "shard", screen, out, *SHARD)
    assert code == 0, err
    assert cli(capsys, "info", out, "--verify")[0] == 0


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_a_damaged_illumination_file_of_an_unfinished_run_is_computed_again(capsys, screen, tmp_path, damage):
    out = tmp_path / "out"
    assert cli(capsys, "shard", screen, out, *SHARD, "--keep-work")[0] == 0
    (out / "index.json").unlink()  # stopped while cropping: the work record is there, a field's crops are not
    for path in sorted((out / ".work" / "fields").glob("*"))[:2]:
        path.unlink()
    illumination = bytearray((out / "illumination.npz").read_bytes())
    if damage == "truncated":
        illumination = illumination[: len(illumination) // 2]
    else:
        illumination[len(illumination) // 3] ^= 0x10  # inside an illumination function
    (out / "illumination.npz").write_bytes(bytes(illumination))
    tar = out / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    code, _, err = cli(capsys, "shard", screen, out, *SHARD)
    assert code == 0, err
    assert cli(capsys, "info", out, "--verify")[0] == 0
    assert load_illumination(out / "illumination.npz")


def test_a_finished_folder_without_its_manifest_gets_one_way_forward_from_info_and_shard(capsys, screen, own_shards):
    (own_shards / "index.json").unlink()
    before = snapshot(own_shards)
    _, _, info_err = cli(capsys, "info", own_shards)
    code, _, shard_err = cli(capsys, "shard", screen, own_shards, *SHARD, "--overwrite")
    assert code == 2 and snapshot(own_shards) == before
    for err in (info_err, shard_err):
        assert "(the outputs of a fastcell shard whose index.json was deleted?)" in err, err
        assert "delete these files" in err and "rerun `fastcell shard`" in err, err
    for path in own_shards.iterdir():  # the advice works
        path.unlink()
    assert cli(capsys, "shard", screen, own_shards, *SHARD)[0] == 0


# --- options and field values that would be taken silently


def test_a_channel_named_twice_is_refused(capsys, screen, tmp_path):
    code, _, err = cli(capsys, "shard", screen, tmp_path / "out", *SHARD, "--channels", "DNA,AGP,DNA")
    assert code == 2 and "--channels names DNA twice" in err, err


def test_a_fractional_site_is_refused_naming_the_row(capsys, own_screen, tmp_path):
    table = pd.read_csv(own_screen)
    table["site"] = table["site"].astype(float)
    table.loc[1, "site"] = 1.7
    table.to_csv(own_screen, index=False)
    code, _, err = cli(capsys, "shard", own_screen, tmp_path / "out", *SHARD)
    assert code == 2 and "fields.csv: row 3 has a non-integer site 1.7" in err, err


def test_a_val_fraction_that_rounds_to_no_cell_is_refused(capsys, screen, tmp_path):
    code, _, err = cli(capsys, "shard", screen, tmp_path / "out", *SHARD, "--val-fraction", "0.001")
    assert code == 2 and "--val-fraction 0.001 of" in err and "is no cell: raise it to at least" in err, err


def test_shards_made_before_the_illumination_was_computed_again_are_written_again(capsys, tmp_path):
    """A field left out as unreadable, with no cells of its own, then fixed: the rerun computes the plates'
    illumination again with it, so every crop changes while the cells stay the same. The shards made from the old
    crops are written again (not kept, nor called damaged): the folder is the one a first run on the fixed screen
    makes, byte for byte."""
    table = write_screen(tmp_path / "screen", plates=("P1",), wells=("A01", "A02", "B01"), sites=1)
    fields, locations = pd.read_csv(table), tmp_path / "screen" / "cells.csv"
    lonely = fields.iloc[1]
    cells = pd.read_csv(locations)
    cells[cells["ImageNumber"] != lonely["ImageNumber"]].to_csv(locations, index=False)  # a field without cells
    options = [*SHARD, "--locations", locations, "--on-error", "skip"]
    assert cli(capsys, "shard", table, tmp_path / "clean", *options)[0] == 0
    image = tmp_path / "screen" / lonely["AGP"]
    good = image.read_bytes()
    image.write_bytes(good[:100])  # unreadable: left out, of the illumination too
    code, out, err = cli(capsys, "shard", table, tmp_path / "out", *options)
    assert code == 0 and "1 field(s) skipped" in out, err
    image.write_bytes(good)  # fixed
    code, out, err = cli(capsys, "shard", table, tmp_path / "out", *options)
    assert code == 0 and "damaged" not in out, out
    clean, rerun = snapshot(tmp_path / "clean"), snapshot(tmp_path / "out")
    shards = [name for name in clean if name.endswith((".tar", ".idx"))]
    assert shards and {name: rerun.get(name) for name in shards} == {name: clean[name] for name in shards}


def test_a_screen_moved_with_its_shards_is_still_their_configuration(capsys, tmp_path):
    """The configuration records the screen's absolute path; a project folder moved elsewhere (the same tables, by
    their SHA-256) keeps its shards: the rerun has nothing to do, where it refused them as "a different
    configuration". A table that changed is still refused."""
    write_screen(tmp_path / "a" / "screen", plates=("P1",), wells=("A01", "A02"), sites=1)
    assert cli(capsys, "shard", tmp_path / "a" / "screen" / "fields.csv", tmp_path / "a" / "shards", *SHARD)[0] == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    before = snapshot(tmp_path / "b" / "shards")
    code, out, err = cli(capsys, "shard", tmp_path / "b" / "screen" / "fields.csv", tmp_path / "b" / "shards", *SHARD)
    assert code == 0 and "already complete" in out, err
    assert_kept(before, tmp_path / "b" / "shards")
    table = tmp_path / "b" / "screen" / "fields.csv"
    table.write_text(table.read_text().replace("cmpA", "cmpZ"))
    code, _, err = cli(capsys, "shard", table, tmp_path / "b" / "shards", *SHARD)
    assert code == 2 and "holds shards made with a different configuration" in err, err


def test_a_moved_screen_whose_run_skipped_a_field_is_still_complete(capsys, tmp_path):
    """The recorded reason names the unreadable file under the old folder: compared as is, the moved copy's rerun
    built the whole screen again."""
    write_screen(tmp_path / "a" / "screen", plates=("P1",), wells=("A01", "A02"), sites=2)
    (tmp_path / "a" / "screen" / "P1" / "A02" / "s2_AGP.tif").unlink()
    options = [*SHARD, "--on-error", "skip"]
    assert cli(capsys, "shard", tmp_path / "a" / "screen" / "fields.csv", tmp_path / "a" / "shards", *options)[0] == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    code, out, err = cli(capsys, "shard", tmp_path / "b" / "screen" / "fields.csv", tmp_path / "b" / "shards", *options)
    assert code == 0 and "already complete" in out and "1 field(s) still skipped" in " ".join(out.split()), err
