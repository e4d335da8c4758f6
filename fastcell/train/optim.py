"""Optimisers and the learning-rate schedule of SimCLR training.

- Parameters split in two groups: weights of convolutions and linear layers (decayed, and
  adapted by LARS) and 1-D parameters, i.e. biases and normalisation weights (neither).
- LARS (You et al. 2017, as in SimCLR) or AdamW (torch's fused kernel). Neither reads a device value to
  the host inside a step: a GPU's queue never waits on the CPU.
- Learning rate = base_lr x global_batch / 256; linear warm-up from 0, then cosine decay to 0.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule: `base_lr` is the learning rate of a global batch of 256."""
    return base_lr * global_batch / 256


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights of conv/linear layers (decay, LARS adaptation) vs biases and norm weights (neither)."""
    adapted, excluded = [], []
    for p in model.parameters():
        if p.requires_grad:
            (adapted if p.ndim > 1 else excluded).append(p)
    return [
        {"params": adapted, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (LARS).

    For each parameter p with gradient g in a group not marked `lars_exclude`:
        g <- g + weight_decay * p
        g <- g * eta * ||p|| / ||g||   (when both norms are positive)
    then v <- momentum * v + g and p <- p - lr * v. Excluded groups (biases, norm weights)
    take plain SGD with momentum, without weight decay or trust ratio.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 1e-3):
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta, "lars_exclude": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient, a few multi-tensor (`_foreach`) kernels per group
        rather than several kernels per parameter: a ResNet-50 has 161 parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if not group["lars_exclude"]:
                if group["weight_decay"]:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                p_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                trust = torch.where((p_norm > 0) & (g_norm > 0), group["eta"] * p_norm / g_norm, 1.0)
                grads = torch._foreach_mul(grads, list(trust.unbind()))
            torch._foreach_add_(params, self._momentum(params, grads, group["momentum"]), alpha=-group["lr"])
        return loss

    def _momentum(self, params: list, grads: list, momentum: float) -> list:
        """The momentum buffers after `v <- momentum * v + g` (a new buffer starts as g)."""
        buffers, old_buffers, old_grads = [], [], []
        for p, g in zip(params, grads, strict=True):
            state = self.state[p]
            if "momentum_buffer" in state:
                old_buffers.append(state["momentum_buffer"])
                old_grads.append(g)
            else:
                state["momentum_buffer"] = g.clone()
            buffers.append(state["momentum_buffer"])
        if old_buffers:
            torch._foreach_mul_(old_buffers, momentum)
            torch._foreach_add_(old_buffers, old_grads)
        return buffers


def create_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        for g in groups:
            g.pop("lars_exclude")
        # fused: fewer kernels per step and no per-parameter host work (the foreach and for-loop versions
        # keep step counts as CPU tensors and work out each bias correction on the host: no device sync,
        # but host time per parameter); under a GradScaler the inf check happens in the kernel
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    raise ValueError(f"unknown optimizer {name!r}")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear ramp, then half a cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def create_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Per-step LambdaLR following `warmup_cosine` (its state holds only the step count)."""
    return LambdaLR(optimizer, partial(warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps))
