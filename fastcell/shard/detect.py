"""Nuclei detection on a DNA channel: where to centre each single-cell crop.

Classic, parameter-light segmentation (the approach of CellProfiler's IdentifyPrimaryObjects):

1. smooth the DNA image with a Gaussian (`sigma`) and threshold it with Otsu's method -> foreground.
   A minority of very bright nuclei (mitoses, apoptotic bodies) can pull Otsu's threshold above the
   ordinary nuclei; when the linear threshold would erase more than a quarter of the objects that
   Otsu's threshold on the log image finds, the log threshold is used instead;
2. split touching nuclei: the distance transform of the foreground *core* (foreground pixels that are
   also above a local mean threshold over `local_block` pixels, which opens the dim seams between
   touching nuclei) is smoothed, its peaks at least `min_distance` apart become markers, and a
   watershed on it divides each foreground component between its markers;
3. keep objects of `min_area` .. `max_area` pixels and return their centroids.

A field without nuclei (flat, or only noise) gives no detections: Otsu's foreground must stand
`min_contrast` robust noise standard deviations above the background.

Measured on the real nuclei of ../shared/data/stardist-dsb (see bench/results/detection_stardist.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAD_TO_STD = 1.4826  # standard deviation of a normal distribution per median absolute deviation
MAX_LOST_FRACTION = 0.25  # objects a linear Otsu threshold may erase before the log threshold is used


def foreground_threshold(smooth: np.ndarray, min_area: int) -> float:
    """Otsu's threshold of a smoothed image, or Otsu's threshold in log space when the linear one erases
    more than `MAX_LOST_FRACTION` of the objects (of `min_area` pixels or more) found above the log one."""
    from scipy import ndimage as ndi
    from skimage import filters

    linear = float(filters.threshold_otsu(smooth))
    log = float(np.expm1(filters.threshold_otsu(np.log1p(np.maximum(smooth, 0)))))
    if log >= linear:
        return linear
    objects, n = ndi.label(smooth > log)
    large = np.bincount(objects.ravel(), minlength=n + 1) >= min_area
    large[0] = False
    if not large.any():
        return linear
    kept = np.bincount(objects[smooth > linear], minlength=n + 1) > 0  # objects reaching above `linear`
    lost = large & ~kept
    return log if lost.sum() > MAX_LOST_FRACTION * large.sum() else linear


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`scipy.ndimage.binary_fill_holes` (same 4-connected background), several times faster: background
    components that do not reach the image edge are holes."""
    from scipy import ndimage as ndi

    background, n = ndi.label(~mask)
    is_hole = np.ones(n + 1, bool)
    is_hole[0] = False
    is_hole[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = False
    return mask | is_hole[background]


def segment_nuclei(
    dna: np.ndarray,
    *,
    sigma: float = 2.0,
    min_distance: int = 5,
    local_block: int | None = 51,
    min_contrast: float = 5.0,
    min_area: int = 30,
) -> np.ndarray:
    """Label image (int32, 0 = background) of the nuclei in a 2-D DNA image, touching nuclei split.

    No size filtering here (`detect_nuclei` applies it; `min_area` only sizes the objects counted when
    choosing the threshold). See the module docstring for the method.
    """
    from scipy import ndimage as ndi
    from skimage import feature, segmentation

    if dna.ndim != 2:
        raise ValueError(f"the DNA channel must be a 2-D image, got shape {dna.shape}")
    if np.issubdtype(dna.dtype, np.floating) and not np.isfinite(dna).all():
        raise ValueError("the DNA channel holds NaN or infinite values")
    smooth = ndi.gaussian_filter(dna.astype(np.float32), sigma, mode="nearest")
    if smooth.max() <= smooth.min():
        return np.zeros(dna.shape, np.int32)
    threshold = foreground_threshold(smooth, min_area)
    background = smooth[smooth <= threshold]
    noise = MAD_TO_STD * np.median(np.abs(background - np.median(background)))
    foreground_level = np.median(smooth[smooth > threshold])
    if foreground_level - np.median(background) < min_contrast * max(noise, 1e-6):
        return np.zeros(dna.shape, np.int32)

    foreground = fill_holes(smooth > threshold)
    core = foreground
    if local_block is not None:
        local_mean = ndi.gaussian_filter(smooth, (local_block - 1) / 6)  # skimage's threshold_local, in float32
        core = fill_holes(foreground & (smooth > local_mean))
    distance = ndi.gaussian_filter(ndi.distance_transform_edt(core).astype(np.float32), 1.0, mode="nearest")
    components, _ = ndi.label(foreground)
    peaks = feature.peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    markers = np.zeros(dna.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # Components without a peak (a core erased by the local threshold) still get their own label.
    unmarked = np.setdiff1d(np.unique(components), np.unique(components[markers > 0]))
    unmarked = unmarked[unmarked > 0]
    if len(unmarked):
        centres = ndi.maximum_position(smooth, components, unmarked)
        rows, cols = np.array(centres, dtype=np.intp).reshape(-1, 2).T
        markers[rows, cols] = np.arange(len(peaks) + 1, len(peaks) + 1 + len(unmarked))
    return segmentation.watershed(-distance, markers, mask=foreground).astype(np.int32)


def detect_nuclei(
    dna: np.ndarray,
    *,
    min_area: int = 30,
    max_area: int | None = None,
    sigma: float = 2.0,
    min_distance: int = 5,
    local_block: int | None = 51,
    min_contrast: float = 5.0,
    exclude_border: bool = False,
) -> np.ndarray:
    """Centres of the nuclei in a 2-D DNA image: float64 (N, 2) as (x, y), sorted by y then x.

    x is the column and y the row, 0-based, in pixels (the centroid of each nucleus' pixels).
    Defaults suit 20x screens with nuclei ~10-30 px across (BBBC021, Cell Painting); scale
    `sigma`, `min_distance`, `local_block` and the areas with the nucleus size. `min_distance`
    is the smallest distance between the centres of two touching nuclei that are still split;
    `exclude_border` drops nuclei touching the image edge (CellProfiler's default).
    """
    labels = segment_nuclei(
        dna,
        sigma=sigma,
        min_distance=min_distance,
        local_block=local_block,
        min_contrast=min_contrast,
        min_area=min_area,
    )
    areas = np.bincount(labels.ravel())
    rows, cols = np.indices(labels.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.bincount(labels.ravel(), weights=rows.ravel()) / areas
        x = np.bincount(labels.ravel(), weights=cols.ravel()) / areas
    keep = areas >= min_area
    if max_area is not None:
        keep &= areas <= max_area
    keep[0] = False  # background
    if exclude_border:
        edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        keep[np.unique(edge)] = False
    centres = np.stack([x[keep], y[keep]], axis=1).astype(np.float64)
    return centres[np.lexsort((centres[:, 0], centres[:, 1]))]


@dataclass(frozen=True)
class DetectionScore:
    """Detections against ground truth: `matched` pairs, one-to-one."""

    n_true: int
    n_detected: int
    matched: int

    @property
    def recall(self) -> float:
        return self.matched / self.n_true if self.n_true else 1.0

    @property
    def precision(self) -> float:
        return self.matched / self.n_detected if self.n_detected else 1.0


def score_against_mask(centres: np.ndarray, mask: np.ndarray) -> DetectionScore:
    """Score centres against a label mask: a centre matches the nucleus whose label it falls in.

    One-to-one: a second centre inside an already matched nucleus, or one on background, is a
    false positive. Centres are rounded to the nearest pixel.
    """
    labels_present = np.unique(mask)
    n_true = int((labels_present > 0).sum())
    cols = np.clip(np.floor(centres[:, 0] + 0.5).astype(np.intp), 0, mask.shape[1] - 1)
    rows = np.clip(np.floor(centres[:, 1] + 0.5).astype(np.intp), 0, mask.shape[0] - 1)
    hit = mask[rows, cols]
    return DetectionScore(n_true=n_true, n_detected=len(centres), matched=len(np.unique(hit[hit > 0])))


def score_against_centres(centres: np.ndarray, reference: np.ndarray, max_distance: float) -> DetectionScore:
    """Score centres against reference centres: optimal one-to-one pairs closer than `max_distance`."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    if len(centres) == 0 or len(reference) == 0:
        return DetectionScore(n_true=len(reference), n_detected=len(centres), matched=0)
    distance = cdist(centres, reference)
    too_far = distance > max_distance
    cost = np.where(too_far, max_distance * len(reference) * 10.0 + 1.0, distance)
    rows, cols = linear_sum_assignment(cost)
    matched = int((~too_far[rows, cols]).sum())
    return DetectionScore(n_true=len(reference), n_detected=len(centres), matched=matched)
