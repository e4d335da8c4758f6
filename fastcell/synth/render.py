"""Pixels of a synthetic BBBC021 field: cells laid out, drawn per stain, then imaged.

Three steps, each seeded so that a field depends only on (seed, plate, well, site):

1. `layout_cells`: how many cells, where, how large and shaped, in which state (interphase,
   mitotic, fragmented nucleus, multinucleate, Eg5 monoaster), with per-cell variation around
   the treatment's phenotype. Cheap, so a resumed run recomputes the ground truth of fields it
   skips.
2. `draw_cells`: each cell is drawn in its own small patch with vectorised numpy: DAPI (nuclei
   with chromatin texture), tubulin (radial microtubules from a centrosome, bundles), actin
   (cortical ring, stress fibres, puncta). Overlapping cells composite by maximum.
3. `image_field`: the microscope and the week: optical and focus blur, per-channel gain and
   background, uneven illumination (vignetting), camera noise (Poisson-Gaussian), 16-bit counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fastcell.synth.phenotypes import stable_hash

BASE_CELL_RADIUS = 16.0  # px, DMSO cell at cell_size 32 (radius of the equal-area circle / sqrt(1+e))
BASE_NUCLEUS_RADIUS = 8.5  # px at cell_size 32
CONFLUENCE = 0.33  # fraction of the field covered by DMSO cells
STATES = ("interphase", "mitotic", "fragmented", "multinucleate", "monoaster")
STAIN_LEVEL = np.array([2600.0, 1300.0, 1600.0])  # counts at gain 1 for DAPI, tubulin, actin
CAMERA_OFFSET = 100.0  # counts
READ_NOISE = 12.0  # counts
COUNTS_PER_PHOTON = 2.0


@dataclass(frozen=True)
class BatchEffects:
    """How one week's imaging distorts the stains (all per channel except the geometry)."""

    gain: np.ndarray  # multiplicative, per channel
    background: np.ndarray  # counts, per channel
    vignetting: float  # relative fall-off at the field corner
    vignetting_centre: tuple[float, float]  # (y, x) in field fractions
    background_tilt: tuple[float, float]  # relative background gradient along (y, x)
    focus_blur: float  # extra Gaussian blur, px at cell_size 32


def batch_effects(seed: int, week: str, plate: str) -> BatchEffects:
    """The week's imaging distortions, with a small extra gain jitter per plate."""
    rng = np.random.default_rng([seed, stable_hash("week", week)])
    gain = np.exp(rng.normal(0.0, 0.3, 3))
    background = rng.uniform(120.0, 450.0, 3)
    vignetting = float(rng.uniform(0.15, 0.5))
    centre = (float(rng.normal(0.5, 0.15)), float(rng.normal(0.5, 0.15)))
    tilt = (float(rng.normal(0, 0.15)), float(rng.normal(0, 0.15)))
    focus_blur = float(rng.uniform(0.0, 1.4))
    plate_rng = np.random.default_rng([seed, stable_hash("plate", plate)])
    gain = gain * np.exp(plate_rng.normal(0.0, 0.05, 3))
    return BatchEffects(gain, background, vignetting, centre, tilt, focus_blur)


@dataclass
class CellLayout:
    """Per-cell geometry, state and stain levels of one field (arrays of length n)."""

    cx: np.ndarray
    cy: np.ndarray
    radius: np.ndarray
    elongation: np.ndarray
    orientation: np.ndarray
    harmonics: np.ndarray  # (n, 4, 2): amplitude and phase of boundary harmonics k=2..5
    state: np.ndarray  # index into STATES
    nuclei: list[np.ndarray]  # per cell (m, 5): dy, dx, radius, elongation, orientation
    levels: np.ndarray  # (n, 3) stain multipliers
    pattern: np.ndarray  # (n, k) per-cell pattern parameters, see PATTERN_KEYS
    scale: float

    @property
    def nucleus_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """(y, x) of each cell's nuclear centroid: what a nuclei detector would find."""
        ys = np.array([self.cy[i] + n[:, 0].mean() for i, n in enumerate(self.nuclei)])
        xs = np.array([self.cx[i] + n[:, 1].mean() for i, n in enumerate(self.nuclei)])
        return ys, xs

    def __len__(self) -> int:
        return len(self.cx)


