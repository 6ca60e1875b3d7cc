"""The int8 ONNX file keeps concatenations, channel shuffles and pooling in int8 (``onnx_shapes``,
``onnx_concat``): checked on the graph ONNX Runtime actually runs (its optimized model), and the file
still agrees with the fake-quant model.

SqueezeNet 1.1 (fire modules: two convolutions joined by a Concat, max pooling) and a small ShuffleNetV2
(chunk, Concat, channel shuffle written with ``x.size()``) are trained briefly to be decisive, as in
``test_export_models``, so that top-1 agreement measures the export.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from lightning_compress.methods.quantization import calibrate
from lightning_compress.methods.quantization.export import export_onnx
from lightning_compress.methods.quantization.onnx_shapes import fold_shapes
from lightning_compress.methods.quantization.shared_ranges import shared_range_groups, tie_input_ranges
from lightning_compress.models import create_model
from tests.methods.quantization.test_export_models import (INPUTS, _decisive, _inputs, _quantize,  # noqa: F401
                                                           one_thread)
from tests.ort_sessions import exact_session

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
torchvision = pytest.importorskip("torchvision")

SHAPE = (3, 16, 16)


def _optimized(path, tmp_path):
    """The graph ONNX Runtime runs: ``(nodes, initializers by name)``."""
    from onnx import numpy_helper

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return list(graph.node), {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def _dequantized_readers(nodes, initializers) -> list[str]:
    """The operators that read an activation through a DequantizeLinear: where the graph leaves int8."""
    readers = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    return sorted(op for node in nodes if node.op_type == "DequantizeLinear" and node.input[0] not in initializers
                  for op in readers.get(node.output[0], []))


def _copies_bytes(concat, initializers) -> bool:
    """A QLinearConcat whose inputs carry its output's scale and zero point: ONNX Runtime copies them."""
    scale, zero = (initializers[name] for name in concat.input[:2])
    pairs = [(concat.input[i + 1], concat.input[i + 2]) for i in range(2, len(concat.input), 3)]
    return all(np.array_equal(initializers[s], scale) and np.array_equal(initializers[z], zero) for s, z in pairs)


def _small_shufflenet() -> nn.Module:
    return torchvision.models.ShuffleNetV2([2, 2, 2], [8, 16, 32, 64, 128], num_classes=10)


def _exported(build, steps, tmp_path, lr=3e-3, shared_ranges=False):
    torch.manual_seed(0)
    model, prototypes = build(), torch.randn(10, *SHAPE)
    _decisive(model, prototypes, steps, lr)
    _quantize(model, 8, None)
    calibration = [_inputs(prototypes, torch.randint(0, 10, (32,))) for _ in range(4)]
    calibrate(model, calibration)
    if shared_ranges:  # as QuantizationAwareTraining(shared_ranges=True) ties them
        tie_input_ranges(model, shared_range_groups(model))
    summary = export_onnx(model, tmp_path / "model.onnx", calibration)
    return model, prototypes, summary.path


def _agrees(model, prototypes, path) -> None:
    labels = torch.randint(0, 10, (INPUTS,))
    x = _inputs(prototypes, labels)
    with torch.no_grad():
        expected = model(x)
    assert float((expected.argmax(1) == labels).float().mean()) > 0.9  # the model is decisive
    got = torch.from_numpy(exact_session(path, threads=1).run(None, {"input": x.numpy()})[0])
    assert float((got.argmax(1) == expected.argmax(1)).float().mean()) >= 0.99
    assert float((got - expected).abs().mean() / expected.abs().mean()) < 0.1


