"""`fastcell embed`: ids and rows stay together, chunks resume, and the real eval loader plugs in."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from fastcell.errors import InputError
from fastcell.evaluate.embed import EmbedConfig, embed_cells, load_network, run_embed
from fastcell.evaluate.pipeline import EvalConfig, run_eval
from fastcell.format.folder import read_manifest
from fastcell.loaders import create_eval_loader
from fastcell.testing import make_shards, random_crops

torch.set_num_threads(1)
N_CELLS, CHANNELS, SIZE = 46, 3, 32


def image_of(cell_id):
    """A deterministic image per id, so a row can be checked against its own cell."""
    g = torch.Generator().manual_seed(int(cell_id))
    return torch.randn(CHANNELS, SIZE, SIZE, generator=g)


class FakeLoader:
    """Stands in for create_eval_loader: a fixed shuffled order of ids; can fail after some batches."""

    def __init__(self, ids, batch_size, fail_after=None):
        self.ids, self.batch_size, self.fail_after = ids, batch_size, fail_after

    def __iter__(self):
        for b, start in enumerate(range(0, len(self.ids), self.batch_size)):
            if self.fail_after is not None and b == self.fail_after:
                raise KeyboardInterrupt("simulated interruption")
            ids = torch.as_tensor(self.ids[start : start + self.batch_size])
            yield torch.stack([image_of(i) for i in ids]), ids


def tiny_encoder():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=1)
    net.fc = torch.nn.Identity()
    return net.eval()


def test_embed_cells_keeps_ids_with_their_features():
    encoder = tiny_encoder()
    order = np.random.default_rng(0).permutation(20)
    out = list(embed_cells(encoder, FakeLoader(order, 6), device=torch.device("cpu")))
    ids = np.concatenate([i for i, _ in out])
    features = np.concatenate([f for _, f in out])
    assert ids.tolist() == order.tolist() and features.shape == (20, 512)
    with torch.inference_mode():
        direct = encoder(torch.stack([image_of(i) for i in ids])).numpy()
    assert np.allclose(features, direct, atol=1e-4)
    # bf16 autocast stays close to fp32
    bf16 = np.concatenate([f for _, f in embed_cells(encoder, FakeLoader(order, 6), device=torch.device("cpu"),
                                                      autocast_dtype=torch.bfloat16)])
    cos = (bf16 * direct).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(direct, axis=1)
    assert cos.min() > 0.99


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Real shards of N_CELLS crops, with a cells table on real BBBC021 wells."""
    order = np.random.default_rng(2).permutation(N_CELLS)  # written interleaved, as `fastcell shard` does
    root = make_shards(tmp_path_factory.mktemp("shards"), random_crops(N_CELLS, CHANNELS, SIZE), shard_size=10,
                       order=order)
    rng = np.random.default_rng(0)
    wells = [("Week1_22123", "D03"), ("Week1_22123", "B02"), ("Week2_24121", "C05")]
    pick = rng.integers(0, len(wells), N_CELLS)
    cells = pd.DataFrame({
        "id": np.arange(N_CELLS, dtype=np.int64), "split": "train", "shard": "train-000000.tar",
        "plate": [wells[i][0] for i in pick], "well": [wells[i][1] for i in pick], "site": 1, "batch": "Week1",
        "compound": "x", "concentration": 0.0, "moa": "", "x": 1.0, "y": 2.0, "image": "a.tif",
    })
    cells.sample(frac=1, random_state=1).to_parquet(root / "cells.parquet", index=False)  # unsorted on disk
    return root


def fake_factory(fail_after=None, calls=None):
    order = np.random.default_rng(3).permutation(N_CELLS)

    def factory(shard_dir, batch_size, **kwargs):
        if calls is not None:
            calls.append(kwargs)
        return FakeLoader(order, batch_size, fail_after)
    return factory


def config(shard_dir, out, **changes):
    base = dict(run=None, shards=shard_dir, out=out, random_init=True, stem="small", batch_size=8,
                precision="fp32", chunk_size=12, progress=False)
    return EmbedConfig(**(base | changes))


