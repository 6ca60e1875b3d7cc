"""One quantization for the tensors a Concat joins, so that ONNX Runtime's QLinearConcat copies bytes.

``quantize_static`` calibrates each input of a Concat on its own range, and its output on theirs: the
int8 kernel then requantizes every input through a lookup table, byte by byte, and at batch 1 that
costs more than the float Concat it replaces (SqueezeNet's fire modules: 1.7x the float Concat's time).
With the inputs' scale and zero point equal to the output's it is a copy. Tensors that pass through data
movement on the way (channel shuffle, pooling, slicing, in ShuffleNetV2) share them too, as ONNX Runtime
makes those operators' outputs share their input's.

What the shared quantization is:

* A learned input range in the group (the Concat feeds a quantized layer, directly or through pooling and
  reshapes, and nothing else reads the group): that range. Exact: rounding commutes with concatenation,
  data movement and max pooling, so rounding each input with the layer's range computes what the
  fake-quant model computes (it rounds the concatenated tensor).
* None (the group also feeds other readers; a layer that reads part of it reads its own copy with its
  learned range, see ``onnx_graph.input_overrides``): the union of the members' calibrated ranges, so
  that no member is clipped; a member with a narrower range than the union gets a coarser grid.
* Several different learned ranges: left to ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx

from .onnx_graph import Site, nodes_to_exclude

MOVED_BY = ("MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split")


def _groups(model: onnx.ModelProto, excluded: set[str]) -> list[set[str]]:
    """Tensors connected by the quantized Concats and data movement; only groups holding a Concat."""
    constants = {init.name for init in model.graph.initializer}
    constants.update(out for node in model.graph.node if node.op_type == "Constant" for out in node.output)
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        parent.setdefault(name, name)
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    joined: list[str] = []
    for node in model.graph.node:
        if node.name in excluded:
            continue
        if node.op_type == "Concat":
            data = [name for name in node.input if name and name not in constants]
            joined.append(node.output[0])
        elif node.op_type in MOVED_BY and node.input[0] not in constants:
            data = [node.input[0]]
        else:
            continue
        for name in data[1:] + list(node.output):
            parent[find(name)] = find(data[0])
    members: dict[str, set[str]] = {}
    for name in list(parent):
        members.setdefault(find(name), set()).add(name)
    return [members[root] for root in {find(name) for name in joined}]


def _ranges(model: onnx.ModelProto, names: list[str], batches) -> dict[str, tuple[float, float]]:
    """(min, max) of each tensor over the calibration batches, in the float graph."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names
                              if name not in {out.name for out in model.graph.output})
    options = ort.SessionOptions()
    options.log_severity_level = 3
    low = {name: np.inf for name in names}
    high = {name: -np.inf for name in names}
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for batch in batches:
            for name, value in zip(names, session.run(names, {session.get_inputs()[0].name: batch.numpy()})):
                low[name], high[name] = min(low[name], float(value.min())), max(high[name], float(value.max()))
    except Exception:  # ORT's own exception types: then ONNX Runtime calibrates these tensors itself
        return {}
    return {name: (low[name], high[name]) for name in names}


def share_concat_ranges(model: onnx.ModelProto, sites: list[Site], overrides: dict[str, list[dict]],
                        batches) -> int:
    """Give each group of joined tensors one quantization (see the module docstring): add its entries to
    ``overrides`` (``TensorQuantOverrides``; the learned ones stay). Where a learned range cannot be the
    group's, the layers that read it read their own copy (an Identity, which ONNX Runtime removes) with it.
    In place; returns how many groups share one quantization now."""
    excluded = set(nodes_to_exclude(model, sites))
    layers = {site.node for site in sites}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    unlearned = []
    shared = 0
    for group in _groups(model, excluded):
        learned = {repr(overrides[name]): overrides[name] for name in group if name in overrides}
        if len(learned) > 1:
            continue
        group_readers = [node for name in group for node in readers.get(name, [])]
        inside = {node.name for node in group_readers if any(out in group for out in node.output)}
        if learned and all(node.name in inside or node.name in layers for node in group_readers):
            value = next(iter(learned.values()))
            overrides.update({name: value for name in group})
            shared += 1
            continue
        for name in [name for name in group if name in overrides]:
            value = overrides.pop(name)
            for node in readers.get(name, []):
                if node.name in layers:
                    copy = f"{name}/{node.name}.input"
                    model.graph.node.append(onnx.helper.make_node("Identity", [name], [copy], name=f"{copy}_copy"))
                    node.input[list(node.input).index(name)] = copy
                    overrides[copy] = value
        unlearned.append(group)
    if unlearned:
        ranges = _ranges(model, sorted(set().union(*unlearned)), batches)
        for group in unlearned if ranges else []:
            # ONNX Runtime's MinMax calibration, over the group: zero is always representable.
            low = min(0.0, min(ranges[name][0] for name in group))
            high = max(0.0, max(ranges[name][1] for name in group))
            overrides.update({name: [{"rmin": np.array(low, np.float32), "rmax": np.array(high, np.float32)}]
                              for name in group})
        from onnxruntime.quantization.onnx_model import ONNXModel

        ONNXModel(model).topological_sort()
    return shared + len(unlearned)
