"""Illumination correction and intensity scaling, per plate and channel.

Microscope fields are unevenly lit (vignetting, uneven excitation): the same cell looks dimmer
in a corner than in the centre. As CellProfiler does, fastcell estimates one illumination
function per plate and channel from all the plate's fields and divides every field by it.

The illumination function is a *smoothed robust mean* over the plate's fields:

- each field's channel is clipped at its own 99th percentile (`clip_percentile`), so a few
  bright cells or debris do not print into the function;
- the clipped fields are summed per pixel in exact integer arithmetic (`IlluminationAccumulator`):
  the result is the same whatever the order fields arrive in, and accumulators filled by
  parallel workers merge exactly;
- the per-pixel mean is smoothed with a wide Gaussian (`sigma`, default 1/20 of the shorter
  side), computed on a block-averaged copy for speed and extended by odd reflection at the
  border (so a vignette's slope is not flattened there), then divided by its median so that a
  channel keeps its typical brightness after correction. Values below `floor` (default 0.05)
  are raised to it, so a dark corner is amplified at most 20x.

Intensity scaling (optional) maps each plate's channel from its low..high percentiles of the
*corrected* fields (default 0.1 and 99.9) to the full 0..65535 range (`plate-percentile`), or
references it to the plate's negative controls (`plate-dmso`, `fit_dmso_scaling` /
`apply_dmso_scaling`): the background of its DMSO crops goes to `DMSO_PEDESTAL` and their mean
pixel to `DMSO_PEDESTAL + DMSO_LEVEL`, so a plate imaged brighter or over a higher background
gives the same numbers, and a treated cell keeps its brightness relative to its plate's DMSO. `IntensityHistogram`
accumulates exact per-channel histograms (65,536 bins) of uint16 fields, again order-independent
and mergeable; the pipeline fills it in a cheap second pass (read, correct, count; optionally
on every `stride`-th pixel), then `fit_percentile_scaling` reads the percentiles off it.

`save_illumination` / `load_illumination` / `load_scaling` keep the functions and scalings of all plates in one
`illumination.npz` beside the shards.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

from fastcell.errors import InputError
from fastcell.format.stats import HISTOGRAM_BINS, add_to_histogram, histogram_percentiles
from fastcell.io import atomic_path

UINT16_MAX = 65535
# plate-dmso scaling: each plate's background and mean DMSO crop pixel land on these values
DMSO_BACKGROUND_PERCENTILE = 1.0
DMSO_PEDESTAL = 1000.0
DMSO_LEVEL = 4000.0


def _channel_histograms(field: np.ndarray) -> np.ndarray:
    """(C, HISTOGRAM_BINS) int64 pixel-value counts of a uint16 (C, H, W) field (`format.stats`' counting)."""
    counts = np.zeros((field.shape[0], HISTOGRAM_BINS), dtype=np.int64)
    add_to_histogram(counts, field[None])
    return counts


def _check_field(field: np.ndarray, n_channels: int, shape: tuple[int, int] | None = None) -> None:
    if field.dtype != np.uint16 or field.ndim != 3 or field.shape[0] != n_channels:
        raise ValueError(f"expected a uint16 field of {n_channels} channels (C, H, W), got {field.dtype} {field.shape}")
    if shape is not None and field.shape[1:] != tuple(shape):
        raise ValueError(f"field of {field.shape[1]}x{field.shape[2]} pixels, expected {shape[0]}x{shape[1]}")


class IlluminationAccumulator:
    """Exact, order-independent running sum of percentile-clipped fields of one plate."""

    def __init__(self, n_channels: int, shape: tuple[int, int], *, clip_percentile: float = 99.0):
        self.n_channels = int(n_channels)
        self.shape = (int(shape[0]), int(shape[1]))
        self.clip_percentile = float(clip_percentile)
        self.total = np.zeros((self.n_channels, *self.shape), dtype=np.uint64)
        self.count = 0

    def add(self, field: np.ndarray) -> None:
        """Add one uint16 (C, H, W) field, each channel clipped at its `clip_percentile`."""
        _check_field(field, self.n_channels, self.shape)
        ceilings = histogram_percentiles(_channel_histograms(field), [self.clip_percentile])[:, 0]
        clipped = np.minimum(field, ceilings.astype(np.uint16)[:, None, None])
        self.total += clipped
        self.count += 1

    def merge(self, other: IlluminationAccumulator) -> IlluminationAccumulator:
        """Add another accumulator's fields into this one (e.g. from a parallel worker); returns self."""
        if (other.n_channels, other.shape, other.clip_percentile) != (
            self.n_channels,
            self.shape,
            self.clip_percentile,
        ):
            raise ValueError("cannot merge illumination accumulators of different channels, shapes or clipping")
        self.total += other.total
        self.count += other.count
        return self

    def finish(self, *, sigma: float | None = None, floor: float = 0.05) -> np.ndarray:
        """The illumination function, float32 (C, H, W), each channel's median 1 (see module doc)."""
        if self.count == 0:
            raise ValueError("no fields were added; cannot estimate an illumination function")
        if sigma is None:
            sigma = min(self.shape) / 20.0
        mean = self.total.astype(np.float64) / self.count
        illum = np.stack([_smooth(channel, sigma) for channel in mean])
        median = np.median(illum, axis=(1, 2), keepdims=True)
        illum /= np.where(median > 0, median, 1.0)  # an all-dark channel stays dark
        return np.maximum(illum, floor).astype(np.float32)


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    """Wide Gaussian smoothing, done on a block-averaged image and upsampled back.

    The image is extended by odd reflection (2 f(edge) - f(edge - d)), which continues a slope
    across the border: an ordinary mirror would flatten a vignette's fall-off at the edges.
    """
    from scipy import ndimage as ndi

    factor = max(1, int(sigma // 4))
    height, width = image.shape
    padded = np.pad(image, ((0, -height % factor), (0, -width % factor)), mode="edge")
    small = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor).mean(axis=(1, 3))
    margin = int(np.ceil(4 * sigma / factor))
    extended = np.pad(small, margin, mode="reflect", reflect_type="odd")
    small = ndi.gaussian_filter(extended, sigma / factor, mode="nearest")[margin:-margin, margin:-margin]
    if factor == 1:
        return small[:height, :width]
    # grid_mode: pixel areas line up (block i covers pixels i*factor .. (i+1)*factor)
    return ndi.zoom(small, factor, order=1, mode="nearest", grid_mode=True)[:height, :width]


def correct_illumination(field: np.ndarray, illum: np.ndarray) -> np.ndarray:
    """Divide a uint16 (C, H, W) field by its illumination function; round half to even, clip to uint16."""
    if field.shape != illum.shape:
        raise ValueError(f"field {field.shape} and illumination function {illum.shape} differ in shape")
    corrected = np.rint(field.astype(np.float32) / illum.astype(np.float32, copy=False))
    return np.clip(corrected, 0, UINT16_MAX).astype(np.uint16)


class IntensityHistogram:
    """Exact per-channel histograms of uint16 fields: order-independent, mergeable."""

    def __init__(self, n_channels: int):
        self.n_channels = int(n_channels)
        self.counts = np.zeros((self.n_channels, HISTOGRAM_BINS), dtype=np.int64)

    def add(self, field: np.ndarray, *, stride: int = 1) -> None:
        """Count the pixels of a uint16 (C, H, W) field (every `stride`-th row and column)."""
        _check_field(field, self.n_channels)
        self.counts += _channel_histograms(field[:, ::stride, ::stride])

    def merge(self, other: IntensityHistogram) -> IntensityHistogram:
        if other.n_channels != self.n_channels:
            raise ValueError(f"cannot merge histograms of {other.n_channels} and {self.n_channels} channels")
        self.counts += other.counts
        return self

    def percentiles(self, percentiles: list[float]) -> np.ndarray:
        """(C, len(percentiles)) float64 pixel values."""
        if not self.counts.any():
            raise ValueError("no pixels were counted")
        return histogram_percentiles(self.counts, percentiles)

    def mean(self) -> np.ndarray:
        """(C,) float64 mean pixel value per channel."""
        if not self.counts.any():
            raise ValueError("no pixels were counted")
        return (self.counts @ np.arange(HISTOGRAM_BINS, dtype=np.float64)) / self.counts.sum(axis=1)


def fit_percentile_scaling(
    histogram: IntensityHistogram, low: float = 0.1, high: float = 99.9
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (lo, hi) float64 arrays: the `low` and `high` percentiles of a plate's corrected pixels.

    A flat channel (hi == lo) gets hi = lo + 1, so scaling never divides by zero.
    """
    if not 0 <= low < high <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
    lo, hi = histogram.percentiles([low, high]).T
    return lo, np.maximum(hi, lo + 1)


def apply_scaling(field: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Map each channel's lo..hi linearly to 0..65535 (uint16), clipping outside; round half to even."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if lo.shape[0] != field.shape[0] or hi.shape[0] != field.shape[0]:
        raise ValueError(f"need one lo and hi per channel ({field.shape[0]}), got {lo.shape[0]} and {hi.shape[0]}")
    return _affine_uint16(field, lo, UINT16_MAX / (hi - lo), 0.0)


def _affine_uint16(images: np.ndarray, shift: np.ndarray, scale: np.ndarray, offset: float) -> np.ndarray:
    """Per channel `(x - shift) * scale + offset` of uint16 (..., C, H, W), rounded half to even, clipped to uint16."""
    shift, scale = (np.asarray(v, dtype=np.float64).reshape(-1, 1, 1) for v in (shift, scale))
    scaled = np.rint((images.astype(np.float64) - shift) * scale + offset)
    return np.clip(scaled, 0, UINT16_MAX).astype(np.uint16)


def fit_dmso_scaling(histogram: IntensityHistogram) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (background, dmso_mean) float64 arrays from a histogram of a plate's DMSO crops.

    The background is the `DMSO_BACKGROUND_PERCENTILE`-th percentile (crops are mostly cells, so the
    darkest pixels are the background between them); a DMSO mean at or below it becomes background + 1.
    """
    background = histogram.percentiles([DMSO_BACKGROUND_PERCENTILE])[:, 0]
    return background, np.maximum(histogram.mean(), background + 1)


def apply_dmso_scaling(crops: np.ndarray, background: np.ndarray, dmso_mean: np.ndarray) -> np.ndarray:
    """Map each channel's background to `DMSO_PEDESTAL` and its DMSO mean to `DMSO_PEDESTAL + DMSO_LEVEL`.

    `crops` is uint16 (..., C, H, W); the result is uint16, rounded half to even, clipped to 0..65535
    (a cell 15x brighter than the plate's DMSO mean still fits).
    """
    background = np.asarray(background, dtype=np.float64)
    scale = DMSO_LEVEL / (np.asarray(dmso_mean, dtype=np.float64) - background)
    return _affine_uint16(crops, background, scale, DMSO_PEDESTAL)


def save_illumination(
    path: str | os.PathLike,
    illumination: dict[str, np.ndarray],
    scaling: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Path:
    """Write per-plate illumination functions (and optional scalings) to one .npz, atomically.

    Layout: `plates` (names, in sorted order), then per plate i `illum_<i>` (float32 C x H x W)
    and, with scaling, `scaling_lo_<i>` / `scaling_hi_<i>`. Plates may have a scaling without an
    illumination function (scaling only) or the reverse. The zip members carry a fixed timestamp,
    so the same content gives the same bytes.
    """
    path = Path(path)
    scaling = scaling or {}
    plates = sorted(set(illumination) | set(scaling))
    arrays: dict[str, np.ndarray] = {"plates": np.array(plates, dtype=np.str_)}
    for i, plate in enumerate(plates):
        if plate in illumination:
            arrays[f"illum_{i}"] = np.asarray(illumination[plate], dtype=np.float32)
        if plate in scaling:
            lo, hi = scaling[plate]
            arrays[f"scaling_lo_{i}"] = np.asarray(lo, dtype=np.float64)
            arrays[f"scaling_hi_{i}"] = np.asarray(hi, dtype=np.float64)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue())
    return path


def _read_npz(path: Path, prefixes: tuple[str, ...]) -> dict[str, list[np.ndarray]]:
    """Per plate, the arrays `<prefix>_<i>` of a file written by `save_illumination` (plates lacking them left out)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            plates = [str(p) for p in archive["plates"]]
            return {
                plate: [archive[f"{prefix}_{i}"] for prefix in prefixes]
                for i, plate in enumerate(plates)
                if f"{prefixes[0]}_{i}" in archive
            }
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: not a readable illumination file ({err})") from err


def check_illumination_file(path: str | os.PathLike) -> None:
    """InputError naming the file unless every array in it reads whole (the zip's CRC-32 checks each): what a
    rerun keeps, and `info --verify` checks."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            for name in archive.files:
                archive[name]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: not a readable illumination file ({err})") from err


def load_illumination(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Per plate, its illumination function (float32 C x H x W) from `save_illumination`'s file.

    InputError naming the file when it is missing or damaged.
    """
    return {plate: arrays[0] for plate, arrays in _read_npz(Path(path), ("illum",)).items()}


def load_scaling(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per plate, its (lo, hi) intensity scaling from `save_illumination`'s file ({} when none was saved)."""
    return {plate: (lo, hi) for plate, (lo, hi) in _read_npz(Path(path), ("scaling_lo", "scaling_hi")).items()}