@pytest.mark.parametrize("shared_ranges", [False, True])
def test_shufflenet_concat_and_channel_shuffle_stay_int8(tmp_path, shared_ranges):
    model, prototypes, path = _exported(_small_shufflenet, 150, tmp_path, shared_ranges=shared_ranges)
    nodes, initializers = _optimized(path, tmp_path)
    ops = [node.op_type for node in nodes]
    # The shape arithmetic of chunk and channel_shuffle is folded: nothing measures a tensor at run time.
    assert not {"Shape", "Gather", "Unsqueeze", "Div"} & set(ops)
    assert "Concat" not in ops and ops.count("QLinearConcat") == 6  # one per block
    # Concats, shuffles and slices run on int8 from the first conv to the head's mean. With a learned range
    # per branch conv the tensor each branch reads carries that range (no dequantize -> quantize pair);
    # the Concats requantize their inputs then, and copy bytes when the branches share one range.
    assert _dequantized_readers(nodes, initializers) == ["ReduceMean"]
    copies = [_copies_bytes(node, initializers) for node in nodes if node.op_type == "QLinearConcat"]
    assert all(copies) if shared_ranges else not any(copies)
    _agrees(model, prototypes, path)


class _InvertedResidual(nn.Module):
    """MobileNetV2's block: the input feeds the block's first conv and the residual Add after it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        wide = 2 * channels
        self.body = nn.Sequential(nn.Conv2d(channels, wide, 1), nn.BatchNorm2d(wide), nn.ReLU6(),
                                  nn.Conv2d(wide, wide, 3, padding=1, groups=wide), nn.BatchNorm2d(wide), nn.ReLU6(),
                                  nn.Conv2d(wide, channels, 1), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _small_mobilenet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(), _InvertedResidual(16),
                         _InvertedResidual(16), _InvertedResidual(16), nn.Conv2d(16, 10, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


def test_residual_adds_are_not_requantized_for_the_next_block(tmp_path):
    model, prototypes, path = _exported(_small_mobilenet, 150, tmp_path)
    nodes, initializers = _optimized(path, tmp_path)
    ops = [node.op_type for node in nodes]
    assert ops.count("QLinearAdd") == 3 and "Add" not in ops
    # Each block's input is read by its first conv and by its Add: one quantization, the conv's learned one,
    # serves both, so no dequantize -> quantize pair sits between an Add and the next block.
    assert _dequantized_readers(nodes, initializers) == ["GlobalAveragePool"]
    _agrees(model, prototypes, path)


class _ReluFirstBlock(nn.Module):
    """Xception's block: ReLU -> conv -> BN on the branch, added to the input or to a strided 1x1 conv of it."""

    def __init__(self, channels: int, out: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, out, 3, stride, 1), nn.BatchNorm2d(out))
        self.shortcut = (nn.Sequential(nn.Conv2d(channels, out, 1, stride), nn.BatchNorm2d(out)) if stride > 1
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x) + self.shortcut(x)


