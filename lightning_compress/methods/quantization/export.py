"""Export a fake-quant model to a QDQ ONNX file that ONNX Runtime runs with int8 kernels.

Steps: BatchNorm layers that follow a quantized convolution are folded into it; each quantized
layer's weight is replaced by its fake-quantized value; the float graph is exported with
``torch.onnx.export``; ONNX Runtime's own ``quantize_static`` (QDQ format, per-channel int8 weights,
uint8 activations) then writes the int8 file, with our scales imposed through its
``TensorQuantOverrides``: every quantized weight keeps the scale it was trained with (2..7-bit weights
keep their integers in int8), every quantized layer's input keeps its learned range. ONNX Runtime
calibrates, on the batches given, the tensors that QAT left in float and its int8 kernels need
quantized (a convolution's output, max pooling, a residual sum); operators QAT ran in float (softmax,
normalizations, GELU, attention's products) and layers it did not quantize stay float.

Folding is exact for per-channel symmetric weights: BatchNorm multiplies each output channel by
``c = gamma / sqrt(var + eps)``, and per-channel symmetric quantization commutes with that scaling
(the channel's scale becomes ``|c|`` times larger, the integers stay the same), so what was trained is
what is exported. Per-tensor weights are re-quantized after folding (the grid changes slightly).

How the quantized layers are found in the ONNX graph. Names are the exporter's business: it folds a
BatchNorm into the conv before it under a new weight name, and writes a Linear on a 3-D input as a
MatMul on a new, transposed initializer. So the layers are found by structure:

* Chosen: markers. During the export each quantized layer runs ``torch.fake_quantize_per_tensor_affine``
  on its input and ``torch.fake_quantize_per_channel_affine`` on its weight, which the exporter writes
  as QuantizeLinear / DequantizeLinear pairs at the very Conv / Gemm / MatMul that uses them, in call
  order and with our scales: each layer's node and input tensor are read from them (``onnx_graph``;
  a match is checked against the scales). A marked weight is no constant, so the exporter fuses nothing
  into it. The markers are then stripped, the node reading the fake-quantized weight as an initializer
  that we name and lay out as the node reads it, and the overrides are keyed on that same graph.
* Chosen with it: folding BatchNorm here, on pairs found by tracing with ``torch.fx`` (the Sequential
  rule when the model does not trace), since the exporter cannot fold into a marked weight.
* ONNX Runtime's optimizer (``quant_pre_process``'s optimization step) is skipped: it fuses and renames
  after the names are read, and has nothing left to do before quantization (BatchNorm is folded, the
  exporter folds constants); the session optimizes the int8 graph at load anyway. Measured, VGG19-BN
  (width 0.25, batch 1, 2 threads, interleaved medians): 0.47 ms int8 before and after, 0.91 ms fp32.
* Rejected: matching initializers by value (equal weights are ambiguous, and an optimizer that fuses a
  scale into a weight changes the value).

A layer that cannot be located, or that ONNX Runtime left in float, is a ``ValueError`` naming it.

On x86 CPUs without VNNI, ONNX Runtime's u8 x s8 kernels saturate sums of two products at 16 bits,
which costs 8-bit weights some accuracy (a few percent of top-1 on small models, none at <= 7 bits);
the session option ``session.x64quantprecision = "1"`` runs the exact arithmetic, more slowly.
"""

from __future__ import annotations

import copy
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..pruning.masks import is_masked, remove_mask
from .layers import LayerTracer, dequantize_layer, is_quantized


