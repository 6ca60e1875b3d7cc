"""Graph surgery for :func:`~.export.export_onnx`: find the quantized layers in an exported ONNX graph by
the QuantizeLinear / DequantizeLinear markers the export put around their inputs and weights, strip the
markers, choose what ONNX Runtime's ``quantize_static`` may quantize, and check its output.

A marker is a Q -> DQ pair: per-tensor on a layer's input, per-channel (a 1-D scale, an ``axis``) on its
weight. A site is the Conv / Gemm / MatMul node that reads a weight marker as its second input. The
exporter keeps the order in which the layers were called, so a layer's site is the first one not yet
taken whose marker carries the layer's weight scales: layers with equal scales still match in order, and
a layer without a site is an error, never a float layer or a wrong scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
# Besides the quantized layers themselves, ONNX Runtime may quantize only operators that int8 passes
# through unchanged (ReLU, max pooling, reshapes) or that join int8 branches (residual Add, Concat): they
# keep the int8 kernels chained. Softmax, normalizations, Mul, Sigmoid and the like stayed in float under
# QAT and stay in float here. So does average pooling: ONNX Runtime's int8 kernel refuses to run when
# the ratio of its input and output scales leaves a bounded range (a pooled tensor whose learned range is
# much narrower than its input's), and in float it cost nothing measurable (VGG19 x0.25, batch 1, two
# threads: 0.47-0.48 ms either way, four sessions each, interleaved).
PASS_THROUGH_OPS = ("Relu", "LeakyRelu", "Clip", "MaxPool", "Add", "Concat", "Flatten",
                    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Resize", "Pad", "Split", "Slice")


@dataclass
class Expected:
    """What the export forward of one layer put into the graph."""

    kind: str  # "conv" or "linear"
    weight_scale: np.ndarray  # per output channel
    input_range: tuple[float, int] | None  # (scale, zero point) of the input marker, None when not quantized


@dataclass
class Site:
    """Names only: the graph is copied and rewritten between the steps, node objects do not survive."""

    layer: str
    node: str  # the Conv / Gemm / MatMul node
    op_type: str
    weight_axis: int  # output-channel axis of the weight as this node reads it
    input: str | None  # the tensor whose quantization the layer learned
    marked_input: str | None  # the input marker's output, until the markers are stripped
    weight: str = ""  # the weight initializer, once the markers are stripped


class _Index:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(onnx.helper.get_attribute_value(node.attribute[0]))
        return None

    def marker(self, name: str) -> tuple[onnx.NodeProto, onnx.NodeProto, np.ndarray, np.ndarray] | None:
        """``(Q, DQ, scale, zero_point)`` when ``name`` is the output of a Q -> DQ pair with constant parameters."""
        dq = self.producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = self.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            return None
        scale, zero_point = self.constant(q.input[1]), self.constant(q.input[2]) if len(q.input) > 2 else np.zeros(())
        if scale is None or zero_point is None:
            return None
        return q, dq, scale, zero_point


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def inline_shared_initializers(model: onnx.ModelProto) -> None:
    """The exporter deduplicates equal constants and feeds the copies through Identity nodes; ONNX
    Runtime then sees a computed bias instead of an initializer and leaves that layer in float. Give each
    consumer its own initializer again."""
    initializers = {init.name: init for init in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(initializers[node.input[0]]),
                                                                   node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _sites_in_graph_order(index: _Index) -> list[tuple[onnx.NodeProto, tuple]]:
    found = []
    for node in index.graph.node:
        if node.op_type in COMPUTE_OPS and len(node.input) > 1:
            marker = index.marker(node.input[1])
            if marker is not None and marker[2].ndim == 1:
                found.append((node, marker))
    return found


def locate(model: onnx.ModelProto, calls: list[str], expected: dict[str, Expected]) -> list[Site]:
    """Match each layer call of the export to its site: the first one not yet taken whose weight marker
    carries the layer's scales. Raise ``ValueError`` naming a layer that has none, or whose input marker
    is not at its node."""
    index = _Index(model.graph)
    candidates = _sites_in_graph_order(index)
    taken = [False] * len(candidates)
    sites: list[Site] = []
    for layer in calls:
        want = expected[layer]
        match = next((i for i, (node, (_, _, scale, _)) in enumerate(candidates) if not taken[i]
                      and (node.op_type == "Conv") == (want.kind == "conv") and scale.shape == want.weight_scale.shape
                      and np.allclose(scale, want.weight_scale, rtol=1e-6, atol=0)), None)
        if match is None:
            if any(site.layer == layer for site in sites):
                continue  # the same layer on the same input again: the exporter merged the two calls
            raise ValueError(f"{layer}: its weight does not reach a Conv / Gemm / MatMul node of the exported graph "
                             "through its quantization marker, so its int8 form cannot be placed")
        taken[match] = True
        node, (_, weight_dq, _, _) = candidates[match]
        if node.op_type == "Gemm" and (_attribute(node, "transB", 0) != 1 or _attribute(node, "transA", 0) != 0):
            raise ValueError(f"{layer}: the exporter wrote a Gemm with a transposed input; not an int8 layout")
        input_name, marked = None, None
        if want.input_range is not None:
            marker = index.marker(node.input[0])
            if marker is None or marker[2].ndim != 0:
                raise ValueError(f"{layer}: its quantized input does not reach its {node.op_type} node directly")
            q, _, scale, zero_point = marker
            if not np.isclose(float(scale), want.input_range[0], rtol=1e-6) or int(zero_point) != want.input_range[1]:
                raise ValueError(f"{layer}: the input marker of its {node.op_type} node carries another layer's range")
            input_name, marked = q.input[0], node.input[0]
        sites.append(Site(layer, node.name, node.op_type, int(_attribute(weight_dq, "axis", 1)), input_name, marked))
    return sites


def strip_markers(model: onnx.ModelProto, sites: list[Site], weights: dict[str, np.ndarray]) -> None:
    """Give each site its layer's (fake-quantized, output channels first) weight from ``weights`` as an
    initializer, laid out as the node reads it, and its input unquantized; drop the markers and what only
    they used."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    nodes = {node.name: node for node in model.graph.node}
    names: set[str] = set()
    for site in sites:
        # A MatMul reads the weight transposed (output channels on axis 1).
        name = f"{site.layer}.weight" if site.weight_axis == 0 else f"{site.layer}.weight.T"
        if name not in names:
            names.add(name)
            # The exporter may have named the layer's parameter so: the same baked-in values, replaced.
            for init in [i for i in model.graph.initializer if i.name == name]:
                model.graph.initializer.remove(init)
            value = weights[site.layer] if site.weight_axis == 0 else weights[site.layer].T
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name))
        site.weight = nodes[site.node].input[1] = name
    graph = ONNXModel(model)
    for site in sites:
        if site.marked_input is not None:
            graph.replace_input_of_all_nodes(site.marked_input, site.input)
            site.marked_input = None
    index = _Index(model.graph)
    while True:  # the markers, then the Casts and Constants that only fed them
        dead = [node for node in model.graph.node
                if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Cast", "Constant")
                and not any(out in index.consumers or graph.is_graph_output(out) for out in node.output)]
        if not dead:
            break
        graph.remove_nodes(dead)
        index = _Index(model.graph)
    graph.remove_unused_constant()


