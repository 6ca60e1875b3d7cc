"""What a packed file may declare, checked before anything is decoded or allocated.

The SHA-256 sums of :mod:`.container` prove that the bytes are the ones written, not that they were
written by this library: anyone can recompute them. So :func:`check_manifest` holds every field of
the manifest and every Huffman stream header to what :mod:`.tensor_codecs` writes, and to the file's
size, before anything is sized from them:

* names are unique strings; dtypes, encodings, layer kinds and part names come from the known sets;
* shapes are lists of at most 64 non-negative integers, and all tensors together decode to at most
  :func:`decoded_budget` bytes;
* every part lies inside the payload; a raw tensor, a bit mask, a codebook or a block of raw values
  has exactly the bytes its shape, dtype and ``codebook_size`` imply;
* a Huffman stream has the symbol count its tensor implies (one code per weight, or as many codes or
  raw values as gaps, at most one gap per position), an alphabet no larger than its codebook (codes)
  or its ``index_bits`` (gaps) allow, valid code lengths (Kraft inequality, at most 20 bits) and the
  writer's block size (which bounds the decoder's Python loop at about ``sqrt(count)`` steps);
* a ``nonzero_of`` mask names a weight of its own size;
* a ``product_codebook`` weight has at least two dimensions, a ``subvector_size`` that divides its
  rows (``prod(shape[1:])``), a codebook of exactly ``blocks x codebook_size x subvector_size``
  values and one code per sub-vector, each below ``codebook_size``.

What only decoding can tell (a stream's bits, where its gaps lead) is checked as it is decoded, within
those bounds: a stream must end exactly where its header says, and gaps that would place a value
past the tensor's end are refused before anything is written. A violation is a ``ValueError`` that
names the file, the tensor and the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import torch

from .huffman import HuffmanStream, default_block_size, read_stream_header
from .tensor_codecs import DTYPES, MAX_CODEBOOK, product_blocks

FORMAT_NAME = "lightning_compress.packed"

PARTS = MappingProxyType({
    "raw": ("data",), "bits": ("data",), "nonzero_of": (), "dense_codebook": ("codes", "codebook"),
    "sparse_codebook": ("gaps", "codes", "codebook"), "sparse_raw": ("gaps", "values"),
    "product_codebook": ("codes", "codebook"),
})
"""The parts each encoding stores, in the order the writer lays them out."""

WEIGHT_ENCODINGS = ("dense_codebook", "sparse_codebook", "sparse_raw", "product_codebook")
KINDS = ("conv", "linear")
MAX_NDIM = 64  # numpy's limit; no layer comes near it

MIN_BUDGET = 64 << 20
EXPANSION = 4096
MAX_BUDGET = 1 << 40

_ITEMSIZE = {name: torch.empty(0, dtype=dtype).element_size() for name, dtype in DTYPES.items()}


def decoded_budget(file_bytes: int) -> int:
    """Most bytes the tensors of a ``file_bytes``-byte file may decode to: 4096 times the file, at
    least 64 MiB, at most 1 TiB.

    Why: a stream of one repeated symbol stores no bits, so a tensor's declared size is the only
    thing that bounds what a hostile file makes the loader allocate. Real files stay far below
    4096x: Huffman codes cost at least one bit per coded symbol, a dense code stream has one per
    weight (32x an fp32 weight) and a sparse one at least one gap per ``2**index_bits`` positions
    (Deep Compression's whole models are 35-49x). The exception is a tensor of one repeated value
    (an all-zero layer costs 33 bytes whatever its size): the 64 MiB floor lets small files hold
    such layers, and ``load_compressed(..., max_decoded_bytes=...)`` lets a larger one through. The
    cap keeps every count far from int64 overflow. Decoding needs, beyond the decoded bytes, about
    12 bytes per element of the largest sparse layer (its int64 positions, its symbols): 5 times the
    decoded size of an fp32 layer at worst, 13 times that of a float8 one.

    Example:
        >>> decoded_budget(1_000) == 64 << 20, decoded_budget(1 << 20) == 4 << 30
        (True, True)
    """
    return min(MAX_BUDGET, max(MIN_BUDGET, EXPANSION * file_bytes))


@dataclass
class CheckedTensor:
    """A manifest entry that passed :func:`check_manifest`, with its parts and parsed streams."""

    path: Path
    meta: Mapping[str, Any]
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    parts: dict[str, memoryview] = field(default_factory=dict)
    streams: dict[str, HuffmanStream] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _ITEMSIZE[self.meta["dtype"]]

    def fail(self, field_name: str, detail: str) -> NoReturn:
        raise invalid(self.path, self.name, field_name, detail)


def invalid(path: Path, tensor: str | None, field_name: str, detail: str) -> ValueError:
    """The error for a field that breaks the format: the file, the tensor (None: the manifest's own
    fields), the field, and what is wrong with it."""
    where = f"tensor {_short(tensor)}, field {field_name!r}" if tensor is not None else f"field {field_name!r}"
    return ValueError(f"{path}: invalid packed file: {where}: {detail}")


def check_manifest(path: Path, manifest: Any, payload: memoryview, budget: int) -> list[CheckedTensor]:
    """Every entry of the manifest checked against the format and the payload (module docstring)."""
    if not isinstance(manifest, dict):
        raise invalid(path, None, "manifest", f"a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT_NAME:
        raise invalid(path, None, "format", f"{_short(manifest.get('format'))}, expected {FORMAT_NAME!r}")
    tensors = manifest.get("tensors")
    if not isinstance(tensors, list):
        raise invalid(path, None, "tensors", f"a JSON {type(tensors).__name__}, not a list")
    checked: dict[str, CheckedTensor] = {}
    decoded = 0
    for index, meta in enumerate(tensors):
        entry = _check_fields(path, index, meta, checked)
        # Before its streams are parsed: a stream's count is held to numel, so numel is bounded first.
        decoded += entry.nbytes
        if decoded > budget:
            entry.fail("shape", f"{_short(list(entry.shape))} decodes to {entry.nbytes:,} bytes, which takes the "
                                f"file's tensors to {decoded:,}, past the {budget:,} allowed (see decoded_budget; "
                                f"pass max_decoded_bytes to load_compressed to allow more)")
        _check_parts(entry, payload)
        checked[entry.name] = entry
    for entry in checked.values():
        if entry.meta["encoding"] == "nonzero_of":
            _check_source(entry, checked)
    return list(checked.values())


def _check_fields(path: Path, index: int, meta: Any, seen: Mapping[str, CheckedTensor]) -> CheckedTensor:
    """Name, dtype, encoding, layer kind and shape of one entry."""
    if not isinstance(meta, dict):
        raise invalid(path, None, f"tensors[{index}]", f"a JSON {type(meta).__name__}, not an object")
    name = meta.get("name")
    if not isinstance(name, str):
        raise invalid(path, None, f"tensors[{index}].name", f"{_short(name)} is not a string")
    if name in seen:
        raise invalid(path, name, "name", "appears twice")
    entry = CheckedTensor(path, meta, name, torch.uint8, ())
    dtype_name, encoding, kind = meta.get("dtype"), meta.get("encoding"), meta.get("kind")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        entry.fail("dtype", f"{_short(dtype_name)} is not one of {', '.join(DTYPES)}")
    if not isinstance(encoding, str) or encoding not in PARTS:
        entry.fail("encoding", f"{_short(encoding)} is not one of {', '.join(PARTS)}")
    entry.dtype = dtype = DTYPES[dtype_name]
    if kind is not None and kind not in KINDS:
        entry.fail("kind", f"{_short(kind)} is not one of {', '.join(KINDS)}")
    if encoding in WEIGHT_ENCODINGS and kind is None:
        entry.fail("kind", f"missing: a {encoding} tensor is a Conv / Linear weight")
    if (kind is not None or encoding in WEIGHT_ENCODINGS) and not dtype.is_floating_point:
        entry.fail("dtype", f"{dtype_name} for a weight; only floating-point weights are encoded as weights")
    if encoding in ("bits", "nonzero_of") and dtype != torch.bool:
        entry.fail("dtype", f"{dtype_name} for a {encoding} tensor, which is bool")
    if encoding == "raw" and dtype == torch.bool:
        # Raw bytes other than 0 and 1 would make a bool tensor that holds neither True nor False.
        entry.fail("dtype", "bool for a raw tensor; bool tensors are stored as bits")
    shape = meta.get("shape")
    # A dimension beyond the cap can only be multiplied by a zero: refused, so that torch never sees
    # a size it cannot index.
    most = MAX_BUDGET // _ITEMSIZE[dtype_name]
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(_is_int(size) and 0 <= size <= most for size in shape)):
        entry.fail("shape", f"{_short(shape)} is not a list of at most {MAX_NDIM} integers in [0, {most}]")
    entry.shape = tuple(shape)
    return entry


def _check_parts(entry: CheckedTensor, payload: memoryview) -> None:
    """Each part inside the payload and of the size the encoding implies; the Huffman streams parsed."""
    meta, encoding, numel = entry.meta, entry.meta["encoding"], entry.numel
    parts = meta.get("parts")
    if not isinstance(parts, dict) or set(parts) != set(PARTS[encoding]):
        found = sorted(parts) if isinstance(parts, dict) else parts
        entry.fail("parts", f"{_short(found)}; a {encoding} tensor has the parts {list(PARTS[encoding])}")
    for part, span in parts.items():
        if not (isinstance(span, list) and len(span) == 2 and all(_is_int(v) and v >= 0 for v in span)):
            entry.fail(f"parts.{part}", f"{_short(span)} is not [offset, length] with non-negative integers")
        offset, length = span
        if offset + length > len(payload):
            entry.fail(f"parts.{part}", f"bytes [{offset:,}, {offset + length:,}) lie beyond the "
                                        f"{len(payload):,}-byte payload")
        entry.parts[part] = payload[offset : offset + length]
    itemsize = _ITEMSIZE[meta["dtype"]]
    if encoding == "raw":
        _expect_bytes(entry, "data", entry.nbytes, f"{numel:,} x {itemsize}-byte {meta['dtype']}")
    elif encoding == "bits":
        _expect_bytes(entry, "data", -(-numel // 8), f"{numel:,} flags, 8 a byte,")
    elif encoding == "nonzero_of":
        if not isinstance(meta.get("source"), str):
            entry.fail("source", f"{_short(meta.get('source'))} is not a tensor name")
    else:
        _check_weight(entry, itemsize)


def _check_weight(entry: CheckedTensor, itemsize: int) -> None:
    """The Huffman streams, codebook and raw values of the weight encodings."""
    meta, numel = entry.meta, entry.numel
    if meta["encoding"] == "product_codebook":
        _check_product(entry, itemsize)
        return
    codes_alphabet = 0
    if "codebook" in entry.parts:
        size = meta.get("codebook_size")
        if not (_is_int(size) and 0 <= size <= MAX_CODEBOOK):
            entry.fail("codebook_size", f"{_short(size)} is not an integer in [0, {MAX_CODEBOOK}]")
        _expect_bytes(entry, "codebook", size * itemsize, f"{size} values of {itemsize} bytes")
        codes_alphabet = size + 1  # code 0 is the zero / filler, code i + 1 the codebook's value i
    entries = numel
    if "gaps" in entry.parts:
        bits = meta.get("index_bits")
        if not (_is_int(bits) and 1 <= bits <= 16):
            entry.fail("index_bits", f"{_short(bits)} is not an integer in [1, 16]")
        # Each entry, filler or not, stands on its own position: at most one per position.
        entry.streams["gaps"] = _stream(entry, "gaps", 1 << bits, f"index_bits={bits}", max_count=numel)
        entries = entry.streams["gaps"].count
    if "codes" in entry.parts:
        what = f"codebook_size={codes_alphabet - 1} (plus the zero code)"
        entry.streams["codes"] = _stream(entry, "codes", codes_alphabet, what, count=entries)
    if "values" in entry.parts:
        _expect_bytes(entry, "values", entries * itemsize, f"{entries} entries of {itemsize} bytes")


def _check_product(entry: CheckedTensor, itemsize: int) -> None:
    """Sub-vector length, codebooks and codes of a product-quantized weight."""
    meta, shape = entry.meta, entry.shape
    if len(shape) < 2:
        entry.fail("shape", f"{_short(list(shape))} for a product_codebook weight, which has rows: at least 2 dimensions")
    length = math.prod(shape[1:])
    subvector_size, size = meta.get("subvector_size"), meta.get("codebook_size")
    if not (_is_int(subvector_size) and 1 <= subvector_size <= max(length, 1) and length % subvector_size == 0):
        entry.fail("subvector_size", f"{_short(subvector_size)} is not an integer in [1, {max(length, 1):,}] that "
                                     f"divides the {length:,} entries of a row")
    rows, blocks = product_blocks(shape, subvector_size)
    least = 1 if rows * blocks else 0  # a code needs a codebook entry to name
    if not (_is_int(size) and least <= size <= MAX_CODEBOOK):
        entry.fail("codebook_size", f"{_short(size)} is not an integer in [{least}, {MAX_CODEBOOK}]")
    _expect_bytes(entry, "codebook", blocks * size * subvector_size * itemsize,
                  f"{blocks:,} sub-spaces x {size} centroids x {subvector_size} values of {itemsize} bytes")
    entry.streams["codes"] = _stream(entry, "codes", size, f"codebook_size={size}", count=rows * blocks)


def _stream(
    entry: CheckedTensor, part: str, alphabet: int, why: str, count: int | None = None,
    max_count: int | None = None,
) -> HuffmanStream:
    data, field_name = entry.parts[part], f"parts.{part}"
    try:
        header = read_stream_header(data)
    except ValueError as error:
        entry.fail(field_name, str(error))
    if count is not None and header.count != count:
        if entry.meta["encoding"] == "dense_codebook":
            implied = f"the shape {_short(list(entry.shape))} implies {count:,} (one code per weight)"
        elif entry.meta["encoding"] == "product_codebook":
            implied = (f"the shape {_short(list(entry.shape))} and subvector_size={entry.meta['subvector_size']} "
                       f"imply {count:,} (one code per sub-vector)")
        else:
            implied = f"the gaps hold {count:,} entries (one code each)"
        entry.fail(field_name, f"a stream of {header.count:,} symbols; {implied}")
    if max_count is not None and header.count > max_count:
        entry.fail(field_name, f"a stream of {header.count:,} entries for a tensor of {max_count:,} positions")
    if header.alphabet > alphabet:
        entry.fail(field_name, f"an alphabet of {header.alphabet:,} symbols; {why} allows {alphabet:,}")
    if header.block_size != default_block_size(header.count):
        # The decoder loops once per symbol of a block: the writer's size keeps that near sqrt(count).
        entry.fail(field_name, f"blocks of {header.block_size:,} symbols; the writer uses "
                               f"{default_block_size(header.count):,} for {header.count:,} symbols")
    try:
        # Checks the code lengths (Kraft inequality, at most 20 bits) and the block offsets.
        return HuffmanStream.from_bytes(data, max_count=header.count)
    except ValueError as error:
        entry.fail(field_name, str(error))


def _check_source(entry: CheckedTensor, checked: Mapping[str, CheckedTensor]) -> None:
    source = checked.get(entry.meta["source"])
    holds_bits = source is not None and (
        source.meta["encoding"] in WEIGHT_ENCODINGS or (source.meta["encoding"] == "raw" and "kind" in source.meta)
    )
    if not holds_bits:
        entry.fail("source", f"{_short(entry.meta['source'])} is not a weight of this file")
    if source.numel != entry.numel:
        entry.fail("source", f"{_short(source.name)} has {source.numel:,} values, the mask's shape "
                             f"{_short(list(entry.shape))} has {entry.numel:,}")


def _expect_bytes(entry: CheckedTensor, part: str, expected: int, what: str) -> None:
    if len(entry.parts[part]) != expected:
        entry.fail(f"parts.{part}", f"{len(entry.parts[part]):,} bytes; {what} need {expected:,}")


def _is_int(value: Any) -> bool:
    return type(value) is int  # JSON true/false parse as bool, a subclass of int


def _short(value: Any) -> str:
    """``repr`` cut to 80 characters: a hostile name or shape must not flood the message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
