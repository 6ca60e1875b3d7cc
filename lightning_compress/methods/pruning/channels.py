"""Structured filter pruning's graph surgery: which conv filters can be removed, and removing them.

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
* :func:`remove_channels`: the surgery itself.
* :func:`resize_to_state_dict`: rebuilds a fresh, unpruned model to the shapes of a filter-pruned
  checkpoint, so that ``load_state_dict`` accepts it.

When is the surgery exact? In the state that masked training leaves, a removed filter has zero conv
weights and a zero BatchNorm weight and bias (or, with no BatchNorm, a zero conv bias), so its
channel is exactly 0. Operations that map 0 to 0 (ReLU and its relatives, pooling, dropout) keep it
0, and the consumer gets nothing from it, so removing the channel leaves the outputs unchanged.
Activations with ``f(0) != 0`` (sigmoid, hard-sigmoid, softplus) pass a constant to the consumer
instead. Removal drops that constant: the model is still valid, but its outputs change.

Replaced modules are new objects: an optimizer built before :func:`remove_channels` holds the old
parameters and must be rebuilt, and hooks registered on the old modules are not carried over.
"""

from __future__ import annotations

import operator
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from .masks import PRUNABLE_TYPES, add_mask, is_masked, is_prunable

__all__ = ["ChannelGroup", "find_channel_groups", "remove_channels", "resize_to_state_dict", "unsupported_convs"]


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
    return _analyse(model)[0]


def unsupported_convs(model: nn.Module) -> dict[str, str]:
    """Every Conv2d that :func:`find_channel_groups` leaves out, with the reason.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> unsupported_convs(model)
        {'3': 'output is a model output'}
    """
    return _analyse(model)[1]


def _analyse(model: nn.Module) -> tuple[dict[str, ChannelGroup], dict[str, str]]:
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
        elif (problem := _rebuild_problem(conv)) is not None:
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
    if (problem := _rebuild_problem(module)) is not None:
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


def _rebuild_problem(module: nn.Module) -> str | None:
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


def remove_channels(model: nn.Module, keep: dict[str, torch.Tensor], example_input: Any = None) -> dict[str, int]:
    """Remove the output channels of convs where ``keep[conv_name]`` (bool, one per channel) is False.

    Each conv is replaced by a smaller one, its BatchNorm by a shorter one, and its consumer by one
    with fewer input channels (a Linear loses ``features_per_channel`` features per removed channel).
    Dtype, device, the weight's memory format (channels_last stays channels_last), ``requires_grad``
    and train/eval mode carry over.

    Masked layers (``MaskedConv2d``/``MaskedLinear`` of ``masks.py``) stay masked: the new layer is
    masked too, with the same ``straight_through``, and its ``weight_mask`` is sliced like its
    weight. A masked schedule can therefore go on after the surgery, and the state dict keeps its
    ``weight_mask`` keys.

    Every name is checked before anything changes: a conv that is not a supported group, a keep
    tensor of the wrong dtype or length, or one that keeps no channel raises ``ValueError`` and
    leaves the model untouched.

    With ``example_input`` (a tensor, or a tuple of positional arguments), the model runs on it
    before and after, in eval mode and without gradients so that BatchNorm statistics do not move.
    If the output shapes differ, or the forward fails, every replacement is undone and the error
    raised: a shape change would mean the analysis missed a use of the channels. Without it, only
    the static analysis vouches for the result.

    Returns the new number of output channels of each conv in ``keep``.

    Example:
        >>> model = nn.Sequential(
        ...     nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
        ... )
        >>> keep = {"0": torch.tensor([True, False] * 4)}
        >>> remove_channels(model, keep, example_input=torch.randn(1, 3, 8, 8))
        {'0': 4}
        >>> model[0], model[1].num_features, model[5].in_features
        (Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1)), 4, 4)
    """
    groups, reasons = _analyse(model)
    plans = {name: (groups.get(name), _keep_indices(model, name, mask, groups, reasons)) for name, mask in keep.items()}
    before = _output_shapes(model, example_input) if example_input is not None else None

    replaced: list[tuple[str, nn.Module]] = []
    try:
        for group, index in plans.values():
            _shrink_group(model, group, index, replaced)
        if before is not None:
            after = _output_shapes(model, example_input)
            if after != before:
                raise RuntimeError(f"removing channels changed the model's output shape from {before} to {after}")
    except Exception:
        # Undo in reverse order: a layer that was both a consumer and a pruned conv was replaced twice.
        for name, module in reversed(replaced):
            _set_submodule(model, name, module)
        raise
    return {name: model.get_submodule(name).out_channels for name in keep}


