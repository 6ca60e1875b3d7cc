from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_compress import CompressionReport, DigitsDataModule, ImageClassifier, IterativePruning
from lightning_compress.methods.pruning import is_masked
from lightning_compress.methods.pruning.channels import analyse_channels, find_channel_groups
from lightning_compress.methods.pruning.pruner import Pruner
from lightning_compress.models import create_model


def _fit(callbacks, max_epochs=3, module=None, logger=False, **kwargs):
    pl.seed_everything(0)
    module = module or ImageClassifier("digits_cnn", optimizer="sgd", lr=0.05, weight_decay=5e-4)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=max_epochs, callbacks=callbacks, logger=logger,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kwargs,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    return trainer, module


def _sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return 1 - sum(int(torch.count_nonzero(w)) for w in weights) / sum(w.numel() for w in weights)


@pytest.mark.parametrize("schedule, scope", [("agp", "layer"), ("agp", "global"), ("iterative", "layer"), ("one_shot", "global")])
def test_reached_sparsity_follows_the_schedule_at_every_update(schedule, scope):
    pruning = IterativePruning(
        sparsity=0.85, schedule=schedule, scope=scope, start_epoch=0, end_epoch=2, frequency=4, finalize=False
    )
    trainer, module = _fit([pruning], max_epochs=3)
    steps_per_epoch = trainer.num_training_batches
    assert len(pruning.history) >= (1 if schedule == "one_shot" else 3)
    for step, reached in pruning.history:
        assert abs(reached - pruning.schedule.target(step, steps_per_epoch)) < 0.005, (step, reached)
    assert pruning.history[-1][1] == pytest.approx(0.85, abs=0.005)
    assert trainer.callback_metrics["val/acc"] > 0.3  # still learning (chance is 0.1)


def test_without_rehabilitation_pruned_weights_stay_exactly_zero():
    pruning = IterativePruning(sparsity=0.7, schedule="one_shot", start_epoch=1, finalize=False)
    _, module = _fit([pruning], max_epochs=3)
    for layer in module.model.modules():
        if is_masked(layer):
            assert (layer.weight[~layer.weight_mask] == 0).all()


def test_rehabilitation_splices_weights_back_and_keeps_dense_weights_learning():
    pruning = IterativePruning(
        sparsity=0.6, schedule="one_shot", start_epoch=0, frequency=2, rehabilitation=True, margin=0.0,
        finalize=False,
    )
    seen = {}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            layer = pl_module.model.features[3]
            if trainer.global_step == 1:
                seen["first"] = layer.weight_mask.clone()
                seen["pruned_weight"] = layer.weight.detach()[~layer.weight_mask].clone()

    _, module = _fit([pruning, Watch()], max_epochs=2)
    layer = module.model.features[3]
    revived = ~seen["first"] & layer.weight_mask
    assert revived.any(), "no pruned weight was spliced back"
    # the dense values behind the first mask kept changing (straight-through gradient)
    assert not torch.equal(seen["pruned_weight"], layer.weight.detach()[~seen["first"]])
    assert abs(pruning.sparsity_now() - 0.6) < 0.005


def test_finalize_loads_into_the_unpruned_architecture():
    pruning = IterativePruning(sparsity=0.8, schedule="agp", start_epoch=0, end_epoch=1, frequency=3)
    _, module = _fit([pruning], max_epochs=2)
    assert not any(is_masked(m) for m in module.model.modules())
    assert not any(k.endswith(("weight_mask", "weight_rewind")) for k in module.state_dict())
    fresh = create_model("digits_cnn")
    fresh.load_state_dict(module.model.state_dict(), strict=True)
    assert _sparsity(fresh) == pytest.approx(0.8, abs=0.005)


def test_per_layer_sparsity_dict_and_targets():
    pruning = IterativePruning(
        sparsity={"features.0": 0.2, "features.*": 0.5}, schedule="one_shot", start_epoch=0, finalize=False
    )
    _, module = _fit([pruning], max_epochs=1)
    f = module.model.features
    assert 1 - f[0].weight_mask.float().mean() == pytest.approx(0.2, abs=0.01)
    assert 1 - f[3].weight_mask.float().mean() == pytest.approx(0.5, abs=0.01)
    assert not is_masked(module.model.classifier)


def test_obd_waits_for_gradients_then_prunes_by_saliency():
    pruning = IterativePruning(sparsity=0.5, schedule="one_shot", start_epoch=0, criterion="obd", obd_batches=5,
                               finalize=False)
    _, module = _fit([pruning], max_epochs=1)
    assert pruning.history[0][0] == 5  # the first update waited for 5 squared gradients
    assert pruning.sparsity_now() == pytest.approx(0.5, abs=0.005)


def test_obd_saliency_differs_from_magnitude():
    from lightning_compress.methods.pruning.selection import keep_top, weight_scores

    weight = torch.tensor([1.0, 2.0, 3.0, 4.0])
    hessian = torch.tensor([100.0, 1.0, 1.0, 0.01])
    obd = weight_scores(weight, "obd", hessian)
    assert torch.allclose(obd, 0.5 * hessian * weight**2)
    assert keep_top(obd, 2).tolist() == [True, False, True, False]
    assert keep_top(weight_scores(weight, "magnitude"), 2).tolist() == [False, False, True, True]


