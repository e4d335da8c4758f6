"""Training throughput and model FLOPs utilisation: the benchmark's and the GPU check's measurement.

`measure_training` runs the trainer's own step (`TrainStep`: same model, loss, LARS, autocast,
channels_last, optional torch.compile) for a number of steps, on a real loader or, nanoGPT
style, on a stubbed one that hands out the same batch (data cost ~0), and reports views/s,
the share of time spent waiting for data, and MFU. FLOPs per step are counted once with
`torch.utils.flop_counter` on the uncompiled forward + backward of both views through the encoder,
the projection head and NT-Xent's similarity product (convolutions and matrix products, the MFU
convention: about 3x the forward, the first convolution has no input gradient; the optimiser and
the elementwise ops are not counted). MFU divides by the device's dense bf16 peak.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import torch

from fastcell.errors import EnvironmentProblem
from fastcell.precision import autocast_dtype
from fastcell.train.encoders import FEATURE_DIMS
from fastcell.train.loss import NTXentLoss
from fastcell.train.model import SimCLR, create_encoder
from fastcell.train.optim import create_optimizer, create_scheduler, scaled_lr
from fastcell.train.synthetic import SyntheticPairLoader
from fastcell.train.trainer import TrainStep

TARGET_VIEWS_PER_S = 40_000  # ResNet-50, 96 px, batch 512, bf16 on one H200 (MFU ~18 %)

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets, by a part of the
# name torch reports ("NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"); the SXM parts of
# Hopper are 989 TFLOP/s (1,979 with 2:4 sparsity), the PCIe and NVL cards lower; the L40 and L40S
# are 181 and 362 (the L40/L40S data sheet's table: 181.05 and 362.05 dense, twice that sparse).
GPU_BF16_PEAK = {"H200": 989e12, "H200 NVL": 835e12, "GH200": 989e12, "H100": 989e12, "H100 NVL": 835e12,
                 "H100 PCIe": 756e12, "B200": 2250e12, "A100": 312e12, "L40": 181e12, "L40S": 362e12,
                 "A10G": 70e12, "L4": 121e12}


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named `device_name`: the longest key of GPU_BF16_PEAK in the name
    (H200 NVL before H200, L40S before L40 before L4); None for GPUs not listed."""
    keys = [key for key in GPU_BF16_PEAK if key in device_name]
    return GPU_BF16_PEAK[max(keys, key=len)] if keys else None


