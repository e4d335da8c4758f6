"""`fastcell train`: SimCLR on sharded single-cell crops (thin wrapper around fastcell.train.trainer.train)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from fastcell.errors import InputError
from fastcell.loaders import BACKENDS
from fastcell.precision import PRECISIONS
from fastcell.train.config import (
    COMPILE_MODES,
    DEFAULT_BASE_LR,
    DEFAULT_WEIGHT_DECAY,
    OPTIMIZERS,
    TrainConfig,
)
from fastcell.train.encoders import ARCHS

_DEFAULTS = TrainConfig()  # option defaults are None (unset: a config file or a resumed run may set them)


def _default(name: str) -> str:
    """The default an option's help shows: TrainConfig's (the option itself defaults to unset)."""
    value = getattr(_DEFAULTS, name)
    return "yes" if value is True else "no" if value is False else str(value)


def _one_of(choices) -> str:
    return f"{', '.join(choices[:-1])} or {choices[-1]}"


def _per_optimizer(values: dict) -> str:
    return ", ".join(f"{v:g} for {k}" for k, v in values.items())


def train(
    shards: Path = typer.Argument(
        None, help="Shard folder written by `fastcell shard` (its index.json says channels and crop size). "
        "Optional with --resume: the run's config.json remembers it.", show_default=False, metavar="SHARDS"),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: config.json, checkpoint.pt, metrics.csv, tb/."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML or JSON file of settings (same names as the "
                                "options, e.g. `batch_size: 512`); options given on the command line win."),
    resume: bool = typer.Option(None, "--resume/--no-resume", help="Continue the run in --out from its checkpoint "
                                "(same weights as if never interrupted). Without it an existing run is refused."),
    arch: str = typer.Option(None, help=f"Encoder: {_one_of(ARCHS)}.", show_default=_default("arch")),
    stem: str = typer.Option(None, help="standard (7x7/2 + max-pool; cheap) or small (3x3/1, no pool; "
                             "for crops under ~64 px, ~16x the compute).", show_default=_default("stem")),
    pretrained: Path = typer.Option(None, help="Local torchvision ImageNet state dict to start from (conv1 "
                                    "adapted to C channels; nothing is downloaded)."),
    epochs: int = typer.Option(None, help="Passes over the training shards.", show_default=_default("epochs")),
    max_steps: int = typer.Option(None, help="Stop after this many steps (overrides --epochs for the schedule)."),
    batch_size: int = typer.Option(None, help="Cells per process and step (each seen as 2 views); the global "
                                   "batch is this x the number of processes.", show_default=_default("batch_size")),
    optimizer: str = typer.Option(None, help=f"{_one_of(OPTIMIZERS)}.", show_default=_default("optimizer")),
    base_lr: float = typer.Option(None, help="Learning rate for a global batch of 256, scaled linearly.",
                                  show_default=_per_optimizer(DEFAULT_BASE_LR)),
    weight_decay: float = typer.Option(None, show_default=_per_optimizer(DEFAULT_WEIGHT_DECAY)),
    warmup_epochs: float = typer.Option(None, help="Linear warm-up length before the cosine decay.", show_default=_default("warmup_epochs")),
    temperature: float = typer.Option(None, help="NT-Xent temperature.", show_default=_default("temperature")),
    proj_dim: int = typer.Option(None, help="Projection output width.", show_default=_default("proj_dim")),
    view_size: int = typer.Option(None, help="Side of the augmented views in px.", show_default="the shards' crop size"),
    augment: list[str] = typer.Option(None, "--augment", "-a", metavar="NAME=VALUE", help="Change one "
                                      "augmentation setting (repeatable), e.g. -a crop_scale=0.5,1 -a jitter_p=0.4; "
                                      "names and defaults: fastcell.loaders.AugmentSpec (README, 'Loaders')."),
    precision: str = typer.Option(None, help=f"{_one_of(PRECISIONS)}. auto: bf16 on GPUs that support it "
                                  "(else fp16); on CPUs bf16 only with native bf16 units (else fp32, which is "
                                  "several times faster on CPUs without them).", show_default=_default("precision")),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the model (GPU runs; "
                                 "the first steps are slow while it compiles).", show_default=_default("compile")),
    compile_mode: str = typer.Option(None, help=f"torch.compile mode with --compile: {_one_of(COMPILE_MODES)} (reduce-overhead: CUDA "
                                     "graphs, fewer kernel launches; max-autotune: slow to compile).", show_default=_default("compile_mode")),
    loader: str = typer.Option(None, help=f"Augmentation backend: {_one_of(BACKENDS)}.", show_default=_default("loader")),
    num_workers: int = typer.Option(None, help="Loader worker threads/processes per rank.", show_default=_default("num_workers")),
    seed: int = typer.Option(None, help="Seed of the initialisation and of the data order.", show_default=_default("seed")),
    checkpoint_every: int = typer.Option(None, help="Steps between checkpoints (a kill loses at most these).", show_default=_default("checkpoint_every")),
    log_every: int = typer.Option(None, help="Steps between metrics rows.", show_default=_default("log_every")),
    knn_every: int = typer.Option(None, help="Steps between kNN monitor evaluations on the val split's "
                                  "MoA labels (0: off).", show_default=_default("knn_every")),
) -> None:
    """Train a SimCLR encoder on sharded crops, on CPU, one GPU, or many GPUs with torchrun.

    Examples:\n
      fastcell train shards/bbbc021 --out runs/r18\n
      torchrun --nproc-per-node 8 $(command -v fastcell) train shards/bbbc021 --out runs/r50 --arch resnet50\n
      fastcell train --out runs/r18 --resume
    """
    options = {k: str(v) if isinstance(v, Path) else v for k, v in locals().items() if k not in {"out", "config"}}
    from fastcell.train.config import parse_augment_options, resolve_config
    from fastcell.train.monitor import knn_monitor
    from fastcell.train.trainer import train as run_training

    if augment:
        options["augment"] = parse_augment_options(augment)
    cfg = resolve_config(options, config_file=config, out=out)
    if not cfg.shards:
        raise InputError("no shard folder given: pass SHARDS (the output folder of `fastcell shard`)")
    result = run_training(cfg, make_monitor=knn_monitor)
    if os.environ.get("RANK", "0") == "0" and not result.steps_run:
        typer.echo(f"{result.checkpoint}: the run had finished ({result.steps} steps); nothing to train")
    elif os.environ.get("RANK", "0") == "0":
        typer.echo(
            f"trained {result.steps} steps: final loss {result.final_loss:.4f}, {result.samples_per_s:.0f} samples/s "
            f"(median), {result.data_wait:.0%} of the time waiting for data -> {result.checkpoint}"
        )
