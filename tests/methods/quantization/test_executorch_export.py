"""``export_executorch`` and ``QuantizationAwareTraining(export_executorch=...)``: the ``.pte`` program runs
in ``executorch.runtime`` (XNNPACK) and its top-1 agrees with the fake-quant model on at least 99% of the
inputs; every quantized layer is an XNNPACK int8 kernel whose per-channel int8 weights are the integers
QAT trained (pruned zeros included), and layers that QAT left in float stay float.

Each model is first trained briefly to tell noisy copies of ten random prototypes apart, so that
agreement measures the export rather than near-ties between the logits of a random network. The tests
that run ExecuTorch need the ``edge`` extra and skip without it; the argument checks run everywhere.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from lightning_compress import DigitsDataModule, ImageClassifier, QuantizationAwareTraining
from lightning_compress.methods.decomposition.factorize import tucker2
from lightning_compress.methods.pruning.masks import add_mask, set_mask
from lightning_compress.methods.quantization import Format, calibrate, quantize_layer

INPUTS = 256
NO_EDGE = "the 'edge' extra (executorch) is not installed: pip install -e '.[edge]'"


@pytest.fixture
def runtime():
    pytest.importorskip("executorch", reason=NO_EDGE)
    from executorch.runtime import Runtime

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models on shared cores
    yield Runtime.get()
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ models


class ResidualNet(nn.Module):
    """Conv / BatchNorm pairs held as attributes, a residual sum (one tensor read by a conv and an add),
    max pooling and a global average pool before the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _pruned() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU6(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))
    torch.manual_seed(1)
    for index in (2, 6):
        add_mask(net[index])
        set_mask(net[index], torch.rand_like(net[index].weight) > 0.6)  # 60% pruned, trained with the mask on
    return net


def _factorized() -> nn.Module:
    """A Tucker-2 conv (a chain of three) followed by BatchNorm."""
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, bias=False),
                        nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():
        net[2] = tucker2(net[2], 8, 8)
    return net


CASES = {  # model, layers to quantize (None: all), training steps, learning rate
    "cnn_batchnorm": (ResidualNet, None, 150, 3e-3),
    "pruned": (_pruned, None, 150, 2e-3),
    "factorized": (_factorized, None, 150, 3e-3),
    "subset": (ResidualNet, {"conv2", "fc"}, 150, 3e-3),
}
SHAPE = (3, 16, 16)


