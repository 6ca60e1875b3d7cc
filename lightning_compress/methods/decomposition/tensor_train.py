"""Tensor-train (TT) factorization of convolutions and linear layers (method ``"tt"``).

TT-SVD (Oseledets 2011) writes a d-way tensor as a chain of 3-way cores ``G_k`` of shape
``(r_{k-1}, n_k, r_k)`` with ``r_0 = r_d = 1``; the ranks ``r_1 .. r_{d-1}`` are what a rank rule picks,
each from the singular values of the k-th unfolding (rows: modes 1..k), whose dropped energy bounds the
error: ``||W - W_tt||^2 <= sum_k tail_k(r_k)``.

* A KxK convolution: the kernel is read as the 4-way tensor ``(C_in, K_h, K_w, C_out)`` and runs as four
  small convolutions, ``core0`` 1x1 (C_in -> r1), ``core1`` K_h x 1 (r1 -> r2, the layer's vertical
  stride, padding and dilation), ``core2`` 1 x K_w (r2 -> r3, the horizontal ones), ``core3`` 1x1
  (r3 -> C_out, the bias). CP (Lebedev et al.) is the special case with diagonal middle cores; with full
  middle cores the chain is exact at ranks ``(C_in, min(C_in K_h, K_w C_out), C_out)``.
* A Linear layer: the TT-matrix of Novikov et al. 2015. ``in_features = n_1 ... n_d`` and
  ``out_features = m_1 ... m_d`` are split into ``d = 3`` balanced factors (:func:`tt_modes`, a
  deterministic rule, so a state dict's shapes say everything), and core ``k`` of shape
  ``(r_{k-1}, m_k, n_k, r_k)`` runs as one :class:`TTCore`: a small matmul over ``(r_{k-1}, n_k)``
  of the reshaped activations. The full matrix is never rebuilt.

Example:
    >>> import torch
    >>> from torch import nn
    >>> linear = nn.Linear(64, 10).double()
    >>> tt = tensor_train(linear, tt_full_ranks(Geometry.of(linear)))
    >>> [name for name, _ in tt.named_children()], tt.ranks, tt_modes(64), tt_modes(10)
    (['core0', 'core1', 'core2'], (20, 4), (4, 4, 4), (5, 2, 1))
    >>> x = torch.randn(3, 64, dtype=torch.float64)
    >>> bool(torch.allclose(tt(x), linear(x)))
    True
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .layers import Factorized, Geometry, _conv, _split

TT_ORDER = 3  # modes per side of a Linear layer's TT-matrix


def tt_modes(features: int, order: int = TT_ORDER) -> tuple[int, ...]:
    """``features`` as ``order`` factors, as equal as the primes allow, largest first (1s pad a prime)."""
    primes, n, p = [], features, 2
    while p * p <= n:
        while n % p == 0:
            primes.append(p)
            n //= p
        p += 1
    if n > 1:
        primes.append(n)
    bins = [1] * order
    for prime in sorted(primes, reverse=True):
        bins[bins.index(min(bins))] *= prime
    return tuple(sorted(bins, reverse=True))


def tt_dims(g: Geometry) -> list[int]:
    """The mode size of each core: ``(C_in, K_h, K_w, C_out)`` for a conv, ``m_k n_k`` for a Linear."""
    if g.kind == "conv":
        return [g.in_features, g.kernel_size[0], g.kernel_size[1], g.out_features]
    return [m * n for m, n in zip(tt_modes(g.out_features), tt_modes(g.in_features))]


def tt_bounds(g: Geometry) -> list[int]:
    """The largest useful rank of each unfolding: ``min(prod dims[:k], prod dims[k:])``."""
    dims = tt_dims(g)
    return [min(math.prod(dims[:k]), math.prod(dims[k:])) for k in range(1, len(dims))]


def clamp_tt_ranks(g: Geometry, ranks):
    """Ranks no core can exceed: ``r_k <= r_{k-1} n_k`` and ``r_k <= n_{k+1} r_{k+1}`` (larger ones add
    parameters and no accuracy). Works elementwise on numpy arrays too (for rank allocation grids)."""
    dims = tt_dims(g)
    r = [1, *ranks, 1]
    lowest = np.maximum if isinstance(r[1], np.ndarray) else max
    smallest = np.minimum if isinstance(r[1], np.ndarray) else min
    for k in range(1, len(r) - 1):
        r[k] = smallest(r[k], r[k - 1] * dims[k - 1])
    for k in range(len(r) - 2, 0, -1):
        r[k] = lowest(smallest(r[k], r[k + 1] * dims[k]), 1)
    return tuple(r[1:-1])


def tt_full_ranks(g: Geometry) -> tuple[int, ...]:
    """The ranks at which the chain reproduces the layer exactly."""
    return clamp_tt_ranks(g, tt_bounds(g))


def tt_params(g: Geometry, ranks) -> Any:
    dims, r = tt_dims(g), [1, *ranks, 1]
    return sum(r[k] * dims[k] * r[k + 1] for k in range(len(dims))) + (g.out_features if g.bias else 0)


def tt_macs(g: Geometry, ranks, pos: tuple[int, int]) -> Any:
    """Multiply-accumulates per sample. For a conv the middle stages are counted at the output's size
    (exact at stride 1; the K_h x 1 stage's output has the input's width)."""
    r = [1, *ranks, 1]
    p_in, p_out = pos
    if g.kind == "conv":
        kh, kw = g.kernel_size
        return g.in_features * r[1] * p_in + (r[1] * kh * r[2] + r[2] * kw * r[3] + r[3] * g.out_features) * p_out
    ms, ns = tt_modes(g.out_features), tt_modes(g.in_features)
    # Core k sees the modes n_{k+1..d} not yet contracted and m_{1..k-1} already produced.
    return sum(math.prod(ns[k + 1:]) * math.prod(ms[:k]) * r[k] * ns[k] * ms[k] * r[k + 1] for k in range(len(ms))) * p_out


class TTCore(nn.Linear):
    """One TT-matrix core as a matmul. Input ``(..., n_k * P * r_{k-1})``, flattened in that order, where
    ``P`` holds the modes ``n_{k+1..d}`` to come and ``m_{1..k-1}`` done; output ``(..., P * m_k * r_k)``,
    the next core's input order. The first core's input is the layer's ``(..., in_features)`` (``r_0 = 1``),
    the last's output ``(..., out_features)``. ``weight`` is the core ``(r_{k-1}, m_k, n_k, r_k)`` as the
    ``(m_k r_k, r_{k-1} n_k)`` matrix; ``bias`` (last core only) has ``out_features`` of the whole layer.

    A Linear subclass, so reports count its parameters and MACs; pruning and quantization leave it alone
    (they take exact Linear classes only).
    """

    def __init__(self, rank_in: int, mode_in: int, mode_out: int, rank_out: int, bias_features: int = 0,
                 device=None, dtype=None) -> None:
        super().__init__(rank_in * mode_in, mode_out * rank_out, bias=False, device=device, dtype=dtype)
        self.mode_in = mode_in
        if bias_features:
            self.bias = nn.Parameter(torch.zeros(bias_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank_in = self.in_features // self.mode_in
        x = x.unflatten(-1, (self.mode_in, -1, rank_in)).movedim(-3, -1).flatten(-2)
        y = F.linear(x, self.weight).flatten(-2)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"mode_in={self.mode_in}, {super().extra_repr()}"


def build_tt(g: Geometry, ranks: tuple[int, ...], like: torch.Tensor | None = None) -> Factorized:
    """An untrained TT chain for a layer of geometry ``g`` at (clamped) ``ranks``."""
    ranks = tuple(int(r) for r in clamp_tt_ranks(g, ranks))
    expected = len(tt_dims(g)) - 1
    if len(ranks) != expected:
        raise ValueError(f"tt of a {g.kind} layer needs {expected} ranks, got {len(ranks)}: {ranks}")
    r = [1, *ranks, 1]
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    if g.kind == "conv":
        (kh, kw), (sh, sw), (dh, dw), pad = g.kernel_size, g.stride, g.dilation, g.padding
        if g.padding_mode != "zeros" and not isinstance(pad, str):
            raise ValueError(f"tt needs zero padding; this layer uses padding_mode={g.padding_mode!r}")
        pad_h, pad_w = (pad, pad) if isinstance(pad, str) else ((_split(pad, 0), 0), (0, _split(pad, 1)))
        stages["core0"] = _conv(g.in_features, r[1], like=like)
        stages["core1"] = _conv(r[1], r[2], (kh, 1), (sh, 1), pad_h, (dh, 1), like=like)
        stages["core2"] = _conv(r[2], r[3], (1, kw), (1, sw), pad_w, (1, dw), like=like)
        stages["core3"] = _conv(r[3], g.out_features, bias=g.bias, like=like)
    else:
        ms, ns = tt_modes(g.out_features), tt_modes(g.in_features)
        kwargs = {"device": like.device, "dtype": like.dtype} if like is not None else {}
        for k in range(len(ms)):
            last = k == len(ms) - 1
            stages[f"core{k}"] = TTCore(r[k], ns[k], ms[k], r[k + 1], g.out_features if last and g.bias else 0, **kwargs)
    return Factorized(stages, "tt", ranks, g)


def tt_from_state(g: Geometry, shape: dict[str, torch.Size]) -> Factorized:
    """The chain whose cores have these weight shapes (``{"core0": ..., ...}``)."""
    if g.kind == "conv":
        return build_tt(g, tuple(shape[f"core{k}"][0] for k in range(3)))
    ms = tt_modes(g.out_features, len(shape))
    if len(shape) != TT_ORDER:
        raise ValueError(f"a Linear layer's TT-matrix has {TT_ORDER} cores, the state dict holds {len(shape)}")
    return build_tt(g, tuple(shape[f"core{k}"][0] // ms[k] for k in range(len(ms) - 1)))


def tt_tensor(weight: torch.Tensor, g: Geometry) -> torch.Tensor:
    """The weight as the d-way tensor the TT factorizes (dims :func:`tt_dims`)."""
    if g.kind == "conv":
        return weight.permute(1, 2, 3, 0)
    ms, ns = tt_modes(g.out_features), tt_modes(g.in_features)
    d = len(ms)
    interleaved = [i for k in range(d) for i in (k, d + k)]
    return weight.reshape(*ms, *ns).permute(*interleaved).reshape(tt_dims(g))


def tt_unfoldings(weight: torch.Tensor, g: Geometry) -> list[torch.Tensor]:
    """The k-th unfoldings (rows: modes 1..k), k = 1..d-1: their spectra give the TT ranks."""
    t, dims = tt_tensor(weight, g), tt_dims(g)
    return [t.reshape(math.prod(dims[:k]), -1) for k in range(1, len(dims))]


@torch.no_grad()
def tensor_train(layer: nn.Conv2d | nn.Linear, ranks: tuple[int, ...]) -> Factorized:
    """TT-SVD of a layer's weight (TensorLy's ``tensor_train`` / ``tensor_train_matrix``, float64 on the
    CPU) at ``ranks`` (clamped with :func:`clamp_tt_ranks`), as the chain of :func:`build_tt`."""
    import tensorly as tl
    from tensorly.decomposition import tensor_train as tl_tensor_train, tensor_train_matrix

    from .factorize import _bias_into, _relative_error, effective_weight

    g = Geometry.of(layer)
    weight = effective_weight(layer)
    out = build_tt(g, ranks, like=weight)
    full_rank = [1, *out.ranks, 1]
    w = weight.to("cpu", torch.float64)
    stages = list(out.children())
    with tl.backend_context("pytorch"):
        if g.kind == "conv":
            cores = tl_tensor_train(tt_tensor(w, g), rank=full_rank).factors
            g1, g2, g3, g4 = cores
            stages[0].weight.copy_(g1[0].T[:, :, None, None])
            stages[1].weight.copy_(g2.permute(2, 0, 1)[..., None])
            stages[2].weight.copy_(g3.permute(2, 0, 1)[:, :, None, :])
            stages[3].weight.copy_(g4[:, :, 0].T[:, :, None, None])
            approx = tl.tt_to_tensor(cores).permute(3, 0, 1, 2)
        else:
            ms, ns = tt_modes(g.out_features), tt_modes(g.in_features)
            cores = tensor_train_matrix(w.reshape(*ms, *ns), rank=full_rank).factors
            for stage, core in zip(stages, cores):  # core (r, m, n, r') -> weight (m r', r n)
                stage.weight.copy_(core.permute(1, 3, 0, 2).reshape(stage.weight.shape))
            approx = tl.tt_matrix_to_matrix(cores)
    _bias_into(stages[-1], layer)
    out.error = _relative_error(w, approx.reshape(w.shape))
    return out
