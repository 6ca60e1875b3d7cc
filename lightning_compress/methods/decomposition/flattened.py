"""Flattened convolutions (Jin, Dundar and Culurciello 2014): every filter a sum of separable terms.

Each 3-D filter ``W[o] (C_in, K_h, K_w)`` is written as ``s`` rank-1 terms ``a (x) b (x) c`` (channels,
rows, columns), ``s`` the layer's rank (Jin et al. use ``s = 1``), and the layer runs as
(method ``"flattened"``):

* ``lateral`` 1x1 conv, C_in -> s * C_out (every term's channel vector ``a``),
* ``vertical`` K_h x 1 depthwise conv on the s * C_out channels (``b``; the layer's vertical stride,
  padding and dilation),
* ``horizontal`` 1 x K_w depthwise conv (``c``; the horizontal ones; the bias when ``s = 1``),
* ``combine`` (only when ``s > 1``): grouped 1x1 conv, groups = C_out, adding each filter's ``s`` terms
  (the bias).

Unlike CP, whose rank-R terms are shared by all filters and mixed by a final 1x1 conv, the terms here
belong to one filter each: ``s * C_out * (C_in + K_h + K_w)`` parameters (``+ s * C_out`` for ``combine``).

Fitting, per filter and batched over all of them: a nested SVD (the ``(C_in K_h) x K_w`` unfolding, then
each left singular vector as a ``C_in x K_h`` matrix) gives mutually orthogonal rank-1 terms, exact with
all :func:`flattened_full_terms` of them; the ``s`` largest per filter start alternating least squares.
Because the terms are orthogonal, the energy of the dropped ones is the exact error of that start, which
is what the ``"energy:x"`` rule and the rank allocation read.

Example:
    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv2d(8, 16, 3, padding=1).double()
    >>> layer = flattened(conv, 1)
    >>> [name for name, _ in layer.named_children()], layer.params, sum(p.numel() for p in conv.parameters())
    (['lateral', 'vertical', 'horizontal'], 240, 1168)
    >>> exact = flattened(conv, flattened_full_terms(Geometry.of(conv)))
    >>> x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    >>> bool(torch.allclose(exact(x), conv(x))), exact.error < 1e-10
    (True, True)
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from .layers import Factorized, Geometry, _conv, _split
from .ranks import RankRule


def flattened_full_terms(g: Geometry) -> int:
    """Terms per filter at which the nested SVD is exact: ``min(C_in K_h, K_w) * min(C_in, K_h)``."""
    kh, kw = g.kernel_size
    return min(g.in_features * kh, kw) * min(g.in_features, kh)


def flattened_params(terms, g: Geometry):
    kh, kw = g.kernel_size
    width = terms * g.out_features
    combine = width * (terms > 1)
    return width * (g.in_features + kh + kw) + combine + (g.out_features if g.bias else 0)


def flattened_macs(terms, g: Geometry, pos: tuple[int, int]):
    """Per sample; both depthwise stages counted at the output's size (exact at stride 1)."""
    kh, kw = g.kernel_size
    width = terms * g.out_features
    return width * (g.in_features * pos[0] + (kh + kw + (terms > 1)) * pos[1])


def build_flattened(g: Geometry, terms: int, like: torch.Tensor | None = None) -> Factorized:
    (kh, kw), (sh, sw), (dh, dw), pad = g.kernel_size, g.stride, g.dilation, g.padding
    if g.padding_mode != "zeros" and not isinstance(pad, str):
        raise ValueError(f"flattened needs zero padding; this layer uses padding_mode={g.padding_mode!r}")
    width = terms * g.out_features
    stages: OrderedDict[str, nn.Module] = OrderedDict(
        lateral=_conv(g.in_features, width, like=like),
        vertical=_conv(width, width, (kh, 1), (sh, 1), pad if isinstance(pad, str) else (_split(pad, 0), 0), (dh, 1),
                       groups=width, like=like),
        horizontal=_conv(width, width, (1, kw), (1, sw), pad if isinstance(pad, str) else (0, _split(pad, 1)), (1, dw),
                         groups=width, bias=g.bias and terms == 1, like=like),
    )
    if terms > 1:
        # Channel f * terms + t is term t of filter f: group f adds its filter's terms.
        stages["combine"] = _conv(width, g.out_features, groups=g.out_features, bias=g.bias, like=like)
    return Factorized(stages, "flattened", (terms,), g)