def _keep_indices(
    model: nn.Module, name: str, mask: torch.Tensor, groups: dict[str, ChannelGroup], reasons: dict[str, str]
) -> torch.Tensor:
    """Validate ``keep[name]`` and return the kept channel indices, on the conv's device."""
    if name not in groups:
        if name in reasons:
            why = reasons[name]
        else:
            try:
                why = f"it is a {type(model.get_submodule(name)).__name__}, not a Conv2d"
            except AttributeError:
                why = "the model has no module of that name"
        supported = ", ".join(repr(n) for n in groups) or "none"
        raise ValueError(f"keep[{name!r}]: cannot remove channels of {name!r}: {why}. Supported convs: {supported}")
    conv = model.get_submodule(name)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (conv.out_channels,):
        got = type(mask).__name__
        if isinstance(mask, torch.Tensor):
            got = f"dtype={mask.dtype}, shape={tuple(mask.shape)}"
        raise ValueError(f"keep[{name!r}] must be a bool tensor of shape ({conv.out_channels},), got {got}")
    if not mask.any():
        raise ValueError(f"keep[{name!r}] keeps no channel; conv {name!r} needs at least one output channel")
    return mask.nonzero().flatten().to(conv.weight.device)


def _shrink_group(
    model: nn.Module, group: ChannelGroup, index: torch.Tensor, replaced: list[tuple[str, nn.Module]]
) -> None:
    def swap(name: str, new: nn.Module) -> None:
        replaced.append((name, _set_submodule(model, name, new)))

    # Modules are looked up now, not at analysis time: an earlier group may have replaced this conv
    # already, as the consumer of the conv before it.
    conv = model.get_submodule(group.conv)
    new = _conv_like(conv, conv.in_channels, len(index))
    _copy(new, conv, ("weight", "weight_mask", "bias"), 0, index)
    swap(group.conv, new)

    if group.norm is not None:
        norm = model.get_submodule(group.norm)
        new = _norm_like(norm, len(index))
        _copy(new, norm, ("weight", "bias", "running_mean", "running_var"), 0, index)
        _copy(new, norm, ("num_batches_tracked",))
        swap(group.norm, new)

    consumer = model.get_submodule(group.consumer)
    k = group.features_per_channel
    if isinstance(consumer, nn.Linear):
        # Flattening (N, C, H, W) puts channel c at features [c*k, (c+1)*k).
        features = (index[:, None] * k + torch.arange(k, device=index.device)).flatten()
        new = _linear_like(consumer, len(features), consumer.out_features)
    else:
        features = index
        new = _conv_like(consumer, len(index), consumer.out_channels)
    _copy(new, consumer, ("weight", "weight_mask"), 1, features)
    _copy(new, consumer, ("bias",))
    swap(group.consumer, new)


