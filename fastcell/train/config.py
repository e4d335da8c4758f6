"""`TrainConfig`: every setting of a SimCLR run, resolved once and saved as RUN_DIR/config.json.

Precedence (lowest first): the defaults below, a config file (YAML or JSON; `--config`), the
command-line options the user actually passed. On `--resume` the run's saved config.json takes
the place of the defaults, so `fastcell train --out RUN_DIR --resume` needs nothing else.
Files written by older fastcell are read through `upgraded` (see there).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fastcell.errors import InputError
from fastcell.loaders import BACKENDS
from fastcell.precision import PRECISIONS
from fastcell.settings import Check, SettingError, option_name, setting, validate
from fastcell.train.encoders import ARCHS, STEMS

CONFIG_NAME = "config.json"
OPTIMIZERS = ("lars", "adamw")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's

# Per-optimiser defaults: the learning rate for a global batch of 256 (scaled linearly with the
# global batch) and the weight decay. LARS follows SimCLR (0.3 x batch/256, 1e-6).
DEFAULT_BASE_LR = {"lars": 0.3, "adamw": 1e-3}
DEFAULT_WEIGHT_DECAY = {"lars": 1e-6, "adamw": 0.05}

# Settings that may change between a run and its resumption without changing the result (num_workers only with
# the DALI loader: the torch loader's workers decide which samples share a batch).
RESUME_FREE = frozenset(
    {"shards", "out", "resume", "progress", "log_every", "checkpoint_every", "knn_every", "num_workers",
     "compile", "compile_mode", "tensorboard"}
)


@dataclass
class TrainConfig:
    """Settings of one SimCLR training run (see `fastcell train --help` for each).

    Every field's type and range is declared here once (`fastcell.settings.setting`) and checked
    when the config is made, whether the values come from options, a config file or a saved run.
    """

    shards: str | None = setting(None, str, optional=True)  # the one shard folder a run trains on
    out: str = setting("runs/simclr", str)
    # model
    arch: str = setting("resnet18", str, choices=ARCHS)
    stem: str = setting("standard", str, choices=STEMS)
    pretrained: str | None = setting(None, str, optional=True)
    proj_hidden: int | None = setting(None, int, low=1, optional=True)
    proj_dim: int = setting(128, int, low=1)
    temperature: float = setting(0.2, float, low=0, low_open=True)
    # data: channels are read from the shards and view_size (None: the shards' crop side) resolved
    # when training starts, so a saved run records the input its model takes; a resumed run must match them
    channels: list[str] | None = setting(None, list, optional=True)
    view_size: int | None = setting(None, int, low=1, optional=True)
    # AugmentSpec fields that differ from its defaults
    augment: dict[str, Any] = setting(kind=dict, default_factory=dict, option="--augment")
    loader: str = setting("dali", str, choices=BACKENDS)
    num_workers: int = setting(2, int, low=0)
    # optimisation
    batch_size: int = setting(256, int, low=2, why="NT-Xent needs other cells of the batch as negatives")
    epochs: int = setting(10, int, low=1)
    max_steps: int | None = setting(None, int, low=1, optional=True, why="leave it unset to train --epochs")
    optimizer: str = setting("lars", str, choices=OPTIMIZERS)
    base_lr: float | None = setting(None, float, low=0, low_open=True, optional=True)
    weight_decay: float | None = setting(None, float, low=0, optional=True)
    momentum: float = setting(0.9, float, low=0, high=1, high_open=True)
    warmup_epochs: float = setting(1.0, float, low=0)
    precision: str = setting("auto", str, choices=PRECISIONS)
    channels_last: bool = setting(True, bool)
    compile: bool = setting(False, bool)
    compile_mode: str = setting("default", str, choices=COMPILE_MODES)
    seed: int = setting(0, int, low=0)
    # bookkeeping
    checkpoint_every: int = setting(200, int, low=1)
    log_every: int = setting(10, int, low=1)
    knn_every: int = setting(0, int, low=0, why="0 turns the kNN monitor off")
    tensorboard: bool = setting(True, bool)
    progress: bool = setting(True, bool)
    resume: bool = setting(False, bool)

    def __post_init__(self) -> None:
        self.shards, self.out, self.pretrained = (str(p) if isinstance(p, Path) else p
                                                  for p in (self.shards, self.out, self.pretrained))
        validate(self)
        self.augment_spec()  # reject unknown or invalid augmentation settings now, not at the first batch

    def augment_spec(self):
        """The `AugmentSpec` of the training views: its defaults, changed by `augment` and `view_size`.

        Each setting is checked on its own first (type from AugmentSpec's default, then its range),
        so an error names the setting (`augment.blur_p`), then all of them together.
        """
        from fastcell.loaders.spec import AugmentSpec

        defaults = {f.name: f.default for f in fields(AugmentSpec) if f.name != "output_size"}
        unknown = sorted(set(self.augment) - set(defaults))
        if unknown:
            raise InputError(f"unknown augmentation setting(s) {', '.join(unknown)} (known: {', '.join(sorted(defaults))}; "
                             "the view size is view_size)")
        checked = {}
        for name, value in self.augment.items():
            default = defaults[name]
            if isinstance(default, tuple):
                if not isinstance(value, list | tuple) or len(value) != len(default):
                    raise SettingError(f"augment.{name}", f"must be a range LOW,HIGH, got {value!r}")
                value = [Check(float).apply(f"augment.{name}", v) for v in value]
            else:
                value = Check(type(default)).apply(f"augment.{name}", value)
            try:
                AugmentSpec(**{name: value})
            except InputError as err:
                raise SettingError(f"augment.{name}", f"is out of range: {err}") from None
            checked[name] = value
        try:
            return AugmentSpec(output_size=self.view_size, **checked)
        except (TypeError, ValueError) as err:
            raise InputError(f"invalid augmentation settings: {err}") from err

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
        """The config saved in `source` (a run's config.json or checkpoint), older forms upgraded."""
        values = upgraded(values, source)
        check_known(values, source)
        return cls(**values)

    def changes_against(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """Settings (outside RESUME_FREE) whose values differ: {name: (self's, other's)}."""
        mine, theirs = self.to_dict(), other.to_dict()
        changes = {k: (mine[k], theirs.get(k)) for k in mine if k not in RESUME_FREE and mine[k] != theirs.get(k)}
        if self.loader == "torch" and max(1, self.num_workers) != max(1, other.num_workers):
            changes["num_workers"] = (self.num_workers, other.num_workers)  # the torch loader's decide the batches
        return changes


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


def upgraded(values: dict[str, Any], source: str, saved_run: bool = True) -> dict[str, Any]:
    """Settings read from `source`, with the forms older fastcell wrote turned into today's.
    `saved_run`: `source` is a run's own config.json or checkpoint (False: a `--config` file).

    - `shards` was a list that only ever held one folder: `[FOLDER]` is FOLDER, `[]` unset; a longer
      list is refused (training reads one shard folder).
    - `crop_size` recorded the views' side a run resolved (from `view_size`; None: the shards' crop
      side), so in a saved run it is `view_size`. In a `--config` file it never set the views (the
      trainer took the side from the shards), so it is dropped there: the views stay what they were.
    """
    values = dict(values)
    if isinstance(values.get("shards"), list):
        folders = values["shards"]
        if len(folders) > 1:
            raise InputError(f"{source}: shards lists {len(folders)} folders ({', '.join(map(str, folders))}); "
                             "training reads one shard folder")
        values["shards"] = folders[0] if folders else None
    if "crop_size" in values:
        crop_size = values.pop("crop_size")
        if saved_run and values.get("view_size") is None:
            values["view_size"] = crop_size
        elif not saved_run:  # said, not silently dropped: a user may have meant it
            print(f"{source}: crop_size {crop_size} ignored: it never set the views (they take the shards' crop "
                  "side; view_size sets it)", file=sys.stderr)
    return values


def check_known(values: dict[str, Any], source: str) -> None:
    """InputError naming `source` when `values` holds names that are not TrainConfig settings."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"{source}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")


def resolve_config(
    overrides: dict[str, Any], config_file: str | Path | None = None, out: str | Path | None = None
) -> TrainConfig:
    """Merge saved run config (on resume) or defaults, then a config file, then explicit overrides.

    A value out of range or of the wrong type is reported the way it was given: `--batch-size`
    for an option, `FILE: batch_size` for a config file (or the run's saved config.json).
    """
    values: dict[str, Any] = {}
    origins: dict[str, str | None] = {}  # setting (or augment.NAME) -> the file it came from; None: an option

    def merge(layer: dict[str, Any], origin: str | None) -> None:  # augmentation settings merge name by name
        check_known(layer, origin or "options")
        if not isinstance(layer.get("augment") or {}, dict):
            raise SettingError("augment", f"must be a mapping of augmentation settings, got {layer['augment']!r}"
                               ).named(label("augment", origin))
        augment = {**(values.get("augment") or {}), **(layer.get("augment") or {})}
        values.update(layer)
        origins.update({name: origin for name in layer})
        origins.update({f"augment.{name}": origin for name in layer.get("augment") or {}})
        if augment:
            values["augment"] = augment

    def label(name: str, origin: str | None) -> str:
        if origin is not None:
            return f"{origin}: {name}"
        if name.startswith("augment."):
            return f"--augment {name.removeprefix('augment.')}"
        return option_name(TrainConfig, name)

    resume = overrides.get("resume")
    if resume and out is not None and (Path(out) / CONFIG_NAME).is_file():
        saved_path = Path(out) / CONFIG_NAME
        try:
            saved = json.loads(saved_path.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"{saved_path}: unreadable run config ({err})") from err
        merge(upgraded(saved, str(saved_path)), str(saved_path))
    elif resume and out is not None:
        from fastcell.train.checkpoint import checkpoint_path, read_checkpoint

        if checkpoint_path(out).is_file():  # config.json lost: the checkpoint holds the same settings
            merge(upgraded(read_checkpoint(checkpoint_path(out))["config"], str(checkpoint_path(out))),
                  str(checkpoint_path(out)))
    if config_file is not None:
        merge(upgraded(read_config_file(config_file), str(config_file), saved_run=False), str(config_file))
    merge({k: v for k, v in overrides.items() if v is not None}, None)
    if out is not None:
        values["out"] = str(out)
    try:
        return TrainConfig(**values)
    except SettingError as err:
        raise err.named(label(err.name, origins.get(err.name))) from None
