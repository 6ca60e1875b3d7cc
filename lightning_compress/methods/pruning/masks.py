"""Weight masks held as buffers, so that pruning never renames a parameter.

``add_mask(conv)`` turns an ``nn.Conv2d`` into a :class:`MaskedConv2d` in place: the same object, the
same ``weight`` and ``bias`` Parameters (an optimizer built earlier still updates them), plus a bool
buffer ``weight_mask``. The state dict keeps ``weight`` and ``bias`` and gains ``weight_mask``, which
is why a checkpoint saved mid-schedule resumes with its masks: ``torch.nn.utils.prune`` renames the
weight to ``weight_orig`` instead, and Lightning's ``ModelPruning`` folds its masks away on save.

The forward applies the mask in one of three ways:

* ``straight_through=False`` (default): ``where(mask, weight, 0)``; autograd masks the gradient too, so
  a pruned weight that is exactly zero stays zero under SGD momentum, weight decay and Adam, provided
  the optimizer state of pruned entries is cleared when they are pruned
  (:func:`clear_pruned_optimizer_state`).
* ``mask_in_forward=False``: the plain dense forward, for weights known to be exactly zero where
  pruned; the training loop must then call :func:`mask_gradients` before each optimizer step. This
  is the fast path of the pruning callback: one in-place op per layer and step instead of a masked
  copy of the weight in the forward and another in the backward.
* ``straight_through=True`` (Dynamic Network Surgery): the forward uses the masked weight, the
  gradient reaches every dense weight unmasked (an identity backward), so a pruned weight keeps
  learning and can be spliced back when the mask is recomputed.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import broadcast_
from ..optim_state import zero_weight_state


class _StraightThroughMask(torch.autograd.Function):
    """Masked weight forward, identity backward: the gradient reaches pruned weights too."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, weight, weight.new_zeros(()))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _MaskedWeight:
    """Mixin of the masked layer classes; ``weight_mask`` is a bool buffer shaped like ``weight``."""

    weight: nn.Parameter
    weight_mask: torch.Tensor
    straight_through: bool = False
    mask_in_forward: bool = True

    def masked_weight(self) -> torch.Tensor:
        weight = self.weight
        if self.straight_through:
            return _StraightThroughMask.apply(weight, self.weight_mask)
        if not self.mask_in_forward:
            return weight
        return torch.where(self.weight_mask, weight, weight.new_zeros(()))


class MaskedConv1d(_MaskedWeight, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class MaskedConv2d(_MaskedWeight, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class MaskedConv3d(_MaskedWeight, nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class MaskedLinear(_MaskedWeight, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


_MASKED_CLASS = {nn.Conv1d: MaskedConv1d, nn.Conv2d: MaskedConv2d, nn.Conv3d: MaskedConv3d, nn.Linear: MaskedLinear}
_DENSE_CLASS = {masked: dense for dense, masked in _MASKED_CLASS.items()}
PRUNABLE_TYPES = tuple(_MASKED_CLASS)


def is_masked(module: nn.Module) -> bool:
    return isinstance(module, _MaskedWeight)


def is_prunable(module: nn.Module) -> bool:
    """A Conv1d/2d/3d or Linear (exactly those classes, already masked, or a layer naming its masked form)."""
    return type(module) in _MASKED_CLASS or is_masked(module) or hasattr(type(module), "masked_class")


def add_mask(module: nn.Module, straight_through: bool = False, mask_in_forward: bool = True) -> nn.Module:
    """Give ``module`` an all-ones ``weight_mask`` buffer and a masked forward, in place; idempotent.

    Example:
        >>> conv = nn.Conv2d(3, 8, 3)
        >>> weight = conv.weight
        >>> masked = add_mask(conv)
        >>> masked is conv and conv.weight is weight, type(conv).__name__, sorted(conv.state_dict())
        (True, 'MaskedConv2d', ['bias', 'weight', 'weight_mask'])
    """
    if not is_masked(module):
        # A class that is something else besides (a fake-quant layer) names its masked form itself.
        cls = getattr(type(module), "masked_class", None) or _MASKED_CLASS.get(type(module))
        if cls is None:
            raise TypeError(
                f"cannot mask a {type(module).__name__}: supported are {', '.join(c.__name__ for c in _MASKED_CLASS)}"
            )
        module.__class__ = cls
        # ones_like keeps the weight's memory format: a channels_last weight gets a channels_last mask.
        module.register_buffer("weight_mask", torch.ones_like(module.weight, dtype=torch.bool))
    module.straight_through = straight_through
    module.mask_in_forward = mask_in_forward
    return module


def set_mask(module: nn.Module, mask: torch.Tensor, zero_pruned: bool = True) -> None:
    """Copy ``mask`` into the module's mask; with ``zero_pruned`` set pruned weights to exactly zero."""
    with torch.no_grad():
        module.weight_mask.copy_(mask)
        if zero_pruned:
            module.weight.masked_fill_(~module.weight_mask, 0)


def remove_mask(module: nn.Module, fold: bool = True) -> nn.Module:
    """Undo :func:`add_mask`; with ``fold`` the pruned weights become exact zeros first.

    Afterwards the module is the plain layer again and its state dict loads into the unpruned
    architecture.
    """
    if not is_masked(module):
        return module
    if fold:
        with torch.no_grad():
            module.weight.masked_fill_(~module.weight_mask, 0)
    del module._buffers["weight_mask"]
    module.__dict__.pop("straight_through", None)
    module.__dict__.pop("mask_in_forward", None)
    # A class that is masked and something else (a fake-quant layer) names what it is without the mask.
    module.__class__ = getattr(type(module), "unmasked_class", None) or _DENSE_CLASS[type(module)]
    return module


@torch.no_grad()
def mask_gradients(modules: Iterable[nn.Module]) -> None:
    """Zero the gradient of pruned weights (the companion of ``mask_in_forward=False``)."""
    for module in modules:
        if module.weight.grad is not None:
            module.weight.grad.masked_fill_(~module.weight_mask, 0)


@torch.no_grad()
def clear_pruned_optimizer_state(optimizer: torch.optim.Optimizer, modules: Iterable[nn.Module]) -> None:
    """Zero the optimizer's per-weight state (momentum, Adam moments) at pruned positions.

    Without this, SGD momentum accumulated before pruning keeps moving a pruned weight away from
    zero for many steps (the fault that made Distiller's DNS revive weights it had pruned).
    """
    for module in modules:
        zero_weight_state(optimizer, module.weight, ~module.weight_mask)


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if is_masked(m)}


def broadcast_masks(modules: Iterable[nn.Module], src: int = 0) -> None:
    """Make every process's masks equal to those of rank ``src`` (no-op outside torch.distributed)."""
    for module in modules:
        broadcast_(module.weight_mask, src)
