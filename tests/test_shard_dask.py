"""`fastcell shard --dask`: the same shards as the process pool, through worker deaths; clear errors."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
from fault_helpers import cli_runner
from shard_screens import write_screen

from fastcell import dask_pool
from fastcell.errors import EnvironmentProblem, InputError
from fastcell.shard.pipeline import ShardConfig, shard_screen

cli = pytest.fixture(cli_runner)
RUN_FIELDS = ("out", "workers", "dask")  # how the run was carried out: may differ between runs


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> Path:
    """12 fields, one of them missing an image (skipped with --on-error skip)."""
    table = write_screen(tmp_path_factory.mktemp("screen"))
    (table.parent / "P2" / "A02" / "s1_AGP.tif").unlink()
    return table


@pytest.fixture(scope="module")
def base(screen, tmp_path_factory) -> ShardConfig:
    return ShardConfig(source=screen, out=tmp_path_factory.mktemp("out") / "pool", crop_size=24, shard_size=5,
                       workers=2, on_error="skip")  # fmt: skip


@pytest.fixture(scope="module")
def reference(base):
    """The process pool's shards."""
    return shard_screen(base)


def assert_same_output(a: Path, b: Path) -> None:
    """Every output file byte-identical; index.json identical except how the run was carried out."""
    names = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in b.iterdir() if not p.name.startswith("."))
    assert any(name.endswith(".tar") for name in names)
    for name in names:
        if name != "index.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    first, second = (json.loads((folder / "index.json").read_text()) for folder in (a, b))
    for manifest in (first, second):
        for key in RUN_FIELDS:
            manifest["config"].pop(key)
    assert first == second


def test_local_cluster_gives_the_process_pools_shards(reference, base, monkeypatch):
    submitted = []
    from distributed.cfexecutor import ClientExecutor

    submit = ClientExecutor.submit
    monkeypatch.setattr(ClientExecutor, "submit", lambda self, fn, *args: submitted.append(fn.__name__)
                        or submit(self, fn, *args))  # fmt: skip
    result = shard_screen(replace(base, out=base.out.parent / "dask", dask="local:2", workers=4))
    assert {"illumination_task", "crop_task", "shard_task"} == set(submitted)  # the work ran on Dask
    assert result.n_cells == reference.n_cells > 0
    assert [f["image"] for f in result.fields_skipped] == ["P2/A02/s1_DNA.tif"]  # recorded as by the pool
    assert "s1_AGP.tif: image file not found" in result.fields_skipped[0]["reason"]
    assert json.loads((result.out / "index.json").read_text())["config"]["dask"] == "local:2"
    assert_same_output(base.out, result.out)


def _die_on_call(module_name: str, name: str, call: int) -> None:
    """In a worker process: make `<module_name>.<name>` kill the process (SIGKILL) on its `call`-th call, after
    doing its work but before returning the result."""
    module = importlib.import_module(module_name)
    original = getattr(module, name)
    calls = []

    def dying(*args):
        value = original(*args)
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return value

    setattr(module, name, dying)


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(reference, base):
    """Two workers of a running cluster (reached by address) die: one while cropping, one while writing
    shards; their tasks are rerun elsewhere and the shards are the clean run's."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        pids = client.run(os.getpid)
        first, second = sorted(pids)
        client.run(_die_on_call, "fastcell.shard.passes.crops", "crop_task", 2, workers=[first])
        client.run(_die_on_call, "fastcell.shard.passes.write", "shard_task", 1, workers=[second])
        result = shard_screen(replace(base, out=base.out.parent / "killed", dask=cluster.scheduler_address))
        assert not set(pids.values()) & set(client.run(os.getpid).values())  # both workers were replaced
    assert result.n_cells == reference.n_cells
    assert_same_output(base.out, result.out)


def test_an_unreachable_scheduler_is_named(base, monkeypatch):
    monkeypatch.setattr(dask_pool, "CONNECT_TIMEOUT", 1)
    out = base.out.parent / "unreachable"
    with pytest.raises(EnvironmentProblem, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:9 "):
        shard_screen(replace(base, out=out, dask="tcp://127.0.0.1:9"))
    # nothing but the resumable work record
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]


def test_a_scheduler_without_workers_is_named(monkeypatch):
    from distributed import LocalCluster

    monkeypatch.setattr(dask_pool, "WORKERS_TIMEOUT", 1)  # not CONNECT_TIMEOUT: reaching the scheduler may be slow
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        with pytest.raises(EnvironmentProblem, match=f"the Dask scheduler at {address} has no workers \\(waited 1 s\\); start some"):
            with dask_pool.dask_pool(address):
                pass


@pytest.mark.parametrize("spec", ["local:0", "local", "tcp://host :8786"])
def test_a_bad_dask_option_is_refused_before_anything_runs(base, spec, cli):
    out = base.out.parent / "bad-spec"
    with pytest.raises(InputError, match="--dask"):
        shard_screen(replace(base, out=out, dask=spec))
    assert not out.exists()
    outcome = cli("shard", str(base.source), str(out), "--dask", spec, "--no-progress")
    assert outcome.code == 2 and "--dask" in outcome.err
    shutil.rmtree(out, ignore_errors=True)


def test_an_interrupted_dask_run_resumes_to_the_same_shards(base, monkeypatch):
    """Ctrl-C in the client after 4 fields were cropped on the cluster: the rerun (on Dask again) reuses them,
    crops the rest and gives the process pool's shards. (Without illumination correction: functions made while
    a field was unreadable are recomputed on resume, and the crops made with them.)"""
    from fastcell.shard.passes import context

    clean = shard_screen(replace(base, out=base.out.parent / "clean-pool", illumination=False))
    config = replace(base, out=base.out.parent / "interrupted", illumination=False, dask="local:2")
    real_tasks = context.Run.tasks

    def interrupted(self, fn, tasks, description):
        for done, result in enumerate(real_tasks(self, fn, tasks, description)):
            if fn.__name__ == "crop_task" and done == 4:
                raise KeyboardInterrupt
            yield result

    monkeypatch.setattr(context.Run, "tasks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shard_screen(config)
    assert not list(config.out.glob("*.tar"))
    monkeypatch.setattr(context.Run, "tasks", real_tasks)
    result = shard_screen(config)
    assert result.fields_reused >= 4 and result.fields_processed + result.fields_reused == clean.fields_processed
    assert_same_output(clean.out, result.out)


def _kills_its_workers(task: str):
    """A task as the client sees it once the scheduler gave up on it."""
    from types import SimpleNamespace

    from distributed import KilledWorker

    raise KilledWorker(task, SimpleNamespace(address="tcp://127.0.0.1:1"), 3)


def test_a_task_that_keeps_killing_workers_is_one_message(monkeypatch):
    """Dask gives up on a task after its allowed worker deaths (KilledWorker): one EnvironmentProblem from a
    WorkerPool on Dask (`dask_pool.result_of`; threads stand in for the cluster's executor)."""
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import contextmanager

    from fastcell.pool import WorkerPool

    @contextmanager
    def threads(spec, initializer, initargs):
        with ThreadPoolExecutor(1) as executor:
            yield executor, 1

    monkeypatch.setattr(dask_pool, "dask_pool", threads)
    with WorkerPool(1, dask="local:1") as pool, pytest.raises(
        EnvironmentProblem, match="Dask workers kept dying while running crop_task-1; out of memory"
    ):
        list(pool.run(_kills_its_workers, [("crop_task-1",)]))