# ONNX Runtime quantizes the output of these with their input's parameters when that input is quantized,
# whatever override the output has: a learned range must be given to the tensor they read.
SAME_AS_INPUT_OPS = ("MaxPool", "AveragePool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice",
                     "Resize", "Split", "Pad")


def input_overrides(model: onnx.ModelProto, sites: list[Site], ranges: dict[str, tuple]) -> dict[str, tuple]:
    """The tensors that carry each layer's learned input range (``ranges[layer]``) for ``quantize_static``:
    the layer's input, and the tensor that input is a pooled or reshaped view of. Layers whose inputs lead
    back to one tensor with different ranges, or to a tensor that other nodes read in float (a LayerNorm
    output feeding a quantized q and float k, v), each read their own copy (an Identity, which ONNX
    Runtime removes at load) instead, so that each keeps its own range and the others stay float.

    A residual Add that also reads the tensor (MobileNetV2's and Xception's skip connections: the block's
    input feeds its first conv and the Add after it) reads it in int8 either way; with a copy, ONNX Runtime
    would quantize the tensor at a calibrated range for the Add and requantize it for the layer, a
    dequantize -> quantize pair per block at batch 1. The Add reads it at the layer's learned range
    instead, which QAT learned on this very tensor. A Concat that reads it (ShuffleNetV2's identity half) is
    left to :func:`~.onnx_concat.share_concat_ranges`, which gives the joined tensors one quantization when
    their readers learned one range, and copies otherwise."""
    index = _Index(model.graph)
    int8_joins = ({node.name for node in model.graph.node if node.op_type in ("Add", "Concat", "LeakyRelu")}
                  - set(nodes_to_exclude(model, sites)))

    def source(tensor: str) -> str:
        node = index.producer.get(tensor)
        while node is not None and node.op_type in SAME_AS_INPUT_OPS and index.constant(node.input[0]) is None:
            tensor = node.input[0]
            node = index.producer.get(tensor)
        return tensor

    groups: dict[str, list[Site]] = {}
    for site in sites:
        if site.input is not None:
            groups.setdefault(source(site.input), []).append(site)
    nodes = {node.name: node for node in model.graph.node}
    overrides: dict[str, tuple] = {}

    def read_only_by(tensor: str, layers: set[str]) -> bool:
        """Whether only the given layers' nodes read ``tensor`` (directly or through views): a range put on
        the tensor quantizes it for every reader, and a reader QAT ran in float must keep reading float."""
        for consumer in index.consumers.get(tensor, []):
            if consumer.name in layers or consumer.name in int8_joins:
                continue
            if consumer.op_type in SAME_AS_INPUT_OPS and all(read_only_by(out, layers) for out in consumer.output):
                continue
            return False
        return True

    for tensor, readers in groups.items():
        if len({ranges[site.layer] for site in readers}) == 1 and read_only_by(tensor, {site.node for site in readers}):
            for name in {tensor, *(site.input for site in readers)}:
                overrides[name] = ranges[readers[0].layer]
            continue
        for site in readers:
            copy_name = f"{site.input}/{site.layer}.input"
            if copy_name not in overrides:
                model.graph.node.append(onnx.helper.make_node("Identity", [site.input], [copy_name],
                                                              name=f"{site.layer}.input_copy"))
            nodes[site.node].input[0] = site.input = copy_name
            overrides[copy_name] = ranges[site.layer]
    from onnxruntime.quantization.onnx_model import ONNXModel

    ONNXModel(model).topological_sort()
    return overrides


