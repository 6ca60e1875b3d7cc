"""How each tensor of a packed file is encoded and decoded, bit-exactly.

Each Conv1d/2d/3d or Linear weight (:func:`encode_weight`) is stored in the cheapest of four
encodings:

* ``sparse_codebook``: the non-zeros as (gap, code) pairs (:mod:`.relative_index`: relative indices
  of ``index_bits`` bits with filler entries, code 0 = filler, code ``i + 1`` = codebook value
  ``i``), the gap and code streams each Huffman-coded (:mod:`.huffman`), plus the codebook of
  distinct non-zero values;
* ``dense_codebook``: every entry's code (0 = zero), Huffman-coded, plus the codebook; cheaper for
  layers with few zeros;
* ``sparse_raw``: Huffman-coded gaps plus one raw value per entry (fillers hold zero), when a layer
  has more than ``2**16`` distinct non-zero values and sparse storage pays;
* ``raw``: the tensor's bytes;
* ``product_codebook`` (product quantization, :mod:`.product`), tried only for a weight whose
  sub-vector length is given: the weight as rows (``shape[0]``) of ``subvector_size``-long
  sub-vectors, one code per sub-vector (row-major ``(rows, blocks)``, Huffman-coded) naming one of
  the ``codebook_size`` distinct sub-vectors of its column block, plus the codebooks
  ``(blocks, codebook_size, subvector_size)`` (a block with fewer distinct sub-vectors pads its
  codebook with zeros, never referenced); kept where it is smaller than the best of the others.

A bool ``<weight>_mask`` equal to its weight's non-zero pattern is ``nonzero_of`` that weight (it
costs nothing: the sparse format already says where the non-zeros are); other bool tensors are
packed 8 per byte (``bits``); every other tensor (biases, BatchNorm statistics,
``num_batches_tracked``) is ``raw`` with its dtype and shape (:func:`encode_other`).

"Zero" means the all-zero bit pattern (+0.0): a -0.0 is a value like any other, so that the round
trip is bit-exact. Codebooks and raw values keep the weight's dtype, as its bit patterns. A Huffman
part is :meth:`.huffman.HuffmanStream.to_bytes`; a codebook, raw values or a raw tensor is its
little-endian bytes. :func:`decode_tensor` reverses every encoding from a tensor's manifest entry, once
:mod:`.validation` has checked it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .huffman import HuffmanStream, huffman_decode, huffman_encode, huffman_nbytes
from .relative_index import absolute_positions, relative_indices
from .summary import PackedLayer, stage_bytes

if TYPE_CHECKING:
    from .validation import CheckedTensor

MAX_CODEBOOK = 1 << 16
"""A layer with more distinct non-zero values than this stores them raw instead of in a codebook."""

DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
        *(getattr(torch, name) for name in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2")
          if hasattr(torch, name)),
    )
}
"""The dtypes a packed file stores, by the name its manifest gives them."""

# Same-sized integer dtypes to handle a floating tensor as its bit patterns (numpy has no bfloat16).
_BIT_VIEWS = {
    1: (torch.int8, np.int8), 2: (torch.int16, np.int16), 4: (torch.int32, np.int32), 8: (torch.int64, np.int64)
}

if sys.byteorder != "little":  # the payload is little-endian and written by viewing memory
    raise ImportError("lightning_compress.methods.sharing.packed supports little-endian hosts only")


def dtype_name(name: str, dtype: torch.dtype) -> str:
    text = str(dtype).removeprefix("torch.")
    if DTYPES.get(text) != dtype:
        raise TypeError(f"state entry {name!r} has dtype {dtype}, which the packed format does not store")
    return text


def bit_view(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bit patterns as signed integers, flattened in logical (C) order."""
    torch_int, _ = _BIT_VIEWS[tensor.element_size()]
    return tensor.contiguous().reshape(-1).view(torch_int).numpy()


def encode_weight(
    name: str, shape: tuple[int, ...], kind: str, bits: np.ndarray, index_bits: int, shared_bits: int | None,
    subvector_size: int | None = None,
) -> tuple[dict[str, Any], dict[str, bytes], PackedLayer]:
    """Manifest fields, parts and summary row of one weight, given as its flattened bit patterns; with
    ``subvector_size``, the product-quantized encoding too, where it is smaller."""
    meta, parts, layer = _encode_scalar(name, shape, kind, bits, index_bits, shared_bits)
    if subvector_size is not None:
        product = _encode_product(name, shape, kind, bits, subvector_size, layer)
        if product is not None and product[2].stored_bytes < layer.stored_bytes:
            return product
    return meta, parts, layer


