"""Models sized for small images, built by name: ``create_model("vgg19_bn", num_classes=10)``."""

from . import mobile, small, vgg, xception  # noqa: F401  (importing registers the builders)
from .registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