def _small_xception() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), _ReluFirstBlock(16, 16, 1),
                         _ReluFirstBlock(16, 32, 2), _ReluFirstBlock(32, 32, 1), nn.ReLU(), nn.Conv2d(32, 10, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_relus_after_residual_sums_are_int8_lookups(tmp_path):
    model, prototypes, path = _exported(_small_xception, 150, tmp_path)
    nodes, initializers = _optimized(path, tmp_path)
    ops = [node.op_type for node in nodes]
    # Each ReLU that reads a sum and feeds a conv is one int8 table lookup, not a dequantize -> quantize
    # pair; the sum feeds the strided shortcut conv at the range that conv learned.
    assert ops.count("QLinearLeakyRelu") == 4 and ops.count("QLinearAdd") == 3
    assert _dequantized_readers(nodes, initializers) == ["GlobalAveragePool"]
    _agrees(model, prototypes, path)


def _small_squeezenet() -> nn.Module:
    """SqueezeNet 1.1's layout (fire modules, ceil-mode max pooling, a conv head before global pooling), smaller,
    and without the ReLU on the logits, which keeps a network this small from learning in a few steps."""
    from torchvision.models.squeezenet import Fire

    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(inplace=True), Fire(32, 8, 16, 16),
                         Fire(32, 8, 16, 16), nn.MaxPool2d(3, 2, ceil_mode=True), Fire(32, 16, 32, 32),
                         nn.Conv2d(64, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _fire_graph_is_int8(path, tmp_path, fires: int, convs: int) -> None:
    nodes, initializers = _optimized(path, tmp_path)
    ops = [node.op_type for node in nodes]
    assert ops.count("QLinearConcat") == fires and ops.count("QLinearConv") == convs and "Concat" not in ops
    assert all(_copies_bytes(node, initializers) for node in nodes if node.op_type == "QLinearConcat")
    assert "MaxPool" not in ops  # ONNX Runtime's channels-last int8 max pooling runs them
    assert _dequantized_readers(nodes, initializers) == ["GlobalAveragePool"]  # only the head leaves int8


def test_squeezenet_fire_modules_and_pooling_stay_int8(tmp_path):
    model, prototypes, path = _exported(_small_squeezenet, 400, tmp_path)
    _fire_graph_is_int8(path, tmp_path, fires=3, convs=11)
    _agrees(model, prototypes, path)


def test_squeezenet1_1_graph_stays_int8(tmp_path):
    torch.manual_seed(0)
    model = create_model("squeezenet1_1", num_classes=10).eval()  # random weights: only the graph is checked
    _quantize(model, 8, None)
    calibration = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    calibrate(model, calibration)
    _fire_graph_is_int8(export_onnx(model, tmp_path / "model.onnx", calibration).path, tmp_path, fires=8, convs=26)


class Shuffle(nn.Module):
    def forward(self, x):
        return torchvision.models.shufflenetv2.channel_shuffle(torch.relu(x), 2).chunk(2, dim=1)[1] * 2


def test_fold_shapes_keeps_the_function_at_every_batch():
    buffer = io.BytesIO()
    torch.onnx.export(Shuffle(), (torch.randn(1, 8, 4, 4),), buffer, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}}, opset_version=17, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    assert any(node.op_type == "Shape" for node in model.graph.node)
    assert fold_shapes(model, np.random.randn(1, 8, 4, 4).astype(np.float32)) > 0
    assert not {"Shape", "Gather", "Unsqueeze"} & {node.op_type for node in model.graph.node}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 4, 9):
        x = torch.randn(batch, 8, 4, 4)
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], Shuffle()(x).numpy(), rtol=1e-6)


def test_fold_shapes_leaves_what_depends_on_the_batch_otherwise():
    class Batchwise(nn.Module):
        def forward(self, x):  # the slice's end is half the batch: not a constant, not a Reshape's -1
            return x[: x.shape[0] // 2 + 1]

    buffer = io.BytesIO()
    torch.onnx.export(Batchwise(), (torch.randn(2, 3),), buffer, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}}, opset_version=17, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    fold_shapes(model, np.random.randn(1, 3).astype(np.float32))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (2, 6):
        x = torch.randn(batch, 3)
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], Batchwise()(x).numpy())


def test_seven_bit_weights_run_exactly_in_a_default_session(tmp_path):
    """With weights in [-63, 63] a pair of u8 x s8 products fits in 16 bits: ONNX Runtime's default kernels
    compute what the file describes also on x86 CPUs without VNNI, where 8-bit weights saturate (the README's
    advice for such targets; on other CPUs both sessions agree anyway)."""
    torch.manual_seed(0)
    model = _small_mobilenet().eval()
    _quantize(model, 7, None)
    calibration = [torch.randn(16, *SHAPE) for _ in range(2)]
    calibrate(model, calibration)
    path = export_onnx(model, tmp_path / "model.onnx", calibration).path
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    default = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = torch.randn(32, *SHAPE).numpy()
    assert np.array_equal(default.run(None, {"input": x})[0], exact_session(path, threads=1).run(None, {"input": x})[0])
