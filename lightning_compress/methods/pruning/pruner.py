"""A Pruner: masks on named layers of a network and the rules that move them, in plain PyTorch.

:class:`~lightning_compress.IterativePruning` decides *when* (its schedule) and drives a Pruner from
Lightning's hooks, as Lightning's ``ModelPruning`` drives ``torch.nn.utils.prune``. Any training loop
can drive one the same way:

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> pruner = Pruner(model, ["0", "2"])
    >>> pruner.attach()
    >>> for step in range(4):
    ...     model(torch.randn(8, 16)).square().mean().backward()
    ...     pruner.before_optimizer_step()
    ...     optimizer.step(); optimizer.zero_grad()
    ...     pruner.update(0.2 * (step + 1), first=step == 0, optimizers=[optimizer])
    >>> round(pruner.sparsity(), 2)
    0.8
    >>> pruner.finalize()
    >>> round(float((model[0].weight == 0).float().mean()), 2), type(model[0]).__name__
    (0.8, 'Linear')

The layers are looked up by name at each use: a layer may be replaced after ``attach`` (a checkpoint
with removed channels resizes it), and the pruner then finds the new one.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from . import masks as M
from . import selection as S
from .channel_graph import ChannelDependencies
from .coupled import CoupledChannels

TRAINING_BUFFERS = ("weight_rewind", "weight_grad_sq")


# A globally ranked filter pruning keeps at least this fraction of each conv's channels.
CHANNEL_FLOOR = 0.1


class Pruner:
    """Masks on ``names`` (layers of ``root``) and their updates.

    Args:
        root: the network the names are relative to.
        names: the Conv / Linear layers to prune.
        scope: ``"layer"`` (each layer reaches its own sparsity) or ``"global"`` (one ranking of all).
        structure: ``"unstructured"`` or ``"filter"`` (whole output channels, their BatchNorm channels
            zeroed in the forward, removed by :meth:`finalize`); ``channels`` is then the network's
            channel dependencies (``analyse_channels``): channels tied by residual adds, depthwise convs,
            concatenations or shuffles are scored and pruned as one group (:mod:`.coupled`).
        criterion: ``"magnitude"``, ``"obd"`` (saliency from the squared gradients accumulated by
            :meth:`accumulate_saliency`) or ``"bn_scale"`` (filters only: ``|gamma|`` of the BatchNorm after
            each conv, network slimming; :meth:`add_scale_penalty` is its sparsity training).
        norm: 1 or 2, the filter norm of ``structure="filter"``.
        rehabilitation: Dynamic Network Surgery: a straight-through forward, so pruned weights keep
            learning, and masks recomputed with hysteresis ``margin``. Without it, pruned weights are
            exact zeros for good (gradients masked, optimizer state cleared).
        layer_target: a layer's sparsity when the overall target is t (per-layer sparsities); default t.
        rewind: keep a copy of the weights to rewind the survivors to after each update (lottery tickets).
        channel_multiple: filters only: each block of tied convs keeps a multiple of this many channels
            (the nearest to its target; all of them when fewer), see :meth:`.CoupledChannels.round_kept`.
    """

    def __init__(
        self,
        root: nn.Module,
        names: Iterable[str],
        scope: str = "layer",
        structure: str = "unstructured",
        criterion: str = "magnitude",
        norm: int = 1,
        rehabilitation: bool = False,
        margin: float = 0.1,
        layer_target: Callable[[str, float], float] | None = None,
        channels: ChannelDependencies | None = None,
        rewind: bool = False,
        channel_multiple: int = 1,
    ) -> None:
        self.root, self.names = root, list(names)
        self.channel_multiple = channel_multiple
        self.scope, self.structure, self.criterion, self.norm = scope, structure, criterion, norm
        self.rehabilitation, self.margin = rehabilitation, margin
        self.layer_target = layer_target or (lambda name, target: target)
        self.channels = channels
        self.coupled: CoupledChannels | None = None
        if structure == "filter":
            if channels is None:
                raise ValueError("structure='filter' needs the network's channel dependencies (analyse_channels)")
            self.coupled = CoupledChannels(channels, self.names)
        self.rewind = rewind
        self.saliency_batches = 0  # squared gradients summed since the last update (OBD)
        self._hooks: list = []

    @property
    def layers(self) -> dict[str, nn.Module]:
        return {name: self.root.get_submodule(name) for name in self.names}

    def attach(self, masks_from_zeros: bool = False) -> None:
        """Give every layer its mask and buffers (idempotent). ``masks_from_zeros``: a layer that has no
        mask yet takes its exact zeros as pruned (its masks were folded in earlier)."""
        for layer in self.layers.values():
            fresh = not M.is_masked(layer)
            # Without rehabilitation pruned weights are exact zeros, so the forward can stay dense and only
            # gradients are masked (before_optimizer_step): cheaper than masking the weight twice a step.
            M.add_mask(layer, straight_through=self.rehabilitation, mask_in_forward=False)
            if fresh and masks_from_zeros:
                M.set_mask(layer, layer.weight != 0)
            # Registered before any checkpoint loads, so that its values fill them.
            if self.rewind and "weight_rewind" not in layer._buffers:
                layer.register_buffer("weight_rewind", torch.zeros_like(layer.weight))
            if self.criterion == "obd" and "weight_grad_sq" not in layer._buffers:
                layer.register_buffer("weight_grad_sq", torch.zeros_like(layer.weight, dtype=torch.float32))
        self.remove_hooks()
        if self.coupled is not None:
            self._hooks = self.coupled.zeroing_hooks(self.root)

    @torch.no_grad()
    def save_rewind_point(self) -> None:
        for layer in self.layers.values():
            layer.weight_rewind.copy_(layer.weight)

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Without rehabilitation, no gradient reaches a pruned weight."""
        if not self.rehabilitation:
            M.mask_gradients(self.layers.values())

    @torch.no_grad()
    def accumulate_saliency(self) -> None:
        """Add this batch's squared gradients to OBD's Hessian-diagonal estimate (the empirical Fisher)."""
        for layer in self.layers.values():
            if layer.weight.grad is not None:
                layer.weight_grad_sq.add_(layer.weight.grad.float().square())
        self.saliency_batches += 1

    @torch.no_grad()
    def update(self, target: float, first: bool = False, rewound: bool = False,
               optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Recompute every mask for sparsity ``target`` from the current (dense) weights.

        ``first``: no previous mask to hold on to (no hysteresis). ``rewound``: reset the survivors to the
        rewind point. ``optimizers``: their state at newly pruned weights is cleared.
        """
        layers = self.layers
        if self.coupled is not None:
            keep = self._filter_keep(layers, target, first)
        else:
            scores = {}
            for name, layer in layers.items():
                score = S.weight_scores(layer.weight, self.criterion, self._hessian(layer))
                kept = None if first else layer.weight_mask
                scores[name] = S.with_hysteresis(score, kept, self.margin if self.rehabilitation else 0.0)
            if self.scope == "global":
                keep = S.global_keep(scores, target)
            else:
                keep = S.layer_keep(scores, {name: self.layer_target(name, target) for name in scores})
        for name, layer in layers.items():
            mask = S.expand_filter_mask(keep[name].to(layer.weight.device), layer.weight) if self.structure == "filter" else keep[name]
            M.set_mask(layer, mask, zero_pruned=not self.rehabilitation)
        M.broadcast_masks(layers.values())
        if not self.rehabilitation:
            for optimizer in optimizers:
                M.clear_pruned_optimizer_state(optimizer, layers.values())
            for layer in layers.values():  # a broadcast may have changed a mask: re-zero
                layer.weight.masked_fill_(~layer.weight_mask, 0)
        if rewound:
            for layer in layers.values():
                layer.weight.copy_(torch.where(layer.weight_mask, layer.weight_rewind, torch.zeros_like(layer.weight)))
        if self.criterion == "obd":
            for layer in layers.values():
                layer.weight_grad_sq.zero_()
            self.saliency_batches = 0

    def _hessian(self, layer: nn.Module) -> torch.Tensor | None:
        return layer.weight_grad_sq / max(1, self.saliency_batches) if self.criterion == "obd" else None

    def _filter_keep(self, layers: dict[str, nn.Module], target: float, first: bool) -> dict[str, torch.Tensor]:
        """Whole channels: filter scores averaged over each tied group, groups ranked per block or globally."""
        filter_scores = {}
        for name, layer in layers.items():
            score = S.weight_scores(layer.weight, self.criterion, self._hessian(layer))
            scale = self.norm_layer(name).weight if self.criterion == "bn_scale" else None
            score = S.filter_scores(score, layer.weight, self.criterion, self.norm, scale)
            if self.scope == "global" and self.criterion != "bn_scale":
                # filters of different fan-in: compare per-weight means (BatchNorm scales compare as they are)
                score = score / layer.weight[0].numel()
            filter_scores[name] = score
        scores = self.coupled.group_scores(filter_scores)
        if not first:
            kept = self.coupled.group_kept({name: layer.weight_mask.flatten(1).any(1) for name, layer in layers.items()})
            margin = self.margin if self.rehabilitation else 0.0
            scores = {block: S.with_hysteresis(score, kept[block], margin) for block, score in scores.items()}
        if self.scope == "global":
            # Whole channels ranked across layers: without a floor, network slimming's global cut took the
            # last conv of a CPU-scale VGG19 down to one channel (18% accuracy where per-layer L1 kept 62%).
            block_keep = S.global_keep(scores, target, CHANNEL_FLOOR)
        else:
            targets = {block: self.coupled.block_target(block, target, self.layer_target) for block in scores}
            block_keep = S.layer_keep(scores, targets)
        block_keep = self.coupled.round_kept(block_keep, scores, self.channel_multiple)
        return self.coupled.conv_keep(block_keep, scores)

    def norm_layer(self, name: str) -> nn.Module:
        """The BatchNorm after conv ``name`` (``structure="filter"``), whose scales network slimming ranks."""
        norm = self.channels.norms.get(name) if self.channels is not None else None
        if norm is None:
            raise ValueError(f"{name}: criterion='bn_scale' needs a BatchNorm right after the convolution; it has none")
        return self.root.get_submodule(norm)

    @torch.no_grad()
    def add_scale_penalty(self, strength: float) -> None:
        """Network slimming's sparsity training: the subgradient of ``strength * sum |gamma|`` over the
        BatchNorm scales after the pruned convolutions, added to their gradients (before the step), so that
        unimportant channels' scales are driven towards zero and rank last."""
        for name in self.names:
            gamma = self.norm_layer(name).weight
            if gamma.grad is not None:
                gamma.grad.add_(torch.sign(gamma), alpha=strength)

    def sparsity(self) -> float:
        """Fraction of the targeted weights that are masked now."""
        layers = self.layers.values()
        total = sum(layer.weight_mask.numel() for layer in layers)
        kept = sum(int(layer.weight_mask.sum()) for layer in layers)
        return 1.0 - kept / total if total else 0.0

    def layer_sparsities(self) -> dict[str, float]:
        return {name: 1.0 - float(layer.weight_mask.float().mean()) for name, layer in self.layers.items()}

    def finalize(self) -> None:
        """Fold the masks into the weights (exact zeros) and drop every pruning buffer; for filters,
        remove the pruned channels and the next layers' matching inputs. The state dict then loads
        into the unpruned architecture (or, for filters, into one resized to it)."""
        self.remove_hooks()
        layers = {name: layer for name, layer in self.layers.items() if M.is_masked(layer)}
        channel_keep = {}
        if self.structure == "filter":
            channel_keep = {name: layer.weight_mask.flatten(1).any(1).clone() for name, layer in layers.items()}
        for layer in layers.values():
            for buffer in TRAINING_BUFFERS:
                layer._buffers.pop(buffer, None)
            M.remove_mask(layer, fold=True)
        if channel_keep and not all(bool(k.all()) for k in channel_keep.values()):
            from .surgery import remove_channels

            remove_channels(self.root, channel_keep)

    def remove_hooks(self) -> None:
        """Take the forward hooks of ``structure="filter"`` off the network (``attach`` puts them back)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
