"""Structured filter pruning's surgery: removing the channels that :mod:`.channels` found removable,
and resizing a fresh model to a filter-pruned checkpoint.

* :func:`remove_channels`: the surgery itself.
* :func:`resize_to_state_dict`: rebuilds a fresh, unpruned model to the shapes of a filter-pruned
  checkpoint, so that ``load_state_dict`` accepts it.

When is the surgery exact? In the state that masked training leaves, a removed filter has zero conv
weights and a zero BatchNorm weight and bias (or, with no BatchNorm, a zero conv bias), so its
channel is exactly 0. Operations that map 0 to 0 (ReLU and its relatives, pooling, dropout) keep it
0, and the consumer gets nothing from it, so removing the channel leaves the outputs unchanged.
Activations with ``f(0) != 0`` (sigmoid, hard-sigmoid, softplus) pass a constant to the consumer
instead. Removal drops that constant: the model is still valid, but its outputs change.

Replaced modules are new objects: an optimizer built before :func:`remove_channels` holds the old
parameters and must be rebuilt, and hooks registered on the old modules are not carried over.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .channels import ChannelGroup, analyse, rebuild_problem
from .masks import PRUNABLE_TYPES, add_mask, is_masked

__all__ = ["remove_channels", "resize_to_state_dict"]


def remove_channels(model: nn.Module, keep: dict[str, torch.Tensor], example_input: Any = None) -> dict[str, int]:
    """Remove the output channels of convs where ``keep[conv_name]`` (bool, one per channel) is False.

    Each conv is replaced by a smaller one, its BatchNorm by a shorter one, and its consumer by one
    with fewer input channels (a Linear loses ``features_per_channel`` features per removed channel).
    Dtype, device, the weight's memory format (channels_last stays channels_last), ``requires_grad``
    and train/eval mode carry over.

    Masked layers (``MaskedConv2d``/``MaskedLinear`` of ``masks.py``) stay masked: the new layer is
    masked too, with the same ``straight_through``, and its ``weight_mask`` is sliced like its
    weight. A masked schedule can therefore go on after the surgery, and the state dict keeps its
    ``weight_mask`` keys.

    Every name is checked before anything changes: a conv that is not a supported group, a keep
    tensor of the wrong dtype or length, or one that keeps no channel raises ``ValueError`` and
    leaves the model untouched.

    With ``example_input`` (a tensor, or a tuple of positional arguments), the model runs on it
    before and after, in eval mode and without gradients so that BatchNorm statistics do not move.
    If the output shapes differ, or the forward fails, every replacement is undone and the error
    raised: a shape change would mean the analysis missed a use of the channels. Without it, only
    the static analysis vouches for the result.

    Returns the new number of output channels of each conv in ``keep``.

    Example:
        >>> model = nn.Sequential(
        ...     nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
        ... )
        >>> keep = {"0": torch.tensor([True, False] * 4)}
        >>> remove_channels(model, keep, example_input=torch.randn(1, 3, 8, 8))
        {'0': 4}
        >>> model[0], model[1].num_features, model[5].in_features
        (Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1)), 4, 4)
    """
    groups, reasons = analyse(model)
    plans = {name: (groups.get(name), _keep_indices(model, name, mask, groups, reasons)) for name, mask in keep.items()}
    before = _output_shapes(model, example_input) if example_input is not None else None

    replaced: list[tuple[str, nn.Module]] = []
    try:
        for group, index in plans.values():
            _shrink_group(model, group, index, replaced)
        if before is not None:
            after = _output_shapes(model, example_input)
            if after != before:
                raise RuntimeError(f"removing channels changed the model's output shape from {before} to {after}")
    except Exception:
        # Undo in reverse order: a layer that was both a consumer and a pruned conv was replaced twice.
        for name, module in reversed(replaced):
            _set_submodule(model, name, module)
        raise
    return {name: model.get_submodule(name).out_channels for name in keep}


def _keep_indices(
    model: nn.Module, name: str, mask: torch.Tensor, groups: dict[str, ChannelGroup], reasons: dict[str, str]
) -> torch.Tensor:
    """Validate ``keep[name]`` and return the kept channel indices, on the conv's device."""
    if name not in groups:
        if name in reasons:
            why = reasons[name]
        else:
            try:
                why = f"it is a {type(model.get_submodule(name)).__name__}, not a Conv2d"
            except AttributeError:
                why = "the model has no module of that name"
        supported = ", ".join(repr(n) for n in groups) or "none"
        raise ValueError(f"keep[{name!r}]: cannot remove channels of {name!r}: {why}. Supported convs: {supported}")
    conv = model.get_submodule(name)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (conv.out_channels,):
        got = type(mask).__name__
        if isinstance(mask, torch.Tensor):
            got = f"dtype={mask.dtype}, shape={tuple(mask.shape)}"
        raise ValueError(f"keep[{name!r}] must be a bool tensor of shape ({conv.out_channels},), got {got}")
    if not mask.any():
        raise ValueError(f"keep[{name!r}] keeps no channel; conv {name!r} needs at least one output channel")
    return mask.nonzero().flatten().to(conv.weight.device)


