"""One activation range for the layers whose inputs are parts of one joined tensor.

ShuffleNetV2 concatenates two branches, shuffles the channels and splits them again; one half goes
through the next block's branch, the other half on, and each branch conv learns its own input range.
An int8 runtime moves such data as bytes only when every tensor it joins or splits shares one scale and
zero point (TFLite and XNNPACK require it of a concatenation; ONNX Runtime's QLinearConcat then copies).
With a range per conv, each Concat requantizes its inputs (a lookup per byte) and the half that goes on
is rounded again at every block, which the fake-quant model never did. Tying the ranges (their union)
during QAT makes the fake-quant model compute what the int8 file computes: a value is rounded once, on
the grid its readers share, and data movement does not change it. Measured on ShuffleNetV2 (random
weights, batch 1, ONNX Runtime, two threads): the 16 QLinearConcats take 130 us tied and 230 us with
a range per conv.

Groups are found by tracing the network with ``torch.fx``: the tensors that concatenation, splitting,
slicing, reshaping and max pooling connect form one group, and the quantized layers that read a group
share a range. Layers that read one tensor (Inception's branches, a downsampling shortcut) see the same
values anyway. A network that does not trace keeps a range per layer (correct; the int8 file then
requantizes where the ranges differ).
"""

from __future__ import annotations

import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from .layers import LayerTracer, is_quantized

# Operators whose output holds (some of) their input's values, unchanged.
MOVING_FUNCTIONS = {torch.cat, torch.concat, torch.chunk, torch.split, torch.tensor_split, torch.narrow,
                    operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
                    torch.unsqueeze, torch.swapaxes, torch.movedim, F.max_pool1d, F.max_pool2d, torch.max_pool1d,
                    torch.max_pool2d, F.dropout, F.pixel_shuffle, F.pixel_unshuffle, F.channel_shuffle,
                    torch.channel_shuffle, torch.stack}
MOVING_METHODS = {"chunk", "split", "tensor_split", "narrow", "view", "reshape", "flatten", "unflatten", "transpose",
                  "permute", "contiguous", "squeeze", "unsqueeze", "swapaxes", "movedim", "clone", "__getitem__"}
MOVING_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.ChannelShuffle,
                  nn.PixelShuffle, nn.PixelUnshuffle)


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensors whose values a data-movement node's output holds (not the sizes it is given)."""
    first = node.args[0] if node.args else None
    if isinstance(first, (list, tuple)):  # cat / stack
        return [arg for arg in first if isinstance(arg, fx.Node)]
    return [first] if isinstance(first, fx.Node) else []


def _moves(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_function":
        return node.target in MOVING_FUNCTIONS
    if node.op == "call_method":
        return node.target in MOVING_METHODS
    if node.op == "call_module":
        return isinstance(model.get_submodule(node.target), MOVING_MODULES)
    return False


def shared_range_groups(model: nn.Module) -> list[list[str]]:
    """Names of the quantized layers (relative to ``model``) that read parts of one joined tensor, one sorted
    list per group of at least two layers with the same (affine or symmetric) activation format.

    A module that does not trace (a LightningModule whose ``forward`` is not the network's, data-dependent
    control flow) is searched child by child: its children that trace give their groups."""
    groups = _traced_groups(model)
    if groups is not None:
        return groups
    found = []
    for prefix, child in model.named_children():
        if sum(1 for layer in child.modules() if is_quantized(layer)) > 1:
            found.extend([f"{prefix}.{name}" for name in group] for group in shared_range_groups(child))
    return found


def _traced_groups(model: nn.Module) -> list[list[str]] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # what a network's code warns about while traced is said again at run
            graph = LayerTracer().trace(model)
    except Exception:  # any Python torch.fx cannot follow (data-dependent control flow, unsupported calls)
        return None
    parent: dict[fx.Node, fx.Node] = {}

    def find(node: fx.Node) -> fx.Node:
        parent.setdefault(node, node)
        while parent[node] is not node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    readers: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if _moves(node, model):
            for source in _tensor_inputs(node):
                parent[find(source)] = find(node)
        elif node.op == "call_module" and is_quantized(model.get_submodule(node.target)) and node.args \
                and isinstance(node.args[0], fx.Node):
            readers.setdefault(node.target, []).append(node.args[0])
    for inputs in readers.values():
        for source in inputs[1:]:  # a layer called on several groups joins them: it has one range
            parent[find(source)] = find(inputs[0])
    by_root: dict[fx.Node, list[str]] = {}
    for name, inputs in readers.items():
        by_root.setdefault(find(inputs[0]), []).append(name)
    groups = []
    for names in by_root.values():
        by_format: dict = {}
        for name in names:  # a layer on another grid (or on none) keeps its own range
            fmt = _observed_format(model.get_submodule(name))
            if fmt is not None:
                by_format.setdefault(fmt, []).append(name)
        groups.extend(sorted(group) for group in by_format.values() if len(group) > 1)
    return groups


def _observed_format(layer: nn.Module):
    """The activation format when the layer observes a range (affine / symmetric), else None."""
    fmt = layer.activation_format
    return fmt if fmt is not None and fmt.scheme in ("affine", "symmetric") else None


@torch.no_grad()
def tie_input_ranges(model: nn.Module, groups: list[list[str]]) -> None:
    """Give every layer of each group the union of the group's observed input ranges (layers that have seen
    nothing take it too). Branch-free: no host sync per group on a GPU. In place."""
    for names in groups:
        layers = [model.get_submodule(name) for name in names]
        observed = torch.stack([layer.activation_observed for layer in layers])
        low = torch.where(observed, torch.stack([layer.activation_min for layer in layers]), torch.inf).amin()
        high = torch.where(observed, torch.stack([layer.activation_max for layer in layers]), -torch.inf).amax()
        seen = observed.any()
        for layer in layers:
            layer.activation_min.copy_(torch.where(seen, low, layer.activation_min))
            layer.activation_max.copy_(torch.where(seen, high, layer.activation_max))
            layer.activation_observed.copy_(seen)
