"""Fault injection for `fastcell embed`, `eval` and `compare`: stale outputs, bad values, damaged inputs.

Every case runs the real entry point and asserts the message, the exit status and that every
file that existed before is byte-identical afterwards (or, for a refresh, replaced as a whole).
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from fault_helpers import assert_refused, cli_runner, snapshot
from test_faults_train import damage_npy_header

from fastcell.evaluate.embed import EmbedConfig, run_embed
from fastcell.testing import interrupting, make_shards, random_crops
from fastcell.train.checkpoint import read_checkpoint
from fastcell.train.config import TrainConfig
from fastcell.train.trainer import shard_loader, train

cli = pytest.fixture(cli_runner)
N_CELLS = 32
EMBED = ["--no-progress", "--workers", "1", "--batch-size", "16"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """32 crops with a cells table on real BBBC021 wells."""
    root = make_shards(tmp_path_factory.mktemp("shards"), random_crops(N_CELLS, 3, 32, seed=3), ["DNA", "Tub", "Act"], 16)
    wells = [("Week1_22123", "D03"), ("Week1_22123", "B02"), ("Week2_24121", "C05")]
    pd.DataFrame({
        "id": np.arange(N_CELLS, dtype=np.int64), "split": "train", "shard": "train-000000.tar",
        "plate": [wells[i % 3][0] for i in range(N_CELLS)], "well": [wells[i % 3][1] for i in range(N_CELLS)],
        "site": 1, "batch": "Week1", "compound": "x", "concentration": 0.0,
    }).to_parquet(root / "cells.parquet", index=False)
    return root


def training(shards, run, **changes) -> TrainConfig:
    return TrainConfig(**dict(shards=str(shards), out=str(run), batch_size=8, max_steps=4, checkpoint_every=2,
                              precision="fp32", num_workers=1, progress=False, tensorboard=False) | changes)


@pytest.fixture(scope="module")
def half_trained(shards, tmp_path_factory):
    """A run killed after its step-2 checkpoint (of 4 steps): resuming trains it further."""
    run = tmp_path_factory.mktemp("run")
    with pytest.raises(KeyboardInterrupt):
        train(training(shards, run), interrupting(shard_loader, interrupt_at=3))
    assert read_checkpoint(run / "checkpoint.pt")["step"] == 2
    return run


@pytest.fixture(scope="module")
def emb(shards, tmp_path_factory):
    """A finished embed folder (random-init network: no run needed)."""
    out = tmp_path_factory.mktemp("emb") / "emb"
    run_embed(EmbedConfig(run=None, shards=shards, out=out, random_init=True, batch_size=16, num_workers=1,
                          progress=False))
    return out


@pytest.mark.slow
def test_embeddings_of_a_run_that_trained_further_are_refused_then_refreshed(cli, shards, half_trained, tmp_path):
    run, out = tmp_path / "run", tmp_path / "emb"
    shutil.copytree(half_trained, run)
    first = cli("embed", run, shards, "--out", out, *EMBED)
    assert first.code == 0 and f"embedded {N_CELLS} cells" in first.out, first.err
    assert json.loads((out / "embed.json").read_text())["model"]["checkpoint_step"] == 2
    again = cli("embed", run, shards, "--out", out, *EMBED)
    assert again.code == 0 and "nothing to do" in again.out and "cells/s" not in again.out

    train(training(shards, run, resume=True))  # the run trains on to step 4
    old = snapshot(out, shards)
    assert_refused(cli("embed", run, shards, "--out", out, *EMBED), "holds embeddings of other inputs or settings",
                   "model.checkpoint_step: 2 -> 4", "model.checkpoint_sha256", "pass --overwrite")
    assert snapshot(out, shards) == old

    refreshed = cli("embed", run, shards, "--out", out, *EMBED, "--overwrite")
    assert refreshed.code == 0, refreshed.err
    assert json.loads((out / "embed.json").read_text())["model"]["checkpoint_step"] == 4
    assert old[str(out / "embeddings.npy")] != snapshot(out / "embeddings.npy")[str(out / "embeddings.npy")]
    assert sorted(p.name for p in out.iterdir()) == ["cells.parquet", "embed.json", "embeddings.npy", "ids.npy"]


def test_embed_refuses_an_out_that_holds_shards(cli, shards, tmp_path):
    """embed writes a cells.parquet: into a shard folder it would replace the shards' cell table."""
    moved = tmp_path / "shards"
    shutil.copytree(shards, moved)
    before = snapshot(moved)
    assert_refused(cli("embed", "none", moved, "--random-init", "--out", moved, *EMBED), f"{moved}: holds shards")
    assert snapshot(moved) == before


