from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_compress import CompressionReport, DigitsDataModule, ImageClassifier, IterativePruning, WeightSharing
from lightning_compress.methods.sharing import is_shared
from lightning_compress.models import create_model


def _fit(callbacks, max_epochs=3, module=None, **kwargs):
    pl.seed_everything(0)
    module = module or ImageClassifier("digits_cnn", optimizer="adamw", lr=0.005, weight_decay=0.0)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    return trainer, module


def _distinct(layer: nn.Module) -> int:
    w = layer.weight.detach()
    return int(w[w != 0].unique().numel())


def test_cluster_at_epoch_then_finetune_centroids():
    sharing = WeightSharing(weight_bits=3, start_epoch=1)
    codebooks = {}

    class Watch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            codebooks[trainer.current_epoch] = pl_module.model.features[3].weight_codebook.clone()

    trainer, module = _fit([sharing, Watch()], max_epochs=3)
    assert not torch.any(codebooks[0])  # placeholder before clustering
    assert not torch.equal(codebooks[1], codebooks[2])  # centroids kept learning, codes fixed
    for layer in (module.model.features[0], module.model.features[3], module.model.classifier):
        assert 1 < _distinct(layer) <= 8
        assert not is_shared(layer) and "weight_code" not in layer._buffers  # folded at fit end
    fresh = create_model("digits_cnn")
    fresh.load_state_dict(module.model.state_dict(), strict=True)
    assert trainer.callback_metrics["val/acc"] > 0.8


def test_frozen_centroids_without_finetune():
    sharing = WeightSharing(weight_bits=2, start_epoch=1, finetune=False)
    snapshots = {}

    class Watch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots[trainer.current_epoch] = pl_module.model.features[3].weight.detach().clone()

    _fit([sharing, Watch()], max_epochs=3)
    assert torch.equal(snapshots[1], snapshots[2])


def test_at_fit_end_by_default_and_per_layer_bits():
    sharing = WeightSharing(weight_bits={"features.*": 4, "classifier": 2})
    _, module = _fit([sharing], max_epochs=1)
    assert _distinct(module.model.features[3]) <= 16 and _distinct(module.model.classifier) <= 4
    assert _distinct(module.model.features[3]) > 4


def test_pruned_weights_stay_zero_and_take_no_centroid(tmp_path):
    pruning = IterativePruning(sparsity=0.8, schedule="one_shot", start_epoch=0)
    sharing = WeightSharing(weight_bits=2, start_epoch=1)
    report = CompressionReport(print_summary=False, input_size=[1, 8, 8])
    _, module = _fit([pruning, sharing, report], max_epochs=3, default_root_dir=tmp_path)
    layer = module.model.features[3]
    zeros = float((layer.weight == 0).float().mean())
    assert zeros == pytest.approx(0.8, abs=0.01)
    assert _distinct(layer) <= 4
    row = next(r for r in report.summary.layers if r.name == "features.3")
    assert row.bits == 2 and "shared" in row.note  # the report reads the folded codebook
    assert report.summary.compression_ratio > 10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weight_bits=0), "weight_bits=0 must be an integer in 1..16"),
        (dict(weight_bits=17), "weight_bits=17"),
        (dict(weight_bits={"features.*": 20}), "weight_bits\\['features.\\*'\\]=20"),
        (dict(init="kmeans++"), "init='kmeans\\+\\+'.*'linear', 'density', 'random'"),
        (dict(start_epoch=-1), "start_epoch=-1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeightSharing(**kwargs)


def test_bits_globs_matching_nothing():
    with pytest.raises(ValueError, match="match none of the targeted layers"):
        WeightSharing(weight_bits={"encoder.*": 4}).setup(None, ImageClassifier("digits_cnn"), "fit")


def test_deep_compression_export_round_trips_bit_exactly(tmp_path):
    from lightning_compress import load_compressed

    path = tmp_path / "model.lcpk"
    pruning = IterativePruning(sparsity=0.85, schedule="agp", start_epoch=0, end_epoch=1, frequency=5,
                               rehabilitation=True)
    sharing = WeightSharing(weight_bits={"features.*": 5, "classifier": 4}, start_epoch=2, export=str(path))
    _, module = _fit([pruning, sharing], max_epochs=3)
    summary = sharing.artifact
    assert path.stat().st_size == summary.file_bytes
    stages = summary.stages()
    assert stages["dense"] > stages["pruned"] > stages["+ shared"]
    # On a 24K-parameter model the Huffman tables and headers can outweigh what coding saves; the
    # file still is several times smaller than the fp32 state dict.
    assert summary.compression_ratio > 5
    fresh = create_model("digits_cnn")
    load_compressed(path, model=fresh)
    for key, value in module.model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert float((fresh.features[3].weight == 0).float().mean()) == pytest.approx(0.85, abs=0.01)


def test_pruning_stops_rehabilitating_once_weights_are_shared():
    pruning = IterativePruning(sparsity=0.7, schedule="one_shot", start_epoch=0, frequency=2, rehabilitation=True,
                               finalize=False)
    sharing = WeightSharing(weight_bits=3, start_epoch=1)
    _fit([pruning, sharing], max_epochs=3)
    steps_per_epoch = 20  # 1257 digits training images / 64
    assert all(step < steps_per_epoch for step, _ in pruning.history)  # no mask update after clustering


# ------------------------------------------------------------------------------ product quantization

PQ_SIZES = {"features.0": 9, "*": 4}  # the first conv's rows hold 9 weights; every other layer's a multiple of 4


def _pq_trainer(tmp_path, callbacks, max_epochs, monitor="val/acc"):
    from lightning.pytorch.callbacks import ModelCheckpoint

    # save_top_k=-1: Lightning writes last.ckpt only in an epoch that also wrote a top-k file
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=monitor, mode="max", save_last=True, save_top_k=-1)
    return pl.Trainer(accelerator="cpu", max_epochs=max_epochs, callbacks=[*callbacks, checkpoint], logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_train_batches=10, limit_val_batches=2, limit_test_batches=2,
                      default_root_dir=tmp_path), checkpoint