def flattened_from_state(g: Geometry, shape: dict[str, torch.Size]) -> Factorized:
    return build_flattened(g, shape["lateral"][0] // g.out_features)


def nested_terms(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthogonal rank-1 terms of every filter of ``weight`` (O, C, H, W), largest first per filter.

    Returns ``(norms (O, T), a (O, C, T), b (O, H, T), c (O, W, T))`` with unit vectors: filter o is
    ``sum_t norms[o, t] a[o, :, t] (x) b[o, :, t] (x) c[o, :, t]``.
    """
    o, ch, h, w = weight.shape
    u, s, vh = torch.linalg.svd(weight.reshape(o, ch * h, w), full_matrices=False)  # (O, CH, k1)
    k1 = s.shape[1]
    p, t, qh = torch.linalg.svd(u.transpose(1, 2).reshape(o, k1, ch, h), full_matrices=False)  # (O, k1, C, k2)
    k2 = t.shape[2]
    norms = (s[:, :, None] * t).reshape(o, k1 * k2)
    a = p.permute(0, 2, 1, 3).reshape(o, ch, k1 * k2)
    b = qh.permute(0, 3, 1, 2).reshape(o, h, k1 * k2)
    c = vh.transpose(1, 2)[:, :, :, None].expand(o, w, k1, k2).reshape(o, w, k1 * k2)
    order = norms.argsort(dim=1, descending=True)
    take = lambda x: x.gather(2, order[:, None, :].expand(-1, x.shape[1], -1))  # noqa: E731
    return norms.gather(1, order), take(a), take(b), take(c)


def term_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norms of :func:`nested_terms` (O, T), float64: what the energy rule and allocation read."""
    return nested_terms(weight.detach().to("cpu", torch.float64))[0]


def energy_terms(norms: torch.Tensor, ratio: float) -> int:
    """Smallest ``s`` whose first ``s`` terms of every filter keep the fraction ``ratio`` of the norm."""
    energy = (norms**2).sum(0).cumsum(0)
    if float(energy[-1]) == 0:
        return 1
    return int(torch.searchsorted(energy / energy[-1], ratio**2 * (1 - 1e-12)).item()) + 1


def dropped_energy(norms: torch.Tensor) -> list[float]:
    """``out[s]``: relative squared error of the start at ``s`` terms, s = 0..T."""
    energy = (norms.double() ** 2).sum(0)
    total = max(float(energy.sum()), 1e-300)
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    return [float(v) / total for v in tail]


def _als(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, sweeps: int):
    """Rank-s CP of every filter at once by alternating least squares (each update is exact, so the
    error never rises); a ridge of 1e-12 of the Gram's scale keeps the small solves regular."""
    def solve(rhs: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
        ridge = 1e-12 * gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-300)[:, None, None]
        return torch.linalg.solve(gram + ridge * eye, rhs.transpose(1, 2)).transpose(1, 2)

    gram = lambda x: x.transpose(1, 2) @ x  # noqa: E731
    for _ in range(sweeps):
        a = solve(torch.einsum("ochw,ohs,ows->ocs", weight, b, c), gram(b) * gram(c))
        b = solve(torch.einsum("ochw,ocs,ows->ohs", weight, a, c), gram(a) * gram(c))
        c = solve(torch.einsum("ochw,ocs,ohs->ows", weight, a, b), gram(a) * gram(b))
    return a, b, c


@torch.no_grad()
def flattened(layer: nn.Conv2d, terms: int, n_iter_max: int = 25) -> Factorized:
    """Fit the flattened chain of ``layer`` with ``terms`` rank-1 terms per filter: the nested-SVD start,
    then ``n_iter_max`` ALS sweeps (none at full terms, where the start is exact). Written here, not with
    TensorLy's ``parafac``: that fits one tensor at a time, and a layer has C_out small ones."""
    from .factorize import _bias_into, _relative_error, effective_weight

    g = Geometry.of(layer)
    full = flattened_full_terms(g)
    if not 1 <= terms <= full:
        raise ValueError(f"terms={terms!r} is out of range for {tuple(layer.weight.shape)}: give 1..{full}")
    weight = effective_weight(layer)
    out = build_flattened(g, terms, like=weight)
    w = weight.to("cpu", torch.float64)
    norms, a, b, c = nested_terms(w)
    a, b, c = a[:, :, :terms] * norms[:, None, :terms], b[:, :, :terms], c[:, :, :terms]
    if terms < full:
        a, b, c = _als(w, a, b, c, n_iter_max)
        # Balance the three vectors' norms, so that fine-tuning moves them at similar scales.
        scale = (a.norm(dim=1) * b.norm(dim=1) * c.norm(dim=1)).clamp_min(1e-300) ** (1 / 3)
        a, b, c = (x * (scale / x.norm(dim=1).clamp_min(1e-300))[:, None, :] for x in (a, b, c))
    width = terms * g.out_features
    out.lateral.weight.copy_(a.permute(0, 2, 1).reshape(width, g.in_features, 1, 1))
    out.vertical.weight.copy_(b.permute(0, 2, 1).reshape(width, 1, -1, 1))
    out.horizontal.weight.copy_(c.permute(0, 2, 1).reshape(width, 1, 1, -1))
    if terms > 1:
        out.combine.weight.fill_(1.0)
    _bias_into(out.combine if terms > 1 else out.horizontal, layer)
    approx = torch.einsum("ocs,ohs,ows->ochw", a, b, c)
    out.error = _relative_error(w, approx)
    return out


def check_flattened_rule(rule: RankRule, rank: object, argument: str = "rank") -> None:
    """The singular-value rules (vbmf, svt) read one matrix; a flattened layer has a tensor per filter."""
    if rule.kind not in ("int", "fraction", "energy"):
        raise ValueError(f"{argument}={rank!r} is not valid for method='flattened': give an int >= 1 (terms per "
                         "filter), a float in (0, 1] (a fraction of the terms that make a filter exact) or 'energy:x'")


def flattened_terms(rule: RankRule, spectra, g: Geometry, clamped: list[str], name: str) -> int:
    """Terms per filter for ``rule``; ``spectra()`` gives the term norms (called only for energy)."""
    full = flattened_full_terms(g)
    if rule.kind == "int":
        if rule.value > full:
            clamped.append(f"{name} ({int(rule.value)} > {full})")
        return min(int(rule.value), full)
    if rule.kind == "fraction":
        return max(1, math.ceil(rule.value * full - 1e-9))
    return min(energy_terms(spectra()[0][0], rule.value), full)
