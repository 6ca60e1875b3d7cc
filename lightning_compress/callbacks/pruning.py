"""IterativePruning: scheduled magnitude / OBD pruning with rehabilitation masks, inside ``fit``."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from ..methods.pruning import masks as M
from ..methods.pruning import selection as S
from ..methods.pruning.pruner import Pruner
from ..methods.pruning.schedule import PruningSchedule
from ..methods.sharing.codebook import is_shared
from .base import CompressionCallback
from .targets import first_match, resolve_targets


class IterativePruning(CompressionCallback):
    """Prune Conv / Linear weights on a schedule while the model trains.

    Masks are bool buffers beside the weights (``<layer>.weight_mask``): state-dict keys of the
    weights never change, a checkpoint saved mid-schedule resumes with its masks, and at the end
    of ``fit`` the masks are folded into the weights so that the state dict loads into the
    unpruned architecture with exact zeros.

    Args:
        sparsity: final fraction of weights pruned, in [0, 1): one float, or ``{glob: value}`` per
            layer (first matching glob wins; layers that match none are not pruned). A
            ``sparsity.yaml`` written by ``lightning-compress-sensitivity`` is such a dict.
        schedule: ``"one_shot"`` at ``start_epoch``; ``"iterative"``: a pruning round at the start of
            each epoch from ``start_epoch`` to ``end_epoch``, retraining between (Han et al. 2015);
            ``"agp"``: s_t = s_f + (s_i - s_f)(1 - p)^3 from the start of ``start_epoch`` to the start of
            ``end_epoch``, masks updated every ``frequency`` steps (Zhu and Gupta 2017).
        start_epoch, end_epoch: extent of the schedule.
        frequency: optimizer steps between AGP updates, and between rehabilitation updates.
        initial_sparsity: AGP's s_i.
        rehabilitation: Dynamic Network Surgery (Guo et al. 2016). The forward uses the masked weights,
            the gradient updates all dense weights (straight-through), and every ``frequency`` steps
            until ``end_epoch`` (for ever when ``end_epoch <= start_epoch``) the masks are recomputed from
            the dense weights with hysteresis ``margin``: a pruned weight is spliced back once it grows
            past the cut. After ``end_epoch`` the masks stay fixed while the network fine-tunes. Without it, a pruned weight is exactly zero and
            stays so: its gradient is masked and its momentum / Adam state cleared when it is pruned.
        margin: DNS hysteresis; a kept weight's score counts ``1 + margin`` times in the ranking.
        scope: ``"layer"`` (each layer reaches its sparsity) or ``"global"`` (one ranking of all
            targeted weights; magnitudes compared across layers, as Han et al.).
        structure: ``"unstructured"`` (single weights) or ``"filter"`` (whole output channels of
            convolutions, ranked by L1 / L2 norm (``norm``), masked with their BatchNorm channels during
            training and physically removed with the next layer's input channels at fit end when
            ``finalize``: the model becomes smaller and faster on dense hardware). Channels tied by
            residual adds, depthwise convs, concatenations, chunks or channel shuffles (ResNet,
            MobileNet, ShuffleNet, SqueezeNet) are one group with one score, removed from every layer
            that carries them; ``scope="layer"`` then prunes each block of tied convs to the target.
            Convs whose channels cannot go (a model output, an untraceable forward) are left whole,
            with the reason in a warning and in ``summary["left_whole"]``.
        criterion: ``"magnitude"``, ``"obd"`` (Optimal Brain Damage saliency 1/2 h_ii w_i^2, with the
            Hessian diagonal h_ii estimated as the mean squared mini-batch gradient over the steps
            since the previous update (the empirical Fisher); an update waits until at least
            ``obd_batches`` batches were seen) or ``"bn_scale"`` (network slimming, Liu et al. 2017;
            ``structure="filter"``: channels ranked by ``|gamma|`` of the BatchNorm after each conv, trained
            with an L1 penalty ``bn_penalty`` on those scales until the last mask change: ``start_epoch`` for
            one-shot, else ``end_epoch``).
        bn_penalty: the strength of that L1 penalty (Liu et al. use 1e-4 with SGD on CIFAR; Adam normalises
            it with the rest of the gradient); 0 ranks the scales as they are.
        targets: module-name globs relative to the network (``"features.*"``); default every
            Conv1d/2d/3d and Linear (for ``"filter"``: every convolution that can be removed).
        rewind_epoch: lottery-ticket rewinding (Frankle et al. 2019): the weights at the start of
            this epoch are saved, and after each pruning round the surviving weights are reset to
            them. Must not be after ``start_epoch``.
        finalize: at fit end fold the masks into the weights (exact zeros) and drop the pruning buffers
            (for filters, remove the channels): the model computes the same, and its state dict loads into
            the unpruned architecture. False keeps the masks (to go on pruning in a later fit).
        log_layers: log each layer's sparsity besides the global one.
        channel_multiple: ``structure="filter"``: every pruned conv (each block of tied convs) keeps a
            multiple of this many channels, the nearest to its target (all of them when it has fewer).
            Vector kernels work on blocks of channels (ONNX Runtime's NCHWc layout on x86, XNNPACK, tensor
            cores): MobileNetV2 pruned to 2x fewer MACs with counts like 22 and 99 ran 1.3x *slower* than
            unpruned in ONNX Runtime (batch 1, AVX2). 1 allows any count.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_compress import DigitsDataModule, ImageClassifier, IterativePruning
        >>> pruning = IterativePruning(sparsity=0.8, schedule="agp", start_epoch=0, end_epoch=2, frequency=5)
        >>> trainer = pl.Trainer(max_epochs=3, callbacks=[pruning], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> module = ImageClassifier("digits_cnn", optimizer="adamw", lr=0.01)
        >>> trainer.fit(module, datamodule=DigitsDataModule())
        >>> round(pruning.history[-1][1], 3)
        0.8
    """

    def __init__(
        self,
        sparsity: float | dict[str, float] = 0.5,
        schedule: Literal["one_shot", "iterative", "agp"] = "agp",
        start_epoch: int = 0,
        end_epoch: int = 10,
        frequency: int = 100,
        initial_sparsity: float = 0.0,
        rehabilitation: bool = False,
        margin: float = 0.1,
        scope: Literal["layer", "global"] = "layer",
        structure: Literal["unstructured", "filter"] = "unstructured",
        criterion: Literal["magnitude", "obd", "bn_scale"] = "magnitude",
        bn_penalty: float = 1e-4,
        norm: Literal[1, 2] = 1,
        obd_batches: int = 16,
        targets: list[str] | None = None,
        rewind_epoch: int | None = None,
        finalize: bool = True,
        log_layers: bool = True,
        channel_multiple: int = 8,
    ) -> None:
        if isinstance(sparsity, dict):
            if not sparsity:
                raise ValueError("sparsity={} names no layer; give a float or {glob: value}")
            for glob, value in sparsity.items():
                if not 0.0 <= float(value) < 1.0:
                    raise ValueError(f"sparsity[{glob!r}]={value} must be in [0, 1)")
            if scope == "global":
                raise ValueError("sparsity as a per-layer dict needs scope='layer', got scope='global'")
            final = max(float(v) for v in sparsity.values())
        else:
            final = float(sparsity)
        for name, value, valid in (
            ("scope", scope, S.SCOPES),
            ("structure", structure, S.STRUCTURES),
            ("criterion", criterion, S.CRITERIA),
        ):
            if value not in valid:
                raise ValueError(f"{name}={value!r} is not known; valid: {', '.join(map(repr, valid))}")
        if norm not in (1, 2):
            raise ValueError(f"norm={norm} is not supported; valid: 1 (L1), 2 (L2)")
        if margin < 0:
            raise ValueError(f"margin={margin} must be >= 0")
        if criterion == "bn_scale" and structure != "filter":
            raise ValueError(f"criterion='bn_scale' ranks whole channels: it needs structure='filter', got {structure!r}")
        if not 0.0 <= bn_penalty < 1.0:
            raise ValueError(f"bn_penalty={bn_penalty} must be in [0, 1)")
        if obd_batches < 1:
            raise ValueError(f"obd_batches={obd_batches} must be >= 1")
        if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, int) or channel_multiple < 1:
            raise ValueError(f"channel_multiple={channel_multiple!r} must be an integer >= 1 (1: any channel count)")
        if rewind_epoch is not None and not 0 <= rewind_epoch <= start_epoch:
            raise ValueError(f"rewind_epoch={rewind_epoch} must be in [0, start_epoch={start_epoch}]")
        super().__init__(targets)
        # The schedule validates sparsity, epochs and frequency with the argument names users wrote.
        self.schedule = PruningSchedule(schedule, final, start_epoch, end_epoch, initial_sparsity, frequency)
        self.sparsity = dict(sparsity) if isinstance(sparsity, dict) else final
        self.rehabilitation = rehabilitation
        self.margin = margin
        self.scope = scope
        self.structure = structure
        self.criterion = criterion
        self.norm = norm
        self.channel_multiple = channel_multiple
        self.bn_penalty = bn_penalty
        self.obd_batches = obd_batches
        self.rewind_epoch = rewind_epoch
        self.finalize = finalize
        self.log_layers = log_layers
        # Progress, checkpointed in state_dict(): replayed on resume, never recomputed.
        self.last_update_step: int | None = None
        self.current_target: float | None = None
        self.history: list[tuple[int, float]] = []
        self.rewind_saved = False
        self.obd_count = 0
        # Built in setup from the arguments alone.
        self._groups: dict[str, Any] = {}
        self._channels = None
        self._left_whole: dict[str, str] = {}  # convs structure="filter" cannot prune, with the reason
        self._pruner: Pruner | None = None

    order = 1

    def _state_key_fields(self) -> dict[str, Any]:
        return {"targets": self.targets, "sparsity": self.sparsity, "structure": self.structure,
                "start_epoch": self.schedule.start_epoch}

    # ------------------------------------------------------------------ structure (setup)

    def _candidates(self, model: nn.Module) -> list[str]:
        if self.structure == "unstructured":
            names = resolve_targets(model, self.targets, M.is_prunable, "Conv/Linear layer")
        else:
            from ..methods.pruning.channels import analyse_channels, find_channel_groups

            self._channels = analyse_channels(model)
            self._groups = find_channel_groups(model, self._channels)
            refused = self._channels.reasons
            is_conv = lambda m: isinstance(m, nn.Conv2d)  # noqa: E731
            names = resolve_targets(model, self.targets, is_conv, "Conv2d layer")
            # A depthwise conv's channels are removed with those of the layer that feeds it: nothing to refuse.
            # (A depthwise conv named literally in targets is refused below, with that reason.)
            literal = set(self.targets or [])
            names = [n for n in names if n in literal or self._channels.layers.get(n, None) is None
                     or self._channels.layers[n].kind != "depthwise"]
            bad = {n: refused.get(n, "not a removable filter group") for n in names if n not in self._groups}
            if bad and self.targets is not None:
                detail = "; ".join(f"{n}: {why}" for n, why in list(bad.items())[:6])
                raise ValueError(f"structure='filter' cannot remove the channels of targets {sorted(bad)}: {detail}")
            skipped = [n for n in names if n not in self._groups]
            self._left_whole = {n: refused.get(n, "not removable") for n in skipped}
            names = [n for n in names if n in self._groups]
            tied = [c for n in names for c in self._groups[n].coupled if c not in names]
            if tied:
                # Tied channels go together or not at all: prune the convs they are tied to as well.
                rank_zero_warn(f"structure='filter' also prunes {sorted(set(tied))[:6]}{' ...' if len(set(tied)) > 6 else ''}: "
                               "their channels are tied to those of the targets (residual adds, concatenations, shuffles)")
                names += [c for c in self._groups if c in set(tied) and c not in names]
            if skipped and names:
                rank_zero_warn(
                    f"structure='filter' prunes {len(names)} convolutions and leaves {len(skipped)} whose channels "
                    f"cannot be removed (e.g. {skipped[0]}: {refused.get(skipped[0], 'not removable')})"
                )
            if not names:
                detail = "; ".join(f"{n}: {why}" for n, why in list(refused.items())[:6])
                raise ValueError(
                    f"structure='filter' found no convolution whose channels can be removed ({detail}). "
                    "Use structure='unstructured' for this model."
                )
        unnormed = [n for n in names if self.criterion == "bn_scale" and self._groups[n].norm is None]
        if unnormed:
            raise ValueError(f"criterion='bn_scale' ranks channels by the BatchNorm after each convolution; "
                             f"{unnormed[:6]} have none. Target the convolutions that have one, or use criterion='magnitude'")
        if self.structure == "filter":
            narrow = [n for n in names if model.get_submodule(n).out_channels <= self.channel_multiple]
            if narrow and len(narrow) == len(names):
                raise ValueError(
                    f"channel_multiple={self.channel_multiple}: every targeted convolution has at most that many "
                    f"output channels (e.g. {narrow[0]}: {model.get_submodule(narrow[0]).out_channels}), so none can "
                    "keep a smaller multiple of it. Set channel_multiple=1 (any count) or a smaller multiple."
                )
            if narrow:
                rank_zero_warn(f"channel_multiple={self.channel_multiple} leaves {len(narrow)} convolutions of at most "
                               f"{self.channel_multiple} channels whole (e.g. {narrow[0]}); channel_multiple=1 prunes them")
        if isinstance(self.sparsity, dict):
            names = [n for n in names if first_match(n, self.sparsity) is not None]
            if not names:
                raise ValueError(f"sparsity globs {list(self.sparsity)!r} match none of the targeted layers")
        return names

    def layer_sparsity(self, name: str, target: float) -> float:
        """A layer's share of the schedule: per-layer dicts scale with the schedule's progress."""
        if not isinstance(self.sparsity, dict):
            return target
        final = float(self.sparsity[first_match(name, self.sparsity)])
        return final * target / self.schedule.final if self.schedule.final else 0.0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = self._attach(trainer, pl_module)
        names = self._candidates(model)
        self._claim(trainer, model, names, accept=M.is_prunable if self.structure == "unstructured" else None)
        if self._pruner is not None:  # setup again (a checkpoint replaced layers, or a new stage)
            self._pruner.remove_hooks()
        self._pruner = Pruner(model, names, scope=self.scope, structure=self.structure, criterion=self.criterion,
                              norm=self.norm, rehabilitation=self.rehabilitation, margin=self.margin,
                              layer_target=self.layer_sparsity, channels=self._channels, rewind=self.rewind_epoch is not None,
                              channel_multiple=self.channel_multiple)
        self._pruner.saliency_batches = self.obd_count
        # A second fit after the masks were folded in: the exact zeros are the masks.
        self._pruner.attach(masks_from_zeros=bool(self.history))
        if stage == "fit":
            self._warn_if_out_of_reach(trainer)
        self._setup_done(pl_module)

    def _warn_if_out_of_reach(self, trainer: pl.Trainer | None) -> None:
        """A schedule that the fit's epochs cannot hold does little or nothing: say so before any work."""
        max_epochs = trainer.max_epochs if trainer is not None else None
        if max_epochs is None or max_epochs < 0:
            return
        start, end = self.schedule.start_epoch, self.schedule.end_epoch
        if start >= max_epochs:
            rank_zero_warn(f"IterativePruning(start_epoch={start}) never prunes: fit has max_epochs={max_epochs}. "
                           f"Use start_epoch < {max_epochs}.")
        elif self.schedule.kind == "agp" and end >= max_epochs:
            rank_zero_warn(
                f"IterativePruning(schedule='agp', end_epoch={end}) reaches sparsity {self.schedule.final} at the "
                f"start of epoch {end}, but fit has max_epochs={max_epochs}: it ends below it. Use end_epoch < "
                f"{max_epochs} (epochs after end_epoch fine-tune the pruned network)."
            )
        elif self.schedule.kind == "iterative" and end >= max_epochs:
            rank_zero_warn(f"IterativePruning(schedule='iterative', end_epoch={end}) prunes its last round at the "
                           f"start of epoch {end}, but fit has max_epochs={max_epochs}. Use end_epoch < {max_epochs}.")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        steps_per_epoch = self._steps_per_epoch(trainer)
        ramp = (self.schedule.end_epoch - self.schedule.start_epoch) * steps_per_epoch
        frequency = self.schedule.frequency
        if self.schedule.kind == "agp" and frequency > ramp // 2:
            rank_zero_warn(
                f"IterativePruning(frequency={frequency}) updates the AGP target every {frequency} steps, but the ramp "
                f"from epoch {self.schedule.start_epoch} to {self.schedule.end_epoch} has {ramp} steps "
                f"({steps_per_epoch} per epoch): the sparsity jumps to {self.schedule.final} at end_epoch instead of "
                f"rising gradually. Use frequency <= {max(1, ramp // 10)}."
            )
        if self.rehabilitation and not self._splicing(trainer.global_step + frequency, steps_per_epoch):
            rank_zero_warn(f"IterativePruning(rehabilitation=True, frequency={frequency}): no mask update falls "
                           f"before end_epoch={self.schedule.end_epoch}, so no pruned weight can be spliced back. "
                           f"Use frequency <= {max(1, ramp // 10)}.")

    # ------------------------------------------------------------------ schedule (training)

    @staticmethod
    def _steps_per_epoch(trainer: pl.Trainer) -> int:
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError("IterativePruning needs a training DataLoader with a length (the schedule counts steps)")
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rewind_epoch is not None and not self.rewind_saved and trainer.current_epoch >= self.rewind_epoch:
            self._pruner.save_rewind_point()
            self.rewind_saved = True

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        steps_per_epoch = self._steps_per_epoch(trainer)
        target = self.schedule.target(step, steps_per_epoch)
        if target is None:
            return
        due = (
            self.last_update_step is None
            or target != self.current_target
            or (
                self.rehabilitation
                and step - self.last_update_step >= self.schedule.frequency
                and self._splicing(step, steps_per_epoch)
            )
        )
        if not due:
            return
        if self.criterion == "obd" and self._pruner.saliency_batches < self.obd_batches:
            return  # not enough squared gradients yet: the update waits for them
        if any(is_shared(layer) for layer in self.layers.values()):
            return  # WeightSharing has clustered these weights: the codes fix which ones are kept
        if not self.history:
            self._before_change(trainer, pl_module)
        self._pruner.update(target, first=self.last_update_step is None, rewound=self.rewind_saved,
                            optimizers=trainer.optimizers)
        self.last_update_step = step
        self.current_target = target
        sparsity = self._pruner.sparsity()
        self.history.append((step, sparsity))
        pl_module.log("pruning/sparsity", sparsity, on_step=True, on_epoch=False, sync_dist=False)
        pl_module.log("pruning/target", target, on_step=True, on_epoch=False, sync_dist=False)
        if self.log_layers:
            for name, value in self._pruner.layer_sparsities().items():
                pl_module.log(f"pruning/sparsity/{name}", value, on_step=True, on_epoch=False)

    def _splicing(self, step: int, steps_per_epoch: int) -> bool:
        """DNS recomputes masks until ``end_epoch`` (for the whole fit when ``end_epoch <= start_epoch``).

        DNS lets the chance of a mask update decay so that the surviving network settles; here the
        masks freeze once the schedule is done and the last epochs fine-tune a fixed sparse network.
        """
        if self.schedule.end_epoch <= self.schedule.start_epoch:
            return True
        return step < self.schedule.end_epoch * steps_per_epoch

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self._pruner.before_optimizer_step()
        last_change = self.schedule.start_epoch if self.schedule.kind == "one_shot" else self.schedule.end_epoch
        if self.criterion == "bn_scale" and self.bn_penalty and trainer.current_epoch < last_change:
            self._pruner.add_scale_penalty(self.bn_penalty)  # sparsity training; plain fine-tuning after
        if self.criterion != "obd":
            return
        if self.schedule.target(trainer.global_step + self.obd_batches, self._steps_per_epoch(trainer)) is None:
            return  # the first update is further away than the gradients it will average
        self._pruner.accumulate_saliency()

    def sparsity_now(self) -> float:
        """Fraction of the targeted weights that are masked now."""
        return self._pruner.sparsity() if self._pruner is not None else 0.0

    # ------------------------------------------------------------------ end of fit

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.history or self.history[-1][1] == 0:
            rank_zero_warn(
                f"IterativePruning pruned nothing in this fit (schedule {self.schedule.kind!r} from epoch "
                f"{self.schedule.start_epoch}, fit ran {trainer.current_epoch} epochs / {trainer.global_step} steps); "
                "the model is unpruned"
            )
        if not self.finalize:
            return
        self._finalize()
        if self.history and self.history[-1][1] > 0:
            rank_zero_info(f"IterativePruning: masks folded into the weights at sparsity {self.history[-1][1]:.4f}")

    def _finalize(self) -> None:
        if self._pruner is not None:
            self._pruner.finalize()
        self._pruner, self._root, self._names = None, None, []

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        # validate / test rebuilt the masks in setup so that a mid-schedule checkpoint loads;
        # leave the model as fit leaves it.
        if stage != "fit" and self.finalize and self._root is not None:
            self._finalize()

    # ------------------------------------------------------------------ results and checkpoint

    @property
    @override
    def summary(self) -> dict[str, Any]:
        return {
            "technique": "pruning",
            "structure": self.structure,
            "target": self.schedule.final,
            "sparsity": self.history[-1][1] if self.history else 0.0,
            "history": [list(h) for h in self.history],
            "layers": self._pruner.layer_sparsities() if self._pruner is not None else {},
            "left_whole": dict(self._left_whole),
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_update_step": self.last_update_step,
            "current_target": self.current_target,
            "history": [list(h) for h in self.history],
            "rewind_saved": self.rewind_saved,
            "obd_count": self._pruner.saliency_batches if self._pruner is not None else self.obd_count,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_fields(state_dict, {
            "last_update_step": lambda v: v, "current_target": lambda v: v,
            "history": lambda v: [tuple(h) for h in v], "rewind_saved": bool, "obd_count": int,
        })
        if self._pruner is not None:
            self._pruner.saliency_batches = self.obd_count