def test_the_shards_are_read_once_and_hashed_from_those_bytes(shard_dir, tmp_path, opened, monkeypatch):
    """index.json and cells.parquet are each read once (by open, or by a parquet reader given the path):
    shards_sha256 is of the bytes parsed, the same digest as of the two files."""
    from fastcell.io import sha256_of

    files = [shard_dir / "index.json", shard_dir / "cells.parquet"]
    real = pd.read_parquet
    monkeypatch.setattr(pd, "read_parquet", lambda source, *args, **kwargs: opened.append(str(source))
                        or real(source, *args, **kwargs))  # fmt: skip
    start = len(opened)
    info = run_embed(config(shard_dir, tmp_path / "emb"), fake_factory())
    assert [opened[start:].count(str(f)) for f in files] == [1, 1]
    assert info["spec"]["shards_sha256"] == sha256_of(files)


def test_rows_follow_the_cells_table_and_match_their_own_cell(shard_dir, tmp_path):
    calls = []
    info = run_embed(config(shard_dir, tmp_path / "emb"), fake_factory(calls=calls))
    emb = np.load(tmp_path / "emb" / "embeddings.npy")
    cells = pd.read_parquet(tmp_path / "emb" / "cells.parquet")
    assert emb.shape == (N_CELLS, 512) and emb.dtype == np.float32
    assert cells["id"].tolist() == list(range(N_CELLS))
    assert set(cells.columns) >= {"plate", "well", "site", "batch", "compound", "moa"}
    # random_init, seed 0: the same network
    model, _ = load_network(config(shard_dir, tmp_path), read_manifest(shard_dir).channels)
    with torch.inference_mode():
        expected = model.encoder(torch.stack([image_of(i) for i in cells["id"][:5]])).numpy()
    assert np.allclose(emb[:5], expected, atol=1e-4)
    assert info["n_cells"] == N_CELLS and info["model"]["trained"] is False
    assert json.loads((tmp_path / "emb" / "embed.json").read_text())["dim"] == 512
    assert not (tmp_path / "emb" / "chunks").exists()
    assert calls[0]["split"] is None and calls[0]["dtype"] == torch.float32


def test_interrupted_run_resumes_from_complete_chunks(shard_dir, tmp_path):
    full = run_embed(config(shard_dir, tmp_path / "full"), fake_factory())
    with pytest.raises(KeyboardInterrupt):
        run_embed(config(shard_dir, tmp_path / "resumed"), fake_factory(fail_after=4))  # 32 rows: 2 chunks
    chunks = sorted(p.name for p in (tmp_path / "resumed" / "chunks").glob("part-*.ids.npy"))
    assert chunks == ["part-00000.ids.npy", "part-00001.ids.npy"]
    resumed = run_embed(config(shard_dir, tmp_path / "resumed"), fake_factory())
    assert resumed["cells_embedded_this_run"] == N_CELLS - 24 and full["cells_embedded_this_run"] == N_CELLS
    assert np.array_equal(np.load(tmp_path / "full" / "embeddings.npy"),
                          np.load(tmp_path / "resumed" / "embeddings.npy"))
    again = run_embed(config(shard_dir, tmp_path / "resumed"), fake_factory(fail_after=0))  # finished: no loading
    assert again["cells_embedded_this_run"] == 0 and again["n_cells"] == N_CELLS


@pytest.mark.parametrize("damaged", ["part-00000.npy", "part-00000.ids.npy"])
def test_a_damaged_chunk_is_computed_again(shard_dir, tmp_path, damaged):
    """A chunk whose features or ids file was cut short is computed again on the rerun, with those after it, instead
    of failing to load on every rerun."""
    full = run_embed(config(shard_dir, tmp_path / "full"), fake_factory())
    with pytest.raises(KeyboardInterrupt):
        run_embed(config(shard_dir, tmp_path / "resumed"), fake_factory(fail_after=4))  # chunks 0 and 1 complete
    chunks = tmp_path / "resumed" / "chunks"
    (chunks / damaged).write_bytes((chunks / damaged).read_bytes()[:140])  # its header and a few values
    resumed = run_embed(config(shard_dir, tmp_path / "resumed"), fake_factory())
    assert resumed["cells_embedded_this_run"] == full["cells_embedded_this_run"] == N_CELLS
    assert np.array_equal(np.load(tmp_path / "full" / "embeddings.npy"),
                          np.load(tmp_path / "resumed" / "embeddings.npy"))


