"""The packed artifact of Deep Compression: a file whose size on disk is the honest compression figure.

:func:`save_compressed` writes a model's state (or a bare state dict) in the storage format of
Han et al. 2016, and :func:`load_compressed` reads it back bit-exactly. It works from module state
alone, so it packs any model however its weights got their zeros and shared values:

* each Conv1d/2d/3d or Linear weight is stored in the cheapest of four encodings:

  - ``sparse_codebook``: the non-zeros as (gap, code) pairs (:mod:`.encoding`: relative indices of
    ``index_bits`` bits with filler entries, code 0 = filler, code ``i + 1`` = codebook value ``i``),
    the gap and code streams each Huffman-coded, plus the codebook of distinct non-zero values;
  - ``dense_codebook``: every entry's code (0 = zero), Huffman-coded, plus the codebook; cheaper for
    layers with few zeros;
  - ``sparse_raw``: Huffman-coded gaps plus one raw value per entry (fillers hold zero), when a layer
    has more than ``2**16`` distinct non-zero values and sparse storage pays;
  - ``raw``: the tensor's bytes;

* a bool ``<weight>_mask`` equal to its weight's non-zero pattern is ``nonzero_of`` that weight (it
  costs nothing: the sparse format already says where the non-zeros are); other bool tensors are
  packed 8 per byte (``bits``); every other tensor (biases, BatchNorm statistics,
  ``num_batches_tracked``) is ``raw`` with its dtype and shape.

"Zero" means the all-zero bit pattern (+0.0): a -0.0 is a value like any other, so that the round
trip is bit-exact. Codebooks and raw values keep the weight's dtype, as its bit patterns.

File layout (integers little-endian)::

    offset  size  field
    0       4     magic b"LCPK"
    4       2     format version (2; version 1 files, whose manifest is not compressed, still load)
    6       2     reserved, 0
    8       8     manifest length m
    16      32    SHA-256 of the manifest
    48      m     manifest, zlib-compressed UTF-8 JSON: {"format", "version", "payload_bytes", "payload_sha256",
                  "tensors": [{"name", "dtype", "shape", "encoding", "parts": {part: [offset, length]},
                  and per encoding "kind", "index_bits", "codebook_size", "source"}]}
    48 + m        payload: every tensor's parts back to back; offsets are relative to its start

A Huffman part is :meth:`.encoding.HuffmanStream.to_bytes`; a codebook, raw values or a raw tensor
is its little-endian bytes. Nothing is pickled, so loading a file never runs code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from ..report import human_bytes
from .encoding import (
    HuffmanStream,
    absolute_positions,
    huffman_decode,
    huffman_encode,
    huffman_nbytes,
    relative_indices,
)

MAGIC = b"LCPK"
FORMAT_VERSION = 2
# Version 2 compresses the manifest with zlib: its JSON repeats key names for every tensor, and in a
# small pruned and shared model it was a fifth of the file (14 KB of 78 KB for a quarter-width VGG19).
READABLE_VERSIONS = (1, 2)
INDEX_BITS = MappingProxyType({"conv": 8, "linear": 5})
"""Deep Compression's relative-index bits: 8 for convolutions, 5 for fully connected layers."""
MAX_CODEBOOK = 1 << 16
"""A layer with more distinct non-zero values than this stores them raw instead of in a codebook."""

_HEADER = struct.Struct("<4sHHQ32s")
_KINDS = ((nn.Conv1d, "conv"), (nn.Conv2d, "conv"), (nn.Conv3d, "conv"), (nn.Linear, "linear"))
_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
        *(getattr(torch, name) for name in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2")
          if hasattr(torch, name)),
    )
}
# Same-sized integer dtypes to handle a floating tensor as its bit patterns (numpy has no bfloat16).
_BIT_VIEWS = {
    1: (torch.int8, np.int8), 2: (torch.int16, np.int16), 4: (torch.int32, np.int32), 8: (torch.int64, np.int64)
}

if sys.byteorder != "little":  # the payload is little-endian and written by viewing memory
    raise ImportError("lightning_compress.methods.sharing.packed supports little-endian hosts only")


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------


