"""Fault injection for `fastcell train`: bad values and types, resumes on other data, damaged inputs.

Every case runs the real entry point and asserts the message, exit status 2, and that every file
that existed before (shards, run folder) is byte-identical afterwards.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fault_helpers import assert_refused, cli_runner, snapshot

from fastcell.errors import InputError
from fastcell.format.folder import read_dali_index, read_manifest
from fastcell.io import sha256_of
from fastcell.testing import make_shards, random_crops
from fastcell.train.checkpoint import load_for_inference, read_checkpoint
from fastcell.train.config import TrainConfig, resolve_config

cli = pytest.fixture(cli_runner)
TINY = ["--batch-size", "8", "--precision", "fp32", "--num-workers", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def shards(shard_folder):
    return shard_folder(32, 3, 32, seed=7, channels=["DNA", "Tub", "Act"], shard_size=16)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A finished 2-step run on `shards` (trained through the library: module fixtures cannot use capsys)."""
    from fastcell.train.trainer import train

    run = tmp_path_factory.mktemp("run")
    train(TrainConfig(shards=str(shards), out=str(run), batch_size=8, max_steps=2, precision="fp32",
                      num_workers=1, log_every=1, progress=False, tensorboard=False))
    return run


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--base-lr", "-0.1", "--base-lr must be greater than 0, got -0.1"),
    ("--base-lr", "0", "--base-lr must be greater than 0, got 0.0"),
    ("--weight-decay", "-1e-4", "--weight-decay must be at least 0"),
    ("--warmup-epochs", "-1", "--warmup-epochs must be at least 0"),
    ("--num-workers", "-1", "--num-workers must be at least 0, got -1"),
    ("--batch-size", "1", "--batch-size must be at least 2 (NT-Xent needs other cells of the batch as negatives)"),
    ("--batch-size", "0", "--batch-size must be at least 2"),
    ("--max-steps", "0", "--max-steps must be at least 1 (leave it unset to train --epochs), got 0"),
    ("--max-steps", "-1", "--max-steps must be at least 1"),
    ("--checkpoint-every", "0", "--checkpoint-every must be at least 1, got 0"),
    ("--log-every", "0", "--log-every must be at least 1"),
    ("--epochs", "0", "--epochs must be at least 1"),
    ("--temperature", "0", "--temperature must be greater than 0"),
    ("--knn-every", "-5", "--knn-every must be at least 0 (0 turns the kNN monitor off)"),
    ("--seed", "-1", "--seed must be at least 0"),
    ("--proj-dim", "0", "--proj-dim must be at least 1"),
    ("--view-size", "0", "--view-size must be at least 1"),
    ("--arch", "resnet99", "--arch must be one of resnet18, resnet34, resnet50, got 'resnet99'"),
    ("--compile-mode", "fast", "--compile-mode must be one of default, reduce-overhead, max-autotune"),
    ("-a", "blur_p=abc", "--augment blur_p must be a number, got 'abc'"),
    ("-a", "blur_p=2", "--augment blur_p is out of range: augmentation blur_p must be a probability"),
    ("-a", "crop_scale=0.5", "--augment crop_scale must be a range LOW,HIGH, got 0.5"),
    ("-a", "dihedral=sometimes", "--augment dihedral must be true or false, got 'sometimes'"),
    ("-a", "blurp=0.5", "unknown augmentation setting(s) blurp"),
])
def test_bad_option_is_named_as_typed(cli, shards, tmp_path, option, value, message):
    before = snapshot(shards)
    outcome = cli("train", shards, "--out", tmp_path / "run", option, value)
    assert_refused(outcome, message)
    assert snapshot(shards) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("text", "message"), [
    ("batch_size: big\n", "batch_size must be an integer, got 'big'"),
    ("epochs: 2.5\n", "epochs must be an integer, got 2.5"),
    ("epochs: true\n", "epochs must be an integer, got True"),
    ("base_lr: -1\n", "base_lr must be greater than 0, got -1"),
    ("compile: maybe\n", "compile must be true or false, got 'maybe'"),
    ("augment:\n  blur_p: abc\n", "augment.blur_p must be a number, got 'abc'"),
    ("augment: 5\n", "augment must be a mapping of augmentation settings, got 5"),
    ("view_size: [48]\n", "view_size must be an integer, got [48]"),
    ("bacth_size: 8\n", "unknown setting(s) bacth_size"),
])
def test_bad_config_file_value_names_file_and_key(cli, shards, tmp_path, text, message):
    settings = tmp_path / "settings.yaml"
    settings.write_text(text)
    before = snapshot(shards, settings)
    outcome = cli("train", shards, "--out", tmp_path / "run", "--config", settings)
    assert_refused(outcome, f"{settings}: {message}")
    assert snapshot(shards, settings) == before and not (tmp_path / "run").exists()


