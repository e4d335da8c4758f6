"""Which BBBC021 fields a synthetic screen holds: the options and the selection from the real design.

The real design (`fastcell.metadata`) has 55 plates in 10 weeks, 60 wells per plate and 4 sites
per well. A synthetic screen keeps a subset of its rows: some weeks, some plates per week, some
sites per well, and by default only the wells that the MoA benchmark uses (annotated treatments
and DMSO). Plates are chosen per week to cover the week's annotated treatments first (the two
triplicate plate sets of a week hold different compounds), so `--plates-per-week 2` still shows
every treatment of the week.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fastcell.errors import InputError
from fastcell.settings import named_as_options, setting, validate

SITES_PER_WELL = 4
MIN_FIELD_SIDE_CELLS = 2.0  # a field side must hold at least this many DMSO cell diameters
MAX_FIELD_SIDE = 8192
# Field area in squared DMSO cell diameters (256 x 256): about 20k cells, a minute and a half per field.
# Placing cells takes time quadratic in their number, so 8192x8192 px at --cell-size 8 would take hours.
MAX_FIELD_AREA_CELLS = 256**2
BENCHMARK_ROLES = ("treatment", "dmso")


@dataclass(frozen=True)
class SynthConfig:
    """Options of a synthetic screen. None means "all" for weeks, plates per week and sites per well."""

    out_dir: Path
    weeks: tuple[str, ...] | None = None
    plates_per_week: int | None = setting(None, int, low=1, optional=True)
    sites_per_well: int | None = setting(
        1, int, low=1, high=SITES_PER_WELL, optional=True, why=f"BBBC021 has {SITES_PER_WELL} sites per well"
    )
    annotated_only: bool = True
    field_size: tuple[int, int] = (256, 320)
    cell_size: float = setting(32.0, float, low=8, high=512, why="DMSO cell diameter in px")
    seed: int = setting(0, int, low=0, why="numpy seeds are non-negative")
    workers: int | None = setting(None, int, low=1, optional=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        with named_as_options(SynthConfig):
            validate(self)
        height, width = self.field_size
        smallest = int(MIN_FIELD_SIDE_CELLS * self.cell_size)
        if min(height, width) < smallest or max(height, width) > MAX_FIELD_SIDE:
            raise InputError(
                f"--field-size {height}x{width}: each side must be {smallest} to {MAX_FIELD_SIDE} px "
                f"(at least {MIN_FIELD_SIDE_CELLS:g} cell diameters of {self.cell_size:g} px)"
            )
        area = (height / self.cell_size) * (width / self.cell_size)
        if area > MAX_FIELD_AREA_CELLS:  # refused before any work, not hours into the first field
            raise InputError(
                f"--field-size {height}x{width} with --cell-size {self.cell_size:g}: {area:,.0f} squared cell "
                f"diameters per field, at most {MAX_FIELD_AREA_CELLS:,} (about 20k cells; placing them takes "
                "time quadratic in their number); use a smaller --field-size or a larger --cell-size"
            )

    @property
    def scale(self) -> float:
        """Length scale of the cells relative to the default 32 px cell."""
        return self.cell_size / 32.0

    def resolved_workers(self) -> int:
        return self.workers if self.workers is not None else max(1, min(4, os.cpu_count() or 1))

    def render_settings(self) -> dict:
        """The options that change pixels: a screen can only be resumed or extended with equal ones."""
        return {"seed": self.seed, "field_size": list(self.field_size), "cell_size": self.cell_size}


def parse_weeks(text: str) -> tuple[str, ...] | None:
    """"all" -> None; "1,2,10" or "Week1,Week2" -> ("Week1", "Week2", "Week10")."""
    if text.strip().lower() == "all":
        return None
    weeks = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(?:week)?(\d+)\s*", part, flags=re.IGNORECASE)
        if match is None:
            raise InputError(f"--weeks {text!r}: expected 'all' or a comma list like '1,2,3' or 'Week1,Week2'")
        weeks.append(f"Week{int(match.group(1))}")
    return tuple(dict.fromkeys(weeks))


def parse_count(text: str, option: str) -> int | None:
    """"all" -> None, "3" -> 3 (for --plates-per-week and --sites-per-well)."""
    if text.strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{option} {text!r}: expected a whole number or 'all'") from None


def parse_field_size(text: str) -> tuple[int, int]:
    """"256x320" -> (256, 320): height x width in pixels."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None:
        raise InputError(f"--field-size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 256x320 or 1024x1280")
    return int(match.group(1)), int(match.group(2))


def rank_plates(week_rows: pd.DataFrame) -> list[str]:
    """Plates of one week, best first: each next plate adds the most treatments not yet covered."""
    treated = week_rows[week_rows["role"] == "treatment"]
    treatments = {
        plate: set(zip(rows["compound"], rows["concentration"], strict=True))
        for plate, rows in treated.groupby("plate")
    }
    remaining = sorted(week_rows["plate"].unique())
    ranked, covered = [], set()
    while remaining:
        best = max(remaining, key=lambda p: (len(treatments.get(p, set()) - covered),
                                             len(treatments.get(p, set())), -remaining.index(p)))
        ranked.append(best)
        covered |= treatments.get(best, set())
        remaining.remove(best)
    return ranked


def select_fields(design: pd.DataFrame, config: SynthConfig) -> pd.DataFrame:
    """The rows of an annotated design table (`fastcell.metadata.annotate`) that the screen holds."""
    known_weeks = sorted(design["batch"].unique(), key=lambda w: int(w[4:]))
    if config.weeks is not None:
        unknown = [w for w in config.weeks if w not in known_weeks]
        if unknown:
            raise InputError(f"--weeks: unknown week(s) {', '.join(unknown)}; BBBC021 has {', '.join(known_weeks)}")
        design = design[design["batch"].isin(config.weeks)]
    if config.annotated_only:
        design = design[design["role"].isin(BENCHMARK_ROLES)]
    if config.plates_per_week is not None:
        keep = [p for _, rows in design.groupby("batch") for p in rank_plates(rows)[: config.plates_per_week]]
        design = design[design["plate"].isin(keep)]
    if config.sites_per_well is not None:
        design = design[design["site"] <= config.sites_per_well]
    return design.reset_index(drop=True)  # in the order of the real image table
