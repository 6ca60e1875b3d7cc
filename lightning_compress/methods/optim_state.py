"""Reset an optimizer's per-weight state (momentum, Adam moments) where a compression step changed weights."""

from __future__ import annotations

import torch


@torch.no_grad()
def zero_weight_state(optimizer: torch.optim.Optimizer, weight: torch.Tensor, where: torch.Tensor | None = None) -> None:
    """Zero every state tensor shaped like ``weight`` (all of it, or only at ``where``)."""
    for value in optimizer.state.get(weight, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == weight.shape:
            if where is None:
                value.zero_()
            else:
                value.masked_fill_(where, 0)
