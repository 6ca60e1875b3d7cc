"""Which layers to factorize, at which ranks, and the swap itself: the decomposition plan.

A plan is a list of :class:`LayerDecision` (plain values: it goes in checkpoints and JSON). It is made
from weights once (:func:`plan_decomposition`), applied to a model (:func:`apply_plan`), and can be
replayed on a fresh model without weights (``apply_plan(..., from_weights=False)``) or recovered from a
state dict's shapes (:func:`restore_factorized`), so a checkpoint always finds its structure.

``target_compression`` chooses the ranks of all layers together: every layer's candidate ranks (in
multiples of ``rank_multiple``) give a cost (parameters or MACs) and an estimated relative error (the
energy of the dropped singular values of each mode's unfolding, the truncated-HOSVD bound). On each
layer's lower convex hull of error against cost, the steps with the least error added per unit of cost
saved are taken first, across the network, until the model's total cost meets the target. That is the
Lagrangian optimum of summed relative errors for the budget.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from . import factorize
from .layers import METHODS, Factorized, Geometry, build_cp, build_svd, build_tucker, cp_params, factorized_from_state, svd_params, tucker_params
from .ranks import RankRule, parse_rank, round_rank, select_rank, spectrum

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


def not_applicable(method: str, layer: nn.Module) -> str | None:
    """Why ``method`` cannot factorize ``layer`` (a line for the report), or None when it can."""
    if method in ("tucker", "cp"):
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
    if method == "svd":
        return lambda m: isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, Factorized)
    return lambda m: isinstance(m, nn.Conv2d)


def layer_positions(model: nn.Module, example: torch.Tensor, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Input and output spatial positions (H*W; 1 for a Linear, per sample) of the named layers."""
    positions: dict[str, tuple[int, int]] = {}
    hooks = []

    def size(t: torch.Tensor) -> int:
        return int(t.shape[-2] * t.shape[-1]) if t.ndim == 4 else 1

    for name in names:
        layer = model.get_submodule(name)
        hooks.append(layer.register_forward_hook(lambda m, i, o, n=name: positions.__setitem__(n, (size(i[0]), size(o)))))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return positions


def _cost_fn(method: str, g: Geometry, metric: str, pos: tuple[int, int] | None) -> Callable[..., float]:
    """Cost of a factorization of ``g`` at given ranks: parameters, or MACs per sample."""
    if metric == "params" or pos is None:
        return {"tucker": lambda ro, ri: tucker_params(ro, ri, g), "svd": lambda r: svd_params(r, g), "cp": lambda r: cp_params(r, g)}[method]
    p_in, p_out = pos
    if method == "tucker":
        from .layers import tucker_stages

        def tucker_macs(ro: int, ri: int) -> float:
            reduce, expand = tucker_stages(ro, ri, g)
            ri_, ro_ = (ri if reduce else g.in_features), (ro if expand else g.out_features)
            return (g.in_features * ri_ * p_in if reduce else 0) + ri_ * ro_ * g.kernel_area * p_out + (ro_ * g.out_features * p_out if expand else 0)

        return tucker_macs
    if method == "svd":
        return lambda r: r * (g.in_features + g.out_features) * p_out
    kh, kw = g.kernel_size
    return lambda r: r * (g.in_features * p_in + (kh + kw) * p_out + g.out_features * p_out)


def dense_cost(g: Geometry, metric: str, pos: tuple[int, int] | None) -> float:
    if metric == "params" or pos is None:
        return g.params
    return g.in_features * g.out_features * g.kernel_area * pos[1]


def layer_spectra(method: str, layer: nn.Module) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """Singular values (and matrix shape) of what ``method`` truncates: the output-mode and input-mode
    unfoldings of a conv kernel (Tucker, CP), or the weight matrix (SVD). Computed once per plan."""
    w = factorize.effective_weight(layer)
    if method == "svd":
        matrix = w.reshape(w.shape[0], -1)
        return [(spectrum(matrix), tuple(matrix.shape))]
    unfold_out = w.reshape(w.shape[0], -1)
    unfold_in = w.transpose(0, 1).reshape(w.shape[1], -1)
    return [(spectrum(unfold_out), tuple(unfold_out.shape)), (spectrum(unfold_in), tuple(unfold_in.shape))]