PATTERN_KEYS = ("dapi_texture", "tubulin_filaments", "tubulin_bundles", "actin_cortex", "actin_fibres",
                "actin_aggregates")


def _place(rng, n_target, radii, clustering, height, width):
    """Sequentially place up to `n_target` cells without heavy overlap; clustered cells touch."""
    ys, xs, kept = [], [], []
    for i in range(n_target):
        r = radii[i]
        for _ in range(25):
            if kept and rng.random() < clustering:
                j = rng.integers(len(kept))
                angle = rng.uniform(0, 2 * np.pi)
                dist = (radii[kept[j]] + r) * rng.uniform(0.85, 1.0)
                y, x = ys[j] + dist * np.sin(angle), xs[j] + dist * np.cos(angle)
            else:
                y, x = rng.uniform(0, height), rng.uniform(0, width)
            margin = 0.45 * r  # keeps the nuclear centroid inside the field
            if not (margin <= y < height - margin and margin <= x < width - margin):
                continue
            if kept:
                d = np.hypot(np.asarray(ys) - y, np.asarray(xs) - x)
                if (d < 0.8 * (radii[kept] + r)).any():
                    continue
            ys.append(y)
            xs.append(x)
            kept.append(i)
            break
    return np.asarray(ys, float), np.asarray(xs, float), np.asarray(kept, int)


def layout_cells(phenotype: dict[str, float], rng: np.random.Generator, height: int, width: int,
                 scale: float) -> CellLayout:
    """Sample the cells of one field around a treatment phenotype (see `phenotypes.PARAMETERS`)."""
    p = phenotype
    mean_radius = BASE_CELL_RADIUS * scale * np.exp(p["log_cell_size"])
    cell_area = np.pi * mean_radius**2 * (1 + p["cell_elongation"])
    expected = CONFLUENCE * height * width / cell_area * np.exp(p["log_density"])
    n = int(rng.poisson(expected))

    probs = np.array([p["p_mitotic"], p["p_fragmented"], p["p_multinucleate"], p["p_monoaster"]])
    probs = probs / max(1.0, probs.sum() / 0.95)
    state = rng.choice(len(STATES), size=n, p=np.concatenate([[1 - probs.sum()], probs]))
    rounded = (state == 1) | (state == 4)

    radius = mean_radius * np.exp(rng.normal(0, 0.15, n))
    radius[rounded] *= 0.72
    radius[state == 3] *= 1.45
    elongation = np.clip(p["cell_elongation"] * np.exp(rng.normal(0, 0.5, n)), 0, 2.0)
    elongation[rounded] = rng.uniform(0, 0.08, rounded.sum())
    spacing = radius * np.sqrt(1 + elongation)
    cy, cx, kept = _place(rng, n, spacing, p["clustering"], height, width)
    radius, elongation, state = radius[kept], elongation[kept], state[kept]
    n = len(kept)
    if p["clustering"] > 0.3:  # epithelial islands: cobblestone, less elongated
        elongation = elongation * (1.3 - p["clustering"])

    orientation = rng.uniform(0, np.pi, n)
    harmonics = np.stack([p["cell_irregularity"] * rng.uniform(0.3, 1.0, (n, 4)) / np.arange(1, 5),
                          rng.uniform(0, 2 * np.pi, (n, 4))], axis=-1)
    harmonics[state == 1] *= 0.3
    harmonics[state == 4] *= 0.3

    nucleus_radius = BASE_NUCLEUS_RADIUS * scale * np.exp(p["log_nucleus_size"] + rng.normal(0, 0.12, n))
    nuclei = []
    for i in range(n):
        if state[i] == 3:  # multinucleate: 2-4 nuclei around the centre of a large cell
            m = rng.integers(2, 5)
            angles = rng.uniform(0, 2 * np.pi) + np.arange(m) * 2 * np.pi / m
            dist = nucleus_radius[i] * rng.uniform(0.9, 1.2, m)
            r = nucleus_radius[i] * rng.uniform(0.7, 0.9, m)
            nuclei.append(np.column_stack([dist * np.sin(angles), dist * np.cos(angles), r,
                                           rng.uniform(0, 0.3, m), rng.uniform(0, np.pi, m)]))
        elif state[i] == 2:  # fragmented: micronuclei scattered over the nuclear region
            m = rng.integers(3, 7)
            angle = rng.uniform(0, 2 * np.pi, m)
            dist = nucleus_radius[i] * np.sqrt(rng.uniform(0, 1, m)) * 0.9
            nuclei.append(np.column_stack([dist * np.sin(angle), dist * np.cos(angle),
                                           nucleus_radius[i] * rng.uniform(0.25, 0.45, m),
                                           rng.uniform(0, 0.3, m), rng.uniform(0, np.pi, m)]))
        elif state[i] == 1:  # mitotic: a condensed metaphase plate
            nuclei.append(np.array([[0.0, 0.0, nucleus_radius[i] * 0.75, 1.4, orientation[i] + np.pi / 2]]))
        elif state[i] == 4:  # monoaster: a ring of chromosomes (drawn as an annulus)
            nuclei.append(np.array([[0.0, 0.0, nucleus_radius[i] * 1.05, 0.05, 0.0]]))
        else:
            offset = radius[i] * 0.25 * np.sqrt(rng.uniform(0, 1))
            a = rng.uniform(0, 2 * np.pi)
            en = np.clip(p["nucleus_elongation"] * np.exp(rng.normal(0, 0.4)), 0, 1.0)
            nuclei.append(np.array([[offset * np.sin(a), offset * np.cos(a), nucleus_radius[i], en,
                                     orientation[i] + rng.normal(0, 0.3)]]))

    shared = rng.normal(0, 0.1, (n, 1))
    levels = np.exp(shared + rng.normal(0, 0.15, (n, 3)) + np.array([p["log_dapi"], p["log_tubulin"],
                                                                      p["log_actin"]]))
    levels[state == 1, 0] *= 1.8  # condensed chromatin
    levels[state == 4, 0] *= 1.5
    pattern = np.column_stack([np.clip(p[k] * np.exp(rng.normal(0, 0.2, n)), 0, None) for k in PATTERN_KEYS])
    return CellLayout(cx, cy, radius, elongation, orientation, harmonics, state, nuclei, levels,
                      pattern, scale)


