"""Which output channels of a network must be removed together: a channel-level dependency graph.

Removing output channel c of a conv also removes entry c of every layer that sees that channel: its
BatchNorm, a depthwise conv after it, the input slice of each conv or Linear that reads it. Where
operations tie channels of different layers together, they must go together:

* a residual add (or a product, as in squeeze-and-excitation) ties channel c of both operands;
* a depthwise conv passes channel c through, so its filter c goes with its input's channel c;
* a concatenation keeps each operand's channels, shifted; a chunk or split into equal parts ties
  position i of every part (so the parts stay equal after removal);
* a channel shuffle (view to (N, g, C/g, H, W), transpose, view back) ties position i of every one
  of the g groups, so the shuffle stays a shuffle of C'/g channels per group.

The analysis gives every output channel of a plain (groups=1) conv an element id and runs the
traced ``torch.fx`` graph once over element lists instead of tensors: each operation maps its
inputs' lists to its output's and records the ties in a union-find. The classes of tied elements
are the units of pruning: each is removed whole, from every layer it appears in. An element that
reaches the model's output, or an operation the analysis does not understand, is pinned (never
removed) with the reason, so that the analysis errs only towards keeping channels.

Torch-Pruning builds a dependency graph too; ours works on element ids rather than index-mapping
rules, which makes channel shuffles a permutation like any other (Torch-Pruning 1.6 does not
handle them), and its result (which layers change, at which positions) is all that the surgery and
a checkpoint's rebuild need.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn

from . import graph_ops as ops
from .graph_ops import rebuild_problem

__all__ = ["ChannelDependencies", "LayerChannels", "analyse_channels", "rebuild_problem"]

LayerKind = Literal["conv", "depthwise", "norm", "linear"]


@dataclass(frozen=True)
class LayerChannels:
    """Where the classes of a layer's channels sit: ``inputs[i]`` is the class of its input channel i
    (None: the input's channels are not tracked, as for the image), ``outputs`` the same for its
    outputs (None for a Linear, whose outputs are not pruned). ``features_per_channel`` is how many
    input features of a Linear each channel feeds after a flatten (H*W)."""

    kind: LayerKind
    inputs: tuple[int, ...] | None
    outputs: tuple[int, ...] | None
    features_per_channel: int = 1


@dataclass
class ChannelDependencies:
    """The result of :func:`analyse_channels`.

    ``layers``: every layer whose channels are tracked, by module name. ``members[k]``: the
    (conv, output channel) pairs of class k, over the plain convs that produce it. ``pinned[k]``:
    why class k cannot be removed. ``norms[conv]``: the BatchNorm right after a conv (network
    slimming ranks its scales). ``reasons[conv]``: why a Conv2d has no removable channel.
    """

    layers: dict[str, LayerChannels] = field(default_factory=dict)
    members: list[list[tuple[str, int]]] = field(default_factory=list)
    pinned: dict[int, str] = field(default_factory=dict)
    norms: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def removable_convs(self) -> list[str]:
        """Plain convs with at least one removable output channel, in the order they were traced."""
        return [n for n, layer in self.layers.items() if layer.kind == "conv" and n not in self.reasons]

    def coupled(self) -> dict[str, list[str]]:
        """Each removable conv's block: the removable convs whose channels are tied to its channels
        (directly or through others), the conv itself included, in traced order."""
        parent = {name: name for name in self.removable_convs()}

        def find(name: str) -> str:
            while parent[name] != name:
                parent[name] = parent[parent[name]]
                name = parent[name]
            return name

        for k, members in enumerate(self.members):
            if k in self.pinned:
                continue
            convs = [c for c, _ in members if c in parent]
            for other in convs[1:]:
                parent[find(other)] = find(convs[0])
        blocks: dict[str, list[str]] = {}
        for name in parent:
            blocks.setdefault(find(name), []).append(name)
        return {name: blocks[find(name)] for name in parent}


@dataclass(frozen=True)
class _Channels:
    """A traced tensor's channels: element ids by position; ``flat`` once (N, C, H, W) became (N, C*H*W).
    ``groups`` is set between the two views of a channel shuffle: (N, g, C/g, H, W), ``shuffled``
    after its transpose."""

    ids: tuple[int, ...]
    flat: bool = False
    groups: int = 0
    shuffled: bool = False


def analyse_channels(model: nn.Module) -> ChannelDependencies:
    """Trace ``model`` and find which channels must be removed together (see the module docstring).

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        ...     def forward(self, x):
        ...         return self.head(self.a(x) + self.b(x))
        >>> deps = analyse_channels(Block())
        >>> deps.removable_convs(), deps.coupled()["a"], deps.members[0]
        (['a', 'b'], ['a', 'b'], [('a', 0), ('b', 0)])
        >>> deps.reasons["head"]
        'output is a model output'
    """
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        graph = ops.LayerTracer().trace(model)
    except Exception as err:  # fx fails in many ways (TraceError, TypeError on data-dependent control flow, ...)
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        reason = f"symbolic tracing failed: {type(err).__name__}: {message}"
        return ChannelDependencies(reasons=dict.fromkeys(convs, reason))
    return _Propagation(model, graph).run(convs)


class _Propagation:
    """One pass over the graph in topological order, mapping element lists and recording ties."""

    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.modules = dict(model.named_modules())
        self.graph = graph
        self.calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        self.parent: list[int] = []  # union-find over element ids
        self.owner: list[tuple[str, int]] = []  # the (conv, channel) that created each element
        self.pin_reasons: dict[int, str] = {}
        self.values: dict[fx.Node, Any] = {}
        self.uses: dict[str, tuple[LayerKind, tuple[int, ...] | None, tuple[int, ...] | None, int]] = {}
        self.norms: dict[str, str] = {}
        self.conv_reasons: dict[str, str] = {}

    # ---------------------------------------------------------------- union-find
    def fresh(self, conv: str, n: int) -> tuple[int, ...]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.owner.extend((conv, c) for c in range(n))
        return tuple(range(start, start + n))

    def find(self, e: int) -> int:
        while self.parent[e] != e:
            self.parent[e] = self.parent[self.parent[e]]
            e = self.parent[e]
        return e

    def tie(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the oldest element stays the root

    def pin(self, value: Any, reason: str) -> None:
        for channels in _flatten(value):
            for e in channels.ids:
                self.pin_reasons.setdefault(e, reason)

    # ---------------------------------------------------------------- the pass
    def run(self, convs: list[str]) -> ChannelDependencies:
        for node in self.graph.nodes:
            self.values[node] = self.visit(node)
        return self.result(convs)

    def visit(self, node: fx.Node) -> Any:
        if node.op in ("placeholder", "get_attr"):
            return None
        inputs = [self.values.get(n) for n in node.all_input_nodes]
        tracked = [v for v in inputs if v is not None]
        if node.op == "output":
            self.pin(tracked, "output is a model output")
            return None
        if ops.reads_only_shape(node):
            return None
        if node.op == "call_module":
            return self.visit_module(node, node.target, self.modules[node.target], tracked)
        result = self.visit_call(node, node.target, tracked)
        if result is _UNKNOWN:
            self.pin(tracked, f"output feeds {ops.describe(node, self.modules)}, which the channel analysis does not know")
            return None
        return result

    def first(self, node: fx.Node) -> Any:
        return self.values.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None

    def visit_module(self, node: fx.Node, name: str, module: nn.Module, tracked: list) -> Any:
        x = self.first(node)
        what = f"{type(module).__name__} {name!r}"
        if isinstance(module, (nn.Conv2d, nn.Linear, *ops.NORM_TYPES)):
            problem = rebuild_problem(module)
            if problem is None and self.calls[name] > 1:
                problem = f"module is called {self.calls[name]} times in forward"
            if problem is None and x is not None and (x.groups or x.flat) and not isinstance(module, nn.Linear):
                problem = f"its input is flattened or mid-shuffle at {what}"
            if problem is not None:
                self.pin(tracked, f"output feeds {what}: {problem}")
                if isinstance(module, nn.Conv2d):
                    self.conv_reasons.setdefault(name, problem)
                return None
        if isinstance(module, nn.Conv2d):
            return self.visit_conv(node, name, module, x)
        if isinstance(module, ops.NORM_TYPES):
            if x is None:
                return None
            if not isinstance(module, nn.BatchNorm2d):
                self.pin(x, f"output feeds {what}")
                return None
            self.uses[name] = ("norm", x.ids, x.ids, 1)
            source = node.args[0]
            if source.op == "call_module" and self.uses.get(source.target, ("",))[0] == "conv":
                self.norms[source.target] = name
            return x
        if isinstance(module, nn.Linear):
            if x is None:
                return None
            if not x.flat or module.in_features % len(x.ids):
                why = "without a flatten" if not x.flat else f"with in_features={module.in_features}"
                self.pin(x, f"output reaches {what} {why}, not a multiple of its {len(x.ids)} channels")
                return None
            self.uses[name] = ("linear", x.ids, None, module.in_features // len(x.ids))
            return None
        if isinstance(module, ops.ELEMENTWISE_MODULES):
            return x
        if isinstance(module, ops.POOL_MODULES) and x is not None and not x.flat and not x.groups:
            return x
        if isinstance(module, nn.Flatten) and x is not None and not x.groups:
            if (module.start_dim, module.end_dim) in ((1, -1), (1, 3)):
                return _Channels(x.ids, flat=True)
        self.pin(tracked, f"output feeds {what}, which the channel analysis does not know")
        return None

    def visit_conv(self, node: fx.Node, name: str, conv: nn.Conv2d, x: _Channels | None) -> Any:
        if conv.groups == 1:
            out = self.fresh(name, conv.out_channels)
            self.uses[name] = ("conv", x.ids if x is not None else None, out, 1)
            return _Channels(out)
        depthwise = conv.groups == conv.in_channels == conv.out_channels
        if depthwise and x is not None:
            self.uses[name] = ("depthwise", x.ids, x.ids, 1)
            return x
        why = "depthwise conv on an untracked input" if depthwise else f"grouped conv (groups={conv.groups})"
        self.conv_reasons.setdefault(name, why)
        if x is not None:
            self.pin(x, f"output feeds {why} {name!r}")
        return None

    def visit_call(self, node: fx.Node, target: Any, tracked: list) -> Any:
        x = self.first(node)
        if target in ("contiguous", "clone"):
            return x if len(tracked) == 1 else _UNKNOWN  # memory layout only: a shuffle's state survives it
        if target in ops.ELEMENTWISE_CALLS:
            return x if len(tracked) == 1 and x is not None and not x.groups else _UNKNOWN
        if target in ops.TYING_CALLS:
            return self.tie_operands(node, tracked)
        if target is operator.getitem and isinstance(self.values.get(node.args[0]), tuple):
            return self.values[node.args[0]][node.args[1]] if isinstance(node.args[1], int) else _UNKNOWN
        if target in ops.CAT_CALLS:
            return self.concatenate(node) if tracked else None
        if x is None:
            return _UNKNOWN if tracked else None
        if x.flat:
            return _UNKNOWN
        if target in ops.SPLIT_CALLS:
            return self.split(node, target, x)
        if target in ops.POOL_CALLS and not x.groups:
            return x
        if target in ops.RESHAPE_CALLS:
            return self.reshape(node, x)
        if target in ops.TRANSPOSE_CALLS and x.groups and not x.shuffled and sorted(node.args[1:3]) == [1, 2]:
            return _Channels(x.ids, groups=x.groups, shuffled=True)
        if target in (torch.mean, "mean") and not x.groups and (keep := ops.spatial_mean(node)) is not None:
            return _Channels(x.ids, flat=not keep)
        return _UNKNOWN

    def tie_operands(self, node: fx.Node, tracked: list) -> Any:
        operands = [a for a in node.args if isinstance(a, fx.Node)]
        values = [self.values.get(a) for a in operands]
        if len(operands) == 1 and values[0] is not None and not values[0].groups:
            return values[0]  # x + 1, x * 0.5: channel positions unchanged
        if len(tracked) == 2 == len(values) and len({len(v.ids) for v in values}) == 1 and values[0].flat == values[1].flat:
            for a, b in zip(values[0].ids, values[1].ids):
                self.tie(a, b)
            return values[0]
        return _UNKNOWN

    def concatenate(self, node: fx.Node) -> Any:
        parts = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        values = [self.values.get(p) for p in parts] if isinstance(parts, (tuple, list)) else [None]
        if dim not in (1, -3) or any(v is None or v.flat or v.groups for v in values):
            return _UNKNOWN
        return _Channels(tuple(e for v in values for e in v.ids))

    def split(self, node: fx.Node, target: Any, x: _Channels) -> Any:
        size = node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections", node.args[1] if len(node.args) > 1 else None))
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        n = len(x.ids)
        if dim not in (1, -3) or not isinstance(size, int) or size < 1:
            return _UNKNOWN
        part = -(-n // size) if target in (torch.chunk, "chunk") else size
        if n % part:
            return _UNKNOWN  # unequal parts would change their sizes after removal
        parts = [x.ids[i : i + part] for i in range(0, n, part)]
        for i in range(part):  # equal parts stay equal: position i goes from every part at once
            for other in parts[1:]:
                self.tie(parts[0][i], other[i])
        return tuple(_Channels(p) for p in parts)

    def reshape(self, node: fx.Node, x: _Channels) -> Any:
        shape = ops.shape_args(node)
        if x.groups and x.shuffled and (shape is not None and len(shape) == 4 or ops.is_flatten(node, 1, 2)):
            g, n = x.groups, len(x.ids)
            per_group = n // g
            for i in range(per_group):
                for k in range(1, g):
                    self.tie(x.ids[i], x.ids[k * per_group + i])
            return _Channels(tuple(x.ids[k * per_group + i] for i in range(per_group) for k in range(g)))
        if x.groups:
            return _UNKNOWN
        if ops.is_flatten(node, 1, -1) or ops.is_flatten(node, 1, 3) or (shape is not None and len(shape) == 2 and shape[1] == -1):
            return _Channels(x.ids, flat=True)
        if shape is not None and len(shape) == 5:
            n = len(x.ids)
            g = shape[1] if isinstance(shape[1], int) else (n // shape[2] if isinstance(shape[2], int) and shape[2] > 0 else None)
            if g and g > 1 and n % g == 0:
                return _Channels(x.ids, groups=g)
        return _UNKNOWN

    def result(self, convs: list[str]) -> ChannelDependencies:
        roots = sorted({self.find(e) for e in range(len(self.parent))})
        index = {root: k for k, root in enumerate(roots)}
        cls = lambda ids: None if ids is None else tuple(index[self.find(e)] for e in ids)  # noqa: E731
        deps = ChannelDependencies(norms=self.norms)
        deps.members = [[] for _ in roots]
        for e, (conv, channel) in enumerate(self.owner):
            deps.members[index[self.find(e)]].append((conv, channel))
        for e, reason in self.pin_reasons.items():
            deps.pinned.setdefault(index[self.find(e)], reason)
        for name, (kind, inputs, outputs, per_channel) in self.uses.items():
            deps.layers[name] = LayerChannels(kind, cls(inputs), cls(outputs), per_channel)
        for name in convs:
            layer = deps.layers.get(name)
            if name in self.conv_reasons:
                deps.reasons[name] = self.conv_reasons[name]
            elif layer is None:
                deps.reasons[name] = "not called in the traced forward"
            elif layer.kind == "conv" and all(k in deps.pinned for k in layer.outputs):
                deps.reasons[name] = deps.pinned[layer.outputs[0]]
            elif layer.kind == "depthwise":
                deps.reasons[name] = "depthwise conv: its channels go with those of the layer that feeds it"
        return deps


_UNKNOWN = object()


def _flatten(value: Any) -> list[_Channels]:
    if isinstance(value, _Channels):
        return [value]
    if isinstance(value, (tuple, list)):
        return [c for v in value for c in _flatten(v)]
    return []
