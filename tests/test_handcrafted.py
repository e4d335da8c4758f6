"""Hand-crafted per-cell features (the classical baseline)."""

import torch

from fastcell.evaluate.handcrafted import FEATURES_PER_CHANNEL, feature_names, handcrafted_features


def by_name(features: torch.Tensor, channels: list[str]) -> dict[str, torch.Tensor]:
    return dict(zip(feature_names(channels), features.T, strict=True))


def test_shape_and_names():
    x = torch.rand(4, 3, 32, 32)
    f = handcrafted_features(x)
    assert f.shape == (4, 3 * len(FEATURES_PER_CHANNEL))
    assert f.dtype == torch.float32
    assert len(feature_names(["a", "b", "c"])) == f.shape[1]


def test_known_patterns():
    flat = torch.full((1, 1, 32, 32), 5.0)
    disc = torch.zeros(1, 1, 32, 32)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    disc[0, 0][((yy - 15.5) ** 2 + (xx - 15.5) ** 2).sqrt() < 32 / 6] = 10.0  # exactly the central disc
    f_flat = by_name(handcrafted_features(flat), ["c"])
    f_disc = by_name(handcrafted_features(disc), ["c"])
    assert f_flat["c_mean"].item() == 5.0
    assert f_flat["c_std"].item() == 0.0
    assert f_flat["c_gradient"].item() == 0.0 and f_flat["c_laplacian"].item() == 0.0
    assert f_disc["c_centre_minus_ring"].item() == 10.0  # bright centre, dark ring
    assert f_disc["c_p90"].item() == 0.0 and f_disc["c_gradient"].item() > 0


def test_channels_are_independent_and_scale_equivariant():
    x = torch.rand(2, 2, 24, 24)
    f = handcrafted_features(x)
    swapped = handcrafted_features(x.flip(1))
    n = len(FEATURES_PER_CHANNEL)
    torch.testing.assert_close(swapped[:, :n], f[:, n:])
    # normalising a channel (x - m) / s changes intensity features affinely, texture by 1/s only
    g = by_name(handcrafted_features((x - 0.3) / 2.0), ["a", "b"])
    f = by_name(f, ["a", "b"])
    torch.testing.assert_close(g["a_gradient"], f["a_gradient"] / 2.0)
    torch.testing.assert_close(g["a_mean"], (f["a_mean"] - 0.3) / 2.0)
    torch.testing.assert_close(g["a_above_mean"], f["a_above_mean"])
