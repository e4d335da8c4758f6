"""`ShardConfig`: what `fastcell shard` is asked to do, its validation, and the record (with its hash)
the manifest keeps so a rerun can tell whether a folder holds the same configuration's shards."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastcell.errors import InputError
from fastcell.format.codecs import CODECS, DEFAULT_CODEC
from fastcell.remote import as_path, resolved
from fastcell.settings import named_as_options, setting, validate
from fastcell.shard.crops import BORDER_MODES
from fastcell.shard.sources import DEFAULT_ROLES, Locations, Screen

SHARD_TARGET_BYTES = 256 * 2**20  # default shard size: ~256 MiB of samples
TAR_OVERHEAD_PER_SAMPLE = 3 * 512 + 128  # two member headers, padding, the .npy header
RUN_OPTIONS = ("out", "workers", "dask", "on_error", "overwrite", "keep_work")  # do not change the output
SCALING_METHODS = ("none", "plate-percentile", "plate-dmso")
SPLIT_METHODS = ("random", "plate")
ERROR_MODES = ("fail", "skip")


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


@dataclass
class ShardConfig:
    """Everything `fastcell shard` needs; the CLI parses its options into this."""

    source: Path  # a BBBC021-layout folder, a field table CSV or an OME-Zarr plate (local, or a URL)
    out: Path
    locations: Path | None = None  # cell centres table; None: detect nuclei on the DNA channel
    channels: tuple[str, ...] | None = None  # None: BBBC021's three, or the table's image columns
    dna_channel: str | None = None  # None: the channel named like DNA/DAPI/Hoechst
    roles: tuple[str, ...] = DEFAULT_ROLES
    crop_size: int = setting(96, int, low=2, option="--crop")  # side of the stored crops in px
    border: str = setting("skip", str, choices=BORDER_MODES)
    illumination: bool = True
    scaling: str = setting("none", str, choices=SCALING_METHODS)
    scaling_percentiles: tuple[float, float] = (0.1, 99.9)
    shard_size: int | None = setting(None, int, low=1, optional=True)  # samples per shard; None: ~256 MiB
    codec: str = setting(DEFAULT_CODEC, str, choices=tuple(CODECS))  # how crops are stored (format/codecs.py)
    val_fraction: float = setting(0.0, float, low=0, high=1, high_open=True)
    split: str = setting("random", str, choices=SPLIT_METHODS)
    seed: int = 0
    workers: int = setting(kind=int, default_factory=default_workers, low=1)
    dask: str | None = None  # None: a local process pool of `workers`; else `local:N` or a scheduler address
    on_error: str = setting("fail", str, choices=ERROR_MODES)
    overwrite: bool = False
    keep_work: bool = False

    def __post_init__(self) -> None:
        self.source, self.out = as_path(self.source), Path(self.out)  # inputs may be URLs (fastcell.remote)
        self.locations = None if self.locations is None else as_path(self.locations)
        self.channels = None if self.channels is None else tuple(self.channels)
        self.roles = tuple(self.roles)
        self.scaling_percentiles = tuple(self.scaling_percentiles)

    def validate(self) -> None:
        """InputError naming the option of the first setting out of its range or choices."""
        with named_as_options(ShardConfig):
            validate(self)
        lo, hi = self.scaling_percentiles
        if not 0 <= lo < hi <= 100:
            raise InputError(f"scaling percentiles must satisfy 0 <= lo < hi <= 100, got {lo}, {hi}")
        twice = next((c for i, c in enumerate(self.channels or ()) if c in self.channels[:i]), None)
        if twice is not None:
            raise InputError(f"--channels names {twice} twice; name each channel once")
        if not self.roles:
            raise InputError("--roles must name at least one role")
        if self.dask is not None:
            from fastcell.dask_pool import check_spec

            check_spec(self.dask)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("source", "out", "locations"):
            d[key] = None if d[key] is None else resolved(d[key])
        for key in ("channels", "roles", "scaling_percentiles"):
            d[key] = None if d[key] is None else list(d[key])
        return d


def auto_shard_size(n_channels: int, crop_size: int) -> int:
    """Samples per shard for ~SHARD_TARGET_BYTES shards (4,712 for 3 x 96 x 96 crops, 2,861 for 5 x 96 x 96)."""
    per_sample = n_channels * crop_size * crop_size * 2 + TAR_OVERHEAD_PER_SAMPLE
    return max(1, SHARD_TARGET_BYTES // per_sample)


def config_record(config: ShardConfig, screen: Screen, locations: Locations | None, shard_size: int) -> dict:
    """The configuration as the manifest records it: options, resolved channels, input table digests."""
    record = config.to_dict()
    tables = {**screen.tables, **({locations.path: locations.digest} if locations else {})}
    record.update(
        channels=list(screen.channels),
        dna_channel=screen.dna_channel,
        shard_size=shard_size,
        source_kind=screen.kind,
        inputs={resolved(p): digest for p, digest in tables.items()},
    )
    record["hash"] = config_hash(record)
    return record


def config_hash(record: dict) -> str:
    """Hash of what determines the output: every option except how the run is carried out."""
    essential = {k: v for k, v in record.items() if k not in (*RUN_OPTIONS, "hash")}
    return hashlib.sha256(json.dumps(essential, sort_keys=True).encode()).hexdigest()[:16]


def moved_only(old: dict, new: dict) -> bool:
    """Whether two configuration records differ only in where the inputs lie: a screen folder moved or copied
    elsewhere, its tables the same (by their SHA-256, under the same names). Its shards stay what they were."""
    def located_nowhere(record: dict) -> dict:
        inputs = {Path(path).name: digest for path, digest in (record.get("inputs") or {}).items()}
        return {**record, "source": None, "locations": None, "inputs": inputs}

    return bool(old) and config_hash(located_nowhere(old)) == config_hash(located_nowhere(new))


def describe_difference(old: dict, new: dict) -> str:
    """The first few options that differ between two configuration records, as `key: old -> new`."""
    keys = sorted(
        k for k in set(old) | set(new) if k not in (*RUN_OPTIONS, "hash") and old.get(k) != new.get(k)
    )
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) or "unrecorded settings"
