"""VGG for 32x32 inputs: torchvision's feature layers, a single linear classifier.

torchvision's ``VGG`` class hard-codes a 7x7 average pool and a 25088 -> 4096 -> 4096 head (123M
parameters, sized for 224x224 images). On CIFAR the five max pools already reduce 32x32 to 1x1, so
the usual CIFAR VGG keeps torchvision's ``features`` and puts one ``Linear(512, classes)`` on top
(VGG19-BN: 20.04M parameters).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from .init import init_like_torchvision
from .registry import register_model


class CifarVGG(nn.Module):
    """``features`` (conv/BN/ReLU/max-pool stack) -> global average pool -> ``classifier`` (one Linear)."""

    def __init__(self, features: nn.Sequential, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(num_features, num_classes)
        init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build_vgg(cfg: list, num_classes: int, batch_norm: bool = True, width: float = 1.0) -> CifarVGG:
    """Build a CIFAR VGG from a torchvision layer config; ``width`` scales every conv's channels."""
    if width <= 0:
        raise ValueError(f"width={width!r} must be positive")
    scaled = [v if v == "M" else max(1, int(round(v * width))) for v in cfg]
    num_features = [v for v in scaled if v != "M"][-1]
    return CifarVGG(make_layers(scaled, batch_norm=batch_norm), num_features, num_classes)


@register_model
def vgg11_bn(num_classes: int = 10, width: float = 1.0) -> CifarVGG:
    return build_vgg(cfgs["A"], num_classes, width=width)


@register_model
def vgg16_bn(num_classes: int = 10, width: float = 1.0) -> CifarVGG:
    return build_vgg(cfgs["D"], num_classes, width=width)


@register_model
def vgg19_bn(num_classes: int = 10, width: float = 1.0) -> CifarVGG:
    """VGG19 with BatchNorm for 32x32 inputs (20.04M parameters at ``width=1``)."""
    return build_vgg(cfgs["E"], num_classes, width=width)


@register_model
def vgg_proxy(num_classes: int = 10) -> CifarVGG:
    """A quarter-width VGG11-BN (about 0.58M parameters): the CPU proxy model of ``benchmarks/``.

    Same layer types and the same depth pattern as the VGG19 of the recipes, small enough to train
    to a stable accuracy on a CIFAR-10 subset in minutes on two CPU cores.
    """
    return build_vgg(cfgs["A"], num_classes, width=0.25)
