"""DDP on CPU: two gloo processes (torchrun's environment variables) train in step on disjoint samples.

The ranks read real shards through the DALI loader's shard splitting.
"""

from __future__ import annotations

import csv
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fastcell.testing import make_shards, random_crops
from fastcell.train import trainer
from fastcell.train.config import TrainConfig
from fastcell.train.model import create_model
from fastcell.train.trainer import shard_loader, train

CELLS, BATCH = 64, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    """Be rank `rank` of `world` as torchrun would set it up (the trainer starts the gloo group)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _rank_main(rank: int, world: int, port: int, shards: str, out_dir: str) -> None:
    _join(rank, world, port)
    seen: list[torch.Tensor] = []

    def recording_loader(config, env):
        loader = shard_loader(config, env)
        iterate = loader.__iter__

        class Recording:  # the loader contract, remembering the ids this rank was given
            channels, image_size = loader.channels, loader.image_size
            set_epoch = staticmethod(loader.set_epoch)

            def __len__(self):
                return len(loader)

            def __iter__(self):
                for v1, v2, ids in iterate():
                    seen.append(ids.cpu())
                    yield v1, v2, ids

        return Recording()

    cfg = TrainConfig(shards=shards, out=f"{out_dir}/run", batch_size=BATCH, epochs=1, precision="fp32",
                      checkpoint_every=100, num_workers=1, progress=False, tensorboard=False)
    result = train(cfg, recording_loader)
    weights = {n: p.detach() for n, p in result.model.named_parameters()}
    torch.save({"model": weights, "ids": torch.cat(seen)}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_two_ranks_stay_in_step_on_disjoint_samples(tmp_path):
    world = 2
    shards = make_shards(tmp_path / "shards", random_crops(CELLS, 3, 32, seed=6), shard_size=16)
    mp.spawn(_rank_main, args=(world, _free_port(), str(shards), str(tmp_path)), nprocs=world)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(world))
    ids0, ids1 = set(r0["ids"].tolist()), set(r1["ids"].tolist())
    assert len(ids0) == len(ids1) == CELLS // world  # each rank: 4 batches of 8 distinct cells
    assert not ids0 & ids1
    for name, w0 in r0["model"].items():
        # identical after every optimiser step (BatchNorm running statistics, buffers, stay per rank:
        # DDP broadcasts rank 0's at each forward and rank 0 writes the checkpoint)
        assert torch.equal(w0, r1["model"][name]), name
    torch.manual_seed(0)  # the trainer's initialisation (seed 0), for contrast: training moved the weights
    initial = create_model(TrainConfig(channels=["a", "b", "c"])).state_dict()
    name = "encoder.layer1.0.conv1.weight"
    assert not torch.equal(initial[name], r0["model"][name])
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


class CellViews:
    """The loader contract over CELLS fixed synthetic cells: each step's global batch (batch x world cells of
    an epoch's permutation) is split between the ranks, and a cell's two views depend on (epoch, cell) only,
    so 2 processes at batch B see, step by step, the cells and views 1 process sees at batch 2B."""

    channels, image_size = ["a", "b", "c"], 32

    def __init__(self, config, env):
        self.batch, self.rank, self.world, self.epoch, self.start = config.batch_size, env.rank, env.world_size, 0, 0
        self.cells = torch.randn((CELLS, 3, 32, 32), generator=torch.Generator().manual_seed(1))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return CELLS // (self.batch * self.world)

    def view(self, ids: torch.Tensor, which: int) -> torch.Tensor:
        noise = [torch.randn((3, 32, 32), generator=torch.Generator().manual_seed(self.epoch * 10**6 + int(i) * 2 + which))
                 for i in ids]
        return self.cells[ids] + 0.5 * torch.stack(noise)

    def __iter__(self):
        order = torch.randperm(CELLS, generator=torch.Generator().manual_seed(self.epoch))
        for ids in order.view(len(self), self.world, self.batch)[self.start :, self.rank]:
            yield self.view(ids, 0), self.view(ids, 1), ids


def _without_batchnorm(config):
    """The trainer's model with every BatchNorm an identity: BatchNorm's statistics are per rank (a rank's 16
    views, not the global 32), the one thing that may differ between 2 processes and 1 at twice the batch."""
    model = create_model(config)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, nn.Identity())
    return model


def _cell_views_run(out_dir: str, batch_size: int) -> dict[str, torch.Tensor]:
    """Train 2 epochs on CellViews at this per-process batch, without BatchNorm; the weights."""
    cfg = TrainConfig(out=out_dir, batch_size=batch_size, epochs=2, precision="fp32", checkpoint_every=100,
                      log_every=1, progress=False, tensorboard=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "create_model", _without_batchnorm)
        result = train(cfg, CellViews)
    return {n: p.detach().clone() for n, p in result.model.named_parameters()}


def _cell_views_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    _join(rank, world, port)
    weights = _cell_views_run(f"{out_dir}/run", BATCH)
    if rank == 0:
        torch.save(weights, f"{out_dir}/weights.pt")


@pytest.mark.slow
def test_two_ranks_train_like_one_process_at_twice_the_batch(tmp_path):
    """Negatives gathered from both ranks, gradients averaged, the learning rate scaled with the global batch
    (base_lr x batch x GPUs / 256): 2 processes at batch 8 take the steps 1 process takes at batch 16
    (the same cells and views; without BatchNorm, whose statistics are per rank by design)."""
    mp.spawn(_cell_views_rank, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2)
    two = torch.load(tmp_path / "two" / "weights.pt")
    torch.set_num_threads(1)
    one = _cell_views_run(str(tmp_path / "one" / "run"), 2 * BATCH)
    rows = {name: list(csv.DictReader(open(tmp_path / name / "run" / "metrics.csv"))) for name in ("one", "two")}
    assert len(rows["one"]) == 2 * CELLS // (2 * BATCH)
    assert [r["lr"] for r in rows["two"]] == [r["lr"] for r in rows["one"]]  # the same rate at every step
    np.testing.assert_allclose([float(r["loss"]) for r in rows["two"]], [float(r["loss"]) for r in rows["one"]],
                               rtol=1e-4)
    torch.manual_seed(0)  # the trainer's initialisation: how far the runs moved the weights, and apart
    initial = dict(_without_batchnorm(TrainConfig(channels=CellViews.channels)).named_parameters())
    moved = torch.cat([(one[n] - initial[n]).flatten() for n in one])
    apart = torch.cat([(two[n] - one[n]).flatten() for n in one])
    assert apart.norm() < 1e-3 * moved.norm()