CONVS = (nn.Conv1d, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _norm_of(conv: nn.Module) -> type | None:
    """The BatchNorm class that folds into ``conv``."""
    return nn.BatchNorm1d if isinstance(conv, nn.Conv1d) else nn.BatchNorm2d if isinstance(conv, nn.Conv2d) else None


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
    return module if isinstance(module, CONVS) else None


def _traced_pairs(model: nn.Module) -> list[tuple[str, str]] | None:
    """``(conv, batchnorm)`` module names where the BatchNorm is the only reader of a quantized conv's
    output, each called once (a module called twice cannot be folded for one call); None when the model
    does not trace."""
    try:
        graph = LayerTracer().trace(model)
    except Exception:  # any Python fx cannot follow (data-dependent control flow, unsupported calls)
        return None
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module" and calls[source.target] == 1
                and len(source.users) == 1):
            continue
        if isinstance(model.get_submodule(node.target), _NORMS):
            pairs.append((source.target, node.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, batchnorm)`` where the BatchNorm directly follows the conv (or a chain ending in one, as a
    factorized layer is) in an ``nn.Sequential``."""
    convs = {id(m): name for name, m in model.named_modules()}
    pairs = []
    for prefix, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        names = list(container._modules)
        for first, second in zip(names, names[1:]):
            conv = _last_conv(container._modules[first])
            if conv is not None and isinstance(container._modules[second], _NORMS):
                pairs.append((convs[id(conv)], f"{prefix}.{second}" if prefix else second))
    return pairs


def fold_batchnorm(model: nn.Module) -> int:
    """Fold each BatchNorm1d / 2d that reads only the output of a quantized Conv1d / 2d into that conv; the
    BatchNorm becomes ``nn.Identity``. The pairs are found by tracing with ``torch.fx``; when the model
    does not trace, a BatchNorm directly after a conv (or a chain ending in one, as a factorized layer
    is) in an ``nn.Sequential``. In place, eval-mode statistics. Returns the count.

    Exact for per-channel weights (the trained integers do not change); per-tensor weights are
    re-quantized on the folded values.

    Example (a conv and its BatchNorm held as attributes, as ResNet's stem holds them):
        >>> from lightning_compress.methods.quantization import Format, quantize_layer
        >>> class Stem(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.bn = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)
        ...     def forward(self, x):
        ...         return torch.relu(self.bn(self.conv(x)))
        >>> stem = Stem().eval()
        >>> _ = quantize_layer(stem.conv, Format(8, "symmetric"), None)
        >>> fold_batchnorm(stem), type(stem.bn).__name__, stem.conv.bias is not None
        (1, 'Identity', True)
    """
    pairs = _traced_pairs(model)
    folded = 0
    for conv_name, bn_name in _sequential_pairs(model) if pairs is None else pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if not (_norm_of(conv) is not None and isinstance(bn, _norm_of(conv)) and is_quantized(conv)
                and bn.track_running_stats and bn.running_var is not None):
            continue
        with torch.no_grad():
            factor = 1 / torch.sqrt(bn.running_var + bn.eps)
            factor = factor * bn.weight if bn.affine else factor
            shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(factor.reshape(-1, *[1] * (conv.weight.ndim - 1)).to(conv.weight.dtype))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            new_bias = (bias - bn.running_mean) * factor + shift
            if conv.bias is None:
                conv.bias = nn.Parameter(new_bias)
            else:
                conv.bias.copy_(new_bias)
        parent, _, attribute = bn_name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, nn.Identity())
        folded += 1
    return folded


def _marked_forward(layer: nn.Module, name: str, weight_scale: torch.Tensor, input_range: tuple[float, int] | None,
                    signed_input: bool, calls: list[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer's float forward with markers (see the module docstring). The weight is already
    fake-quantized; the markers' integer ranges are the widest ONNX accepts so that, whatever the bit
    width, they leave the traced values as they are: only their place and scales are read, then they go."""
    zero = torch.zeros(weight_scale.shape, dtype=torch.int32)

    def weight(value: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.fake_quantize_per_channel_affine(value, weight_scale, zero, axis, -128, 127)

    def forward(x: torch.Tensor) -> torch.Tensor:
        calls.append(name)
        if input_range is not None:
            low, high = (-128, 127) if signed_input else (0, 255)
            x = torch.fake_quantize_per_tensor_affine(x, input_range[0], input_range[1], low, high)
        if isinstance(layer, CONVS):
            return layer._conv_forward(x, weight(layer.weight, 0), layer.bias)
        if x.dim() == 2:
            return F.linear(x, weight(layer.weight, 0), layer.bias)
        # Not F.linear: on other ranks the exporter would transpose the marked weight between its marker
        # and the MatMul; a transposed weight is folded into a constant before the marker instead.
        y = torch.matmul(x, weight(layer.weight.t(), 1))
        return y if layer.bias is None else y + layer.bias

    return forward


def _fails_to_run(path: Path, batch: torch.Tensor) -> str | None:
    """Why ONNX Runtime cannot run the file at ``path`` on ``batch``, or None when it can."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    except Exception as error:  # ORT raises its own exception types, for load and for run
        return str(error).strip().splitlines()[-1][:300]
    return None


def drop_compiled_forward(model: nn.Module) -> None:
    """A ``torch.compile``d forward set on the instance (Lightning does so for ``fit(torch.compile(module))``)
    cannot be traced by the exporter, and in a deep copy it still calls the original module: the copy
    goes back to its class's forward."""
    forward = model.__dict__.get("forward")
    if forward is not None and hasattr(forward, "_torchdynamo_orig_callable"):
        del model.__dict__["forward"]


def _shape_inference(model):
    """ONNX Runtime's pre-processing before quantize_static, without its graph optimization (see the
    module docstring): symbolic and ONNX shape inference, which keep every name."""
    import tempfile

    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "in.onnx", Path(folder) / "out.onnx"
        onnx.save(model, source)
        try:
            quant_pre_process(str(source), str(target), skip_optimization=True)
        except Exception:  # its symbolic inference asserts on some graphs (attention's computed reshapes)
            quant_pre_process(str(source), str(target), skip_optimization=True, skip_symbolic_shape=True)
        return onnx.load(str(target))


def export_copy(model: nn.Module, calibration: Iterable[torch.Tensor], runtime: str,
                caller: str) -> tuple[nn.Module, dict[str, nn.Module], list[torch.Tensor]]:
    """What every int8 export starts from: a float CPU copy of ``model`` in eval mode (the trained
    module stays as it is), its quantized layers, and the calibration batches on the CPU. A layer whose
    format has no int8 form in ``runtime``, no quantized layer or no batch is a ValueError that names
    the ``caller``."""
    model = copy.deepcopy(model).cpu().float().eval()
    drop_compiled_forward(model)
    layers = {name: m for name, m in model.named_modules() if is_quantized(m)}
    if not layers:
        raise ValueError("the model has no quantized layer to export")
    for name, layer in layers.items():
        for what, fmt in (("weights", layer.weight_format), ("activations", layer.activation_format)):
            if fmt is not None and (fmt.scheme not in ("symmetric", "affine") or fmt.bits > 8):
                raise ValueError(f"{name}: {fmt.scheme} {fmt.bits}-bit {what} have no {runtime} int8 form; "
                                 f"{caller} supports 2..8-bit affine / symmetric")
    batches = [b.detach().cpu().float() for b in calibration]
    if not batches:
        raise ValueError(f"{caller} needs at least one calibration batch")
    return model, layers, batches


def export_fp32_onnx(model: nn.Module, path: str | Path, example: torch.Tensor, opset: int = 17) -> Path:
    """``model`` in floating point as an ONNX file (fake-quant layers baked into plain ones, masks folded):
    what an int8 file is compared with, in the same runtime."""
    path = Path(path)
    model = copy.deepcopy(model).cpu().float().eval()
    drop_compiled_forward(model)
    for layer in list(model.modules()):
        dequantize_layer(layer)
        if is_masked(layer):
            remove_mask(layer, fold=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernels have no ONNX form
    try:
        with torch.no_grad():
            torch.onnx.export(model, (example[:1].cpu().float(),), str(partial), input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=opset, dynamo=False)
        partial.replace(path)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        partial.unlink(missing_ok=True)
    return path


def export_onnx(
    model: nn.Module,
    path: str | Path,
    calibration: Iterable[torch.Tensor],
    opset: int = 17,
) -> OnnxExport:
    """Write ``model`` (with fake-quant layers) as an int8 QDQ ONNX file at ``path``.

    ``calibration`` yields input batches (CPU tensors) for the tensors QAT left in floating point.
    Only 2..8-bit affine / symmetric formats export (fixed-point and binary have no ONNX int8 kernel).
    Quantized layers the forward never calls are not in the graph; a called one that cannot be placed,
    or that would end up in float, raises ``ValueError``.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from . import onnx_concat, onnx_graph, onnx_shapes

    path = Path(path)
    model, layers, batches = export_copy(model, calibration, "ONNX", "export_onnx")
    fold_batchnorm(model)

    expected: dict[str, onnx_graph.Expected] = {}
    weights: dict[str, np.ndarray] = {}
    signed: dict[str, bool] = {}
    calls: list[str] = []
    for name, layer in layers.items():
        scale, _ = layer.weight_scale_zero_point()
        scale = scale.float().reshape(-1).expand(layer.weight.shape[0]).contiguous()
        act, input_range = layer.activation_format, None
        if act is not None and bool(layer.activation_observed):
            a_scale, a_zero = layer.activation_scale_zero_point()
            input_range = (float(a_scale), int(a_zero))
        signed[name] = act is not None and act.scheme == "symmetric"
        if is_masked(layer):
            remove_mask(layer, fold=True)  # pruned weights are zeros of the int8 tensor
        # A plain layer with the fake-quantized weight baked in: the markers are its quantization now.
        dequantize_layer(layer)
        expected[name] = onnx_graph.Expected("conv" if isinstance(layer, CONVS) else "linear",
                                             scale.numpy().copy(), input_range)
        weights[name] = layer.weight.detach().numpy().copy()
        layer.forward = _marked_forward(layer, name, scale, input_range, signed[name], calls)

    buffer = io.BytesIO()
    # MultiheadAttention's and TransformerEncoderLayer's fused inference kernels have no ONNX form; their
    # regular path computes the same with exportable ops.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.onnx.export(model, (batches[0][:1],), buffer, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    graph_model = onnx.load_from_string(buffer.getvalue())
    onnx_graph.inline_shared_initializers(graph_model)
    onnx_graph.name_nodes(graph_model)
    sites = onnx_graph.locate(graph_model, calls, expected)
    onnx_graph.strip_markers(graph_model, sites, weights)
    onnx_shapes.fold_shapes(graph_model, batches[0][:1].numpy())
    ranges = {n: (*e.input_range, signed[n]) for n, e in expected.items() if e.input_range is not None}
    onnx_graph.lookup_relus(graph_model, sites)
    activations = onnx_graph.input_overrides(graph_model, sites, ranges)
    fp32_bytes = graph_model.ByteSize()
    graph_model = _shape_inference(graph_model)

    overrides: dict[str, list[dict]] = {}
    for site in sites:
        overrides[site.weight] = [{"scale": np.array(s, dtype=np.float32), "zero_point": np.array(0, dtype=np.int8),
                                   "axis": site.weight_axis} for s in expected[site.layer].weight_scale.tolist()]
    for tensor, (scale, zero_point, sym) in activations.items():
        overrides[tensor] = [{"scale": np.array(scale, dtype=np.float32),
                              "zero_point": np.array(zero_point, dtype=np.int8 if sym else np.uint8),
                              "quant_type": QuantType.QInt8 if sym else QuantType.QUInt8}]
    onnx_concat.share_concat_ranges(graph_model, sites, overrides, batches)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter([{"input": b.numpy()} for b in batches])

        def get_next(self):
            return next(self._items, None)

    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed once checked: an interrupted export leaves no half file at path.
    partial = path.with_name(f".{path.name}.partial")
    float_path = path.with_name(f".{path.name}.fp32.partial")
    onnx.save(graph_model, float_path)
    try:
        quantize_static(str(float_path), str(partial), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(onnx_graph.COMPUTE_OPS + onnx_graph.PASS_THROUGH_OPS),
                        nodes_to_exclude=onnx_graph.nodes_to_exclude(graph_model, sites),
                        extra_options={"TensorQuantOverrides": overrides,
                                       # Their int8 kernels also have float outputs: no extra rounding there.
                                       "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
                                       # A ReLU folded into the quantization before it clips only when
                                       # that range starts at zero, which a signed learned range does not.
                                       "QDQKeepRemovableActivations": any(s for _, _, s in activations.values())})
        # A file that ONNX Runtime loads but refuses to run (an int8 kernel's limits) is no artifact.
        problem = _fails_to_run(partial, batches[0][:1])
        if problem is not None:
            raise ValueError(f"ONNX Runtime cannot run the int8 export of the model: {problem}")
        onnx_graph.check_int8(onnx.load(str(partial)), sites, expected)
        partial.replace(path)
    finally:
        float_path.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return OnnxExport(path, path.stat().st_size, fp32_bytes, len({site.layer for site in sites}))
