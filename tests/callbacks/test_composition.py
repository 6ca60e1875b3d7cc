"""Decomposition, pruning and quantization in one Trainer, in the documented order."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import (
    DigitsDataModule,
    ImageClassifier,
    IterativePruning,
    QuantizationAwareTraining,
    TensorDecomposition,
    WeightSharing,
    compression_report,
)
from lightning_compress.methods.decomposition import Factorized
from lightning_compress.methods.pruning.masks import is_masked
from lightning_compress.methods.quantization import is_quantized
from tests.ort_sessions import exact_session


def _stack(finalize=False):
    return [
        TensorDecomposition(method="tucker", rank="energy:0.8", rank_multiple=4, print_table=False),
        IterativePruning(sparsity=0.6, schedule="agp", start_epoch=0, end_epoch=2, frequency=5, scope="global",
                         finalize=finalize),
        QuantizationAwareTraining(weight_bits=8, activation_bits=8, start_epoch=1),
    ]


def _trainer(callbacks, max_epochs=3, **kwargs):
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", max_epochs=max_epochs, callbacks=callbacks, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def _module():
    pl.seed_everything(0)
    return ImageClassifier("digits_cnn", optimizer="adamw", lr=0.01)


def test_decompose_then_prune_the_factors_then_quantize(tmp_path):
    module = _module()
    data = DigitsDataModule(batch_size=64)
    trainer = _trainer([*_stack(), ModelCheckpoint(dirpath=tmp_path, filename="last")], enable_checkpointing=True)
    trainer.fit(module, datamodule=data)
    layer = module.model.features[3]
    assert isinstance(layer, Factorized)
    core = layer.core
    assert is_masked(core) and is_quantized(core)
    # Pruned weights quantize to exact zeros; kept ones to the int8 grid.
    q = core.quantized_weight().detach()
    assert torch.all(q[~core.weight_mask] == 0)
    report = compression_report(module.model, input_size=(1, 8, 8))
    assert 0.5 < report.sparsity < 0.7 and report.bits_per_weight == 8
    expected = trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"]
    assert expected > 0.6

    # A fresh dense model and the same callbacks: the factors come back with their masks and ranges.
    fresh = _module()
    got = _trainer(_stack()).test(fresh, datamodule=data, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    assert got[0]["test/acc"] == pytest.approx(expected)
    assert is_masked(fresh.model.features[3].core) and is_quantized(fresh.model.features[3].core)


def test_pruning_folds_its_masks_at_fit_end_under_quantization():
    module = _module()
    _trainer(_stack(finalize=True), max_epochs=2).fit(module, datamodule=DigitsDataModule(batch_size=64))
    core = module.model.features[3].core
    assert is_quantized(core) and not is_masked(core)  # the mask became exact zeros
    assert float((core.weight == 0).float().mean()) > 0.3
    assert torch.all(core.quantized_weight()[core.weight == 0] == 0)


def test_onnx_export_of_a_pruned_quantized_model(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "m.onnx"
    stack = [
        IterativePruning(sparsity=0.5, schedule="one_shot", start_epoch=0, scope="global"),
        QuantizationAwareTraining(weight_bits=8, activation_bits=8, export=str(path), calibration_batches=4),
    ]
    module = _module()
    data = DigitsDataModule(batch_size=64)
    _trainer(stack, max_epochs=2).fit(module, datamodule=data)
    assert _onnx_agreement(ort, path, module, data) >= 0.98


@pytest.mark.parametrize(
    "callbacks, message",
    [
        (lambda: [QuantizationAwareTraining(), IterativePruning(sparsity=0.5)], r"put them in the order \['IterativePruning', 'QuantizationAwareTraining'\]"),
        (lambda: [IterativePruning(sparsity=0.5), TensorDecomposition()], r"put them in the order \['TensorDecomposition', 'IterativePruning'\]"),
        (lambda: [QuantizationAwareTraining(), WeightSharing(weight_bits=4)], r"use one of them"),
        (lambda: [TensorDecomposition(start_epoch=1), IterativePruning(sparsity=0.5)], r"use start_epoch=0 when composing"),
        (lambda: [IterativePruning(sparsity=0.5, structure="filter"), QuantizationAwareTraining()], r"structure='unstructured'"),
    ],
)
def test_unsupported_compositions_are_refused_before_any_work(callbacks, message):
    with pytest.raises(ValueError, match=message):
        _trainer(callbacks(), max_epochs=1).fit(_module(), datamodule=DigitsDataModule())


def test_onnx_export_of_a_decomposed_pruned_quantized_model(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "m.onnx"
    stack = _stack(finalize=True)
    stack[-1] = QuantizationAwareTraining(weight_bits=8, activation_bits=8, export=str(path), calibration_batches=4)
    module = _module()
    data = DigitsDataModule(batch_size=64)
    _trainer(stack, max_epochs=2).fit(module, datamodule=data)
    assert qat_folded_every_batchnorm(path)
    assert _onnx_agreement(ort, path, module, data) >= 0.98


def _onnx_agreement(ort, path, module, data) -> float:
    """Share of a test batch on which ONNX Runtime's top-1 equals the fake-quant model's."""
    session = exact_session(path)
    data.setup("test")
    images, _ = next(iter(data.test_dataloader()))
    module.eval()
    with torch.no_grad():
        expected = module.model(images).argmax(1)
    got = torch.from_numpy(session.run(None, {"input": images.numpy()})[0]).argmax(1)
    return float((got == expected).float().mean())


def qat_folded_every_batchnorm(path) -> bool:
    import onnx

    return not any(node.op_type == "BatchNormalization" for node in onnx.load(str(path)).graph.node)
