"""Fake-quant layers (affine, symmetric, fixed-point, binary) with a straight-through estimator."""

from .formats import ROUNDINGS, SCHEMES, Format
from .layers import (
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    bake_quantized_weight,
    calibrate,
    can_quantize,
    dequantize_layer,
    is_quantized,
    quantize_layer,
    quantized_layers,
)

__all__ = [
    "Format",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "ROUNDINGS",
    "SCHEMES",
    "bake_quantized_weight",
    "calibrate",
    "can_quantize",
    "dequantize_layer",
    "is_quantized",
    "quantize_layer",
    "quantized_layers",
]