def count_step_flops(model: torch.nn.Module, shape: tuple[int, ...], criterion: torch.nn.Module) -> int:
    """FLOPs of one forward + backward on a batch of 2B views of `shape` (2B, C, H, W), counted by torch's
    FlopCounterMode on a copy of the model on the meta device: shapes only, no computation, and the
    model's BatchNorm statistics and gradients stay as they are (fp32: the count does not depend on
    the precision)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta")
    with FlopCounterMode(display=False) as counter:
        criterion(*meta(torch.empty(shape, device="meta")).chunk(2)).backward()
    return counter.get_total_flops()


def measure_training(*, arch: str = "resnet18", stem: str = "standard", batch_size: int = 64, crop_size: int = 96,
                     channels: int = 3, steps: int = 20, repeats: int = 1, warmup: int = 3, precision: str = "bf16",
                     compile: bool = False, compile_mode: str = "default", channels_last: bool = True,
                     device: str | torch.device = "cpu",
                     loader=None, peak_flops: float | None = None, seed: int = 0) -> dict:
    """Time `repeats` x `steps` training steps after `warmup` untimed ones; a dict of throughput figures
    (samples/s: the median over repeats; a sample is one cell, i.e. two views).

    A loader's epoch starts (a new pipeline filling its shuffle buffer before the first batch) cost once per
    epoch, and a short benchmark epoch repeats them far more often than training on a screen does: they count in
    `data_wait` and are also reported apart (`epoch_starts`, the median `epoch_start_wait_s`).

    `loader`: an object following the train-loader contract (views on `device`); None stubs the
    data with one synthetic batch. `peak_flops`: the device's peak for MFU (None: looked up for
    known GPUs, else MFU is not reported). On CUDA, one more step runs under torch's sync debug
    mode: `host_syncs_per_step` (0 expected; 1 with fp16, whose GradScaler reads its overflow flag),
    the syncs of the whole process during that step: with a real `loader` whose threads work
    meanwhile (prefetching, decoding), theirs are counted too.
    """
    device = torch.device(device)
    stub = loader is None  # one batch an epoch: its epoch starts are no loader's
    if stub:
        loader = SyntheticPairLoader(batch_size, batch_size, channels, crop_size, device=device, seed=seed, noise=0.0)
    else:
        channels, crop_size = len(loader.channels), int(loader.image_size)
    amp_dtype = autocast_dtype(precision, device)
    torch.manual_seed(seed)
    model = SimCLR(create_encoder(arch, channels, stem), FEATURE_DIMS[arch]).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = NTXentLoss()
    optimizer = create_optimizer(model, "lars", scaled_lr(0.3, batch_size), 1e-6)
    scheduler = create_scheduler(optimizer, warmup_steps=0, total_steps=warmup + steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    net = torch.compile(model, mode=compile_mode) if compile else model
    step = TrainStep(net, criterion, optimizer, scheduler, scaler, amp_dtype, channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def batches():  # (whether the batch is an epoch's first, the batch), epoch after epoch
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            for index, batch in enumerate(loader):
                yield index == 0 and not stub, batch
            epoch += 1

    stream = batches()
    _, first = next(stream)
    flops = count_step_flops(model, (2 * first[0].shape[0], *first[0].shape[1:]), criterion)
    losses = [float(step(*first[:2]))]
    for _ in range(warmup - 1):
        _, (view1, view2, _) = next(stream)
        losses.append(float(step(view1, view2)))
    sync()
    wait, elapsed, rates, epoch_starts = 0.0, 0.0, [], []
    for _ in range(repeats):  # no per-step sync: the GPU keeps its queue, as in training
        start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            starts_epoch, (view1, view2, _) = next(stream)
            waited = time.perf_counter() - t0
            wait += waited
            if starts_epoch:  # a new epoch's pipeline fills before its first batch: a cost per epoch, not per step
                epoch_starts.append(waited)
            loss = step(view1, view2)
        sync()
        rates.append(view1.shape[0] * steps / (time.perf_counter() - start))
        elapsed += time.perf_counter() - start
    syncs = cuda_host_syncs(lambda: step(view1, view2)) if device.type == "cuda" else None
    stream.close()
    if hasattr(loader, "close"):
        loader.close()
    losses.append(float(loss))
    batch = view1.shape[0]
    if peak_flops is None and device.type == "cuda":
        peak_flops = peak_bf16_flops(torch.cuda.get_device_name(device))
    samples_per_s = statistics.median(rates)
    achieved = flops * samples_per_s / batch
    return {
        "arch": arch, "stem": stem, "batch_size": batch, "crop_size": crop_size, "channels": channels,
        "precision": precision, "compile": compile_mode if compile else None, "device": str(device), "steps": steps,
        "repeats": repeats,
        "samples_per_s": samples_per_s, "views_per_s": 2 * samples_per_s, "samples_per_s_repeats": rates,
        "step_ms": 1000 * batch / samples_per_s, "data_wait": wait / elapsed,
        "epoch_starts": len(epoch_starts), "epoch_start_wait_s": statistics.median(epoch_starts or [0.0]),
        "flops_per_step": flops, "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak_flops / 1e12 if peak_flops else None,
        "mfu": achieved / peak_flops if peak_flops else None,
        "loss_first": losses[0], "loss_last": losses[-1], "host_syncs_per_step": syncs,
    }


def cuda_host_syncs(run) -> int:
    """How many synchronising CUDA calls (`.item()`, `nonzero`, copies to the host: the GPU's queue drains
    while the CPU waits) `run()` makes, as torch's sync debug mode reports them; 0 for a step that never
    waits. The debug mode is process-wide: syncs that other threads (a loader's prefetching) make
    while `run()` runs are counted as well. (On CPUs the tests count the step's reads with an op
    recorder.)"""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def gpu_check_training(steps: int = 300, arch: str = "resnet50", batch_size: int = 512, crop_size: int = 96,
                       channels: int = 3, compile: bool = True, compile_mode: str = "default", stem: str = "standard",
                       loader=None) -> dict:
    """On a CUDA GPU: a few hundred bf16 steps with torch.compile (synthetic data unless `loader` is
    given); views/s, data-wait share and MFU. Raises EnvironmentProblem without CUDA."""
    if not torch.cuda.is_available():
        raise EnvironmentProblem("the training GPU check needs a CUDA GPU; torch sees none")
    device = torch.device("cuda", torch.cuda.current_device())
    torch.backends.cudnn.benchmark = True
    result = measure_training(arch=arch, stem=stem, batch_size=batch_size, crop_size=crop_size, channels=channels,
                              steps=steps // 3, repeats=3, warmup=20 if compile else 5, precision="bf16",
                              compile=compile, compile_mode=compile_mode, device=device, loader=loader)
    result["gpu"] = torch.cuda.get_device_name(device)
    result["torch"] = torch.__version__
    result["target_views_per_s"] = TARGET_VIEWS_PER_S if arch == "resnet50" and crop_size == 96 else None
    return result
