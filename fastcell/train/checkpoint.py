"""Checkpoints: atomic save, exact resume, and loading a trained encoder for inference.

A run keeps one checkpoint, RUN_DIR/checkpoint.pt, rewritten atomically every
`checkpoint_every` steps and at the end (then marked `finished`). A killed run therefore
loses at most the steps since its last checkpoint, and never leaves a half-written file.

It holds everything an exact resume needs: model, optimiser, scheduler and grad-scaler
states, the step, epoch and batches consumed within the epoch (the loader starts the epoch after
them: `set_epoch(epoch, start_batch)`), the random states, the world size, the run's resolved config and the
identity of the shard folder it trains on (its manifest's SHA-256), so a resume on other data is refused.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastcell.errors import InputError
from fastcell.io import atomic_path, sha256_of
from fastcell.train.config import TrainConfig
from fastcell.train.model import SimCLR, create_model

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "fastcell-simclr"
CHECKPOINT_VERSION = 1


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def autocast_name(dtype: torch.dtype | None) -> str:
    """How a checkpoint records the dtype its steps ran in: "bfloat16", "float16" or "fp32"."""
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.")


def shards_identity(shard_dir: str | None, manifest_sha256: str | None = None) -> dict[str, Any] | None:
    """{"folder", "manifest_sha256"} of the shard folder a run trains on (None without one).

    The manifest (index.json) lists every shard with its sample count, statistics and the
    configuration that made it, so other or re-made shards give another hash. `manifest_sha256`: the hash
    of the manifest the run's loader parsed (`ShardManifest.sha256`), else the file is hashed now.
    Checkpoints written before runs took one folder record {"folders": [FOLDER], "manifest_sha256"}, the
    same hash.
    """
    from fastcell.format.folder import MANIFEST_NAME

    if not shard_dir:
        return None
    digest = manifest_sha256 or sha256_of([Path(shard_dir) / MANIFEST_NAME])
    return {"folder": str(Path(shard_dir).resolve()), "manifest_sha256": digest}


def _trained_on(identity: dict[str, Any]) -> str:
    """The folder of a recorded `shards_identity` (older checkpoints: a one-item list `folders`)."""
    return identity["folder"] if "folder" in identity else ", ".join(identity["folders"])


def rng_states() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": list(random.getstate()[1]),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore `rng_states()`, wherever the checkpoint was loaded to: a resume on a GPU maps every tensor of it to
    the GPU, and generator states are CPU byte tensors only (torch refuses others)."""
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])
    np.random.set_state(("MT19937", states["numpy"]["key"].cpu().numpy().astype(np.uint32), states["numpy"]["pos"]))
    random.setstate((3, tuple(states["python"]), None))


