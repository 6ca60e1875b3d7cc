"""Which layers to factorize, at which ranks: the decomposition plan.

A plan is a list of :class:`LayerDecision` (plain values: it goes in checkpoints and JSON). It is made
from weights once (:func:`plan_decomposition`), applied to a model (:func:`.apply.apply_plan`), and can
be replayed on a fresh model without weights (``apply_plan(..., from_weights=False)``) or recovered
from a state dict's shapes (:func:`.apply.restore_factorized`), so a checkpoint always finds its
structure.

Each layer's ranks come from a rank rule (:mod:`.ranks`), or, with ``target_compression``, from the
network-wide allocation of :func:`.allocation.allocate_ranks`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .allocation import allocate_ranks, cost_fn, dense_cost, estimated_error, layer_positions, layer_spectra
from .layers import METHODS, Factorized, Geometry
from .flattened import check_flattened_rule, flattened_terms
from .ranks import RankRule, parse_rank, round_rank, select_rank
from .tensor_train import clamp_tt_ranks, tt_bounds

METRICS = ("params", "macs")


@dataclass
class LayerDecision:
    """What happens to one layer: ``method`` ``"skip"`` keeps it dense, with the reason in ``note``."""

    name: str
    method: str
    ranks: tuple[int, ...] = ()
    note: str = ""
    error: float | None = None  # measured ||W - W_hat|| / ||W|| (None until factorized from weights)
    estimated_error: float | None = None  # from the mode spectra, before factorizing
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    geometry: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ranks"] = list(self.ranks)
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "LayerDecision":
        data = dict(data)
        data["ranks"] = tuple(data.get("ranks", ()))
        geometry = data.get("geometry") or {}
        data["geometry"] = {k: tuple(v) if isinstance(v, list) else v for k, v in geometry.items()}
        return LayerDecision(**data)


def plan_to_state(plan: list[LayerDecision]) -> list[dict[str, Any]]:
    return [d.to_dict() for d in plan]


def plan_from_state(state: list[dict[str, Any]]) -> list[LayerDecision]:
    return [LayerDecision.from_dict(d) for d in state]


def not_applicable(method: str, layer: nn.Module) -> str | None:
    """Why ``method`` cannot factorize ``layer`` (a line for the report), or None when it can."""
    if method == "tt" and isinstance(layer, nn.Linear):
        return None
    if method in ("tucker", "cp", "tt", "flattened"):
        if not isinstance(layer, nn.Conv2d):
            return f"{method} factorizes Conv2d layers; use 'svd' for {type(layer).__name__}"
        if layer.groups != 1:
            return "grouped / depthwise convolution"
        if layer.kernel_size == (1, 1):
            return "1x1 kernel (use 'svd')"
        return None
    if method == "svd":
        if isinstance(layer, nn.Linear):
            return None
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                return "grouped / depthwise convolution"
            return None if layer.kernel_size == (1, 1) else f"{tuple(layer.kernel_size)} kernel (use 'tucker' or 'cp')"
        return f"svd factorizes Linear and 1x1 Conv2d layers, not {type(layer).__name__}"
    raise ValueError(f"method={method!r} is not known; valid: {', '.join(map(repr, METHODS))}")


def accepts(method: str) -> Callable[[nn.Module], bool]:
    """The layers a method considers (and reports as skipped when it cannot factorize them)."""
    if method in ("svd", "tt"):
        return lambda m: isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, Factorized)
    return lambda m: isinstance(m, nn.Conv2d)


def _rule_ranks(method: str, rule: RankRule, spectra, g: Geometry, multiple: int, clamped: list[str], name: str) -> tuple[int, ...]:
    """``spectra()`` gives :func:`.allocation.layer_spectra` of the layer (called only when the rule needs it)."""
    if method == "flattened":
        return (flattened_terms(rule, spectra, g, clamped, name),)
    if method == "tt":
        bounds = tt_bounds(g)
        picked = [select_rank(rule, values, shape) for (values, shape), _ in zip(spectra(), bounds)]
        if any(rank > bound for rank, bound in zip(picked, bounds)):
            clamped.append(f"{name} {tuple(picked)} > {tuple(bounds)}")
        return tuple(int(r) for r in clamp_tt_ranks(g, [round_rank(r, b, multiple) for r, b in zip(picked, bounds)]))
    if method == "svd":
        (values, shape), = spectra()
        size = min(shape)
        rank = select_rank(rule, values, shape)
        if rank > size:
            clamped.append(f"{name} ({rank} > {size})")
        return (round_rank(rank, size, multiple),)
    if method == "cp" and rule.kind in ("int", "fraction"):
        rank = int(rule.value) if rule.kind == "int" else max(1, math.ceil(rule.value * max(g.out_features, g.in_features)))
        return (math.ceil(rank / multiple) * multiple,)
    (s_out, shape_out), (s_in, shape_in) = spectra()
    r_out, r_in = select_rank(rule, s_out, shape_out), select_rank(rule, s_in, shape_in)
    if method == "cp":
        # One CP rank for the layer: the larger of the two mode ranks the rule picks.
        rank = max(r_out, r_in)
        return (math.ceil(rank / multiple) * multiple if multiple > 1 else rank,)
    if r_out > g.out_features or r_in > g.in_features:
        clamped.append(f"{name} ({r_out}, {r_in}) > ({g.out_features}, {g.in_features})")
    return round_rank(r_out, g.out_features, multiple), round_rank(r_in, g.in_features, multiple)


def plan_decomposition(
    model: nn.Module,
    names: list[str],
    method: str,
    rank: int | float | str = "energy:0.9",
    rank_multiple: int = 8,
    target_compression: float | None = None,
    metric: str = "params",
    example: torch.Tensor | None = None,
) -> list[LayerDecision]:
    """Decide method and ranks for the named layers of ``model`` from their weights (nothing is changed)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not known; valid: {', '.join(map(repr, METHODS))}")
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not known; valid: {', '.join(map(repr, METRICS))}")
    if metric == "macs" and example is None:
        raise ValueError("metric='macs' needs an example input to measure each layer's spatial size")
    rule = parse_rank(rank) if target_compression is None else None
    if method == "flattened" and rule is not None:
        check_flattened_rule(rule, rank)
    layers = {name: model.get_submodule(name) for name in names}
    positions = layer_positions(model, example, names) if example is not None else None
    decisions: dict[str, LayerDecision] = {}
    usable: dict[str, nn.Module] = {}
    for name, layer in layers.items():
        g = Geometry.of(layer)
        pos = positions.get(name) if positions else None
        decision = LayerDecision(name, "skip", params_before=g.params, params_after=g.params, geometry=g.as_dict(),
                                 macs_before=int(dense_cost(g, "macs", pos)) if pos else None)
        decision.macs_after = decision.macs_before
        reason = not_applicable(method, layer)
        if reason:
            decision.note = reason
        else:
            usable[name] = layer
        decisions[name] = decision

    spectra: dict[str, list] = {}  # each layer's singular values, computed at most once

    def spectra_of(name: str) -> list:
        if name not in spectra:
            spectra[name] = layer_spectra(method, layers[name])
        return spectra[name]

    if target_compression is not None:
        if not target_compression > 1:
            raise ValueError(f"target_compression={target_compression!r} must be > 1 (times fewer {metric})")
        if metric == "params":
            total = float(sum(p.numel() for p in model.parameters()))
        else:
            from ..report import compression_report

            total = float(compression_report(model, input_size=tuple(example.shape[1:])).macs)
        spectra.update({name: spectra_of(name) for name in usable})
        chosen = allocate_ranks(usable, method, target_compression, total, rank_multiple, metric, positions, spectra)
    else:
        clamped: list[str] = []
        chosen = {name: _rule_ranks(method, rule, lambda name=name: spectra_of(name), Geometry.of(layer), rank_multiple,
                                    clamped, name)
                  for name, layer in usable.items()}
        if clamped:
            warnings.warn(f"rank={rank!r} exceeds the mode size of {len(clamped)} layer(s); clamped to the size: "
                          + ", ".join(clamped[:8]) + (", ..." if len(clamped) > 8 else ""), stacklevel=2)

    for name, ranks in chosen.items():
        decision, layer = decisions[name], layers[name]
        g = Geometry.of(layer)
        pos = positions.get(name) if positions else None
        if ranks is None:
            decision.note = "kept dense by the budget"
            continue
        after = cost_fn(method, g, "params", None)(*ranks)
        if after >= g.params:
            decision.note = f"ranks {tuple(ranks)} save no parameters"
            continue
        decision.method, decision.ranks, decision.params_after = method, tuple(int(r) for r in ranks), int(after)
        decision.macs_after = int(cost_fn(method, g, "macs", pos)(*ranks)) if pos else None
        decision.estimated_error = estimated_error(method, g, spectra_of(name), decision.ranks) if method != "cp" else None
    return [decisions[name] for name in names]
