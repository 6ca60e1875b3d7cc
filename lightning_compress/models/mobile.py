"""torchvision's mobile networks adapted to 32x32 inputs.

The ImageNet stems reduce resolution 4x before the first block (stride-2 conv + max pool); on a
32x32 image that leaves 8x8 maps for the whole network and costs several points of accuracy. The
adaptations below keep torchvision's block definitions and change only the stem stride and pooling,
as the common CIFAR ports do.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import MobileNetV2, ShuffleNetV2, squeezenet1_1 as tv_squeezenet1_1

from .registry import register_model


@register_model
def squeezenet1_1(num_classes: int = 10) -> nn.Module:
    """SqueezeNet 1.1 with a stride-1 3x3 stem and no first max pool (32 -> 16 -> 8 in the fire stages)."""
    model = tv_squeezenet1_1(weights=None, num_classes=num_classes)
    model.features[0] = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1)
    model.features[2] = nn.Identity()
    return model


# torchvision's setting with the second stage's stride set to 1 (t, c, n, s): with the stem at
# stride 1, the network downsamples 32 -> 16 -> 8 -> 4, as in the usual CIFAR MobileNetV2.
_MOBILENET_V2_CIFAR = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


@register_model
def mobilenet_v2(num_classes: int = 10, width_mult: float = 1.0) -> nn.Module:
    """MobileNetV2 with a stride-1 stem and a stride-1 second stage (final maps 4x4)."""
    model = MobileNetV2(num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=_MOBILENET_V2_CIFAR)
    model.features[0][0].stride = (1, 1)
    return model


@register_model
def shufflenet_v2_x1_0(num_classes: int = 10) -> nn.Module:
    """ShuffleNetV2 1.0x with a stride-1 stem and no max pool (stages at 16, 8, 4)."""
    model = ShuffleNetV2([4, 8, 4], [24, 116, 232, 464, 1024], num_classes=num_classes)
    model.conv1[0].stride = (1, 1)
    model.maxpool = nn.Identity()
    return model
