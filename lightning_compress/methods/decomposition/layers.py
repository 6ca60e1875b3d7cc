"""Factorized layers: a dense Conv2d / Linear replaced by a short chain of small ones.

The chain is an ``nn.Sequential`` of ordinary layers with named stages, so a forward pass runs the
small convolutions directly (no kernel is rebuilt at each forward, unlike TensorLy-Torch's default),
``compression_report`` counts each stage's parameters and MACs, and the state dict is plain tensors:

* Tucker-2 (``"tucker"``): ``reduce`` 1x1 (in -> r_in), ``core`` KxK with the layer's stride, padding
  and dilation (r_in -> r_out), ``expand`` 1x1 (r_out -> out, the bias). A stage that would not save
  parameters is folded into the core (a mode kept at full rank needs no 1x1).
* CP (``"cp"``, Lebedev et al. 2015): ``reduce`` 1x1 (in -> R), ``vertical`` Kx1 and ``horizontal`` 1xK
  depthwise (R channels), ``expand`` 1x1 (R -> out, the bias).
* SVD (``"svd"``): ``reduce`` (in -> r, the layer's stride for a 1x1 conv) and ``expand`` (r -> out, the
  bias), Linear or 1x1 Conv2d.
* tensor train (``"tt"``, :mod:`.tensor_train`): ``core0`` .. ``core3`` for a conv (1x1, Kx1, 1xK, 1x1),
  ``core0`` .. ``core2`` (TT-matrix cores) for a Linear.
* flattened (``"flattened"``, :mod:`.flattened`): ``lateral`` 1x1, ``vertical`` Kx1 and ``horizontal``
  1xK depthwise, and ``combine`` (grouped 1x1) when a filter has more than one term.

The structure of a factorized layer follows from its stages' shapes alone, so a checkpoint rebuilds it
(:func:`factorized_from_state`) before its weights load.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

METHODS = ("tucker", "cp", "svd", "tt", "flattened")


@dataclass(frozen=True)
class Geometry:
    """What a dense layer was: enough to rebuild it or any factorization of it."""

    kind: str  # "conv" or "linear"
    in_features: int
    out_features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: Any = (0, 0)  # a pair, or "same" / "valid"
    dilation: tuple[int, int] = (1, 1)
    padding_mode: str = "zeros"
    bias: bool = True

    @staticmethod
    def of(layer: nn.Module) -> "Geometry":
        if isinstance(layer, nn.Linear):
            return Geometry("linear", layer.in_features, layer.out_features, bias=layer.bias is not None)
        if isinstance(layer, nn.Conv2d):
            return Geometry(
                "conv",
                layer.in_channels,
                layer.out_channels,
                tuple(layer.kernel_size),
                tuple(layer.stride),
                layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
                tuple(layer.dilation),
                layer.padding_mode,
                layer.bias is not None,
            )
        raise TypeError(f"cannot factorize a {type(layer).__name__}; only Conv2d and Linear")

    @property
    def kernel_area(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def params(self) -> int:
        return self.in_features * self.out_features * self.kernel_area + (self.out_features if self.bias else 0)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Factorized(nn.Sequential):
    """A dense layer's factorization: named stages run in order. ``method``, ``ranks`` and
    ``geometry`` (the layer it replaced) describe it; ``error`` is the relative reconstruction error
    ``||W - W_hat|| / ||W||`` measured when it was built from weights (None when built from shapes)."""

    def __init__(
        self, stages: "OrderedDict[str, nn.Module]", method: str, ranks: tuple[int, ...], geometry: Geometry
    ) -> None:
        super().__init__(stages)
        self.method = method
        self.ranks = tuple(int(r) for r in ranks)
        self.geometry = geometry
        self.error: float | None = None

    def extra_repr(self) -> str:
        return f"method={self.method!r}, ranks={self.ranks}"

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _conv(cin: int, cout: int, kernel=(1, 1), stride=(1, 1), padding: Any = 0, dilation=(1, 1), groups=1,
          bias=False, padding_mode="zeros", like: torch.Tensor | None = None) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias, padding_mode)
    return conv.to(like.device, like.dtype) if like is not None else conv


def _split(value: Any, index: int) -> Any:
    """The height (0) or width (1) part of a padding, for the separable CP stages."""
    return value if isinstance(value, str) else value[index]


def tucker_stages(out_rank: int, in_rank: int, g: Geometry) -> tuple[bool, bool]:
    """Which of ``reduce`` / ``expand`` a Tucker-2 layer of these ranks keeps: the fewest parameters.

    A 1x1 stage costs its own weights and saves ``(size - rank) * rank_other * K^2`` in the core; at
    full rank of a mode (or close to it) folding the factor into the core is cheaper and one kernel fewer.
    """
    ka, cin, cout = g.kernel_area, g.in_features, g.out_features
    options = {
        (True, True): cin * in_rank + in_rank * out_rank * ka + out_rank * cout,
        (False, True): cin * out_rank * ka + out_rank * cout,
        (True, False): cin * in_rank + in_rank * cout * ka,
        (False, False): cin * cout * ka,
    }
    fewest = min(options.values())
    # Ties go to fewer stages (dict order lists the chains with more stages first).
    return [stages for stages, params in reversed(options.items()) if params == fewest][0]


def tucker_params(out_rank: int, in_rank: int, g: Geometry) -> int:
    reduce, expand = tucker_stages(out_rank, in_rank, g)
    r_in = in_rank if reduce else g.in_features
    r_out = out_rank if expand else g.out_features
    bias = g.out_features if g.bias else 0
    return (g.in_features * r_in if reduce else 0) + r_in * r_out * g.kernel_area + (r_out * g.out_features if expand else 0) + bias


def svd_params(rank: int, g: Geometry) -> int:
    return rank * (g.in_features + g.out_features) + (g.out_features if g.bias else 0)


def cp_params(rank: int, g: Geometry) -> int:
    kh, kw = g.kernel_size
    return rank * (g.in_features + kh + kw + g.out_features) + (g.out_features if g.bias else 0)


def build_tucker(
    g: Geometry, out_rank: int, in_rank: int, like: torch.Tensor | None = None, stages: tuple[bool, bool] | None = None
) -> Factorized:
    """An untrained Tucker-2 chain for a conv of geometry ``g``; ``stages`` says whether ``reduce`` and
    ``expand`` exist (default: :func:`tucker_stages`, which folds the ones that do not pay)."""
    reduce, expand = stages if stages is not None else tucker_stages(out_rank, in_rank, g)
    r_in = in_rank if reduce else g.in_features
    r_out = out_rank if expand else g.out_features
    chain: OrderedDict[str, nn.Module] = OrderedDict()
    if reduce:
        chain["reduce"] = _conv(g.in_features, r_in, like=like)
    chain["core"] = _conv(r_in, r_out, g.kernel_size, g.stride, g.padding, g.dilation, bias=g.bias and not expand,
                          padding_mode=g.padding_mode, like=like)
    if expand:
        chain["expand"] = _conv(r_out, g.out_features, bias=g.bias, like=like)
    return Factorized(chain, "tucker", (r_out, r_in), g)


def build_cp(g: Geometry, rank: int, like: torch.Tensor | None = None) -> Factorized:
    (kh, kw), (sh, sw), (dh, dw) = g.kernel_size, g.stride, g.dilation
    if g.padding_mode != "zeros" and not isinstance(g.padding, str):
        raise ValueError(f"cp needs zero padding; this layer uses padding_mode={g.padding_mode!r}")
    stages = OrderedDict(
        reduce=_conv(g.in_features, rank, like=like),
        vertical=_conv(rank, rank, (kh, 1), (sh, 1), (_split(g.padding, 0), 0) if not isinstance(g.padding, str) else g.padding,
                       (dh, 1), groups=rank, like=like),
        horizontal=_conv(rank, rank, (1, kw), (1, sw), (0, _split(g.padding, 1)) if not isinstance(g.padding, str) else g.padding,
                         (1, dw), groups=rank, like=like),
        expand=_conv(rank, g.out_features, bias=g.bias, like=like),
    )
    return Factorized(stages, "cp", (rank,), g)


def build_svd(g: Geometry, rank: int, like: torch.Tensor | None = None) -> Factorized:
    if g.kind == "linear":
        stages = OrderedDict(reduce=nn.Linear(g.in_features, rank, bias=False), expand=nn.Linear(rank, g.out_features, bias=g.bias))
        if like is not None:
            stages = OrderedDict((k, v.to(like.device, like.dtype)) for k, v in stages.items())
    else:
        if g.kernel_size != (1, 1):
            raise ValueError(f"svd factorizes Linear and 1x1 Conv2d layers, not a {g.kernel_size} kernel; use 'tucker' or 'cp'")
        stages = OrderedDict(
            reduce=_conv(g.in_features, rank, (1, 1), g.stride, g.padding, g.dilation, padding_mode=g.padding_mode, like=like),
            expand=_conv(rank, g.out_features, bias=g.bias, like=like),
        )
    return Factorized(stages, "svd", (rank,), g)


def factorized_from_state(g: Geometry, state: dict[str, torch.Tensor], prefix: str) -> Factorized | None:
    """The factorized layer whose stages the state dict holds under ``prefix`` (``"features.0."``),
    or None when it holds none. Method and ranks are read from the stage names and shapes."""
    cores: dict[str, torch.Size] = {}
    while f"{prefix}core{len(cores)}.weight" in state:
        cores[f"core{len(cores)}"] = state[f"{prefix}core{len(cores)}.weight"].shape
    if cores:
        from .tensor_train import tt_from_state  # imported here: that module builds on this one

        return tt_from_state(g, cores)
    if prefix + "lateral.weight" in state:
        from .flattened import flattened_from_state

        return flattened_from_state(g, {"lateral": state[prefix + "lateral.weight"].shape})
    shape = {name: state[prefix + name + ".weight"].shape for name in ("reduce", "core", "vertical", "horizontal", "expand")
             if prefix + name + ".weight" in state}
    if not shape:
        return None
    if "vertical" in shape:
        return build_cp(g, shape["reduce"][0])
    if "core" in shape:
        return build_tucker(g, shape["core"][0], shape["core"][1], stages=("reduce" in shape, "expand" in shape))
    if "reduce" in shape and "expand" in shape:
        return build_svd(g, shape["reduce"][0])
    raise ValueError(f"state dict under {prefix!r} holds stages {sorted(shape)}, which form no known factorization")
