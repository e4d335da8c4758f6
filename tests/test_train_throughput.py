"""The throughput measurement behind the benchmark and the GPU check, at toy size on CPU."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastcell.errors import EnvironmentProblem
from fastcell.train.loss import NTXentLoss
from fastcell.train.model import SimCLR, create_encoder
from fastcell.train.throughput import (
    TARGET_VIEWS_PER_S,
    count_step_flops,
    cuda_host_syncs,
    gpu_check_training,
    measure_training,
    peak_bf16_flops,
)


def test_measure_training_reports_rates_flops_and_mfu():
    r = measure_training(arch="resnet18", batch_size=4, crop_size=32, steps=2, repeats=2, warmup=1,
                         precision="fp32", peak_flops=1e12)
    assert len(r["samples_per_s_repeats"]) == 2 and r["samples_per_s"] > 0
    assert r["views_per_s"] == pytest.approx(2 * r["samples_per_s"])
    # forward + backward of the 8 views costs about 3x their forward pass (backward: 2x)
    with FlopCounterMode(display=False) as forward:
        create_encoder("resnet18", 3).eval()(torch.randn(8, 3, 32, 32))
    assert 2.5 < r["flops_per_step"] / forward.get_total_flops() < 3.5
    assert r["achieved_tflops"] * 1e12 == pytest.approx(r["flops_per_step"] * r["samples_per_s"] / 4)  # steps/s
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 1.0)
    assert 0 <= r["data_wait"] < 1 and r["epoch_starts"] == 0  # the stub's one-batch epochs are not counted
    assert torch.isfinite(torch.tensor([r["loss_first"], r["loss_last"]])).all()
    assert r["host_syncs_per_step"] is None  # counted on CUDA; on CPUs tests/test_train_step.py counts them


def test_epoch_starts_are_reported_apart():
    """A loader that stalls before each epoch's first batch (a pipeline filling its shuffle buffer): the stalls
    count in the data wait, and their number and length are reported apart."""
    from fastcell.train.synthetic import SyntheticPairLoader

    class SlowEpochStarts(SyntheticPairLoader):
        def __iter__(self):
            time.sleep(0.2)
            yield from super().__iter__()

    loader = SlowEpochStarts(8, 4, 3, 16, noise=0.0)  # 2 batches an epoch
    r = measure_training(arch="resnet18", batch_size=4, crop_size=16, steps=4, repeats=2, warmup=1,
                         precision="fp32", loader=loader)
    assert r["epoch_starts"] == 4 and 0.2 <= r["epoch_start_wait_s"] < 0.4  # 8 timed steps after epoch 0's first
    assert r["data_wait"] > 0.2  # the four stalls (0.8 s) are in it (without them: ~0)


def test_measure_training_builds_batches_only_for_the_steps_it_runs(monkeypatch):
    """The FLOP count needs the batch's shape, not a batch: no 2B-view batch is built on the device for it."""
    from fastcell.train.trainer import TrainStep

    built = []
    batch = TrainStep.batch
    monkeypatch.setattr(TrainStep, "batch", lambda self, *views: built.append(1) or batch(self, *views))
    r = measure_training(arch="resnet18", batch_size=2, crop_size=16, steps=2, repeats=2, warmup=1,
                         precision="fp32")
    assert len(built) == 1 + 2 * 2 and r["flops_per_step"] > 0


def analytic_step_flops(model: nn.Module, views: int, size: int, proj_dim: int = 128) -> int:
    """A hand count for `views` views of 3 x size x size: every convolution and linear layer costs
    2 x output elements x inputs per output in the forward, twice that in the backward (input and weight
    gradients) except the first convolution (the views need no gradient); NT-Xent's similarity product
    [2B, D] x [D, 2B] costs 2 x 2B x 2B x D forward and twice that backward."""
    forward = []

    def record(module, args, out):
        if isinstance(module, nn.Conv2d):
            forward.append(2 * out.numel() * module.in_channels // module.groups * math.prod(module.kernel_size))
        elif isinstance(module, nn.Linear):
            forward.append(2 * out.numel() * module.in_features)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        model.to("meta")(torch.empty(views, 3, size, size, device="meta"))
    finally:
        hook.remove()
    return 3 * sum(forward) - forward[0] + 3 * 2 * views * views * proj_dim


def test_step_flops_match_a_hand_count_for_resnet50_at_96px():
    """The count behind MFU: ResNet-50 at 96 px, 2 x 8 views, against the hand count (both views, the
    projection head, the loss product); the forward alone is torchvision's published 4.09 GMAC at 224 px
    scaled by (96 / 224)^2 (its 2048 x 1000 classifier, 2 MMAC, is not in this encoder)."""
    encoder = create_encoder("resnet50", 3)
    with FlopCounterMode(display=False) as forward:
        copy.deepcopy(encoder).to("meta")(torch.empty(1, 3, 96, 96, device="meta"))
    assert forward.get_total_flops() == pytest.approx(2 * (4.09e9 - 2.05e6) * (96 / 224) ** 2, rel=0.01)
    model = SimCLR(encoder, 2048)
    counted = count_step_flops(model, (16, 3, 96, 96), NTXentLoss())
    assert counted == pytest.approx(analytic_step_flops(copy.deepcopy(model), 16, 96), rel=1e-3)
    assert model.encoder.conv1.weight.device.type == "cpu"  # the count ran on a copy
    # the target: 40,000 views/s of ResNet-50 at 96 px is 18 % of an H200's dense bf16 peak
    assert TARGET_VIEWS_PER_S * counted / 16 / peak_bf16_flops("NVIDIA H200") == pytest.approx(0.18, abs=0.005)


def test_peak_lookup_takes_the_most_specific_name():
    assert peak_bf16_flops("NVIDIA H200") == 989e12 and peak_bf16_flops("NVIDIA H200 NVL") == 835e12
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA L4") == 121e12 and peak_bf16_flops("NVIDIA L40S") == 362e12
    assert peak_bf16_flops("NVIDIA L40") == 181e12  # not the L4's
    assert peak_bf16_flops("NVIDIA GeForce RTX 4090") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_gpu_check_refuses_without_cuda():
    with pytest.raises(EnvironmentProblem, match="needs a CUDA GPU"):
        gpu_check_training(steps=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_gpu_check_runs_compiled_bf16_steps():
    r = gpu_check_training(steps=30, arch="resnet18", batch_size=128, compile=True)
    assert r["views_per_s"] > 0 and r["loss_last"] == r["loss_last"]
    assert r["host_syncs_per_step"] == 0  # bf16, LARS: the GPU never waits for the host inside a step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_host_syncs_counts_each_read_to_the_host():
    """The counter behind host_syncs_per_step sees a sync when there is one (its 0 is not a blind spot)."""
    x = torch.ones(8, device="cuda")
    assert cuda_host_syncs(lambda: (x * 2).sum()) == 0
    assert cuda_host_syncs(lambda: [x.sum().item() for _ in range(3)]) == 3