def test_numbers_written_as_text_in_yaml_are_read():
    """YAML 1.1 reads `1e-3` as text: the config converts it rather than failing at the optimiser."""
    cfg = TrainConfig(base_lr="1e-3", batch_size="64", augment={"blur_p": "0.25", "crop_scale": ["0.5", 1]})
    assert cfg.base_lr == 0.001 and cfg.batch_size == 64
    assert cfg.augment_spec().blur_p == 0.25 and cfg.augment_spec().crop_scale == (0.5, 1.0)
    with pytest.raises(InputError, match="max_steps must be at least 1"):
        TrainConfig(max_steps=0)
    assert TrainConfig().max_steps is None  # unset: --epochs decide


def test_saved_run_config_with_a_bad_value_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TrainConfig(batch_size=8).to_dict() | {"batch_size": 1}))
    with pytest.raises(InputError, match=r"config.json: batch_size must be at least 2"):
        resolve_config({"resume": True}, out=tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match=r"config.json: unreadable run config"):
        resolve_config({"resume": True}, out=tmp_path)


def test_a_run_that_lost_its_config_json_resumes_with_its_checkpoint_s_settings(cli, trained, tmp_path):
    """`train --out RUN --resume` takes the run's settings from config.json, else from its checkpoint (which
    holds the same), not from the defaults (which named no shard folder and another batch size)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").unlink()
    resolved = resolve_config({"resume": True}, out=run)
    assert (resolved.shards, resolved.batch_size, resolved.arch) == (saved["shards"], saved["batch_size"],
                                                                      saved["arch"])
    done = cli("train", "--out", run, "--resume")
    assert done.code == 0, done.err


def test_resume_on_another_shard_folder_is_refused_and_changes_nothing(cli, shards, trained, tmp_path):
    other = make_shards(tmp_path / "other", random_crops(32, 3, 32, seed=8), ["DNA", "Tub", "Act"], 16)
    before = snapshot(trained, shards, other)
    outcome = cli("train", other, "--out", trained, "--resume", *TINY)
    assert_refused(outcome, f"the run was trained on {shards.resolve()}", f"this run reads {other.resolve()}",
                   "cannot resume")
    assert snapshot(trained, shards, other) == before  # config.json not rewritten


def test_resume_on_remade_shards_is_refused_but_a_moved_folder_resumes(cli, shards, trained, tmp_path):
    moved, run = tmp_path / "moved", tmp_path / "run"
    shutil.copytree(shards, moved)
    shutil.copytree(trained, run)
    done = cli("train", moved, "--out", run, "--resume", *TINY)  # the same data elsewhere: resumes (finished)
    assert done.code == 0, done.err
    assert json.loads((run / "config.json").read_text())["shards"] == str(moved)
    manifest = json.loads((moved / "index.json").read_text())
    manifest["channel_stats"]["mean"][0] += 1.0  # re-made shards: another manifest
    (moved / "index.json").write_text(json.dumps(manifest))
    before = snapshot(run, moved)
    outcome = cli("train", moved, "--out", run, "--resume", *TINY)
    assert_refused(outcome, "other or re-made shards, cannot resume", "manifest sha256")
    assert snapshot(run, moved) == before


def as_older_fastcell_wrote_it(run) -> None:
    """Rewrite a run of this fastcell into the form older fastcell wrote: `shards` a one-item list, the
    resolved views' side as `crop_size` beside an unset `view_size`, the shards' identity with a list `folders`."""

    def old(config: dict) -> dict:
        return config | {"shards": [config["shards"]], "crop_size": config["view_size"], "view_size": None}

    (run / "config.json").write_text(json.dumps(old(json.loads((run / "config.json").read_text()))))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    identity = state["shards"]
    state |= {"config": old(state["config"]),
              "shards": {"folders": [identity["folder"]], "manifest_sha256": identity["manifest_sha256"]}}
    torch.save(state, run / "checkpoint.pt")


def test_a_run_older_fastcell_wrote_embeds_and_resumes(cli, shards, trained, tmp_path):
    run, other = tmp_path / "run", make_shards(tmp_path / "other", random_crops(32, 3, 32, seed=8), shard_size=16)
    shutil.copytree(trained, run)
    as_older_fastcell_wrote_it(run)
    assert json.loads((run / "config.json").read_text())["shards"] == [str(shards)]
    old_checkpoint = sha256_of([run / "checkpoint.pt"])

    embedded = cli("embed", run, shards, "--out", tmp_path / "emb", "--no-progress", "--workers", "1")
    assert embedded.code == 0, embedded.err
    assert json.loads((tmp_path / "emb" / "embed.json").read_text())["model"]["checkpoint_sha256"] == old_checkpoint
    assert load_for_inference(run)[1].view_size == 32  # the side its views had

    assert_refused(cli("train", other, "--out", run, "--resume"), f"the run was trained on {shards.resolve()}")
    done = cli("train", "--out", run, "--resume")  # the shard folder from the one-item list; no setting "changed"
    assert done.code == 0, done.err
    saved = json.loads((run / "config.json").read_text())  # rewritten in today's form
    assert (saved["shards"], saved["view_size"], "crop_size" in saved) == (str(shards), 32, False)
    assert sha256_of([run / "checkpoint.pt"]) == old_checkpoint  # finished: nothing trained, the checkpoint kept


@pytest.mark.parametrize(("args", "message"), [
    (["--batch-size", "4"], "batch_size: checkpoint has 8, this run asks 4"),
    (["--max-steps", "0"], "--max-steps must be at least 1"),
    (["--no-resume"], "a run already lives here; pass --resume"),
])
def test_refused_resume_leaves_the_run_as_it_was(cli, shards, trained, args, message):
    before = snapshot(trained, shards)
    outcome = cli("train", shards, "--out", trained, "--resume", *TINY, *args)
    assert_refused(outcome, message)
    assert snapshot(trained, shards) == before


def test_damaged_checkpoint_or_run_config_is_named(cli, shards, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:1000])  # truncated copy
    before = snapshot(run, shards)
    assert_refused(cli("train", shards, "--out", run, "--resume", *TINY), "checkpoint.pt: unreadable checkpoint")
    (run / "config.json").write_text("{")
    assert_refused(cli("train", "--out", run, "--resume"), "config.json: unreadable run config")
    assert snapshot(run, shards) == before | snapshot(run / "config.json")


def damage_npy_header(tar, sample: int) -> None:
    """Overwrite part of one crop's npy header dict with bytes that are not UTF-8 (the tar keeps its size)."""
    offset = read_dali_index(tar.with_suffix(".idx"))[sample][0][1]
    data = bytearray(tar.read_bytes())
    data[offset + 12 : offset + 30] = b"\xff\xfe" * 9
    tar.write_bytes(bytes(data))


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_corrupt_crop_gives_the_workers_message_only(cli, shards, tmp_path, loader):
    """A damaged npy header (bytes that are not UTF-8): the torch worker's InputError without its traceback,
    DALI's unprintable message turned into the scan's finding."""
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    tar = bad / "train-000001.tar"
    damage_npy_header(tar, 3)
    before = snapshot(bad)
    outcome = cli("train", bad, "--out", tmp_path / "run", "--loader", loader, "--max-steps", "2", *TINY)
    assert_refused(outcome, f"{tar}: member 000000000019.npy is corrupt", "reading the training shards failed")
    assert "Original Traceback" not in outcome.err and "Caught InputError" not in outcome.err
    assert snapshot(bad) == before
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_random_init_of_a_run_takes_its_architecture_not_its_weights(shards, trained, tmp_path):
    """`fastcell embed RUN --random-init`: the run's architecture (not --arch), freshly initialised from --seed."""
    from fastcell.evaluate.embed import EmbedConfig, load_network

    run_model, run_config = load_for_inference(trained)
    cfg = EmbedConfig(run=trained, shards=shards, out=tmp_path / "emb", random_init=True, arch="resnet50", seed=3)
    model, described = load_network(cfg, read_manifest(shards).channels)
    again, _ = load_network(cfg, read_manifest(shards).channels)
    weights, run_weights = model.state_dict(), run_model.state_dict()
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in run_weights.items()}
    assert not any(torch.equal(weights[k], run_weights[k]) for k in weights if k.endswith("conv1.weight"))
    assert all(torch.equal(weights[k], v) for k, v in again.state_dict().items())  # seeded
    assert described == {"run": str(trained), "arch": run_config.arch, "stem": run_config.stem, "trained": False,
                         "seed": 3}


def test_fixture_run_is_finished(trained):
    state = read_checkpoint(trained / "checkpoint.pt")
    assert state["finished"] and state["step"] == 2 and state["shards"]["manifest_sha256"]
