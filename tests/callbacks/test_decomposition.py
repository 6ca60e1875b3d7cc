from __future__ import annotations


import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import DigitsDataModule, ImageClassifier, TensorDecomposition, compression_report
from lightning_compress.methods.decomposition import Factorized


def _trainer(callbacks, max_epochs=2, **kwargs):
    return pl.Trainer(
        accelerator="cpu", max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )


def _module(**kwargs):
    pl.seed_everything(0)
    return ImageClassifier("digits_cnn", optimizer="sgd", lr=0.05, **kwargs)


def test_epoch_zero_factorizes_in_setup_and_the_factors_train():
    decomposition = TensorDecomposition(method="tucker", rank="energy:0.8", rank_multiple=4, print_table=False)
    module = _module()
    seen = {}

    class Watch(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            layer = pl_module.model.features[3]
            seen["factorized"] = isinstance(layer, Factorized)
            seen["start"] = {k: v.clone() for k, v in layer.state_dict().items()}
            optimized = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
            seen["optimized"] = all(id(p) in optimized for p in layer.parameters())

    trainer = _trainer([decomposition, Watch()])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert seen["factorized"] and seen["optimized"]
    end = module.model.features[3].state_dict()
    assert any(not torch.equal(seen["start"][k], end[k]) for k in end)
    assert decomposition.decomposed and any(d.method == "tucker" for d in decomposition.plan)
    assert trainer.callback_metrics["val/acc"] > 0.8
    report = compression_report(module.model, input_size=(1, 8, 8))
    assert report.params == sum(p.numel() for p in module.model.parameters())


def test_epoch_n_rebuilds_optimizer_keeping_schedule_and_untouched_state():
    decomposition = TensorDecomposition(method="tucker", rank=0.5, start_epoch=1, targets=["features.3"], print_table=False)
    module = _module(scheduler="cosine")
    seen = {}

    class Watch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):  # runs after the decomposition callback's
            opt = trainer.optimizers[0]
            seen.setdefault("lr", []).append([g["lr"] for g in opt.param_groups])
            seen.setdefault("sched", []).append(trainer.lr_scheduler_configs[0].scheduler.last_epoch)
            head = pl_module.model.classifier.weight
            seen.setdefault("head_state", []).append(head in opt.state and "momentum_buffer" in opt.state[head])
            layer = pl_module.model.features[3]
            params = {id(p) for g in opt.param_groups for p in g["params"]}
            seen.setdefault("factorized", []).append(isinstance(layer, Factorized))
            seen.setdefault("optimized", []).append(all(id(p) in params for p in layer.parameters()))

        def on_train_epoch_end(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            seen.setdefault("lr_end", []).append([g["lr"] for g in opt.param_groups])
            seen.setdefault("sched_end", []).append(trainer.lr_scheduler_configs[0].scheduler.last_epoch)

    trainer = _trainer([decomposition, Watch()], max_epochs=3)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert isinstance(module.model.features[3], Factorized)
    assert seen["factorized"] == [False, True, True]
    assert seen["optimized"] == [True, True, True]  # the dense layer's, then the factors'
    assert seen["lr"][1] == seen["lr_end"][0]  # the cosine schedule goes on, it does not restart
    assert seen["sched"][1] == seen["sched_end"][0] > 0
    assert seen["head_state"][1]  # momentum of an untouched layer survived the rebuild


def test_test_with_ckpt_path_rebuilds_the_structure(tmp_path):
    decomposition = TensorDecomposition(method="tucker", rank="energy:0.8", rank_multiple=4, print_table=False)
    module = _module()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, callbacks=[decomposition, ModelCheckpoint(dirpath=tmp_path, filename="last")],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    data = DigitsDataModule(batch_size=64)
    trainer.fit(module, datamodule=data)
    expected = trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"]
    ckpt = tmp_path / "last.ckpt"

    fresh = _module()
    assert not isinstance(fresh.model.features[3], Factorized)
    tester = _trainer([TensorDecomposition(method="tucker", rank="energy:0.8", print_table=False)])
    result = tester.test(fresh, datamodule=data, ckpt_path=str(ckpt), verbose=False)[0]["test/acc"]
    assert isinstance(fresh.model.features[3], Factorized)
    assert result == pytest.approx(expected)

    # Without the callback: ImageClassifier rebuilds the factorized layers from the checkpoint's shapes.
    loaded = ImageClassifier.load_from_checkpoint(ckpt)
    assert isinstance(loaded.model.features[3], Factorized)

    # Outside a Trainer: replay the recorded plan, then load.
    restored = TensorDecomposition.restore(ImageClassifier("digits_cnn"), ckpt)
    x = torch.randn(4, 1, 8, 8)
    module.eval(), restored.eval()
    assert torch.allclose(restored(x), module(x), atol=1e-6)

    # A decomposed checkpoint as the starting weights of a new run.
    again = ImageClassifier("digits_cnn", weights=str(ckpt))
    assert isinstance(again.model.features[3], Factorized)


def test_svd_of_the_head_and_target_compression():
    module = _module()
    dense = sum(p.numel() for p in module.model.parameters())
    decomposition = TensorDecomposition(method="tucker", target_compression=2.0, rank_multiple=2, print_table=False)
    _trainer([decomposition], max_epochs=1).fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert sum(p.numel() for p in module.model.parameters()) <= dense / 2
    module = _module()
    svd = TensorDecomposition(method="svd", rank=4, print_table=False)
    _trainer([svd], max_epochs=1).fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert isinstance(module.model.classifier, Factorized) and module.model.classifier.ranks == (8,)


def test_the_plan_is_written_and_logged(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    decomposition = TensorDecomposition(method="cp", rank=8, rank_multiple=1, targets=["features.3", "features.7"],
                                        print_table=False)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[decomposition], logger=CSVLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_module(), datamodule=DigitsDataModule(batch_size=64))
    import json

    written = json.loads((tmp_path / "lightning_logs" / "version_0" / "decomposition.json").read_text())
    assert [layer["ranks"] for layer in written["layers"]] == [[8], [8]]
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "decomposition/params_after" in metrics
    assert "cp" in str(decomposition.table().columns[1]._cells)


@pytest.mark.parametrize("method, rank, factorized", [
    ("tt", 4, ["features.0", "features.3", "features.7", "classifier"]),
    ("flattened", 1, ["features.0", "features.3", "features.7"]),
])
def test_tt_and_flattened_fit_then_test_from_the_checkpoint(tmp_path, method, rank, factorized):
    decomposition = TensorDecomposition(method=method, rank=rank, rank_multiple=4, print_table=False)
    module = _module()
    data = DigitsDataModule(batch_size=64)
    limits = {"limit_train_batches": 6, "limit_val_batches": 2, "limit_test_batches": 3}
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[decomposition, checkpoint], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **limits)
    trainer.fit(module, datamodule=data)
    done = [d.name for d in decomposition.plan if d.method == method]
    assert done == factorized and all(isinstance(module.model.get_submodule(n), Factorized) for n in done)
    expected = trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"]

    fresh = _module()
    tester = _trainer([TensorDecomposition(method=method, rank=rank, print_table=False)], **limits)
    result = tester.test(fresh, datamodule=data, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)[0]["test/acc"]
    assert result == pytest.approx(expected)
    restored = TensorDecomposition.restore(ImageClassifier("digits_cnn"), tmp_path / "last.ckpt")
    again = ImageClassifier("digits_cnn", weights=str(tmp_path / "last.ckpt"))
    x = torch.randn(4, 1, 8, 8)
    module.eval(), restored.eval(), again.eval()
    assert torch.allclose(restored(x), module(x), atol=1e-6) and torch.allclose(again(x), module(x), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "qr"}, r"method='qr' is not known; valid: 'tucker', 'cp', 'svd'"),
        ({"rank": 1.5}, r"rank=1.5 is not valid"),
        ({"rank": "energy:0"}, r"rank='energy:0'"),
        ({"start_epoch": -1}, r"start_epoch=-1 must be"),
        ({"target_compression": 0.5}, r"target_compression=0.5 must be a number > 1"),
        ({"method": "cp", "target_compression": 10},
         r"target_compression works with method 'tucker', 'svd', 'tt' or 'flattened', not 'cp'"),
        ({"method": "flattened", "rank": "vbmf"}, r"rank='vbmf' is not valid for method='flattened': give an int >= 1"),
        ({"method": "tt", "rank": 0}, r"rank=0 is not valid"),
        ({"metric": "flops"}, r"metric='flops' is not known"),
        ({"rank_multiple": 0}, r"rank_multiple=0 must be"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TensorDecomposition(**kwargs)


def test_targets_matching_nothing():
    with pytest.raises(ValueError, match=r"targets=\['nothing\.\*'\] match no layer"):
        _trainer([TensorDecomposition(targets=["nothing.*"])], max_epochs=1).fit(_module(), datamodule=DigitsDataModule())
