"""A registry of model builders, so recipes and tests name models by string (as timm does)."""

from __future__ import annotations

from typing import Callable

from torch import nn

ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(fn: ModelBuilder) -> ModelBuilder:
    """Register ``fn`` under its own name; ``fn(num_classes=..., **kwargs)`` must return an ``nn.Module``."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted.

    Example:
        >>> "vgg19_bn" in list_models() and "mobilenet_v2" in list_models()
        True
    """
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build a registered model.

    Example:
        >>> from lightning_compress.models import create_model
        >>> model = create_model("vgg19_bn", num_classes=10)
        >>> sum(p.numel() for p in model.parameters())
        20040522
    """
    if name not in _REGISTRY:
        raise ValueError(f"model={name!r} is not registered; valid names: {', '.join(list_models())}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
    return _REGISTRY[name](num_classes=num_classes, **kwargs)
