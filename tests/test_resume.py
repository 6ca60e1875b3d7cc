"""A run resumed from a mid-training checkpoint ends where the uninterrupted run ends."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import CIFAR10DataModule, ImageClassifier


def _fit(tmp_path, cache_dir, data_dir, max_epochs, ckpt_path=None, save_every_epoch=False):
    pl.seed_everything(0)
    callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")] if save_every_epoch else []
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=max_epochs, logger=False, enable_checkpointing=save_every_epoch,
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        num_sanity_val_steps=0,
    )
    module = ImageClassifier("vgg_proxy", lr=0.05)
    dm = CIFAR10DataModule(str(data_dir), batch_size=16, val_size=10, cache_dir=str(cache_dir))
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


def test_resume_matches_uninterrupted_run(tmp_path, tiny_cifar_dir, cache_dir):
    full = _fit(tmp_path / "a", cache_dir, tiny_cifar_dir, 3, save_every_epoch=True)
    resumed = _fit(tmp_path / "b", cache_dir, tiny_cifar_dir, 3, ckpt_path=tmp_path / "a" / "ckpt" / "epoch=0.ckpt")
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
