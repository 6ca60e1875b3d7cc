"""``export_onnx`` on the architectures QAT accepts: torchvision ResNet-18 (BatchNorm as attributes, not
in an ``nn.Sequential``) and MobileNetV3-small (hardswish, squeeze-excitation, adaptive pooling), an MLP, a
transformer classifier (Linear layers on 3-D token inputs, LayerNorm, GELU), a model with only some of its
layers quantized, and one with a factorized conv and a pruned one.

Each model is first trained briefly to tell noisy copies of ten random prototypes apart, so that top-1
agreement between ONNX Runtime and the fake-quant model measures the export, not near-ties between the
logits of a random network (which also amplifies any perturbation layer after layer). Every quantized
layer must read the integers it was trained with from an int8 initializer, and the other layers stay float.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.methods.decomposition.factorize import tucker2
from lightning_compress.methods.pruning.masks import add_mask, set_mask
from lightning_compress.methods.quantization import Format, calibrate, is_quantized, quantize_layer
from lightning_compress.methods.quantization import onnx_graph
from lightning_compress.methods.quantization.export import export_onnx, fold_batchnorm
from tests.ort_sessions import exact_session
from tests.users.models import LinearTransformer

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
torchvision = pytest.importorskip("torchvision")

INPUTS = 256


@pytest.fixture(autouse=True)
def one_thread():
    """Small models on shared cores: two threads that wait for each other are many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _session(path, exact: bool):
    """ONNX Runtime on the CPU. ``exact``: without the 16-bit saturation of x86 u8 x s8 kernels (see
    :func:`tests.ort_sessions.exact_session`), i.e. the arithmetic the file describes."""
    if exact:
        return exact_session(path, threads=1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class SmallNet(nn.Module):
    """Conv / BatchNorm pairs held as attributes, as ResNet's stem is."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _composed() -> nn.Module:
    """A Tucker-factorized conv (a chain of three) followed by BatchNorm, and a pruned conv."""
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, bias=False),
                        nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():
        net[2] = tucker2(net[2], 8, 8)
    add_mask(net[5])
    set_mask(net[5], torch.rand_like(net[5].weight) > 0.5)
    return net


def _inputs(prototypes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return prototypes[labels] + 0.5 * torch.randn(len(labels), *prototypes.shape[1:])


def _decisive(model: nn.Module, prototypes: torch.Tensor, steps: int, lr: float) -> None:
    """Train ``model`` to tell noisy copies of the class prototypes apart: a classifier robust to that
    noise has margins far above quantization noise (a random network amplifies any perturbation)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        labels = torch.randint(0, 10, (32,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(_inputs(prototypes, labels)), labels).backward()
        optimizer.step()
    # Eval-mode statistics of the trained model (torchvision's MobileNet moves them by 1% a step).
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the batches below
        for _ in range(4):
            model(_inputs(prototypes, torch.randint(0, 10, (64,))))
    model.eval()


def _quantize(model: nn.Module, weight_bits: int, only: set[str] | None, activations: str = "affine") -> list[str]:
    names = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and (only is None or name in only):
            quantize_layer(module, Format(weight_bits, "symmetric"), Format(8, activations))
            names.append(name)
    return names


def _int8_weights(graph) -> list[torch.Tensor]:
    """The int8 initializers that Conv / Gemm / MatMul nodes read through a DequantizeLinear."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    found = []
    for node in graph.node:
        dq = producer.get(node.input[1]) if node.op_type in ("Conv", "Gemm", "MatMul") else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in initializers:
            value = numpy_helper.to_array(initializers[dq.input[0]])
            if value.dtype.name == "int8":
                found.append(torch.from_numpy(value.copy()))
    return found


CASES = {  # model, input shape, the layers to quantize (None: all), training steps, learning rate
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (3, 32, 32), None, 30, 1e-3),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=10), (3, 32, 32),
                           None, 100, 1e-3),
    "mlp": (lambda: nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 10)),
            (48,), None, 100, 3e-3),
    "transformer": (lambda: LinearTransformer(classes=10), (6, 12), None, 100, 3e-3),
    "subset": (SmallNet, (3, 16, 16), {"conv2", "fc"}, 150, 3e-3),
    "factorized_pruned": (_composed, (3, 16, 16), None, 150, 3e-3),
}


@pytest.mark.parametrize("case, weight_bits, activations", [*((name, 8, "affine") for name in CASES), ("mlp", 4, "affine"),
                                                            ("subset", 4, "affine"), ("factorized_pruned", 8, "symmetric")])
def test_export_agrees_with_the_fake_quant_model_and_is_int8(case, weight_bits, activations, tmp_path):
    build, shape, only, steps, lr = CASES[case]
    torch.manual_seed(0)
    model, prototypes = build(), torch.randn(10, *shape)
    _decisive(model, prototypes, steps, lr)
    names = _quantize(model, weight_bits, only, activations)
    calibration = [_inputs(prototypes, torch.randint(0, 10, (32,))) for _ in range(4)]
    calibrate(model, calibration)
    summary = export_onnx(model, tmp_path / "model.onnx", calibration)
    assert summary.quantized_layers == len(names) and summary.int8_bytes < summary.fp32_bytes
    assert all(is_quantized(model.get_submodule(name)) for name in names)  # the export worked on a copy

    labels = torch.randint(0, 10, (INPUTS,))
    x = _inputs(prototypes, labels)
    with torch.no_grad():
        expected = model(x)
    assert float((expected.argmax(1) == labels).float().mean()) > 0.9  # the model is decisive
    # The file's arithmetic: the fake-quant model's, plus the rounding of tensors that QAT left in float
    # and the int8 kernels need quantized (a conv's output, a residual sum).
    got = torch.from_numpy(_session(summary.path, exact=True).run(None, {"input": x.numpy()})[0])
    assert float((got.argmax(1) == expected.argmax(1)).float().mean()) >= 0.99
    assert float((got - expected).abs().mean() / expected.abs().mean()) < 0.1
    # The default kernels: on x86 without VNNI their saturation costs 8-bit weights some accuracy.
    got = torch.from_numpy(_session(summary.path, exact=False).run(None, {"input": x.numpy()})[0])
    assert float((got.argmax(1) == expected.argmax(1)).float().mean()) >= 0.95

    # Each quantized layer's trained integers are in the file, and only those layers are int8.
    stored = _int8_weights(onnx.load(str(summary.path)).graph)
    assert len(stored) == len(names)
    for name in names:
        layer = model.get_submodule(name)
        scale, _ = layer.weight_scale_zero_point()
        trained = torch.round(layer.quantized_weight().detach() / scale.reshape(-1, *[1] * (layer.weight.dim() - 1)))
        assert int(trained.abs().max()) <= 2 ** (weight_bits - 1) - 1
        assert any(_same_integers(w, trained) for w in stored), f"{name}: no int8 weight holds its trained integers"


def _same_integers(stored: torch.Tensor, trained: torch.Tensor) -> bool:
    """Equal as a conv / Gemm weight or as a transposed MatMul one. Folding BatchNorm scales a channel (its
    sign may flip) and re-rounds: an integer on a rounding tie may move by one."""
    if stored.numel() != trained.numel():
        return False
    trained = trained.reshape(len(trained), -1).abs()
    for candidate in (stored.reshape(trained.shape), stored.T.reshape(trained.shape) if stored.dim() == 2 else None):
        if candidate is not None:
            diff = (candidate.float().abs() - trained).abs()
            if diff.max() <= 1 and float((diff > 0).float().mean()) < 1e-4:
                return True
    return False


def test_batchnorm_after_a_conv_held_as_an_attribute_is_folded_exactly():
    torch.manual_seed(0)
    model = SmallNet()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(-2, 2)
    _quantize(model, 4, None)
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    expected = model(x)
    assert fold_batchnorm(model) == 2 and isinstance(model.bn1, nn.Identity) and isinstance(model.bn2, nn.Identity)
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_a_model_that_does_not_trace_folds_by_the_sequential_rule():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))

        def forward(self, x):
            return self.body(x) if x.sum() > 0 else -self.body(x)  # data-dependent: torch.fx cannot trace it

    model = Branchy()
    _quantize(model, 8, None)
    assert fold_batchnorm(model.eval()) == 1 and isinstance(model.body[1], nn.Identity)


def test_a_layer_that_cannot_be_located_is_named():
    import io

    model = nn.Sequential(nn.Linear(4, 3))
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.randn(1, 4),), buffer, input_names=["input"], dynamo=False)
    graph = onnx.load_from_string(buffer.getvalue())  # exported without the markers
    scale, _ = quantize_layer(model[0], Format(8, "symmetric"), None).weight_scale_zero_point()
    with pytest.raises(ValueError, match=r"^0: its weight does not reach a Conv / Gemm / MatMul"):
        onnx_graph.locate(graph, ["0"], {"0": onnx_graph.Expected("linear", scale.numpy(), None)})


def test_a_layer_left_in_float_is_named(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    _quantize(model, 8, None)
    calibrate(model, [torch.randn(8, 4)])
    export_onnx(model, tmp_path / "m.onnx", [torch.randn(8, 4)])
    graph = onnx.load(str(tmp_path / "m.onnx"))
    # What ONNX Runtime would write had it skipped the layer: its weight a float initializer.
    sites = [onnx_graph.Site("0", next(n.name for n in graph.graph.node if n.op_type == "Gemm"), "Gemm", 0, None, None)]
    gemm = next(n for n in graph.graph.node if n.op_type == "Gemm")
    gemm.input[1] = next(i.name for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    scale, _ = model[0].weight_scale_zero_point()
    with pytest.raises(ValueError, match=r"^0: ONNX Runtime left its weight in float"):
        onnx_graph.check_int8(graph, sites, {"0": onnx_graph.Expected("linear", scale.numpy(), None)})


def test_layers_reading_one_tensor_keep_their_own_ranges(tmp_path):
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            return self.a(x) + self.b(x)

    torch.manual_seed(0)
    model = Two()
    _quantize(model, 8, None)
    calibrate(model, [torch.randn(64, 8)])
    model.b.activation_max.mul_(2)  # as if b had observed other batches
    summary = export_onnx(model, tmp_path / "m.onnx", [torch.randn(64, 8)])
    from onnx import numpy_helper

    graph = onnx.load(str(summary.path)).graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    gemms = [node for node in graph.node if node.op_type == "Gemm"]
    scales = sorted(float(initializers[producer[node.input[0]].input[1]]) for node in gemms)
    learned = sorted(float(layer.activation_scale_zero_point()[0]) for layer in (model.a, model.b))
    assert scales == pytest.approx(learned, rel=1e-6) and learned[1] > 1.5 * learned[0]
