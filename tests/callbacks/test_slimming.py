"""Network slimming (Liu et al. 2017): ``IterativePruning(structure="filter", criterion="bn_scale")``.

An L1 penalty on the BatchNorm scales trains until the last mask change, channels are ranked by
``|gamma|`` across layers, and the pruned channels are removed at fit end.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_compress import DigitsDataModule, ImageClassifier, IterativePruning
from lightning_compress.methods.pruning.channels import analyse_channels, find_channel_groups
from lightning_compress.methods.pruning.pruner import Pruner


def _fit(pruning: IterativePruning, epochs: int, seed: int = 0) -> ImageClassifier:
    pl.seed_everything(seed)
    module = ImageClassifier("digits_cnn", optimizer="adamw", lr=0.01, weight_decay=0.0)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=[pruning], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=10, limit_val_batches=2)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    return module


def _scales(module: ImageClassifier) -> torch.Tensor:
    return torch.cat([m.weight.detach().abs() for m in module.model.modules() if isinstance(m, nn.BatchNorm2d)])


def test_the_penalty_drives_the_scales_down_and_stops_at_the_last_mask_change():
    kwargs = dict(sparsity=0.5, schedule="one_shot", start_epoch=2, structure="filter", criterion="bn_scale",
                  scope="global", finalize=False)
    penalized = _fit(IterativePruning(bn_penalty=0.05, **kwargs), epochs=2)  # the cut at epoch 2 is never reached
    plain = _fit(IterativePruning(bn_penalty=0.0, **kwargs), epochs=2)
    # Same seed, same batches: the only difference is the L1 subgradient on the scales.
    # Under AdamW the subgradient is normalised with the rest: about lr per step, 20 steps of 0.01 here.
    assert _scales(penalized).mean() < _scales(plain).mean() - 0.1
    # After the one-shot cut the network fine-tunes without it: cut at epoch 0, the two fits train alike.
    after_cut = {**kwargs, "start_epoch": 0}
    assert torch.equal(_scales(_fit(IterativePruning(bn_penalty=0.05, **after_cut), epochs=1)),
                       _scales(_fit(IterativePruning(bn_penalty=0.0, **after_cut), epochs=1)))


def test_channels_are_ranked_by_their_batchnorm_scale_across_layers():
    model = ImageClassifier("digits_cnn").model
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    torch.manual_seed(0)
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.rand_like(norm.weight))
    groups = find_channel_groups(model)
    names = sorted(groups)
    pruner = Pruner(model, names, scope="global", structure="filter", criterion="bn_scale", channels=analyse_channels(model))
    pruner.attach()
    pruner.update(0.5, first=True)
    # The kept channels are exactly the half with the largest |gamma| over the whole network.
    scales = torch.cat([pruner.norm_layer(n).weight.abs() for n in names])
    kept = torch.cat([model.get_submodule(n).weight_mask.flatten(1).any(1) for n in names])
    assert int(kept.sum()) == scales.numel() // 2
    assert scales[kept].min() >= scales[~kept].max()


def test_slimming_removes_the_channels_at_fit_end():
    params = sum(p.numel() for p in ImageClassifier("digits_cnn").model.parameters())
    module = _fit(IterativePruning(sparsity=0.5, schedule="agp", start_epoch=0, end_epoch=1, frequency=2,
                                   structure="filter", criterion="bn_scale", scope="global", bn_penalty=1e-3), epochs=2)
    convs = [m for m in module.model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(c.out_channels for c in convs) < 0.6 * (16 + 32 + 64)
    assert sum(p.numel() for p in module.model.parameters()) < 0.6 * params
    assert module.model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_bad_combinations_are_refused_by_name():
    with pytest.raises(ValueError, match="criterion='bn_scale' ranks whole channels: it needs structure='filter'"):
        IterativePruning(criterion="bn_scale")
    with pytest.raises(ValueError, match=r"bn_penalty=-1 must be in \[0, 1\)"):
        IterativePruning(structure="filter", criterion="bn_scale", bn_penalty=-1)

    class NoNorm(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))

        def forward(self, x):
            return self.net(x)

    pruning = IterativePruning(structure="filter", criterion="bn_scale")
    with pytest.raises(ValueError, match=r"ranks channels by the BatchNorm after each convolution; \['net.0'\] have none"):
        pruning.setup(None, NoNorm(), "fit")
