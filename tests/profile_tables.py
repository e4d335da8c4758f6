"""Small pycytominer-style well profile tables for the `fastcell eval` tests and the README example.

`pycytominer_wells` lays out a screen the way LINCS/JUMP tables look: `Metadata_Plate`,
`Metadata_Well`, `Metadata_Batch`, `Metadata_broad_sample` (the treatment identity),
`Metadata_pert_iname`, `Metadata_mmoles_per_liter` (dose), `Metadata_moa`, then CellProfiler-named
features. Each batch has its own plates and compounds (so each treatment sits in one batch, as NSCB
needs); every compound is on every plate of its batch at two doses; each plate has DMSO wells. MoAs
"tubulin" .. "hdac" have a compound in each batch; "egfr" only in batch 1 (NSCB leaves it out);
one compound has no MoA. Profiles: a MoA direction scaled by dose, a batch shift, noise.

    python tests/profile_tables.py tests/data/pycytominer_example.csv   # the shipped example table
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

FEATURES = tuple(
    f"{compartment}_{measure}"
    for compartment in ("Cells", "Cytoplasm", "Nuclei")
    for measure in ("AreaShape_Area", "AreaShape_Eccentricity", "Intensity_MeanIntensity_DNA",
                    "Intensity_MeanIntensity_Mito", "Texture_Contrast_AGP", "Granularity_3_RNA",
                    "Correlation_Correlation_ER_Mito", "RadialDistribution_FracAtD_DNA_2of4")
)
MOAS = ("tubulin", "actin", "dna damage", "hdac")
DOSES = (1.0, 10.0)
ROWS = "ABCDEFGHIJKLMNOP"


def compounds(n_batches: int) -> list[tuple[str, str | None, int]]:
    """(compound, MoA or None, batch index): one compound per MoA per batch, plus EGFR twice and one unknown."""
    out = [(f"BRD-{moa[:3].upper()}{b}", moa, b) for b in range(n_batches) for moa in MOAS]
    out += [("BRD-EGF0", "egfr", 0), ("BRD-EGF1", "egfr", 0), ("BRD-UNK0", None, 0)]
    return out


def pycytominer_wells(seed: int = 0, n_batches: int = 2, plates_per_batch: int = 2, dmso_per_plate: int = 6,
                      noise: float = 0.6, batch_shift: float = 1.0) -> pd.DataFrame:
    """One row per well, pycytominer column conventions (see the module docstring)."""
    rng = np.random.default_rng(seed)
    d = len(FEATURES)
    direction = {moa: rng.standard_normal(d) * 1.5 for moa in (*MOAS, "egfr", None)}
    shifts = rng.standard_normal((n_batches, d)) * batch_shift
    rows, x = [], []
    for b in range(n_batches):
        for p in range(plates_per_batch):
            plate = f"SQ{b}{p:03d}"
            wells = iter(f"{ROWS[i // 24]}{i % 24 + 1:02d}" for i in range(384))
            own = [(c, m) for c, m, cb in compounds(n_batches) if cb == b]
            layout = [("DMSO", None, 0.0)] * dmso_per_plate + [(c, m, dose) for c, m in own for dose in DOSES]
            for compound, moa, dose in layout:
                effect = 0 if compound == "DMSO" else direction[moa] * np.log10(1 + dose) + rng.standard_normal(d) * 0.3
                x.append(effect + shifts[b] + rng.standard_normal(d) * noise)
                rows.append({"Metadata_Plate": plate, "Metadata_Well": next(wells), "Metadata_Batch": f"batch{b}",
                             "Metadata_broad_sample": compound, "Metadata_pert_iname": compound if compound == "DMSO" else compound.lower(),
                             "Metadata_mmoles_per_liter": dose, "Metadata_moa": moa})
    table = pd.DataFrame(rows)
    return pd.concat([table, pd.DataFrame(np.array(x) * 10 + 100, columns=list(FEATURES))], axis=1)


if __name__ == "__main__":
    pycytominer_wells().to_csv(sys.argv[1], index=False, float_format="%.5g")
