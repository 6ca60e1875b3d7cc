"""Nothing silently does nothing: what a callback cannot do is refused in setup with the reason and the fix,
and a schedule the fit cannot hold is said in numbers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from lightning_compress import IterativePruning, QuantizationAwareTraining, TensorDecomposition, WeightSharing
from lightning_compress.callbacks.composition import check_composition

from .models import UserClassifier, loader
from .test_entry_points import _trainer


def test_a_frequency_longer_than_the_ramp_warns_with_the_numbers_and_still_reaches_the_sparsity():
    # The case of the report: 4 steps an epoch here, 16 there; frequency=100 left every layer at 0%.
    pruning = IterativePruning(sparsity=0.8, schedule="agp", start_epoch=0, end_epoch=2, finalize=False)
    with pytest.warns(UserWarning, match=r"frequency=100.*ramp from epoch 0 to 2 has 8 steps \(4 per epoch\)"):
        _trainer([pruning], max_epochs=3).fit(UserClassifier("mlp"), loader("mlp"))
    assert pruning.sparsity_now() == pytest.approx(0.8, abs=0.01)


@pytest.mark.parametrize(
    "callback, message",
    [
        (IterativePruning(sparsity=0.5, start_epoch=3, end_epoch=5), r"start_epoch=3\) never prunes: fit has max_epochs=3"),
        (IterativePruning(sparsity=0.5, start_epoch=0, end_epoch=3), r"end_epoch=3\) reaches sparsity 0.5 .* max_epochs=3"),
        (QuantizationAwareTraining(start_epoch=3), r"start_epoch=3\) never fake-quantizes"),
        (TensorDecomposition(method="svd", start_epoch=3), r"start_epoch=3\) never factorizes"),
        (WeightSharing(start_epoch=3), r"start_epoch=3\) is after the fit's last epoch"),
    ],
)
def test_an_epoch_past_the_fit_warns_in_setup(callback, message):
    with pytest.warns(UserWarning, match=message):
        _trainer([callback], max_epochs=3).fit(UserClassifier("mlp"), loader("mlp"))


@pytest.mark.parametrize(
    "callback, message",
    [
        (IterativePruning(sparsity=0.5, schedule="one_shot", start_epoch=5), "IterativePruning pruned nothing in this fit"),
        (QuantizationAwareTraining(start_epoch=5), "QuantizationAwareTraining never fake-quantized in this fit"),
        (TensorDecomposition(method="svd", start_epoch=5), "TensorDecomposition never factorized in this fit"),
    ],
)
def test_a_fit_that_compressed_nothing_says_so_at_its_end(callback, message):
    with pytest.warns(UserWarning, match=message):
        _trainer([callback], max_epochs=2).fit(UserClassifier("mlp"), loader("mlp"))


@pytest.mark.parametrize(
    "network, callback, message",
    [
        ("mlp", TensorDecomposition(method="tucker"),
         r"no layer that 'tucker' considers; its weights are in Linear\. For those, use method='svd'"),
        ("torch_transformer", QuantizationAwareTraining(targets=["net.encoder.layers.0.self_attn.out_proj"]),
         r"reads its out_proj weight directly; the layer's own forward never runs"),
        ("torch_transformer", TensorDecomposition(method="svd", targets=["*.out_proj"]), r"out_proj.*never runs"),
        ("conv1d", QuantizationAwareTraining(targets=["net.features.1"]),
         r"targets=\['net.features.1'\] match no Conv1d/Conv2d/Linear layer; candidates are: net.features.0"),
        ("small_cnn", IterativePruning(targets=["net.99"]), r"targets=\['net.99'\] match no Conv/Linear layer; candidates are: net.0"),
    ],
)
def test_what_a_callback_cannot_do_is_refused_in_setup_with_the_reason_and_the_fix(network, callback, message):
    with pytest.raises(ValueError, match=message):
        _trainer([callback], max_epochs=1).fit(UserClassifier(network), loader(network))


def test_the_layers_left_as_they_are_and_why(caplog):
    """nn.TransformerEncoderLayer's attention keeps its in-projection as a Parameter and reads out_proj directly."""
    with caplog.at_level("INFO"):
        _trainer([QuantizationAwareTraining()], max_epochs=1).fit(UserClassifier("torch_transformer"), loader("torch_transformer"))
    line = next(r.getMessage() for r in caplog.records if "left as they are" in r.getMessage())
    assert "net.encoder.layers.0.self_attn.in_proj_weight: a Parameter of MultiheadAttention" in line
    assert "net.encoder.layers.0.self_attn.out_proj.weight" in line and "never runs" in line


def test_sharded_strategies_are_refused_by_name():
    trainer = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[IterativePruning()])
    with pytest.raises(ValueError, match=r"FSDPStrategy shards the weights.*Use strategy='ddp'"):
        check_composition(trainer)


@pytest.mark.parametrize("network", ["resnet18", "mobilenet_v3_small", "mlp", "conv1d", "linear_transformer", "torch_transformer"])
@pytest.mark.parametrize("kind", ["pruning", "quantization", "decomposition", "sharing"])
def test_each_callback_with_every_default(network, kind):
    """The callbacks exactly as constructed with no argument: they work, or say in setup why not and what to do."""
    from lightning_compress.methods.decomposition import Factorized
    from lightning_compress.methods.quantization import is_quantized

    module = UserClassifier(network)
    if kind == "pruning":
        # Epochs 0 to 10 with an update every 100 steps, on 4 steps an epoch and a 3-epoch fit: every
        # problem is said, and that nothing was pruned.
        with pytest.warns(UserWarning) as warned:
            _trainer([IterativePruning()], max_epochs=3).fit(module, loader(network))
        said = " ".join(str(w.message) for w in warned)
        assert "end_epoch=10) reaches sparsity 0.5" in said and "frequency=100" in said
        assert "IterativePruning pruned nothing in this fit" in said
    elif kind == "quantization":
        _trainer([QuantizationAwareTraining()], max_epochs=1).fit(module, loader(network))
        assert any(is_quantized(m) for m in module.modules())
    elif kind == "decomposition":  # Tucker-2 of KxK convolutions, energy 0.9
        if network in ("mlp", "linear_transformer", "torch_transformer", "conv1d"):
            with pytest.raises(ValueError, match=r"no layer that 'tucker' considers.*use method='svd'"):
                _trainer([TensorDecomposition()], max_epochs=1).fit(module, loader(network))
        else:
            _trainer([TensorDecomposition(print_table=False)], max_epochs=1).fit(module, loader(network))
            assert any(isinstance(m, Factorized) for m in module.modules())
    else:  # 5 bits, shared at fit end
        _trainer([WeightSharing()], max_epochs=1).fit(module, loader(network))
        weights = [m.weight for m in module.modules() if isinstance(m, torch.nn.Linear) and type(m) is torch.nn.Linear]
        assert weights and all(w.unique().numel() <= 32 for w in weights)
