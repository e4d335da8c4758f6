"""LARS (exclusions, update rule), parameter groups, learning-rate scaling and schedule shape."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fastcell.train.optim import LARS, create_optimizer, param_groups, scaled_lr, warmup_cosine


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_param_groups_exclude_biases_and_norm_weights():
    net = _net()
    adapted, excluded = param_groups(net, weight_decay=0.1)
    assert {id(p) for p in adapted["params"]} == {id(net[0].weight), id(net[3].weight)}
    assert {id(p) for p in excluded["params"]} == {
        id(net[0].bias), id(net[1].weight), id(net[1].bias), id(net[3].bias)
    }
    assert adapted["weight_decay"] == 0.1 and not adapted["lars_exclude"]
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"]


def test_lars_update_rule_and_exclusions():
    net = _net()
    lr, wd, eta, momentum = 0.5, 0.01, 0.002, 0.9
    opt = LARS(param_groups(net, wd), lr=lr, momentum=momentum, eta=eta)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net(torch.randn(2, 2, 6, 6)).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.step()
    for name, p in net.named_parameters():
        w, g = before[name], grads[name]
        if p.ndim > 1:  # adapted: weight decay, then trust ratio eta * |w| / |g|
            g = g + wd * w
            g = g * eta * w.norm() / g.norm()
        torch.testing.assert_close(p.detach(), w - lr * g, msg=name)
    # second step: momentum accumulates
    buf = {n: opt.state[p]["momentum_buffer"].clone() for n, p in net.named_parameters()}
    opt.zero_grad()
    net(torch.randn(2, 2, 6, 6)).sum().backward()
    bias = net[3].bias
    expected = bias.detach() - lr * (momentum * buf["3.bias"] + bias.grad)
    opt.step()
    torch.testing.assert_close(bias.detach(), expected)


def test_lars_leaves_zero_weights_to_plain_sgd():
    w = nn.Parameter(torch.zeros(3, 3))
    opt = LARS([{"params": [w], "weight_decay": 0.0, "lars_exclude": False}], lr=1.0, momentum=0.0)
    w.grad = torch.ones(3, 3)
    opt.step()
    torch.testing.assert_close(w.detach(), -torch.ones(3, 3))


def test_adamw_decays_only_matrices():
    opt = create_optimizer(_net(), "adamw", lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_lr_scales_with_global_batch():
    assert scaled_lr(0.3, 256) == pytest.approx(0.3)
    assert scaled_lr(0.3, 4096) == pytest.approx(4.8)


def test_warmup_then_cosine_shape():
    total, warm = 100, 10
    curve = [warmup_cosine(s, warm, total) for s in range(total)]
    assert curve[0] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(curve[:warm], curve[1:warm], strict=False))  # linear ramp up
    assert curve[warm - 1] == pytest.approx(1.0) and curve[warm] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(curve[warm:], curve[warm + 1 :], strict=False))  # then decreasing
    mid = warm + (total - warm) // 2
    assert curve[mid] == pytest.approx(0.5, abs=1e-9)  # half-way through the decay: cos(pi/2)
    assert warmup_cosine(total, warm, total) == pytest.approx(0.0)
    assert curve[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * (total - 1 - warm) / (total - warm))))


def test_lars_matches_a_per_parameter_loop_over_several_steps():
    """The multi-tensor LARS against the update rule written one parameter at a time (weight decay,
    trust ratio, momentum; excluded group plain SGD with momentum), three steps, a parameter without grad."""
    net = _net()
    frozen = nn.Parameter(torch.ones(2, 2))  # never gets a gradient: must stay untouched
    groups = param_groups(net, 0.01)
    groups[0]["params"].append(frozen)
    lr, eta, momentum = 0.3, 0.002, 0.9
    opt = LARS(groups, lr=lr, momentum=momentum, eta=eta)
    weights = {id(p): p.detach().clone() for g in groups for p in g["params"]}
    buffers: dict = {}
    torch.manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 2, 6, 6)).pow(2).sum().backward()
        for group in groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                w, g = weights[id(p)], p.grad.clone()
                if not group["lars_exclude"]:
                    g = g + 0.01 * w
                    g = g * (eta * w.norm() / g.norm())
                buffers[id(p)] = momentum * buffers[id(p)] + g if id(p) in buffers else g
                weights[id(p)] = w - lr * buffers[id(p)]
        opt.step()
    for group in groups:
        for p in group["params"]:
            torch.testing.assert_close(p.detach(), weights[id(p)], rtol=1e-5, atol=1e-6)
    assert torch.equal(frozen.detach(), torch.ones(2, 2)) and frozen not in opt.state


def test_resume_of_an_unfused_adamw_checkpoint_runs_fused():
    """Checkpoints of older fastcell hold AdamW groups with `fused: None`; a resume runs the fused
    kernel all the same (step counts placed for it), and its next step is the unfused step."""
    from fastcell.train.checkpoint import restore_training_state, rng_states
    from fastcell.train.optim import create_scheduler

    def step(net, opt):
        opt.zero_grad()
        net(torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(1))).square().sum().backward()
        opt.step()

    old = _net()
    old_opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "lars_exclude"} for g in param_groups(old, 0.05)], lr=1e-2)  # what older fastcell built
    for _ in range(3):
        step(old, old_opt)
    state = copy.deepcopy({"model": old.state_dict(), "optimizer": old_opt.state_dict(), "rng": rng_states(),
                           "scheduler": create_scheduler(old_opt, 1, 10).state_dict(),
                           "scaler": torch.amp.GradScaler("cpu").state_dict()})  # as saved: not shared
    assert {g["fused"] for g in state["optimizer"]["param_groups"]} == {None}

    resumed = _net()
    opt = create_optimizer(resumed, "adamw", lr=1e-2, weight_decay=0.05)
    restore_training_state(state, model=resumed, optimizer=opt, scheduler=create_scheduler(opt, 1, 10),
                           scaler=torch.amp.GradScaler("cpu"))
    assert all(g["fused"] for g in opt.param_groups)
    steps = [s["step"] for s in opt.state.values()]
    assert all(s.dtype == torch.float32 and s.item() == 3 for s in steps)
    step(resumed, opt)
    step(old, old_opt)
    for mine, theirs in zip(resumed.parameters(), old.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs)