@dataclass
class PackedLayer:
    """How one Conv / Linear weight was stored, and what each Deep Compression stage would cost it.

    ``gap_bits`` and ``code_bits`` are the Huffman averages per stored gap / code (``code_bits`` is
    per weight for the dense encodings, the dtype's width for raw values). Stage bytes:
    ``pruned_bytes`` = the entries (fillers included) with ``index_bits`` relative indices and fp32
    values, ``shared_bytes`` = the same indices plus fixed-width codebook indices and an fp32
    codebook; each stage takes the dense layout instead where that is smaller, as the file does.
    ``stored_bytes`` is the sum of ``part_bytes``: what the layer costs in the file.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    numel: int
    nonzeros: int
    distinct: int
    encoding: str
    index_bits: int
    entries: int
    fillers: int
    gap_bits: float
    code_bits: float
    shared_index_bits: int
    part_bytes: dict[str, int]
    dense_bytes: int
    pruned_bytes: int
    shared_bytes: int
    note: str = ""

    @property
    def stored_bytes(self) -> int:
        return sum(self.part_bytes.values())


@dataclass
class PackedSummary:
    """The file's size beside Deep Compression's stage-by-stage sizes (its Table 1 columns).

    ``dense_bytes``: the whole state dict with every floating tensor in fp32 (others at their own
    width). ``pruned_bytes``: weights in CSR-like form (relative indices + fp32 values).
    ``shared_bytes``: relative indices + fixed-width codebook indices + fp32 codebooks.
    ``file_bytes``: after Huffman coding, the actual file, headers and manifest included. The
    non-weight tensors count at their stored size in the last three.
    """

    path: str
    file_bytes: int
    manifest_bytes: int
    dense_bytes: int
    pruned_bytes: int
    shared_bytes: int
    other_tensors: int
    other_bytes: int
    layers: list[PackedLayer] = field(default_factory=list)

    @property
    def compression_ratio(self) -> float:
        """Dense fp32 bytes over file bytes."""
        return self.dense_bytes / self.file_bytes if self.file_bytes else float("inf")

    def stages(self) -> dict[str, int]:
        return {"dense": self.dense_bytes, "pruned": self.pruned_bytes, "+ shared": self.shared_bytes,
                "+ huffman": self.file_bytes}

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (JSON-serializable), layers included."""
        out = asdict(self)
        for layer, record in zip(self.layers, out["layers"]):
            record["shape"] = list(layer.shape)
            record["stored_bytes"] = layer.stored_bytes
        out["stages"] = self.stages()
        out["compression_ratio"] = self.compression_ratio
        return out

    def table(self, title: str = "Packed file"):
        """A ``rich.table.Table``: one row per weight, the totals as its footer, the stages as caption."""
        from rich.table import Table

        stored = sum(layer.stored_bytes for layer in self.layers)
        numel = sum(layer.numel for layer in self.layers)
        nonzeros = sum(layer.nonzeros for layer in self.layers)
        stages = " -> ".join(f"{name} {human_bytes(size)}" for name, size in self.stages().items())
        table = Table(title=title, show_footer=True,
                      caption=f"{stages} ({self.compression_ratio:.1f}x); other tensors {self.other_tensors}: "
                              f"{human_bytes(self.other_bytes)}, manifest {human_bytes(self.manifest_bytes)}")
        columns = {
            "layer": "total", "encoding": "", "numel": f"{numel:,}", "nonzeros": f"{nonzeros:,}", "distinct": "",
            "gap bits": "", "code bits": "", "stored": human_bytes(stored),
            "pruned": human_bytes(sum(layer.pruned_bytes for layer in self.layers)),
            "shared": human_bytes(sum(layer.shared_bytes for layer in self.layers)),
            "dense fp32": human_bytes(sum(layer.dense_bytes for layer in self.layers)),
        }
        notes = any(layer.note for layer in self.layers)
        if notes:
            columns["note"] = ""
        for column, footer in columns.items():
            justify = "left" if column in ("layer", "encoding", "note") else "right"
            table.add_column(column, footer=footer, justify=justify)
        for layer in self.layers:
            table.add_row(
                layer.name, layer.encoding, f"{layer.numel:,}", f"{layer.nonzeros:,}", f"{layer.distinct:,}",
                f"{layer.gap_bits:.2f}" if layer.entries and "sparse" in layer.encoding else "-",
                f"{layer.code_bits:.2f}", human_bytes(layer.stored_bytes), human_bytes(layer.pruned_bytes),
                human_bytes(layer.shared_bytes), human_bytes(layer.dense_bytes), *([layer.note] if notes else []),
            )
        return table


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def save_compressed(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    index_bits: int | Mapping[str, int] = INDEX_BITS,
    codebook_bits: int | Mapping[str, int] | None = None,
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

    entries: list[tuple[dict[str, Any], dict[str, bytes]]] = []
    layers: list[PackedLayer] = []
    weight_bits: dict[str, np.ndarray] = {}
    dense_bytes = other_bytes = 0
    for name, tensor in state.items():
        tensor = _plain_tensor(name, tensor)
        dense_bytes += tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
        meta = {"name": name, "dtype": _dtype_name(name, tensor.dtype), "shape": list(tensor.shape)}
        kind = kinds.get(name)
        if kind is not None:
            bits = _bit_view(tensor)
            weight_bits[name] = bits
            meta_, parts, layer = _encode_weight(
                name, tuple(tensor.shape), kind, bits, index_bits[kind], shared_bits[kind]
            )
            layers.append(layer)
        else:
            meta_, parts = _encode_other(name, tensor, weight_bits)
            other_bytes += sum(len(part) for part in parts.values())
        entries.append(({**meta, **meta_}, parts))

    manifest, payload_size = _write(path, entries)
    return PackedSummary(
        path=str(path),
        file_bytes=_HEADER.size + len(manifest) + payload_size,
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


def _plain_tensor(name: str, tensor: Any) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"state entry {name!r} is a {type(tensor).__name__}, not a tensor; only tensors can be packed")
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise TypeError(
            f"state entry {name!r} is a {tensor.layout} / quantized tensor; only dense tensors can be packed"
        )
    return tensor.detach().cpu().resolve_conj().resolve_neg()


def _dtype_name(name: str, dtype: torch.dtype) -> str:
    text = str(dtype).removeprefix("torch.")
    if _DTYPES.get(text) != dtype:
        raise TypeError(f"state entry {name!r} has dtype {dtype}, which the packed format does not store")
    return text


def _bit_view(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bit patterns as signed integers, flattened in logical (C) order."""
    torch_int, _ = _BIT_VIEWS[tensor.element_size()]
    return tensor.contiguous().reshape(-1).view(torch_int).numpy()


def _encode_weight(
    name: str, shape: tuple[int, ...], kind: str, bits: np.ndarray, index_bits: int, shared_bits: int | None
) -> tuple[dict[str, Any], dict[str, bytes], PackedLayer]:
    """Manifest fields, parts and summary row of one weight, given as its flattened bit patterns."""
    numel = bits.size
    positions = np.flatnonzero(bits)  # +0.0 is the only all-zero pattern; -0.0 is kept as a value
    values = bits[positions]
    codebook, inverse = np.unique(values, return_inverse=True)
    gaps, is_filler = relative_indices(positions, numel, index_bits, return_fillers=True)
    notes = []
    negative_zeros = int(np.count_nonzero(values == np.iinfo(bits.dtype).min))  # the sign bit alone
    if negative_zeros:
        notes.append(f"{negative_zeros:,} negative zeros (-0.0) stored as values, to round-trip bit-exactly; "
                     "prune with masked_fill_ or torch.where to get +0.0")

    codes = None
    if codebook.size <= MAX_CODEBOOK:
        codes = (inverse.reshape(-1) + 1).astype(np.uint16 if codebook.size < 1 << 16 else np.uint32)
        sparse_layout, codebook_bytes = _codebook_layout(codes, positions, numel, gaps, is_filler)
        # A weight that was never shared (every value distinct) is smaller stored raw: codes of ~log2(n)
        # bits plus the n values themselves cost more than the values alone.
        if codebook_bytes + codebook.size * bits.itemsize >= _raw_nbytes(bits, gaps):
            codes = None
    else:
        notes.append(f"{codebook.size:,} distinct non-zero values > {MAX_CODEBOOK:,}: values stored raw "
                     f"({bits.itemsize * 8}-bit)")
    if codes is not None:
        encoding, streams = _codebook_streams(codes, positions, numel, gaps, is_filler, sparse_layout)
        parts = {part: stream.to_bytes() for part, stream in streams.items()}
        parts["codebook"] = codebook.astype(_little(bits.dtype)).tobytes()
    else:
        encoding, streams, parts = _raw_parts(bits, values, gaps, is_filler)

    meta: dict[str, Any] = {"kind": kind, "encoding": encoding}
    if encoding.startswith("sparse"):
        meta["index_bits"] = index_bits
    if "codebook" in parts:
        meta["codebook_size"] = int(codebook.size)
    pruned, shared, shared_index_bits = _stage_bytes(
        numel, positions.size, gaps.size, int(is_filler.sum()), index_bits,
        codebook.size if codebook.size <= MAX_CODEBOOK else None, shared_bits, notes,
    )
    layer = PackedLayer(
        name=name, kind=kind, shape=shape, numel=numel, nonzeros=int(positions.size), distinct=int(codebook.size),
        encoding=encoding, index_bits=index_bits if encoding.startswith("sparse") else 0,
        entries=int(gaps.size), fillers=int(is_filler.sum()),
        gap_bits=streams["gaps"].bits_per_symbol if "gaps" in streams else 0.0,
        code_bits=streams["codes"].bits_per_symbol if "codes" in streams else 8.0 * bits.itemsize,
        shared_index_bits=shared_index_bits, part_bytes={part: len(data) for part, data in parts.items()},
        dense_bytes=numel * 4, pruned_bytes=pruned, shared_bytes=shared, note="; ".join(notes),
    )
    return meta, parts, layer


def _codebook_layout(
    codes: np.ndarray, positions: np.ndarray, numel: int, gaps: np.ndarray, is_filler: np.ndarray
) -> tuple[bool, int]:
    """Whether (gaps, codes with 0 = filler) beats (one code per weight, 0 = zero) once Huffman-coded, and
    the bytes of the winner; computed from symbol frequencies, so nothing is encoded to decide."""
    frequencies = np.bincount(codes, minlength=int(codes.max(initial=0)) + 1)
    sparse_frequencies, dense_frequencies = frequencies.copy(), frequencies.copy()
    sparse_frequencies[0], dense_frequencies[0] = is_filler.sum(), numel - positions.size
    sparse_bytes = huffman_nbytes(np.bincount(gaps)) + huffman_nbytes(sparse_frequencies)
    dense_bytes = huffman_nbytes(dense_frequencies)
    return sparse_bytes <= dense_bytes, min(sparse_bytes, dense_bytes)


def _codebook_streams(
    codes: np.ndarray, positions: np.ndarray, numel: int, gaps: np.ndarray, is_filler: np.ndarray, sparse: bool
) -> tuple[str, dict[str, HuffmanStream]]:
    """The Huffman-coded codes in the layout :func:`_codebook_layout` chose."""
    if sparse:
        entry_codes = np.zeros(gaps.size, dtype=codes.dtype)
        entry_codes[~is_filler] = codes
        return "sparse_codebook", {"gaps": huffman_encode(gaps), "codes": huffman_encode(entry_codes)}
    all_codes = np.zeros(numel, dtype=codes.dtype)
    all_codes[positions] = codes
    return "dense_codebook", {"codes": huffman_encode(all_codes)}


def _raw_nbytes(bits: np.ndarray, gaps: np.ndarray) -> int:
    """Bytes of :func:`_raw_parts`' choice, without building it."""
    return min(bits.nbytes, huffman_nbytes(np.bincount(gaps)) + gaps.size * bits.itemsize)


def _raw_parts(
    bits: np.ndarray, values: np.ndarray, gaps: np.ndarray, is_filler: np.ndarray
) -> tuple[str, dict[str, HuffmanStream], dict[str, bytes]]:
    """Too many distinct values for a codebook: the smaller of (gaps, raw values) and the raw tensor."""
    little = _little(bits.dtype)
    gap_bytes = huffman_nbytes(np.bincount(gaps))
    if gap_bytes + gaps.size * bits.itemsize >= bits.nbytes:
        return "raw", {}, {"data": bits.astype(little).tobytes()}
    entry_values = np.zeros(gaps.size, dtype=little)  # fillers hold zero
    entry_values[~is_filler] = values
    stream = huffman_encode(gaps)
    return "sparse_raw", {"gaps": stream}, {"gaps": stream.to_bytes(), "values": entry_values.tobytes()}


def _stage_bytes(
    numel: int, nonzeros: int, entries: int, fillers: int, index_bits: int, codebook_size: int | None,
    shared_bits: int | None, notes: list[str],
) -> tuple[int, int, int]:
    """Deep Compression's pruned and shared sizes of one layer, and the index width of the latter.

    Each stage takes the cheaper of its sparse layout (``entries`` with ``index_bits`` relative
    indices) and the dense one, as the file does.
    """
    pruned = min(numel * 4, math.ceil(entries * (index_bits + 32) / 8))
    if codebook_size is None:
        return pruned, pruned, 32
    # The zero code is needed by fillers (sparse) and by the zeros themselves (dense).
    width_sparse = _bits_for(codebook_size + (fillers > 0))
    width_dense = _bits_for(codebook_size + (nonzeros < numel))
    if shared_bits is not None:
        if shared_bits < max(width_sparse, width_dense):
            notes.append(f"{codebook_size:,} codebook values need more than codebook_bits={shared_bits}")
        width_sparse, width_dense = max(shared_bits, width_sparse), max(shared_bits, width_dense)
    sparse_bits, dense_bits = entries * (index_bits + width_sparse), numel * width_dense
    shared = math.ceil(min(sparse_bits, dense_bits) / 8) + codebook_size * 4
    return pruned, shared, width_sparse if sparse_bits <= dense_bits else width_dense


def _little(dtype: np.dtype) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def _bits_for(symbols: int) -> int:
    return max(int(symbols) - 1, 0).bit_length()  # ceil(log2(symbols)); one symbol needs no bits


def _encode_other(
    name: str, tensor: torch.Tensor, weight_bits: Mapping[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, bytes]]:
    if tensor.dtype == torch.bool:
        flags = tensor.contiguous().reshape(-1).numpy()
        source = name.removesuffix("_mask")
        if name.endswith("_mask") and source in weight_bits and np.array_equal(flags, weight_bits[source] != 0):
            return {"encoding": "nonzero_of", "source": source}, {}
        return {"encoding": "bits"}, {"data": np.packbits(flags).tobytes()}
    return {"encoding": "raw"}, {"data": tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()}


def _write(path: Path, entries: list[tuple[dict[str, Any], dict[str, bytes]]]) -> tuple[bytes, int]:
    """Lay the parts out, write header + manifest + payload; return the manifest and payload size."""
    payload_hash = hashlib.sha256()
    offset = 0
    tensors = []
    for meta, parts in entries:
        meta["parts"] = {}
        for part, data in parts.items():
            meta["parts"][part] = [offset, len(data)]
            payload_hash.update(data)
            offset += len(data)
        tensors.append(meta)
    manifest = json.dumps(
        {"format": "lightning_compress.packed", "version": FORMAT_VERSION, "payload_bytes": offset,
         "payload_sha256": payload_hash.hexdigest(), "tensors": tensors},
        separators=(",", ":"),
    ).encode("utf-8")
    manifest = zlib.compress(manifest, 9)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(manifest), hashlib.sha256(manifest).digest())
    # Written beside the target and renamed, so an interrupted save never leaves a half file at path.
    temporary = path.with_name(path.name + ".partial")
    try:
        with open(temporary, "wb") as file:
            file.write(header)
            file.write(manifest)
            for _, parts in entries:
                for data in parts.values():
                    file.write(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return manifest, offset


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read a packed file back into a state dict (contiguous CPU tensors, bit-exact).

    Args:
        path: a file written by :func:`save_compressed`.
        model: when given, also ``model.load_state_dict(state, strict=True)`` (so mismatched keys or
            shapes raise PyTorch's error).

    Raises:
        ValueError: the file is not a packed file, was written by an unknown format version, or is
            truncated or corrupted (checked with SHA-256 before anything is decoded).

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
    manifest, payload = _read(path)
    state: dict[str, torch.Tensor] = {}
    try:
        weight_bits: dict[str, np.ndarray] = {}  # decoded weights, for the masks derived from them
        for meta in manifest["tensors"]:
            # A derived mask waits for its weight; the placeholder keeps the file's key order.
            derived = meta["encoding"] == "nonzero_of"
            state[meta["name"]] = None if derived else _decode_tensor(meta, payload, weight_bits)
        for meta in manifest["tensors"]:
            if meta["encoding"] == "nonzero_of":
                state[meta["name"]] = torch.from_numpy(weight_bits[meta["source"]] != 0).reshape(_shape(meta))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        # The checksums passed, so this is a file built to look valid, or one from a buggy writer.
        raise _corrupted(path, f"cannot decode it: {error!r}") from error
    if model is not None:
        model.load_state_dict(state, strict=True)
    return state


def _shape(meta: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(int(size) for size in meta["shape"])


def _decode_tensor(meta: Mapping[str, Any], payload: memoryview, weight_bits: dict[str, np.ndarray]) -> torch.Tensor:
    """One tensor from its manifest entry; a weight's bit patterns are also left in ``weight_bits``."""
    name, encoding, dtype, shape = meta["name"], meta["encoding"], _DTYPES[meta["dtype"]], _shape(meta)
    parts = {part: payload[offset : offset + length] for part, (offset, length) in meta["parts"].items()}
    if encoding == "bits":
        flags = np.unpackbits(np.frombuffer(parts["data"], np.uint8), count=math.prod(shape))
        return torch.from_numpy(flags.astype(bool)).reshape(shape)
    if encoding == "raw":
        data = np.frombuffer(parts["data"], np.uint8).copy()
        # torch cannot reinterpret an empty byte tensor as a wider dtype (its stride is 0)
        raw = torch.from_numpy(data).view(dtype).reshape(shape) if data.size else torch.empty(shape, dtype=dtype)
        if "kind" in meta:
            weight_bits[name] = _bit_view(raw)
        return raw
    bits = _decode_weight(meta, parts, dtype, math.prod(shape))
    weight_bits[name] = bits
    return torch.from_numpy(bits).view(dtype).reshape(shape)


def _read(path: Path) -> tuple[dict[str, Any], memoryview]:
    """Check magic, version and both checksums; return the manifest and the payload."""
    data = path.read_bytes()
    if data[:4] != MAGIC[: len(data[:4])]:  # a prefix of the magic is a truncated file of ours
        raise ValueError(
            f"{path} is not a lightning_compress packed file (starts with {data[:4]!r}, expected {MAGIC!r})"
        )
    version = struct.unpack_from("<H", data, 4)[0] if len(data) >= 6 else FORMAT_VERSION
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{path}: packed format version {version} is not supported (this reader knows versions "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    if len(data) < _HEADER.size:
        raise _corrupted(path, f"{len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    _, _, _, manifest_size, manifest_hash = _HEADER.unpack_from(data)
    view = memoryview(data)
    manifest_bytes = view[_HEADER.size : _HEADER.size + manifest_size]
    if len(manifest_bytes) != manifest_size:
        raise _corrupted(path, f"the manifest needs {manifest_size} bytes, the file has {len(manifest_bytes)}")
    if hashlib.sha256(manifest_bytes).digest() != manifest_hash:
        raise _corrupted(path, "manifest SHA-256 mismatch")
    try:
        text = zlib.decompress(manifest_bytes) if version >= 2 else bytes(manifest_bytes)
        manifest = json.loads(text.decode("utf-8"))
        expected_size, expected_hash = int(manifest["payload_bytes"]), manifest["payload_sha256"]
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise _corrupted(path, f"unreadable manifest: {error}") from error
    payload = view[_HEADER.size + manifest_size :]
    if len(payload) != expected_size:
        raise _corrupted(path, f"payload of {len(payload)} bytes, the manifest says {expected_size}")
    if hashlib.sha256(payload).hexdigest() != expected_hash:
        raise _corrupted(path, "payload SHA-256 mismatch")
    return manifest, payload


def _corrupted(path: Path, detail: str) -> ValueError:
    return ValueError(f"{path}: the file is truncated or corrupted ({detail})")



def _decode_weight(
    meta: Mapping[str, Any], parts: Mapping[str, memoryview], dtype: torch.dtype, numel: int
) -> np.ndarray:
    """The weight's bit patterns (flattened) from one of the codebook / sparse encodings."""
    _, int_type = _BIT_VIEWS[torch.empty(0, dtype=dtype).element_size()]
    little = np.dtype(int_type).newbyteorder("<")
    encoding = meta["encoding"]
    if encoding in ("sparse_codebook", "dense_codebook"):
        codebook = np.frombuffer(parts["codebook"], little)
        if codebook.size != meta["codebook_size"]:
            raise ValueError(f"codebook of {codebook.size} values, the manifest says {meta['codebook_size']}")
        table = np.concatenate([np.zeros(1, int_type), codebook])  # code 0: zero (and the filler)
        codes = huffman_decode(HuffmanStream.from_bytes(parts["codes"]))
        if codes.size and int(codes.max()) > codebook.size:
            raise ValueError("a code beyond the codebook")
        if encoding == "dense_codebook":
            if codes.size != numel:
                raise ValueError(f"{codes.size} codes for {numel} weights")
            return table[codes]
        gaps = huffman_decode(HuffmanStream.from_bytes(parts["gaps"]))
        entry_values = table[codes]
    elif encoding == "sparse_raw":
        gaps = huffman_decode(HuffmanStream.from_bytes(parts["gaps"]))
        entry_values = np.frombuffer(parts["values"], little)
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    if entry_values.size != gaps.size:
        raise ValueError(f"{gaps.size} gaps but {entry_values.size} values")
    bits = np.zeros(numel, dtype=int_type)
    # Fillers write their zero on a position that holds zero anyway, so they need no special case.
    bits[absolute_positions(gaps, numel=numel)] = entry_values
    return bits
