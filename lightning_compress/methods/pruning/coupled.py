"""Filter pruning over coupled channels: one score and one keep decision per group of tied channels.

:mod:`.channel_graph` finds which output channels of which convs are tied (residual adds,
depthwise convs, concatenations, channel shuffles). This module turns per-filter scores into one
score per tied group (the mean over its filters, as Torch-Pruning's group importance does), turns
the kept groups back into per-conv keep vectors, and zeroes pruned channels wherever they appear in
the forward (after every BatchNorm and depthwise conv that carries them), so that removing them at
the end leaves the outputs unchanged.

A *block* is a set of convs whose channels are tied to each other, directly or through others: the
convs of a residual stage, say. ``scope="layer"`` prunes each block to its target on its own (a lone
conv is its own block, as before); ``scope="global"`` ranks the groups of all blocks together.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from . import selection as S
from .channel_graph import ChannelDependencies

__all__ = ["CoupledChannels"]


class CoupledChannels:
    """The tied channel groups of the convs ``names`` (all removable, see ``find_channel_groups``).

    A group whose filters are not all among ``names`` stays whole: pruning it would change a layer
    the caller did not ask for.

    Example:
        >>> from lightning_compress.methods.pruning.channel_graph import analyse_channels
        >>> class Residual(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        ...     def forward(self, x):
        ...         return self.head(self.a(x) + self.b(x))
        >>> model = Residual()
        >>> coupled = CoupledChannels(analyse_channels(model), ["a", "b"])
        >>> scores = coupled.group_scores({"a": torch.tensor([1., 2, 3, 4]), "b": torch.tensor([3., 2, 1, 0])})
        >>> scores
        {'a': tensor([2., 2., 2., 2.])}
        >>> coupled.conv_keep({"a": torch.tensor([True, False, True, True])}, scores)
        {'a': tensor([ True, False,  True,  True]), 'b': tensor([ True, False,  True,  True])}
    """

    def __init__(self, dependencies: ChannelDependencies, names: list[str]) -> None:
        self.deps = dependencies
        self.names = list(names)
        chosen = set(self.names)
        coupled = dependencies.coupled()
        self.blocks: dict[str, list[str]] = {}
        for name in self.names:
            block = [c for c in coupled[name] if c in chosen]
            self.blocks.setdefault(block[0], block)
        # A group can be pruned when it is not pinned and all its filters are chosen.
        self.free = [
            k for k, members in enumerate(dependencies.members)
            if members and k not in dependencies.pinned and all(c in chosen for c, _ in members)
        ]  # fmt: skip
        block_of = {c: leader for leader, block in self.blocks.items() for c in block}
        self.block_groups: dict[str, list[int]] = {leader: [] for leader in self.blocks}
        for k in self.free:
            self.block_groups[block_of[dependencies.members[k][0][0]]].append(k)
        # For each conv: per output channel, the index of its group in its block's list (-1: not free).
        self.slot: dict[str, torch.Tensor] = {}
        for leader, groups in self.block_groups.items():
            where = {k: i for i, k in enumerate(groups)}
            for conv in self.blocks[leader]:
                outputs = dependencies.layers[conv].outputs
                self.slot[conv] = torch.tensor([where.get(k, -1) for k in outputs], dtype=torch.long)

    def group_scores(self, filter_scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One score per free group of each block: the mean of its filters' scores."""
        out = {}
        for leader, groups in self.block_groups.items():
            total = torch.zeros(len(groups))
            count = torch.zeros(len(groups))
            for conv in self.blocks[leader]:
                slot = self.slot[conv]
                valid = slot >= 0
                total.index_add_(0, slot[valid], filter_scores[conv].detach().float().cpu()[valid])
                count.index_add_(0, slot[valid], torch.ones(int(valid.sum())))
            out[leader] = total / count.clamp_min(1)
        return out

    def group_kept(self, conv_keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Which free groups each block keeps now, read from its convs' keep vectors."""
        out = {}
        for leader, groups in self.block_groups.items():
            kept = torch.zeros(len(groups), dtype=torch.bool)
            for conv in self.blocks[leader]:
                slot = self.slot[conv]
                valid = slot >= 0
                kept[slot[valid]] |= conv_keep[conv].cpu()[valid]
            out[leader] = kept
        return out

    def round_kept(self, group_keep: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
                   multiple: int) -> dict[str, torch.Tensor]:
        """Each block keeps the count of groups nearest to its selection that leaves its convs a multiple of
        ``multiple`` channels (or all of them), its best-scored groups. Why: a runtime's vector kernels work
        on blocks of channels (ONNX Runtime's NCHWc layout: 8 on AVX2, 16 on AVX-512; XNNPACK and tensor
        cores likewise), and a conv of 22 channels falls back to slower code. MobileNetV2 at 2x fewer MACs
        with such counts ran 1.3x slower than unpruned in ONNX Runtime, at batch 1 on two AVX2 cores."""
        if multiple <= 1:
            return group_keep
        out = {}
        for leader, keep in group_keep.items():
            slot = self.slot[leader]
            groups = keep.numel()
            if groups == 0:
                out[leader] = keep
                continue
            pinned = int((slot < 0).sum())
            per_group = (slot.numel() - pinned) // groups  # channels of the leader conv per group
            allowed = [n for n in range(1, groups + 1) if n == groups or (pinned + n * per_group) % multiple == 0]
            kept = int(keep.sum())
            best = min(allowed, key=lambda n: (abs(n - kept), -n))
            out[leader] = keep if best == kept else S.keep_top(scores[leader], best)
        return out

    def block_target(self, leader: str, target: float, layer_target: Callable[[str, float], float]) -> float:
        block = self.blocks[leader]
        return sum(layer_target(c, target) for c in block) / len(block)

    def conv_keep(self, group_keep: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-conv keep vectors from the kept groups. A layer that would lose every channel (a
        BatchNorm or depthwise conv that only carries pruned groups) keeps its best-scored group."""
        keep_of = {}
        for leader, groups in self.block_groups.items():
            for i, k in enumerate(groups):
                keep_of[k] = bool(group_keep[leader][i])
        score_of = {k: float(scores[leader][i]) for leader, groups in self.block_groups.items() for i, k in enumerate(groups)}
        for layer in self.deps.layers.values():
            classes = layer.outputs if layer.outputs is not None else layer.inputs
            if classes and not any(keep_of.get(k, True) for k in classes):
                keep_of[max(set(classes), key=score_of.__getitem__)] = True
        return {
            conv: torch.tensor([keep_of.get(k, True) for k in self.deps.layers[conv].outputs], dtype=torch.bool)
            for conv in self.names
        }

    def zeroing_hooks(self, root: nn.Module) -> list:
        """Forward hooks that zero pruned channels after every layer that carries free groups (its
        BatchNorm, a depthwise conv; a conv itself when no BatchNorm follows it). Without them a
        BatchNorm turns a pruned channel into its bias beta, which later layers would learn to use."""
        free = set(self.free)
        first = {k: self.deps.members[k][0] for k in self.free}
        handles = []
        for name, layer in self.deps.layers.items():
            if layer.outputs is None or (layer.kind == "conv" and name in self.deps.norms):
                continue
            refs: dict[str, tuple[list[int], list[int]]] = {}
            for position, k in enumerate(layer.outputs):
                if k in free:
                    conv, channel = first[k]
                    refs.setdefault(conv, ([], []))[0].append(channel)
                    refs[conv][1].append(position)
            if refs:
                module = root.get_submodule(name)
                handles.append(module.register_forward_hook(_zero_pruned(root, refs, len(layer.outputs))))
        return handles


def _zero_pruned(root: nn.Module, refs: dict[str, tuple[list[int], list[int]]], channels: int):
    """A forward hook multiplying the output by 0 at positions whose group's first filter is masked.

    The keep vector is rebuilt only when a reference mask changed (a new tensor, or an in-place write
    such as an update or a checkpoint load bumps its version): a ShuffleNetV2 block's BatchNorm reads
    the masks of many convs, and rebuilding its vector at every forward slowed training threefold.
    """
    cache: dict[torch.device, tuple] = {}

    def alive(masks: list, device: torch.device, ndim: int) -> torch.Tensor:
        keep = torch.ones(channels, dtype=torch.bool, device=device)
        for mask, (channel, position) in zip(masks, refs.values()):
            if mask is not None:
                keep[torch.tensor(position, device=device)] = mask.flatten(1).any(1)[torch.tensor(channel, device=device)]
        return keep.view(1, -1, *([1] * (ndim - 2)))

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if output.shape[1] != channels:  # the layer was resized since: its pruner is being rebuilt
            return output
        masks = [getattr(root.get_submodule(conv), "weight_mask", None) for conv in refs]
        if torch.compiler.is_compiling():
            # Inside a compiled graph the vector is a few fused ops; the cache below, keyed on tensor
            # versions, is what dynamo cannot trace (a graph break and a recompile per layer).
            return output * alive(masks, output.device, output.ndim).to(output.dtype)
        key = tuple((id(m), m._version) if m is not None else None for m in masks)
        cached = cache.get(output.device)
        if cached is None or cached[0] != key:
            cached = cache[output.device] = (key, alive(masks, output.device, output.ndim))
        return output * cached[1].to(output.dtype)

    return hook
