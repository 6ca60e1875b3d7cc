"""The traced operations the channel analysis (:mod:`.channel_graph`) knows, and how it reads their arguments.

An operation outside these tables pins the channels it touches: the analysis then keeps them, so
an unknown operation costs pruning opportunities, never correctness.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from .masks import is_prunable

ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Dropout, nn.Dropout2d, nn.Identity,
)  # fmt: skip
POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
ELEMENTWISE_CALLS = {
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.dropout, F.dropout2d, torch.relu, torch.relu_, torch.sigmoid,
    torch.tanh, "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone",
}  # fmt: skip
POOL_CALLS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
# Binary operations whose operands' channels line up (broadcast over N, H, W): they tie them.
TYING_CALLS = {operator.add, operator.iadd, torch.add, "add", "add_", operator.mul, operator.imul, torch.mul,
                "mul", "mul_", operator.sub, torch.sub, "sub"}  # fmt: skip
CAT_CALLS = {torch.cat, torch.concat, "cat"}
SPLIT_CALLS = {torch.chunk, "chunk", torch.split, "split"}
RESHAPE_CALLS = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}
TRANSPOSE_CALLS = {torch.transpose, "transpose"}
SHAPE_METHODS = {"size", "dim"}
SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


class LayerTracer(fx.Tracer):
    """Keeps every conv, linear and norm layer one graph node (fx would trace into the masked
    subclasses of ``masks.py``, whose ``weight * weight_mask`` would no longer be a named conv)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaf_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)
        return isinstance(m, leaf_types) or super().is_leaf_module(m, module_qualified_name)


def rebuild_problem(module: nn.Module) -> str | None:
    """Why ``module`` cannot be rebuilt at another size, or None.

    Only the plain layer classes and their masked versions are rebuilt: a subclass (a QAT conv, a
    user's layer) may have constructor arguments and state this module does not know to carry over.
    """
    if not (is_prunable(module) or type(module) in NORM_TYPES):
        return f"{type(module).__name__} is not a plain or masked Conv/Linear or a BatchNorm1d/2d, so it is not rebuilt"
    if parametrize.is_parametrized(module):
        return f"{type(module).__name__} has parametrizations, which rebuilding would drop"
    if "weight_orig" in module._parameters:
        return f"{type(module).__name__} is pruned by torch.nn.utils.prune (call prune.remove first)"
    return None


def reads_only_shape(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in SHAPE_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1] in SHAPE_ATTRIBUTES


def shape_args(node: fx.Node) -> list | None:
    if node.target not in ("view", "reshape", torch.reshape):
        return None
    shape = list(node.kwargs.get("shape", node.args[1:]))
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = list(shape[0])
    return shape


def is_flatten(node: fx.Node, start: int, end: int) -> bool:
    if node.target not in (torch.flatten, "flatten"):
        return False
    got_start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
    got_end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
    return (got_start, got_end) == (start, end)


def spatial_mean(node: fx.Node) -> bool | None:
    """For a mean over both spatial dims, whether it keeps them (keepdim); None for any other mean."""
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    if not isinstance(dims, (tuple, list)) or {d % 4 for d in dims if isinstance(d, int)} != {2, 3}:
        return None
    return bool(keepdim)


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} {node.target!r}"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    return node.op
