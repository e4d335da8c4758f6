"""Intensity scaling passes. `--scaling plate-percentile`: exact histograms of every `SCALING_STRIDE`-th
pixel of the corrected fields give each plate's low/high percentiles, saved in illumination.npz, applied
while cropping. `--scaling plate-dmso`: each plate's DMSO crops are histogrammed once the crops exist,
and every crop is referenced to its plate's DMSO background and mean as it is written."""

from __future__ import annotations

from typing import Any

import numpy as np

from fastcell.errors import InputError
from fastcell.shard.output import ILLUMINATION_NAME, field_paths
from fastcell.shard.passes.context import Run, Timer, corrected, field_crops, worker_context
from fastcell.shard.passes.illumination import plate_chunks
from fastcell.shard.sources import Field, read_field

SCALING_STRIDE = 4  # the scaling histogram counts every 4th row and column of each corrected field


def scaling_task(plate: str, fields: list[Field]) -> dict:
    """Pixel histogram (every SCALING_STRIDE-th row and column) of a chunk of a plate's corrected fields."""
    from fastcell.shard.illumination import IntensityHistogram

    ctx = worker_context()
    timer = Timer()
    histogram, errors = IntensityHistogram(ctx.n_channels), []
    for f in fields:
        try:
            with timer("read"):
                image = read_field(f, ctx.dtypes)
            image = corrected(f, image, timer)
        except InputError as err:
            errors.append((f.key, str(err)))
            continue
        with timer("scaling"):
            histogram.add(image, stride=SCALING_STRIDE)
    return {"plate": plate, "histogram": histogram, "errors": errors, "timer": dict(timer.seconds)}


def percentile_scaling_pass(run: Run, fields: list[Field]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per plate and channel (lo, hi): percentiles of the plate's corrected pixels (saved in illumination.npz)."""
    from fastcell.shard.illumination import (
        IntensityHistogram,
        fit_percentile_scaling,
        load_illumination,
        load_scaling,
        save_illumination,
    )

    path = run.config.out / ILLUMINATION_NAME
    if path.is_file():
        saved = load_scaling(path)
        if saved:
            return saved
    by_key = {f.key: f for f in fields}
    tasks = plate_chunks(fields)
    histograms: dict[str, IntensityHistogram] = {}
    for result in run.tasks(scaling_task, tasks, "intensity scaling"):
        for key, error in result["errors"]:
            run.failed(by_key[key], error)
        if result["plate"] in histograms:
            histograms[result["plate"]].merge(result["histogram"])  # integer counts: any order
        else:
            histograms[result["plate"]] = result["histogram"]
    low, high = run.config.scaling_percentiles
    scaling = {
        plate: fit_percentile_scaling(h, low, high)
        for plate, h in sorted(histograms.items())
        if h.counts.any()
    }
    save_illumination(path, load_illumination(path) if path.is_file() else {}, scaling)
    return scaling


def dmso_scaling_pass(run: Run, cells) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per plate and channel (background, DMSO mean) of the plate's DMSO crops (`--scaling plate-dmso`)."""
    from fastcell.shard.illumination import IntensityHistogram, fit_dmso_scaling

    dmso = cells[cells["role"] == "dmso"]
    missing = sorted(set(cells["plate"]) - set(dmso["plate"]))
    if missing:
        raise InputError(
            f"{run.config.source}: --scaling plate-dmso needs DMSO cells on every plate; none on "
            f"{', '.join(missing[:5])}{' and more' if len(missing) > 5 else ''} (include the dmso role, or "
            f"use --scaling none or plate-percentile)"
        )
    histograms: dict[str, IntensityHistogram] = {}
    groups = dmso.groupby(["plate", "field"], sort=True)
    for (plate, key), rows in run.progress.track(iter(groups), groups.ngroups, "DMSO reference"):
        crops = field_crops(str(field_paths(run.config.out, key)[0]))[np.sort(rows["row"].to_numpy())]
        n, c, size, _ = crops.shape
        tiled = np.ascontiguousarray(crops.transpose(1, 0, 2, 3)).reshape(c, n * size, size)
        histograms.setdefault(plate, IntensityHistogram(c)).add(tiled)
    return {plate: fit_dmso_scaling(h) for plate, h in sorted(histograms.items())}


def scaling_record(
    method: str, percentiles: tuple[float, float], percentile_scaling: dict | None, dmso_scaling: dict | None
) -> dict[str, Any]:
    """The manifest's `scaling` entry: the method and each plate's fitted parameters."""
    record: dict[str, Any] = {"method": method}
    if percentile_scaling is not None:
        record.update(
            percentiles=list(percentiles),
            plates={
                p: {"lo": lo.tolist(), "hi": hi.tolist()}
                for p, (lo, hi) in sorted(percentile_scaling.items())
            },
        )
    if dmso_scaling is not None:
        from fastcell.shard.illumination import DMSO_BACKGROUND_PERCENTILE, DMSO_LEVEL, DMSO_PEDESTAL

        record.update(
            background_percentile=DMSO_BACKGROUND_PERCENTILE,
            pedestal=DMSO_PEDESTAL,
            level=DMSO_LEVEL,
            plates={
                p: {"background": bg.tolist(), "dmso_mean": mean.tolist()}
                for p, (bg, mean) in dmso_scaling.items()
            },
        )
    return record
