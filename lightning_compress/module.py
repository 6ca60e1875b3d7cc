"""ImageClassifier: a LightningModule around any registered classifier."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .methods.structure import plain_state_dict, restore_structure, restore_structure_on_load
from .models import create_model

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a Lightning checkpoint (``model.`` prefix removed) or of a plain state dict.

    Loads with ``weights_only=True``: a checkpoint can hold tensors and plain values, never code.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights={str(path)!r}: no such file")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    # Besides tensors, a module's extra state (fake-quant layers keep their formats there as plain values).
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) or k.endswith("_extra_state")
                                              for k, v in state.items()):
        raise ValueError(f"weights={str(path)!r} is neither a Lightning checkpoint nor a state dict of tensors")
    if any(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    return state


class ImageClassifier(pl.LightningModule):
    """Train and evaluate any model of the registry with cross-entropy and torchmetrics accuracy.

    Args:
        model: a name from :func:`lightning_compress.models.list_models`.
        num_classes: output classes (the CLI links it to the data module's ``num_classes``).
        model_kwargs: extra arguments of the model builder (``width`` of a VGG, for instance).
        optimizer: ``"sgd"`` (momentum, Nesterov) or ``"adamw"``.
        lr, momentum, weight_decay, nesterov: optimizer settings. Weight decay is not applied to
            biases and normalisation parameters.
        scheduler: ``"cosine"`` (per step, after ``warmup_epochs`` of linear warm-up), ``"onecycle"``
            or ``"none"``.
        label_smoothing: of the cross-entropy loss.
        weights: a checkpoint (Lightning ``.ckpt`` or a state dict) whose weights the model starts
            from; unlike ``ckpt_path`` of ``fit``, it restores no optimizer, epoch or callback state.
        channels_last: keep weights and inputs in NHWC memory format (faster convolutions on GPUs).
        compile: run the network through ``torch.compile`` (``True``, or one of its modes:
            ``"default"``, ``"reduce-overhead"`` (CUDA graphs), ``"max-autotune"``,
            ``"max-autotune-no-cudagraphs"``). It is compiled at its first call, after the callbacks
            built their layers, and again when one changes the structure (a decomposition mid-fit); the
            state dict keeps its plain names. On CUDA the SGD / AdamW update is the fused kernel either way.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_compress import DigitsDataModule, ImageClassifier
        >>> module = ImageClassifier("digits_cnn", optimizer="adamw", lr=0.01)
        >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(module, datamodule=DigitsDataModule())
    """

    def __init__(
        self,
        model: str = "vgg19_bn",
        num_classes: int = 10,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
        scheduler: Literal["cosine", "onecycle", "none"] = "cosine",
        warmup_epochs: float = 0.0,
        label_smoothing: float = 0.0,
        weights: str | None = None,
        channels_last: bool = False,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer={optimizer!r} is not supported; valid: 'sgd', 'adamw'")
        if scheduler not in ("cosine", "onecycle", "none"):
            raise ValueError(f"scheduler={scheduler!r} is not supported; valid: 'cosine', 'onecycle', 'none'")
        if lr <= 0:
            raise ValueError(f"lr={lr} must be > 0")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={warmup_epochs} must be >= 0")
        if compile not in (True, False, *COMPILE_MODES):
            raise ValueError(f"compile={compile!r} is not supported; valid: True, False, "
                             + ", ".join(repr(m) for m in COMPILE_MODES))
        self.save_hyperparameters()
        self.model = create_model(model, num_classes=num_classes, **(model_kwargs or {}))
        if weights:
            # A compressed checkpoint of any technique starts a new run as plain weights (masks folded
            # in, fake-quant and codebook state dropped) in the shapes it was saved with.
            state = plain_state_dict(load_weights(weights))
            restore_structure(self.model, state)
            self.model.load_state_dict(state)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        # Any checkpoint of a compressed run loads into a freshly built classifier (load_from_checkpoint,
        # test(ckpt_path=...), resume, the weights ddp_spawn copies back): its structure is rebuilt first.
        restore_structure_on_load(self)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._network()(x)

    def _network(self) -> nn.Module:
        if not self.hparams.get("compile"):
            return self.model
        compiled = self.__dict__.get("_compiled")
        if compiled is None or compiled._orig_mod is not self.model:  # a peer or a user swapped the network
            mode = None if self.hparams.compile is True else self.hparams.compile
            compiled = torch.compile(self.model, mode=mode)
            # Kept out of the module tree: state dict keys, hooks and callbacks see the plain network.
            self.__dict__["_compiled"] = compiled
        return compiled

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_compiled", None)  # compiled code does not pickle (ddp_spawn, deepcopy): rebuilt on use
        return state

    def _step(self, batch, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.criterion(logits, labels)
        # update, not forward: forward also computes this batch's accuracy, kernels nobody reads
        metric.update(logits.detach(), labels)
        on_step = stage == "train"
        # No step value on the progress bar: Lightning turns every progress-bar tensor into a Python number
        # after every batch, a host sync that stalls a GPU's queue each step. The logger still gets the step
        # loss every log_every_n_steps, the bar the epoch means.
        self.log(f"{stage}/loss", loss.detach(), on_step=on_step, on_epoch=True, prog_bar=not on_step, sync_dist=not on_step)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def _param_groups(self) -> list[dict]:
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                # Decaying BN scales and biases only shrinks them toward zero for no regularisation gain.
                (no_decay if p.ndim <= 1 else decay).append(p)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self):
        hp = self.hparams
        # One fused kernel for the whole update instead of a few per tensor (foreach): on a GPU the step of
        # a small network is launch-bound. The state (momentum buffers) is the same, so masks clear it alike.
        fused = {"fused": True} if self.device.type == "cuda" else {}
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(self._param_groups(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, **fused)
        else:
            optimizer = torch.optim.AdamW(self._param_groups(), lr=hp.lr, **fused)
        if hp.scheduler == "none":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if hp.scheduler == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=total)
        else:
            steps_per_epoch = total / max(1, self.trainer.max_epochs or 1)
            warmup = min(total - 1, int(hp.warmup_epochs * steps_per_epoch))

            def cosine_with_warmup(step: int) -> float:
                if step < warmup:
                    return (step + 1) / (warmup + 1)
                progress = min(1.0, (step - warmup) / max(1, total - warmup))
                return 0.5 * (1.0 + math.cos(math.pi * progress))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
