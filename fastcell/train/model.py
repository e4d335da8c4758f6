"""The SimCLR network: a torchvision ResNet encoder for C-channel crops and a projection head.

`SimCLR.encoder(x)` returns the pooled features [B, F] used as cell embeddings;
`SimCLR(x)` returns the projections [B, proj_dim] the contrastive loss sees.

Stems: `standard` is torchvision's 7x7 stride-2 convolution + 3x3 max-pool (4x downsampling,
right for 64-96 px crops on a budget); `small` is a 3x3 stride-1 convolution without max-pool
(CIFAR-style; keeps full resolution, about 16x the FLOPs at the same crop size).

Initialising from ImageNet (`pretrained=PATH`, a local torchvision state dict; nothing is
downloaded): every layer is copied except the classifier. The first convolution was trained
on RGB, so for C channels its filters are replaced by the mean of the R, G and B filters,
repeated C times and scaled by 3/C: a grey image spread over C channels then gives the same
response as the RGB original. With the `small` stem the 7x7 filters do not fit a 3x3
convolution, so the first layer keeps its random initialisation.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torchvision
from torch import nn

from fastcell.errors import InputError
from fastcell.train.encoders import FEATURE_DIMS, STEMS


def adapt_first_conv(rgb_weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB filters [O, 3, k, k] -> [O, C, k, k]: the mean RGB filter repeated C times, scaled by 3/C."""
    mean = rgb_weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, 1, 1) * (3.0 / in_channels)


def _load_imagenet_weights(net: nn.Module, path: str | Path, in_channels: int, stem: str) -> None:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        raise InputError(f"{path}: cannot read ImageNet weights ({err})") from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or "conv1.weight" not in state:
        raise InputError(f"{path}: not a torchvision ResNet state dict (no conv1.weight)")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if stem == "standard":
        state["conv1.weight"] = adapt_first_conv(state["conv1.weight"], in_channels)
    else:
        del state["conv1.weight"]
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch: weights of another depth
        raise InputError(f"{path}: weights do not fit this architecture ({err})") from err
    allowed_missing = set() if stem == "standard" else {"conv1.weight"}
    if set(missing) - allowed_missing or unexpected:
        raise InputError(
            f"{path}: weights do not fit this architecture (missing {sorted(set(missing) - allowed_missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )


def create_encoder(
    arch: str = "resnet18", in_channels: int = 3, stem: str = "standard", pretrained: str | Path | None = None
) -> nn.Module:
    """A torchvision ResNet taking `in_channels` channels whose forward returns pooled features [B, F]."""
    if arch not in FEATURE_DIMS:
        raise InputError(f"unknown architecture {arch!r} (choose from {', '.join(FEATURE_DIMS)})")
    net = getattr(torchvision.models, arch)(weights=None)
    if stem == "small":
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif stem == "standard":
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    else:
        raise InputError(f"unknown stem {stem!r} (choose {' or '.join(STEMS)})")
    net.fc = nn.Identity()
    if pretrained is not None:
        _load_imagenet_weights(net, pretrained, in_channels, stem)
    return net


class SimCLR(nn.Module):
    """Encoder + 2-layer MLP projector (Linear-BN-ReLU-Linear; hidden = feature width by default)."""

    def __init__(self, encoder: nn.Module, feature_dim: int, proj_hidden: int | None = None, proj_dim: int = 128):
        super().__init__()
        hidden = proj_hidden or feature_dim
        self.encoder = encoder
        self.feature_dim = feature_dim
        self.projector = nn.Sequential(
            nn.Linear(feature_dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, proj_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


def create_model(config) -> SimCLR:
    """The SimCLR network a `TrainConfig` (with `channels` resolved) describes."""
    if not config.channels:
        raise ValueError("config.channels must be resolved from the shards before building the model")
    encoder = create_encoder(config.arch, len(config.channels), config.stem, config.pretrained)
    return SimCLR(encoder, FEATURE_DIMS[config.arch], config.proj_hidden, config.proj_dim)