def test_rewinding_resets_survivors_to_the_saved_weights():
    pruning = IterativePruning(sparsity=0.5, schedule="one_shot", start_epoch=1, rewind_epoch=0, finalize=False)
    saved = {}

    class Snapshot(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                saved["w"] = pl_module.model.features[3].weight.detach().clone()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 0:
                saved["after_round"] = pl_module.model.features[3].weight.detach().clone()

    class Before(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 0:
                layer = pl_module.model.features[3]
                saved["mask"] = layer.weight_mask.clone()
                saved["rewound"] = layer.weight.detach().clone()

    _fit([Snapshot(), pruning, Before()], max_epochs=2)
    mask = saved["mask"]
    assert torch.equal(saved["rewound"][mask], saved["w"][mask])
    assert (saved["rewound"][~mask] == 0).all()


@pytest.mark.parametrize(
    "network, kwargs, params_left",
    [("vgg_proxy", {}, 0.4), ("mobilenet_v2", {"width_mult": 0.25}, 0.6), ("shufflenet_v2_x1_0", {}, 0.8)],
)
def test_filter_pruning_removes_channels_and_keeps_the_function(network, kwargs, params_left):
    """Plain chains, and nets whose channels are tied by residual adds, depthwise convs and channel shuffles."""
    module = ImageClassifier(network, lr=0.02, model_kwargs=kwargs)
    pruning = IterativePruning(sparsity=0.5, schedule="one_shot", start_epoch=0, structure="filter", norm=2)
    outputs = {}

    class Capture(pl.Callback):
        def on_fit_end(self, trainer, pl_module):  # runs after IterativePruning's (list order)
            outputs["after"] = pl_module.model.eval()(outputs["x"])

        def on_train_end(self, trainer, pl_module):
            outputs["x"] = torch.randn(2, 3, 32, 32)
            outputs["before"] = pl_module.model.eval()(outputs["x"])

    dm_images = torch.randn(64, 3, 32, 32)

    class RandomCifar(pl.LightningDataModule):
        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(dm_images, torch.randint(0, 10, (64,)))
            return torch.utils.data.DataLoader(data, batch_size=16)

    params_before = sum(p.numel() for p in module.model.parameters())
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[pruning, Capture()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with torch.no_grad():
        trainer.fit(module, datamodule=RandomCifar())
    convs = [m for m in module.model.modules() if isinstance(m, nn.Conv2d)]
    if network == "vgg_proxy":
        assert [c.out_channels for c in convs] == [8, 16, 32, 32, 64, 64, 64, 64]
    assert sum(p.numel() for p in module.model.parameters()) < params_left * params_before
    assert not any(hasattr(c, "weight_mask") for c in convs)
    assert torch.allclose(outputs["before"], outputs["after"], atol=1e-5)
    # A checkpoint of the smaller network rebuilds it in a fresh module.
    trainer.save_checkpoint(tmp := Path(tempfile.mkdtemp()) / "pruned.ckpt")
    fresh = ImageClassifier.load_from_checkpoint(tmp)
    assert torch.equal(fresh.model.eval()(outputs["x"]), module.model(outputs["x"]))
    started = ImageClassifier(network, model_kwargs=kwargs, weights=str(tmp))  # a recipe's `weights:`
    assert torch.equal(started.model.eval()(outputs["x"]), module.model(outputs["x"]))


@pytest.mark.parametrize(
    "network, target, reason",
    [
        ("squeezenet1_1", "classifier.1", "output is a model output"),
        ("mobilenet_v2", "features.2.conv.1.0", "depthwise conv: its channels go with those of the layer that feeds it"),
    ],
)
def test_filter_pruning_refuses_a_layer_whose_channels_cannot_go_by_name(network, target, reason):
    module = ImageClassifier(network)
    pruning = IterativePruning(sparsity=0.5, structure="filter", targets=[target])
    with pytest.raises(ValueError, match=f"structure='filter' cannot remove the channels of targets .*{target}: {reason}"):
        pruning.setup(None, module, "fit")


def test_filter_pruning_of_one_conv_of_a_residual_stage_prunes_the_whole_stage():
    module = ImageClassifier("mobilenet_v2")
    pruning = IterativePruning(sparsity=0.5, structure="filter", targets=["features.2.conv.2"])
    with pytest.warns(UserWarning, match=r"also prunes \['features.3.conv.2'\]: their channels are tied"):
        pruning.setup(None, module, "fit")
    assert sorted(pruning.layers) == ["features.2.conv.2", "features.3.conv.2"]


def test_logs_sparsity_and_report_reads_it(tmp_path):
    pruning = IterativePruning(sparsity=0.75, schedule="agp", start_epoch=0, end_epoch=1, frequency=5, finalize=False)
    report = CompressionReport(print_summary=False)
    _fit([pruning, report], max_epochs=2, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    values = [float(r["pruning/sparsity"]) for r in rows if r.get("pruning/sparsity")]
    assert values and values[-1] == pytest.approx(0.75, abs=0.005)
    assert any(r.get("pruning/sparsity/features.0") for r in rows)
    pruned = sum(layer.params - layer.nonzeros for layer in report.summary.layers)
    targeted = sum(m.weight.numel() for m in pruning.layers.values())
    assert pruned / targeted == pytest.approx(0.75, abs=0.005)


def test_channels_last_and_bf16_mixed():
    module = ImageClassifier("digits_cnn", lr=0.05, channels_last=True)
    pruning = IterativePruning(sparsity=0.6, schedule="agp", start_epoch=0, end_epoch=1, frequency=5, scope="global")
    _fit([pruning], max_epochs=2, module=module, precision="bf16-mixed")
    assert module.model.features[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert pruning.history[-1][1] == pytest.approx(0.6, abs=0.005)
    assert _sparsity(module.model) == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=1.0), "sparsity=1.0 must be in \\[0, 1\\)"),
        (dict(sparsity={"a": 1.5}), "sparsity\\['a'\\]=1.5"),
        (dict(start_epoch=4, end_epoch=2), "end_epoch=2 must be >= start_epoch=4"),
        (dict(criterion="hessian"), "criterion='hessian'.*'magnitude', 'obd'"),
        (dict(structure="channel"), "structure='channel'.*'unstructured', 'filter'"),
        (dict(scope="network"), "scope='network'"),
        (dict(schedule="linear"), "schedule='linear'"),
        (dict(rewind_epoch=3, start_epoch=1), "rewind_epoch=3"),
        (dict(sparsity={"a": 0.5}, scope="global"), "scope='layer'"),
        (dict(channel_multiple=0), "channel_multiple=0 must be an integer >= 1"),
        (dict(channel_multiple=8.0), "channel_multiple=8.0 must be an integer >= 1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IterativePruning(**kwargs)


def test_channel_multiple_wider_than_every_target_is_refused_with_the_fix():
    model = ImageClassifier("digits_cnn")
    widest = max(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(ValueError, match=f"channel_multiple={widest}: every targeted convolution .*channel_multiple=1"):
        IterativePruning(structure="filter", channel_multiple=widest).setup(None, model, "fit")


def test_targets_matching_nothing():
    with pytest.raises(ValueError, match="targets=\\['encoder.\\*'\\] match no Conv/Linear layer; candidates are: features.0"):
        IterativePruning(targets=["encoder.*"]).setup(None, ImageClassifier("digits_cnn"), "fit")


def test_compressed_checkpoints_start_new_runs(tmp_path):
    """weights: from a mid-pruning checkpoint folds its masks; from a filter-pruned one resizes layers."""
    pruning = IterativePruning(sparsity=0.7, schedule="one_shot", start_epoch=0, finalize=False)
    trainer, module = _fit([pruning], max_epochs=1)
    trainer.save_checkpoint(tmp_path / "masked.ckpt")
    started = ImageClassifier("digits_cnn", weights=str(tmp_path / "masked.ckpt"))
    assert _sparsity(started.model) == pytest.approx(0.7, abs=0.01)

    small = ImageClassifier("vgg_proxy")
    groups = find_channel_groups(small.model)
    pruner = Pruner(small.model, list(groups), structure="filter", channels=analyse_channels(small.model))
    pruner.attach()
    pruner.update(0.5, first=True)
    pruner.finalize()
    torch.save(small.model.state_dict(), tmp_path / "small.pt")
    pl_ckpt = {"state_dict": {f"model.{k}": v for k, v in small.model.state_dict().items()}}
    fresh = ImageClassifier("vgg_proxy", weights=str(tmp_path / "small.pt"))
    assert fresh.model.features[0].out_channels == 8
    other = ImageClassifier("vgg_proxy")
    other.load_state_dict(pl_ckpt["state_dict"])  # the classifier rebuilds the smaller layers first
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(small.model.eval()(x), other.model.eval()(x))
        assert torch.equal(small.model(x), fresh.model.eval()(x))


def test_filter_pruning_on_squeezenet_warns_about_the_output_conv_only():
    module = ImageClassifier("squeezenet1_1")
    pruning = IterativePruning(sparsity=0.5, structure="filter")
    with pytest.warns(UserWarning, match="leaves 1 whose channels cannot be removed .*classifier.1: output is a model output"):
        pruning.setup(None, module, "fit")
    assert len(pruning._names) == 25
    assert pruning.summary["left_whole"] == {"classifier.1": "output is a model output"}  # the report lists it


def test_rehabilitation_freezes_masks_after_end_epoch():
    pruning = IterativePruning(sparsity=0.6, schedule="agp", start_epoch=0, end_epoch=1, frequency=3,
                               rehabilitation=True, finalize=False)
    trainer, _ = _fit([pruning], max_epochs=3)
    end_step = trainer.num_training_batches  # end_epoch = 1
    steps = [step for step, _ in pruning.history]
    assert max(steps) < end_step + 3 and len(steps) > 3  # the last AGP step may round past end_epoch
