"""From a treatment (compound, concentration, MoA) to the morphology parameters of its cells.

A phenotype is a vector of named parameters (`PARAMETERS`). DMSO cells use `DMSO_PHENOTYPE`.
Each of the 12 BBBC021 mechanisms has a signature (`MOA_SIGNATURES`): the change of some
parameters at full effect, loosely following what the stains show in the real screen. Signatures
overlap on purpose (DNA damage and DNA replication both enlarge nuclei; both microtubule classes
round cells up and arrest them in mitosis; protein synthesis and degradation both shrink and dim
cells) so that the MoA is learnable but not trivial.

A treatment's phenotype is `DMSO + strength * (signature + compound quirk)`, where the strength
follows a Hill dose-response curve (0 at low doses, towards 1 at high doses) and the compound
quirk is a small seeded deviation, so that compounds of one MoA differ a little. Compounds that
the MoA table does not annotate get a seeded random signature of moderate size.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

# Name -> (DMSO value, lower bound, upper bound). "log_*" parameters are log factors (0 = DMSO);
# "p_*" are the probabilities of a cell state; the rest are shape or stain-pattern amplitudes.
PARAMETERS: dict[str, tuple[float, float, float]] = {
    "log_density": (0.0, -1.5, 1.0),  # cells per area
    "clustering": (0.1, 0.0, 0.95),  # chance that a cell sits next to a previous one
    "log_cell_size": (0.0, -0.6, 0.9),
    "log_nucleus_size": (0.0, -0.6, 0.9),
    "cell_elongation": (0.35, 0.0, 1.2),  # axis ratio - 1
    "cell_irregularity": (0.1, 0.0, 0.4),  # amplitude of low-order boundary harmonics
    "nucleus_elongation": (0.15, 0.0, 0.8),
    "log_dapi": (0.0, -1.0, 1.0),
    "dapi_texture": (0.25, 0.0, 0.9),
    "log_tubulin": (0.0, -1.0, 1.0),
    "tubulin_filaments": (0.6, 0.0, 1.0),  # contrast of fine radial microtubules
    "tubulin_bundles": (0.0, 0.0, 1.5),  # thick bright bundles and a peripheral ring
    "log_actin": (0.0, -1.0, 1.0),
    "actin_cortex": (0.5, 0.0, 1.5),  # cortical ring at the cell edge
    "actin_fibres": (0.4, 0.0, 1.0),  # stress fibres across the cell
    "actin_aggregates": (0.0, 0.0, 12.0),  # mean number of bright actin puncta per cell
    "p_mitotic": (0.04, 0.0, 0.8),  # rounded, condensed chromosomes
    "p_fragmented": (0.02, 0.0, 0.8),  # nucleus broken into micronuclei
    "p_multinucleate": (0.01, 0.0, 0.8),  # 2-4 nuclei in one enlarged cell
    "p_monoaster": (0.0, 0.0, 0.9),  # ring of chromosomes around a single aster (Eg5)
}
PARAMETER_NAMES = tuple(PARAMETERS)
DMSO_PHENOTYPE = np.array([v[0] for v in PARAMETERS.values()])
_LOWER = np.array([v[1] for v in PARAMETERS.values()])
_UPPER = np.array([v[2] for v in PARAMETERS.values()])
# Typical size of a parameter's change; scales compound quirks and random signatures.
_SCALE = np.array([0.3, 0.3, 0.2, 0.2, 0.2, 0.08, 0.15, 0.2, 0.15, 0.2, 0.3, 0.5, 0.2, 0.3, 0.3, 3.0,
                   0.15, 0.1, 0.1, 0.15])

# Change at full effect, per MoA.
MOA_SIGNATURES: dict[str, dict[str, float]] = {
    "Microtubule stabilizers": dict(
        tubulin_bundles=1.0, log_tubulin=0.35, tubulin_filaments=-0.2, p_mitotic=0.25,
        cell_elongation=-0.2, p_fragmented=0.12, log_cell_size=-0.08),
    "Microtubule destabilizers": dict(
        tubulin_filaments=-0.55, log_tubulin=0.1, p_mitotic=0.35, cell_elongation=-0.25,
        log_cell_size=-0.15, p_fragmented=0.06, actin_fibres=-0.1),
    "Actin disruptors": dict(
        actin_aggregates=7.0, actin_fibres=-0.35, actin_cortex=-0.25, cell_irregularity=0.15,
        log_cell_size=-0.1, p_multinucleate=0.12, log_actin=0.1),
    "DNA damage": dict(
        log_nucleus_size=0.35, log_cell_size=0.22, dapi_texture=0.25, p_fragmented=0.12,
        log_density=-0.35, cell_elongation=0.1),
    "DNA replication": dict(
        log_nucleus_size=0.25, log_dapi=0.22, dapi_texture=0.15, log_cell_size=0.12,
        log_density=-0.3, p_fragmented=0.05),
    "Aurora kinase inhibitors": dict(
        p_multinucleate=0.5, log_cell_size=0.5, log_nucleus_size=0.4, log_density=-0.55,
        p_fragmented=0.08, log_dapi=0.1),
    "Eg5 inhibitors": dict(
        p_monoaster=0.6, p_mitotic=0.1, cell_elongation=-0.3, log_cell_size=-0.12, log_tubulin=0.1),
    "Protein synthesis": dict(
        log_cell_size=-0.22, log_tubulin=-0.3, log_actin=-0.25, log_dapi=-0.1, log_density=-0.25,
        actin_fibres=-0.1),
    "Protein degradation": dict(
        log_cell_size=-0.1, log_actin=-0.12, actin_aggregates=2.0, log_tubulin=-0.15, dapi_texture=0.15,
        p_mitotic=0.08, log_density=-0.15),
    "Epithelial": dict(
        clustering=0.7, log_cell_size=0.1, cell_elongation=-0.2, actin_cortex=0.45, actin_fibres=-0.2,
        log_density=0.2),
    "Cholesterol-lowering": dict(
        cell_elongation=0.2, log_actin=-0.1, actin_fibres=-0.12, log_cell_size=-0.05, cell_irregularity=0.04),
    "Kinase inhibitors": dict(
        cell_elongation=0.15, cell_irregularity=0.08, log_tubulin=0.08, log_actin=0.1, actin_fibres=0.1),
}

HILL_SLOPE = 1.5
QUIRK_SIZE = 0.25  # compound quirk, in units of _SCALE
UNANNOTATED_SIZE = 0.6  # random signature of an unannotated compound, in units of _SCALE


def signature_vector(moa: str) -> np.ndarray:
    """The full-effect change of an MoA as a parameter vector (zeros for DMSO)."""
    if moa == "DMSO":
        return np.zeros(len(PARAMETERS))
    try:
        changes = MOA_SIGNATURES[moa]
    except KeyError:
        raise ValueError(f"unknown MoA {moa!r}; known: {', '.join(MOA_SIGNATURES)}") from None
    return np.array([changes.get(name, 0.0) for name in PARAMETER_NAMES])


def stable_hash(*parts: object) -> int:
    """A 32-bit hash of the parts' text that is the same in every process (unlike `hash`)."""
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode())


