"""Structured filter pruning's graph analysis: which conv filters can be removed, and why the rest cannot.

Filter pruning (Li et al., "Pruning Filters for Efficient ConvNets"; Network Slimming) trains with
whole filters masked, then makes the model really smaller. A removed filter takes with it one output
channel of its conv, that channel's BatchNorm entries and the matching input slice of the one layer
that reads the channel. That is only sound where the channel flows to a single reader through
channel-wise operations. A residual add, a concatenation, a channel shuffle or a depthwise conv ties
the channel to channels of other layers, which would all have to be pruned together (a dependency
graph, as Torch-Pruning builds). This module does not attempt that. It reports such convs as
unsupported, with the reason.

The analysis traces the model with ``torch.fx`` instead of walking ``named_modules``. Module order
does not say where a tensor goes (a residual add written in ``forward`` is invisible to it); the
traced graph does.

* :func:`find_channel_groups` / :func:`unsupported_convs`: what can be pruned, and why the rest cannot.
* :mod:`.surgery` (``remove_channels``, ``resize_to_state_dict``) does the removal these groups allow.

"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from .masks import is_prunable

__all__ = ["ChannelGroup", "analyse", "find_channel_groups", "rebuild_problem", "unsupported_convs"]


@dataclass(frozen=True)
class ChannelGroup:
    """A conv whose output channels can be removed, and the layers that change with it.

    ``features_per_channel`` is how many input features of ``consumer`` each channel feeds: 1 for a
    Conv2d consumer, the flattened spatial size (H*W) for a Linear consumer behind a flatten.
    """

    conv: str
    norm: str | None
    consumer: str
    features_per_channel: int = 1


# Operations a channel passes through unchanged in position: its values change, but channel c of the
# output depends only on channel c of the input.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Dropout, nn.Dropout2d, nn.Identity,
)  # fmt: skip
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.dropout, F.dropout2d, torch.relu, torch.relu_, torch.sigmoid,
    torch.tanh,
}  # fmt: skip
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone"}
_ADD_TARGETS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_CAT_TARGETS = {torch.cat, torch.concat, torch.stack, "cat"}
_RESHAPE_TARGETS = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}
# Users that read a tensor's metadata, not its values: they do not consume the channels.
_SHAPE_METHODS = {"size", "dim"}
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


class _LayerTracer(fx.Tracer):
    """Keeps every conv, linear and norm layer a single graph node.

    fx keeps modules defined in ``torch.nn`` as leaves by default, but traces into subclasses defined
    elsewhere, such as the masked layers of ``masks.py``. Their ``weight * weight_mask`` would then
    appear as anonymous operations instead of one named conv.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaf_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)
        return isinstance(m, leaf_types) or super().is_leaf_module(m, module_qualified_name)


def find_channel_groups(model: nn.Module) -> dict[str, ChannelGroup]:
    """Every Conv2d whose output channels can be removed, by module name, in ``named_modules`` order.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> find_channel_groups(model)
        {'0': ChannelGroup(conv='0', norm='1', consumer='3', features_per_channel=1)}
    """
    return analyse(model)[0]


def unsupported_convs(model: nn.Module) -> dict[str, str]:
    """Every Conv2d that :func:`find_channel_groups` leaves out, with the reason.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> unsupported_convs(model)
        {'3': 'output is a model output'}
    """
    return analyse(model)[1]


def analyse(model: nn.Module) -> tuple[dict[str, ChannelGroup], dict[str, str]]:
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    try:
        graph = _LayerTracer().trace(model)
    except Exception as err:  # fx fails in many ways (TraceError, TypeError on data-dependent control flow, ...)
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        reason = f"symbolic tracing failed: {type(err).__name__}: {message}"
        return {}, {name: reason for name in convs}

    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    nodes = {node.target: node for node in graph.nodes if node.op == "call_module"}
    groups: dict[str, ChannelGroup] = {}
    reasons: dict[str, str] = {}
    for name, conv in convs.items():
        if conv.groups != 1:
            reasons[name] = f"grouped/depthwise conv (groups={conv.groups})"
        elif (problem := rebuild_problem(conv)) is not None:
            reasons[name] = problem
        elif name not in nodes:
            reasons[name] = "not called in the traced forward"
        elif calls[name] > 1:
            # One module applied twice: its channels are read by two places at once.
            reasons[name] = f"module is called {calls[name]} times in forward"
        else:
            found = _follow(name, nodes[name], modules, calls)
            if isinstance(found, ChannelGroup):
                groups[name] = found
            else:
                reasons[name] = found
    return groups, reasons


