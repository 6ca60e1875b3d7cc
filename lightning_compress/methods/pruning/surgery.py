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

from .channel_graph import ChannelDependencies, LayerChannels, analyse_channels, rebuild_problem
from .masks import PRUNABLE_TYPES, add_mask, is_masked

__all__ = ["remove_channels", "resize_to_state_dict"]


def remove_channels(model: nn.Module, keep: dict[str, torch.Tensor], example_input: Any = None) -> dict[str, int]:
    """Remove the output channels of convs where ``keep[conv_name]`` (bool, one per channel) is False.

    Each removed channel goes from every layer that sees it: the conv's filter, its entries in the
    BatchNorms and depthwise convs it passes through, and the matching input slice of each conv or
    Linear that reads it (a Linear behind a flatten loses ``features_per_channel`` features per
    channel). Channels tied together (:mod:`.channel_graph`: residual adds, concatenations, channel
    shuffles) must be removed together: ``keep`` must name every conv of a coupled group and agree
    on the tied channels. Dtype, device, the weight's memory format (channels_last stays
    channels_last), ``requires_grad`` and train/eval mode carry over.

    Masked layers (``MaskedConv2d``/``MaskedLinear`` of ``masks.py``) stay masked: the new layer is
    masked too, with the same ``straight_through``, and its ``weight_mask`` is sliced like its
    weight. A masked schedule can therefore go on after the surgery, and the state dict keeps its
    ``weight_mask`` keys.

    Everything is checked before anything changes: a conv whose channels cannot be removed, a keep
    tensor of the wrong dtype or length, a group whose convs disagree, or a layer left with no
    channel raises ``ValueError`` and leaves the model untouched.

    With ``example_input`` (a tensor, or a tuple of positional arguments), the model runs on it
    before and after, in eval mode and without gradients so that BatchNorm statistics do not move.
    If the output shapes differ, or the forward fails, every replacement is undone and the error
    raised. Without it, only the static analysis vouches for the result.

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
    deps = analyse_channels(model)
    class_keep = _class_keep(model, deps, keep)
    plans = _layer_plans(deps, class_keep)
    before = _output_shapes(model, example_input) if example_input is not None else None

    replaced: list[tuple[str, nn.Module]] = []
    try:
        for name, (layer, inputs, outputs) in plans.items():
            new = _shrunk(model.get_submodule(name), layer, inputs, outputs)
            replaced.append((name, _set_submodule(model, name, new)))
        if before is not None:
            after = _output_shapes(model, example_input)
            if after != before:
                raise RuntimeError(f"removing channels changed the model's output shape from {before} to {after}")
    except Exception:
        for name, module in reversed(replaced):
            _set_submodule(model, name, module)
        raise
    return {name: model.get_submodule(name).out_channels for name in keep}


def _class_keep(model: nn.Module, deps: ChannelDependencies, keep: dict[str, torch.Tensor]) -> list[bool]:
    """Which channel classes stay, from ``keep``; every inconsistency is a ValueError naming the convs."""
    removable = deps.removable_convs()
    class_keep = [True] * len(deps.members)
    for name, mask in keep.items():
        if name not in removable:
            if name in deps.reasons:
                why = deps.reasons[name]
            else:
                try:
                    why = f"it is a {type(model.get_submodule(name)).__name__}, not a Conv2d"
                except AttributeError:
                    why = "the model has no module of that name"
            supported = ", ".join(repr(n) for n in removable) or "none"
            raise ValueError(f"keep[{name!r}]: cannot remove channels of {name!r}: {why}. Supported convs: {supported}")
        outputs = deps.layers[name].outputs
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (len(outputs),):
            got = f"dtype={mask.dtype}, shape={tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"keep[{name!r}] must be a bool tensor of shape ({len(outputs)},), got {got}")
        if not mask.any():
            raise ValueError(f"keep[{name!r}] keeps no channel; conv {name!r} needs at least one output channel")
        for channel in (~mask).nonzero().flatten().tolist():
            k = outputs[channel]
            if k in deps.pinned:
                raise ValueError(f"keep[{name!r}] removes channel {channel}, which cannot go: {deps.pinned[k]}")
            class_keep[k] = False
    for k, kept in enumerate(class_keep):
        missing = sorted({c for c, _ in deps.members[k] if c not in keep}) if not kept else []
        if missing:
            conv, channel = next((c, i) for c, i in deps.members[k] if c in keep)
            raise ValueError(f"keep[{conv!r}] removes channel {channel}, which is tied to channels of {missing} (a "
                             f"residual add, concatenation or channel shuffle); give a keep mask for each of them too")
    for name, mask in keep.items():
        outputs = deps.layers[name].outputs
        wanted = torch.tensor([class_keep[k] for k in outputs], dtype=torch.bool)
        if not torch.equal(wanted, mask.cpu()):
            channel = int((wanted != mask.cpu()).nonzero()[0])
            other = next(f"{c!r} channel {i}" for c, i in deps.members[outputs[channel]] if c != name)
            raise ValueError(f"keep[{name!r}] keeps channel {channel} but removes {other}, which is tied to it; "
                             f"tied channels are removed together")
    return class_keep


def _layer_plans(deps: ChannelDependencies, class_keep: list[bool]) -> dict:
    """For each layer that changes: (its LayerChannels, kept input positions or None, kept output positions or None)."""
    plans = {}
    for name, layer in deps.layers.items():
        kept = [None, None]
        for side, classes in enumerate((layer.inputs, layer.outputs)):
            if classes is None:
                continue
            positions = [i for i, k in enumerate(classes) if class_keep[k]]
            if not positions:
                raise ValueError(f"removing these channels would leave {name!r} with no {('input', 'output')[side]} channel")
            if len(positions) < len(classes):
                kept[side] = torch.tensor(positions)
        if kept != [None, None]:
            plans[name] = (layer, *kept)
    return plans


def _shrunk(module: nn.Module, layer: LayerChannels, inputs: torch.Tensor | None, outputs: torch.Tensor | None) -> nn.Module:
    """A copy of ``module`` keeping input channels ``inputs`` and output channels ``outputs`` (None: all)."""
    device = module.weight.device if getattr(module, "weight", None) is not None else module.running_mean.device
    inputs = inputs.to(device) if inputs is not None else None
    outputs = outputs.to(device) if outputs is not None else None
    if layer.kind == "norm":
        new = _norm_like(module, len(inputs))
        _copy(new, module, ("weight", "bias", "running_mean", "running_var"), 0, inputs)
        _copy(new, module, ("num_batches_tracked",))
        return new
    if layer.kind == "depthwise":
        index = inputs
        new = _conv_like(module, len(index), len(index), groups=len(index))
        _copy(new, module, ("weight", "weight_mask", "bias"), 0, index)
        return new
    if layer.kind == "linear":
        k = layer.features_per_channel
        # Flattening (N, C, H, W) puts channel c at features [c*k, (c+1)*k).
        features = (inputs[:, None] * k + torch.arange(k, device=device)).flatten()
        new = _linear_like(module, len(features), module.out_features)
        _copy(new, module, ("weight", "weight_mask"), 1, features)
        _copy(new, module, ("bias",))
        return new
    in_channels = len(inputs) if inputs is not None else module.in_channels
    out_channels = len(outputs) if outputs is not None else module.out_channels
    new = _conv_like(module, in_channels, out_channels)
    with torch.no_grad():
        for attr in ("weight", "weight_mask"):
            source = getattr(module, attr, None)
            if source is None:
                continue
            if outputs is not None:
                source = source.index_select(0, outputs)
            if inputs is not None:
                source = source.index_select(1, inputs)
            getattr(new, attr).copy_(source)
    _copy(new, module, ("bias",), *((0, outputs) if outputs is not None else ()))
    return new


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
        # A depthwise conv keeps one filter per channel: its groups follow its channel count.
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        groups = weight.shape[0] if depthwise and weight.shape[1] == 1 else module.groups
        return _conv_like(module, weight.shape[1] * groups, weight.shape[0], groups=groups)
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


def _conv_like(old: nn.Module, in_channels: int, out_channels: int, groups: int | None = None) -> nn.Module:
    """A conv with ``old``'s settings and new channel counts (values freshly initialised)."""
    base = next(cls for cls in PRUNABLE_TYPES if isinstance(old, cls))
    new = base(
        in_channels,
        out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups if groups is None else groups,
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