def _shape_coordinate(dy, dx, radius, elongation, orientation, harmonics=None):
    """Normalised radius rho (1 on the boundary) and direction e^(i theta) of a star-shaped outline.

    The boundary harmonics cos(k theta + phase) are the real parts of powers of the direction,
    which is cheaper than trigonometry per pixel.
    """
    cos, sin = np.float32(np.cos(orientation)), np.float32(np.sin(orientation))
    u = dx * cos + dy * sin
    v = dy * cos - dx * sin
    stretch = np.float32(np.sqrt(1 + elongation))
    r = np.hypot(u / stretch, v * stretch)
    direction = (u + 1j * v) / (np.hypot(u, v) + np.float32(1e-6))
    boundary = np.float32(radius)
    if harmonics is not None:
        power = direction * direction
        boundary = np.full(r.shape, radius, np.float32)
        for amplitude, phase in harmonics:
            boundary *= 1 + np.float32(amplitude) * (power * np.exp(1j * phase)).real
            power = power * direction
    return r / boundary, direction


def _soft_inside(rho, radius, edge=1.0):
    """1 inside, 0 outside, with a soft edge about `edge` px wide."""
    return np.clip((1 - rho) * radius / edge + 0.5, 0, 1)


def _angular_profile(rng, angle, count, kappa, bins=720):
    """Radial filaments seen from their origin: `count` von Mises bumps over the angle.

    The bumps are summed on a 1-D grid of angles and looked up per pixel, so the cost does not
    grow with the number of filaments.
    """
    grid = np.linspace(0, 2 * np.pi, bins, endpoint=False)
    centres = rng.uniform(0, 2 * np.pi, count)
    profile = np.exp(kappa * (np.cos(grid[:, None] - centres) - 1)).sum(-1)
    index = (np.mod(angle, 2 * np.pi) * (bins / (2 * np.pi))).astype(np.intp) % bins
    return profile[index]