def test_changed_settings_refuse_old_chunks(shard_dir, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_embed(config(shard_dir, tmp_path / "emb"), fake_factory(fail_after=3))
    with pytest.raises(InputError, match=r"other inputs or settings \(projection: False -> True\)"):
        run_embed(config(shard_dir, tmp_path / "emb", projection=True), fake_factory())
    info = run_embed(config(shard_dir, tmp_path / "emb", projection=True, overwrite=True, dtype="float16"),
                     fake_factory())
    assert info["dim"] == 128 and np.load(tmp_path / "emb" / "embeddings.npy").dtype == np.float16


def test_handcrafted_features_embed_through_the_same_path(shard_dir, tmp_path):
    from fastcell.evaluate.handcrafted import FEATURES_PER_CHANNEL, handcrafted_features

    info = run_embed(config(shard_dir, tmp_path / "hand", handcrafted=True, random_init=False), fake_factory())
    emb = np.load(tmp_path / "hand" / "embeddings.npy")
    ids = pd.read_parquet(tmp_path / "hand" / "cells.parquet")["id"][:4]
    expected = handcrafted_features(torch.stack([image_of(i) for i in ids])).numpy()
    assert emb.shape == (N_CELLS, CHANNELS * len(FEATURES_PER_CHANNEL))
    assert np.allclose(emb[:4], expected, atol=1e-5)
    assert info["features"] == "handcrafted" and len(info["model"]["handcrafted"]) == emb.shape[1]


def test_loader_that_misses_cells_is_an_error(shard_dir, tmp_path):
    def short(shard_dir, batch_size, **kwargs):
        return FakeLoader(np.arange(N_CELLS - 3), batch_size)
    with pytest.raises(InputError, match="yielded 43 cells"):
        run_embed(config(shard_dir, tmp_path / "emb"), short)


def test_real_eval_loader_and_eval_on_the_output(shard_dir, tmp_path):
    """Through DALI's eval loader, which reads the cells in shard order (not by id): row i of the output is
    the network's embedding of the crop stored under the id in row i of cells.parquet."""
    read = np.concatenate([ids.numpy() for _, ids in create_eval_loader(shard_dir, 8, device="cpu", num_workers=1)])
    assert sorted(read) == list(range(N_CELLS)) and list(read) != sorted(read)
    info = run_embed(config(shard_dir, tmp_path / "emb", backend="dali", num_workers=1))
    assert info["n_cells"] == N_CELLS
    emb = np.load(tmp_path / "emb" / "embeddings.npy")
    ids = pd.read_parquet(tmp_path / "emb" / "cells.parquet")["id"].to_numpy()
    crops = random_crops(N_CELLS, CHANNELS, SIZE)[ids].astype(np.float64)
    stats = json.loads((shard_dir / "index.json").read_text())["channel_stats"]
    mean, std = (np.asarray(stats[k]).reshape(1, CHANNELS, 1, 1) for k in ("mean", "std"))
    # random_init, seed 0: the same network
    model, _ = load_network(config(shard_dir, tmp_path), read_manifest(shard_dir).channels)
    with torch.inference_mode():
        expected = model.encoder(torch.from_numpy((crops - mean) / std).float()).numpy()
    np.testing.assert_allclose(emb, expected, rtol=1e-3, atol=1e-3)
    # eval reads the folder and joins it to the BBBC021 design, which names these wells' real compounds
    with pytest.raises(InputError, match="disagree with the image table on compound.*does not match"):
        run_eval(EvalConfig(source=tmp_path / "emb", post="none"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_gpu_mixed_precision_matches_cpu_fp32():
    encoder = tiny_encoder()
    order = np.arange(24)
    cpu = np.concatenate([f for _, f in embed_cells(encoder, FakeLoader(order, 8), device=torch.device("cpu"))])
    gpu_encoder = tiny_encoder().cuda().to(memory_format=torch.channels_last)
    gpu = np.concatenate([f for _, f in embed_cells(gpu_encoder, FakeLoader(order, 8), device=torch.device("cuda"),
                                                     autocast_dtype=torch.bfloat16)])
    cos = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cos.min() > 0.99
