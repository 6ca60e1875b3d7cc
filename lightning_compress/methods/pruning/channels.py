"""Structured filter pruning: which conv filters can be removed, which go together, and why the rest cannot.

Filter pruning (Li et al., "Pruning Filters for Efficient ConvNets"; Network Slimming) trains with
whole filters masked, then makes the model really smaller. A removed filter takes with it one output
channel of its conv and that channel's entry in every layer that sees it. Where a residual add, a
depthwise conv, a concatenation, a chunk or a channel shuffle ties channels of several convs
together, they are removed together, as one group with one score (:mod:`.channel_graph` finds the
ties on the traced graph).

* :func:`find_channel_groups`: every conv whose channels can be removed, with its BatchNorm and the
  convs whose channels are tied to its own.
* :func:`unsupported_convs`: the convs left out, with the reason.
* :mod:`.surgery` (``remove_channels``, ``resize_to_state_dict``) does the removal.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .channel_graph import ChannelDependencies, analyse_channels, rebuild_problem

__all__ = ["ChannelGroup", "analyse_channels", "find_channel_groups", "rebuild_problem", "unsupported_convs"]


@dataclass(frozen=True)
class ChannelGroup:
    """A conv whose output channels can be removed.

    ``norm`` is the BatchNorm right after it (None without one), ``coupled`` the convs whose channels
    are tied to its own (itself included): their filters are scored and removed together.
    """

    conv: str
    norm: str | None
    coupled: tuple[str, ...]


def find_channel_groups(model: nn.Module, dependencies: ChannelDependencies | None = None) -> dict[str, ChannelGroup]:
    """Every Conv2d whose output channels can be removed, by module name, in traced order.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> find_channel_groups(model)
        {'0': ChannelGroup(conv='0', norm='1', coupled=('0',))}
    """
    deps = dependencies or analyse_channels(model)
    coupled = deps.coupled()
    return {name: ChannelGroup(name, deps.norms.get(name), tuple(coupled[name])) for name in deps.removable_convs()}


def unsupported_convs(model: nn.Module, dependencies: ChannelDependencies | None = None) -> dict[str, str]:
    """Every Conv2d that :func:`find_channel_groups` leaves out, with the reason.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> unsupported_convs(model)
        {'3': 'output is a model output'}
    """
    deps = dependencies or analyse_channels(model)
    return dict(deps.reasons)