def resize_to_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Resize conv, linear and BatchNorm layers to the shapes in ``state_dict``; returns their names.

    A filter-pruned checkpoint does not load into the architecture it was pruned from: its tensors
    are smaller. This rebuilds the layers of a fresh model at the checkpoint's sizes. The new layers
    are freshly initialised; ``model.load_state_dict(state_dict)`` then fills them. ``state_dict``
    uses the model's own names (strip a ``"model."`` prefix of a Lightning checkpoint first).

    Conv1d/2d/3d take their channels from ``weight`` (in = ``weight.shape[1] * groups``), Linear its
    features, BatchNorm1d/2d its size from ``running_mean`` or ``weight``. Kernel size, stride, bias
    presence and the other settings stay the model's. A masked layer stays masked, with a
    ``weight_mask`` of the new shape, ready for the checkpoint's mask. Whether a layer is masked is
    left to the model: the masking that produced a checkpoint's ``weight_mask`` keys must be applied
    before loading, as for an unpruned checkpoint.

    Example:
        >>> pruned = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
        >>> fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2))
        >>> resize_to_state_dict(fresh, pruned.state_dict())
        ['0', '1', '3']
        >>> fresh.load_state_dict(pruned.state_dict())
        <All keys matched successfully>
    """
    resized = []
    for name, module in list(model.named_modules()):
        new = _resized(name, module, state_dict)
        if new is None:
            continue
        if not name:
            raise ValueError(f"cannot resize the model itself ({type(module).__name__}); wrap it in a container")
        _set_submodule(model, name, new)
        resized.append(name)
    return resized


def _resized(name: str, module: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module | None:
    """A new layer shaped after ``state_dict``, or None when ``module`` already matches (or is no layer)."""
    prefix = f"{name}." if name else ""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        weight = state_dict.get(prefix + "weight")
        if weight is None or weight.shape == module.weight.shape:
            return None
        _check_rebuildable(name, module)
        if weight.dim() != module.weight.dim() or weight.shape[2:] != module.weight.shape[2:]:
            raise ValueError(
                f"state_dict[{prefix + 'weight'!r}] has shape {tuple(weight.shape)}; {name!r} can change only its "
                f"first two dimensions, its weight is {tuple(module.weight.shape)}"
            )
        if isinstance(module, nn.Linear):
            return _linear_like(module, weight.shape[1], weight.shape[0])
        return _conv_like(module, weight.shape[1] * module.groups, weight.shape[0])
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        reference = state_dict.get(prefix + "running_mean", state_dict.get(prefix + "weight"))
        if reference is None or reference.shape[0] == module.num_features:
            return None
        _check_rebuildable(name, module)
        return _norm_like(module, reference.shape[0])
    return None


def _check_rebuildable(name: str, module: nn.Module) -> None:
    if (problem := _rebuild_problem(module)) is not None:
        raise ValueError(f"cannot resize {name!r} to the state dict: {problem}")


def _conv_like(old: nn.Module, in_channels: int, out_channels: int) -> nn.Module:
    """A conv with ``old``'s settings and new channel counts (values freshly initialised)."""
    base = next(cls for cls in PRUNABLE_TYPES if isinstance(old, cls))
    new = base(
        in_channels,
        out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    return _carry_over(old, new)


def _linear_like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    new = nn.Linear(
        in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )
    return _carry_over(old, new)


def _norm_like(old: nn.Module, num_features: int) -> nn.Module:
    reference = old.weight if old.affine else old.running_mean
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    new = type(old)(
        num_features,
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        **factory,
    )
    return _carry_over(old, new)


def _carry_over(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give ``new`` what its constructor cannot: memory format, requires_grad, mode and mask."""
    for pname, param in list(new.named_parameters(recurse=False)):
        old_param = getattr(old, pname)
        data = param.detach().contiguous(memory_format=_memory_format(old_param))
        setattr(new, pname, nn.Parameter(data, requires_grad=old_param.requires_grad))
    new.train(old.training)
    if is_masked(old):
        # add_mask builds the mask with ones_like(weight), so it follows the weight's memory format.
        add_mask(new, straight_through=old.straight_through)
    return new


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


@torch.no_grad()
def _copy(
    new: nn.Module, old: nn.Module, names: Iterable[str], dim: int | None = None, index: torch.Tensor | None = None
) -> None:
    """Copy tensors ``names`` from ``old`` into ``new``, keeping ``index`` along ``dim`` (all if ``dim`` is None).

    ``copy_`` writes into ``new``'s tensors, so they keep the memory format ``_carry_over`` gave them;
    names ``old`` lacks (no bias, no mask, no running stats) are skipped.
    """
    for attr in names:
        source = getattr(old, attr, None)
        if source is None:
            continue
        getattr(new, attr).copy_(source if dim is None else source.index_select(dim, index))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` (a dotted path) and return the module it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def _output_shapes(model: nn.Module, example_input: Any) -> Any:
    with _evaluating(model):
        output = model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    return _shapes(output)


def _shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return type(value)(_shapes(v) for v in value)
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items()}
    return value


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for a check run, restoring each module's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
