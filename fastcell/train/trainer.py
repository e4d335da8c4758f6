"""The SimCLR training loop: `train(config)` (what `fastcell train` runs).

One step: both views go through the network as one batch, NT-Xent on the projections
(negatives gathered from every rank under DDP), LARS/AdamW, per-step warm-up + cosine.
Mixed precision by autocast (bf16 by default where supported, fp16 with a GradScaler, or
fp32), channels_last, optional torch.compile. Multi-GPU/multi-node through torchrun: the
process group comes from torchrun's environment variables (NCCL on GPUs, gloo on CPUs) and
each rank reads its own part of the shards (the loader's rank / world_size).

The loop is loader-agnostic: `make_loader(config, env)` returns an object following the
contract of `fastcell.loaders.create_train_loader` (iteration yields an epoch of
`(view1, view2, ids)`, `len()`, `set_epoch(epoch, start_batch=0)`, `channels`, `image_size`; `close()`
where it has one, called when no epoch follows).

Exact resume: a checkpoint records the epoch and the batches already consumed in it; on
resume the loader starts that epoch at the first batch not consumed (`set_epoch(epoch,
start_batch=k)`: batches k.. are those of the whole epoch; the loader reads past the consumed
ones without augmenting them), so an interrupted run ends with the same weights as an
uninterrupted one. The first metrics row after a resume times the batches it trains, not the
consumed ones (only the loader's reading past them falls into its first wait).
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fastcell.errors import FastcellError, InputError, without_worker_traceback
from fastcell.io import remove_unfinished_writes, write_bytes_atomic, write_json_atomic
from fastcell.precision import autocast_dtype
from fastcell.train.checkpoint import (
    CHECKPOINT_NAME,
    autocast_name,
    check_resumable,
    checkpoint_path,
    read_checkpoint,
    restore_training_state,
    save_checkpoint,
    shards_identity,
)
from fastcell.train.config import CONFIG_NAME, TrainConfig
from fastcell.train.loss import NTXentLoss
from fastcell.train.model import create_model
from fastcell.train.optim import create_optimizer, create_scheduler, scaled_lr

METRICS_NAME = "metrics.csv"
METRIC_FIELDS = ("step", "epoch", "loss", "lr", "samples_per_s", "data_wait", "knn_acc")


@dataclass
class DistEnv:
    """Where this process sits: rank, world size and the device it trains on."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> tuple[DistEnv, bool]:
    """DistEnv from torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE); starts the process group.

    Returns (env, whether this call created the process group and must destroy it).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        created = True
    return DistEnv(rank, local_rank, world, device), created


def check_shard_folder(shard_dir: str | None) -> None:
    """InputError when no shard folder is given, it has no readable manifest, or no training cells."""
    from fastcell.format.folder import read_manifest

    if not shard_dir:
        raise InputError("no shard folder given: pass the output folder of `fastcell shard`")
    if read_manifest(shard_dir).count("train") == 0:
        raise InputError(f"{shard_dir}: the manifest lists no training cells")


def shard_loader(config: TrainConfig, env: DistEnv):
    """The default loader factory: fastcell.loaders' two-view train loader over config.shards."""
    from fastcell.loaders import create_train_loader

    check_shard_folder(config.shards)
    return create_train_loader(
        config.shards, config.augment_spec(), config.batch_size, backend=config.loader, device=env.device,
        rank=env.rank, world_size=env.world_size, seed=config.seed, num_workers=config.num_workers,
    )


