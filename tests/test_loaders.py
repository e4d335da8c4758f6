"""The loader contract, run against both backends (DALI on the CPU here, torch reference).

Known test patterns: a linear ramp `1000 (c + 1) + 40 y + x` per channel makes crops, flips and
rotations recognisable exactly (bilinear resampling keeps a ramp a ramp).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage
from test_loaders_probabilities import assert_rate

from fastcell.errors import EnvironmentProblem, InputError
from fastcell.loaders import AugmentSpec, create_eval_loader, create_train_loader
from fastcell.loaders.spec import UINT16_MAX
from fastcell.testing import make_shards, random_crops

BACKENDS = ["dali", "torch"]
SIZE = 32


def ramp(channels: int = 3, size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.stack([1000 * (c + 1) + 40 * yy + xx for c in range(channels)]).astype(np.uint16)


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """100 cell-like train crops in shards of 16 (the last one short) and 10 val crops."""
    crops = random_crops(110, channels=3, size=SIZE, seed=1)
    return make_shards(tmp_path_factory.mktemp("cells"), crops[:100], ["DNA", "Tubulin", "Actin"], 16, val=crops[100:])


@pytest.fixture(scope="module")
def ramps(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("ramps"), np.repeat(ramp()[None], 48, axis=0), shard_size=16)


def epoch(loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return tuple(torch.cat([b[i] for b in batches]) for i in range(3))


def raw(views: torch.Tensor) -> np.ndarray:
    """Loader output of a spec with normalize=False back in stored intensity units."""
    return views.float().numpy() * UINT16_MAX


def train(shards, backend, spec, batch_size=16, **kwargs):
    return create_train_loader(shards, spec, batch_size, backend=backend, device="cpu", **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_batches_have_the_contract_shapes_and_dtypes(cells, backend, dtype):
    loader = train(cells, backend, AugmentSpec(output_size=24), batch_size=16, dtype=dtype)
    assert (len(loader), loader.image_size, loader.channels) == (6, 24, ["DNA", "Tubulin", "Actin"])
    batches = list(loader)
    assert len(batches) == 6
    for view1, view2, ids in batches:
        assert view1.shape == view2.shape == (16, 3, 24, 24)
        assert view1.dtype == view2.dtype == dtype and ids.dtype == torch.int64 and ids.shape == (16,)
        assert torch.isfinite(view1.float()).all() and torch.isfinite(view2.float()).all()
        assert view1.float().abs().max() < 50  # normalised: a few stds, not raw intensities
        assert (view1.float() - view2.float()).abs().mean() > 0.1  # two independent views


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_spec_is_normalised_to_zero_mean_unit_std(cells, backend):
    view1, view2, ids = epoch(train(cells, backend, AugmentSpec.identity(), batch_size=20))
    assert sorted(ids.tolist()) == list(range(100))  # 100 / 20: the whole split, each once
    torch.testing.assert_close(view1, view2)
    per_channel = view1.transpose(0, 1).reshape(3, -1).double()
    np.testing.assert_allclose(per_channel.mean(1).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(per_channel.std(1).numpy(), 1, atol=1e-3)


def test_both_backends_give_the_same_unaugmented_views(cells):
    outputs = {}
    for backend in BACKENDS:
        view1, _, ids = epoch(train(cells, backend, AugmentSpec.identity(), batch_size=20))
        outputs[backend] = view1[ids.argsort()]
    torch.testing.assert_close(outputs["dali"], outputs["torch"], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_resized_crop_cuts_a_window_of_the_requested_area(ramps, backend):
    spec = AugmentSpec.identity(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), output_size=16, normalize=False)
    view1, view2, _ = epoch(train(ramps, backend, spec))
    views = raw(torch.cat([view1, view2]))
    yy, xx = np.mgrid[:16, :16]
    offsets = set()
    for view in views:
        origin = view[:, :1, :1]  # a 16 x 16 window keeps the ramp's slopes (no rescaling)
        np.testing.assert_allclose(view - origin, np.broadcast_to(40 * yy + xx, view.shape), atol=0.05)
        start = origin[:, 0, 0] - 1000 * np.arange(1, 4)
        np.testing.assert_allclose(start, start[0], atol=0.05)
        y0, x0 = divmod(start[0] + 0.05, 40)
        assert 0 <= y0 <= 16 and 0 <= x0 <= 16.1
        offsets.add((round(y0), round(x0)))
    assert len(offsets) > 10  # the window moves


@pytest.mark.parametrize("backend", BACKENDS)
def test_flips_and_rotations_give_all_eight_symmetries(ramps, backend):
    spec = AugmentSpec.identity(dihedral=True, normalize=False)
    view1, view2, _ = epoch(train(ramps, backend, spec))
    image = torch.from_numpy(ramp().astype(np.float32))
    symmetries = [torch.rot90(im, k, (1, 2)) for im in (image, image.flip(2)) for k in range(4)]
    seen = []
    for view in raw(torch.cat([view1, view2])):
        matches = [i for i, s in enumerate(symmetries) if np.allclose(view, s.numpy(), atol=0.05)]
        assert len(matches) == 1
        seen.append(matches[0])
    assert set(seen) == set(range(8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_channel_gain_scales_each_channel_by_its_own_factor(ramps, backend):
    spec = AugmentSpec.identity(jitter_p=1.0, gain=(0.5, 2.0), contrast=(1.0, 1.0), gamma=(1.0, 1.0), normalize=False)
    view1, view2, _ = epoch(train(ramps, backend, spec))
    ratios = raw(torch.cat([view1, view2])) / ramp()[None]
    gains = ratios.mean(axis=(2, 3))
    np.testing.assert_allclose(ratios, np.broadcast_to(gains[:, :, None, None], ratios.shape), rtol=1e-4)  # one factor per channel
    assert gains.min() >= 0.5 - 1e-4 and gains.max() <= 2.0 + 1e-4
    assert np.abs(gains[:, 0] - gains[:, 1]).min() < 0.5 < np.abs(gains[:, 0] - gains[:, 1]).max()
    assert gains.std() > 0.2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
def test_contrast_and_gamma_follow_the_documented_formulas(ramps, backend, normalize):
    """`v = (u gain - m) contrast + m`, u = x / p99, m = mean / p99, then `max(v, 0) ** gamma` (spec.py),
    with p99, mean and std read from the shards' manifest (and checked against the ramp itself)."""
    stats = json.loads((ramps / "index.json").read_text())["channel_stats"]
    per_channel = np.repeat(ramp()[None], 48, axis=0).transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64)
    np.testing.assert_allclose(stats["p99"], np.percentile(per_channel, 99, axis=1))
    np.testing.assert_allclose(stats["mean"], per_channel.mean(1))
    p99, mean, std = (np.asarray(stats[k]).reshape(3, 1, 1) for k in ("p99", "mean", "std"))
    spec = AugmentSpec.identity(jitter_p=1.0, gain=(1.5, 1.5), contrast=(0.5, 0.5), gamma=(2.0, 2.0),
                                normalize=normalize)
    view1, _, _ = epoch(train(ramps, backend, spec))
    v = (ramp() / p99 * 1.5 - mean / p99) * 0.5 + mean / p99
    jittered = np.maximum(v, 0) ** 2 * p99  # back in stored intensity units
    if normalize:
        np.testing.assert_allclose(view1.numpy(), np.broadcast_to((jittered - mean) / std, view1.shape), atol=1e-3)
    else:
        np.testing.assert_allclose(raw(view1), np.broadcast_to(jittered, view1.shape), rtol=1e-4, atol=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blur_is_a_per_channel_gaussian(cells, backend):
    spec = AugmentSpec.identity(blur_p=1.0, blur_sigma=(1.0, 1.0), normalize=False)
    view1, _, ids = epoch(train(cells, backend, spec, batch_size=20))
    crops = random_crops(110, channels=3, size=SIZE, seed=1)[ids.numpy()].astype(np.float64)
    expected = ndimage.gaussian_filter(crops, sigma=(0, 0, 1, 1), mode="mirror", truncate=3.0)
    np.testing.assert_allclose(raw(view1), expected, rtol=1e-3, atol=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_and_channel_dropout(cells, backend):
    clean, _, clean_ids = epoch(train(cells, backend, AugmentSpec.identity(), batch_size=20))
    clean = clean[clean_ids.argsort()]
    spec = AugmentSpec.identity(noise_p=1.0, noise_std=0.5, channel_drop_p=0.3)
    view1, view2, ids = epoch(train(cells, backend, spec, batch_size=20))
    both_dropped = []
    for view in (view1, view2):
        reference = clean[ids]
        dropped = (view == 0).flatten(2).all(2)  # [N, C]
        assert not dropped.all(1).any()
        both_dropped.append(dropped.numpy())
        residual = (view - reference)[~dropped]
        assert abs(residual.std().item() - 0.5) < 0.02 and abs(residual.mean().item()) < 0.02
    # each channel with p, a view that drew all keeps all: p (1 - p^2) = 0.273 for 3 channels; the binomial
    # bound over these 600 draws (0.18-0.37) rejects 0.15 and 0.45
    assert_rate(np.concatenate(both_dropped), 0.3 * (1 - 0.3**2), "channel drop-out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_epochs_are_deterministic_per_seed_and_differ_between_epochs(cells, backend):
    def first_epochs(seed):
        loader = train(cells, backend, AugmentSpec(), batch_size=16, seed=seed)
        runs = []
        for e in (0, 1, 0):
            loader.set_epoch(e)
            runs.append(epoch(loader))
        return runs

    e0, e1, e0_again = first_epochs(seed=3)
    for a, b in zip(e0, e0_again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(e0[2], e1[2])  # another order
    assert not torch.equal(e0[0], first_epochs(seed=4)[0][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_read_disjoint_slices_and_equal_batch_counts(cells, backend):
    world_size, batch = 3, 8
    seen = []
    for rank in range(world_size):
        loader = train(cells, backend, AugmentSpec.identity(), batch_size=batch, rank=rank, world_size=world_size)
        assert len(loader) == (100 // 3) // batch == 4
        _, _, ids = epoch(loader)
        assert len(ids) == 4 * batch
        lo, hi = 100 * rank // world_size, 100 * (rank + 1) // world_size
        assert ids.min() >= lo and ids.max() < hi  # DALI's contiguous split
        seen += ids.tolist()
    assert len(seen) == len(set(seen)) == world_size * 4 * batch


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_loader_reads_every_sample_once_in_order(cells, backend):
    loader = create_eval_loader(cells, 16, backend=backend, device="cpu", crop=20, dtype=torch.float16)
    batches = list(loader)
    assert len(loader) == len(batches) == 7 and [len(ids) for _, ids in batches][-1] == 110 - 6 * 16
    images = torch.cat([b[0] for b in batches]).float()
    ids = torch.cat([b[1] for b in batches])
    assert ids.tolist() == list(range(110))  # train then val, no padding duplicates
    assert images.shape == (110, 3, 20, 20) and batches[0][0].dtype == torch.float16
    crops = random_crops(110, channels=3, size=SIZE, seed=1).astype(np.float64)[:, :, 6:26, 6:26]
    train_crops = random_crops(110, channels=3, size=SIZE, seed=1)[:100].astype(np.float64)
    mean = train_crops.mean(axis=(0, 2, 3))[:, None, None]
    std = train_crops.std(axis=(0, 2, 3))[:, None, None]
    np.testing.assert_allclose(images.numpy(), (crops - mean) / std, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_loader_reads_one_split(cells, backend):
    ids = [i for _, batch in create_eval_loader(cells, 4, backend=backend, device="cpu", split="val") for i in batch]
    assert [int(i) for i in ids] == list(range(100, 110))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shard_without_its_index_is_named_with_the_fix(tmp_path, backend):
    shards = make_shards(tmp_path, random_crops(8, size=16), shard_size=4)
    (shards / "train-000001.idx").unlink()
    with pytest.raises(InputError, match=r"train-000001\.tar.*rerun `fastcell shard`"):
        create_train_loader(shards, AugmentSpec(), 2, backend=backend, device="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_too_few_samples_for_one_batch_per_rank_is_an_input_error(cells, backend):
    with pytest.raises(InputError, match="do not fill one batch"):
        create_train_loader(cells, AugmentSpec(), 40, backend=backend, device="cpu", world_size=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_a_gpu_requested_without_one_is_an_environment_problem(cells):
    with pytest.raises(EnvironmentProblem, match="no CUDA GPU"):
        create_train_loader(cells, AugmentSpec(), 4, device="cuda")


def test_missing_dali_explains_how_to_install_it_or_use_torch(cells, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(EnvironmentProblem, match=r"pip install nvidia-dali-cuda130.*--loader torch"):
        create_train_loader(cells, AugmentSpec(), 4, backend="dali", device="cpu")


@pytest.mark.parametrize("changes", [dict(jitter_p=1.5), dict(crop_scale=(0.5, 0.2)), dict(blur_sigma=(0, 1)),
                                     dict(crop_scale=(0.5, 1.5)), dict(noise_std=-1.0)])
def test_spec_rejects_impossible_settings(changes):
    with pytest.raises(InputError):
        AugmentSpec(**changes)


def test_unknown_backend_is_an_input_error(cells):
    with pytest.raises(InputError, match="dali, torch"):
        create_train_loader(cells, AugmentSpec(), 4, backend="jax")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dali_gpu_views_match_the_cpu_pipeline(cells, dtype):
    identity = {}
    for device in ("cpu", "cuda"):
        loader = create_train_loader(cells, AugmentSpec.identity(), 20, device=device, dtype=dtype)
        view1, view2, ids = epoch(loader)
        assert view1.device.type == device and view1.dtype == dtype
        identity[device] = view1[ids.argsort()].float().cpu()
    torch.testing.assert_close(identity["cuda"], identity["cpu"], atol=1e-2, rtol=1e-2)
    view1, view2, _ = epoch(create_train_loader(cells, AugmentSpec(), 20, device="cuda", dtype=dtype))
    assert (view1.float() - view2.float()).abs().mean() > 0.1


@pytest.mark.parametrize("out_size", [20, 32, 48])  # shrinking (antialiased), same size, enlarging
def test_line_matrices_resize_flip_and_blur_like_torchvision_and_scipy(out_size):
    """DALI's CPU views: a view is rows @ plane @ cols^T, equal to crop + resize, flip, blur done one by one."""
    import torchvision.transforms.v2.functional as TF

    from fastcell.loaders.augment import line_matrices

    images = torch.from_numpy(random_crops(6, channels=2, size=SIZE, seed=4).astype(np.float32))
    draws = recipe_of(AugmentSpec(), SIZE).draw(6, SIZE, SIZE, torch.Generator().manual_seed(5))
    top, left, h, w = draws.top, draws.left, draws.height, draws.width
    flip = torch.tensor([False, True] * 3)
    sigma = torch.tensor([0.0, 0.0, 0.3, 1.0, 1.7, 2.0], dtype=torch.float64)
    rows = line_matrices(top, h, out_size, SIZE, flip, sigma, max_sigma=2.0)
    cols = line_matrices(left, w, out_size, SIZE, torch.zeros(6, dtype=torch.bool), sigma, max_sigma=2.0)
    views = (rows[:, None] @ images @ cols[:, None].mT).double().numpy()
    for i, s in enumerate(sigma.tolist()):
        box = (int(top[i]), int(left[i]), int(h[i]), int(w[i]))
        expected = TF.resized_crop(images[i], *box, [out_size, out_size], antialias=True)
        expected = (expected.flip(1) if flip[i] else expected).double().numpy()
        if s > 0:
            expected = ndimage.gaussian_filter(expected, sigma=(0, s, s), mode="mirror", truncate=np.ceil(3 * s) / s)
        np.testing.assert_allclose(views[i], expected, rtol=1e-4, atol=1e-2)


def recipe_of(spec: AugmentSpec, size: int, channels: int = 3):
    """A `ViewRecipe` of `spec` at output `size` over crops of typical per-channel statistics."""
    from fastcell.loaders.augment import ViewRecipe
    from fastcell.loaders.spec import Intensity

    stats = {"mean": [900.0, 2500.0, 300.0][:channels], "std": [200.0, 700.0, 90.0][:channels],
             "p99": [1800.0, 5000.0, 600.0][:channels]}
    return ViewRecipe(spec, Intensity.from_stats(stats, normalize=True), size)


def test_crop_boxes_follow_the_area_and_aspect_ranges():
    draws = recipe_of(AugmentSpec(), 96).draw(2000, 96, 96, torch.Generator().manual_seed(0))
    top, left, h, w = draws.top, draws.left, draws.height, draws.width
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 96).all() and (left + w <= 96).all()
    area, aspect = (h * w).double() / 96**2, w.double() / h
    assert area.min() > 0.19 and area.max() <= 1 and aspect.min() > 0.73 and aspect.max() < 1.37
    assert 0.5 < area.mean() < 0.65 and len(set(zip(top.tolist(), left.tolist(), strict=True))) > 500


def test_default_views_of_both_backends_have_the_same_statistics(cells):
    """DALI makes its CPU views batched in torch, the reference one by one: same spec, same distribution
    (per channel: mean level, contrast within a view, spread of the level across views, sharpness)."""
    stats = {}
    for backend in BACKENDS:
        view1, view2, _ = epoch(train(cells, backend, AugmentSpec(), batch_size=20))
        views = torch.cat([view1, view2])
        per_view = views.flatten(2)  # [2N, C, S*S]
        sharpness = (views[..., 1:] - views[..., :-1]).abs().mean((0, 2, 3))
        stats[backend] = torch.stack([per_view.mean(2).mean(0), per_view.std(2).mean(0), per_view.mean(2).std(0),
                                      sharpness])
    torch.testing.assert_close(stats["dali"], stats["torch"], atol=0.05, rtol=0.1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")])])
def test_recipe_under_fixed_draws_follows_each_documented_step(device):
    """`ViewRecipe.apply` with every random choice fixed by hand, against the spec's steps done one by one
    for each crop with torchvision and scipy: crop + resize, transpose then flips, blur, gain and contrast
    about the channel mean (in units of the p99), gamma, normalisation, channel drop-out."""
    import torchvision.transforms.v2.functional as TF

    from fastcell.loaders.augment import ViewDraws, ViewRecipe
    from fastcell.loaders.spec import Intensity

    n, c, size, out = 6, 3, SIZE, 20
    mean, std, p99 = np.array([900.0, 2500.0, 300.0]), np.array([200.0, 700.0, 90.0]), np.array([1800.0, 5000.0, 0.5])
    intensity = Intensity.from_stats({"mean": mean.tolist(), "std": std.tolist(), "p99": p99.tolist()}, normalize=True)
    spec = AugmentSpec(output_size=out, jitter_p=1.0, noise_p=0.0, channel_drop_p=0.5)
    recipe = ViewRecipe(spec, intensity, out)
    crops = random_crops(n, channels=c, size=size, seed=7).astype(np.float32)
    draws = ViewDraws.none(n, c, size, size)
    draws.top, draws.left = torch.tensor([0, 3, 5, 1, 0, 10]), torch.tensor([0, 7, 2, 0, 4, 9])
    draws.height, draws.width = torch.tensor([32, 20, 27, 31, 16, 22]), torch.tensor([32, 25, 24, 30, 16, 18])
    draws.transpose = torch.tensor([False, True, False, True, True, False])
    draws.flip_x = torch.tensor([False, False, True, True, False, True])
    draws.flip_y = torch.tensor([False, True, False, True, True, True])
    draws.blur_sigma = torch.tensor([0.0, 0.7, 0.0, 1.9, 1.2, 0.3], dtype=torch.float64)
    draws.gain = torch.tensor([[1.0, 1.0, 1.0], [0.6, 1.4, 1.1], [1.3, 0.7, 0.9]] * 2)
    draws.contrast = torch.tensor([[1.0, 1.0, 1.0], [1.4, 0.6, 1.2], [0.8, 1.1, 0.6]] * 2)
    draws.gamma = torch.tensor([[1.0, 1.0, 1.0], [0.8, 1.25, 1.0], [1.1, 0.9, 1.2]] * 2)
    draws.keep = torch.tensor([[True, True, True], [True, False, True], [False, False, True]] * 2)
    views = recipe.apply(torch.from_numpy(crops).to(device), draws).cpu().double().numpy()

    ref = np.maximum(p99, 1.0)[:, None, None]
    mean_, std_ = mean[:, None, None], std[:, None, None]
    for i in range(n):
        box = [int(t[i]) for t in (draws.top, draws.left, draws.height, draws.width)]
        y = TF.resized_crop(torch.from_numpy(crops[i]), *box, [out, out], antialias=True)
        if draws.transpose[i]:
            y = y.transpose(1, 2)
        if draws.flip_x[i]:
            y = y.flip(2)
        if draws.flip_y[i]:
            y = y.flip(1)
        y = y.double().numpy()
        s = float(draws.blur_sigma[i])
        if s > 0:
            y = ndimage.gaussian_filter(y, sigma=(0, s, s), mode="mirror", truncate=np.ceil(3 * s) / s)
        gain, contrast, gamma = (t[i].double().numpy()[:, None, None] for t in (draws.gain, draws.contrast, draws.gamma))
        v = (y / ref * gain - mean_ / ref) * contrast + mean_ / ref
        expected = (np.maximum(v, 0) ** gamma * ref - mean_) / std_ * draws.keep[i].numpy()[:, None, None]
        np.testing.assert_allclose(views[i], expected, rtol=1e-4, atol=2e-3, err_msg=f"crop {i}")


def two_view_batch(recipe, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Both views of a batch as the GPU loader makes them: drawn in one call, made in one call."""
    from fastcell.loaders.augment import seeded_generator

    n, _, height, width = images.shape
    return recipe.apply(images, recipe.draw(n, height, width, seeded_generator(seed), views=2))


SPECS_WITH_EVERY_STEP = [AugmentSpec(), AugmentSpec(channel_drop_p=0.3, noise_p=1.0, blur_p=1.0)]


@pytest.mark.parametrize("spec", SPECS_WITH_EVERY_STEP)
def test_the_recipe_dispatches_the_same_ops_for_any_batch_size(spec):
    """Host cost (issue 12): every op is a kernel launch on a GPU, so a batch costs a fixed number of ops, op by
    op the same for 8 and 96 crops: no per-sample Python anywhere in drawing or making the views (on 'meta',
    a device other than the CPU, where the lines are built in chunks)."""
    from fastcell.loaders.dispatch import count_ops

    recipe = recipe_of(spec, 12)
    two_view_batch(recipe, torch.empty((4, 3, 16, 16), device="meta"))  # fills the recipe's constants
    ops = []
    for n in (8, 96):
        images = torch.empty((n, 3, 16, 16), device="meta")
        counted = count_ops(lambda images=images: two_view_batch(recipe, images))
        ops.append(counted.host + counted.device + counted.views)
    assert ops[0] == ops[1]


@pytest.mark.parametrize("spec", SPECS_WITH_EVERY_STEP)
def test_the_recipe_reads_nothing_back_from_the_device_and_launches_few_kernels(spec):
    """On the 'meta' device (shapes only: `.item()`, `nonzero`, a copy to the CPU or a Python branch on a
    tensor's value raise there) both views of a batch of 512 are made without reading a device value back,
    in at most `KERNEL_BUDGET` ops on the device: at ~10 us of host time a launch, under 1 ms of the 8.5 ms
    a batch has at 60,000 two-view samples/s."""
    from fastcell.loaders.dispatch import count_ops

    recipe = recipe_of(spec, 96)
    images = torch.empty((512, 3, 96, 96), device="meta")
    two_view_batch(recipe, images)  # fills the recipe's per-device constants
    counted = count_ops(lambda: two_view_batch(recipe, images))
    assert counted.syncs == []
    assert 0 < sum(counted.device.values()) <= KERNEL_BUDGET, counted.device


KERNEL_BUDGET = 80


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_the_recipe_never_synchronises_with_the_gpu():
    """On CUDA, torch's sync debug mode raises on any host-device synchronisation (a read-back, a blocking copy)."""
    recipe = recipe_of(AugmentSpec(channel_drop_p=0.3), 96)
    images = torch.rand((512, 3, 96, 96), device="cuda") * 3000
    two_view_batch(recipe, images)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = two_view_batch(recipe, images, seed=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert views.shape == (1024, 3, 96, 96) and torch.isfinite(views).all()


def test_both_views_in_one_call_equal_each_view_made_alone(monkeypatch):
    """The GPU loader makes both views in one call, the CPU loader one view per thread (`ViewDraws.part`) with
    its resampling lines built in chunks: the same draws give the same views either way; the two views differ."""
    from fastcell.loaders import augment

    recipe = recipe_of(AugmentSpec(channel_drop_p=0.3), 20)
    images = torch.from_numpy(random_crops(10, channels=3, size=SIZE, seed=2).astype(np.float32))
    draws = recipe.draw(10, SIZE, SIZE, augment.seeded_generator(3), views=2)
    both = recipe.apply(images, draws)  # 40 lines: one chunk
    monkeypatch.setattr(augment, "CPU_LINES", 3)
    alone = torch.cat([recipe.apply(images, draws.part(v, 10)) for v in (0, 1)])
    torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-4)
    assert (both[:10] - both[10:]).abs().mean() > 0.1


def test_draws_that_are_not_whole_views_of_the_batch_are_refused():
    """Draws made for another batch size (not a whole number of views per crop) would pair crops with other
    crops' draws: refused, as is an empty batch."""
    recipe = recipe_of(AugmentSpec(), 20)
    images = torch.from_numpy(random_crops(6, channels=3, size=SIZE, seed=1).astype(np.float32))
    draws = recipe.draw(4, SIZE, SIZE, torch.Generator().manual_seed(0), views=2)  # 8 views
    with pytest.raises(ValueError, match="8 views' draws for 6 crops: a whole number of views per crop"):
        recipe.apply(images, draws)
    with pytest.raises(ValueError, match="8 views' draws for 0 crops"):
        recipe.apply(images[:0], draws)
    assert recipe.apply(images[:4], draws).shape == (8, 3, 20, 20)