def test_embed_refuses_shards_whose_channels_are_not_the_run_s(cli, half_trained, tmp_path):
    """A run trained on DNA, Tub, Act reads its first convolution's inputs in that order: shards of the same count in
    another order (or other stains) are refused, not embedded with each stain read as another. Its architecture
    freshly initialised (`--random-init`, a baseline) has no order to keep."""
    swapped = make_shards(tmp_path / "swapped", random_crops(N_CELLS, 3, 32, seed=3), ["Tub", "DNA", "Act"], 16)
    assert_refused(cli("embed", half_trained, swapped, "--out", tmp_path / "emb", *EMBED),
                   f"{swapped}: the shards' channels are Tub, DNA, Act", "trained on DNA, Tub, Act")
    assert not (tmp_path / "emb").exists()
    baseline = cli("embed", half_trained, swapped, "--out", tmp_path / "emb", "--random-init", *EMBED)
    assert baseline.code == 0, baseline.err


def test_embeddings_moved_with_their_run_and_shards_stay_fresh(cli, shards, half_trained, tmp_path):
    """A project folder (run, shards, embeddings) moved elsewhere: the embeddings are still those of the run's
    checkpoint and the shards (their SHA-256 say so), so the rerun has nothing to do."""
    for name, source in (("run", half_trained), ("shards", shards)):
        shutil.copytree(source, tmp_path / "a" / name)
    a = tmp_path / "a"
    assert cli("embed", a / "run", a / "shards", "--out", a / "emb", *EMBED).code == 0
    shutil.copytree(a, tmp_path / "b")
    b = tmp_path / "b"
    before = snapshot(b / "emb")
    again = cli("embed", b / "run", b / "shards", "--out", b / "emb", *EMBED)
    assert again.code == 0 and "nothing to do" in again.out, again.err
    assert snapshot(b / "emb") == before


def test_embeddings_of_remade_shards_are_refused(cli, shards, emb, tmp_path):
    moved, out = tmp_path / "shards", tmp_path / "emb"
    shutil.copytree(shards, moved)
    assert cli("embed", "none", moved, "--random-init", "--out", out, *EMBED).code == 0
    cells = pd.read_parquet(moved / "cells.parquet")
    cells.loc[0, "compound"] = "y"  # the shards' cell table was re-made
    cells.to_parquet(moved / "cells.parquet", index=False)
    before = snapshot(out, moved)
    assert_refused(cli("embed", "none", moved, "--random-init", "--out", out, *EMBED), "shards_sha256")
    assert snapshot(out, moved) == before


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--chunk-size", "0", "--chunk-size must be at least 1"),
    ("--workers", "-1", "--workers must be at least 0, got -1"),
    ("--crop", "0", "--crop must be at least 1"),
    ("--seed", "-3", "--seed must be at least 0"),
    ("--dtype", "float64", "--dtype must be one of float32, float16, got 'float64'"),
    ("--device", "tpu", "--device must be one of auto, cpu, cuda, got 'tpu'"),
    ("--precision", "fp8", "--precision must be one of auto, bf16, fp16, fp32"),
    ("--backend", "opencv", "--backend must be one of dali, torch"),
    ("--arch", "vit", "--arch must be one of resnet18, resnet34, resnet50"),
])
def test_bad_embed_option_is_named_as_typed(cli, shards, tmp_path, option, value, message):
    before = snapshot(shards)
    assert_refused(cli("embed", "none", shards, "--random-init", "--out", tmp_path / "emb", option, value), message)
    assert snapshot(shards) == before and not (tmp_path / "emb").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_embed_on_cuda_without_a_gpu(cli, shards, tmp_path):
    assert_refused(cli("embed", "none", shards, "--random-init", "--out", tmp_path / "emb", "--device", "cuda"),
                   "--device cuda: no CUDA GPU is visible", "--device cpu")
    assert not (tmp_path / "emb").exists()


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_embed_of_a_corrupt_crop_names_it_without_traceback(cli, shards, tmp_path, backend):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    damage_npy_header(bad / "train-000001.tar", 3)
    before = snapshot(bad)
    outcome = cli("embed", "none", bad, "--random-init", "--out", tmp_path / "emb", "--backend", backend, *EMBED)
    assert_refused(outcome, f"{bad / 'train-000001.tar'}: member 000000000019.npy is corrupt")
    assert "Original Traceback" not in outcome.err
    assert snapshot(bad) == before and not (tmp_path / "emb" / "embeddings.npy").exists()