class MetricsLog:
    """RUN_DIR/metrics.csv, rewritten atomically at each log; on resume rows past the checkpoint go."""

    def __init__(self, path: Path, keep_until_step: int):
        self.path = path
        self.rows: list[dict] = []
        if keep_until_step > 0 and path.is_file():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until_step]

    def append(self, row: dict) -> None:
        self.rows.append(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        write_bytes_atomic(self.path, buf.getvalue().encode())


class TrainStep:
    """One optimisation step on a batch of view pairs: the loop, the benchmark and the GPU check run this.

    Both views go through the network as one batch of 2B (one pass, BatchNorm statistics over
    both views), the loss is computed in float32 outside autocast. Nothing in the step reads a
    device value to the host (the returned loss stays on the device), so a GPU runs it without
    waiting for the CPU; the one exception is fp16's GradScaler before LARS, whose overflow check
    (skip the update or not) is read on the host each step.
    """

    def __init__(self, net: nn.Module, criterion: nn.Module, optimizer, scheduler, scaler,
                 amp_dtype: torch.dtype | None, channels_last: bool):
        self.net, self.criterion, self.optimizer = net, criterion, optimizer
        self.scheduler, self.scaler = scheduler, scaler
        self.amp_dtype, self.channels_last = amp_dtype, channels_last

    def batch(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        """Both views as one batch, written once in the layout and dtype the first convolution computes
        in (channels_last; the autocast dtype, to which autocast would cast it anyway): one copy
        rather than a concatenation, a layout copy and autocast's cast."""
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        x = torch.empty((view1.shape[0] + view2.shape[0], *view1.shape[1:]), dtype=self.amp_dtype or view1.dtype,
                        device=view1.device, memory_format=layout)
        return torch.cat([view1, view2], out=x)

    def __call__(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        x = self.batch(view1, view2)
        with torch.autocast(x.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            z = self.net(x)
        loss = self.criterion(*z.chunk(2))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    steps: int
    final_loss: float
    samples_per_s: float  # median over log intervals; each sample is one cell seen as two views
    data_wait: float  # share of wall time spent waiting for the loader
    model: nn.Module = field(repr=False)  # the trained SimCLR network (embeddings: model.encoder(x))
    steps_run: int  # optimiser steps this call performed (a resumed run: only the remaining ones)


def train(
    config: TrainConfig,
    make_loader: Callable[[TrainConfig, DistEnv], object] | None = None,
    make_monitor: Callable[[TrainConfig, DistEnv], object] | None = None,
) -> TrainResult:
    """Train SimCLR as `config` says; returns a summary. Raises FastcellError on bad input.

    `make_monitor(config, env)`, when `config.knn_every` > 0, returns an object whose
    `evaluate(encoder, autocast_dtype) -> float` scores the current encoder (see monitor.py).
    """
    env, created_group = init_distributed()
    try:
        return _train(config, make_loader or shard_loader, make_monitor, env)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(config: TrainConfig, make_loader, make_monitor, env: DistEnv) -> TrainResult:
    run_dir = Path(config.out)
    ckpt_path = checkpoint_path(run_dir)
    loader = make_loader(config, env)
    config.channels, config.view_size = list(loader.channels), int(loader.image_size)  # resolved: what the model takes

    manifest = getattr(loader, "manifest", None)  # the shards' manifest as the loader parsed it
    shards = shards_identity(config.shards, getattr(manifest, "sha256", None))  # once: every checkpoint records it
    state = None
    if ckpt_path.is_file():
        if not config.resume:
            raise InputError(f"{ckpt_path}: a run already lives here; pass --resume to continue it or pick another --out")
        state = read_checkpoint(ckpt_path, map_location=env.device)
        check_resumable(state, config, env.world_size, ckpt_path, shards)
    elif config.resume and env.is_main:
        print(f"{ckpt_path}: no checkpoint yet, starting from step 0", file=sys.stderr)
    if env.is_main:  # this run owns the folder now (a refused one changes nothing)
        remove_unfinished_writes(run_dir, CHECKPOINT_NAME)  # killed checkpoint writes

    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise InputError(
            f"{config.shards or 'the loader'}: fewer training cells per process than one batch of "
            f"{config.batch_size}; lower --batch-size"
        )
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps // 2)
    global_batch = config.batch_size * env.world_size
    amp_dtype = autocast_dtype(config.precision, env.device)
    if state is not None and state.get("autocast") not in (None, autocast_name(amp_dtype)) and env.is_main:
        print(f"{ckpt_path}: warning: its steps ran in {state['autocast']}, on this machine --precision "
              f"{config.precision} runs {autocast_name(amp_dtype)}: the run goes on, but is not bit-exact with an "
              "uninterrupted one", file=sys.stderr)

    torch.manual_seed(config.seed)
    model = create_model(config).to(env.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model, config.optimizer, scaled_lr(config.lr_at_256, global_batch),
                                 config.resolved_weight_decay, config.momentum)
    scheduler = create_scheduler(optimizer, warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp_dtype == torch.float16)
    step, epoch, skip = 0, 0, 0
    if state is not None:
        restore_training_state(state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        step, epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]
        del state
    first_step = step
    if env.is_main:
        write_json_atomic(run_dir / CONFIG_NAME, config.to_dict())

    net: nn.Module = model
    if env.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net, mode=config.compile_mode)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    train_step = TrainStep(net, NTXentLoss(config.temperature), optimizer, scheduler, scaler, amp_dtype,
                           config.channels_last)
    monitor = make_monitor(config, env) if (make_monitor and config.knn_every and env.is_main) else None

    log = MetricsLog(run_dir / METRICS_NAME, keep_until_step=step) if env.is_main else None
    tb = None
    if env.is_main and config.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(run_dir / "tb"), purge_step=step + 1 if step else None)  # keeps the checkpoint's step
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not (config.progress and env.is_main),
               unit="step", dynamic_ncols=True, desc="train")

    def checkpoint(epoch: int, batches_done: int, finished: bool = False) -> None:
        if env.is_main:
            epoch, batches_done = (epoch + 1, 0) if batches_done >= steps_per_epoch else (epoch, batches_done)
            save_checkpoint(ckpt_path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                            config=config, step=step, epoch=epoch, batch_in_epoch=batches_done,
                            world_size=env.world_size, shards=shards, finished=finished,
                            autocast=autocast_name(amp_dtype))

    rates, loss_value = [], float("nan")
    wait_total = run_total = 0.0
    loss_sum = torch.zeros((), device=env.device)
    interval_start, interval_wait, interval_steps = time.perf_counter(), 0.0, 0
    net.train()
    batch_index = skip
    while step < total_steps:
        if skip:  # resuming mid-epoch: the first `skip` batches were trained on already
            loader.set_epoch(epoch, start_batch=skip)
        else:  # (a loader of the older contract, set_epoch(epoch), trains fresh runs as before)
            loader.set_epoch(epoch)
        batches = iter(loader)
        batch_index = skip
        while step < total_steps:
            t0 = time.perf_counter()
            try:
                view1, view2, _ = next(batches)
            except StopIteration:
                break
            except Exception as err:
                raise _data_error(err, epoch, batch_index, ckpt_path, config.shards, resumed_at=skip) from err
            interval_wait += time.perf_counter() - t0
            batch_index += 1
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it on)
            loss_sum += train_step(view1, view2)
            step += 1
            interval_steps += 1
            if step % config.checkpoint_every == 0 and step < total_steps:
                checkpoint(epoch, batch_index)
            if step % config.log_every == 0 or step == total_steps:
                loss_value = _mean_over_ranks(loss_sum / interval_steps, env)
                elapsed = time.perf_counter() - interval_start
                row = {"step": step, "epoch": epoch, "loss": round(loss_value, 6),
                       "lr": lr,
                       "samples_per_s": round(interval_steps * global_batch / elapsed, 2),
                       "data_wait": round(interval_wait / elapsed, 4)}
                if monitor is not None and (step % config.knn_every == 0 or step == total_steps):
                    row["knn_acc"] = round(monitor.evaluate(model.encoder, amp_dtype), 4)
                    net.train()
                rates.append(row["samples_per_s"])
                wait_total += interval_wait
                run_total += elapsed
                if env.is_main:
                    log.append(row)
                    if tb is not None:
                        for k in ("loss", "lr", "samples_per_s", "data_wait", "knn_acc"):
                            if k in row:
                                tb.add_scalar(f"train/{k}", row[k], step)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{row['lr']:.3g}",
                                samples_s=f"{row['samples_per_s']:.0f}", wait=f"{row['data_wait']:.0%}")
                loss_sum.zero_()
                interval_start, interval_wait, interval_steps = time.perf_counter(), 0.0, 0
            bar.update(1)
        if hasattr(batches, "close"):
            batches.close()  # stops a prefetching loader's thread now, not at garbage collection
        if step < total_steps:
            skip, epoch = 0, epoch + 1
    bar.close()
    if hasattr(loader, "close"):
        loader.close()  # no epoch follows: a DALI loader's next epoch started ahead, and its threads, let go
    if step > first_step:  # a resumed run that had finished trains nothing and keeps its checkpoint as it is
        checkpoint(epoch, batch_index, finished=True)
    if tb is not None:
        tb.close()
    return TrainResult(run_dir, ckpt_path, step, loss_value, statistics.median(rates) if rates else math.nan,
                       wait_total / run_total if run_total else math.nan, model, step - first_step)


