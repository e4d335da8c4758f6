"""The training loop on CPU with a synthetic loader: exact resume, kills, refusals, bad data."""

from __future__ import annotations

import builtins
import csv
import io
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastcell.errors import InputError
from fastcell.io import sha256_of
from fastcell.precision import autocast_dtype, cpu_has_bf16_units
from fastcell.testing import WrappedLoader, interrupting
from fastcell.train import trainer
from fastcell.train.checkpoint import (
    load_for_inference,
    load_trained,
    read_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from fastcell.train.config import TrainConfig
from fastcell.train.synthetic import SyntheticPairLoader
from fastcell.train.trainer import train

STEPS_PER_EPOCH = 4  # 32 samples / batch 8


def fake_loader(channels: int = 3, interrupt_at: int | None = None, error: Exception | None = None,
                events: list | None = None):
    """A synthetic loader factory (32 samples of C x 32 x 32), optionally interrupted or recorded."""

    def make(config, env):
        return SyntheticPairLoader(32, config.batch_size, channels, 32, device=env.device, seed=config.seed,
                                   rank=env.rank, world_size=env.world_size)

    return interrupting(make, interrupt_at, error, events)


def config(out, **kw) -> TrainConfig:
    base = dict(out=str(out), batch_size=8, epochs=3, precision="fp32", checkpoint_every=5, log_every=2,
                progress=False, tensorboard=False)
    return TrainConfig(**{**base, **kw})


def seed_host_rngs(seed: int) -> None:
    """Seed the process's numpy and Python generators (the trainer seeds torch's itself): two runs seeded
    alike start alike, and a resumed run seeded otherwise must bring back the checkpoint's states."""
    np.random.seed(seed)
    random.seed(seed)


def assert_same(a, b, where: str = "state") -> None:
    """Nested checkpoint contents (dicts, lists, tensors, numbers) exactly equal; `where` names a difference."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def without_config(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "config"}  # the config names the run folder


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A full run, with a copy of every checkpoint it wrote, by step."""
    run = tmp_path_factory.mktemp("full")
    saved = {}

    def save_and_copy(path, **state):
        written = save_checkpoint(path, **state)
        saved[state["step"]] = read_checkpoint(written)
        return written

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "save_checkpoint", save_and_copy)
        seed_host_rngs(7)
        result = train(config(run), fake_loader())
    return run, result, saved


def test_resume_after_kill_matches_uninterrupted_run(uninterrupted, tmp_path):
    full_dir, full, full_checkpoints = uninterrupted
    assert full.steps == full.steps_run == 3 * STEPS_PER_EPOCH
    assert sorted(full_checkpoints) == [5, 10, 12]
    seed_host_rngs(7)
    with pytest.raises(KeyboardInterrupt):  # killed while fetching the batch of step 9
        train(config(tmp_path), fake_loader(interrupt_at=8))
    state = read_checkpoint(tmp_path / "checkpoint.pt")
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (5, 1, 1)  # mid-epoch
    # the kill point holds the uninterrupted run's step-5 state: weights, optimiser, scheduler, scaler,
    # loader position (epoch, batch in epoch) and random states
    assert_same(without_config(state), without_config(full_checkpoints[5]))
    assert not list(tmp_path.glob(".checkpoint.pt.*"))  # no half-written checkpoint left behind

    seed_host_rngs(8)  # as a new process would: other random states until the checkpoint's are restored
    events = []
    resumed = train(config(tmp_path, resume=True), fake_loader(events=events))
    assert resumed.steps == full.steps
    assert resumed.steps_run == full.steps - 5  # only the remaining steps 6..12
    epochs = [event for event in events if event[0] == "epoch"]
    assert [e for _, e, _ in epochs] == [1, 2]  # starts in the killed epoch, at its first batch not trained on
    assert [event[1] for event in events if event[0] == "batch"] == [1] * 3 + [2] * 4  # epoch 1 batch 0: not served
    assert_same(epochs[0][2], full_checkpoints[5]["rng"], "random states when the resumed run starts")
    # fp32 on CPU: bit-identical weights (tolerance 0), and the whole final state
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert_same(without_config(read_checkpoint(tmp_path / "checkpoint.pt")), without_config(full_checkpoints[12]))
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(2, full.steps + 1, 2))  # no duplicated steps
    assert float(rows[-1]["loss"]) == pytest.approx(full.final_loss, abs=1e-6)
    assert read_checkpoint(tmp_path / "checkpoint.pt")["finished"]


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_checkpoint_byte_for_byte(tmp_path):
    """`fastcell train --resume` on a finished run (as `make demo` reruns it) must leave the checkpoint as it is:
    embed records the checkpoint's SHA-256 and refuses a run whose checksum changed ("it trained further")."""
    train(config(tmp_path, epochs=1), fake_loader())
    before = sha256_of([tmp_path / "checkpoint.pt"])
    again = train(config(tmp_path, epochs=1, resume=True), fake_loader())
    assert (again.steps, again.steps_run) == (STEPS_PER_EPOCH, 0)
    assert sha256_of([tmp_path / "checkpoint.pt"]) == before


