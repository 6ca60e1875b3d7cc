"""The packed artifact of Deep Compression: a file whose size on disk is the honest compression figure.

:func:`save_compressed` writes a model's state (or a bare state dict) in the storage format of
Han et al. 2016, and :func:`load_compressed` reads it back bit-exactly. It works from module state
alone, so it packs any model however its weights got their zeros and shared values: each Conv1d/2d/3d
or Linear weight is stored in the cheapest of four encodings (relative indices, codebooks, Huffman
coding; :mod:`.tensor_codecs`), or of five for a product-quantized one (per-sub-space codebooks of
sub-vectors, :mod:`.product`), every other tensor as its dtype and shape, all in one checked file
(:mod:`.container`). Loading is safe on a file from anyone: every size the file declares is checked
before it is used (:mod:`.validation`). The returned :class:`.summary.PackedSummary` sets the file's
size beside Deep Compression's stage-by-stage sizes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from .container import HEADER, corrupted, read_packed, write_packed
from .product import CODEBOOK as PRODUCT_CODEBOOK
from .product import divisors
from .summary import PackedLayer, PackedSummary
from .tensor_codecs import PartError, bit_view, decode_tensor, dtype_name, encode_other, encode_weight
from .validation import CheckedTensor, check_manifest, decoded_budget, invalid

INDEX_BITS = MappingProxyType({"conv": 8, "linear": 5})
"""Deep Compression's relative-index bits: 8 for convolutions, 5 for fully connected layers."""

_KINDS = ((nn.Conv1d, "conv"), (nn.Conv2d, "conv"), (nn.Conv3d, "conv"), (nn.Linear, "linear"))


def save_compressed(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    index_bits: int | Mapping[str, int] = INDEX_BITS,
    codebook_bits: int | Mapping[str, int] | None = None,
    subvectors: Mapping[str, int] | None = None,
) -> PackedSummary:
    """Write the packed file and return its :class:`PackedSummary`.

    Args:
        model_or_state_dict: a module (its Conv / Linear weights are found from its modules) or a
            state dict (every floating tensor with ndim >= 2 whose key ends in ``weight`` is a
            weight, a convolution's when ndim > 2).
        path: the file to write (replaced atomically: written beside it, then renamed).
        index_bits: relative-index bits per layer kind (``{"conv": ..., "linear": ...}``) or one
            width for both.
        codebook_bits: fixed width of a codebook index in the summary's ``+ shared`` stage (Deep
            Compression: 8 for convolutions, 5 for linear layers), per kind or one width. None (or a
            kind left out): the fewest bits that index the layer's codebook, the zero / filler code
            included where needed.
            It changes the summary only; a layer needing more bits keeps its own and says so.
        subvectors: ``{weight key: sub-vector length}`` of product-quantized weights
            (:mod:`.product`): each is also tried as one code per sub-vector plus per-sub-space
            codebooks, and stored so where that is smaller. A module's layers that still carry
            product-quantization buffers are found without it. A key that is not a Conv / Linear
            weight, or a length that does not divide its rows, is refused.

    Example:
        >>> import tempfile
        >>> _ = torch.manual_seed(0)
        >>> layer = nn.Linear(64, 32)
        >>> with torch.no_grad():  # 80% zeros, the rest +-0.1: two shared values
        ...     _ = layer.weight.copy_(torch.where(layer.weight.abs() > 0.1, layer.weight.sign() * 0.1, 0.0))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     summary = save_compressed(layer, Path(folder) / "linear.lcpk")
        ...     on_disk = (Path(folder) / "linear.lcpk").stat().st_size
        ...     state = load_compressed(Path(folder) / "linear.lcpk")
        >>> summary.layers[0].encoding, summary.layers[0].distinct, summary.file_bytes == on_disk
        ('dense_codebook', 2, True)
        >>> torch.equal(state["weight"], layer.weight)
        True
    """
    path = Path(path)
    index_bits = _per_kind(INDEX_BITS if index_bits is None else index_bits, "index_bits", INDEX_BITS, high=16)
    if None in index_bits.values():
        raise ValueError(f"index_bits must be set for both layer kinds, got {index_bits}")
    shared_bits = _per_kind(codebook_bits, "codebook_bits", {"conv": None, "linear": None}, high=32)
    state, kinds = _state_and_kinds(model_or_state_dict)
    subvectors = _subvectors(model_or_state_dict, state, kinds, subvectors)

    entries: list[tuple[dict[str, Any], dict[str, bytes]]] = []
    layers: list[PackedLayer] = []
    weight_bits: dict[str, np.ndarray] = {}
    dense_bytes = other_bytes = 0
    for name, tensor in state.items():
        tensor = _plain_tensor(name, tensor)
        dense_bytes += tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
        meta = {"name": name, "dtype": dtype_name(name, tensor.dtype), "shape": list(tensor.shape)}
        kind = kinds.get(name)
        if kind is not None:
            bits = bit_view(tensor)
            weight_bits[name] = bits
            meta_, parts, layer = encode_weight(
                name, tuple(tensor.shape), kind, bits, index_bits[kind], shared_bits[kind], subvectors.get(name)
            )
            layers.append(layer)
        else:
            meta_, parts = encode_other(name, tensor, weight_bits)
            other_bytes += sum(len(part) for part in parts.values())
        entries.append(({**meta, **meta_}, parts))

    manifest, payload_size = write_packed(path, entries)
    return PackedSummary(
        path=str(path),
        file_bytes=HEADER.size + len(manifest) + payload_size,
        manifest_bytes=len(manifest),
        dense_bytes=dense_bytes,
        pruned_bytes=other_bytes + sum(layer.pruned_bytes for layer in layers),
        shared_bytes=other_bytes + sum(layer.shared_bytes for layer in layers),
        other_tensors=len(entries) - len(layers),
        other_bytes=other_bytes,
        layers=layers,
    )


