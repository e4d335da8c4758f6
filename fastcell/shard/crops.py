"""Single-cell crops: an S x S window of every channel, centred on each cell.

Convention (the one place it is defined): a cell at (x, y) — x the column, y the row, in
pixels — gets the crop of rows `y0 .. y0 + S` and columns `x0 .. x0 + S` with
`y0 = floor(y + 0.5) - S // 2` and `x0 = floor(x + 0.5) - S // 2`: the centre rounds to the
nearest pixel (halves up), which sits at index S // 2 of the crop.

A crop that would leave the field is a *border* cell. `border="skip"` drops it; `border="pad"`
keeps it and fills the outside with zeros. Either way `n_border` counts them, so nothing is
dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BORDER_MODES = ("skip", "pad")


@dataclass
class CropResult:
    crops: np.ndarray  # (M, C, S, S), the field's dtype
    kept: np.ndarray  # (M,) int64 indices into the centres, in their order
    n_border: int  # skipped (border="skip") or zero-padded (border="pad") cells


def crop_origins(centres: np.ndarray, size: int) -> np.ndarray:
    """(N, 2) int64 top-left corners (x0, y0) of the crops of `centres` (x, y); see module doc."""
    return np.floor(np.asarray(centres, dtype=np.float64) + 0.5).astype(np.int64) - size // 2


def extract_crops(field: np.ndarray, centres: np.ndarray, size: int, *, border: str = "skip") -> CropResult:
    """Crop `size` x `size` windows of a (C, H, W) field around each (x, y) centre.

    Centres must lie on the field (their rounded pixel inside it); others raise ValueError.
    """
    if border not in BORDER_MODES:
        raise ValueError(f"border must be one of {BORDER_MODES}, got {border!r}")
    if field.ndim != 3:
        raise ValueError(f"expected a (C, H, W) field, got shape {field.shape}")
    if size < 1:
        raise ValueError(f"crop size must be positive, got {size}")
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    _, height, width = field.shape
    pixel = np.floor(centres + 0.5)
    on_field = np.isfinite(centres).all(axis=1) & (pixel >= 0).all(axis=1)
    on_field &= (pixel[:, 0] < width) & (pixel[:, 1] < height)
    if not on_field.all():
        bad = np.flatnonzero(~on_field)
        x, y = (float(v) for v in centres[bad[0]])  # plain numbers in the message, not np.float64(...)
        raise ValueError(f"{len(bad)} cell centres lie off the {width}x{height} field, e.g. (x, y) = ({x:g}, {y:g})")

    origins = crop_origins(centres, size)
    inside = (origins >= 0).all(axis=1) & (origins[:, 0] + size <= width) & (origins[:, 1] + size <= height)
    n_border = int((~inside).sum())
    if border == "skip":
        kept, margin = np.flatnonzero(inside), 0
    else:
        # A margin of S zeros around the field holds every crop of an on-field centre.
        kept, margin = np.arange(len(centres)), (size if n_border else 0)
    if len(kept) == 0:  # no cell, or every cell at the border of a field smaller than a crop
        return CropResult(np.zeros((0, field.shape[0], size, size), field.dtype), kept.astype(np.int64), n_border)
    source = np.pad(field, ((0, 0), (margin, margin), (margin, margin))) if margin else field
    windows = np.lib.stride_tricks.sliding_window_view(source, (size, size), axis=(1, 2))
    x0 = origins[kept, 0] + margin
    y0 = origins[kept, 1] + margin
    crops = np.ascontiguousarray(windows[:, y0, x0].transpose(1, 0, 2, 3))
    return CropResult(crops=crops, kept=kept.astype(np.int64), n_border=n_border)
