"""Export a fake-quant model to an ExecuTorch program (``.pte``) that runs int8 on the XNNPACK backend.

ExecuTorch is PyTorch's on-device runtime; its int8 path is PT2E. Steps: BatchNorm layers that follow
a quantized convolution are folded into it and each quantized layer's weight takes its fake-quantized
value (both as :func:`~.export.export_onnx` does, with its helpers); the float model is captured with
``torch.export``; the XNNPACK quantizer annotates the graph and ``prepare_pt2e`` puts observers on it,
which the calibration batches fill (the tensors QAT left in float and the int8 kernels need quantized: a
convolution's output, a residual sum); then OUR scales replace the observers of every quantized layer's
weight and input; ``convert_pt2e`` writes the quantize / dequantize ops; ``to_edge_transform_and_lower``
with the XNNPACK partitioner lowers them to int8 kernels, and the program is written.

How our scales are imposed. Chosen: prepare with the XNNPACK quantizer, then replace observers before
``convert_pt2e``. ``convert_pt2e`` asks each observer only for ``calculate_qparams()``, its dtype,
qscheme, channel axis and integer range, so a fixed observer (``_FixedQParams``) that answers with our
values gives the graph our quantization while everything else (which ops XNNPACK quantizes, how it
shares parameters along max pooling, reshapes and ReLUs, the folding of int8 weight constants) stays the
quantizer's, the path that executorch 1.5.1 / torchao 0.18 test. Rejected: writing the
``quantized_decomposed`` ops into the graph ourselves (every pattern the partitioner matches, a conv's
output quantization included, would be ours to reproduce), and a custom quantizer (the same, for
annotations).

* Weights: per-channel symmetric int8 with the scale each layer trained with. The weight in the float
  graph already lies on that grid, so the int8 constant holds the trained integers exactly (2..7-bit
  weights keep theirs in int8); a pruned weight's zeros are zeros of it; a factorized layer's stages are
  layers of their own. Per-tensor weights give every channel the one scale.
* Inputs: the quantizer makes a tensor's parameters shared along ops that int8 passes through (max
  pooling, ReLU, reshape, mean): one observer for the chain. Where every op of the chain commutes with
  clipping (all but averaging ones), that observer takes the layer's learned range: the chain's int8
  tensors are those the fake-quant model would have. Where it holds an average (a global average pool
  before the classifier), clipping before the average is not clipping after it, so the chain keeps its
  calibrated parameters and the layer's input is requantized to its own range by an observer of its own
  (as is the input of a second layer reading a tensor whose chain took another layer's range).
  An ``affine`` uint8 range ``(scale, zp)`` is the int8 range ``(scale, zp - 128)``: the same integers
  shifted; int8 activations use the full [-128, 127] range (as the ONNX export's QuantizeLinear does).
* Layers that QAT did not quantize stay float (the quantizer's filter skips them).

After conversion every quantized layer must read an int8 weight and a quantized input, and no
convolution or linear op may be left outside the XNNPACK delegate: otherwise a ``ValueError`` names
the layer or the op. The program must load and run in ``executorch.runtime`` on one input before it
is written (to a file beside the target, renamed into place).

Needs the ``edge`` extra (executorch, which brings torchao).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..pruning.masks import is_masked, remove_mask
from .export import CONVS, export_copy, fold_batchnorm
from .layers import dequantize_layer

_COMPUTE = ("aten.conv1d.default", "aten.conv2d.default", "aten.convolution.default", "aten.linear.default")
# Shared-parameter ops through which clipping does not commute (an average of clipped values is not the
# clipped average); the rest of the quantizer's shared ops (ReLU, clamp, max pooling, reshapes) commute.
_AVERAGING = ("aten.mean.default", "aten.mean.dim", "aten.adaptive_avg_pool2d.default",
              "aten.avg_pool2d.default", "aten.adaptive_avg_pool1d.default", "aten.avg_pool1d.default")
# Left outside the delegate, these would run int8 arithmetic in ExecuTorch's reference kernels.
_QUANTIZE_OPS = ("quantized_decomposed.quantize_per_tensor.default", "quantized_decomposed.dequantize_per_tensor.default",
                 "quantized_decomposed.quantize_per_channel.default",
                 "quantized_decomposed.dequantize_per_channel.default")


@dataclass
class ExecutorchExport:
    path: Path
    bytes: int  # the .pte file
    fp32_parameter_bytes: int  # the exported (BatchNorm-folded) model's parameters and buffers in float32
    quantized_layers: int  # layers whose int8 weights and quantized inputs are in the program
    portable_ops: list[str]  # ops left to ExecuTorch's portable (non-XNNPACK) kernels, if any

    @property
    def compression_ratio(self) -> float:
        return self.fp32_parameter_bytes / self.bytes


def _edge_imports():
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from executorch.exir import to_edge_transform_and_lower
        from torchao.quantization.pt2e.observer import ObserverBase
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as error:
        raise ImportError(f"export_executorch needs the 'edge' extra (pip install 'lightning-compress[edge]'): "
                          f"{error}") from error
    return (XnnpackPartitioner, XNNPACKQuantizer, get_symmetric_quantization_config, to_edge_transform_and_lower,
            ObserverBase, convert_pt2e, prepare_pt2e)


def _fixed_observer_class(base: type) -> type:
    class _FixedQParams(base):
        """An observer that observes nothing: ``convert_pt2e`` reads our scale and zero point from it."""

        def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, per_channel: bool,
                     quant_min: int, quant_max: int) -> None:
            super().__init__(dtype=torch.int8)
            self.register_buffer("scale", scale.detach().float().clone())
            self.register_buffer("zero_point", zero_point.detach().to(torch.int32).clone())
            self.qscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_affine
            self.ch_axis = 0
            self.quant_min, self.quant_max = quant_min, quant_max
            self.is_dynamic = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def calculate_qparams(self):
            return self.scale, self.zero_point

        def same_as(self, other: nn.Module) -> bool:
            return (isinstance(other, type(self)) and self.scale.shape == other.scale.shape
                    and bool(torch.equal(self.scale, other.scale)) and bool(torch.equal(self.zero_point, other.zero_point)))

    return _FixedQParams


def _input_qparams(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The layer's learned input range as int8 ``(scale, zero point)``, None when it has none."""
    fmt = layer.activation_format
    if fmt is None or not bool(layer.activation_observed):
        return None
    scale, zero_point = layer.activation_scale_zero_point()
    if fmt.scheme == "affine":
        zero_point = zero_point - 128  # uint8 q in [0, 255] is int8 q - 128 in [-128, 127]: same scale
    return scale.reshape(()), zero_point.reshape(())