def _per_kind(
    value: int | Mapping[str, int] | None, name: str, default: Mapping[str, int | None], high: int
) -> dict[str, int | None]:
    """``{"conv": bits, "linear": bits}`` from one width or a (partial) mapping over ``default``."""
    if isinstance(value, Mapping):
        unknown = set(value) - {"conv", "linear"}
        if unknown:
            raise ValueError(f"{name} has unknown layer kinds {sorted(unknown)}; valid: 'conv', 'linear'")
        value = {**default, **value}
    else:
        value = {"conv": value, "linear": value}
    for kind, bits in value.items():
        if bits is not None and (not isinstance(bits, (int, np.integer)) or not 1 <= bits <= high):
            raise ValueError(f"{name}[{kind!r}]={bits!r} must be an integer in [1, {high}]")
    return value


def _state_and_kinds(
    source: nn.Module | Mapping[str, torch.Tensor],
) -> tuple[Mapping[str, torch.Tensor], dict[str, str]]:
    """The tensors to store, and the layer kind of each one stored as a compressible weight."""
    if isinstance(source, nn.Module):
        state = source.state_dict()
        kinds = {}
        for module_name, module in source.named_modules():
            kind = next((k for cls, k in _KINDS if isinstance(module, cls)), None)
            key = f"{module_name}.weight" if module_name else "weight"
            if kind is not None and key in state and state[key].is_floating_point():
                kinds[key] = kind
        return state, kinds
    if not isinstance(source, Mapping):
        raise TypeError(f"save_compressed needs an nn.Module or a state dict, got {type(source).__name__}")
    kinds = {
        key: "conv" if value.ndim > 2 else "linear"
        for key, value in source.items()
        if isinstance(value, torch.Tensor) and key.endswith("weight") and value.is_floating_point() and value.ndim >= 2
    }
    return source, kinds


def _subvectors(
    source: nn.Module | Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], kinds: Mapping[str, str],
    given: Mapping[str, int] | None,
) -> dict[str, int]:
    """Sub-vector length per product-quantized weight: as given, else read off the layers' buffers."""
    found: dict[str, int] = {}
    if isinstance(source, nn.Module):
        for module_name, module in source.named_modules():
            codebook = module._buffers.get(PRODUCT_CODEBOOK)
            if codebook is not None and codebook.ndim == 3:
                found[f"{module_name}.weight" if module_name else "weight"] = int(codebook.shape[-1])
    if given is not None:
        if not isinstance(given, Mapping):
            raise TypeError(f"subvectors must map weight keys to sub-vector lengths, got {type(given).__name__}")
        found.update(given)
    for key, size in found.items():
        if key not in kinds:
            raise ValueError(f"subvectors names {key!r}, which is not a Conv / Linear weight of what is packed")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"subvectors[{key!r}]={size!r} must be an integer >= 1")
        shape = tuple(state[key].shape)
        length = int(np.prod(shape[1:]))
        if length % size:
            raise ValueError(f"subvectors[{key!r}]={size} does not divide the {length} entries of a row of its "
                             f"{shape} weight (valid: {', '.join(map(str, divisors(length)[:12]))})")
    return {key: int(size) for key, size in found.items()}


def _plain_tensor(name: str, tensor: Any) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"state entry {name!r} is a {type(tensor).__name__}, not a tensor; only tensors can be packed")
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise TypeError(
            f"state entry {name!r} is a {tensor.layout} / quantized tensor; only dense tensors can be packed"
        )
    return tensor.detach().cpu().resolve_conj().resolve_neg()


