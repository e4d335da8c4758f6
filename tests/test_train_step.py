"""The training step on CPU: no host syncs (what would stall a GPU's queue), reads of the loss only on log
steps, channels_last from the first to the last convolution.

A host sync on a GPU is an op that needs a device value on the host: on CPU it still shows as the same op
(`aten._local_scalar_dense` for `.item()`, `float(t)`, `bool(t)`, `if t:`; `aten.nonzero` and other ops
whose output size depends on values) or as a Python-level read (`.tolist()`, `.numpy()`, `.cpu()`).
`HostReads` records both. A `.to(device)` copy cannot be told from a no-op on a CPU-only machine; on a
GPU, `measure_training`'s `host_syncs_per_step` (torch's sync debug mode) counts every kind.
"""

from __future__ import annotations

import collections
import csv

import pytest
import torch
from test_train_trainer import config
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastcell.train.loss import NTXentLoss
from fastcell.train.model import SimCLR, create_encoder
from fastcell.train.optim import create_optimizer, create_scheduler
from fastcell.train.synthetic import SyntheticPairLoader
from fastcell.train.trainer import TrainStep, train

SYNC_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique", "_unique2"}
HOST_METHODS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"}


class _DispatchOps(TorchDispatchMode):
    def __init__(self, found: collections.Counter):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.found[f"aten.{func.overloadpacket.__name__}"] += 1
        return func(*args, **(kwargs or {}))


class _PythonReads(TorchFunctionMode):
    def __init__(self, found: collections.Counter):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in HOST_METHODS:
            self.found[f"Tensor.{func.__name__}"] += 1
        return func(*args, **(kwargs or {}))


class HostReads:
    """Counts, inside the `with` block, the ops that read a tensor's value to the host (see module doc)."""

    def __enter__(self) -> collections.Counter:
        self.found: collections.Counter = collections.Counter()
        self.modes = [_PythonReads(self.found), _DispatchOps(self.found)]
        for mode in self.modes:
            mode.__enter__()
        return self.found

    def __exit__(self, *exc):
        for mode in reversed(self.modes):
            mode.__exit__(*exc)


def tiny_step(optimizer: str, amp_dtype, channels_last: bool, encoder: nn.Module | None = None) -> TrainStep:
    """A ResNet-18 SimCLR (or `encoder` with 8 features) and its step, as the trainer builds them."""
    torch.manual_seed(0)
    model = SimCLR(create_encoder("resnet18", 3), 512) if encoder is None else SimCLR(encoder, 8)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = create_optimizer(model, optimizer, 0.1, 1e-6)
    scaler = torch.amp.GradScaler("cpu", enabled=amp_dtype == torch.float16)
    return TrainStep(model, NTXentLoss(), opt, create_scheduler(opt, 2, 10), scaler, amp_dtype, channels_last)


@pytest.mark.parametrize("optimizer", ["lars", "adamw"])
@pytest.mark.parametrize("amp_dtype, channels_last", [(torch.bfloat16, True), (torch.bfloat16, False),
                                                       (None, True)])
def test_step_reads_nothing_to_the_host(optimizer, amp_dtype, channels_last):
    """Forward, NT-Xent, backward, the optimiser (LARS trust ratios, fused AdamW) and the scheduler: the
    second step (state exists then) makes no host read, so a GPU never waits for the host inside it."""
    step = tiny_step(optimizer, amp_dtype, channels_last)
    views = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    step(*views)
    with HostReads() as found:
        loss = step(*views)
    assert not found, dict(found)
    assert loss.requires_grad is False and loss.ndim == 0


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler")  # the scaler skips step 1
@pytest.mark.parametrize("optimizer, reads", [("lars", 1), ("adamw", 0)])
def test_fp16_reads_only_the_grad_scalers_inf_check(optimizer, reads):
    """fp16 needs a GradScaler, whose skip-on-overflow test reads found_inf to the host before a
    plain optimiser step (one sync a step, inherent; bf16 needs no scaler). Fused AdamW takes the scale
    and the inf flag into its kernel and skips on the device: no read. (A small encoder: fp16 convolutions
    are emulated on CPUs, a ResNet-18 step takes seconds.)"""
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    step = tiny_step(optimizer, torch.float16, True, encoder)
    views = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    step(*views)
    with HostReads() as found:
        step(*views)
    assert found == ({"Tensor.item": 1, "aten._local_scalar_dense": 1} if reads else {}), dict(found)


