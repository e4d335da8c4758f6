"""The manifest's channel statistics (`channel_stats`, what the loaders normalise with): exact, from
65,536-bin histograms of the training crops' uint16 pixels, which add up in any order."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

HISTOGRAM_BINS = 65536  # uint16: exact channel statistics from integer histograms
HISTOGRAM_CHUNK = 32  # crops per bincount: few enough that numpy's int64 copy of them stays in cache


def add_to_histogram(histogram: np.ndarray, crops: np.ndarray) -> None:
    """Count the pixels of N x C x H x W uint16 crops into `histogram` (C, HISTOGRAM_BINS), per channel."""
    for start in range(0, len(crops), HISTOGRAM_CHUNK):
        chunk = crops[start : start + HISTOGRAM_CHUNK]
        for c in range(chunk.shape[1]):
            histogram[c] += np.bincount(chunk[:, c].ravel(), minlength=HISTOGRAM_BINS)


def histogram_percentiles(counts: np.ndarray, percentiles: list[float]) -> np.ndarray:
    """Percentiles of (C, 65536) value counts: per row, the smallest value whose CDF reaches q.

    Returns (C, len(percentiles)) float64 (the inverted-CDF definition: values are pixel values).
    """
    cdf = np.cumsum(counts, axis=1)
    fractions = np.asarray(percentiles, dtype=np.float64) / 100.0
    return np.stack(
        [np.searchsorted(row, np.maximum(fractions * row[-1], 1), side="left") for row in cdf]
    ).astype(np.float64)


def channel_stats_from_histogram(histogram: np.ndarray) -> dict[str, list[float]]:
    """Exact per-channel mean, std, min, max, p01, p99 of uint16 pixels from their (C, 65536) counts.

    Percentiles are nearest-rank: the smallest value with at least q% of the pixels at or below it.
    """
    values = np.arange(histogram.shape[1], dtype=np.float64)
    stats: dict[str, list[float]] = defaultdict(list)
    for counts in histogram:
        n = int(counts.sum())
        mean = float(counts @ values) / n
        stats["mean"].append(mean)
        stats["std"].append(float(np.sqrt((counts @ (values - mean) ** 2) / n)))
        nonzero = np.flatnonzero(counts)
        stats["min"].append(float(nonzero[0]))
        stats["max"].append(float(nonzero[-1]))
    stats["p01"], stats["p99"] = histogram_percentiles(histogram, [1, 99]).T.tolist()
    return dict(stats)
