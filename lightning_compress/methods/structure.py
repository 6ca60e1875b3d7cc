"""Rebuild a network's compressed structure from a state dict, whatever technique produced it.

Compression changes what a network's state dict holds: masks beside the weights, fake-quant buffers
and formats, codebooks, factor chains instead of one weight, smaller tensors where channels were
removed. A freshly built network has no place for those tensors, so ``load_state_dict`` fails on
it. Every one of these changes can be read back from the state dict alone (its key names and
shapes), and :func:`restore_structure` makes a network match one:

* factorized layers: ``<layer>.reduce.weight`` / ``core`` / ``expand`` instead of ``<layer>.weight``;
* removed channels: a weight (and its BatchNorm) smaller than the layer's;
* pruning masks: ``<layer>.weight_mask`` (and the training-only ``weight_rewind`` / ``weight_grad_sq``);
* fake-quant layers: ``<layer>.weight_bits`` and the formats in ``<layer>._extra_state``;
* codebooks: ``<layer>.weight_code`` / ``<layer>.weight_codebook``.

It also works the other way round: a network whose layers a callback already masked, and a state
dict written after the masks were folded in at the end of a fit. A missing mask is then read off the
exact zeros that folding left; any other missing compression tensor keeps the network's own value.

One function, called before every load, is what makes a checkpoint of any technique (or of several
composed) load into a fresh network: a resumed fit, ``trainer.test(ckpt_path=...)``,
``load_from_checkpoint``, ``ImageClassifier(weights=...)``. :func:`plain_state_dict` is its
counterpart for starting over: the weights as a plain network holds them.

Example:
    >>> from torch import nn
    >>> from lightning_compress.methods.pruning import add_mask
    >>> trained = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> _ = add_mask(trained[0])
    >>> fresh = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> restore_structure(fresh, trained.state_dict())
    ['0']
    >>> fresh.load_state_dict(trained.state_dict())
    <All keys matched successfully>
    >>> sorted(plain_state_dict(trained.state_dict()))
    ['0.bias', '0.weight', '2.bias', '2.weight']
"""

from __future__ import annotations

import math
from typing import Any, Mapping, MutableMapping

import torch
from torch import nn

from .coverage import keep_regular_forward
from .decomposition.apply import restore_factorized
from .pruning.surgery import resize_to_state_dict
from .pruning.masks import add_mask, is_masked, is_prunable
from .quantization.layers import can_quantize, is_quantized, quantization_config, quantize_layer

MASK = "weight_mask"
# Pruning buffers that only a run in progress needs (lottery-ticket rewinding, OBD's squared gradients).
TRAINING_BUFFERS = ("weight_rewind", "weight_grad_sq")
QUANT_BUFFERS = ("weight_bits", "activation_min", "activation_max", "activation_observed")
CODEBOOK_BUFFERS = ("weight_code", "weight_codebook", "weight_pq_code", "weight_pq_codebook")
EXTRA_STATE = "_extra_state"  # torch's key for get_extra_state(); fake-quant layers keep their formats there
COMPRESSION_ENTRIES = (MASK, *TRAINING_BUFFERS, *QUANT_BUFFERS, *CODEBOOK_BUFFERS, EXTRA_STATE)


