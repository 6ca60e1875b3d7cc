"""WeightSharing: k-means codebooks (Deep Compression) or product quantization at an epoch or at fit end,
centroid fine-tuning."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.progress import Progress
from torch import nn
from typing_extensions import override

from ..methods.optim_state import zero_weight_state
from ..methods.pruning import masks as M
from ..methods.sharing import codebook as C
from ..methods.sharing import product as P
from ..methods.sharing.kmeans import INITS
from ..methods.report import human_bytes
from .base import CompressionCallback, artifact_path, working
from .targets import compressible_root, detached, first_match, lookup, resolve_targets


METHODS = ("kmeans", "pq")


class WeightSharing(CompressionCallback):
    """Share each layer's weights through a codebook of 2^bits centroids found by 1-D k-means, or through
    product quantization (``method="pq"``).

    Pruned weights (exact zeros, or masked by :class:`IterativePruning`) stay zero and take no
    centroid. After clustering, the centroids are fine-tuned for the rest of ``fit`` (Han et al. 2016:
    each centroid's gradient is the sum of its members' gradients, the assignments fixed): the
    weights keep holding exactly their centroid's value, so the optimizer, DDP and checkpoints see
    ordinary weights plus two buffers, ``weight_code`` (int32 per weight, -1 where pruned) and
    ``weight_codebook``. At fit end (``finalize``) the buffers are dropped (the state dict loads into the
    original architecture) and, with ``export``, the packed file is written.

    With ``method="pq"`` (product quantization, Gong et al. 2014; :mod:`..methods.sharing.product`)
    each weight, seen as rows (a Linear's ``(out, in)``, a convolution's ``(out, in * kh * kw)``), is
    cut into sub-vectors of ``subvector_size`` entries; the sub-vectors of each column block are
    clustered into ``2**weight_bits`` centroids (at most one per row) and replaced by them. The
    buffers are then ``weight_pq_code`` (one int32 per sub-vector) and ``weight_pq_codebook``
    (``(blocks, K, subvector_size)``), and fine-tuning gives each centroid the sum (or mean) of its
    sub-vectors' gradients. ``setup`` refuses, naming them, the layers whose rows ``subvector_size``
    does not divide (leave them out with ``targets`` or give them their own size) and layers with a
    pruning mask (a sub-vector with pruned entries has no centroid; prune and then use ``"kmeans"``).
    The packed file stores such a layer as its codes, Huffman-coded, and its codebooks.

    Args:
        weight_bits: bits per code, 1..16: an int, or ``{glob: bits}`` per layer (first match wins; e.g.
            ``{"features.*": 8, "classifier": 5}`` as the paper's conv 8 / fc 5). Layers matching no glob
            are not shared.
        init: centroid initialisation: ``"linear"`` (even over [min, max]: keeps the rare large
            weights, Han et al.'s best), ``"density"`` (even over the CDF) or ``"random"``.
        start_epoch: cluster at the start of this epoch and fine-tune the centroids afterwards; None
            clusters once at fit end (no epoch is left to fine-tune in).
        finetune: train the centroids after clustering (from ``start_epoch`` on); False freezes the
            shared weights.
        finalize: at fit end drop the codes and codebooks (the weights hold their centroids' values, so
            the model computes the same) and fold pruning masks; False keeps them, to fine-tune the
            same centroids in a later fit.
        export: path of the packed artifact (``save_compressed``) written at fit end on rank 0; a
            relative path is under the Trainer's log directory.
        targets: module-name globs; default every Conv / Linear layer.
        iters: k-means iterations (it usually converges well before).
        centroid_gradient: ``"sum"`` of the members' gradients (the true gradient of the centroid,
            Han et al.) or their ``"mean"``. The sum over thousands of members makes SGD's steps
            that many times larger: with SGD prefer ``"mean"`` or a much smaller learning rate; Adam
            is insensitive to the scale.
        method: ``"kmeans"`` (one scalar codebook per layer) or ``"pq"`` (product quantization;
            its centroids start from k-means++, so ``init`` is the scalar method's alone).
        subvector_size: ``method="pq"`` only: entries per sub-vector, an int or ``{glob: size}`` per
            layer (first match wins; every shared layer must match one); default 4.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_compress import DigitsDataModule, ImageClassifier, WeightSharing
        >>> sharing = WeightSharing(weight_bits=4, start_epoch=1)
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[sharing], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> module = ImageClassifier("digits_cnn", optimizer="adamw", lr=0.01)
        >>> trainer.fit(module, datamodule=DigitsDataModule())
        >>> int(module.model.features[3].weight.unique().numel()) <= 16
        True
    """

    def __init__(
        self,
        weight_bits: int | dict[str, int] = 5,
        init: Literal["linear", "density", "random"] = "linear",
        start_epoch: int | None = None,
        finetune: bool = True,
        finalize: bool = True,
        export: str | None = None,
        targets: list[str] | None = None,
        iters: int = 50,
        centroid_gradient: Literal["sum", "mean"] = "sum",
        method: Literal["kmeans", "pq"] = "kmeans",
        subvector_size: int | dict[str, int] | None = None,
    ) -> None:
        bits = weight_bits
        for glob, value in (bits.items() if isinstance(bits, dict) else [(None, bits)]):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
                where = f"weight_bits[{glob!r}]" if glob is not None else "weight_bits"
                raise ValueError(f"{where}={value!r} must be an integer in 1..16")
        if isinstance(bits, dict) and not bits:
            raise ValueError("weight_bits={} names no layer; give an int or {glob: bits}")
        if init not in INITS:
            raise ValueError(f"init={init!r} is not known; valid: {', '.join(map(repr, INITS))}")
        if start_epoch is not None and (isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0):
            raise ValueError(f"start_epoch={start_epoch!r} must be an integer >= 0 or None (cluster at fit end)")
        if iters < 1:
            raise ValueError(f"iters={iters} must be >= 1")
        if centroid_gradient not in ("sum", "mean"):
            raise ValueError(f"centroid_gradient={centroid_gradient!r} is not known; valid: 'sum', 'mean'")
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not known; valid: {', '.join(map(repr, METHODS))}")
        if method == "kmeans" and subvector_size is not None:
            raise ValueError(f"subvector_size={subvector_size!r} applies to method='pq' only; method='kmeans' "
                             "shares scalar weights")
        if method == "pq":
            if init != "linear":
                raise ValueError(f"init={init!r} chooses the scalar codebooks' first centroids; method='pq' "
                                 "starts from k-means++ (leave init at 'linear')")
            subvector_size = 4 if subvector_size is None else subvector_size
            sizes = subvector_size.items() if isinstance(subvector_size, dict) else [(None, subvector_size)]
            for glob, value in sizes:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    where = f"subvector_size[{glob!r}]" if glob is not None else "subvector_size"
                    raise ValueError(f"{where}={value!r} must be an integer >= 1 that divides the rows of the "
                                     "layers it applies to (a Linear's in_features, a conv's in * kh * kw)")
            if isinstance(subvector_size, dict) and not subvector_size:
                raise ValueError("subvector_size={} names no layer; give an int or {glob: size}")
        super().__init__(targets)
        self.weight_bits = dict(bits) if isinstance(bits, dict) else bits
        self.init = init
        self.start_epoch = start_epoch
        self.finetune = finetune
        self.finalize = finalize
        self.export = export
        self.iters = iters
        self.centroid_gradient = centroid_gradient
        self.method = method
        self.subvector_size = dict(subvector_size) if isinstance(subvector_size, dict) else subvector_size
        self.clustered = False  # checkpointed
        self.artifact = None  # PackedSummary of the file written at fit end

    order = 3

    def _state_key_fields(self) -> dict[str, Any]:
        fields = {"targets": self.targets, "weight_bits": self.weight_bits}
        if self.method != "kmeans":  # k-means checkpoints keep the key they had before there was a choice
            fields.update(method=self.method, subvector_size=self.subvector_size)
        return fields

    def layer_bits(self, name: str) -> int | None:
        if isinstance(self.weight_bits, int):
            return self.weight_bits
        glob = first_match(name, self.weight_bits)
        return self.weight_bits[glob] if glob is not None else None

    def layer_subvector_size(self, name: str) -> int | None:
        """``method="pq"``: the layer's sub-vector length (None: no glob of ``subvector_size`` matches)."""
        if not isinstance(self.subvector_size, dict):
            return self.subvector_size
        glob = first_match(name, self.subvector_size)
        return self.subvector_size[glob] if glob is not None else None

    def _check_product(self, names: list[str]) -> None:
        """Every layer product quantization cannot take, in one error: its name, why, and the fix."""
        problems = []
        for name, layer in lookup(self._root, names).items():
            size = self.layer_subvector_size(name)
            reason = (f"no glob of subvector_size {list(self.subvector_size)!r} matches it" if size is None
                      else P.unsupported(layer, size))
            if reason is not None:
                problems.append((name, size, reason))
        if not problems:
            return
        lines = [f"{name}: {reason}" for name, _, reason in problems]
        common = sorted(set.intersection(*(set(P.divisors(P.row_length(layer))) for layer in lookup(self._root, names).values())))
        raise ValueError(
            f"WeightSharing(method='pq') cannot quantize {len(problems)} of its {len(names)} layers:\n  "
            + "\n  ".join(lines)
            + f"\nLeave them out with `targets`, or give them a subvector_size of their own ({{glob: size}}); "
            f"the sizes that divide every targeted layer's rows: {', '.join(map(str, common[:12]))}"
        )

    def _add_buffers(self, name: str, layer: nn.Module) -> None:
        if self.method == "pq":
            P.add_product_buffers(layer, self.layer_bits(name), self.layer_subvector_size(name))
        else:
            C.add_codebook_buffers(layer, self.layer_bits(name))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = self._attach(trainer, pl_module)
        names = resolve_targets(model, self.targets, M.is_prunable, "Conv/Linear layer")
        names = [n for n in names if self.layer_bits(n) is not None]
        if not names:
            raise ValueError(f"weight_bits globs {list(self.weight_bits)!r} match none of the targeted layers")
        self._claim(trainer, model, names, accept=M.is_prunable)
        if self.method == "pq":
            self._check_product(names)
        if self.start_epoch is not None:
            # Before weights load, so a checkpoint saved after clustering fills them.
            for name, layer in self.layers.items():
                self._add_buffers(name, layer)
            max_epochs = trainer.max_epochs if trainer is not None else None
            if stage == "fit" and max_epochs is not None and 0 <= max_epochs <= self.start_epoch:
                rank_zero_warn(f"WeightSharing(start_epoch={self.start_epoch}) is after the fit's last epoch (max_epochs={max_epochs}): "
                               "the weights are shared at fit end instead, without centroid fine-tuning")
        self._setup_done(pl_module)

    @torch.no_grad()
    def cluster(self, trainer: pl.Trainer | None = None) -> None:
        """Run k-means on every targeted layer and snap the weights to their centroids."""
        layers = self.layers
        quiet = (trainer is not None and trainer.global_rank != 0) or not Console().is_terminal
        with Progress(transient=True, disable=quiet) as progress:
            task = progress.add_task(f"WeightSharing: {self.method}", total=len(layers))
            for name, layer in layers.items():
                if self.method == "pq":
                    P.share_product(layer, self.layer_bits(name), self.layer_subvector_size(name), iters=self.iters)
                else:
                    C.share_weights(layer, self.layer_bits(name), init=self.init, iters=self.iters)
                progress.advance(task)
        (P.broadcast_product if self.method == "pq" else C.broadcast_codebooks)(layers.values())
        if trainer is not None:
            # Members of a cluster must share one optimizer history from now on.
            for optimizer in trainer.optimizers:
                for layer in layers.values():
                    zero_weight_state(optimizer, layer.weight)
        self.clustered = True

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.start_epoch is not None and not self.clustered and trainer.current_epoch >= self.start_epoch:
            self._before_change(trainer, pl_module)
            self.cluster(trainer)
            rank_zero_info(f"WeightSharing: clustered {len(self._names)} layers at epoch {trainer.current_epoch}")

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.clustered:
            return
        tie = P.tie_gradients if self.method == "pq" else C.tie_gradients
        for layer in self.layers.values():
            if self.finetune:
                tie(layer, self.centroid_gradient)
            elif layer.weight.grad is not None:
                layer.weight.grad.zero_()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.clustered:
            sync = P.sync_to_codebook if self.method == "pq" else C.sync_to_codebook
            for layer in self.layers.values():
                sync(layer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.clustered:
            self._before_change(trainer, pl_module)
            self.cluster(None)  # post-training sharing (start_epoch=None): on the CPU model, no optimizer left
        path = artifact_path(trainer, self.export)  # on every process: the log directory is broadcast
        if self.finalize:
            self._finalize(self.layers.values())
            # The codes are gone with their buffers: a second fit clusters again (the shared weights are
            # their own centroids, so k-means finds them back).
            self.clustered = False
            network = compressible_root(pl_module)
        elif path is not None:
            # The packed file stores a plain network: export a finalized copy, keep the codes here.
            with detached(pl_module):
                network = copy.deepcopy(compressible_root(pl_module))
            self._finalize(lookup(network, self._names).values())
        if path is not None:
            self._export(trainer, network, path)

    def _finalize(self, layers) -> None:
        """Fold pruning masks (shared values are only defined where kept) and drop the sharing buffers."""
        for layer in layers:
            M.remove_mask(layer, fold=True)
            C.remove_codebook_buffers(layer)  # scalar or product

    @rank_zero_only
    def _export(self, trainer: pl.Trainer, network: nn.Module, path: Path) -> None:
        from ..methods.sharing.packed import save_compressed

        path.parent.mkdir(parents=True, exist_ok=True)
        subvectors = None
        if self.method == "pq":  # the sub-vectors to look for in the shared weights
            subvectors = {f"{name}.weight" if name else "weight": self.layer_subvector_size(name) for name in self._names}
        with working(f"WeightSharing: packing {path.name} (relative indices, codebooks, Huffman)"):
            self.artifact = save_compressed(network, path, subvectors=subvectors)
        stages = " -> ".join(f"{k} {human_bytes(v)}" for k, v in self.artifact.stages().items())
        rank_zero_info(f"WeightSharing: wrote {path}: {stages} ({self.artifact.compression_ratio:.1f}x; per layer: "
                       "`lightning-compress inspect` the file)")
        if trainer.logger is not None:
            stages = {"dense": "fp32", "pruned": "pruned", "+ shared": "shared", "+ huffman": "huffman"}
            metrics = {f"sharing/bytes_{stages[k]}": float(v) for k, v in self.artifact.stages().items()}
            metrics["sharing/file_compression_ratio"] = self.artifact.compression_ratio
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage != "fit" and self._root is not None:
            for layer in self.layers.values():
                C.remove_codebook_buffers(layer)  # scalar or product

    @property
    @override
    def summary(self) -> dict[str, Any]:
        return {
            "technique": "sharing",
            "method": self.method,
            "layers": {name: self.layer_bits(name) for name in self._names},
            **({"subvector_size": {name: self.layer_subvector_size(name) for name in self._names}}
               if self.method == "pq" else {}),
            "clustered": self.clustered,
            "artifact": None if self.artifact is None else {
                "path": str(self.artifact.path), "bytes": self.artifact.file_bytes,
                "compression_ratio": self.artifact.compression_ratio, "stages": self.artifact.stages()},
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"clustered": self.clustered}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_fields(state_dict, {"clustered": bool})
