"""NT-Xent, SimCLR's contrastive loss, with negatives gathered from every DDP rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns each rank the summed gradient of its slice.

    Every rank's loss depends on every rank's embeddings, so the gradient of a rank's local
    embeddings is the sum over ranks of the gradients flowing into its slice of the gathered
    tensor: an all_reduce of the gathered gradient, then this rank's slice. (All ranks must
    hold the same batch size; the training loaders drop the last partial batch.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(x from every rank concatenated, offset of this rank's rows); (x, 0) outside DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross-entropy (SimCLR, Chen et al. 2020).

    For projections z1, z2 [B, D] of two views of the same B cells, each of the 2B embeddings
    is an anchor whose positive is the other view of its cell and whose negatives are the
    other 2N - 2 embeddings of the global batch (N = B x world size; under DDP they are
    gathered from every rank with gradients). With cosine similarities s and temperature t:

        loss = mean over anchors i of  -log( exp(s(i, pos(i)) / t) / sum_{k != i} exp(s(i, k) / t) )

    Computed in float32 whatever the autocast precision. Each rank averages over its own 2B
    anchors; DDP's gradient averaging then gives exactly the loss and gradients of one process
    holding the whole global batch.
    """

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z1 = F.normalize(z1.float(), dim=1)
        z2 = F.normalize(z2.float(), dim=1)
        all1, offset = gather_with_grad(z1)
        all2, _ = gather_with_grad(z2)
        batch, n = z1.shape[0], all1.shape[0]
        anchors = torch.cat([z1, z2])
        logits = anchors @ torch.cat([all1, all2]).T / self.temperature  # [2B, 2N]
        local = torch.arange(batch, device=z1.device) + offset
        self_idx = torch.cat([local, local + n])
        positive_idx = torch.cat([local + n, local])
        logits = logits.scatter(1, self_idx[:, None], float("-inf"))  # an anchor is not its own negative
        return F.cross_entropy(logits, positive_idx)