def _shrink_group(
    model: nn.Module, group: ChannelGroup, index: torch.Tensor, replaced: list[tuple[str, nn.Module]]
) -> None:
    def swap(name: str, new: nn.Module) -> None:
        replaced.append((name, _set_submodule(model, name, new)))

    # Modules are looked up now, not at analysis time: an earlier group may have replaced this conv
    # already, as the consumer of the conv before it.
    conv = model.get_submodule(group.conv)
    new = _conv_like(conv, conv.in_channels, len(index))
    _copy(new, conv, ("weight", "weight_mask", "bias"), 0, index)
    swap(group.conv, new)

    if group.norm is not None:
        norm = model.get_submodule(group.norm)
        new = _norm_like(norm, len(index))
        _copy(new, norm, ("weight", "bias", "running_mean", "running_var"), 0, index)
        _copy(new, norm, ("num_batches_tracked",))
        swap(group.norm, new)

    consumer = model.get_submodule(group.consumer)
    k = group.features_per_channel
    if isinstance(consumer, nn.Linear):
        # Flattening (N, C, H, W) puts channel c at features [c*k, (c+1)*k).
        features = (index[:, None] * k + torch.arange(k, device=index.device)).flatten()
        new = _linear_like(consumer, len(features), consumer.out_features)
    else:
        features = index
        new = _conv_like(consumer, len(index), consumer.out_channels)
    _copy(new, consumer, ("weight", "weight_mask"), 1, features)
    _copy(new, consumer, ("bias",))
    swap(group.consumer, new)


