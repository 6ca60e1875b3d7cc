"""WeightSharing: k-means codebooks (Deep Compression) at an epoch or at fit end, centroid fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.progress import Progress
from torch import nn
from typing_extensions import override

from ..methods.distributed import broadcast_
from ..methods.optim_state import zero_weight_state
from ..methods.pruning import masks as M
from ..methods.sharing import codebook as C
from ..methods.sharing.kmeans import INITS
from .base import CompressionCallback
from .targets import compressible_root, first_match, resolve_targets


class WeightSharing(CompressionCallback):
    """Share each layer's weights through a codebook of 2^bits centroids found by 1-D k-means.

    Pruned weights (exact zeros, or masked by :class:`IterativePruning`) stay zero and take no
    centroid. After clustering, the centroids are fine-tuned for the rest of ``fit`` (Han et al. 2016:
    each centroid's gradient is the sum of its members' gradients, the assignments fixed): the
    weights keep holding exactly their centroid's value, so the optimizer, DDP and checkpoints see
    ordinary weights plus two buffers, ``weight_code`` (int32 per weight, -1 where pruned) and
    ``weight_codebook``. At fit end the buffers are dropped (the state dict loads into the original
    architecture) and, with ``export``, the packed file is written.

    Args:
        bits: bits per code, 1..16: an int, or ``{glob: bits}`` per layer (first match wins; e.g.
            ``{"features.*": 8, "classifier": 5}`` as the paper's conv 8 / fc 5). Layers matching no glob
            are not shared.
        init: centroid initialisation: ``"linear"`` (even over [min, max]: keeps the rare large
            weights, Han et al.'s best), ``"density"`` (even over the CDF) or ``"random"``.
        epoch: cluster at the start of this epoch and fine-tune the centroids afterwards; None
            clusters once at fit end (no fine-tuning).
        finetune: train the centroids after clustering; False freezes the shared weights.
        export: path of the packed artifact (``save_compressed``) written at fit end on rank 0.
        targets: module-name globs; default every Conv / Linear layer.
        iters: k-means iterations (it usually converges well before).
        centroid_gradient: ``"sum"`` of the members' gradients (the true gradient of the centroid,
            Han et al.) or their ``"mean"``. The sum over thousands of members makes SGD's steps
            that many times larger: with SGD prefer ``"mean"`` or a much smaller learning rate; Adam
            is insensitive to the scale.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_compress import DigitsDataModule, ImageClassifier, WeightSharing
        >>> sharing = WeightSharing(bits=4, epoch=1)
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[sharing], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> module = ImageClassifier("digits_cnn", optimizer="adamw", lr=0.01)
        >>> trainer.fit(module, datamodule=DigitsDataModule())
        >>> int(module.model.features[3].weight.unique().numel()) <= 16
        True
    """

    def __init__(
        self,
        bits: int | dict[str, int] = 5,
        init: str = "linear",
        epoch: int | None = None,
        finetune: bool = True,
        export: str | None = None,
        targets: list[str] | None = None,
        iters: int = 50,
        centroid_gradient: str = "sum",
    ) -> None:
        for glob, value in (bits.items() if isinstance(bits, dict) else [(None, bits)]):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
                where = f"bits[{glob!r}]" if glob is not None else "bits"
                raise ValueError(f"{where}={value!r} must be an integer in 1..16")
        if isinstance(bits, dict) and not bits:
            raise ValueError("bits={} names no layer; give an int or {glob: bits}")
        if init not in INITS:
            raise ValueError(f"init={init!r} is not known; valid: {', '.join(map(repr, INITS))}")
        if epoch is not None and epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0 or None (cluster at fit end)")
        if iters < 1:
            raise ValueError(f"iters={iters} must be >= 1")
        if centroid_gradient not in ("sum", "mean"):
            raise ValueError(f"centroid_gradient={centroid_gradient!r} is not known; valid: 'sum', 'mean'")
        super().__init__(targets)
        self.bits = dict(bits) if isinstance(bits, dict) else bits
        self.init = init
        self.epoch = epoch
        self.finetune = finetune
        self.export = export
        self.iters = iters
        self.centroid_gradient = centroid_gradient
        self.clustered = False  # checkpointed
        self.export_summary = None  # PackedSummary of the file written at fit end

    order = 3

    def _state_key_fields(self) -> dict[str, Any]:
        return {"targets": self.targets, "bits": self.bits}

    def layer_bits(self, name: str) -> int | None:
        if isinstance(self.bits, int):
            return self.bits
        glob = first_match(name, self.bits)
        return self.bits[glob] if glob is not None else None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = self._attach(trainer, pl_module)
        names = resolve_targets(model, self.targets, M.is_prunable, "Conv/Linear layer")
        names = [n for n in names if self.layer_bits(n) is not None]
        if not names:
            raise ValueError(f"bits globs {list(self.bits)!r} match none of the targeted layers")
        self._claim(trainer, model, names, accept=M.is_prunable)
        if self.epoch is not None:
            # Before weights load, so a checkpoint saved after clustering fills them.
            for name, layer in self.layers.items():
                C.add_codebook_buffers(layer, self.layer_bits(name))
            max_epochs = trainer.max_epochs if trainer is not None else None
            if stage == "fit" and max_epochs is not None and 0 <= max_epochs <= self.epoch:
                rank_zero_warn(f"WeightSharing(epoch={self.epoch}) is after the fit's last epoch (max_epochs={max_epochs}): "
                               "the weights are shared at fit end instead, without centroid fine-tuning")
        self._setup_done(pl_module)

    @torch.no_grad()
    def cluster(self, trainer: pl.Trainer | None = None) -> None:
        """Run k-means on every targeted layer and snap the weights to their centroids."""
        layers = self.layers
        quiet = (trainer is not None and trainer.global_rank != 0) or not Console().is_terminal
        with Progress(transient=True, disable=quiet) as progress:
            task = progress.add_task("WeightSharing: k-means", total=len(layers))
            for name, layer in layers.items():
                C.share_weights(layer, self.layer_bits(name), init=self.init, iters=self.iters)
                progress.advance(task)
        _broadcast_codes(layers.values())
        if trainer is not None:
            # Members of a cluster must share one optimizer history from now on.
            for optimizer in trainer.optimizers:
                for layer in layers.values():
                    zero_weight_state(optimizer, layer.weight)
        self.clustered = True

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.epoch is not None and not self.clustered and trainer.current_epoch >= self.epoch:
            self.cluster(trainer)
            rank_zero_info(f"WeightSharing: clustered {len(self._names)} layers at epoch {trainer.current_epoch}")

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.clustered:
            return
        for layer in self.layers.values():
            if self.finetune:
                C.tie_gradients(layer, self.centroid_gradient)
            elif layer.weight.grad is not None:
                layer.weight.grad.zero_()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.clustered:
            for layer in self.layers.values():
                C.sync_to_codebook(layer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.clustered:
            self.cluster(None)  # post-training sharing (epoch=None): on the CPU model, no optimizer left
        self.finalize(pl_module)
        if self.export:
            self._export(trainer, pl_module)

    def finalize(self, pl_module: nn.Module) -> None:
        """Fold pruning masks (shared values are only defined where kept) and drop the sharing buffers."""
        for layer in self.layers.values():
            M.remove_mask(layer, fold=True)
            C.remove_codebook_buffers(layer)
        # The codes are gone with their buffers: a second fit clusters again (the shared weights are
        # their own centroids, so k-means finds them back).
        self.clustered = False

    @rank_zero_only
    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from ..methods.sharing.packed import save_compressed

        path = Path(self.export)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.export_summary = save_compressed(compressible_root(pl_module), path)
        Console(width=None if Console().is_terminal else 160).print(self.export_summary.table(title=f"Packed file {path}"))
        if trainer.logger is not None:
            stages = {"dense": "fp32", "pruned": "pruned", "+ shared": "shared", "+ huffman": "huffman"}
            metrics = {f"sharing/bytes_{stages[k]}": float(v) for k, v in self.export_summary.stages().items()}
            metrics["sharing/file_compression_ratio"] = self.export_summary.compression_ratio
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage != "fit" and self._root is not None:
            for layer in self.layers.values():
                C.remove_codebook_buffers(layer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"clustered": self.clustered}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.clustered = state_dict["clustered"]


def _broadcast_codes(layers) -> None:
    """Rank 0's codes and codebooks everywhere (k-means is deterministic; this rules out device ties)."""
    for layer in layers:
        broadcast_(layer.weight_code)
        broadcast_(layer.weight_codebook)
        C._write_weights(layer)
