"""Which weights to keep: scores (magnitude, OBD saliency, filter norms) and exact-count selection.

Selection keeps exactly ``round((1 - sparsity) * n)`` entries by ``topk``, rather than cutting at a
threshold value, so the reached sparsity equals the scheduled one even when scores tie (a
threshold on a weight full of exact zeros would prune all of them at once).

Hysteresis (Dynamic Network Surgery): with ``margin > 0`` the score of a currently kept entry is
multiplied by ``1 + margin`` before ranking. A kept weight is pruned only when its magnitude falls
below ``t / (1 + margin)`` and a pruned one is spliced back only when it rises above ``t`` (``t``
the cut of the ranking): DNS's two thresholds ``a`` and ``a + margin``, expressed as ranks so that the
sparsity stays exactly on schedule.
"""

from __future__ import annotations

import math

import torch

CRITERIA = ("magnitude", "obd", "bn_scale")
STRUCTURES = ("unstructured", "filter")
SCOPES = ("layer", "global")


def weight_scores(weight: torch.Tensor, criterion: str, hessian_diag: torch.Tensor | None = None) -> torch.Tensor:
    """Per-weight importance: ``|w|``, or OBD's saliency ``1/2 h_ii w_i^2``."""
    weight = weight.detach().float()
    if criterion == "magnitude":
        return weight.abs()
    if criterion == "bn_scale":  # scored per channel by its BatchNorm scale (filter_scores), not per weight
        return weight.abs()
    if criterion == "obd":
        if hessian_diag is None:
            raise ValueError("criterion='obd' needs the Hessian diagonal estimate")
        return 0.5 * hessian_diag.float() * weight.square()
    raise ValueError(f"criterion={criterion!r} is not known; valid: {', '.join(map(repr, CRITERIA))}")


def filter_scores(scores: torch.Tensor, weight: torch.Tensor, criterion: str, norm: int,
                  norm_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One score per output channel: the filter's L1 / L2 norm, its summed OBD saliency, or (network
    slimming, Liu et al. 2017) ``|gamma|`` of the BatchNorm that follows it (``norm_scale``)."""
    if criterion == "bn_scale":
        if norm_scale is None:
            raise ValueError("criterion='bn_scale' needs the scale (weight) of the BatchNorm after the convolution")
        return norm_scale.detach().float().abs()
    if criterion == "obd":
        return scores.flatten(1).sum(1)
    flat = weight.detach().float().flatten(1)
    return flat.abs().sum(1) if norm == 1 else flat.norm(dim=1)


def with_hysteresis(scores: torch.Tensor, kept: torch.Tensor | None, margin: float) -> torch.Tensor:
    if kept is None or margin == 0:
        return scores
    return torch.where(kept, scores * (1.0 + margin), scores)


def keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Bool tensor shaped like ``scores``, True at its ``n_keep`` largest entries."""
    flat = scores.reshape(-1)
    n_keep = max(0, min(int(n_keep), flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if n_keep:
        keep[flat.topk(n_keep, sorted=False).indices] = True
    return keep.view(scores.shape)


def n_keep_for(numel: int, sparsity: float, minimum: int = 1) -> int:
    """Entries kept at ``sparsity``; at least ``minimum`` so that no layer is cut off entirely."""
    return max(minimum, numel - int(round(sparsity * numel)))


def layer_keep(scores: dict[str, torch.Tensor], sparsity: dict[str, float]) -> dict[str, torch.Tensor]:
    """Each layer keeps its own top ``1 - sparsity[name]`` fraction."""
    return {name: keep_top(s, n_keep_for(s.numel(), sparsity[name])) for name, s in scores.items()}


def global_keep(scores: dict[str, torch.Tensor], sparsity: float, floor: float = 0.0) -> dict[str, torch.Tensor]:
    """One ranking over all layers: the top ``1 - sparsity`` fraction of all entries is kept.

    Scores must be comparable across layers (raw magnitudes are, as in Han et al.; filter norms are
    normalised by the caller). ``floor``: every layer keeps at least that fraction of its entries (its
    best ones), so that one ranking cannot cut a layer down to a bottleneck.
    """
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    keep = keep_top(flat, n_keep_for(flat.numel(), sparsity, minimum=0))
    out, offset = {}, 0
    for name in names:
        size = scores[name].numel()
        out[name] = keep[offset : offset + size].view(scores[name].shape)
        least = max(1, math.ceil(floor * size))  # never cut a layer off entirely
        if int(out[name].sum()) < least:
            out[name] = keep_top(scores[name], least)
        offset += size
    return out


def expand_filter_mask(channel_keep: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A per-output-channel keep vector broadcast to a weight-shaped bool tensor."""
    return channel_keep.view(-1, *([1] * (weight.ndim - 1))).expand_as(weight)
