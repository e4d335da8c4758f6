"""Encoder factory: C input channels, both stems, local ImageNet initialisation; inference loading."""

from __future__ import annotations

import pytest
import torch
import torchvision

from fastcell.errors import InputError
from fastcell.train.model import SimCLR, adapt_first_conv, create_encoder


@pytest.mark.parametrize(("stem", "size", "conv1_stride"), [("standard", 32, 2), ("small", 16, 1)])
def test_encoder_takes_c_channels_and_pools(stem, size, conv1_stride):
    enc = create_encoder("resnet18", in_channels=5, stem=stem)
    assert enc.conv1.in_channels == 5 and enc.conv1.stride == (conv1_stride, conv1_stride)
    assert isinstance(enc.maxpool, torch.nn.Identity) == (stem == "small")
    feats = enc.eval()(torch.randn(2, 5, size, size))
    assert feats.shape == (2, 512)


def test_simclr_projects_to_proj_dim():
    model = SimCLR(create_encoder("resnet18", 3), 512, proj_dim=64)
    x = torch.randn(4, 3, 32, 32)
    assert model(x).shape == (4, 64)
    assert model.projector[0].out_features == 512  # hidden = feature width by default
    assert model.encoder(x).shape == (4, 512)


def test_first_conv_adaptation_keeps_grey_response():
    rgb = torch.randn(8, 3, 7, 7)
    five = adapt_first_conv(rgb, 5)
    assert five.shape == (8, 5, 7, 7)
    grey = torch.rand(1, 1, 7, 7)
    response_rgb = (rgb * grey).sum(dim=(1, 2, 3))
    response_c = (five * grey).sum(dim=(1, 2, 3))
    torch.testing.assert_close(response_c, response_rgb)


def test_imagenet_init_from_local_file(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(reference.state_dict(), path)
    enc = create_encoder("resnet18", in_channels=4, stem="standard", pretrained=path)
    torch.testing.assert_close(enc.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    torch.testing.assert_close(enc.conv1.weight, adapt_first_conv(reference.conv1.weight, 4))
    small = create_encoder("resnet18", in_channels=4, stem="small", pretrained=path)
    torch.testing.assert_close(small.layer1[0].conv2.weight, reference.layer1[0].conv2.weight)
    assert small.conv1.weight.shape == (64, 4, 3, 3)


def test_imagenet_weights_of_another_depth_are_refused(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(InputError, match="resnet50.pth.*do not fit"):
        create_encoder("resnet18", 3, pretrained=path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="garbage.pth"):
        create_encoder("resnet18", 3, pretrained=garbage)
