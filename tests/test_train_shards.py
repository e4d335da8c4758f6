"""`fastcell train` end to end on tiny real shards: both loaders, CLI + config file, resume, bad input."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fastcell.cli import app
from fastcell.errors import InputError
from fastcell.format.folder import read_dali_index
from fastcell.loaders.augment import ViewRecipe
from fastcell.testing import interrupting, make_shards, random_crops
from fastcell.train import trainer
from fastcell.train.checkpoint import load_for_inference, read_checkpoint
from fastcell.train.config import TrainConfig
from fastcell.train.trainer import find_corrupt_sample, shard_loader, train

N_TRAIN, N_VAL, SIZE = 64, 32, 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 train + 32 val crops, with a cell table giving the val cells compounds and MoAs."""
    crops = random_crops(N_TRAIN + N_VAL, channels=3, size=SIZE, seed=4)
    root = make_shards(tmp_path_factory.mktemp("shards"), crops[:N_TRAIN], ["DNA", "Tubulin", "Actin"], 16,
                       val=crops[N_TRAIN:])
    ids = np.arange(N_TRAIN + N_VAL)
    pd.DataFrame({
        "id": ids, "split": np.where(ids < N_TRAIN, "train", "val"),
        "compound": [f"c{i % 8}" for i in ids], "moa": [f"m{i % 4}" for i in ids],
    }).to_parquet(root / "cells.parquet")
    return root


def run_cli(*args):
    result = CliRunner().invoke(app, ["train", *map(str, args)])
    return result


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_cli_trains_on_shards_and_resumes(shards, tmp_path, backend, monkeypatch):
    settings = tmp_path / "settings.yaml"
    settings.write_text("batch_size: 16\nepochs: 1\nprecision: fp32\nlog_every: 2\narch: resnet34\n"
                        "augment:\n  crop_scale: [0.5, 1]\n")
    run = tmp_path / "run"
    first = run_cli(shards, "--out", run, "--config", settings, "--arch", "resnet18", "--loader", backend,
                    "--checkpoint-every", "2", "--num-workers", "1", "--knn-every", "4", "-a", "jitter_p=0.4")
    assert first.exit_code == 0, first.output + repr(first.exception)
    saved = json.loads((run / "config.json").read_text())
    assert saved["arch"] == "resnet18"  # the option beat the config file
    assert saved["augment"] == {"crop_scale": [0.5, 1], "jitter_p": 0.4}  # file and option merge by name
    assert saved["batch_size"] == 16 and saved["channels"] == ["DNA", "Tubulin", "Actin"] and saved["view_size"] == 32
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert 0.0 <= float(rows[-1]["knn_acc"]) <= 1.0
    assert (run / "tb").is_dir()

    # resume with more epochs is refused (another schedule); the same settings finish at once
    again = run_cli("--out", run, "--resume", "--epochs", "2")
    assert isinstance(again.exception, InputError) and "epochs: checkpoint has 1" in str(again.exception)
    events = []
    monkeypatch.setattr(trainer, "shard_loader", interrupting(shard_loader, events=events))
    done = run_cli("--out", run, "--resume")
    assert done.exit_code == 0, repr(done.exception)
    assert not [event for event in events if event[0] == "batch"]  # a finished run reads and trains nothing
    assert read_checkpoint(run / "checkpoint.pt")["step"] == N_TRAIN // 16
    model, cfg = load_for_inference(run)
    assert cfg.loader == backend and model.encoder.conv1.in_channels == 3


def test_training_reads_one_shard_folder(shards, tmp_path):
    """One SHARDS argument: a second folder is a usage error (exit 2); a missing or empty one is named."""
    two = run_cli(shards, shards, "--out", tmp_path / "run")
    assert two.exit_code == 2 and "Got unexpected extra argument" in two.output, two.output
    with pytest.raises(InputError, match="index.json: no shard manifest"):
        train(TrainConfig(shards=str(tmp_path / "nothing"), out=str(tmp_path / "run"), progress=False))
    assert not (tmp_path / "run").exists()
    missing = run_cli("--out", tmp_path / "run2")
    assert isinstance(missing.exception, InputError) and "no shard folder given" in str(missing.exception)


def corrupt_member(tar, sample: int) -> str:
    """Overwrite the npy header of one sample in place (the tar keeps its size, so its index still fits)."""
    offset, member = read_dali_index(tar.with_suffix(".idx"))[sample][0][1::2]
    data = bytearray(tar.read_bytes())
    data[offset : offset + 6] = b"BROKEN"
    tar.write_bytes(bytes(data))
    return member