def load_compressed(
    path: str | os.PathLike, model: nn.Module | None = None, max_decoded_bytes: int | None = None
) -> dict[str, torch.Tensor]:
    """Read a packed file back into a state dict (contiguous CPU tensors, bit-exact).

    Safe on a file from anyone: nothing is unpickled, and every count, shape, offset and length the
    file declares is checked against the format and the file's size before anything is allocated
    (:mod:`.validation`), so what loading allocates is bounded by ``max_decoded_bytes``.

    Args:
        path: a file written by :func:`save_compressed`.
        model: when given, also load the state into it (``strict=True``); a model of another
            architecture is refused first with one error listing what differs.
        max_decoded_bytes: the most bytes the file's tensors may decode to. Default
            :func:`.validation.decoded_budget`: 4096 times the file's size, at least 64 MiB.

    Raises:
        ValueError: the file is not a packed file, was written by an unknown format version, is
            truncated or corrupted (checked with SHA-256 before anything is decoded), declares
            something the format does not allow (the message names the tensor and the field), or
            does not fit ``model``.

    Example:
        >>> import tempfile
        >>> model, fresh = (nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)) for _ in range(2))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = save_compressed(model, Path(folder) / "model.lcpk")
        ...     state = load_compressed(Path(folder) / "model.lcpk", model=fresh)
        >>> all(torch.equal(state[key], value) for key, value in model.state_dict().items())
        True
        >>> torch.equal(fresh[0].weight, model[0].weight)
        True
    """
    path = Path(path)
    manifest, payload, file_bytes = read_packed(path)
    budget = decoded_budget(file_bytes) if max_decoded_bytes is None else int(max_decoded_bytes)
    entries = check_manifest(path, manifest, payload, budget)
    state: dict[str, torch.Tensor | None] = {}
    weight_bits: dict[str, np.ndarray] = {}  # decoded weights, for the masks derived from them
    for entry in entries:
        # A derived mask waits for its weight; the placeholder keeps the file's key order.
        derived = entry.meta["encoding"] == "nonzero_of"
        state[entry.name] = None if derived else _decode(path, entry, weight_bits)
    for entry in entries:
        if entry.meta["encoding"] == "nonzero_of":
            state[entry.name] = torch.from_numpy(weight_bits[entry.meta["source"]] != 0).reshape(entry.shape)
    if model is not None:
        _load_into(path, state, model)
    return state


def _load_into(path: Path, state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """``model.load_state_dict(state, strict=True)``, with one short error for another architecture."""
    # A load pre-hook may rebuild the model's structure from the state (restore_structure_on_load):
    # such a model can only be compared once torch's attempt has run the hook.
    hooked = any(module._load_state_dict_pre_hooks for module in model.modules())
    mismatch = None if hooked else state_mismatch(path, state, model)
    if mismatch is not None:  # before anything is copied, so the model is left as it was
        raise mismatch
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        mismatch = state_mismatch(path, state, model)
        if mismatch is None:
            raise
        raise mismatch from error


def state_mismatch(path: Path, state: dict[str, torch.Tensor], model: nn.Module, shown: int = 5) -> ValueError | None:
    """What the file holds that the model lacks, and the reverse, and the shapes that differ."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    extra = [key for key in state if key not in expected]
    shapes = [
        f"{key!r}: file {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
        for key in state if key in expected and state[key].shape != expected[key].shape
    ]
    if not (missing or extra or shapes):
        return None

    def first(items: list[str], quote: bool = True) -> str:
        listed = (", " if quote else "; ").join(repr(item) if quote else item for item in items[:shown])
        return listed + (f" and {len(items) - shown} more" if len(items) > shown else "")

    lines = [f"{path} does not fit this {type(model).__name__}: the file holds {len(state)} tensors, "
             f"the model's state has {len(expected)}"]
    if extra:
        lines.append(f"in the file, not in the model ({len(extra)}): {first(extra)}")
    if missing:
        lines.append(f"in the model, not in the file ({len(missing)}): {first(missing)}")
    if shapes:
        lines.append(f"shapes that differ ({len(shapes)}): {first(shapes, quote=False)}")
    return ValueError("\n  ".join(lines))


def _decode(path: Path, entry: CheckedTensor, weight_bits: dict[str, np.ndarray]) -> torch.Tensor:
    try:
        return decode_tensor(entry, weight_bits)
    except PartError as error:  # the bits themselves: a stream that does not end where it says
        raise invalid(path, entry.name, f"parts.{error.part}", error.detail) from None
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        # Every field was checked, so this is a gap in the checks rather than in the file: still a
        # ValueError naming the file, as the checks would have raised.
        raise corrupted(path, f"cannot decode tensor {entry.name!r}: {error!r}") from error
