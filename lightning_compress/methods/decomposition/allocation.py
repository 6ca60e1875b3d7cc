"""Rank allocation across the network: the ranks that meet ``target_compression`` with the least error.

Every layer's candidate ranks (in multiples of ``rank_multiple``) give a cost (parameters or MACs,
:func:`cost_fn`) and an estimated relative error (the energy of the dropped singular values of each
mode's unfolding, the truncated-HOSVD bound, :func:`estimated_error`). On each layer's lower convex
hull of error against cost (:func:`lower_hull`), the steps with the least error added per unit of cost
saved are taken first, across the network, until the model's total cost meets the target
(:func:`allocate_ranks`). That is the Lagrangian optimum of summed relative errors for the budget.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from . import factorize
from .flattened import dropped_energy, flattened_full_terms, flattened_macs, flattened_params, term_norms
from .layers import Geometry, cp_params, svd_params, tucker_params
from .ranks import spectrum
from .tensor_train import clamp_tt_ranks, tt_bounds, tt_macs, tt_params, tt_unfoldings


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


def cost_fn(method: str, g: Geometry, metric: str, pos: tuple[int, int] | None) -> Callable[..., float]:
    """Cost of a factorization of ``g`` at given ranks: parameters, or MACs per sample."""
    if method == "tt":
        return (lambda *r: tt_params(g, r)) if metric == "params" or pos is None else (lambda *r: tt_macs(g, r, pos))
    if method == "flattened":
        return (lambda s: flattened_params(s, g)) if metric == "params" or pos is None else (lambda s: flattened_macs(s, g, pos))
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
    unfoldings of a conv kernel (Tucker, CP), the weight matrix (SVD), the k-th unfoldings of the TT
    tensor (TT); for flattened, each filter's term norms ``(O, T)``. Computed once per plan."""
    w = factorize.effective_weight(layer)
    if method == "tt":
        return [(spectrum(m), tuple(m.shape)) for m in tt_unfoldings(w, Geometry.of(layer))]
    if method == "flattened":
        norms = term_norms(w)
        return [(norms, tuple(norms.shape))]
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


def estimated_error(method: str, g: Geometry, spectra, ranks: tuple[int, ...]) -> float | None:
    """The truncated-HOSVD (or SVD) error bound ``||W - W_hat|| / ||W||`` at ``ranks``."""
    if method == "cp":
        return None
    if method == "flattened":
        return math.sqrt(dropped_energy(spectra[0][0])[min(ranks[0], spectra[0][0].shape[1])])
    if method == "tt":
        # Oseledets 2011, Thm 2.2: the squared TT-SVD error is at most the sum of the unfoldings' tails.
        sizes = tuple(len(values) for values, _ in spectra)
    else:
        sizes = (g.out_features, g.in_features) if method == "tucker" else (len(spectra[0][0]),)
    total = float((spectra[0][0].double() ** 2).sum())
    dropped = sum(_tail_energy(values, size)[min(rank, size)] for (values, _), size, rank in zip(spectra, sizes, ranks))
    return math.sqrt(dropped / total) if total else 0.0


def _candidates(values: int, multiple: int) -> np.ndarray:
    ranks = list(range(multiple, values, multiple)) if multiple > 1 else list(range(1, values))
    return np.array(sorted(set(ranks + [values])), dtype=np.int64)


def _pareto(costs: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Indices of the points that no cheaper point matches in error: a TT grid of 10^5-10^6 rank
    triples thins to a few hundred before :func:`lower_hull`, whose loop is Python."""
    order = np.lexsort((errors, costs))
    best = np.minimum.accumulate(errors[order])
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = errors[order][1:] < best[:-1] - 1e-12
    return order[keep]


def lower_hull(costs: np.ndarray, errors: np.ndarray) -> list[int]:
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
    if method not in ("tucker", "svd", "tt", "flattened"):
        raise ValueError(f"target_compression works with method 'tucker', 'svd', 'tt' or 'flattened', not {method!r} "
                         "(CP has no error estimate without running it)")
    budget = total_cost / target_compression
    options: dict[str, tuple[list[tuple[int, ...] | None], np.ndarray, np.ndarray]] = {}
    fixed = total_cost
    for name, layer in layers.items():
        g = Geometry.of(layer)
        pos = positions.get(name) if positions else None
        cost = cost_fn(method, g, metric, pos)
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
        elif method == "tt":
            bounds = tt_bounds(g)
            tails = [_tail_energy(values, bound) for (values, _), bound in zip(layer_values, bounds)]
            grid = clamp_tt_ranks(g, [x.ravel() for x in np.meshgrid(*[_candidates(b, multiple) for b in bounds], indexing="ij")])
            errs = sum(tail[r] for tail, r in zip(tails, grid)) / max(tails[0][0], 1e-300)
            grid_costs = np.asarray(cost(*grid), dtype=np.float64)
            for i in _pareto(grid_costs, errs):
                ranks.append(tuple(int(r[i]) for r in grid))
                costs.append(float(grid_costs[i]))
                errors.append(float(errs[i]))
        elif method == "flattened":
            (norms, _), = layer_values
            dropped = dropped_energy(norms)
            for terms in range(1, flattened_full_terms(g) + 1):
                ranks.append((terms,))
                costs.append(cost(terms))
                errors.append(dropped[terms])
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
        hull = lower_hull(costs, errors)
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
