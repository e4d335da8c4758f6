"""`TrainConfig`: every setting of a SimCLR run, resolved once and saved as RUN_DIR/config.json.

Precedence (lowest first): the defaults below, a config file (YAML or JSON; `--config`), the
command-line options the user actually passed. On `--resume` the run's saved config.json takes
the place of the defaults, so `fastcell train --out RUN_DIR --resume` needs nothing else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fastcell.errors import InputError

CONFIG_NAME = "config.json"
ARCHS = ("resnet18", "resnet34", "resnet50")
STEMS = ("standard", "small")
OPTIMIZERS = ("lars", "adamw")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
LOADER_BACKENDS = ("dali", "torch")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's

# Per-optimiser defaults: the learning rate for a global batch of 256 (scaled linearly with the
# global batch) and the weight decay. LARS follows SimCLR (0.3 x batch/256, 1e-6).
DEFAULT_BASE_LR = {"lars": 0.3, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"lars": 1e-6, "adamw": 0.05}

# Settings that may change between a run and its resumption without changing the result.
RESUME_FREE = frozenset(
    {"shards", "out", "resume", "progress", "log_every", "checkpoint_every", "knn_every", "num_workers",
     "compile", "compile_mode", "tensorboard"}
)


@dataclass
class TrainConfig:
    """Settings of one SimCLR training run (see `fastcell train --help` for each)."""

    shards: list[str] = field(default_factory=list)
    out: str = "runs/simclr"
    # model
    arch: str = "resnet18"
    stem: str = "standard"
    pretrained: str | None = None
    proj_hidden: int | None = None
    proj_dim: int = 128
    temperature: float = 0.2
    # data (channels and crop_size are read from the shards; a resumed run must match them)
    channels: list[str] | None = None
    crop_size: int | None = None
    view_size: int | None = None
    augment: dict[str, Any] = field(default_factory=dict)  # AugmentSpec fields that differ from its defaults
    loader: str = "dali"
    num_workers: int = 2
    # optimisation
    batch_size: int = 256
    epochs: int = 10
    max_steps: int | None = None
    optimizer: str = "lars"
    base_lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"
    seed: int = 0
    # bookkeeping
    checkpoint_every: int = 200
    log_every: int = 10
    knn_every: int = 0
    tensorboard: bool = True
    progress: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("arch", ARCHS), ("stem", STEMS), ("optimizer", OPTIMIZERS),
                              ("precision", PRECISIONS), ("loader", LOADER_BACKENDS),
                              ("compile_mode", COMPILE_MODES)):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("batch_size", "epochs", "proj_dim", "log_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise InputError(f"temperature must be positive, got {self.temperature}")
        self.shards = [str(s) for s in self.shards]
        self.augment_spec()  # reject unknown or invalid augmentation settings now, not at the first batch

    def augment_spec(self):
        """The `AugmentSpec` of the training views: its defaults, changed by `augment` and `view_size`."""
        from fastcell.loaders.spec import AugmentSpec

        known = {f.name for f in fields(AugmentSpec)} - {"output_size"}
        unknown = sorted(set(self.augment) - known)
        if unknown:
            raise InputError(f"unknown augmentation setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))}; "
                             "the view size is view_size)")
        try:
            return AugmentSpec(output_size=self.view_size, **self.augment)
        except (TypeError, ValueError) as err:
            raise InputError(f"invalid augmentation setting: {err}") from err

    @property
    def lr_at_256(self) -> float:
        return self.base_lr if self.base_lr is not None else DEFAULT_BASE_LR[self.optimizer]

    @property
    def resolved_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else DEFAULT_WEIGHT_DECAY[self.optimizer]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"{source}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**values)

    def changes_against(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """Settings (outside RESUME_FREE) whose values differ: {name: (self's, other's)}."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs.get(k)) for k in mine if k not in RESUME_FREE and mine[k] != theirs.get(k)}


def parse_augment_options(pairs: list[str]) -> dict[str, Any]:
    """`["crop_scale=0.5,1", "jitter_p=0"]` (repeated `--augment` options) -> {name: value}."""
    import yaml

    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip() or not text.strip():
            raise InputError(f"--augment {pair!r}: expected NAME=VALUE, e.g. crop_scale=0.5,1 or jitter_p=0.5")
        parts = [yaml.safe_load(part) for part in text.split(",")]
        values[name.strip()] = parts if len(parts) > 1 else parts[0]
    return values


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict of settings (checked when merged)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(f"{path}: cannot read config file ({err.strerror})") from err
    import yaml

    is_json = path.suffix.lower() == ".json"
    try:
        values = json.loads(text) if is_json else (yaml.safe_load(text) or {})
    except (ValueError, yaml.YAMLError) as err:
        raise InputError(f"{path}: not valid {'JSON' if is_json else 'YAML'} ({err})") from err
    if not isinstance(values, dict):
        raise InputError(f"{path}: a config file must hold a mapping of settings, got {type(values).__name__}")
    return {k.replace("-", "_"): v for k, v in values.items()}


def resolve_config(
    overrides: dict[str, Any], config_file: str | Path | None = None, out: str | Path | None = None
) -> TrainConfig:
    """Merge saved run config (on resume) or defaults, then a config file, then explicit overrides."""
    values: dict[str, Any] = {}

    def merge(layer: dict[str, Any]) -> None:  # augmentation settings merge name by name
        augment = {**(values.get("augment") or {}), **(layer.get("augment") or {})}
        values.update(layer)
        if augment:
            values["augment"] = augment

    source = "options"
    resume = overrides.get("resume")
    if resume and out is not None and (Path(out) / CONFIG_NAME).is_file():
        saved_path = Path(out) / CONFIG_NAME
        merge(json.loads(saved_path.read_text()))
        source = str(saved_path)
    if config_file is not None:
        merge(read_config_file(config_file))
        source = str(config_file)
    merge({k: v for k, v in overrides.items() if v is not None})
    if out is not None:
        values["out"] = str(out)
    return TrainConfig.from_dict(values, source=source)
