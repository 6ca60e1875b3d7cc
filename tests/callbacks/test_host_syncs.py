"""A training step with a callback whose update is not due reads nothing back from the device.

On a GPU every ``.item()``, ``bool(tensor)``, ``.cpu()``, ``.tolist()`` or boolean-mask index waits for the
queue to drain, so the host can no longer launch the next kernels while the current ones run. CUDA's sync
debug mode needs a GPU; here a TorchFunctionMode sees the same calls on the CPU, over one whole step
(every hook of every callback, the module's logging, the progress bar), in the middle of training.
"""

from __future__ import annotations

import collections
import traceback

import lightning.pytorch as pl
import pytest
import torch
from torch.overrides import TorchFunctionMode

from lightning_compress import (DigitsDataModule, ImageClassifier, IterativePruning, QuantizationAwareTraining,
                                TensorDecomposition, WeightSharing)

READS_BACK = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero"}


def _boolean_index(func, args) -> bool:
    if getattr(func, "__name__", "") not in ("__getitem__", "__setitem__") or len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)


class CountReadsBack(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS_BACK or _boolean_index(func, args):
            caller = [f for f in traceback.extract_stack()[:-1] if "site-packages/torch/" not in f.filename][-2:]
            self.calls[(func.__name__, " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in caller))] += 1
        return func(*args, **(kwargs or {}))


class WatchOneStep(pl.Callback):
    """First in the callback list: from this step's first hook to the next step's first hook."""

    def __init__(self, step: int) -> None:
        self.step, self.mode, self.seen = step, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.seen, self.mode = self.mode.calls, None
        elif trainer.global_step == self.step:
            self.mode = CountReadsBack()
            self.mode.__enter__()


STEPS_PER_EPOCH, WATCHED = 8, 10  # the watched step: epoch 1, between the mask updates of steps 8 and 12


def _agp(**kwargs):
    return IterativePruning(sparsity=0.8, schedule="agp", start_epoch=0, end_epoch=2, frequency=4, **kwargs)


CALLBACKS = {
    "dns + qat w4 per-channel": lambda: [_agp(rehabilitation=True), QuantizationAwareTraining(weight_bits=4, per_channel=True)],
    "obd": lambda: [_agp(criterion="obd")],
    "filter": lambda: [_agp(structure="filter", channel_multiple=1)],
    "kmeans sharing after pruning": lambda: [IterativePruning(sparsity=0.5, schedule="one_shot", start_epoch=0),
                                             WeightSharing(weight_bits=4, start_epoch=1)],
    "pq sharing": lambda: [WeightSharing(method="pq", subvector_size=1, start_epoch=0)],
    "binary": lambda: [QuantizationAwareTraining(scheme="binary")],
    "tucker": lambda: [TensorDecomposition(method="tucker", rank=0.5, rank_multiple=1, start_epoch=0, print_table=False)],
}


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_a_step_between_updates_reads_nothing_back(name):
    watch = WatchOneStep(step=WATCHED)
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=STEPS_PER_EPOCH, limit_val_batches=0, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[watch, *CALLBACKS[name]()])
    trainer.fit(ImageClassifier("digits_cnn", lr=0.01), datamodule=DigitsDataModule(batch_size=32))
    assert watch.seen is not None, "the watched step never ran"
    assert dict(watch.seen) == {}


USERS = {
    # a torchvision ResNet-18 (outside the registry) in a user's LightningModule without .model
    "resnet18": lambda: [IterativePruning(sparsity=0.5, schedule="agp", start_epoch=0, end_epoch=2, frequency=4,
                                          structure="filter", channel_multiple=1)],
    "linear_transformer": lambda: [_agp(rehabilitation=True), QuantizationAwareTraining(weight_bits=4, per_channel=True)],
}


@pytest.mark.parametrize("network", list(USERS))
def test_a_step_in_a_users_module_reads_nothing_back(network):
    from ..users.models import UserClassifier, loader

    watch = WatchOneStep(step=6)  # 4 batches an epoch: epoch 1, between the updates of steps 4 and 8
    trainer = pl.Trainer(max_epochs=3, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[watch, *USERS[network]()])
    trainer.fit(UserClassifier(network), loader(network))
    assert watch.seen is not None, "the watched step never ran"
    assert dict(watch.seen) == {}