def _inputs(prototypes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return prototypes[labels] + 0.5 * torch.randn(len(labels), *prototypes.shape[1:])


def _decisive(model: nn.Module, prototypes: torch.Tensor, steps: int, lr: float) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        labels = torch.randint(0, 10, (32,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(_inputs(prototypes, labels)), labels).backward()
        optimizer.step()
    model.eval()


def _quantize(model: nn.Module, weight_bits: int, only: set[str] | None, activations: str) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and (only is None or name in only):
            quantize_layer(module, Format(weight_bits, "symmetric"), Format(8, activations))
            names.append(name)
    return names


def _run(runtime, path: Path, x: torch.Tensor) -> torch.Tensor:
    """The program is specialised to batch 1: one input at a time."""
    method = runtime.load_program(path).load_method("forward")
    return torch.cat([method.execute([x[i:i + 1].contiguous()])[0] for i in range(len(x))])


# ------------------------------------------------------------------------------ reading the program


def _xnnpack_kernels(path: Path) -> list[dict]:
    """Convolutions and fully connected nodes of the program's XNNPACK graphs: the datatypes of their
    input and filter, and the filter's constant bytes as rows along its channel axis."""
    from executorch.backends.xnnpack.serialization import xnnpack_graph_serialize
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._program import deserialize_pte_binary
    import executorch.data.bin as flatc_folder

    pte = deserialize_pte_binary(path.read_bytes())
    program = pte.program
    named = pte.named_data
    schema = Path(xnnpack_graph_serialize.__file__).parent / "schema.fbs"
    flatc = Path(flatc_folder.__file__).parent / "flatc"
    kernels = []
    for delegate in program.execution_plan[0].delegates:
        assert delegate.id == "XnnpackBackend"
        payload = program.backend_delegate_data[delegate.processed.index].data
        header = XNNHeader.from_bytes(payload[:XNNHeader.EXPECTED_LENGTH])
        graph_bytes = payload[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size]
        folder = path.parent / f"{path.stem}_xnn{len(kernels)}"
        folder.mkdir(exist_ok=True)
        (folder / "graph.bin").write_bytes(graph_bytes)
        subprocess.run([str(flatc), "--json", "--strict-json", "--raw-binary", "--defaults-json", "-o", str(folder),
                        str(schema), "--", str(folder / "graph.bin")], check=True, capture_output=True)
        text = re.sub(r'(?<![\w"])(-?)inf(?![\w"])', r"\1Infinity", (folder / "graph.json").read_text())
        graph = json.loads(text)

        def value(index: int) -> dict:
            entry = graph["xvalues"][index]["xvalue_union"]
            return entry.get("tensor_value", entry) | {"quant": entry.get("quant_params")}

        def constant(tensor: dict) -> bytes:
            key = graph["constant_data"][tensor["constant_buffer_idx"]]["named_key"]
            return bytes(named.buffers[named.pte_data[key].buffer_index])

        for node in graph["xnodes"]:
            kind = node["xnode_union_type"]
            if kind not in ("XNNConv2d", "XNNDepthwiseConv2d", "XNNFullyConnected"):
                continue
            args = node["xnode_union"]
            source, weight = value(args["input1_id"]), value(args["filter_id"])
            row = {"kind": kind, "input": source["datatype"], "filter": weight["datatype"], "dims": weight["dims"],
                   "input_scale": (source["quant"] or {}).get("scale")}
            if weight["datatype"] == "xnn_datatype_qcint8":
                data = np.frombuffer(constant(weight), dtype=np.int8).reshape(weight["dims"])
                row["rows"] = np.moveaxis(data, weight["quant"]["channel_dim"], 0).reshape(weight["dims"][0], -1)
            kernels.append(row)
    return kernels


def _holds_integers(kernels: list[dict], trained: torch.Tensor) -> bool:
    """Some int8 filter holds, channel by channel, the trained integers (in XNNPACK's layout, so compared
    as sorted magnitudes; folding BatchNorm may flip a channel's sign, or move an integer on a rounding
    tie by one)."""
    want = np.sort(np.abs(trained.reshape(len(trained), -1).numpy()), axis=1)
    for kernel in kernels:
        if "rows" in kernel and kernel["rows"].shape == want.shape:
            diff = np.abs(np.sort(np.abs(kernel["rows"].astype(np.int32)), axis=1) - want)
            if diff.max() <= 1 and (diff > 0).mean() < 1e-3:
                return True
    return False


def _trained_integers(layer: nn.Module) -> torch.Tensor:
    scale, _ = layer.weight_scale_zero_point()
    return torch.round(layer.quantized_weight().detach() / scale.reshape(-1, *[1] * (layer.weight.dim() - 1)))


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case, weight_bits, activations", [
    ("cnn_batchnorm", 8, "affine"), ("pruned", 8, "affine"), ("pruned", 4, "affine"),
    ("factorized", 8, "symmetric"), ("subset", 8, "affine")])