def _encode_scalar(
    name: str, shape: tuple[int, ...], kind: str, bits: np.ndarray, index_bits: int, shared_bits: int | None
) -> tuple[dict[str, Any], dict[str, bytes], PackedLayer]:
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
    pruned, shared, shared_index_bits = stage_bytes(
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


def product_blocks(shape: tuple[int, ...], subvector_size: int) -> tuple[int, int]:
    """``(rows, blocks)`` of a weight cut into sub-vectors: ``shape[0]`` rows of ``prod(shape[1:])``
    entries, ``blocks`` sub-vectors each."""
    rows = shape[0]
    return rows, math.prod(shape[1:]) // subvector_size


def _encode_product(
    name: str, shape: tuple[int, ...], kind: str, bits: np.ndarray, subvector_size: int, scalar: PackedLayer
) -> tuple[dict[str, Any], dict[str, bytes], PackedLayer] | None:
    """The ``product_codebook`` encoding, or None when a block has more than ``MAX_CODEBOOK`` distinct
    sub-vectors."""
    rows, blocks = product_blocks(shape, subvector_size)
    vectors = bits.reshape(rows, blocks, subvector_size)
    codes = np.zeros((rows, blocks), dtype=np.uint32)
    tables = []
    for block in range(blocks):  # the distinct sub-vectors of each block, as bit patterns
        table, inverse = np.unique(vectors[:, block], axis=0, return_inverse=True)
        tables.append(table)
        codes[:, block] = inverse.reshape(-1)
    size = max((len(table) for table in tables), default=0)
    if size > MAX_CODEBOOK:
        return None
    codebook = np.zeros((blocks, size, subvector_size), dtype=_little(bits.dtype))
    for block, table in enumerate(tables):
        codebook[block, : len(table)] = table
    codes = codes.astype(np.uint16 if size <= 1 << 16 else np.uint32).reshape(-1)
    stream = huffman_encode(codes)
    parts = {"codes": stream.to_bytes(), "codebook": codebook.tobytes()}
    meta = {"kind": kind, "encoding": "product_codebook", "subvector_size": subvector_size, "codebook_size": size}
    code_width = max(size - 1, 0).bit_length()
    layer = replace(
        scalar, distinct=size, encoding="product_codebook", index_bits=0, entries=0, fillers=0, gap_bits=0.0,
        code_bits=stream.bits_per_symbol, shared_index_bits=code_width,
        part_bytes={part: len(data) for part, data in parts.items()},
        shared_bytes=math.ceil(rows * blocks * code_width / 8) + codebook.size * 4,
        note=f"product quantization: {rows:,} x {blocks:,} sub-vectors of {subvector_size}, "
             f"at most {size:,} centroids per sub-space",
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


def _little(dtype: np.dtype) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def encode_other(
    name: str, tensor: torch.Tensor, weight_bits: Mapping[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, bytes]]:
    if tensor.dtype == torch.bool:
        flags = tensor.contiguous().reshape(-1).numpy()
        source = name.removesuffix("_mask")
        if name.endswith("_mask") and source in weight_bits and np.array_equal(flags, weight_bits[source] != 0):
            return {"encoding": "nonzero_of", "source": source}, {}
        return {"encoding": "bits"}, {"data": np.packbits(flags).tobytes()}
    return {"encoding": "raw"}, {"data": tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()}


class PartError(ValueError):
    """A part whose content (not its size: :mod:`.validation` checked that) does not decode."""

    def __init__(self, part: str, detail: str) -> None:
        super().__init__(f"parts.{part}: {detail}")
        self.part, self.detail = part, detail


def decode_tensor(entry: CheckedTensor, weight_bits: dict[str, np.ndarray]) -> torch.Tensor:
    """One tensor from its checked manifest entry (:func:`.validation.check_manifest`: every size
    below was held to the entry's shape there); a weight's bit patterns are also left in ``weight_bits``.
    """
    meta, parts, dtype, shape = entry.meta, entry.parts, entry.dtype, entry.shape
    encoding = meta["encoding"]
    if encoding == "bits":
        flags = np.unpackbits(np.frombuffer(parts["data"], np.uint8), count=entry.numel)
        return torch.from_numpy(flags.astype(bool)).reshape(shape)
    if encoding == "raw":
        data = np.frombuffer(parts["data"], np.uint8).copy()
        # torch cannot reinterpret an empty byte tensor as a wider dtype (its stride is 0)
        raw = torch.from_numpy(data).view(dtype).reshape(shape) if data.size else torch.empty(shape, dtype=dtype)
        if "kind" in meta:
            weight_bits[entry.name] = bit_view(raw)
        return raw
    bits = _decode_weight(entry)
    weight_bits[entry.name] = bits
    return torch.from_numpy(bits).view(dtype).reshape(shape)


def _decode_weight(entry: CheckedTensor) -> np.ndarray:
    """The weight's bit patterns (flattened) from one of the codebook / sparse encodings."""
    _, int_type = _BIT_VIEWS[torch.empty(0, dtype=entry.dtype).element_size()]
    little = np.dtype(int_type).newbyteorder("<")
    encoding, parts, numel = entry.meta["encoding"], entry.parts, entry.numel
    if encoding == "product_codebook":
        size, subvector_size = entry.meta["codebook_size"], entry.meta["subvector_size"]
        rows, blocks = product_blocks(entry.shape, subvector_size)
        codebook = np.frombuffer(parts["codebook"], little).reshape(blocks, size, subvector_size)
        # No code is past its block's codebook: the stream's alphabet was held to codebook_size.
        codes = _symbols(entry, "codes").reshape(rows, blocks)
        return codebook[np.arange(blocks)[None, :], codes].astype(int_type).reshape(-1)
    if encoding in ("sparse_codebook", "dense_codebook"):
        codebook = np.frombuffer(parts["codebook"], little)
        table = np.concatenate([np.zeros(1, int_type), codebook])  # code 0: zero (and the filler)
        # No code is past the table: the stream's alphabet was held to codebook_size + 1.
        codes = _symbols(entry, "codes")
        if encoding == "dense_codebook":
            return table[codes]
        gaps = _symbols(entry, "gaps")
        entry_values = table[codes]
    else:  # sparse_raw
        gaps = _symbols(entry, "gaps")
        entry_values = np.frombuffer(parts["values"], little)
    try:
        positions = absolute_positions(gaps, numel=numel)
    except ValueError as error:
        raise PartError("gaps", str(error)) from None
    bits = np.zeros(numel, dtype=int_type)
    # Fillers write their zero on a position that holds zero anyway, so they need no special case.
    bits[positions] = entry_values
    return bits


def _symbols(entry: CheckedTensor, part: str) -> np.ndarray:
    try:
        return huffman_decode(entry.streams[part])
    except ValueError as error:
        raise PartError(part, str(error)) from None