class _Codes(pl.Callback):
    """The product codes of one layer, and whether its weight is what its codes and codebooks describe."""

    def __init__(self):
        self.seen = {}

    def _look(self, stage, pl_module):
        from lightning_compress.methods.sharing import product as P

        layer = pl_module.model.features[3]
        self.seen[stage] = (layer.weight_pq_code.clone(), bool(torch.equal(layer.weight, P.reconstruct(layer))))

    def on_train_epoch_start(self, trainer, pl_module):  # after WeightSharing's: it comes first in the list
        self._look(f"epoch{trainer.current_epoch}", pl_module)

    def on_test_start(self, trainer, pl_module):
        self._look("test", pl_module)


def test_product_quantization_fit_test_from_checkpoints_and_packed_file(tmp_path):
    from lightning_compress import load_compressed

    pl.seed_everything(0)
    sharing = WeightSharing(weight_bits=3, start_epoch=1, method="pq", subvector_size=PQ_SIZES, export="pq.lcpk")
    codes = _Codes()
    trainer, checkpoint = _pq_trainer(tmp_path, [sharing, codes], max_epochs=3)
    module = ImageClassifier("digits_cnn", optimizer="adamw", lr=0.005, weight_decay=0.0)
    datamodule = DigitsDataModule(batch_size=64)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.callback_metrics["val/acc"] > 0.7
    assert (codes.seen["epoch0"][0] == -1).all()  # placeholders before clustering
    clustered, exact = codes.seen["epoch2"]
    assert exact and torch.equal(clustered, codes.seen["epoch1"][0])  # codes fixed, centroids fine-tuned
    layer = module.model.features[3]
    assert "weight_pq_code" not in layer._buffers  # dropped at fit end; the weight holds its centroids
    assert layer.weight.reshape(32, -1, 4)[:, 0].unique(dim=0).shape[0] <= 8

    # The packed file: every weight product-coded, loading back the trained model bit-exactly.
    summary = sharing.artifact
    assert {row.encoding for row in summary.layers} == {"product_codebook"}
    fresh = create_model("digits_cnn")
    load_compressed(summary.path, model=fresh)
    for key, value in module.model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key

    # test(ckpt_path): the codes and codebooks load into the placeholders setup registers, on the same
    # Trainer and module ("last") and on a fresh Trainer, callback and module (the best file).
    for which, path in (("last", checkpoint.last_model_path), ("best", checkpoint.best_model_path)):
        codes.seen.pop("test", None)
        if which == "best":
            fresh_sharing = WeightSharing(weight_bits=3, start_epoch=1, method="pq", subvector_size=PQ_SIZES)
            trainer, _ = _pq_trainer(tmp_path / "fresh", [fresh_sharing, codes], max_epochs=3)
            module, which = ImageClassifier("digits_cnn"), path
        trainer.test(module, datamodule=datamodule, ckpt_path=which, verbose=False)
        saved = torch.load(path, weights_only=True)["state_dict"]
        code, exact = codes.seen["test"]
        assert torch.equal(code, saved["model.features.3.weight_pq_code"])
        assert exact or (code == -1).all()  # the best may be the epoch before clustering
        assert "weight_pq_code" not in module.model.features[3]._buffers  # dropped again at test end
    saved = torch.load(checkpoint.last_model_path, weights_only=True)["state_dict"]
    assert torch.equal(saved["model.features.3.weight_pq_code"], clustered)
    assert saved["model.features.3.weight_pq_codebook"].shape == (36, 8, 4)
    # Without the callback: load_from_checkpoint and a recipe's weights: rebuild the codes' buffers too.
    loaded = ImageClassifier.load_from_checkpoint(checkpoint.last_model_path)
    assert torch.equal(loaded.model.features[3].weight_pq_code, clustered)
    started = ImageClassifier("digits_cnn", weights=checkpoint.last_model_path)
    assert torch.equal(started.model.features[3].weight, loaded.model.features[3].weight)