def test_corrupt_shard_mid_run_is_named_and_checkpoint_kept(tmp_path):
    root = make_shards(tmp_path / "shards", random_crops(64, 3, SIZE, seed=5), shard_size=16)
    tar = root / "train-000003.tar"

    def loader_corrupted_after_first_epoch(config, env):
        loader = shard_loader(config, env)
        set_epoch = loader.set_epoch

        def set_epoch_after_damage(epoch, start_batch=0):
            if epoch == 1:
                corrupt_member(tar, 5)
            set_epoch(epoch, start_batch)

        loader.set_epoch = set_epoch_after_damage
        return loader

    cfg = TrainConfig(shards=str(root), out=str(tmp_path / "run"), batch_size=8, epochs=2, loader="torch",
                      precision="fp32", checkpoint_every=4, num_workers=1, progress=False, tensorboard=False)
    with pytest.raises(InputError, match="train-000003.tar: member 000000000053.npy is corrupt") as err:
        train(cfg, loader_corrupted_after_first_epoch)
    assert "epoch 1" in str(err.value) and "the last good checkpoint" in str(err.value)
    state = read_checkpoint(tmp_path / "run" / "checkpoint.pt")  # intact, from the end of epoch 0
    assert (state["step"], state["epoch"], state["batch_in_epoch"], state["finished"]) == (8, 1, 0, False)
    assert find_corrupt_sample(root).startswith(f"{tar}: member 000000000053.npy is corrupt")


def test_the_checkpoint_records_the_manifest_the_loader_read(tmp_path):
    """The shards' identity in a checkpoint is the hash of the index.json bytes the loader parsed, even when the
    file changes after (before: the file was hashed again, so a manifest rewritten in between was recorded as the
    one trained on)."""
    root = make_shards(tmp_path / "shards", random_crops(32, 3, SIZE, seed=5), shard_size=16)
    parsed = (root / "index.json").read_bytes()

    def loader_then_rewritten(config, env):
        loader = shard_loader(config, env)
        (root / "index.json").write_bytes(parsed + b"\n")  # the same content, other bytes
        return loader

    cfg = TrainConfig(shards=str(root), out=str(tmp_path / "run"), batch_size=8, epochs=1, precision="fp32",
                      num_workers=1, progress=False, tensorboard=False)
    train(cfg, loader_then_rewritten)
    recorded = read_checkpoint(tmp_path / "run" / "checkpoint.pt")["shards"]["manifest_sha256"]
    assert recorded == hashlib.sha256(parsed).hexdigest() != hashlib.sha256(parsed + b"\n").hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_exact_resume_with_real_loader(shards, tmp_path, backend):
    """Killed mid-epoch and resumed: the real loader starts the epoch at the batch not trained on, the weights
    match exactly."""
    cfg = dict(shards=str(shards), batch_size=16, epochs=2, loader=backend, precision="fp32",
               checkpoint_every=3, num_workers=1, progress=False, tensorboard=False)
    full = train(TrainConfig(out=str(tmp_path / "full"), **cfg))
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "cut"), **cfg), interrupting(shard_loader, interrupt_at=5))
    assert read_checkpoint(tmp_path / "cut" / "checkpoint.pt")["batch_in_epoch"] == 3  # mid-epoch
    resumed = train(TrainConfig(out=str(tmp_path / "cut"), resume=True, **cfg))
    assert resumed.steps_run == full.steps - 3  # only the steps after the checkpoint
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_resumed_run_augments_only_the_batches_it_trains_on(shards, tmp_path, monkeypatch):
    """Killed after 3 of the epoch's 4 steps, the resumed run (DALI loader) makes the views of 1 batch, not 4."""
    cfg = dict(shards=str(shards), out=str(tmp_path / "run"), batch_size=16, epochs=1, loader="dali",
               precision="fp32", checkpoint_every=3, num_workers=1, progress=False, tensorboard=False)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**cfg), interrupting(shard_loader, interrupt_at=3))
    augmented, apply = [], ViewRecipe.apply

    def counting_apply(self, images, draws):
        augmented.append(len(draws))
        return apply(self, images, draws)

    monkeypatch.setattr(ViewRecipe, "apply", counting_apply)
    resumed = train(TrainConfig(resume=True, **cfg))
    assert resumed.steps_run == 1
    assert sum(augmented) == 2 * 16  # both views of the last batch
