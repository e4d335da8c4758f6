"""bench/gpu_check.py's runner: `--only` picks checks by name, and every finished check is saved at once."""

import importlib.util
import json
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def gpu_check(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_only_runs_the_named_checks_in_the_given_order(gpu_check, tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--only", "faiss-gpu-vs-cpu,training", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert [row["check"] for row in saved["rows"]] == ["faiss-gpu-vs-cpu", "training"]
    assert saved["complete"] is True


def test_an_unknown_check_is_refused_naming_the_known_ones(gpu_check, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--only", "training,trianing", "--out", str(tmp_path / "check.json")])
    assert exit_info.value.code == 2
    assert "unknown check(s) trianing; known: dali-cpu," in capsys.readouterr().err
    assert not (tmp_path / "check.json").exists()


def test_a_run_cut_short_keeps_the_checks_it_finished(gpu_check, tmp_path, monkeypatch):
    def check_first(ctx):
        return [gpu_check.Row("first", "ok", "measured")]

    def check_second(ctx):
        raise KeyboardInterrupt  # what a time limit's signal looks like to the run

    monkeypatch.setattr(gpu_check, "CHECKS", [check_first, check_second])
    out = tmp_path / "check.json"
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--out", str(out)])
    saved = json.loads(out.read_text())
    assert [(row["check"], row["detail"]) for row in saved["rows"]] == [("first", "measured")]
    assert saved["complete"] is False


def test_the_resume_check_resumes_a_killed_run_on_this_machine(gpu_check, tmp_path):
    """The body of `train-resume-gpu` runs on the device the trainer picks: here the CPU (on a GPU machine it is
    the row that loads a checkpoint onto the GPU)."""
    ctx = gpu_check.Context(tmp_path, cuda=False, workers=1)
    row = gpu_check.train_resume_row(ctx)
    assert row.status == "ok", row.detail
    assert "12 steps run, 16 in all" in row.detail
    assert gpu_check.check_train_resume_gpu(ctx)[0].status == gpu_check.NO_CUDA


def test_the_epochs_check_compares_epochs_started_ahead_with_fresh_ones(gpu_check, tmp_path, monkeypatch):
    """The body of `loader-epochs-gpu` on the CPU loader: equal here; and it fails when an epoch started ahead is
    not the epoch asked for (its pipeline seeded with the epoch before's seed)."""
    from fastcell.loaders.dali import DaliTrainLoader

    ctx = gpu_check.Context(tmp_path, cuda=False, workers=1)
    assert gpu_check.epochs_row(ctx, "cpu").status == "ok"
    build = DaliTrainLoader.build_pipeline
    monkeypatch.setattr(DaliTrainLoader, "build_pipeline",
                        lambda self, epoch=None: build(self, epoch - 1 if epoch and threading.current_thread().name
                                                       .startswith("fastcell-next-epoch") else epoch))
    assert gpu_check.epochs_row(ctx, "cpu").status == "FAIL"
