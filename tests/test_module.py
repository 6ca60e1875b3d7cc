from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_compress import DigitsDataModule, ImageClassifier
from lightning_compress.module import load_weights


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 3)
    return pl.Trainer(
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_fits_digits_and_reports_accuracy(tmp_path):
    pl.seed_everything(0)
    module = ImageClassifier("digits_cnn", optimizer="adamw", lr=0.01, weight_decay=0.01)
    trainer = _trainer(tmp_path, max_epochs=4)
    trainer.fit(module, datamodule=DigitsDataModule())
    assert trainer.callback_metrics["val/acc"] > 0.9
    result = trainer.test(module, datamodule=DigitsDataModule(), verbose=False)[0]
    assert result["test/acc"] > 0.9


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle", "none"])
def test_schedulers_step_per_batch(tmp_path, scheduler):
    module = ImageClassifier("digits_cnn", lr=0.05, scheduler=scheduler, warmup_epochs=0.5)
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=256))
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    if scheduler == "none":
        assert lr == pytest.approx(0.05)
    else:
        assert lr < 0.05 * 0.05  # annealed to (nearly) zero at the last step


def test_no_weight_decay_on_biases_and_norms():
    module = ImageClassifier("digits_cnn", weight_decay=0.1)
    decay, no_decay = module._param_groups()
    assert all(p.ndim > 1 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.parameters()))


def test_weights_from_lightning_checkpoint_and_state_dict(tmp_path):
    source = ImageClassifier("digits_cnn")
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(source, datamodule=DigitsDataModule())
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    plain = tmp_path / "plain.pt"
    torch.save(source.model.state_dict(), plain)
    for path in (ckpt, plain):
        started = ImageClassifier("digits_cnn", weights=str(path))
        for key, value in source.model.state_dict().items():
            assert torch.equal(started.model.state_dict()[key], value), key
    assert ImageClassifier("digits_cnn").hparams.weights is None


def test_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights="):
        load_weights(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.pt"
    torch.save({"epoch": 3}, bad)
    with pytest.raises(ValueError, match="neither a Lightning checkpoint nor a state dict"):
        load_weights(bad)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"optimizer": "lbfgs"}, "optimizer"), ({"scheduler": "step"}, "scheduler"), ({"lr": 0}, "lr"),
     ({"label_smoothing": 1.0}, "label_smoothing"), ({"warmup_epochs": -1}, "warmup_epochs"),
     ({"compile": "fast"}, "compile")],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ImageClassifier("digits_cnn", **kwargs)


def test_channels_last_keeps_outputs(tmp_path):
    torch.manual_seed(0)
    dense = ImageClassifier("vgg_proxy").eval()
    nhwc = ImageClassifier("vgg_proxy", channels_last=True).eval()
    nhwc.model.load_state_dict(dense.model.state_dict())
    assert nhwc.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(dense(x), nhwc(x), atol=1e-4)


def _compressed_checkpoints():
    from lightning_compress import IterativePruning, QuantizationAwareTraining, TensorDecomposition, WeightSharing

    return {
        "pruning": lambda: [IterativePruning(sparsity=0.5, schedule="one_shot", finalize=False)],
        "filter_pruning": lambda: [IterativePruning(sparsity=0.5, schedule="one_shot", structure="filter")],
        "quantization": lambda: [QuantizationAwareTraining(weight_bits=4, finalize=False)],
        "decomposition": lambda: [TensorDecomposition(rank=0.5, rank_multiple=1, print_table=False)],
        "sharing": lambda: [WeightSharing(weight_bits=3, start_epoch=0, finalize=False)],
        "composed": lambda: [TensorDecomposition(rank=0.5, rank_multiple=1, print_table=False),
                             IterativePruning(sparsity=0.5, schedule="one_shot", finalize=False),
                             QuantizationAwareTraining()],
    }


@pytest.mark.parametrize("technique", list(_compressed_checkpoints()))
def test_weights_accept_the_checkpoint_of_every_technique(tmp_path, technique):
    """`weights:` starts a new run from plain weights in the checkpoint's shapes: masks multiplied in,
    fake-quant and codebook state dropped, factor chains and removed channels rebuilt."""
    from lightning_compress.methods.structure import plain_state_dict

    pl.seed_everything(0)
    source = ImageClassifier("digits_cnn", optimizer="adamw", lr=0.01)
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=_compressed_checkpoints()[technique]())
    trainer.fit(source, datamodule=DigitsDataModule(batch_size=256))
    ckpt = tmp_path / "compressed.ckpt"
    trainer.save_checkpoint(ckpt)  # mid-compression for some techniques (masks kept), finalized for others
    started = ImageClassifier("digits_cnn", weights=str(ckpt))
    expected = plain_state_dict(load_weights(ckpt))
    assert started.model.state_dict().keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(started.model.state_dict()[key], value), key
    if technique in ("pruning", "composed"):  # the masks became exact zeros
        assert any(float((v == 0).float().mean()) > 0.4 for k, v in expected.items() if k.endswith("weight"))


def test_compiled_network_stays_out_of_the_module_tree(monkeypatch):
    """compile=True wraps the network at its first call; state dict, pickling and deepcopy see the plain one."""
    import copy
    import pickle

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: real_compile(model, backend="aot_eager"))
    module = ImageClassifier("digits_cnn", compile="max-autotune-no-cudagraphs").eval()
    plain = ImageClassifier("digits_cnn").eval()
    plain.load_state_dict(module.state_dict())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(module(x), plain(x), atol=1e-6)
    assert "_compiled" in module.__dict__ and not any("_orig_mod" in k for k in module.state_dict())
    for twin in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        with torch.no_grad():
            assert torch.allclose(twin(x), plain(x), atol=1e-6)
        assert twin.__dict__["_compiled"]._orig_mod is twin.model  # compiled again for the copy's own network
