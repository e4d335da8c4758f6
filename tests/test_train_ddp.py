"""DDP on CPU: two gloo processes (torchrun's environment variables) train in step on disjoint samples.

The ranks read real shards through the DALI loader's shard splitting.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from shard_fixtures import make_shards, random_crops

from fastcell.train.config import TrainConfig
from fastcell.train.model import create_model
from fastcell.train.trainer import shard_loader, train

CELLS, BATCH = 64, 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, shards: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    seen: list[torch.Tensor] = []

    def recording_loader(config, env):
        loader = shard_loader(config, env)
        iterate = loader.__iter__

        class Recording:  # the loader contract, remembering the ids this rank was given
            channels, crop_size = loader.channels, loader.crop_size
            set_epoch = staticmethod(loader.set_epoch)

            def __len__(self):
                return len(loader)

            def __iter__(self):
                for v1, v2, ids in iterate():
                    seen.append(ids.cpu())
                    yield v1, v2, ids

        return Recording()

    cfg = TrainConfig(shards=[shards], out=f"{out_dir}/run", batch_size=BATCH, epochs=1, precision="fp32",
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
