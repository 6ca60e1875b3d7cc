"""Fake quantization with a straight-through estimator: the forward sees quantized values, the backward
passes the gradient through (zero outside the representable range: the clipped STE).

Affine and symmetric formats use PyTorch's fused ``torch.fake_quantize_per_tensor_affine`` /
``torch.fake_quantize_per_channel_affine`` kernels (one pass, their own STE backward, and exported to
ONNX as QuantizeLinear / DequantizeLinear). Fixed-point with stochastic rounding and binary weights
have no such kernel and are written here. Everything is computed in float32, also under bf16 autocast.
"""

from __future__ import annotations

import torch

from .formats import Format


def minmax_scale(lo: torch.Tensor, hi: torch.Tensor, fmt: Format, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map ``[lo, hi]`` (tensors, per tensor or per channel) onto the format."""
    qmin, qmax = fmt.int_range(signed)
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    if signed or fmt.scheme == "symmetric":
        bound = torch.maximum(-lo, hi)
        scale = bound / qmax
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero_point = torch.clamp(qmin - torch.round(lo / torch.clamp(scale, min=1e-12)), qmin, qmax).to(torch.int32)
    return torch.clamp(scale, min=1e-8), zero_point


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: Format, signed: bool,
                  axis: int | None = None) -> torch.Tensor:
    """``x`` rounded to the integer grid ``scale * (q - zero_point)``, per tensor or along ``axis``."""
    qmin, qmax = fmt.int_range(signed)
    x = x.float()
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point.reshape(()), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)


class _FixedPoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, step: float, lo: float, hi: float, stochastic: bool) -> torch.Tensor:
        scaled = x / step
        rounded = torch.floor(scaled + torch.rand_like(scaled)) if stochastic else torch.round(scaled)
        ctx.save_for_backward((x >= lo) & (x <= hi))
        return torch.clamp(rounded * step, lo, hi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fixed_point(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``<IL, FL>`` fixed point: step ``2^-FL``, saturation at ``[-2^(IL-1), 2^(IL-1) - 2^-FL]``."""
    step = 2.0 ** -fmt.fractional_bits
    lo, hi = -(2.0 ** (fmt.integer_bits - 1)), 2.0 ** (fmt.integer_bits - 1) - step
    return _FixedPoint.apply(x.float(), step, lo, hi, fmt.rounding == "stochastic")


class _Binary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, stochastic: bool) -> torch.Tensor:
        ctx.save_for_backward(x.abs() <= 1)
        if stochastic:  # +1 with probability hard_sigmoid(x) = clip((x + 1) / 2, 0, 1)
            return torch.where(torch.rand_like(x) < torch.clamp((x + 1) / 2, 0, 1), 1.0, -1.0).to(x.dtype)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None  # the hard-tanh STE of Courbariaux et al.


def binarize(x: torch.Tensor, stochastic: bool = False) -> torch.Tensor:
    """``+1 / -1`` in the forward, the gradient passed through where ``|x| <= 1``."""
    return _Binary.apply(x.float(), stochastic)