def _module_of(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def _target(node: torch.fx.Node) -> str:
    """``aten.conv2d.default``: the op a call_function node calls (an edge op by its ATen name), else ""."""
    if node.op != "call_function":
        return ""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        target = getattr(target, "_op", target)  # an EdgeOpOverload wraps the ATen op
    return str(target).replace("torch.ops.", "")


def _portable_ops(edge) -> list[tuple[str, str | None]]:
    """``(op, module)`` for each op left outside the XNNPACK delegate (quantize / dequantize ops included)."""
    return [(_target(node), _module_of(node)) for node in edge.exported_program().graph.nodes
            if node.op == "call_function" and isinstance(getattr(node.target, "_op", node.target), torch._ops.OpOverload)]


def export_executorch(model: nn.Module, path: str | Path, calibration: Iterable[torch.Tensor]) -> ExecutorchExport:
    """Write ``model`` (with fake-quant layers) as an int8 ExecuTorch program for XNNPACK at ``path``.

    ``calibration`` yields input batches (CPU tensors of one shape but the batch size): the first
    sample of the first batch is the example input whose shape the program is specialised to (batch 1),
    and all of them calibrate the tensors QAT left in floating point. Only 2..8-bit affine / symmetric
    formats export. A quantized layer the graph does not quantize as trained, or a convolution or linear
    op that XNNPACK did not take, raises ``ValueError``.
    """
    path = Path(path)
    model, layers, batches = export_copy(model, calibration, "XNNPACK", "export_executorch")
    (XnnpackPartitioner, XNNPACKQuantizer, get_symmetric_quantization_config, to_edge_transform_and_lower,
     ObserverBase, convert_pt2e, prepare_pt2e) = _edge_imports()
    from executorch.runtime import Runtime

    Fixed = _fixed_observer_class(ObserverBase)
    fold_batchnorm(model)

    weight_observers: dict[str, nn.Module] = {}
    input_observers: dict[str, nn.Module | None] = {}
    for name, layer in layers.items():
        scale, _ = layer.weight_scale_zero_point()
        scale = scale.float().reshape(-1).expand(layer.weight.shape[0]).contiguous()
        weight_observers[name] = Fixed(scale, torch.zeros(scale.shape, dtype=torch.int32), True, -127, 127)
        qparams = _input_qparams(layer)
        input_observers[name] = None if qparams is None else Fixed(*qparams, False, -128, 127)
        if is_masked(layer):
            remove_mask(layer, fold=True)  # pruned weights are zeros of the int8 tensor
        dequantize_layer(layer)  # a plain layer with the fake-quantized weight baked in
    fp32_bytes = sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    plain_layers = {name for name, m in model.named_modules() if isinstance(m, (*CONVS, nn.Linear))} - set(layers)

    example = batches[0][:1]
    # MultiheadAttention's fused inference kernel is not exportable; its regular path computes the same.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            # A dynamic batch to calibrate on whole batches; the program itself is exported at batch 1.
            graph = torch.export.export(model, (batches[0],), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            quantizer.set_filter_function(lambda node: _module_of(node) not in plain_layers
                                          or _target(node) not in _COMPUTE)
            prepared = prepare_pt2e(graph, quantizer)
            for batch in batches:
                prepared(batch)
            sites = _impose(prepared, layers, weight_observers, input_observers, Fixed)
            converted = convert_pt2e(prepared)
            _check_converted(converted, sites)
            program = torch.export.export(converted, (example,))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    portable = _portable_ops(edge)
    refused = sorted({f"{module} ({op})" for op, module in portable if module in layers or op in _QUANTIZE_OPS})
    if refused:
        raise ValueError(f"XNNPACK did not take these quantized layers / ops: {', '.join(refused)}")
    data = edge.to_executorch().buffer

    try:
        method = Runtime.get().load_program(data).load_method("forward")
        out = method.execute([example.contiguous()])
    except Exception as error:  # the runtime raises RuntimeError and its own types, for load and for run
        raise ValueError(f"executorch.runtime cannot run the program: {str(error).strip()[:300]}") from error
    if not out or tuple(out[0].shape) != tuple(converted(example).shape):
        raise ValueError("executorch.runtime ran the program but its output does not have the model's shape")

    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: an interrupted export leaves no half file at path.
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return ExecutorchExport(path, path.stat().st_size, fp32_bytes, len({s[0] for s in sites}),
                            sorted({op for op, _ in portable}))


def _impose(prepared: torch.fx.GraphModule, layers: dict[str, nn.Module], weight_observers: dict[str, nn.Module],
            input_observers: dict[str, nn.Module | None], Fixed: type) -> list[tuple[str, torch.fx.Node]]:
    """Replace the observers of each quantized layer's weight and input with ours (see the module
    docstring). Returns ``(layer, compute node)`` for each call of a quantized layer."""
    modules = dict(prepared.named_modules(remove_duplicate=False))

    def observer_node(arg) -> torch.fx.Node | None:
        if isinstance(arg, torch.fx.Node) and arg.op == "call_module" and isinstance(modules.get(arg.target), nn.Module) \
                and "activation_post_process" in str(arg.target):
            return arg
        return None

    def names_of(instance: nn.Module) -> list[str]:
        return [n for n, m in modules.items() if m is instance]

    sites = []
    for node in list(prepared.graph.nodes):
        layer = _module_of(node) if _target(node) in _COMPUTE else None
        if layer not in layers:
            continue
        sites.append((layer, node))
        weight, source = observer_node(node.args[1]), observer_node(node.args[0])
        if weight is None:
            raise ValueError(f"{layer}: the XNNPACK quantizer left its weight unquantized")
        for name in names_of(modules[weight.target]):
            setattr(prepared, name, weight_observers[layer])
            modules[name] = weight_observers[layer]
        ours = input_observers[layer]
        if source is None:
            raise ValueError(f"{layer}: the XNNPACK quantizer left its input unquantized")
        if ours is None:
            continue  # QAT learned no input range: the calibrated one stays
        shared = modules[source.target]
        if isinstance(shared, Fixed) and shared.same_as(ours):
            continue
        chain = [n for n in prepared.graph.nodes if n.op == "call_module" and modules.get(n.target) is shared]
        averaging = any(isinstance(n.args[0], torch.fx.Node) and _target(n.args[0]) in _AVERAGING for n in chain)
        if not averaging and not isinstance(shared, Fixed):
            for name in names_of(shared):  # the chain takes the layer's range
                setattr(prepared, name, ours)
                modules[name] = ours
            continue
        # The layer's own observer after the chain's: its input is requantized to its range.
        name = f"activation_post_process_lc_{len(modules)}"
        prepared.add_module(name, ours)
        modules[name] = ours
        with prepared.graph.inserting_before(node):
            own = prepared.graph.call_module(name, (source,))
        own.meta = dict(source.meta)
        node.replace_input_with(source, own)
    prepared.graph.lint()
    prepared.recompile()
    missing = set(layers) - {layer for layer, _ in sites}
    if missing:
        raise ValueError(f"quantized layers not found in the exported graph (never called, or not as a "
                         f"conv / linear op): {', '.join(sorted(missing))}")
    return sites


def _check_converted(converted: torch.fx.GraphModule, sites: list[tuple[str, torch.fx.Node]]) -> None:
    """Each quantized layer reads an int8 per-channel weight constant and a quantized input."""
    by_layer: dict[str, int] = {}
    for layer, _ in sites:
        by_layer[layer] = by_layer.get(layer, 0) + 1
    found: dict[str, int] = {}
    for node in converted.graph.nodes:
        layer = _module_of(node) if _target(node) in _COMPUTE else None
        if layer not in by_layer:
            continue
        x, w = node.args[0], node.args[1]
        weight_ok = (isinstance(w, torch.fx.Node) and _target(w) == "quantized_decomposed.dequantize_per_channel.default"
                     and w.args[0].op == "get_attr"
                     and getattr(converted, w.args[0].target).dtype == torch.int8)
        input_ok = isinstance(x, torch.fx.Node) and _target(x).startswith("quantized_decomposed.dequantize_per_tensor")
        if not (weight_ok and input_ok):
            raise ValueError(f"{layer}: the converted graph does not read an int8 weight and a quantized input "
                             f"({_target(x) or x}, {_target(w) or w})")
        found[layer] = found.get(layer, 0) + 1
    if found != by_layer:
        raise ValueError(f"quantized layers lost in conversion: {sorted(set(by_layer) - set(found))}")
