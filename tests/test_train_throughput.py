"""The throughput measurement behind the benchmark and the GPU check, at toy size on CPU."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastcell.errors import EnvironmentProblem
from fastcell.train.model import create_encoder
from fastcell.train.throughput import gpu_check_training, measure_training


def test_measure_training_reports_rates_flops_and_mfu():
    r = measure_training(arch="resnet18", batch_size=4, crop_size=32, steps=2, repeats=2, warmup=1,
                         precision="fp32", peak_flops=1e12)
    assert len(r["samples_per_s_repeats"]) == 2 and r["samples_per_s"] > 0
    assert r["views_per_s"] == pytest.approx(2 * r["samples_per_s"])
    # forward + backward of the 8 views costs about 3x their forward pass (backward: 2x)
    with FlopCounterMode(display=False) as forward:
        create_encoder("resnet18", 3).eval()(torch.randn(8, 3, 32, 32))
    assert 2.5 < r["flops_per_step"] / forward.get_total_flops() < 3.5
    assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 1.0)
    assert 0 <= r["data_wait"] < 1
    assert torch.isfinite(torch.tensor([r["loss_first"], r["loss_last"]])).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_gpu_check_refuses_without_cuda():
    with pytest.raises(EnvironmentProblem, match="needs a CUDA GPU"):
        gpu_check_training(steps=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_gpu_check_runs_compiled_bf16_steps():
    r = gpu_check_training(steps=30, arch="resnet18", batch_size=128, compile=True)
    assert r["views_per_s"] > 0 and r["loss_last"] == r["loss_last"]
