"""Xception (Chollet, "Xception: Deep Learning with Depthwise Separable Convolutions", 2017) for 32x32 inputs.

Xception is a linear stack of depthwise separable convolutions (a depthwise 3x3 conv, then a pointwise
1x1 conv, with no non-linearity between them) in residual blocks, in three flows: the entry flow
downsamples, the middle flow repeats one block at a fixed width, the exit flow widens the features
before global pooling. A block whose output shape differs from its input adds a strided 1x1
projection shortcut.

The ImageNet network downsamples 32x before its global pool (a stride-2 stem conv and four
stride-2 blocks) and has 22.9M parameters. On a 32x32 image that leaves 2x2 maps for the middle flow
and 1x1 for the exit flow. The CIFAR variant below keeps the block structure and changes the sizes:

* the stem convs have stride 1 and the first entry block does not downsample, so the maps go
  32 -> 16 -> 8 in the entry flow and 8 -> 4 in the exit flow (final maps 4x4, as in the CIFAR
  MobileNetV2 of this package);
* 4 middle-flow blocks instead of 8, and narrower flows (384 wide instead of 728, exit 512 / 768 /
  1024 instead of 1024 / 1536 / 2048): 4.12M parameters and 0.40G multiply-accumulates at ``width=1``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .init import init_like_torchvision
from .registry import register_model

# Output channels of the separable convs of each block, and the block's stride (Chollet's Figure 5,
# narrowed). The stem is two 3x3 convs of 32 and 64 channels.
_STEM = (32, 64)
_ENTRY = (((128, 128), 1), ((256, 256), 2), ((384, 384), 2))
_MIDDLE = (384, 384, 384)
_EXIT_BLOCK = ((384, 512), 2)
_EXIT_CONVS = (768, 1024)


class SeparableConv2d(nn.Module):
    """A depthwise 3x3 conv followed by a pointwise 1x1 conv, neither with a bias (a BatchNorm follows)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class XceptionBlock(nn.Module):
    """``ReLU -> SeparableConv -> BN`` per entry of ``channels``, a max pool when strided, plus a shortcut.

    ``start_with_relu=False`` for the first block, whose input is already the stem's ReLU output.
    The shortcut is a strided 1x1 conv + BN where the shape changes, else the identity.
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...], stride: int = 1,
                 start_with_relu: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for i, out in enumerate(channels):
            if i > 0:
                layers.append(nn.ReLU(inplace=True))
            elif start_with_relu:
                # Not in place: the shortcut reads the same, pre-activation tensor.
                layers.append(nn.ReLU(inplace=False))
            layers += [SeparableConv2d(width, out), nn.BatchNorm2d(out)]
            width = out
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride=stride, padding=1))
        self.branch = nn.Sequential(*layers)
        if stride != 1 or in_channels != width:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x) + self.shortcut(x)


class CifarXception(nn.Module):
    """``features`` (``stem``, ``entry``, ``middle``, ``exit`` flows) -> global average pool -> ``classifier``."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, middle_blocks: int = 4) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width={width!r} must be positive")
        if isinstance(middle_blocks, bool) or not isinstance(middle_blocks, int) or middle_blocks < 0:
            raise ValueError(f"middle_blocks={middle_blocks!r} must be a non-negative integer")

        def w(c: int) -> int:
            return max(1, int(round(c * width)))

        s1, s2 = w(_STEM[0]), w(_STEM[1])
        stem = nn.Sequential(
            nn.Conv2d(3, s1, 3, padding=1, bias=False), nn.BatchNorm2d(s1), nn.ReLU(inplace=True),
            nn.Conv2d(s1, s2, 3, padding=1, bias=False), nn.BatchNorm2d(s2), nn.ReLU(inplace=True),
        )  # fmt: skip
        entry, channels = [], s2
        for i, (outs, stride) in enumerate(_ENTRY):
            outs = tuple(w(c) for c in outs)
            entry.append(XceptionBlock(channels, outs, stride, start_with_relu=i > 0))
            channels = outs[-1]
        middle = [XceptionBlock(channels, tuple(w(c) for c in _MIDDLE)) for _ in range(middle_blocks)]
        if middle_blocks:
            channels = w(_MIDDLE[-1])
        outs, stride = tuple(w(c) for c in _EXIT_BLOCK[0]), _EXIT_BLOCK[1]
        exit_layers: list[nn.Module] = [XceptionBlock(channels, outs, stride)]
        channels = outs[-1]
        for out in (w(c) for c in _EXIT_CONVS):
            exit_layers += [SeparableConv2d(channels, out), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(OrderedDict(
            stem=stem, entry=nn.Sequential(*entry), middle=nn.Sequential(*middle), exit=nn.Sequential(*exit_layers),
        ))  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model
def xception(num_classes: int = 10, width: float = 1.0, middle_blocks: int = 4) -> CifarXception:
    """Xception for 32x32 inputs (4.12M parameters at ``width=1``, 4 middle-flow blocks; final maps 4x4).

    ``width`` scales every conv's channels; ``middle_blocks`` is the number of middle-flow repeats
    (8 in the ImageNet network).

    Example:
        >>> import torch
        >>> from lightning_compress.models import create_model
        >>> model = create_model("xception", num_classes=10).eval()
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> model.features(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 1024, 4, 4])
        >>> sum(p.numel() for p in model.parameters())
        4118506
    """
    return CifarXception(num_classes=num_classes, width=width, middle_blocks=middle_blocks)
