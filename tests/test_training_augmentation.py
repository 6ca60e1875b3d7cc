"""The data module augments training batches inside a Trainer, and only those."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_compress import CIFAR10DataModule, ImageClassifier


class RecordingClassifier(ImageClassifier):
    def __init__(self):
        super().__init__("vgg_proxy", lr=0.01)
        self.seen = {"train": [], "val": []}

    def training_step(self, batch, batch_idx):
        self.seen["train"].append(batch[0].clone())
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append(batch[0].clone())
        return super().validation_step(batch, batch_idx)


def test_train_batches_augmented_validation_batches_not(tiny_cifar_dir, cache_dir):
    dm = CIFAR10DataModule(str(tiny_cifar_dir), batch_size=60, val_size=0, cache_dir=str(cache_dir))
    module = RecordingClassifier()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    train, val = module.seen["train"][0], module.seen["val"][0]
    assert train.dtype == val.dtype == torch.float32
    # The tiny images are flat colours: only padding from a random crop puts the zero-pixel value
    # (normalised: -mean/std, below every real pixel) into them. Validation images never hold it.
    floor = (0.0 - torch.tensor([0.4914, 0.4822, 0.4465])) / torch.tensor([0.2470, 0.2435, 0.2616])
    is_pad = torch.isclose(train, floor.view(1, 3, 1, 1).expand_as(train), atol=1e-4).all(1)
    assert is_pad.any(dim=(1, 2)).float().mean() > 0.5
    assert not torch.isclose(val, floor.view(1, 3, 1, 1).expand_as(val), atol=1e-4).all(1).any()