def dose_strength(concentration: float, ec50: float) -> float:
    """Hill curve in [0, 1): how far a dose moves cells from DMSO towards the full phenotype."""
    if concentration <= 0:
        return 0.0
    ratio = (concentration / ec50) ** HILL_SLOPE
    return float(ratio / (1.0 + ratio))


@dataclass(frozen=True)
class Compound:
    """What the generator knows of a compound: its MoA (None if unannotated) and its potency."""

    name: str
    moa: str | None
    ec50: float


def compound_catalogue(design, seed: int) -> dict[str, Compound]:
    """One `Compound` per compound of an annotated design table (see `fastcell.metadata.annotate`).

    The EC50 sits half a log below the compound's lowest annotated dose (so annotated doses show
    a clear phenotype and the lower doses of a dose series fade to DMSO); unannotated compounds get
    an EC50 near the middle of their dose range.
    """
    catalogue = {}
    for name, rows in design.groupby("compound"):
        treated = rows[rows["role"] == "treatment"]
        rng = np.random.default_rng([seed, stable_hash("potency", name)])
        if name == "DMSO":
            catalogue[name] = Compound(name, "DMSO", 1.0)
        elif len(treated):
            moa = str(treated["moa"].iloc[0])
            ec50 = float(treated["concentration"].min()) * 10 ** rng.uniform(-0.7, -0.3)
            catalogue[name] = Compound(name, moa, ec50)
        else:
            doses = rows["concentration"][rows["concentration"] > 0]
            middle = float(np.exp(np.log(doses).median())) if len(doses) else 1.0
            catalogue[name] = Compound(name, None, middle * 10 ** rng.uniform(-0.5, 0.5))
    return catalogue


def treatment_phenotype(compound: Compound, concentration: float, seed: int) -> np.ndarray:
    """The mean phenotype of cells under a treatment (`DMSO_PHENOTYPE` for DMSO or a zero dose)."""
    if compound.moa == "DMSO":
        return DMSO_PHENOTYPE.copy()
    rng = np.random.default_rng([seed, stable_hash("compound", compound.name)])
    if compound.moa is None:
        effect = UNANNOTATED_SIZE * _SCALE * rng.standard_normal(len(PARAMETERS))
    else:
        effect = signature_vector(compound.moa) + QUIRK_SIZE * _SCALE * rng.standard_normal(len(PARAMETERS))
    strength = dose_strength(concentration, compound.ec50)
    return np.clip(DMSO_PHENOTYPE + strength * effect, _LOWER, _UPPER)


def as_dict(phenotype: np.ndarray) -> dict[str, float]:
    """A phenotype vector as {parameter name: value}."""
    return dict(zip(PARAMETER_NAMES, (float(v) for v in phenotype), strict=True))