def test_damaged_embed_json_is_named(cli, shards, emb, tmp_path):
    out = tmp_path / "emb"
    shutil.copytree(emb, out)
    (out / "embed.json").write_text("{")
    before = snapshot(out)
    assert_refused(cli("embed", "none", shards, "--random-init", "--out", out, *EMBED), "embed.json: unreadable")
    assert snapshot(out) == before


@pytest.mark.parametrize("verb", ["embed", "eval", "compare"])
def test_out_that_is_a_file_is_refused(cli, shards, emb, tmp_path, verb):
    out = tmp_path / "out.txt"
    out.write_text("mine")
    args = {"embed": ["embed", "none", shards, "--random-init", *EMBED], "eval": ["eval", emb],
            "compare": ["compare", f"a={tmp_path}"]}[verb]
    before = snapshot(tmp_path, emb, shards)
    assert_refused(cli(*args, "--out", out), f"{out}: exists and is not a folder")
    assert snapshot(tmp_path, emb, shards) == before


@pytest.mark.parametrize("verb", ["embed", "eval", "compare"])
def test_out_below_a_file_is_refused_before_the_work(cli, shards, emb, tmp_path, verb):
    """The check `shard` and `synth` make (fastcell.io), before anything is computed."""
    blocker = tmp_path / "taken"
    blocker.write_text("mine")
    out = blocker / "out"
    args = {"embed": ["embed", "none", shards, "--random-init", *EMBED], "eval": ["eval", emb],
            "compare": ["compare", f"a={tmp_path}"]}[verb]
    before = snapshot(tmp_path, emb, shards)
    assert_refused(cli(*args, "--out", out), f"{out}: cannot make the folder: {blocker} is a file")
    assert snapshot(tmp_path, emb, shards) == before


@pytest.mark.parametrize(("change", "message"), [
    (lambda cells: cells.iloc[::-1], f"{N_CELLS} of {N_CELLS} differ from ids.npy"),
    (lambda cells: cells.iloc[[1, 0, *range(2, N_CELLS)]], f"2 of {N_CELLS} differ from ids.npy"),
    (lambda cells: cells.iloc[1:], f"{N_CELLS} of {N_CELLS} differ"),
    (lambda cells: cells.drop(columns="id"), "no 'id' column"),
])
def test_cells_table_out_of_step_with_the_embeddings_is_refused(cli, emb, tmp_path, change, message):
    out = tmp_path / "emb"
    shutil.copytree(emb, out)
    change(pd.read_parquet(out / "cells.parquet")).to_parquet(out / "cells.parquet", index=False)
    before = snapshot(out)
    assert_refused(cli("eval", out, "--post", "none"), f"{out / 'cells.parquet'}: ", message)
    assert snapshot(out) == before


def test_report_records_the_embed_folders_inputs(emb):
    """What eval writes into report.json as `inputs`: the embed folder's recorded model and shards, its ids."""
    from fastcell.evaluate.embed import input_identity

    spec = json.loads((emb / "embed.json").read_text())["spec"]
    identity = input_identity(emb)
    assert identity["model"] == spec["model"] and identity["shards_sha256"] == spec["shards_sha256"]
    assert identity["ids_sha256"] == hashlib.sha256((emb / "ids.npy").read_bytes()).hexdigest()