def test_host_reads_sees_item_float_bool_and_tolist():
    """The recorder itself: each way of reading a value to the host is counted."""
    t = torch.ones(2)
    with HostReads() as found:
        t.sum().item()
        float(t[0])
        if t.all():
            t.tolist()
        (t > 0).nonzero()
    assert found["aten._local_scalar_dense"] == 3 and found["aten.nonzero"] == 1
    assert found["Tensor.item"] == 1 and found["Tensor.__float__"] == 1 and found["Tensor.__bool__"] == 1
    assert found["Tensor.tolist"] == 1


class StepReads(SyntheticPairLoader):
    """Synthetic batches that record, for each step of the loop, the host reads `found` counted while it
    ran: from handing out its batch to the loop asking for the next one (or closing the epoch). What the
    trainer reads in set-up, between epochs and at the end is left out: the loop's steps are the point."""

    def __init__(self, found: collections.Counter, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.found, self.steps = found, []

    def __iter__(self):
        for batch in super().__iter__():
            self.found.clear()
            try:
                yield batch
            finally:
                self.steps.append(dict(self.found))


def test_loop_reads_the_loss_only_on_log_steps(tmp_path):
    """5 steps logging every 2: a step reads to the host only at a log (steps 2, 4 and 5), and then only
    the loss it accumulated on the device (one read); the other steps read nothing."""
    with HostReads() as found:
        loader = StepReads(found, 16, 4, 3, 16, seed=0)
        train(config(tmp_path, batch_size=4, max_steps=5, log_every=2, checkpoint_every=100), lambda cfg, env: loader)
    read = {"Tensor.__float__": 1, "aten._local_scalar_dense": 1}
    assert loader.steps == [{}, read, {}, read, read], loader.steps
    assert [int(r["step"]) for r in csv.DictReader(open(tmp_path / "metrics.csv"))] == [2, 4, 5]


def _convolution_inputs(run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, weight) of every convolution at its first call, in call order, while `run()` trains (the
    FLOP count's pass on the meta device left out)."""
    seen = {}

    def record(module, args):
        if isinstance(module, nn.Conv2d) and args[0].device.type != "meta":
            seen.setdefault(module, (args[0], module.weight))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        run()
    finally:
        hook.remove()
    return list(seen.values())


def _channels_last(t: torch.Tensor) -> bool:
    """Stored channels-last and not also plain contiguous (shapes where both layouts coincide say nothing)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.mark.parametrize("path", ["train", "measure_training"])
def test_views_and_weights_are_channels_last_from_first_to_last_convolution(tmp_path, path):
    """The trainer and the benchmark: every convolution (the first: conv1, the last: layer4's last) gets
    its input channels_last and has channels_last weights; the first gets the views already in bf16 under
    bf16. 64 px: layer4's maps are 2 x 2, where the layouts differ."""
    from fastcell.train.throughput import measure_training

    if path == "train":
        convs = _convolution_inputs(lambda: train(
            config(tmp_path, batch_size=2, max_steps=1, precision="bf16"),
            lambda cfg, env: SyntheticPairLoader(2, cfg.batch_size, 3, 64, seed=cfg.seed)))
    else:
        convs = _convolution_inputs(lambda: measure_training(batch_size=2, crop_size=64, steps=1, warmup=1,
                                                             precision="bf16"))
    assert len(convs) == 20  # ResNet-18: conv1, 16 in the blocks, 3 downsampling
    assert all(t.is_contiguous(memory_format=torch.channels_last) for conv in convs for t in conv)
    (first, first_weight), (last, last_weight) = convs[0], convs[-1]
    assert first_weight.shape[1:] == (3, 7, 7) and last.shape == (4, 512, 2, 2)
    assert all(_channels_last(t) for t in (first, first_weight, last, last_weight))
    assert first.dtype == torch.bfloat16 and first.shape == (4, 3, 64, 64)


@pytest.mark.parametrize("amp_dtype, channels_last", [(torch.bfloat16, True), (None, False)])
def test_batch_is_both_views_in_the_first_convolutions_layout_and_dtype(amp_dtype, channels_last):
    """What autocast would feed conv1 anyway (the views cast to its dtype), in one copy."""
    view1, view2 = torch.randn(3, 2, 5, 5), torch.randn(3, 2, 5, 5)
    x = TrainStep(None, None, None, None, None, amp_dtype, channels_last).batch(view1, view2)
    assert torch.equal(x, torch.cat([view1, view2]).to(amp_dtype or torch.float32))
    assert _channels_last(x) is channels_last and x.is_contiguous() is not channels_last