def resize_to_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Resize conv, linear and BatchNorm layers to the shapes in ``state_dict``; returns their names.

    A filter-pruned checkpoint does not load into the architecture it was pruned from: its tensors
    are smaller. This rebuilds the layers of a fresh model at the checkpoint's sizes. The new layers
    are freshly initialised; ``model.load_state_dict(state_dict)`` then fills them. ``state_dict``
    uses the model's own names (strip a ``"model."`` prefix of a Lightning checkpoint first).

    Conv1d/2d/3d take their channels from ``weight`` (in = ``weight.shape[1] * groups``), Linear its
    features, BatchNorm1d/2d its size from ``running_mean`` or ``weight``. Kernel size, stride, bias
    presence and the other settings stay the model's. A masked layer stays masked, with a
    ``weight_mask`` of the new shape, ready for the checkpoint's mask. Whether a layer is masked is
    left to the model: the masking that produced a checkpoint's ``weight_mask`` keys must be applied
    before loading, as for an unpruned checkpoint.

    Example:
        >>> pruned = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
        >>> fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2))
        >>> resize_to_state_dict(fresh, pruned.state_dict())
        ['0', '1', '3']
        >>> fresh.load_state_dict(pruned.state_dict())
        <All keys matched successfully>
    """
    resized = []
    for name, module in list(model.named_modules()):
        new = _resized(name, module, state_dict)
        if new is None:
            continue
        if not name:
            raise ValueError(f"cannot resize the model itself ({type(module).__name__}); wrap it in a container")
        _set_submodule(model, name, new)
        resized.append(name)
    return resized


def _resized(name: str, module: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module | None:
    """A new layer shaped after ``state_dict``, or None when ``module`` already matches (or is no layer)."""
    prefix = f"{name}." if name else ""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        weight = state_dict.get(prefix + "weight")
        if weight is None or weight.shape == module.weight.shape:
            return None
        _check_rebuildable(name, module)
        if weight.dim() != module.weight.dim() or weight.shape[2:] != module.weight.shape[2:]:
            raise ValueError(
                f"state_dict[{prefix + 'weight'!r}] has shape {tuple(weight.shape)}; {name!r} can change only its "
                f"first two dimensions, its weight is {tuple(module.weight.shape)}"
            )
        if isinstance(module, nn.Linear):
            return _linear_like(module, weight.shape[1], weight.shape[0])
        return _conv_like(module, weight.shape[1] * module.groups, weight.shape[0])
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        reference = state_dict.get(prefix + "running_mean", state_dict.get(prefix + "weight"))
        if reference is None or reference.shape[0] == module.num_features:
            return None
        _check_rebuildable(name, module)
        return _norm_like(module, reference.shape[0])
    return None


def _check_rebuildable(name: str, module: nn.Module) -> None:
    if (problem := rebuild_problem(module)) is not None:
        raise ValueError(f"cannot resize {name!r} to the state dict: {problem}")


def _conv_like(old: nn.Module, in_channels: int, out_channels: int) -> nn.Module:
    """A conv with ``old``'s settings and new channel counts (values freshly initialised)."""
    base = next(cls for cls in PRUNABLE_TYPES if isinstance(old, cls))
    new = base(
        in_channels,
        out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    return _carry_over(old, new)


def _linear_like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    new = nn.Linear(
        in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )
    return _carry_over(old, new)


def _norm_like(old: nn.Module, num_features: int) -> nn.Module:
    reference = old.weight if old.affine else old.running_mean
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    new = type(old)(
        num_features,
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        **factory,
    )
    return _carry_over(old, new)


def _carry_over(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give ``new`` what its constructor cannot: memory format, requires_grad, mode and mask."""
    for pname, param in list(new.named_parameters(recurse=False)):
        old_param = getattr(old, pname)
        data = param.detach().contiguous(memory_format=_memory_format(old_param))
        setattr(new, pname, nn.Parameter(data, requires_grad=old_param.requires_grad))
    new.train(old.training)
    if is_masked(old):
        # add_mask builds the mask with ones_like(weight), so it follows the weight's memory format.
        add_mask(new, straight_through=old.straight_through)
    return new


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


@torch.no_grad()
def _copy(
    new: nn.Module, old: nn.Module, names: Iterable[str], dim: int | None = None, index: torch.Tensor | None = None
) -> None:
    """Copy tensors ``names`` from ``old`` into ``new``, keeping ``index`` along ``dim`` (all if ``dim`` is None).

    ``copy_`` writes into ``new``'s tensors, so they keep the memory format ``_carry_over`` gave them;
    names ``old`` lacks (no bias, no mask, no running stats) are skipped.
    """
    for attr in names:
        source = getattr(old, attr, None)
        if source is None:
            continue
        getattr(new, attr).copy_(source if dim is None else source.index_select(dim, index))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` (a dotted path) and return the module it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def _output_shapes(model: nn.Module, example_input: Any) -> Any:
    with _evaluating(model):
        output = model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    return _shapes(output)


def _shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return type(value)(_shapes(v) for v in value)
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in value.items()}
    return value


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for a check run, restoring each module's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
