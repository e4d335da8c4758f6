"""`ShardConfig`: what `fastcell shard` is asked to do, its validation, and the record (with its hash)
the manifest keeps so a rerun can tell whether a folder holds the same configuration's shards."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastcell.errors import InputError
from fastcell.shard.codecs import CODECS, DEFAULT_CODEC
from fastcell.shard.crops import BORDER_MODES
from fastcell.shard.sources import DEFAULT_ROLES, Locations, Screen, file_digest

SHARD_TARGET_BYTES = 256 * 2**20  # default shard size: ~256 MiB of samples
TAR_OVERHEAD_PER_SAMPLE = 3 * 512 + 128  # two member headers, padding, the .npy header
RUN_OPTIONS = ("out", "workers", "on_error", "overwrite", "keep_work")  # do not change the output
SCALING_METHODS = ("none", "plate-percentile", "plate-dmso")
SPLIT_METHODS = ("random", "plate")
ERROR_MODES = ("fail", "skip")


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


@dataclass
class ShardConfig:
    """Everything `fastcell shard` needs; the CLI parses its options into this."""

    source: Path  # a BBBC021-layout folder or a field table CSV
    out: Path
    locations: Path | None = None  # cell centres table; None: detect nuclei on the DNA channel
    channels: tuple[str, ...] | None = None  # None: BBBC021's three, or the table's image columns
    dna_channel: str | None = None  # None: the channel named like DNA/DAPI/Hoechst
    roles: tuple[str, ...] = DEFAULT_ROLES
    crop_size: int = 96
    border: str = "skip"
    illumination: bool = True
    scaling: str = "none"
    scaling_percentiles: tuple[float, float] = (0.1, 99.9)
    shard_size: int | None = None  # samples per shard; None: ~256 MiB per shard
    codec: str = DEFAULT_CODEC  # how crops are stored: a name in fastcell.shard.codecs.CODECS
    val_fraction: float = 0.0
    split: str = "random"
    seed: int = 0
    workers: int = field(default_factory=default_workers)
    on_error: str = "fail"
    overwrite: bool = False
    keep_work: bool = False

    def __post_init__(self) -> None:
        self.source, self.out = Path(self.source), Path(self.out)
        self.locations = None if self.locations is None else Path(self.locations)
        self.channels = None if self.channels is None else tuple(self.channels)
        self.roles = tuple(self.roles)
        self.scaling_percentiles = tuple(self.scaling_percentiles)

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise InputError(message)

        need(self.crop_size >= 2, f"--crop must be at least 2 pixels, got {self.crop_size}")
        need(self.border in BORDER_MODES, f"--border must be one of {BORDER_MODES}, got {self.border!r}")
        need(
            self.scaling in SCALING_METHODS,
            f"--scaling must be one of {SCALING_METHODS}, got {self.scaling!r}",
        )
        lo, hi = self.scaling_percentiles
        need(0 <= lo < hi <= 100, f"scaling percentiles must satisfy 0 <= lo < hi <= 100, got {lo}, {hi}")
        need(self.split in SPLIT_METHODS, f"--split must be one of {SPLIT_METHODS}, got {self.split!r}")
        need(0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        need(self.on_error in ERROR_MODES, f"--on-error must be one of {ERROR_MODES}, got {self.on_error!r}")
        need(self.workers >= 1, f"--workers must be at least 1, got {self.workers}")
        need(
            self.shard_size is None or self.shard_size >= 1,
            f"--shard-size must be >= 1, got {self.shard_size}",
        )
        need(bool(self.roles), "--roles must name at least one role")
        need(self.codec in CODECS, f"--codec must be one of {tuple(CODECS)}, got {self.codec!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("source", "out", "locations"):
            d[key] = None if d[key] is None else str(Path(d[key]).resolve())
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
    tables = [*screen.tables, *([locations.path] if locations else [])]
    record.update(
        channels=list(screen.channels),
        dna_channel=screen.dna_channel,
        shard_size=shard_size,
        source_kind=screen.kind,
        inputs={str(p.resolve()): file_digest(p) for p in tables},
    )
    record["hash"] = config_hash(record)
    return record


def config_hash(record: dict) -> str:
    """Hash of what determines the output: every option except how the run is carried out."""
    essential = {k: v for k, v in record.items() if k not in (*RUN_OPTIONS, "hash")}
    return hashlib.sha256(json.dumps(essential, sort_keys=True).encode()).hexdigest()[:16]


def describe_difference(old: dict, new: dict) -> str:
    """The first few options that differ between two configuration records, as `key: old -> new`."""
    keys = sorted(
        k for k in set(old) | set(new) if k not in (*RUN_OPTIONS, "hash") and old.get(k) != new.get(k)
    )
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) or "unrecorded settings"
