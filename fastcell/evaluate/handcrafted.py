"""Hand-crafted per-cell features: the classical baseline that a learned embedding must beat.

For each channel of a crop: intensity statistics (mean, standard deviation, 10th/50th/90th
percentiles), texture (mean gradient magnitude and mean absolute Laplacian, the sharpness
and granularity cues of CellProfiler's texture modules), and shape-like cues (the fraction
of pixels above the crop's channel mean, and the difference between the mean in the central disc and
the mean in the surrounding ring, which separates compact from spread-out signal). Every feature
is an affine function of the raw intensities' features, so computing them on crops normalised
with the shard's per-channel mean and standard deviation loses nothing.

Computed in torch on batches from the eval loader, so it runs on the GPU when there is one
and is scored by exactly the same `fastcell eval` path as the SimCLR embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FEATURES_PER_CHANNEL = (
    "mean",
    "std",
    "p10",
    "p50",
    "p90",
    "gradient",
    "laplacian",
    "above_mean",
    "centre_minus_ring",
)

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def feature_names(channels: list[str]) -> list[str]:
    return [f"{ch}_{name}" for ch in channels for name in FEATURES_PER_CHANNEL]


@torch.no_grad()
def handcrafted_features(images: torch.Tensor) -> torch.Tensor:
    """Features of a batch of crops [B, C, S, S] (any float scale) -> float32 [B, C * 9]."""
    x = images.float()
    b, c, s, _ = x.shape
    flat = x.flatten(2)
    mean = flat.mean(-1)
    std = flat.std(-1)
    quantiles = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9], device=x.device), dim=-1)  # [3, B, C]

    dy, dx = x[:, :, 1:, :-1] - x[:, :, :-1, :-1], x[:, :, :-1, 1:] - x[:, :, :-1, :-1]
    gradient = torch.sqrt(dx**2 + dy**2).flatten(2).mean(-1)
    kernel = _LAPLACIAN.to(x.device).expand(c, 1, 3, 3)
    laplacian = F.conv2d(x, kernel, groups=c).abs().flatten(2).mean(-1)

    above_mean = (flat > mean.unsqueeze(-1)).float().mean(-1)
    yy, xx = torch.meshgrid(torch.arange(s, device=x.device), torch.arange(s, device=x.device), indexing="ij")
    radius = torch.sqrt((yy - (s - 1) / 2) ** 2 + (xx - (s - 1) / 2) ** 2).flatten()
    centre, ring = radius < s / 6, (radius >= s / 6) & (radius < s / 3)
    centre_minus_ring = flat[..., centre].mean(-1) - flat[..., ring].mean(-1)

    per_channel = torch.stack([mean, std, *quantiles, gradient, laplacian, above_mean, centre_minus_ring], dim=-1)
    return per_channel.reshape(b, c * len(FEATURES_PER_CHANNEL))
