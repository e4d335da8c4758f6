"""The `fastcell` command: version, help on every verb, user errors without tracebacks."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fastcell import __version__
from fastcell.cli import app

VERBS = ["synth", "shard", "info", "train", "embed", "eval", "compare"]


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"fastcell {__version__}"


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb):
    result = CliRunner().invoke(app, [verb, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and "--help" in result.output


def test_root_help_lists_the_pipeline():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in VERBS:
        assert verb in result.output


def test_help_does_not_import_heavy_libraries():
    code = "import sys; from fastcell.cli import app; print(sorted(m for m in ('torch', 'nvidia.dali', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_user_error_is_one_line_and_exit_status_2(tmp_path):
    missing = tmp_path / "nowhere"
    result = subprocess.run([sys.executable, "-c", "from fastcell.cli import run; run()", "info", str(missing)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("fastcell: error: ") and str(missing) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [(["none"], "needs --random-init or --handcrafted"),
     (["none", "--random-init", "--handcrafted"], "exclude each other")],
)
def test_embed_refuses_contradictory_baseline_options(tmp_path, args, message):
    run, *flags = args
    result = CliRunner().invoke(app, ["embed", run, str(tmp_path), "--out", str(tmp_path / "emb"), *flags])
    assert result.exit_code == 2 and message in result.output
