"""NT-Xent against a NumPy reference, and its DDP form (2 gloo processes) against one process."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastcell.train.loss import NTXentLoss


def ntxent_numpy(z1: np.ndarray, z2: np.ndarray, t: float) -> float:
    """Textbook NT-Xent: 2N anchors, positive = other view, denominator = all but self."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    sim = z @ z.T / t
    losses = []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        others = [k for k in range(2 * n) if k != i]
        losses.append(-sim[i, pos] + np.log(np.exp(sim[i, others]).sum()))
    return float(np.mean(losses))


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_ntxent_matches_numpy(t):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    got = NTXentLoss(t)(z1, z2).item()
    assert got == pytest.approx(ntxent_numpy(z1.numpy(), z2.numpy(), t), rel=1e-5)


def test_ntxent_prefers_matching_views():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(8, 16, generator=g)
    aligned = NTXentLoss(0.2)(z, z + 0.01 * torch.randn(8, 16, generator=g))
    shuffled = NTXentLoss(0.2)(z, z[torch.randperm(8, generator=g)])
    assert aligned < shuffled


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(seed: int, batch: int):
    """A small linear projector and two views of a global batch, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    x1, x2 = torch.randn(batch, 6, generator=g), torch.randn(batch, 6, generator=g)
    torch.manual_seed(seed)
    head = torch.nn.Linear(6, 4)
    return head, x1, x2


def _ddp_worker(rank: int, world: int, port: int, batch: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    head, x1, x2 = _problem(0, batch * world)
    part = slice(rank * batch, (rank + 1) * batch)
    loss = NTXentLoss(0.3)(head(x1[part]), head(x2[part]))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in head.parameters()])
    dist.all_reduce(grads)  # what DDP does: average the gradients over ranks
    grads /= world
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    if rank == 0:
        torch.save({"loss": mean_loss, "grads": grads}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_loss_equals_single_process(tmp_path):
    """World size 2 x batch B gives the loss and gradients of 1 process x batch 2B."""
    batch, world = 5, 2
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(world, _free_port(), batch, out), nprocs=world, join=True)
    ddp = torch.load(out)

    head, x1, x2 = _problem(0, batch * world)
    loss = NTXentLoss(0.3)(head(x1), head(x2))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in head.parameters()])

    assert ddp["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(ddp["grads"], grads, rtol=1e-5, atol=1e-7)
    # Without the gather each rank would see only its own negatives: a different loss.
    local_only = NTXentLoss(0.3)(head(x1[:batch]), head(x2[:batch])).item()
    assert abs(local_only - loss.item()) > 1e-3