def test_program_agrees_with_the_fake_quant_model_and_holds_the_trained_int8_weights(
        runtime, case, weight_bits, activations, tmp_path):
    from lightning_compress.methods.quantization.executorch_export import export_executorch

    build, only, steps, lr = CASES[case]
    torch.manual_seed(0)
    model, prototypes = build(), torch.randn(10, *SHAPE)
    _decisive(model, prototypes, steps, lr)
    names = _quantize(model, weight_bits, only, activations)
    calibration = [_inputs(prototypes, torch.randint(0, 10, (32,))) for _ in range(4)]
    calibrate(model, calibration)
    summary = export_executorch(model, tmp_path / "model.pte", calibration)
    assert summary.path.is_file() and summary.bytes == summary.path.stat().st_size
    assert summary.quantized_layers == len(names)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pte"]  # no partial file left

    labels = torch.randint(0, 10, (INPUTS,))
    x = _inputs(prototypes, labels)
    with torch.no_grad():
        expected = model(x)
    assert float((expected.argmax(1) == labels).float().mean()) > 0.9  # the model is decisive
    got = _run(runtime, summary.path, x)
    assert float((got.argmax(1) == expected.argmax(1)).float().mean()) >= 0.99
    assert float((got - expected).abs().mean() / expected.abs().mean()) < 0.1

    kernels = _xnnpack_kernels(summary.path)
    int8 = [k for k in kernels if k["filter"] == "xnn_datatype_qcint8"]
    assert len(int8) == len(names) and all(k["input"] == "xnn_datatype_qint8" for k in int8)
    # Layers QAT left in float are float XNNPACK kernels; none runs outside XNNPACK.
    assert all(k["filter"] == "xnn_datatype_fp32" for k in kernels if k not in int8)
    assert len(kernels) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    for name in names:
        layer = model.get_submodule(name)
        trained = _trained_integers(layer)
        assert int(trained.abs().max()) <= 2 ** (weight_bits - 1) - 1
        assert _holds_integers(int8, trained), f"{name}: no int8 filter holds its trained integers"
    if case == "pruned":  # the pruned zeros are zeros of the int8 filters
        for index in (2, 6):
            pruned = int((model[index].weight_mask == 0).sum())
            assert any(int((k["rows"] == 0).sum()) >= pruned for k in int8 if k["rows"].size == model[index].weight.numel())


def test_layers_reading_one_tensor_keep_their_own_ranges(runtime, tmp_path):
    from lightning_compress.methods.quantization.executorch_export import export_executorch

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            return self.a(x) + self.b(x)

    torch.manual_seed(0)
    model = Two()
    _quantize(model, 8, None, "affine")
    x = torch.randn(64, 8)
    calibrate(model, [x])
    model.b.activation_max.mul_(2)  # as if b had observed other batches
    summary = export_executorch(model, tmp_path / "m.pte", [x])
    scales = sorted(k["input_scale"] for k in _xnnpack_kernels(summary.path))
    learned = sorted(float(layer.activation_scale_zero_point()[0]) for layer in (model.a, model.b))
    assert scales == pytest.approx(learned, rel=1e-4) and learned[1] > 1.5 * learned[0]  # flatc prints 6 digits
    with torch.no_grad():
        expected = model(x)
    got = _run(runtime, summary.path, x)  # on the calibration inputs: no output beyond its calibrated range
    assert float((got - expected).abs().max()) < 0.05 * float(expected.abs().max())


def test_export_refuses_what_has_no_xnnpack_int8_form(tmp_path):
    from lightning_compress.methods.quantization.executorch_export import export_executorch

    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="no quantized layer"):
        export_executorch(model, tmp_path / "m.pte", [torch.randn(2, 4)])
    quantize_layer(model[0], Format(8, "fixed_point", 2), Format(8, "affine"))
    with pytest.raises(ValueError, match=r"^0: fixed_point 8-bit weights have no XNNPACK int8 form"):
        export_executorch(model, tmp_path / "m.pte", [torch.randn(2, 4)])
    with pytest.raises(ValueError, match=r"export_executorch needs 2\.\.8-bit"):
        QuantizationAwareTraining(scheme="fixed_point", export_executorch="m.pte")
    assert not list(tmp_path.iterdir())


def test_callback_writes_the_program_at_fit_end_under_the_log_directory(runtime, tmp_path):
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, export_executorch="model.pte",
                                    calibration_batches=4)
    pl.seed_everything(0)
    module = ImageClassifier("digits_cnn", optimizer="adamw", lr=0.01)
    data = DigitsDataModule(batch_size=64)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=[qat], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "model.pte"
    assert qat.executorch_artifact.path == path and path.is_file()
    assert qat.summary["executorch_artifact"] == {"path": str(path), "bytes": path.stat().st_size, "quantized_layers": 4}
    assert qat.executorch_artifact.compression_ratio > 2.5
    module.eval()
    data.setup("test")
    agree = total = 0
    for images, _ in data.test_dataloader():
        with torch.no_grad():
            expected = module.model(images).argmax(1)
        agree += int((_run(runtime, path, images).argmax(1) == expected).sum())
        total += len(images)
    assert agree / total >= 0.99