def _mean_over_ranks(value: torch.Tensor, env: DistEnv) -> float:
    if env.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= env.world_size
    return float(value)


def _data_error(err: Exception, epoch: int, batch_index: int, ckpt_path: Path, shard_dir: str | None,
                resumed_at: int = 0) -> FastcellError:
    """The loader failed mid-epoch: say where, which shard (scanning the shards when the loader did
    not say), and that the last good checkpoint was kept (the loop never saves after a failure). A run resumed
    at batch k fetches batch k first after reading past 0..k-1, so a failure there may lie in those."""
    err = without_worker_traceback(err)
    kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.is_file() else "no checkpoint was written yet"
    culprit = ""
    if shard_dir and ".tar" not in str(err):
        found = find_corrupt_sample(shard_dir)
        culprit = f"; scanning the shards found {found}" if found else ""
    where = (f"batch {batch_index} or the batches before it, which a resumed run reads past"
             if resumed_at and batch_index == resumed_at else f"batch {batch_index}")
    return InputError(f"reading the training shards failed at epoch {epoch}, {where}: {err}{culprit} ({kept})")


def find_corrupt_sample(shard_dir: str | Path, split: str = "train") -> str | None:
    """Decode every sample of a split through its DALI index; a description of the first bad one, or None."""
    from fastcell.format.folder import find_bad_sample, read_manifest

    manifest = read_manifest(shard_dir)
    return find_bad_sample(manifest.tar_paths(split), manifest.codec, manifest.crop_shape)