def _tail_energy(values: torch.Tensor, size: int) -> np.ndarray:
    """``tail[r]`` = energy of the singular values dropped at rank r, for r = 0..size (a mode can be
    larger than its unfolding's rank: the values past it are zeros)."""
    energy = (values.double() ** 2).cpu().numpy()
    tail = np.zeros(max(size, len(energy)) + 1)
    tail[: len(energy)] = np.cumsum(energy[::-1])[::-1]
    return tail


def _rule_ranks(method: str, rule: RankRule, spectra, g: Geometry, multiple: int, clamped: list[str], name: str) -> tuple[int, ...]:
    """``spectra()`` gives :func:`layer_spectra` of the layer (called only when the rule needs it)."""
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


def _estimated_error(method: str, g: Geometry, spectra, ranks: tuple[int, ...]) -> float | None:
    """The truncated-HOSVD (or SVD) error bound ``||W - W_hat|| / ||W||`` at ``ranks``."""
    if method == "cp":
        return None
    sizes = (g.out_features, g.in_features) if method == "tucker" else (len(spectra[0][0]),)
    total = float((spectra[0][0].double() ** 2).sum())
    dropped = sum(_tail_energy(values, size)[min(rank, size)] for (values, _), size, rank in zip(spectra, sizes, ranks))
    return math.sqrt(dropped / total) if total else 0.0


def _candidates(values: int, multiple: int) -> np.ndarray:
    ranks = list(range(multiple, values, multiple)) if multiple > 1 else list(range(1, values))
    return np.array(sorted(set(ranks + [values])), dtype=np.int64)


