"""torchvision's initialisation for the CIFAR networks built here, which their constructors leave to PyTorch."""

from __future__ import annotations

from torch import nn


def init_like_torchvision(model: nn.Module) -> None:
    """Kaiming fan-out for convolutions, unit / zero BatchNorm, N(0, 0.01) for Linear layers, zero biases
    (torchvision's VGG and MobileNetV2). PyTorch's default conv init (Kaiming uniform, a=sqrt(5))
    under-scales deep stacks such as VGG19 or Xception's separable convolutions."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
