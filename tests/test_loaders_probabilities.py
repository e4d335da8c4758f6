"""How often each augmentation step fires, per backend, against the probability the spec documents.

Each step is switched on alone (`AugmentSpec.identity(...)`, no normalisation) over known inputs: white
noise crops with every pixel in [1000, 5000), stored by id, so whether a view was blurred, jittered,
noised, had a channel dropped or which of the 8 symmetries it shows is read off exactly. The count of
views where the step fired must lie in the binomial interval of the documented probability that holds
with probability 1 - 1e-6; 1024 views make that interval exclude p / 2 and 1 (checked), so a copy that
always blurs, or draws its coin twice, fails. Both backends run on the CPU through the public loader API.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fastcell.loaders import AugmentSpec, create_train_loader
from fastcell.loaders.spec import UINT16_MAX
from fastcell.testing import make_shards

BACKENDS = ["dali", "torch"]
CELLS, CHANNELS, SIZE = 512, 3, 16
CHANGED = 50.0  # intensity units: float error of an untouched view is < 1; every step moves some pixel far more


def noise_crops() -> np.ndarray:
    return np.random.default_rng(11).integers(1000, 5000, (CELLS, CHANNELS, SIZE, SIZE), dtype=np.uint16)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("noise"), noise_crops(), shard_size=128)


def views_and_crops(shards, backend: str, spec: AugmentSpec) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's views (both of each cell: 1024) in stored intensity units, and each view's stored crop."""
    loader = create_train_loader(shards, spec, 256, backend=backend, device="cpu", num_workers=1, seed=5)
    batches = list(loader)
    views = torch.cat([torch.cat([v1, v2]) for v1, v2, _ in batches]).double().numpy() * UINT16_MAX
    ids = torch.cat([torch.cat([ids, ids]) for _, _, ids in batches]).numpy()
    assert len(views) == 2 * CELLS
    return views, noise_crops()[ids].astype(np.float64)


def assert_rate(fired: np.ndarray, p: float, what: str) -> None:
    """`fired` (bool per draw) is a Binomial(n, p) count: inside its 1 - 1e-6 interval, which excludes p / 2 and 1."""
    n, k = fired.size, int(fired.sum())
    lo, hi = stats.binom.interval(1 - 1e-6, n, p)
    assert not lo <= n * p / 2 <= hi and not lo <= n <= hi, f"{n} draws cannot tell p = {p} from p / 2 or 1"
    assert lo <= k <= hi, f"{what}: fired {k} of {n} times ({k / n:.3f}); p = {p} allows {lo:.0f}-{hi:.0f}"


def changed(views: np.ndarray, crops: np.ndarray) -> np.ndarray:
    """[views, C]: whether each channel of each view differs from its stored crop."""
    return np.abs(views - crops).max(axis=(2, 3)) > CHANGED


@pytest.mark.parametrize("backend", BACKENDS)
def test_blur_fires_with_blur_p(shards, backend):
    spec = AugmentSpec.identity(blur_p=0.5, blur_sigma=(0.5, 1.0), normalize=False)
    views, crops = views_and_crops(shards, backend, spec)
    moved = changed(views, crops)
    assert (moved.all(1) == moved.any(1)).all()  # every channel of a view blurred, or none
    assert_rate(moved.any(1), spec.blur_p, "blur")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", [("gain",), ("contrast",), ("gamma",), ("gain", "gamma")])
def test_intensity_jitter_and_gamma_each_fire_with_jitter_p(shards, backend, steps):
    """Gain/contrast and gamma draw a coin of their own, each with probability jitter_p, per view: a view is
    left as stored by both with (1 - jitter_p)^2 (one shared coin: 1 - jitter_p)."""
    ranges = dict(gain=(1.0, 1.0), contrast=(1.0, 1.0), gamma=(1.0, 1.0)) | dict.fromkeys(steps, (1.3, 2.0))
    spec = AugmentSpec.identity(jitter_p=0.8, normalize=False, **ranges)
    views, crops = views_and_crops(shards, backend, spec)
    moved = changed(views, crops)
    assert (moved.all(1) == moved.any(1)).all()  # one coin per view, each channel its own factor
    assert_rate(moved.any(1), 1 - (1 - spec.jitter_p) ** len(steps), "+".join(steps))


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_fires_with_noise_p(shards, backend):
    spec = AugmentSpec.identity(noise_p=0.5, noise_std=0.5, normalize=False)
    views, crops = views_and_crops(shards, backend, spec)
    assert_rate(changed(views, crops).any(1), spec.noise_p, "noise")


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_channel_drops_with_channel_drop_p_but_never_all(shards, backend):
    """Each channel is zeroed with p, independently, and a view that drew all of them keeps them all:
    a channel is dropped with p (1 - p^(C-1)) = 0.273 for p 0.3, C 3 (0.15 or 0.45 fall far outside)."""
    spec = AugmentSpec.identity(channel_drop_p=0.3, normalize=False)
    views, crops = views_and_crops(shards, backend, spec)
    dropped = (views == 0).all(axis=(2, 3))
    kept = np.abs(views - crops).max(axis=(2, 3)) < 1
    assert (dropped | kept).all() and not dropped.all(1).any()
    p = spec.channel_drop_p
    assert_rate(dropped, p * (1 - p ** (CHANNELS - 1)), "channel drop-out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_eight_symmetries_are_equally_likely(shards, backend):
    spec = AugmentSpec.identity(dihedral=True, normalize=False)
    views, crops = views_and_crops(shards, backend, spec)
    symmetry = np.full(len(views), -1)
    for k, (flip, quarter_turns) in enumerate((f, r) for f in (False, True) for r in range(4)):
        candidates = np.rot90(crops[..., ::-1] if flip else crops, quarter_turns, axes=(2, 3))
        symmetry[np.abs(views - candidates).max(axis=(1, 2, 3)) < 1] = k
    assert (symmetry >= 0).all()  # every view is one of them, exactly
    for k in range(8):
        assert_rate(symmetry == k, 1 / 8, f"symmetry {k}")