def _follow(name: str, conv_node: fx.Node, modules: dict[str, nn.Module], calls: Counter) -> ChannelGroup | str:
    """Walk from a conv's output to the layer that reads its channels; a reason string where it cannot.

    ``flat`` records whether the tensor is still (N, C, H, W) or already flattened to (N, C*H*W), the
    only layout change allowed: it keeps each channel a contiguous block of features.
    """
    channels = modules[name].out_channels
    node, norm, flat = conv_node, None, False
    while True:
        users = [u for u in node.users if not _reads_only_shape(u)]
        if not users:
            return "output is never used"
        if len(users) > 1:
            return f"output used by {len(users)} consumers ({', '.join(_describe(u, modules) for u in users)})"
        user = users[0]
        what = _describe(user, modules)
        op = _operation(user)
        if user.op == "output":
            return "output is a model output"
        if op in _ADD_TARGETS and len(user.all_input_nodes) > 1:
            return "output feeds an add (residual connection)"
        if op in _CAT_TARGETS:
            return f"output feeds a concatenation ({what})"
        if not user.args or user.args[0] is not node:
            return f"output is not the first argument of {what}"
        # A reshape may take the batch size from a shape query (x.view(x.size(0), -1)); any other
        # operation with a second tensor input mixes channels with something else.
        if op not in _RESHAPE_TARGETS and len(user.all_input_nodes) > 1:
            return f"output is combined with another tensor in {what}"

        if user.op == "call_module":
            module = modules[user.target]
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                return _consumer(name, channels, user.target, module, norm, flat, calls)
            if type(module) is nn.BatchNorm2d:
                if flat:
                    return f"output reaches {what} after a flatten"
                if norm is not None:
                    return f"output passes through two BatchNorms ({norm!r}, {user.target!r})"
                if calls[user.target] > 1:
                    return f"BatchNorm {user.target!r} is called {calls[user.target]} times in forward"
                norm = user.target
            elif isinstance(module, _POOL_MODULES):
                if flat:
                    return f"output reaches {what} after a flatten"
            elif isinstance(module, nn.Flatten):
                if (module.start_dim, module.end_dim) not in ((1, -1), (1, 3)):
                    return f"output feeds {what} with start_dim={module.start_dim}, end_dim={module.end_dim}"
                flat = True
            elif not isinstance(module, _ELEMENTWISE_MODULES):
                return f"output feeds {what}, which is not a known channel-wise op"
        elif op in _ELEMENTWISE_FUNCTIONS or op in _ELEMENTWISE_METHODS:
            pass
        elif op in _POOL_FUNCTIONS:
            if flat:
                return f"output reaches {what} after a flatten"
        elif op in _RESHAPE_TARGETS:
            if not _is_flatten(user):
                return f"output is reshaped by {what} to something other than (N, -1) (e.g. a channel shuffle)"
            flat = True
        elif op in (torch.mean, "mean"):
            # x.mean([2, 3]) is a global average pool: it leaves (N, C), a flatten with one feature per
            # channel (or, with keepdim, (N, C, 1, 1)).
            drops_spatial = _spatial_mean(user)
            if drops_spatial is None or flat:
                return f"output feeds {what} over dimensions other than the spatial ones"
            flat = drops_spatial
        else:
            return f"output feeds {what}, which is not a known channel-wise op"
        node = user


def _consumer(
    name: str, channels: int, target: str, module: nn.Module, norm: str | None, flat: bool, calls: Counter
) -> ChannelGroup | str:
    """The group ending at ``module``, or why that layer cannot give up input channels."""
    kind = type(module).__name__
    if calls[target] > 1:
        return f"consumer {kind} {target!r} is called {calls[target]} times in forward"
    if (problem := rebuild_problem(module)) is not None:
        return f"consumer {target!r}: {problem}"
    if isinstance(module, nn.Conv2d):
        if flat:
            return f"output reaches {kind} {target!r} after a flatten"
        if module.groups != 1:
            return f"output feeds grouped/depthwise conv {target!r} (groups={module.groups})"
        return ChannelGroup(name, norm, target, 1)
    if not flat:
        # A Linear on (N, C, H, W) maps the last (width) dimension, not the channels.
        return f"output reaches {kind} {target!r} without a flatten"
    if module.in_features % channels:
        return f"{kind} {target!r} has in_features={module.in_features}, not a multiple of {channels} channels"
    return ChannelGroup(name, norm, target, module.in_features // channels)


def rebuild_problem(module: nn.Module) -> str | None:
    """Why ``module`` cannot be rebuilt at another size, or None.

    Only the plain layer classes and their masked versions are rebuilt: a subclass (a QAT conv, a
    user's layer) may have constructor arguments and state this module does not know to carry over.
    """
    if not (is_prunable(module) or type(module) in _NORM_TYPES):
        return f"{type(module).__name__} is not a plain or masked Conv/Linear or a BatchNorm1d/2d, so it is not rebuilt"
    if parametrize.is_parametrized(module):
        return f"{type(module).__name__} has parametrizations, which rebuilding would drop"
    if "weight_orig" in module._parameters:
        return f"{type(module).__name__} is pruned by torch.nn.utils.prune (call prune.remove first)"
    return None


def _operation(node: fx.Node) -> Any:
    """The function or method name a node calls; None for modules, whose names could collide ("cat")."""
    return node.target if node.op in ("call_function", "call_method") else None


def _reads_only_shape(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRIBUTES


def _is_flatten(node: fx.Node) -> bool:
    """Does ``node`` turn (N, C, H, W) into (N, C*H*W)? (torch.flatten(x, 1), x.view(n, -1), ...)"""
    if _operation(node) in (torch.flatten, "flatten"):
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
        return start == 1 and end in (-1, 3)
    shape = node.kwargs.get("shape", node.args[1:])
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    # The first entry is the batch size, whatever computes it; -1 then takes all C*H*W features.
    return len(shape) == 2 and shape[1] == -1


def _spatial_mean(node: fx.Node) -> bool | None:
    """For a mean over both spatial dims, whether it drops them (True) or keeps them (False); else None."""
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    if not isinstance(dims, (tuple, list)) or {d % 4 for d in dims if isinstance(d, int)} != {2, 3}:
        return None
    return not keepdim


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} {node.target!r}"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    return node.op