def _lower_hull(costs: np.ndarray, errors: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of (cost, error), from the cheapest point to the least error."""
    order = np.lexsort((errors, costs))
    hull: list[int] = []
    for i in order:
        if hull and errors[i] >= errors[hull[-1]] - 1e-12:
            continue  # costs more for no less error (below 1e-12 relative energy: rounding noise)
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (costs[b] - costs[a]) * (errors[i] - errors[a]) - (errors[b] - errors[a]) * (costs[i] - costs[a])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(int(i))
    return hull


def allocate_ranks(
    layers: dict[str, nn.Module],
    method: str,
    target_compression: float,
    total_cost: float,
    multiple: int = 8,
    metric: str = "params",
    positions: dict[str, tuple[int, int]] | None = None,
    spectra: dict[str, list] | None = None,
) -> dict[str, tuple[int, ...] | None]:
    """Ranks for every layer so that the model's cost drops ``target_compression`` times (None: dense).

    ``total_cost`` is the whole model's cost (parameters or MACs) before; layers outside ``layers``
    keep theirs. ``spectra`` maps names to :func:`layer_spectra` already computed.
    """
    if method not in ("tucker", "svd"):
        raise ValueError(f"target_compression works with method 'tucker' or 'svd', not {method!r} "
                         "(CP has no error estimate without running it)")
    budget = total_cost / target_compression
    options: dict[str, tuple[list[tuple[int, ...] | None], np.ndarray, np.ndarray]] = {}
    fixed = total_cost
    for name, layer in layers.items():
        g = Geometry.of(layer)
        pos = positions.get(name) if positions else None
        cost = _cost_fn(method, g, metric, pos)
        dense = dense_cost(g, metric, pos)
        fixed -= dense
        ranks: list[tuple[int, ...] | None] = [None]
        costs, errors = [dense], [0.0]
        layer_values = spectra[name] if spectra and name in spectra else layer_spectra(method, layer)
        if method == "tucker":
            (s_out, _), (s_in, _) = layer_values
            t_out, t_in = _tail_energy(s_out, g.out_features), _tail_energy(s_in, g.in_features)
            total = max(t_out[0], 1e-300)
            ro, ri = _candidates(g.out_features, multiple), _candidates(g.in_features, multiple)
            grid_o, grid_i = np.meshgrid(ro, ri, indexing="ij")
            errs = (t_out[grid_o] + t_in[grid_i]) / total
            for a, b, e in zip(grid_o.ravel(), grid_i.ravel(), errs.ravel()):
                ranks.append((int(a), int(b)))
                costs.append(cost(int(a), int(b)))
                errors.append(float(e))
        else:
            (s, _), = layer_values
            tail = _tail_energy(s, len(s))
            total = max(tail[0], 1e-300)
            for r in _candidates(len(s), multiple):
                ranks.append((int(r),))
                costs.append(cost(int(r)))
                errors.append(float(tail[min(r, len(s))] / total))
        options[name] = (ranks, np.asarray(costs, dtype=np.float64), np.asarray(errors))

    current: dict[str, int] = {}
    steps = []
    spent = fixed
    for name, (ranks, costs, errors) in options.items():
        hull = _lower_hull(costs, errors)
        current[name] = hull[-1]
        spent += costs[hull[-1]]
        for k in range(len(hull) - 1, 0, -1):
            here, cheaper = hull[k], hull[k - 1]
            saved = costs[here] - costs[cheaper]
            steps.append(((errors[cheaper] - errors[here]) / saved, name, len(hull) - k, cheaper, saved))
    steps.sort(key=lambda s: (s[0], s[1], s[2]))
    for _, name, _, cheaper, saved in steps:
        if spent <= budget:
            break
        current[name] = cheaper
        spent -= saved
    if spent > budget * (1 + 1e-9):
        raise ValueError(
            f"target_compression={target_compression:g} is out of reach: factorizing these {len(layers)} layers "
            f"at ranks in multiples of {multiple} gives at most {total_cost / spent:.2f}x ({metric})"
        )
    return {name: options[name][0][index] for name, index in current.items()}


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
        after = _cost_fn(method, g, "params", None)(*ranks)
        if after >= g.params:
            decision.note = f"ranks {tuple(ranks)} save no parameters"
            continue
        decision.method, decision.ranks, decision.params_after = method, tuple(int(r) for r in ranks), int(after)
        decision.macs_after = int(_cost_fn(method, g, "macs", pos)(*ranks)) if pos else None
        decision.estimated_error = _estimated_error(method, g, spectra_of(name), decision.ranks) if method != "cp" else None
    return [decisions[name] for name in names]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _build(decision: LayerDecision, layer: nn.Module | None, from_weights: bool, n_iter_max: int | None) -> Factorized:
    g = Geometry(**decision.geometry) if decision.geometry else Geometry.of(layer)
    if from_weights:
        if decision.method == "tucker":
            return factorize.tucker2(layer, *decision.ranks, **({"n_iter_max": n_iter_max} if n_iter_max else {}))
        if decision.method == "cp":
            return factorize.cp(layer, decision.ranks[0], **({"n_iter_max": n_iter_max} if n_iter_max else {}))
        return factorize.svd(layer, decision.ranks[0])
    like = next(layer.parameters()) if layer is not None else None
    if decision.method == "tucker":
        return build_tucker(g, *decision.ranks, like=like)
    if decision.method == "cp":
        return build_cp(g, decision.ranks[0], like=like)
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
        _set_submodule(model, decision.name, new)
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
        _set_submodule(model, name, new)
        restored.append(name)
    return restored


def plan_to_state(plan: list[LayerDecision]) -> list[dict[str, Any]]:
    return [d.to_dict() for d in plan]


def plan_from_state(state: list[dict[str, Any]]) -> list[LayerDecision]:
    return [LayerDecision.from_dict(d) for d in state]
