"""TensorDecomposition: one-shot Tucker-2 / CP / tensor-train / flattened factorization of convolutions and
SVD / TT-matrix of linear layers, then fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn
from typing_extensions import override

from ..methods.atomic import write_atomic
from ..methods.decomposition import METHODS, Factorized, LayerDecision, apply_plan, parse_rank, plan_decomposition
from ..methods.decomposition.flattened import check_flattened_rule
from ..methods.decomposition.plan import METRICS, accepts, plan_from_state, plan_to_state
from ..methods.structure import restore_structure
from .base import CompressionCallback
from .targets import compressible_root, resolve_targets


class TensorDecomposition(CompressionCallback):
    """Replace convolutions and linear layers by low-rank factorizations, once, then fine-tune them.

    The factorized layers are chains of ordinary small layers (see
    :mod:`lightning_compress.methods.decomposition.layers`): Tucker-2 ``1x1 -> KxK -> 1x1``, CP
    ``1x1 -> Kx1 -> 1xK -> 1x1`` (depthwise middle), SVD ``in -> r -> out``, tensor train
    ``1x1 -> Kx1 -> 1xK -> 1x1`` (full middle convs) or, for a Linear, three TT-matrix cores, and
    flattened ``1x1 -> Kx1 -> 1xK`` depthwise (``-> grouped 1x1`` with several terms per filter).
    Ranks are rounded up to multiples of ``rank_multiple`` (widths that tensor cores and vector units
    like), and a 1x1 stage that would not save parameters is folded into its neighbour, so the network
    gets faster, not only smaller.

    When: ``start_epoch=0`` factorizes in ``setup``, before optimizers and the DDP wrapper exist (the usual
    "decompose a trained model, then fine-tune"); ``start_epoch=N`` factorizes at the start of epoch N and then
    rebuilds the optimizers (keeping the state of untouched parameters, the learning rate and the
    scheduler's position) and, under DDP, the wrapper, so the new factors train on every process.

    Rebuilding: the plan (method and ranks per layer, measured errors) is in the callback's state and
    the checkpoint; the factorized structure is also recovered from the checkpoint's tensor shapes by a
    load-state-dict pre-hook, so a resumed fit, ``trainer.test(ckpt_path=...)`` and
    :meth:`TensorDecomposition.restore` (outside a Trainer) all rebuild it before the weights load.

    Args:
        method: ``"tucker"`` (Tucker-2 of KxK convs), ``"cp"`` (CP of KxK convs), ``"svd"`` (Linear and
            1x1 convs), ``"tt"`` (tensor train: TT-SVD of KxK convs, TT-matrix of Linear layers, see
            :mod:`lightning_compress.methods.decomposition.tensor_train`) or ``"flattened"`` (Jin et al.
            2014: each filter a sum of ``rank`` separable terms, see
            :mod:`lightning_compress.methods.decomposition.flattened`). Layers the method cannot factorize
            (grouped / depthwise convs, other kernels) are kept and listed with the reason.
        rank: int; float fraction of each mode; ``"energy:x"`` (smallest ranks keeping the fraction x of
            each unfolding's Frobenius norm); ``"vbmf"``; ``"svt"`` or ``"svt:t"``. For CP a rule gives the
            larger of the two channel-mode ranks, and a float is a fraction of the larger channel count.
            For TT a rule gives each TT rank from its unfolding. For flattened the rank is the number of
            terms per filter (int; float: a fraction of the terms that make a filter exact; ``"energy:x"``
            over the filters' orthogonal terms; not vbmf / svt), and ``rank_multiple`` does not apply.
            An int above a mode's size is clamped to it, with a warning.
        start_epoch: the epoch at whose start to factorize (0: in ``setup``).
        targets: module-name globs; default every layer the method considers.
        target_compression: instead of ``rank``, choose every layer's ranks together so that the whole
            model has ``target_compression`` times fewer parameters (or MACs, see ``metric``) with the least
            estimated reconstruction error per unit saved (Tucker, SVD, TT, flattened; not CP).
        metric: ``"params"`` or ``"macs"`` for ``target_compression`` (MACs need the data module's
            ``input_shape`` or ``input_size``).
        rank_multiple: round ranks up to a multiple of this (1: exact ranks).
        n_iter_max: refinement sweeps (HOOI for Tucker, ALS for CP; None: the method's default).
        input_size: ``(C, H, W)`` of one sample, for MACs; default the data module's ``input_shape``.
        filename: JSON of the plan written to the logger's directory at fit end (None: none).
        print_table: print the per-layer table (method, ranks, error, params and MACs) at fit end on rank 0.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_compress import DigitsDataModule, ImageClassifier, TensorDecomposition
        >>> decomposition = TensorDecomposition(method="tucker", rank=0.5, targets=["features.3"], print_table=False)
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[decomposition], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> module = ImageClassifier("digits_cnn", optimizer="adamw", lr=0.01)
        >>> trainer.fit(module, datamodule=DigitsDataModule())
        >>> type(module.model.features[3]).__name__, module.model.features[3].ranks
        ('Factorized', (16, 8))
    """

    def __init__(
        self,
        method: Literal["tucker", "cp", "svd", "tt", "flattened"] = "tucker",
        rank: int | float | str = "energy:0.9",
        start_epoch: int = 0,
        targets: list[str] | None = None,
        target_compression: float | None = None,
        metric: Literal["params", "macs"] = "params",
        rank_multiple: int = 8,
        n_iter_max: int | None = None,
        input_size: tuple[int, ...] | None = None,
        filename: str | None = "decomposition.json",
        print_table: bool = True,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not known; valid: {', '.join(map(repr, METHODS))}")
        rule = parse_rank(rank)
        if method == "flattened":
            check_flattened_rule(rule, rank)
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch={start_epoch!r} must be an integer >= 0 (0: factorize in setup)")
        if target_compression is not None:
            if not isinstance(target_compression, (int, float)) or isinstance(target_compression, bool) or not target_compression > 1:
                raise ValueError(f"target_compression={target_compression!r} must be a number > 1 (times fewer {metric}) or None")
            if method == "cp":
                raise ValueError("target_compression works with method 'tucker', 'svd', 'tt' or 'flattened', not 'cp' "
                                 "(CP has no error estimate without running it); give a rank instead")
        if metric not in METRICS:
            raise ValueError(f"metric={metric!r} is not known; valid: {', '.join(map(repr, METRICS))}")
        if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
            raise ValueError(f"rank_multiple={rank_multiple!r} must be an integer >= 1")
        if n_iter_max is not None and n_iter_max < 1:
            raise ValueError(f"n_iter_max={n_iter_max!r} must be >= 1 or None")
        super().__init__(targets)
        self.method = method
        self.rank = rank
        self.start_epoch = start_epoch
        self.target_compression = float(target_compression) if target_compression is not None else None
        self.metric = metric
        self.rank_multiple = rank_multiple
        self.n_iter_max = n_iter_max
        self.input_size = tuple(input_size) if input_size is not None else None
        self.filename = filename
        self.print_table = print_table
        self.decomposed = False  # checkpointed
        self.plan: list[LayerDecision] = []  # checkpointed

    order = 0

    def _state_key_fields(self) -> dict[str, Any]:
        return {"method": self.method, "targets": self.targets, "rank": self.rank,
                "target_compression": self.target_compression}

    # ------------------------------------------------------------------ structure

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        root = self._attach(trainer, pl_module)
        if self.decomposed:
            # The targets named the dense layers, which are factor chains now (a test after fit, a second fit).
            self._claim(trainer, root, [d.name for d in self.plan if d.method != "skip"])
        else:
            self._claim(trainer, root, self._resolve(root), accept=accepts(self.method))
            max_epochs = trainer.max_epochs if trainer is not None else None
            if stage == "fit" and self.start_epoch == 0:
                self._before_change(trainer, pl_module)
                self.decompose(trainer, pl_module)
            elif stage == "fit" and max_epochs is not None and 0 <= max_epochs <= self.start_epoch:
                rank_zero_warn(f"TensorDecomposition(start_epoch={self.start_epoch}) never factorizes: fit has max_epochs={max_epochs}. "
                               f"Use start_epoch < {max_epochs}.")
        self._setup_done(pl_module)

    def _resolve(self, root: nn.Module) -> list[str]:
        # A layer may be factorized already, before this callback's state says so: a checkpoint with factor
        # chains loads before the callback's state does. The chain stands for the layer it replaced.
        inside = {id(m) for f in root.modules() if isinstance(f, Factorized) for m in f.modules() if m is not f}
        accept = accepts(self.method)
        linear = "'svd' (Linear and 1x1 Conv2d layers) or 'tt' (Linear)"
        other = {"tucker": linear, "cp": linear, "flattened": linear, "svd": "'tucker', 'cp', 'tt' or 'flattened' (KxK Conv2d layers)",
                 "tt": "a technique other than decomposition (tt factorizes Conv2d and Linear layers)"}[self.method]
        return resolve_targets(root, self.targets, lambda m: isinstance(m, Factorized) or (id(m) not in inside and accept(m)),
                               f"layer that {self.method!r} considers", fix=f"For those, use method={other}")

    def _example(self, trainer: pl.Trainer | None, root: nn.Module) -> torch.Tensor | None:
        size = self.input_size
        if size is None and trainer is not None:
            size = getattr(trainer.datamodule, "input_shape", None) if trainer.datamodule is not None else None
        if size is None:
            return None
        parameter = next(root.parameters())
        return torch.zeros(1, *size, device=parameter.device, dtype=parameter.dtype)

    @torch.no_grad()
    def decompose(self, trainer: pl.Trainer | None, pl_module: nn.Module) -> list[LayerDecision]:
        """Plan the ranks from the current weights and factorize; the same plan on every process."""
        root = compressible_root(pl_module)
        if self._root is None:
            self._root, self._names = root, self._resolve(root)
        example = self._example(trainer, root)
        if self.metric == "macs" and example is None:
            raise ValueError("metric='macs' needs input_size=(C, H, W) or a data module with an input_shape")
        plan = plan_decomposition(root, self._names, self.method, self.rank, self.rank_multiple,
                                  self.target_compression, self.metric, example)
        if trainer is not None:
            # Ranks decide shapes: every process must build the same ones (DDP then syncs the values).
            plan = plan_from_state(trainer.strategy.broadcast(plan_to_state(plan), src=0))
        quiet = (trainer is not None and trainer.global_rank != 0) or not Console().is_terminal
        with Progress(transient=True, disable=quiet) as progress:
            task = progress.add_task(f"TensorDecomposition: {self.method}", total=sum(d.method != "skip" for d in plan))
            apply_plan(root, plan, from_weights=True, n_iter_max=self.n_iter_max, progress=lambda _: progress.advance(task))
        self.plan, self.decomposed = plan, True
        self._announce(trainer)
        return plan

    def _announce(self, trainer: pl.Trainer | None) -> None:
        done = [d for d in self.plan if d.method != "skip"]
        before = sum(d.params_before for d in self.plan)
        after = sum(d.params_after for d in self.plan)
        rank_zero_info(
            f"TensorDecomposition: {len(done)} of {len(self.plan)} layers factorized ({self.method}), "
            f"their parameters {before:,} -> {after:,} ({before / max(after, 1):.2f}x)"
        )
        if trainer is not None and trainer.logger is not None and trainer.global_rank == 0:
            metrics = {
                "decomposition/layers": float(len(done)),
                "decomposition/params_before": float(before),
                "decomposition/params_after": float(after),
                "decomposition/layer_compression": before / max(after, 1),
            }
            errors = [d.error for d in done if d.error is not None]
            if errors:
                metrics["decomposition/mean_error"] = sum(errors) / len(errors)
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ mid-fit factorization

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.decomposed or trainer.current_epoch < self.start_epoch:
            return
        strategy = trainer.strategy
        from torch.nn.parallel import DistributedDataParallel

        wrapped = isinstance(strategy.model, DistributedDataParallel)
        if not wrapped and strategy.model is not pl_module:
            raise RuntimeError(
                f"TensorDecomposition(start_epoch={self.start_epoch}) factorizes during fit on single-device and DDP "
                f"strategies; {type(strategy).__name__} wraps the model otherwise. Use start_epoch=0."
            )
        self._before_change(trainer, pl_module)
        self.decompose(trainer, pl_module)
        _rebuild_optimizers(trainer)
        if wrapped:
            # The old wrapper's reducer knows only the old parameters; a new one registers the factors
            # and broadcasts rank 0's values.
            strategy.model = strategy.model.module
            strategy.configure_ddp()

    # ------------------------------------------------------------------ reporting and state

    def table(self) -> Table:
        table = Table(title=f"TensorDecomposition ({self.method})")
        for column in ("layer", "method", "ranks", "error", "params before", "params after", "MACs before", "MACs after", "note"):
            table.add_column(column, justify="left" if column in ("layer", "method", "note") else "right")
        for d in self.plan:
            table.add_row(
                d.name, d.method, "x".join(map(str, d.ranks)) or "-",
                f"{d.error:.3f}" if d.error is not None else "-",
                f"{d.params_before:,}", f"{d.params_after:,}",
                f"{d.macs_before:,}" if d.macs_before is not None else "-",
                f"{d.macs_after:,}" if d.macs_after is not None else "-",
                d.note,
            )
        return table

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.decomposed:
            rank_zero_warn(f"TensorDecomposition never factorized in this fit (start_epoch={self.start_epoch}, fit ran "
                           f"{trainer.current_epoch} epochs): the model is dense")
            return
        if not any(d.method != "skip" for d in self.plan):
            rank_zero_warn("TensorDecomposition factorized no layer: every targeted layer was kept "
                           f"({'; '.join(f'{d.name}: {d.note}' for d in self.plan[:4])})")
        self._write(trainer)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer) -> None:
        if self.print_table:
            Console(width=None if Console().is_terminal else 160).print(self.table())
        if self.filename and trainer.logger is not None and trainer.log_dir:
            path = Path(trainer.log_dir) / self.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({"method": self.method, "layers": plan_to_state(self.plan)}, indent=2))

    @property
    @override
    def summary(self) -> dict[str, Any]:
        done = [d for d in self.plan if d.method != "skip"]
        before, after = sum(d.params_before for d in self.plan), sum(d.params_after for d in self.plan)
        return {
            "technique": "decomposition",
            "method": self.method,
            "decomposed": self.decomposed,
            "layers": plan_to_state(self.plan),
            "factorized_layers": len(done),
            "params_before": before,
            "params_after": after,
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"decomposed": self.decomposed, "plan": plan_to_state(self.plan)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_fields(state_dict, {"decomposed": bool, "plan": plan_from_state})

    @staticmethod
    def restore(model: nn.Module, checkpoint: str | Path | dict[str, Any]) -> nn.Module:
        """Load a checkpoint written during or after decomposition into a fresh (dense) ``model``.

        ``model`` is the LightningModule (or the bare network, for a checkpoint of one). The factorized
        layers are rebuilt first, from the callback's recorded plan when the checkpoint has one, else
        from the tensor shapes; then the weights load. Returns ``model``.
        """
        if not isinstance(checkpoint, dict):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = dict(checkpoint.get("state_dict", checkpoint))
        root = compressible_root(model)
        prefix = next(name for name, module in model.named_modules() if module is root)
        prefix = prefix + "." if prefix else ""
        for key, value in (checkpoint.get("callbacks") or {}).items():
            if key.startswith("TensorDecomposition") and isinstance(value, dict) and value.get("decomposed"):
                apply_plan(root, plan_from_state(value["plan"]), from_weights=False)
        restore_structure(root, state, prefix)
        model.load_state_dict(state)
        return model


def _rebuild_optimizers(trainer: pl.Trainer) -> None:
    """New optimizers and schedulers from ``configure_optimizers``, at the point the old ones reached.

    Parameters that survived the swap keep their optimizer state (momentum, Adam moments); the learning
    rates and the schedulers' positions are carried over, so a cosine schedule goes on, not restarts.
    """
    old_state = {p: s for optimizer in trainer.optimizers for p, s in optimizer.state.items()}
    old_lrs = [[group["lr"] for group in optimizer.param_groups] for optimizer in trainer.optimizers]
    old_schedulers = [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]
    trainer.strategy.setup_optimizers(trainer)
    for optimizer, lrs in zip(trainer.optimizers, old_lrs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p in old_state:
                    optimizer.state[p] = old_state[p]
        if len(lrs) == len(optimizer.param_groups):
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
    if len(old_schedulers) == len(trainer.lr_scheduler_configs):
        for config, state in zip(trainer.lr_scheduler_configs, old_schedulers):
            config.scheduler.load_state_dict(state)
    else:
        rank_zero_warn("TensorDecomposition: configure_optimizers returned a different number of schedulers; "
                       "the new ones start from their beginning")