def restore_structure(model: nn.Module, state_dict: MutableMapping[str, torch.Tensor] | Mapping[str, Any],
                      prefix: str = "") -> list[str]:
    """Make ``model``'s structure match ``state_dict`` so that ``model.load_state_dict`` succeeds.

    ``state_dict`` holds ``model``'s entries under ``prefix`` (``"model."`` for the network inside an
    ``ImageClassifier`` checkpoint); a Lightning checkpoint (a dict with ``"state_dict"``) is accepted
    too. Layers are rebuilt in the order the techniques compose: factorize, resize, mask, quantize,
    share. Where ``model`` holds a mask or a compression buffer that ``state_dict`` lacks, the entry is
    added to ``state_dict`` (a mutable mapping then): a mask from the weight's exact zeros, anything
    else with the model's current value. Returns the names of the layers changed, in model order.

    Example (a fake-quant layer's formats travel in its state dict):
        >>> from lightning_compress.methods.quantization import Format, is_quantized, quantize_layer
        >>> trained = nn.Sequential(nn.Conv2d(3, 8, 3))
        >>> _ = quantize_layer(trained[0], Format(4, "symmetric"), Format(8, "affine"))
        >>> fresh = nn.Sequential(nn.Conv2d(3, 8, 3))
        >>> restore_structure(fresh, trained.state_dict()), is_quantized(fresh[0]), int(fresh[0].weight_bits)
        (['0'], True, 4)
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    own = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    changed = set(restore_factorized(model, own)) | set(resize_to_state_dict(model, own))
    for name, layer in model.named_modules():
        key = f"{name}." if name else ""
        if _restore_layer(layer, own, key, state_dict, prefix + key):
            changed.add(name)
    changed_names = [name for name, _ in model.named_modules() if name in changed]
    keep_regular_forward(model, changed_names)
    return changed_names


def _restore_layer(layer: nn.Module, own: Mapping[str, Any], key: str, target: Any, full_key: str) -> bool:
    """Give one layer the compression tensors ``own`` holds for it (keys ``key + ...``); True if it changed."""
    changed = False
    has = lambda entry: key + entry in own  # noqa: E731
    if has(MASK) and not is_masked(layer):
        if not (is_prunable(layer) or is_quantized(layer)):
            raise ValueError(f"state_dict has {key + MASK!r} but {key[:-1] or 'the model'} is a "
                             f"{type(layer).__name__}, which cannot be masked")
        add_mask(layer)
        changed = True
    for buffer in TRAINING_BUFFERS:
        if has(buffer) and buffer not in layer._buffers:
            layer.register_buffer(buffer, torch.zeros_like(own[key + buffer], device=layer.weight.device))
            changed = True
    if has(EXTRA_STATE) and has("weight_bits") and not is_quantized(layer):
        if not can_quantize(layer):
            raise ValueError(f"state_dict holds fake-quant state for {key[:-1]!r}, a {type(layer).__name__}; "
                             "only Conv1d, Conv2d and Linear layers are quantized")
        weight_format, activation_format, momentum, per_channel = quantization_config(own[key + EXTRA_STATE])
        quantize_layer(layer, weight_format, activation_format, momentum, per_channel)
        changed = True
    elif has("weight_bits") and not is_quantized(layer):
        raise ValueError(f"state_dict holds fake-quant buffers for {key[:-1]!r} but not their formats "
                         f"({key + EXTRA_STATE!r}): it was written by an older version. Load it with the "
                         "QuantizationAwareTraining callback of the run that wrote it, or re-save it.")
    if has("weight_codebook") and "weight_codebook" not in layer._buffers:
        codebook = own[key + "weight_codebook"]
        bits = int(math.log2(max(1, codebook.numel())))
        layer.register_buffer("weight_code", torch.full_like(layer.weight, -1, dtype=torch.int32))
        layer.register_buffer("weight_codebook", torch.zeros(2**bits, dtype=torch.float32, device=layer.weight.device))
        changed = True
    if has("weight_pq_codebook") and "weight_pq_codebook" not in layer._buffers and has("weight_pq_code"):
        # Product quantization: shapes from the state dict ((rows, blocks) codes, (blocks, K, d) codebooks).
        codes, codebook = own[key + "weight_pq_code"], own[key + "weight_pq_codebook"]
        device = layer.weight.device
        layer.register_buffer("weight_pq_code", torch.full(tuple(codes.shape), -1, dtype=torch.int32, device=device))
        layer.register_buffer("weight_pq_codebook", torch.zeros(tuple(codebook.shape), dtype=torch.float32, device=device))
        changed = True
    _complete(layer, own, key, target, full_key)
    return changed


def _complete(layer: nn.Module, own: Mapping[str, Any], key: str, target: Any, full_key: str) -> None:
    """Add to ``target`` what the layer has and the state dict lacks (a checkpoint written after a fold)."""
    if not isinstance(target, MutableMapping):
        return
    weight = own.get(key + "weight")
    if is_masked(layer) and key + MASK not in own and weight is not None:
        target[full_key + MASK] = weight != 0
    for buffer in (*TRAINING_BUFFERS, *QUANT_BUFFERS, *CODEBOOK_BUFFERS):
        if buffer in layer._buffers and key + buffer not in own and layer._buffers[buffer] is not None:
            target[full_key + buffer] = layer._buffers[buffer]
    if is_quantized(layer) and key + EXTRA_STATE not in own:
        target[full_key + EXTRA_STATE] = layer.get_extra_state()


def strip_structure(model: nn.Module) -> nn.Module:
    """The plain network under the compression structure, in place: masks and fake-quant layers removed
    and codebook buffers dropped, the weights as they are (factor chains and removed channels stay: they
    are the weights). What a model computed before a compression callback first acted on it."""
    from .pruning.masks import remove_mask
    from .quantization.layers import dequantize_layer
    from .sharing.codebook import remove_codebook_buffers

    for layer in list(model.modules()):
        dequantize_layer(layer, bake=False)
        remove_mask(layer, fold=False)
        remove_codebook_buffers(layer)
        for buffer in TRAINING_BUFFERS:
            layer._buffers.pop(buffer, None)
    return model


def _restore_before_load(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    restore_structure(module, state_dict, prefix)


def restore_structure_on_load(module: nn.Module) -> nn.Module:
    """Make every ``module.load_state_dict`` first rebuild the state dict's compressed structure.

    One line in a LightningModule's ``__init__`` (``ImageClassifier`` has it) and every way a
    checkpoint reaches the module rebuilds the compressed network first: ``load_from_checkpoint``,
    ``trainer.test(ckpt_path=...)``, resuming, and the weights that ``ddp_spawn`` copies back to the
    main process. The hook is a module-level function, so the module still pickles. Idempotent.

    Example:
        >>> from torch import nn
        >>> from lightning_compress.methods.pruning import add_mask
        >>> trained = nn.Sequential(nn.Linear(4, 2))
        >>> _ = add_mask(trained[0])
        >>> fresh = restore_structure_on_load(nn.Sequential(nn.Linear(4, 2)))
        >>> fresh.load_state_dict(trained.state_dict())
        <All keys matched successfully>
    """
    if not restores_on_load(module):
        module.register_load_state_dict_pre_hook(_restore_before_load)
    return module


def restores_on_load(module: nn.Module) -> bool:
    return any(getattr(hook, "hook", None) is _restore_before_load for hook in module._load_state_dict_pre_hooks.values())


def plain_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights as a plain network holds them: masks multiplied in, every compression entry dropped.

    Shapes stay as they are (factorized layers and removed channels are structure that
    :func:`restore_structure` rebuilds); fake-quant layers keep their weights (full precision unless
    finalized), shared layers the centroid values their weights already hold.

    Example:
        >>> import torch
        >>> state = {"0.weight": torch.tensor([[1.0, 2.0]]), "0.weight_mask": torch.tensor([[True, False]]),
        ...          "0.weight_bits": torch.tensor(8)}
        >>> plain_state_dict(state)
        {'0.weight': tensor([[1., 0.]])}
    """
    out = {k: v for k, v in state_dict.items() if k.rpartition(".")[2] not in COMPRESSION_ENTRIES}
    for key, mask in state_dict.items():
        if key.endswith("." + MASK) or key == MASK:
            weight_key = key[: -len(MASK)] + "weight"
            if weight_key in out:
                out[weight_key] = out[weight_key] * mask.to(out[weight_key].dtype)
    return out