def test_a_resume_says_when_its_steps_run_in_another_dtype_and_clears_unfinished_writes(tmp_path, capsys):
    """The checkpoint records the dtype its steps ran in (what --precision auto resolved to); a resume on a machine
    where it resolves otherwise is not bit-exact, and says so. Temporary files of checkpoint writes a killed run
    left (up to a checkpoint's size each) are deleted."""
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path), fake_loader(interrupt_at=6))
    state = read_checkpoint(tmp_path / "checkpoint.pt")
    assert state["autocast"] == "fp32"
    save_checkpoint(tmp_path / "checkpoint.pt", **{**checkpoint_parts(state), "autocast": "bfloat16"})
    (tmp_path / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    with pytest.raises(InputError, match="a run already lives here"):  # refused: changes nothing (the file may be
        train(config(tmp_path), fake_loader())                           # another live run's write)
    assert (tmp_path / ".checkpoint.pt.x1y2.tmp").is_file()
    capsys.readouterr()
    train(config(tmp_path, resume=True), fake_loader())
    assert "its steps ran in bfloat16, on this machine --precision fp32 runs fp32: the run goes on, but is not " \
           "bit-exact" in capsys.readouterr().err
    assert not list(tmp_path.glob(".checkpoint.pt.*"))
    train(config(tmp_path / "same"), fake_loader())  # no warning when the dtype is the one recorded
    assert "warning" not in capsys.readouterr().err


def test_steps_in_fp16_after_bf16_or_fp32_ones_start_a_fresh_loss_scale(tmp_path):
    """A checkpoint of steps without a loss scale (bf16, fp32) resumed where --precision auto gives fp16 (a GPU
    without bf16): the enabled GradScaler starts afresh instead of failing on the empty saved state."""
    from fastcell.train.checkpoint import restore_training_state

    def parts():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    model, optimizer, scheduler = parts()
    save_checkpoint(tmp_path / "checkpoint.pt", model=model, optimizer=optimizer, scheduler=scheduler,
                    scaler=torch.amp.GradScaler("cpu", enabled=False), config=config(tmp_path), step=1, epoch=0,
                    batch_in_epoch=1, world_size=1)
    model, optimizer, scheduler = parts()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    restore_training_state(read_checkpoint(tmp_path / "checkpoint.pt"), model=model, optimizer=optimizer,
                           scheduler=scheduler, scaler=scaler)
    assert scaler.is_enabled() and scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()


def checkpoint_parts(state: dict) -> dict:
    """`save_checkpoint`'s arguments that write `state` again."""
    model = SimpleNamespace(state_dict=lambda: state["model"])
    holder = lambda key: SimpleNamespace(state_dict=lambda: state[key])  # noqa: E731
    return dict(model=model, optimizer=holder("optimizer"), scheduler=holder("scheduler"), scaler=holder("scaler"),
                config=TrainConfig.from_dict(state["config"]), step=state["step"], epoch=state["epoch"],
                batch_in_epoch=state["batch_in_epoch"], world_size=state["world_size"], shards=state["shards"],
                finished=state["finished"])


def test_the_same_training_state_is_saved_as_the_same_bytes(tmp_path):
    """A checkpoint's bytes are a function of its contents, not of the temporary file it was written through."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    digests = set()
    for name in ("a.pt", "b.pt"):
        torch.manual_seed(0)
        save_checkpoint(tmp_path / name, model=model, optimizer=optimizer, scheduler=scheduler,
                        scaler=torch.amp.GradScaler("cpu", enabled=False), config=config(tmp_path), step=1, epoch=0,
                        batch_in_epoch=1, world_size=1)
        digests.add(sha256_of([tmp_path / name]))
    assert len(digests) == 1


def test_metrics_after_a_resume_time_only_the_steps_trained(tmp_path, monkeypatch):
    """Resumed mid-epoch, every row's data_wait and samples/s come from the steps it trained: on a fake clock
    that moves 1 s per batch the loader serves and 1 s per step, each row reads wait 1/2 and batch / 2 s per
    step, the first one too (a batch fetched and thrown away would count in its wait and time)."""
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, epochs=2), fake_loader(interrupt_at=6))
    assert read_checkpoint(tmp_path / "checkpoint.pt")["batch_in_epoch"] == 1  # step 5: epoch 1, batch 1
    clock, train_step = [0.0], trainer.TrainStep.__call__

    def tick(result=None):
        clock[0] += 1.0
        return result

    def clocked(config, env):
        loader = fake_loader()(config, env)
        return WrappedLoader(loader, lambda: (tick(batch) for batch in loader), loader.set_epoch)

    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(trainer.TrainStep, "__call__", lambda self, *views: tick(train_step(self, *views)))
    resumed = train(config(tmp_path, epochs=2, resume=True), clocked)
    assert resumed.steps_run == 3 and clock[0] == 2 * 3  # 3 batches served, 3 steps
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if int(r["step"]) > 5]
    assert [int(r["step"]) for r in rows] == [6, 8]
    assert [(float(r["data_wait"]), float(r["samples_per_s"])) for r in rows] == [(0.5, 8 / 2)] * 2


def test_existing_run_is_not_overwritten(uninterrupted):
    run, _, _ = uninterrupted
    before = (run / "checkpoint.pt").stat().st_mtime_ns
    with pytest.raises(InputError, match="checkpoint.pt: a run already lives here"):
        train(config(run), fake_loader())
    with pytest.raises(InputError, match=r"checkpoint.pt: checkpoint of another model.*proj_dim: checkpoint has 128"):
        train(config(run, resume=True, proj_dim=64), fake_loader())
    with pytest.raises(InputError, match=r"channels: checkpoint has \['ch0', 'ch1', 'ch2'\]"):
        train(config(run, resume=True), fake_loader(channels=4))
    assert (run / "checkpoint.pt").stat().st_mtime_ns == before


def test_corrupt_shard_mid_epoch_keeps_last_checkpoint(tmp_path):
    bad = InputError("/data/shards/train-000003.tar: truncated (1024 bytes; its index needs 4096)")
    with pytest.raises(InputError) as err:
        train(config(tmp_path), fake_loader(interrupt_at=6, error=bad))
    message = str(err.value)
    assert "train-000003.tar: truncated" in message and "epoch 1, batch 2" in message
    assert "last good checkpoint" in message
    assert read_checkpoint(tmp_path / "checkpoint.pt")["step"] == 5


def test_load_for_inference_gives_the_trained_encoder(uninterrupted):
    run, result, _ = uninterrupted
    model, cfg = load_for_inference(run)
    assert cfg.channels == ["ch0", "ch1", "ch2"] and cfg.view_size == 32
    assert not model.training
    x = torch.randn(2, 3, 32, 32)
    result.model.eval()
    torch.testing.assert_close(model.encoder(x), result.model.encoder(x))
    assert model.encoder(x).shape == (2, 512)
    saved = TrainConfig.from_dict(__import__("json").loads((run / "config.json").read_text()))
    assert saved.channels == cfg.channels and saved.batch_size == 8


def test_load_trained_reads_the_checkpoint_once_and_records_its_sha256(uninterrupted, monkeypatch):
    run, result, _ = uninterrupted
    checkpoint, opened, real_open = run / "checkpoint.pt", [], io.open

    def counting_open(file, *args, **kwargs):
        if str(file) == str(checkpoint):
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting_open)  # pathlib's opener
    monkeypatch.setattr(builtins, "open", counting_open)  # torch's
    model, cfg, identity = load_trained(run)
    monkeypatch.undo()
    assert len(opened) == 1
    assert identity == {"checkpoint": str(checkpoint.resolve()), "sha256": sha256_of([checkpoint]), "step": 12}
    x = torch.randn(2, 3, 32, 32)
    result.model.eval()
    torch.testing.assert_close(model.encoder(x), result.model.encoder(x))


def test_unreadable_checkpoint_is_named(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\0" * 100)
    with pytest.raises(InputError, match="checkpoint.pt: unreadable checkpoint"):
        load_for_inference(tmp_path)
    with pytest.raises(InputError, match="no checkpoint here"):
        load_for_inference(tmp_path / "missing.pt")


def test_bf16_run_learns(tmp_path):
    """bf16 autocast on CPU: convolutions and linear layers do compute in bf16, and the loss falls over a
    few epochs on an easy synthetic task."""
    computed_in = set()

    def record(module, args, output):
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            computed_in.add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        result = train(config(tmp_path, precision="bf16", epochs=2, optimizer="adamw", base_lr=2e-3,
                              checkpoint_every=100, log_every=4), fake_loader())
    finally:
        hook.remove()
    assert computed_in == {torch.bfloat16}
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert all(0 <= float(r["data_wait"]) < 1 for r in rows) and result.samples_per_s > 0


def test_precision_settings():
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16 and autocast_dtype("fp16", cpu) is torch.float16
    # "auto" on a CPU: bf16 only with native bf16 units (on AVX2 bf16 autocast is several times slower)
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if cpu_has_bf16_units() else None)


def test_a_checkpoint_inside_the_resumed_epoch_records_its_batch(tmp_path):
    """Killed twice in one epoch: the resumed run counts its batches from where it started, so its own
    checkpoints record how far into the epoch it got (else a second resume would train batches again)."""
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path), fake_loader(interrupt_at=8))  # checkpoint at step 5: epoch 1, batch 1
    with pytest.raises(KeyboardInterrupt):  # resumed at epoch 1 batch 1, killed fetching its third batch
        train(config(tmp_path, resume=True, checkpoint_every=1), fake_loader(interrupt_at=2))
    state = read_checkpoint(tmp_path / "checkpoint.pt")
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (7, 1, 3)


def test_a_failure_on_the_first_batch_of_a_resumed_epoch_may_lie_before_it(tmp_path):
    """The loader reads past the batches trained on before it serves the first one of a resumed epoch."""
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path), fake_loader(interrupt_at=8))  # epoch 1, batch 1
    with pytest.raises(InputError, match=r"at epoch 1, batch 1 or the batches before it, which a resumed run reads"):
        train(config(tmp_path, resume=True), fake_loader(interrupt_at=0, error=OSError("bad bytes")))
    with pytest.raises(InputError, match=r"at epoch 0, batch 2: bad bytes"):  # a fresh run: the batch itself
        train(config(tmp_path / "fresh"), fake_loader(interrupt_at=2, error=OSError("bad bytes")))


def test_a_loader_whose_set_epoch_takes_only_the_epoch_trains_a_fresh_run(tmp_path):
    """Loaders written to the older contract (`set_epoch(epoch)`) still train runs that do not resume."""

    def make(config, env):
        loader = fake_loader()(config, env)
        return WrappedLoader(loader, lambda: iter(loader), lambda epoch: loader.set_epoch(epoch))

    assert train(config(tmp_path, epochs=1), make).steps == STEPS_PER_EPOCH


def test_generator_states_restore_from_a_checkpoint_loaded_onto_another_device():
    """A resume on a GPU loads the checkpoint onto it (`map_location`), generator states included, which torch
    and NumPy take from CPU tensors only: `set_rng_states` moves them back. (No second device here: the states
    stand in as objects that only `.cpu()` turns into tensors.)"""

    class Elsewhere:
        def __init__(self, tensor: torch.Tensor):
            self.tensor = tensor

        def cpu(self) -> torch.Tensor:
            return self.tensor

    saved = rng_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_states({**saved, "torch": Elsewhere(saved["torch"]),
                    "numpy": {**saved["numpy"], "key": Elsewhere(saved["numpy"]["key"])}})
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_the_loader_is_closed_once_no_epoch_follows(tmp_path):
    """A loader with `close()` (the DALI one starts each next epoch ahead) is closed when training ends."""
    closed = []

    class Closing(SyntheticPairLoader):
        def close(self) -> None:
            closed.append(self.epoch)

    result = train(config(tmp_path / "run", epochs=2),
                   make_loader=lambda cfg, env: Closing(32, cfg.batch_size, 3, 32, device=env.device, seed=cfg.seed))
    assert result.steps == 2 * STEPS_PER_EPOCH and closed == [1]
