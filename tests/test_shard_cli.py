"""The `fastcell shard` and `fastcell info` verbs, through the real command line."""

from __future__ import annotations

import json

import pytest
from shard_screens import write_screen
from typer.testing import CliRunner

from fastcell.cli import app
from fastcell.errors import InputError


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    table = write_screen(root / "screen", plates=("P1", "P2"), wells=("A01", "B01"), sites=1)
    out = root / "shards"
    result = CliRunner().invoke(
        app,
        ["shard", str(table), str(out), "--crop", "24", "--shard-size", "8", "--workers", "1",
         "--val-fraction", "0.5", "--split", "plate", "--border", "pad", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out, flat(result.output)


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def test_shard_prints_what_it_made(shards):
    out, output = shards
    manifest = json.loads((out / "index.json").read_text())
    train, val = manifest["splits"]["train"]["count"], manifest["splits"]["val"]["count"]
    assert train + val == 24  # 4 fields x 6 cells, none lost: border cells are padded
    assert f"{train + val} cells (train {train}, val {val})" in output
    assert "border cells padded:" in output
    assert manifest["config"]["border"] == "pad" and manifest["config"]["split"] == "plate"


def test_rerun_is_a_no_op(shards):
    out, _ = shards
    table = out.parent / "screen" / "fields.csv"
    result = CliRunner().invoke(
        app,
        ["shard", str(table), str(out), "--crop", "24", "--shard-size", "8", "--workers", "2",
         "--val-fraction", "0.5", "--split", "plate", "--border", "pad", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "already complete (24 cells); nothing to do" in flat(result.output)


def test_info_prints_counts_statistics_and_writes_a_montage(shards):
    out, _ = shards
    png = out.parent / "montage.png"
    result = CliRunner().invoke(app, ["info", str(out), "--montage", str(png), "--n", "9"])
    assert result.exit_code == 0, result.output
    assert "24 cells" in flat(result.output) and "per-channel statistics" in flat(result.output)
    for channel in ("DNA", "AGP", "Mito"):
        assert channel in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    as_json = CliRunner().invoke(app, ["info", str(out), "--json"])
    assert json.loads(as_json.output)["cells"] == 24


def test_a_bad_source_is_a_user_error(tmp_path):
    result = CliRunner().invoke(app, ["shard", str(tmp_path / "missing.csv"), str(tmp_path / "out")])
    assert isinstance(result.exception, InputError)  # the console entry point prints it, exit status 2
    assert "missing.csv: no such folder or field table" in str(result.exception)


def test_shard_help_names_every_codec():
    from fastcell.format.codecs import CODECS

    result = CliRunner().invoke(app, ["shard", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    assert [name for name in CODECS if f"'{name}'" not in text] == []
