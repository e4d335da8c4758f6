"""Nuclei detection: accuracy on real nuclei and speed per megapixel.

Measures `fastcell.shard.detect.detect_nuclei` with its default options on

- stardist-dsb `img2d.tif` (512x512, 125 hand-labelled nuclei in `mask2d.tif`): recall and
  precision of the detected centres (a centre matches the nucleus whose label it falls in,
  one-to-one);
- the JUMP Cell Painting field (1080x1080, DNA channel) against CellProfiler's 109 nuclei
  (`Nuclei.csv`): optimal one-to-one pairs within 8 px, with and without `exclude_border`
  (CellProfiler drops nuclei touching the edge);

side by side with a plain baseline measured in the same run: Otsu on the smoothed image and
connected components, no splitting of touching nuclei. Times are medians over repeats.

    .venv/bin/python bench/detection_bench.py [--repeats 7]

writes bench/results/detection_stardist.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from machine import cpu_model

from fastcell.io import write_bytes_atomic, write_json_atomic
from fastcell.shard.detect import detect_nuclei, score_against_centres, score_against_mask

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
JUMP_SITE = DATA / "jump-cpg0000" / "BR00116991" / "A01-1"
RESULTS = ROOT / "bench" / "results"
MATCH_DISTANCE = 8.0


def baseline_detect(dna: np.ndarray, sigma: float = 2.0, min_area: int = 30) -> np.ndarray:
    """Otsu threshold + connected components: touching nuclei stay one object."""
    from scipy import ndimage as ndi
    from skimage import filters

    smooth = filters.gaussian(dna.astype(np.float32), sigma=sigma, preserve_range=True)
    labels, n = ndi.label(ndi.binary_fill_holes(smooth > filters.threshold_otsu(smooth)))
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    ids = np.flatnonzero(areas >= min_area) + 1
    centres = np.array(ndi.center_of_mass(np.ones_like(labels), labels, ids)).reshape(-1, 2)
    return centres[:, ::-1]


def median_seconds(fn, image, repeats: int) -> tuple[float, float]:
    """Median wall-clock and process CPU seconds of `fn(image)` (CPU time is steadier on a shared machine)."""
    fn(image)  # warm-up: imports, caches
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(image)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def score_row(name: str, method: str, score, seconds: tuple[float, float], megapixels: float) -> dict:
    return {
        "image": name,
        "method": method,
        "n_true": score.n_true,
        "n_detected": score.n_detected,
        "matched": score.matched,
        "recall": round(score.recall, 4),
        "precision": round(score.precision, 4),
        "f1": round(2 * score.recall * score.precision / max(score.recall + score.precision, 1e-12), 4),
        "seconds": round(seconds[0], 4),
        "seconds_per_megapixel": round(seconds[0] / megapixels, 4),
        "cpu_seconds_per_megapixel": round(seconds[1] / megapixels, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per method and image (median)")
    args = parser.parse_args()

    stardist = tifffile.imread(DATA / "stardist-dsb" / "img2d.tif")
    mask = tifffile.imread(DATA / "stardist-dsb" / "mask2d.tif")
    dna = tifffile.imread(JUMP_SITE / "r01c01f01p01-ch5sk1fk1fl1.tiff")
    reference = pd.read_csv(JUMP_SITE / "Nuclei.csv")[["AreaShape_Center_X", "AreaShape_Center_Y"]].to_numpy()

    def jump_border_excluded(image):
        return detect_nuclei(image, exclude_border=True)

    cases = [
        ("stardist-dsb img2d", stardist, lambda c: score_against_mask(c, mask)),
        ("JUMP BR00116991 A01-1 DNA", dna, lambda c: score_against_centres(c, reference, MATCH_DISTANCE)),
    ]
    rows = []
    for name, image, score in cases:
        megapixels = image.size / 1e6
        methods = [("fastcell detect_nuclei", detect_nuclei), ("baseline Otsu + components", baseline_detect)]
        if name.startswith("JUMP"):
            methods.insert(1, ("fastcell detect_nuclei, exclude_border", jump_border_excluded))
        for method, fn in methods:
            seconds = median_seconds(fn, image, args.repeats)
            rows.append(score_row(name, method, score(fn(image)), seconds, megapixels))
            print(rows[-1])
    for row in rows:
        base = next(r for r in rows if r["image"] == row["image"] and r["method"].startswith("baseline"))
        row["cpu_time_vs_baseline"] = round(row["cpu_seconds_per_megapixel"] / base["cpu_seconds_per_megapixel"], 2)

    machine = f"{os.cpu_count()} CPUs, {cpu_model()}"
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    write_json_atomic(
        RESULTS / "detection_stardist.json",
        {"date": date, "machine": machine, "repeats": args.repeats, "match_distance_px": MATCH_DISTANCE,
         "results": rows},
    )
    lines = [
        "# Nuclei detection: accuracy and speed",
        "",
        f"{date}; {machine}; `.venv/bin/python bench/detection_bench.py --repeats {args.repeats}`; "
        "times are medians over repeats (one image, one process); wall-clock and process CPU time "
        "per megapixel (other jobs shared the 2 cores, so CPU time is the steadier figure).",
        "",
        "stardist-dsb: a centre matches the hand-labelled nucleus it falls in, one-to-one. "
        f"JUMP: optimal one-to-one pairs with CellProfiler's nuclei within {MATCH_DISTANCE:g} px "
        "(CellProfiler drops nuclei touching the edge, so precision counts edge nuclei as false).",
        "",
        "| image | method | truth | detected | matched | recall | precision | F1 | wall s/MP | CPU s/MP | CPU time vs baseline |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['image']} | {r['method']} | {r['n_true']} | {r['n_detected']} | {r['matched']} | "
            f"{r['recall']:.3f} | {r['precision']:.3f} | {r['f1']:.3f} | {r['seconds_per_megapixel']:.2f} | "
            f"{r['cpu_seconds_per_megapixel']:.2f} | {r['cpu_time_vs_baseline']:.2f} |"
        )
    write_bytes_atomic(RESULTS / "detection_stardist.md", ("\n".join(lines) + "\n").encode())
    print(f"wrote {RESULTS / 'detection_stardist.md'}")


if __name__ == "__main__":
    main()
