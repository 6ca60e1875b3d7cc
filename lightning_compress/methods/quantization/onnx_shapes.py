"""Fold the shape arithmetic of an exported graph into constants, so that int8 chains stay int8.

Code that reads ``x.size()`` (torchvision's channel shuffle, ``chunk``) is exported, with a dynamic batch,
as ``Shape -> Gather -> Unsqueeze -> Concat`` chains that feed ``Reshape`` and ``Slice``. In an int8
graph they cost twice: dozens of tiny kernels per block, and a DequantizeLinear of every tensor they
measure (ONNX Runtime computes the float tensor only to read its shape), which also keeps its QDQ
transformer from fusing the Reshape / Slice that reads those shapes (ShuffleNetV2: 52 such
DequantizeLinear, a fifth of the int8 run time). Everything but the batch is fixed at export, so each
value of that arithmetic is a constant, or the batch itself where a Reshape can say ``-1``.

The values are read by running the float graph at a few batch sizes, not by evaluating the arithmetic
here: ONNX Runtime computes them as it will at inference, whatever operators the exporter used. A value
that changes with the batch in any other way stays computed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

# Batch sizes the values are read at: more than one, none of them 1 (a 1 in a shape is ambiguous).
PROBE_BATCHES = (2, 3, 5)


def _shape_values(model: onnx.ModelProto, names: list[str], example: np.ndarray) -> dict[str, list[np.ndarray]]:
    """The values of ``names`` at each probe batch, or {} when ONNX Runtime cannot run the graph so."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    # No type: ONNX Runtime infers it, and these are not all int64 (a Cast to float for a division).
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        runs = [session.run(names, {session.get_inputs()[0].name: np.repeat(example[:1], batch, axis=0)})
                for batch in PROBE_BATCHES]
    except Exception:  # ORT's own exception types: a graph it cannot run at other batch sizes keeps its shapes
        return {}
    return {name: [np.asarray(run[i]) for run in runs] for i, name in enumerate(names)}


def _constant(values: list[np.ndarray], reshape_only: bool) -> np.ndarray | None:
    """One constant that stands for ``values`` (one per probe batch), or None."""
    first = values[0]
    if all(v.shape == first.shape and v.dtype == first.dtype and np.array_equal(v, first) for v in values):
        return first
    if not reshape_only or first.ndim != 1 or first.dtype != np.int64 or any(v.shape != first.shape for v in values):
        return None
    stacked = np.stack(values)
    varying = np.flatnonzero((stacked != first).any(axis=0))
    # A Reshape infers one -1 dimension: the batch, when it is the only entry that varies, and equals it.
    if len(varying) != 1 or (first == -1).any() or not np.array_equal(stacked[:, varying[0]], PROBE_BATCHES):
        return None
    folded = first.copy()
    folded[varying[0]] = -1
    return folded


def fold_shapes(model: onnx.ModelProto, example: np.ndarray) -> int:
    """Replace each value computed from tensor shapes (and constants) by a constant where it does not depend
    on the batch, or by a Reshape target with ``-1`` for the batch. ``example``: one input, its batch first.
    In place; returns how many values were folded."""
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    constants.update(out for node in graph.node if node.op_type == "Constant" for out in node.output)
    derived: set[str] = set()
    arithmetic: list[onnx.NodeProto] = []
    for node in graph.node:  # topologically sorted
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        inputs = [name for name in node.input if name]
        if node.op_type in ("Shape", "Size") or (inputs and any(n in derived for n in inputs)
                                                 and all(n in derived or n in constants for n in inputs)):
            derived.update(node.output)
            arithmetic.append(node)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if not all(out in derived for out in node.output):
            for name in node.input:
                if name in derived:
                    readers.setdefault(name, []).append(node)
    if not readers:
        return 0
    values = _shape_values(model, sorted(readers), example)
    folded: dict[str, np.ndarray] = {}
    for name, probes in values.items():
        value = _constant(probes, all(r.op_type == "Reshape" and list(r.input).index(name) == 1
                                      for r in readers[name]))
        if value is not None:
            folded[name] = value
    for name, value in folded.items():
        for node in arithmetic:
            for i, out in enumerate(node.output):
                if out == name:
                    node.output[i] = f"{name}/folded_away"
                    derived.add(node.output[i])
        graph.initializer.append(numpy_helper.from_array(value, name))
    _drop_dead(graph, derived)
    return len(folded)


def _drop_dead(graph: onnx.GraphProto, arithmetic: set[str]) -> None:
    """Remove the shape arithmetic (nodes whose outputs are all in ``arithmetic``) and the Constant nodes
    that nothing reads any more."""
    outputs = {out.name for out in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if (node.op_type == "Constant" or all(o in arithmetic for o in node.output))
                and not any(out in read for out in node.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)
