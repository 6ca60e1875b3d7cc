"""Which weights a compression reaches, which it cannot, and why.

Every technique here acts through a layer: its class is swapped (masks, fake quantization) or the
layer is replaced (factor chains), and the change takes effect in the layer's ``forward``. Two kinds
of weight escape that:

* weights a parent module reads directly, never calling the layer: ``nn.MultiheadAttention`` passes
  ``in_proj_weight`` (a bare Parameter) and ``out_proj.weight`` to its functional kernel, so its
  ``out_proj`` Linear never runs its own forward. These are left alone, and said so.
* ``nn.TransformerEncoderLayer`` has a fused inference path (eval mode, no autograd) that reads
  ``linear1`` / ``linear2`` and the attention's weights as tensors. torch takes its regular path
  whenever the block has a forward hook (its own check), so :func:`keep_regular_forward` gives a
  block whose layers are compressed a hook that does nothing: a compressed layer then always runs.

Example:
    >>> from torch import nn
    >>> encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1,
    ...                                 enable_nested_tensor=False)
    >>> sorted(bypassed_layers(encoder))
    ['layers.0.self_attn.out_proj']
    >>> keep_regular_forward(encoder, ["layers.0.linear1"])
    ['layers.0']
"""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn


def bypassed_layers(model: nn.Module) -> dict[str, str]:
    """Layers whose forward never runs because their parent reads their weights directly, with the reason."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            prefix = f"{name}." if name else ""
            out[prefix + "out_proj"] = (f"{name or 'the model'} (MultiheadAttention) reads its out_proj weight directly; "
                                        "the layer's own forward never runs")
    return out


def _regular_path(module: nn.Module, args):
    """Does nothing; being a hook at all keeps TransformerEncoderLayer off its fused inference path."""
    return None


def keep_regular_forward(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Keep every ``nn.TransformerEncoderLayer`` holding one of the named layers on its regular path.

    Idempotent; the hook is a module-level function, so the model still pickles. Returns the blocks
    given the hook now.
    """
    modules = dict(model.named_modules())
    hooked = []
    for name in names:
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            parent_name = ".".join(parts[:depth])
            parent = modules.get(parent_name)
            if isinstance(parent, nn.TransformerEncoderLayer):
                if _regular_path not in parent._forward_pre_hooks.values():
                    parent.register_forward_pre_hook(_regular_path)
                    hooked.append(parent_name)
                break
    return hooked


def uncovered_weights(model: nn.Module, names: Iterable[str], accept: Callable[[nn.Module], bool]) -> dict[str, str]:
    """Weight tensors (2 or more dimensions) outside the named layers, each with why it is left.

    ``accept`` is the technique's test of a layer; what it refuses is reported by class name.
    """
    covered = set(names)
    bypassed = bypassed_layers(model)
    out = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if module_name in covered or any(module_name.startswith(n + ".") for n in covered):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param.ndim < 2:
                continue
            if module_name in bypassed:
                out[prefix + param_name] = bypassed[module_name]
            elif accept(module):
                continue  # a layer the technique takes, left out by the targets the user gave
            elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                out[prefix + param_name] = f"a {type(module).__name__}, which this technique does not take"
            else:
                out[prefix + param_name] = f"a Parameter of {type(module).__name__}, not a Conv or Linear layer"
    return out