def test_product_quantization_resumes_with_its_codes(tmp_path):
    pl.seed_everything(0)
    first, _ = _pq_trainer(tmp_path / "a", [WeightSharing(weight_bits=2, start_epoch=0, method="pq",
                                                          subvector_size=PQ_SIZES)], max_epochs=1, monitor=None)
    first.fit(ImageClassifier("digits_cnn", optimizer="adamw", lr=0.005), datamodule=DigitsDataModule(batch_size=64))
    path = tmp_path / "a" / "ckpt" / "last.ckpt"
    stored = torch.load(path, weights_only=False)
    assert [value["clustered"] for key, value in stored["callbacks"].items() if "WeightSharing" in key] == [True]

    sharing = WeightSharing(weight_bits=2, start_epoch=0, method="pq", subvector_size=PQ_SIZES, finalize=False)
    codes = _Codes()
    second, _ = _pq_trainer(tmp_path / "b", [sharing, codes], max_epochs=2, monitor=None)
    second.fit(ImageClassifier("digits_cnn", optimizer="adamw", lr=0.005), datamodule=DigitsDataModule(batch_size=64),
               ckpt_path=path)
    assert sharing.clustered and set(codes.seen) == {"epoch1"}  # resumed at epoch 1, clustered: no second k-means
    code, exact = codes.seen["epoch1"]
    assert exact and torch.equal(code, stored["state_dict"]["model.features.3.weight_pq_code"])
    assert "weight_pq_code" in second.lightning_module.model.features[3]._buffers  # finalize=False keeps them


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="vq"), "method='vq' is not known; valid: 'kmeans', 'pq'"),
        (dict(method="pq", subvector_size=0), "subvector_size=0 must be an integer >= 1"),
        (dict(method="pq", subvector_size={"features.*": -2}), "subvector_size\\['features.\\*'\\]=-2"),
        (dict(method="pq", weight_bits=17), "weight_bits=17 must be an integer in 1..16"),
        (dict(subvector_size=4), "subvector_size=4 applies to method='pq' only"),
        (dict(method="pq", init="density"), "init='density'.*k-means\\+\\+"),
    ],
)
def test_product_quantization_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WeightSharing(**kwargs)


def test_product_quantization_refuses_in_setup_the_layers_it_cannot_cut():
    with pytest.raises(ValueError, match=r"cannot quantize 1 of its 4 layers:\n  features.0: its rows hold 9 weights, "
                                         r"which subvector_size=4 does not divide \(valid: 1, 3, 9\)"):
        WeightSharing(method="pq", subvector_size=4).setup(None, ImageClassifier("digits_cnn"), "fit")
    pruning = IterativePruning(sparsity=0.5, schedule="one_shot", start_epoch=0)
    sharing = WeightSharing(method="pq", subvector_size=PQ_SIZES, start_epoch=1)
    with pytest.raises(ValueError, match="features.3: it carries a pruning mask.*method='kmeans'"):
        _fit([pruning, sharing], max_epochs=1)
