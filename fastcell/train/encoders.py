"""The encoder choices, defined once: architectures (torchvision ResNets) with their feature width,
and stems. `model.create_encoder` builds them; configs and the CLI take their choices from here.
To add an architecture, add its torchvision name and pooled feature width to `FEATURE_DIMS`."""

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}  # torchvision.models name -> features
ARCHS = tuple(FEATURE_DIMS)
# standard: torchvision's 7x7 stride-2 convolution + max-pool; small: 3x3 stride-1, no pool (see model.py)
STEMS = ("standard", "small")