def _smooth_noise(rng, shape, sigma):
    """Gaussian-filtered white noise with unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return noise / (noise.std() + 1e-9)


def draw_cells(layout: CellLayout, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Noise-free stain images (3, H, W), float32, DMSO-cell level about 1."""
    field = np.zeros((3, height, width), np.float32)
    s = layout.scale
    # Python floats for per-cell scalars: NumPy float64 scalars would upcast the float32 patches.
    patterns, levels = layout.pattern.tolist(), layout.levels.tolist()
    for i in range(len(layout)):
        R, e, orientation = float(layout.radius[i]), float(layout.elongation[i]), float(layout.orientation[i])
        tex, fil, bund, cortex, fibres, aggregates = patterns[i]
        dapi_level, tubulin_level, actin_level = levels[i]
        half = int(np.ceil(R * np.sqrt(1 + e) * 1.5 + 4 * s))
        y0, x0 = int(layout.cy[i]) - half, int(layout.cx[i]) - half
        ys, xs = max(y0, 0), max(x0, 0)
        ye, xe = min(y0 + 2 * half + 1, height), min(x0 + 2 * half + 1, width)
        dy, dx = np.meshgrid(np.arange(ys, ye, dtype=np.float32) - np.float32(layout.cy[i]),
                             np.arange(xs, xe, dtype=np.float32) - np.float32(layout.cx[i]), indexing="ij")
        state = STATES[layout.state[i]]
        rho, _ = _shape_coordinate(dy, dx, R, e, orientation, layout.harmonics[i])
        cell = _soft_inside(rho, R)

        nucleus = np.zeros_like(cell)
        dapi = np.zeros_like(cell)
        texture = _smooth_noise(rng, cell.shape, 0.9 * s)
        for ndy, ndx, nr, ne, no in layout.nuclei[i].tolist():
            nrho, ndirection = _shape_coordinate(dy - ndy, dx - ndx, nr, ne, no)
            inside = _soft_inside(nrho, nr, 0.8)
            if state == "monoaster":
                spokes = 0.6 + 0.4 * (ndirection**7 * np.exp(1j * rng.uniform(0, 2 * np.pi))).real
                inside = inside * np.clip((nrho - 0.45) * nr / 1.5, 0, 1) * spokes
            nucleus = np.maximum(nucleus, inside)
            dapi = np.maximum(dapi, inside * (1 + tex * texture) * (1.0 - 0.15 * nrho**2))
        dapi *= dapi_level

        # Tubulin: filaments radiating from a centrosome beside the nucleus, curving a little.
        cdy, cdx = (layout.nuclei[i][:, :2].mean(0) * 0.5).tolist()
        if state in ("mitotic", "monoaster"):
            cdy = cdx = 0.0
        ty, tx = dy - cdy, dx - cdx
        dist = np.hypot(ty, tx)
        bend = _smooth_noise(rng, cell.shape, 3.0 * s)  # slow wander, so filaments curve but stay lines
        angle = np.arctan2(ty, tx) + (rng.uniform(-0.6, 0.6) + 0.25 * bend) * dist / R
        filaments = _angular_profile(rng, angle, int(26 + 10 * s), 300.0) * (1 + 0.25 * bend)
        bundles = _angular_profile(rng, angle, 5, 25.0)
        ring = np.exp(-(((rho - 0.78) / 0.12) ** 2))
        tubulin = (1 - fil) * 0.8 + fil * 1.4 * np.minimum(filaments, 2.0)
        tubulin = tubulin + bund * (1.3 * bundles + 1.5 * ring)
        if state == "monoaster":
            tubulin = tubulin + 2.5 * filaments * np.exp(-dist / (0.45 * R))
        elif state == "mitotic":
            tubulin = 0.9 + 0.6 * np.exp(-dist / (0.5 * R))
        tubulin = cell * tubulin * (1 - 0.45 * nucleus) * tubulin_level
        tubulin += 1.2 * tubulin_level * np.exp(-(dist**2) / (2 * (1.2 * s) ** 2))

        # Actin: cortical ring, stress fibres across the cell, bright puncta.
        ring_actin = np.exp(-((((1 - rho) * R) / (1.3 * s)) ** 2)) * (rho < 1.15)
        direction = orientation + rng.normal(0, 0.3)
        along = dx * np.cos(direction) + dy * np.sin(direction)
        across = -dx * np.sin(direction) + dy * np.cos(direction)
        lines = (0.5 + 0.5 * np.cos(2 * np.pi * across / (3.5 * s) + 0.3 * np.sin(along / (4 * s)))) ** 6
        interior = _soft_inside(rho, R * 0.85, 2.0)
        actin = 0.35 * cell + cortex * 1.6 * ring_actin + fibres * 1.2 * lines * interior
        n_puncta = rng.poisson(aggregates)
        if n_puncta:
            pr = R * 0.75 * np.sqrt(rng.uniform(0, 1, n_puncta))
            pa = rng.uniform(0, 2 * np.pi, n_puncta)
            py, px = (pr * np.sin(pa)).astype(np.float32), (pr * np.cos(pa)).astype(np.float32)
            d2 = (dy[..., None] - py) ** 2 + (dx[..., None] - px) ** 2
            actin = actin + 3.0 * np.exp(-d2 / (2 * (1.3 * s) ** 2)).sum(-1)
        actin = actin * actin_level * np.clip(cell + 0.3 * ring_actin, 0, 1)

        window = (slice(None), slice(ys, ye), slice(xs, xe))
        np.maximum(field[window], np.stack([dapi, tubulin, actin]).astype(np.float32), out=field[window])
    return field


