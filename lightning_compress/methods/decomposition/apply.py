"""Putting factorized layers into a model: applying a plan, or restoring the structure a state dict holds."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from . import factorize
from .flattened import build_flattened, flattened
from .layers import Factorized, Geometry, build_cp, build_svd, build_tucker, factorized_from_state
from .plan import LayerDecision
from .tensor_train import build_tt, tensor_train


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _build(decision: LayerDecision, layer: nn.Module | None, from_weights: bool, n_iter_max: int | None) -> Factorized:
    g = Geometry(**decision.geometry) if decision.geometry else Geometry.of(layer)
    if from_weights:
        if decision.method == "tucker":
            return factorize.tucker2(layer, *decision.ranks, **({"n_iter_max": n_iter_max} if n_iter_max else {}))
        if decision.method == "cp":
            return factorize.cp(layer, decision.ranks[0], **({"n_iter_max": n_iter_max} if n_iter_max else {}))
        if decision.method == "tt":
            return tensor_train(layer, decision.ranks)
        if decision.method == "flattened":
            return flattened(layer, decision.ranks[0], **({"n_iter_max": n_iter_max} if n_iter_max else {}))
        return factorize.svd(layer, decision.ranks[0])
    like = next(layer.parameters()) if layer is not None else None
    if decision.method == "tucker":
        return build_tucker(g, *decision.ranks, like=like)
    if decision.method == "cp":
        return build_cp(g, decision.ranks[0], like=like)
    if decision.method == "tt":
        return build_tt(g, decision.ranks, like=like)
    if decision.method == "flattened":
        return build_flattened(g, decision.ranks[0], like=like)
    return build_svd(g, decision.ranks[0], like=like)


def apply_plan(
    model: nn.Module,
    plan: list[LayerDecision],
    from_weights: bool = True,
    n_iter_max: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Replace the planned layers of ``model`` by factorized ones; returns their names.

    ``from_weights=True`` computes the factors from the current weights (and records each layer's
    measured ``error`` in the plan); False builds untrained layers of the planned shapes, for a state
    dict to fill. Layers already factorized at the planned ranks are left alone.
    """
    replaced = []
    for decision in plan:
        if decision.method == "skip":
            continue
        layer = model.get_submodule(decision.name)
        if isinstance(layer, Factorized):
            if layer.method == decision.method and layer.ranks == decision.ranks:
                continue
            raise ValueError(f"{decision.name} is already factorized ({layer.method} {layer.ranks}); "
                             f"the plan asks for {decision.method} {decision.ranks}")
        new = _build(decision, layer, from_weights, n_iter_max)
        if layer.weight.is_contiguous(memory_format=torch.channels_last) and layer.weight.ndim == 4 and not layer.weight.is_contiguous():
            new.to(memory_format=torch.channels_last)
        new.train(layer.training)
        if from_weights:
            decision.error = new.error
        decision.ranks = new.ranks
        set_submodule(model, decision.name, new)
        replaced.append(decision.name)
        if progress is not None:
            progress(decision.name)
    return replaced


def restore_factorized(model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Rebuild the factorized layers a state dict holds, before ``load_state_dict``; returns their names.

    A dense Conv2d / Linear of ``model`` whose entry in ``state_dict`` (keys under ``prefix``) has
    factor stages instead of a ``weight`` becomes the matching :class:`Factorized` (untrained; the load
    fills it); a factorized layer whose saved ranks differ is rebuilt at the saved ranks.
    """
    restored = []
    for name, layer in list(model.named_modules()):
        if not name or not isinstance(layer, (nn.Conv2d, nn.Linear, Factorized)):
            continue
        key = f"{prefix}{name}."
        if isinstance(layer, Factorized):
            g = layer.geometry
        else:
            if key + "weight" in state_dict:
                continue
            g = Geometry.of(layer)
        new = factorized_from_state(g, state_dict, key)
        if new is None:
            continue
        if isinstance(layer, Factorized) and all(
            state_dict[key + n + ".weight"].shape == m.weight.shape for n, m in new.named_children()
        ) and {n for n, _ in new.named_children()} == {n for n, _ in layer.named_children()}:
            continue
        like = next(layer.parameters())
        new.to(like.device, like.dtype)
        if like.ndim == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
            new.to(memory_format=torch.channels_last)
        set_submodule(model, name, new)
        restored.append(name)
    return restored
