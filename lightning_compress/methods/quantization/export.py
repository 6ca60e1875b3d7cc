"""Export a fake-quant model to a QDQ ONNX file that ONNX Runtime runs with int8 kernels.

Steps: BatchNorm layers that follow a quantized convolution are folded into it; each quantized
layer's weight is replaced by its fake-quantized value; the float graph is exported with
``torch.onnx.export``; ONNX Runtime's own ``quantize_static`` (QDQ format, per-channel int8 weights,
uint8 activations) then writes the int8 file, with our scales imposed through its
``TensorQuantOverrides``: every quantized weight keeps the scale it was trained with, every quantized
layer's input keeps its learned range. Tensors that QAT did not quantize (a convolution's output
before ReLU, pooling) are calibrated by ONNX Runtime on the batches given.

Folding is exact for per-channel symmetric weights: BatchNorm multiplies each output channel by
``c = gamma / sqrt(var + eps)``, and per-channel symmetric quantization commutes with that scaling
(the channel's scale becomes ``|c|`` times larger, the integers stay the same), so what was trained is
what is exported. Per-tensor weights are re-quantized after folding (the grid changes slightly).
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from .layers import is_quantized


@dataclass
class OnnxExport:
    path: Path
    int8_bytes: int
    fp32_bytes: int
    quantized_layers: int

    @property
    def compression_ratio(self) -> float:
        return self.fp32_bytes / self.int8_bytes


def _last_conv(module: nn.Module) -> nn.Module | None:
    """The convolution whose output leaves ``module``: itself, or the last stage of a chain (a factorized layer)."""
    while isinstance(module, nn.Sequential) and len(module):
        module = module[-1]
    return module if isinstance(module, nn.Conv2d) else None


def fold_batchnorm(model: nn.Module) -> int:
    """Fold each BatchNorm2d that directly follows a quantized Conv2d (or a chain ending in one, as a
    factorized layer does) in an ``nn.Sequential`` into that conv; the BatchNorm becomes
    ``nn.Identity``. In place, eval-mode statistics. Returns the count.

    Exact for per-channel weights (the trained integers do not change); per-tensor weights are
    re-quantized on the folded values.
    """
    folded = 0
    for container in list(model.modules()):
        if not isinstance(container, nn.Sequential):
            continue
        names = list(container._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = _last_conv(container._modules[first]), container._modules[second]
            if not (conv is not None and is_quantized(conv) and isinstance(bn, nn.BatchNorm2d)
                    and bn.track_running_stats and bn.running_var is not None):
                continue
            with torch.no_grad():
                factor = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(bn.running_var + bn.eps)
                shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
                conv.weight.mul_(factor.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                new_bias = (bias - bn.running_mean) * factor + shift
                if conv.bias is None:
                    conv.bias = nn.Parameter(new_bias)
                else:
                    conv.bias.copy_(new_bias)
            container._modules[second] = nn.Identity()
            folded += 1
    return folded


def _weight_overrides(layer: nn.Module) -> list[dict]:
    scale, zero_point = layer.weight_scale_zero_point()
    return [{"scale": np.array(s, dtype=np.float32), "zero_point": np.array(z, dtype=np.int8), "axis": 0}
            for s, z in zip(scale.tolist(), zero_point.tolist())]


def _preprocess(model):
    """ONNX Runtime's recommended step before quantize_static: shape inference and graph optimization."""
    import tempfile

    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "in.onnx", Path(folder) / "out.onnx"
        onnx.save(model, source)
        quant_pre_process(str(source), str(target))
        return onnx.load(str(target))


def _inline_shared_initializers(model) -> None:
    """The exporter deduplicates equal constants and feeds the copies through Identity nodes; ONNX
    Runtime then sees a computed bias instead of an initializer and leaves that convolution in float.
    Give each consumer its own initializer again."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            copy_ = numpy_helper.from_array(numpy_helper.to_array(initializers[node.input[0]]), node.output[0])
            model.graph.initializer.append(copy_)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    calibration: Iterable[torch.Tensor],
    opset: int = 17,
) -> OnnxExport:
    """Write ``model`` (with fake-quant layers) as an int8 QDQ ONNX file at ``path``.

    ``calibration`` yields input batches (CPU tensors) for the tensors QAT left in floating point.
    Only 2..8-bit affine / symmetric formats export (fixed-point and binary have no ONNX int8 kernel).
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    path = Path(path)
    model = copy.deepcopy(model).cpu().float().eval()
    layers = {name: m for name, m in model.named_modules() if is_quantized(m)}
    if not layers:
        raise ValueError("the model has no quantized layer to export")
    for name, layer in layers.items():
        fmt = layer.weight_format
        if fmt.scheme not in ("symmetric", "affine") or fmt.bits > 8:
            raise ValueError(f"{name}: {fmt.scheme} {fmt.bits}-bit weights have no ONNX int8 form; "
                             "export supports 2..8-bit affine / symmetric")
    from ..pruning.masks import is_masked, remove_mask

    fold_batchnorm(model)
    batches = [b.detach().cpu().float() for b in calibration]
    if not batches:
        raise ValueError("export_onnx needs at least one calibration batch")
    overrides: dict[str, list[dict]] = {}
    input_ranges: dict[str, tuple[float, int, bool]] = {}
    for name, layer in layers.items():
        overrides_weight = _weight_overrides(layer)
        act = layer.activation_format
        if act is not None and bool(layer.activation_observed):
            scale, zero_point = layer.activation_scale_zero_point()
            input_ranges[name] = (float(scale), int(zero_point), act.scheme == "symmetric")
        with torch.no_grad():
            layer.weight.copy_(layer.quantized_weight())
        if is_masked(layer):
            remove_mask(layer, fold=True)  # pruned weights are zeros of the int8 tensor
        layer.quant_enabled = False  # the float graph: quantization is ONNX Runtime's now
        overrides[f"{name}.weight"] = overrides_weight

    buffer = io.BytesIO()
    torch.onnx.export(model, (batches[0][:1],), buffer, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                      dynamo=False)
    import onnx

    fp32_bytes = len(buffer.getvalue())
    graph_model = _preprocess(onnx.load_from_string(buffer.getvalue()))
    _inline_shared_initializers(graph_model)
    initializers = {init.name for init in graph_model.graph.initializer}
    weight_names = {}
    for node in graph_model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in overrides:
            layer_name = node.input[1][: -len(".weight")]
            weight_names[layer_name] = node.input[1]
            if layer_name in input_ranges and node.input[0] not in initializers:
                scale, zero_point, symmetric = input_ranges[layer_name]
                overrides[node.input[0]] = [{"scale": np.array(scale, dtype=np.float32),
                                             "zero_point": np.array(zero_point, dtype=np.int8 if symmetric else np.uint8),
                                             "quant_type": QuantType.QInt8 if symmetric else QuantType.QUInt8}]
    missing = sorted(set(layers) - set(weight_names))
    if missing:
        raise RuntimeError(f"could not find the ONNX weights of {missing}; the exporter renamed them")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter([{"input": b.numpy()} for b in batches])

        def get_next(self):
            return next(self._items, None)

    path.parent.mkdir(parents=True, exist_ok=True)
    float_path = path.with_suffix(".fp32.onnx")
    onnx.save(graph_model, float_path)
    try:
        quantize_static(str(float_path), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=None, extra_options={"TensorQuantOverrides": overrides})
    finally:
        float_path.unlink(missing_ok=True)
    return OnnxExport(path, path.stat().st_size, fp32_bytes, len(layers))
