"""Conv1d / Conv2d / Linear layers that fake-quantize their weights and input activations, swapped in place.

``quantize_layer`` changes a layer's class (the way pruning masks do), so the layer keeps its
Parameter objects: an optimizer built before the swap still trains it, and the weight keys of the
state dict do not change. What quantization learns lives in buffers that travel in checkpoints:

* ``weight_bits``: bits per stored weight (the compression report reads it);
* the formats, the per-channel flag and the observer momentum as the layer's ``_extra_state`` (plain
  values), so that a state dict describes its fake-quant layers completely and
  :func:`lightning_compress.methods.structure.restore_structure` rebuilds them from it alone;
* ``activation_min`` / ``activation_max``: the input range seen so far, an exponential moving
  average of each batch's min and max (taken over all DDP processes, so every process uses the same
  scale); ``activation_observed`` says whether any batch was seen.

Python flags set by the callback: ``quant_enabled`` (fake-quant on or off: QAT can start late) and
``observing`` (update the activation range; frozen later in training and after calibration).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import fx, nn

from ..distributed import is_distributed
from ..pruning.masks import MaskedConv1d, MaskedConv2d, MaskedLinear, is_masked
from .fake_quant import binarize, fake_quantize, fixed_point, minmax_scale
from .formats import Format


class _QuantizedMixin:
    weight_format: Format
    activation_format: Format | None
    momentum: float
    per_channel: bool
    quant_enabled: bool
    observing: bool

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().float().amin(), x.detach().float().amax()
        if is_distributed():
            stats = torch.stack([-lo, hi])
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            lo, hi = -stats[0], stats[1]
        # The first batch sets the range, later ones move it by ``momentum``: branch-free, so no
        # device-to-host sync per layer and step.
        weight = torch.where(self.activation_observed, self.momentum, 1.0)
        self.activation_min.lerp_(lo, weight)
        self.activation_max.lerp_(hi, weight)
        self.activation_observed.fill_(True)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        fmt = self.activation_format
        if fmt is None:
            return x
        if fmt.scheme == "binary":
            return binarize(x, fmt.rounding == "stochastic").to(x.dtype)
        if fmt.scheme == "fixed_point":
            return fixed_point(x, fmt).to(x.dtype)
        if self.observing and self.training:
            self._observe(x)
        scale, zero_point = self.activation_scale_zero_point()
        quantized = fake_quantize(x, scale, zero_point, fmt, signed=fmt.scheme == "symmetric").to(x.dtype)
        # Nothing seen yet (a forward in eval mode before any calibration): the input as it is. A select,
        # not an ``if``: reading the flag back would wait for the device in every layer and step.
        return torch.where(self.activation_observed, quantized, x)

    def activation_scale_zero_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        return minmax_scale(self.activation_min, self.activation_max, self.activation_format,
                            signed=self.activation_format.scheme == "symmetric")

    def source_weight(self) -> torch.Tensor:
        """The weight before quantization: with the pruning mask applied when the layer is pruned too."""
        return self.masked_weight() if is_masked(self) else self.weight

    def weight_scale_zero_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric (zero point 0, what int8 weight kernels expect), per output channel or per tensor."""
        w = self.source_weight().detach().float().reshape(self.weight.shape[0], -1)
        if not self.per_channel:
            w = w.reshape(1, -1)
        return minmax_scale(w.amin(1), w.amax(1), self.weight_format, signed=True)

    def quantized_weight(self) -> torch.Tensor:
        fmt, w = self.weight_format, self.source_weight()
        if fmt.scheme == "binary":
            return binarize(w, fmt.rounding == "stochastic")
        if fmt.scheme == "fixed_point":
            return fixed_point(w, fmt)
        scale, zero_point = self.weight_scale_zero_point()
        return fake_quantize(w, scale, zero_point, fmt, signed=True, axis=0 if self.per_channel else None)

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.quant_enabled:
            return x, self.source_weight()
        # Quantize in fp32 (also under bf16 autocast); the layer then computes as autocast decides.
        return self.quantize_input(x), self.quantized_weight().to(self.weight.dtype)

    def compression_stats(self) -> dict[str, Any]:
        return {"note": f"{self.weight_format.scheme} w{self.weight_format.bits}"
                        + (f"/a{self.activation_format.bits}" if self.activation_format else "")}

    def get_extra_state(self) -> dict[str, Any]:
        # Plain values only: checkpoints load with weights_only=True.
        return {
            "weight_format": asdict(self.weight_format),
            "activation_format": asdict(self.activation_format) if self.activation_format is not None else None,
            "per_channel": bool(self.per_channel),
            "momentum": float(self.momentum),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        configure_layer(self, *quantization_config(state))


class QuantConv2d(_QuantizedMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self._inputs(x)
        return self._conv_forward(x, weight, self.bias)


class QuantConv1d(_QuantizedMixin, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self._inputs(x)
        return self._conv_forward(x, weight, self.bias)


class QuantLinear(_QuantizedMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self._inputs(x)
        return F.linear(x, weight, self.bias)


class QuantMaskedConv2d(_QuantizedMixin, MaskedConv2d):
    """A pruned and fake-quantized conv: the mask applies first, pruned weights quantize to exact zero."""

    unmasked_class = QuantConv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self._inputs(x)
        return self._conv_forward(x, weight, self.bias)


class QuantMaskedConv1d(_QuantizedMixin, MaskedConv1d):
    unmasked_class = QuantConv1d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self._inputs(x)
        return self._conv_forward(x, weight, self.bias)


class QuantMaskedLinear(_QuantizedMixin, MaskedLinear):
    unmasked_class = QuantLinear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self._inputs(x)
        return F.linear(x, weight, self.bias)


# What pruning turns a fake-quant layer into when it masks it after quantization (a checkpoint with masks
# loaded into a model that a quantization callback prepared), and back.
QuantConv1d.masked_class = QuantMaskedConv1d
QuantConv2d.masked_class = QuantMaskedConv2d
QuantLinear.masked_class = QuantMaskedLinear

_QUANTIZED = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear, MaskedConv1d: QuantMaskedConv1d,
              MaskedConv2d: QuantMaskedConv2d, MaskedLinear: QuantMaskedLinear}
_UNQUANTIZED = {quantized: plain for plain, quantized in _QUANTIZED.items()}


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, _QuantizedMixin)


class LayerTracer(fx.Tracer):
    """``torch.fx`` tracing that keeps fake-quant and pruned layers whole: their forwards branch on Python
    flags and buffers; only where they sit and what they read matters to the graph analyses here."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return is_quantized(module) or is_masked(module) or super().is_leaf_module(module, qualified_name)


def can_quantize(module: nn.Module) -> bool:
    return type(module) in _QUANTIZED or is_quantized(module)


def quantize_layer(module: nn.Module, weight_format: Format, activation_format: Format | None,
                   momentum: float = 0.1, per_channel: bool = True) -> nn.Module:
    """Make ``module`` (a Conv1d, Conv2d or Linear) fake-quantize, in place; idempotent (formats are updated)."""
    if not is_quantized(module):
        cls = _QUANTIZED.get(type(module))
        if cls is None:
            raise TypeError(f"cannot quantize a {type(module).__name__}: supported are Conv1d, Conv2d and Linear, "
                            "pruned (masked) or not")
        module.__class__ = cls
        device = module.weight.device
        module.register_buffer("weight_bits", torch.tensor(weight_format.bits, device=device))
        module.register_buffer("activation_min", torch.zeros((), device=device))
        module.register_buffer("activation_max", torch.zeros((), device=device))
        module.register_buffer("activation_observed", torch.zeros((), dtype=torch.bool, device=device))
        module.quant_enabled = True
        module.observing = True
    configure_layer(module, weight_format, activation_format, momentum, per_channel)
    return module


def configure_layer(module: nn.Module, weight_format: Format, activation_format: Format | None,
                    momentum: float, per_channel: bool) -> None:
    module.weight_bits.fill_(weight_format.bits)
    module.weight_format = weight_format
    module.activation_format = activation_format
    module.momentum = momentum
    module.per_channel = per_channel


def quantization_config(extra_state: dict[str, Any]) -> tuple[Format, Format | None, float, bool]:
    """``(weight_format, activation_format, momentum, per_channel)`` from a layer's saved extra state."""
    try:
        activation = extra_state["activation_format"]
        return (Format(**extra_state["weight_format"]), Format(**activation) if activation is not None else None,
                float(extra_state["momentum"]), bool(extra_state["per_channel"]))
    except (KeyError, TypeError) as error:
        raise ValueError(f"not the saved state of a fake-quant layer: {extra_state!r} ({error})") from error


@torch.no_grad()
def bake_quantized_weight(module: nn.Module) -> nn.Module:
    """The weight takes its quantized value for good; the layer stays fake-quant and computes the same
    (quantizing a weight already on its grid returns it unchanged). In place."""
    if is_quantized(module):
        module.weight.copy_(module.quantized_weight().to(module.weight.dtype))
    return module


def dequantize_layer(module: nn.Module, bake: bool = True) -> nn.Module:
    """Back to a plain (or still masked) Conv / Linear with the fake-quantized weight baked in (what
    was trained is what is kept; ``bake=False`` keeps the weight as it is); the quantization buffers
    are dropped. In place."""
    if not is_quantized(module):
        return module
    if bake:
        bake_quantized_weight(module)
    for name in ("weight_bits", "activation_min", "activation_max", "activation_observed"):
        module._buffers.pop(name, None)
    module.__class__ = _UNQUANTIZED[type(module)]
    return module


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if is_quantized(m)}


@torch.no_grad()
def calibrate(model: nn.Module, batches, forward=None) -> int:
    """PTQ: run ``batches`` through ``model`` in eval mode with the activation observers on, then freeze
    them; no weight or BatchNorm statistic changes. Returns the number of batches seen.

    ``forward(model, batch)`` runs one batch (default: ``model(batch[0])`` for (inputs, labels) pairs).
    """
    layers = quantized_layers(model).values()
    was_training = model.training
    model.eval()
    for layer in layers:
        layer.observing = True
        layer.training = True  # observers update in "training" mode only; BatchNorm stays in eval
    seen = 0
    try:
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            else:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            seen += 1
    finally:
        for layer in layers:
            layer.observing = False
            layer.training = was_training
        model.train(was_training)
    return seen