def image_field(stains: np.ndarray, effects: BatchEffects, rng: np.random.Generator, scale: float,
                well_gain: float = 1.0) -> np.ndarray:
    """Image noise-free stains through the week's microscope: blur, gain, vignetting, background, noise."""
    _, height, width = stains.shape
    sigma = (0.7 + effects.focus_blur + abs(rng.normal(0, 0.15))) * scale
    blurred = ndimage.gaussian_filter(stains, (0, sigma, sigma))
    yy = ((np.arange(height)[:, None] + 0.5) / height).astype(np.float32)
    xx = ((np.arange(width)[None, :] + 0.5) / width).astype(np.float32)
    cy, cx = effects.vignetting_centre
    vignette = 1 - effects.vignetting * ((yy - cy) ** 2 + (xx - cx) ** 2) / 0.5
    tilt = 1 + effects.background_tilt[0] * (yy - 0.5) + effects.background_tilt[1] * (xx - 0.5)
    gain = (effects.gain * STAIN_LEVEL * well_gain)[:, None, None].astype(np.float32)
    background = effects.background[:, None, None].astype(np.float32)
    expected = blurred * gain * vignette + background * tilt
    photons = rng.poisson(np.clip(expected, 0, None) / COUNTS_PER_PHOTON)
    read_noise = rng.standard_normal(expected.shape, dtype=np.float32) * np.float32(READ_NOISE)
    counts = CAMERA_OFFSET + photons.astype(np.float32) * COUNTS_PER_PHOTON + read_noise
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)


def cell_table(layout: CellLayout) -> dict[str, np.ndarray]:
    """Ground truth per cell: nuclear centroid (x, y), state, cell and nuclear area in px."""
    ys, xs = layout.nucleus_centres
    nucleus_area = np.array([np.sum(np.pi * n[:, 2] ** 2) for n in layout.nuclei])
    return {
        "x": np.round(xs, 2),
        "y": np.round(ys, 2),
        "state": np.array([STATES[s] for s in layout.state], dtype=object),
        "n_nuclei": np.array([len(n) for n in layout.nuclei], dtype=int),  # int even with no cells: not 3.0 in the CSV
        "cell_area": np.round(np.pi * layout.radius**2, 1),
        "nucleus_area": np.round(nucleus_area, 1),
    }