def save_checkpoint(path: str | Path, *, model: nn.Module, optimizer, scheduler, scaler, config: TrainConfig,
                    step: int, epoch: int, batch_in_epoch: int, world_size: int, shards: dict | None = None,
                    finished: bool = False, autocast: str | None = None) -> Path:
    """Write a training checkpoint atomically (`model` is the bare SimCLR module, not DDP/compiled);
    `shards`: the run's `shards_identity`, computed once per run; `autocast`: the dtype the steps ran in (what
    `--precision auto` resolved to on this machine, `autocast_name`)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": config.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "world_size": world_size,
        "rng": rng_states(),
        "finished": finished,
        "shards": shards,
        "autocast": autocast,
    }
    # through a file object: given a path, torch.save names the archive's records after the (random) temporary
    # file, so the same state would give other bytes, and another checksum, each time it is written
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    return Path(path)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", digest: Any = None) -> dict[str, Any]:
    """Load a fastcell checkpoint file; InputError naming the file when it is missing or not one.

    `digest` (a hashlib object), when given, is fed the file's bytes: the file is read once, into
    memory, and loaded from there (without it torch reads the file itself).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no checkpoint here")
    try:
        source = path
        if digest is not None:  # read once: hashed, then loaded from memory
            data = path.read_bytes()
            digest.update(data)
            source = io.BytesIO(data)
        state = torch.load(source, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise InputError(f"{path}: unreadable checkpoint ({err})") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a fastcell SimCLR checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise InputError(f"{path}: checkpoint version {state.get('version')}, this fastcell reads {CHECKPOINT_VERSION}")
    return state


def check_resumable(state: dict[str, Any], config: TrainConfig, world_size: int, path: str | Path,
                    reads: dict | None) -> None:
    """Refuse to resume a checkpoint made with another model, data or optimisation setting.

    The shard folder may move (same manifest, other path); other or re-made shards (`reads`, this
    run's `shards_identity`) are refused.
    """
    trained_on = state.get("shards")
    if trained_on and reads and trained_on["manifest_sha256"] != reads["manifest_sha256"]:
        raise InputError(
            f"{path}: the run was trained on {_trained_on(trained_on)} (manifest sha256 "
            f"{trained_on['manifest_sha256'][:12]}), this run reads {reads['folder']} (manifest sha256 "
            f"{reads['manifest_sha256'][:12]}): other or re-made shards, cannot resume; resume on the original "
            "shards or train a new run with another --out"
        )
    saved = TrainConfig.from_dict(state["config"], source=str(path))
    changes = config.changes_against(saved)
    if changes:
        listed = "; ".join(f"{k}: checkpoint has {old!r}, this run asks {new!r}"
                           for k, (new, old) in sorted(changes.items()))
        raise InputError(f"{path}: checkpoint of another model or config, cannot resume ({listed})")
    if state["world_size"] != world_size:
        raise InputError(
            f"{path}: checkpoint was trained on {state['world_size']} process(es), this run has {world_size}; "
            "resume with the same number of processes (the global batch and data split depend on it)"
        )


def with_kernels_of(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state `saved`, its groups running the kernels `optimizer` was built with.

    `Optimizer.load_state_dict` restores each group's `fused`/`foreach` flags as saved, and places
    the step counts for them (fused AdamW wants float32 counts on the parameters' device). Checkpoints
    of older fastcell saved AdamW unfused (`fused: None`): without this a resume would run unfused.
    """
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        return saved  # load_state_dict refuses it
    groups = [{**group, **{k: live[k] for k in ("fused", "foreach") if k in live}}
              for group, live in zip(saved["param_groups"], optimizer.param_groups, strict=True)]
    return {**saved, "param_groups": groups}


def restore_training_state(state: dict[str, Any], *, model: nn.Module, optimizer, scheduler, scaler) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(with_kernels_of(state["optimizer"], optimizer))
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] or not scaler.is_enabled():  # a run resumed in fp16 after bf16/fp32 steps: a fresh scale
        scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])


def load_for_inference(
    run_dir_or_checkpoint: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[SimCLR, TrainConfig]:
    """(SimCLR model in eval mode, its TrainConfig) from a run folder or a checkpoint file.

    Embeddings are `model.encoder(x)`: pooled features [B, F]. `config.channels` and
    `config.view_size` (the side of the views it trained on) say what input the model expects.
    """
    path = checkpoint_file(run_dir_or_checkpoint)
    model, config, _ = _trained_model(read_checkpoint(path, map_location), path, map_location)
    return model, config


def load_trained(
    run_dir_or_checkpoint: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[SimCLR, TrainConfig, dict[str, Any]]:
    """`load_for_inference` plus the checkpoint's identity {"checkpoint", "sha256", "step"}: what
    derived outputs (embeddings) record, so that they can tell when the run has trained further.
    The file is read once: the hash is of the bytes the model is loaded from."""
    path = checkpoint_file(run_dir_or_checkpoint)
    digest = hashlib.sha256()
    model, config, step = _trained_model(read_checkpoint(path, map_location, digest), path, map_location)
    return model, config, {"checkpoint": str(path.resolve()), "sha256": digest.hexdigest(), "step": step}


def checkpoint_file(run_dir_or_checkpoint: str | Path) -> Path:
    """The checkpoint of a run folder, or the checkpoint file itself."""
    path = Path(run_dir_or_checkpoint)
    return checkpoint_path(path) if path.is_dir() else path


def untrained_like(run_dir_or_checkpoint: str | Path) -> tuple[SimCLR, TrainConfig]:
    """A freshly initialised model of the architecture a run's checkpoint records (the random-init baseline of
    `fastcell embed --random-init RUN`), and the run's config."""
    path = checkpoint_file(run_dir_or_checkpoint)
    return _architecture(read_checkpoint(path), path)


def _architecture(state: dict[str, Any], path: Path) -> tuple[SimCLR, TrainConfig]:
    """A new model as a checkpoint's state (read from `path`) describes it, with no pretrained weights loaded:
    the checkpoint's replace them, or the model stays an untrained baseline."""
    config = TrainConfig.from_dict(state["config"], source=str(path))
    config.pretrained = None
    return create_model(config), config


def _trained_model(state: dict[str, Any], path: Path, map_location) -> tuple[SimCLR, TrainConfig, int]:
    """(model in eval mode, config, step) of a checkpoint's state read from `path`."""
    model, config = _architecture(state, path)
    model.load_state_dict(state["model"])
    return model.to(map_location).eval(), config, int(state["step"])
