"""Each callback's layers (masks, fake quantization, factorized chains, codebooks) train under torch.compile
as they do in eager mode: ``ImageClassifier(compile=True)`` against the same run uncompiled.

torch.compile runs with the aot_eager backend: dynamo and AOTAutograd (what sees the class swaps, buffers,
custom autograd functions and a structure changed mid-fit) without inductor's code generation, which takes
minutes on two cores; the GPU benchmark compiles with inductor.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch._dynamo.utils import counters

from lightning_compress import (DigitsDataModule, ImageClassifier, IterativePruning, QuantizationAwareTraining,
                                TensorDecomposition, WeightSharing)

CALLBACKS = {
    "dns pruning": lambda: [IterativePruning(sparsity=0.8, schedule="agp", start_epoch=0, end_epoch=2, frequency=2,
                                             rehabilitation=True)],
    "filter pruning": lambda: [IterativePruning(sparsity=0.5, schedule="one_shot", start_epoch=1, structure="filter",
                                                channel_multiple=1)],
    "qat w4 per-channel": lambda: [QuantizationAwareTraining(weight_bits=4, per_channel=True, freeze_observers_epoch=2)],
    "tucker at epoch 1": lambda: [TensorDecomposition(method="tucker", rank=0.5, rank_multiple=1, start_epoch=1,
                                                      print_table=False)],
    "kmeans sharing": lambda: [WeightSharing(weight_bits=4, start_epoch=1)],
}


def _fit(callbacks, compile: bool) -> ImageClassifier:
    pl.seed_everything(0)
    module = ImageClassifier("digits_cnn", lr=0.02, compile=compile)
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=4, limit_val_batches=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    return module


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_training_under_torch_compile_matches_eager(name, monkeypatch):
    compiled_calls = []
    real_compile = torch.compile

    def aot_eager(model, mode=None):
        compiled_calls.append(model)
        return real_compile(model, backend="aot_eager")

    eager = _fit(CALLBACKS[name](), compile=False)
    monkeypatch.setattr(torch, "compile", aot_eager)
    torch._dynamo.reset()
    counters.clear()
    compiled = _fit(CALLBACKS[name](), compile=True)
    assert compiled_calls, "the network was never compiled"
    # A break splits the graph (and on a GPU, its CUDA graph): each one is a host round trip per step.
    assert dict(counters["graph_break"]) == {}
    eager_state, compiled_state = eager.model.state_dict(), compiled.model.state_dict()
    assert list(compiled_state) == list(eager_state)  # the compiled wrapper is not in the module tree
    for key, value in eager_state.items():
        if not isinstance(value, torch.Tensor):  # a fake-quant layer's extra state: its formats
            assert compiled_state[key] == value, key
        elif value.is_floating_point():
            assert torch.allclose(compiled_state[key], value, rtol=1e-3, atol=1e-4), key
        else:
            assert torch.equal(compiled_state[key], value), key