@pytest.mark.parametrize(("files", "message"), [
    ([], "a folder without embeddings.npy and cells.parquet"),
    (["cells.parquet"], "a folder without embeddings.npy; eval reads a `fastcell embed` output folder"),
])
def test_eval_of_a_folder_says_what_it_expects(cli, emb, tmp_path, files, message):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in files:
        shutil.copy(emb / name, folder / name)
    assert_refused(cli("eval", folder), f"{folder}: {message}")


@pytest.mark.parametrize(("args", "message"), [
    (["--features", "Intensity_[", "--post", "none"], "--features 'Intensity_[': not a valid regular expression"),
    (["--queries-per-treatment", "0"], "--queries-per-treatment must be at least 1, got 0"),
    (["--k", "0"], "--k must be at least 1, got 0"),
    (["--coral-reg", "-1"], "--coral-reg must be at least 0"),
    (["--alpha", "1"], "--alpha must be in (0, 1), got 1.0"),
    (["--null-size", "0"], "--null-size must be at least 1"),
])
def test_bad_eval_option_is_named(cli, tmp_path, args, message):
    table = tmp_path / "wells.csv"
    pd.DataFrame({"plate": ["Week1_22123"], "well": ["D03"], "Intensity_DNA": [1.0]}).to_csv(table, index=False)
    before = snapshot(tmp_path)
    assert_refused(cli("eval", table, *args), message)
    assert snapshot(tmp_path) == before


def write_report(folder, nscb=0.5, drop=0.1):
    """A report folder as `fastcell eval --out` writes it (report.json and per_moa.csv)."""
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(
        {"nsc": 0.6, "nscb": nscb, "drop": drop, "n_nsc": 3, "n_nscb": 0 if nscb is None else 3, "level": "treatment",
         "post": "tvn"}))
    pd.DataFrame({"moa": ["a", "b"], "nsc": [0.5, 0.7], "nscb": [nscb, nscb]}).to_csv(folder / "per_moa.csv", index=False)
    return folder


def test_compare_of_single_batch_reports_shows_na(cli, tmp_path):
    one, two = write_report(tmp_path / "one", None, None), write_report(tmp_path / "two", None, None)
    outcome = cli("compare", f"simclr={one}", f"random={two}", "--out", tmp_path / "cmp")
    assert outcome.code == 0, outcome.err
    assert "simclr" in outcome.out and "n/a" in outcome.out
    assert "| simclr | tvn | 60.0 | n/a | n/a |" in (tmp_path / "cmp" / "comparison.md").read_text()


@pytest.mark.parametrize(("names", "message"), [
    (["x=one", "x=two"], "report name(s) x given more than once"),
    (["one", "sub/one"], "report name(s) one given more than once"),
    (["one", "missing"], "report.json: no report"),
])
def test_compare_refuses_ambiguous_or_missing_reports(cli, tmp_path, names, message):
    write_report(tmp_path / "one")
    write_report(tmp_path / "two")
    write_report(tmp_path / "sub" / "one")
    before = snapshot(tmp_path)
    args = [n.replace("=", f"={tmp_path}/") if "=" in n else tmp_path / n for n in names]
    assert_refused(cli("compare", *args, "--out", tmp_path / "cmp"), message)
    assert snapshot(tmp_path) == before and not (tmp_path / "cmp").exists()


def test_out_that_is_a_dangling_link_is_refused_before_the_work(cli, shards, tmp_path):
    """A link to nothing is no folder either (Path.exists follows links and says False)."""
    out = tmp_path / "link"
    out.symlink_to(tmp_path / "nowhere")
    before = snapshot(tmp_path, shards)
    assert_refused(cli("embed", "none", shards, "--random-init", *EMBED, "--out", out), f"{out}: exists and is not a folder")
    assert snapshot(tmp_path, shards) == before