def lookup_relus(model: onnx.ModelProto, sites: list[Site]) -> int:
    """A ReLU between an int8 tensor that other nodes read too (a residual sum, a block input that also
    feeds the shortcut) and a layer that learned its own range for the ReLU's output (Xception's blocks
    start so) is where ONNX Runtime leaves int8: it cannot fold the ReLU into the quantization of a
    tensor that others read unclipped, so it requantizes through float (a DequantizeLinear, then a
    QuantizeLinear that clips). Written as ``LeakyRelu(alpha=0)``, the same function, its QDQ form fuses
    into one int8 table lookup (``QLinearLeakyRelu``), which reads the tensor at whatever quantization it
    has (see ``input_overrides``). In place; returns how many were rewritten."""
    index = _Index(model.graph)
    learned = {site.input for site in sites if site.input is not None}
    joins = {node.name for node in model.graph.node if node.op_type in ("Add", "Concat")}
    int8 = ({site.node for site in sites} | joins) - set(nodes_to_exclude(model, sites))
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "Relu" or node.output[0] not in learned:
            continue
        source = index.producer.get(node.input[0])
        shared = source is not None and (source.op_type != "Conv" or len(index.consumers[node.input[0]]) > 1)
        if shared and source.name in int8:
            node.op_type = "LeakyRelu"
            node.attribute.append(onnx.helper.make_attribute("alpha", 0.0))
            rewritten += 1
    return rewritten


def name_nodes(model: onnx.ModelProto) -> None:
    """``nodes_to_exclude`` and the final check refer to nodes by name: make every name present and unique."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}_{i}"
        seen.add(node.name)


def nodes_to_exclude(model: onnx.ModelProto, sites: list[Site]) -> list[str]:
    """Nodes ONNX Runtime leaves in float: compute nodes QAT did not quantize (a layer left in float,
    attention's activation-by-activation MatMul), Adds of a constant (biases, GELU's ``1 + erf``), and
    pass-through operators that no int8 tensor reaches.

    Only our convolutions' outputs are int8 (Gemm and MatMul write float outputs), so a pass-through
    operator is int8 only downstream of one of them through other int8 pass-through operators (ReLU,
    pooling, a residual Add): that keeps the int8 kernels chained. One between float operators (a
    transformer's residual Add) would only add a rounding that QAT never saw.
    """
    ours = {site.node for site in sites}
    index = _Index(model.graph)
    excluded, int8 = [], set()
    for node in model.graph.node:  # topologically sorted
        if node.op_type in COMPUTE_OPS + ("ConvTranspose",) and node.name not in ours:
            excluded.append(node.name)
        elif node.op_type == "Add" and any(index.constant(name) is not None for name in node.input):
            excluded.append(node.name)
        elif node.op_type == "Conv":
            int8.update(node.output)
        elif node.op_type in PASS_THROUGH_OPS:
            if any(name in int8 for name in node.input if name and index.constant(name) is None):
                int8.update(node.output)
            else:
                excluded.append(node.name)
    return excluded


def check_int8(model: onnx.ModelProto, sites: list[Site], expected: dict[str, Expected]) -> None:
    """Every located layer reads int8 weights with its trained scales, and its quantized input with the
    learned range, through DequantizeLinear nodes; otherwise ``ValueError`` naming the layer."""
    index = _Index(model.graph)
    nodes = {node.name: node for node in model.graph.node}
    for site in sites:
        node, want = nodes.get(site.node), expected[site.layer]
        if node is None:
            raise ValueError(f"{site.layer}: its {site.op_type} node is missing from the int8 graph")
        dq = index.producer.get(node.input[1])
        stored = index.initializers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if stored is None or stored.data_type != onnx.TensorProto.INT8:
            raise ValueError(f"{site.layer}: ONNX Runtime left its weight in float")
        scale = index.constant(dq.input[1])
        if scale is None or not np.allclose(scale.reshape(-1), want.weight_scale, rtol=1e-6, atol=0):
            raise ValueError(f"{site.layer}: its int8 weight does not carry the trained scales")
        if want.input_range is None:
            continue
        dq = index.producer.get(node.input[0])
        quantized = dq is not None and dq.op_type == "DequantizeLinear"
        scale, zero_point = (index.constant(dq.input[1]), index.constant(dq.input[2])) if quantized else (None, None)
        if scale is None or zero_point is None or not np.isclose(float(scale), want.input_range[0], rtol=1e-6) \
                or int(zero_point) != want.input_range[1]:
            raise ValueError(f"{site.layer}: ONNX Runtime did not quantize its input with the learned range")
