"""Tiny screens on disk for the `fastcell shard` tests: a generic field table with TIFFs and known cells.

`write_screen` draws each field as round nuclei (DNA channel) inside larger, dimmer cell bodies
(other channels) at known centres, under a per-plate illumination gradient, and writes one uint16
TIFF per channel plus `fields.csv` (plate, well, site, treatment, concentration, moa, one column per channel named
after `CHANNELS` (DNA first),
ImageNumber) and `cells.csv` (the true centres, keyed by ImageNumber, CellProfiler column names).
`read_tars` reads shards back with the standard library alone (no webdataset: it imports torch).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

CHANNELS = ("DNA", "AGP", "Mito", "ER", "RNA")
TREATMENTS = (("DMSO", 0.0, "DMSO"), ("cmpA", 1.0, "MoA-A"), ("cmpB", 3.0, "MoA-B"))


def write_screen(
    root: str | Path,
    plates: tuple[str, ...] = ("P1", "P2"),
    wells: tuple[str, ...] = ("A01", "A02", "B01"),
    sites: int = 2,
    shape: tuple[int, int] = (96, 128),
    n_channels: int = 3,
    cells_per_field: int = 6,
    seed: int = 0,
) -> Path:
    """Write the screen under `root`; returns the field table's path."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    rows, cell_rows = [], []
    number = 0
    for p, plate in enumerate(plates):
        gradient = 1.0 + 0.3 * (p + 1) * xx / shape[1]  # uneven illumination, stronger on later plates
        for w, well in enumerate(wells):
            compound, concentration, moa = TREATMENTS[w % len(TREATMENTS)]
            for site in range(1, sites + 1):
                number += 1
                centres = _centres(rng, shape, cells_per_field, min_distance=16)
                folder = root / plate / well
                folder.mkdir(parents=True, exist_ok=True)
                files = {}
                for c in range(n_channels):
                    radius = 5.0 if c == 0 else 9.0 + c
                    level = 3000.0 if c == 0 else 800.0 * c
                    image = np.full(shape, 200.0 + 50 * c)
                    for x, y in centres:
                        image += level * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * (radius / 1.5) ** 2))
                    image = image * gradient + rng.normal(0, 10, shape)
                    name = f"{plate}/{well}/s{site}_{CHANNELS[c]}.tif"
                    tifffile.imwrite(root / name, np.clip(image, 0, 65535).astype(np.uint16))
                    files[CHANNELS[c]] = name
                rows.append(
                    dict(plate=plate, well=well, site=site, treatment=compound, concentration=concentration,
                         moa=moa, ImageNumber=number, **files)
                )  # fmt: skip
                cell_rows += [
                    dict(ImageNumber=number, ObjectNumber=i + 1, AreaShape_Center_X=x, AreaShape_Center_Y=y)
                    for i, (x, y) in enumerate(centres)
                ]
    table = root / "fields.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    pd.DataFrame(cell_rows).to_csv(root / "cells.csv", index=False)
    return table


def _centres(rng: np.random.Generator, shape: tuple[int, int], n: int, min_distance: float) -> np.ndarray:
    """`n` random (x, y) centres at least `min_distance` apart and 6 px inside the field."""
    points: list[tuple[float, float]] = []
    while len(points) < n:
        x, y = rng.uniform(6, shape[1] - 6), rng.uniform(6, shape[0] - 6)
        if all((x - a) ** 2 + (y - b) ** 2 >= min_distance**2 for a, b in points):
            points.append((round(x, 2), round(y, 2)))
    return np.array(points)


def read_tars(tars) -> dict[int, np.ndarray]:
    """id -> crop of every sample in the tars, read with the standard library (checks key and id agree)."""
    samples: dict[int, np.ndarray] = {}
    for tar in tars:
        with tarfile.open(tar) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext == "id":
                cell_id = int(np.frombuffer(data, "<i8")[0])
                assert key == f"{cell_id:012d}", (tar, name)
                samples[cell_id] = np.load(io.BytesIO(members[f"{key}.npy"]), allow_pickle=False)
    return samples
