"""Canonical Huffman coding of integer symbol streams, vectorized in numpy, and its serialized form.

Deep Compression (Han et al. 2016) Huffman-codes the gap and code streams of a pruned, shared layer,
since their distributions are far from uniform. :func:`huffman_encode` / :func:`huffman_decode` code
a stream laid out in blocks that decode in lockstep, so that neither direction loops over symbols in
Python; :meth:`HuffmanStream.to_bytes` / :meth:`HuffmanStream.from_bytes` serialize a stream without
pickle. The codes come from :mod:`.huffman_codes`.

The Huffman bit layout
----------------------
Codes (canonical, see :mod:`.huffman_codes`) are written most significant bit first and concatenated
in symbol order; the bit string is packed into bytes most significant bit first (``np.packbits``
order), the last byte padded with zeros. The stream is cut into blocks of ``block_size`` symbols and
the bit offset of every block is kept, so that the decoder advances all blocks together: one Python
iteration per position within a block, each decoding one symbol of every block with numpy. A stream
whose table marks a single symbol stores no bits at all: it is that symbol repeated ``count`` times.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .huffman_codes import MAX_CODE_LENGTH, canonical_codes, code_lengths, decode_table

MAX_ALPHABET = 1 << MAX_CODE_LENGTH
"""Symbols must be below this, so that every used symbol can get a code within the length limit."""

MIN_BLOCK_SIZE = 256

# Symbols encoded per vectorized pass: bounds the temporaries of encoding a long stream.
_ENCODE_CHUNK = 1 << 20

# magic, version, bytes per stored block length (0: none stored), reserved, count, nbits, block size,
# alphabet (entries of the code-length table); all little-endian.
_STREAM_HEADER = struct.Struct("<4sBBHQQII")
_STREAM_MAGIC = b"LCHF"
_STREAM_VERSION = 1


@dataclass(frozen=True, eq=False)
class HuffmanStream:
    """A canonical-Huffman-coded symbol stream.

    Attributes:
        lengths: uint8 code length of each symbol ``0 .. len(lengths) - 1``; 0 = the symbol is unused.
        bits: the packed code bits (see the module docstring for the bit order).
        count: number of symbols.
        nbits: number of meaningful bits in ``bits``.
        block_size: symbols per independently decodable block.
        offsets: int64 bit offset of the first symbol of every block (``ceil(count / block_size)``).
    """

    lengths: np.ndarray
    bits: np.ndarray
    count: int
    nbits: int
    block_size: int
    offsets: np.ndarray

    @property
    def bits_per_symbol(self) -> float:
        """Average code length, the figure Huffman coding is judged by (0 for an empty stream)."""
        return self.nbits / self.count if self.count else 0.0

    @property
    def nbytes(self) -> int:
        """Size of :meth:`to_bytes`, without building it."""
        width = _block_length_width(self)
        return _STREAM_HEADER.size + self.lengths.size + width * max(self.offsets.size - 1, 0) + self.bits.size

    def to_bytes(self) -> bytes:
        """Serialize: a 32-byte header, the code-length table, the block lengths, the bits.

        Block lengths (the bit offset of every block but the first, as differences) are stored in the
        narrowest of 2, 4 or 8 little-endian bytes that holds them, which keeps the lockstep layout
        to about 1% of a stream's size. The width follows from the bound ``block_size * max length``,
        so that :func:`huffman_nbytes` predicts the size exactly.

        Example:
            >>> stream = huffman_encode(np.array([3, 3, 3, 1, 0]))
            >>> huffman_decode(HuffmanStream.from_bytes(stream.to_bytes())).tolist()
            [3, 3, 3, 1, 0]
        """
        width = _block_length_width(self)
        block_lengths = np.diff(self.offsets).astype(f"<u{width}") if width else np.empty(0, np.uint8)
        header = _STREAM_HEADER.pack(
            _STREAM_MAGIC, _STREAM_VERSION, width, 0, self.count, self.nbits, self.block_size, self.lengths.size
        )
        return b"".join((header, self.lengths.astype(np.uint8).tobytes(), block_lengths.tobytes(), self.bits.tobytes()))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, max_count: int | None = None) -> HuffmanStream:
        """Parse :meth:`to_bytes`; a ``ValueError`` if the bytes are not a whole, consistent stream.

        Every allocation is bounded by ``len(data)`` except one: a stream of a single symbol stores
        no bits, so its header's ``count`` (what :func:`huffman_decode` will allocate) is bounded by
        nothing in the bytes. Pass ``max_count`` when the bytes are not trusted: a larger count is
        refused before anything is allocated.
        """
        data = memoryview(data).cast("B")
        header = read_stream_header(data)
        if max_count is not None and header.count > max_count:
            raise ValueError(f"Huffman stream declares {header.count} symbols, more than the {max_count} expected")
        width, count, nbits, block_size, alphabet = header
        nblocks = header.nblocks
        stored_lengths = max(nblocks - 1, 0) if width else 0
        start = _STREAM_HEADER.size
        lengths = np.frombuffer(data, np.uint8, alphabet, start).copy()
        start += alphabet
        block_lengths = np.frombuffer(data, f"<u{width or 1}", stored_lengths, start).astype(np.int64)
        start += width * stored_lengths
        bits = np.frombuffer(data, np.uint8, -(-nbits // 8), start).copy()
        offsets = np.zeros(nblocks, dtype=np.int64)
        np.cumsum(block_lengths, out=offsets[1:])
        stream = cls(lengths, bits, count, nbits, block_size, offsets)
        _check_stream(stream)
        if width != _block_length_width(stream):  # the writer derives it: any other value is not ours
            raise ValueError(f"Huffman stream corrupted: block lengths stored in {width} bytes, "
                             f"the layout implies {_block_length_width(stream)}")
        return stream


class StreamHeader(NamedTuple):
    """The fixed-size fields of a serialized stream (:func:`read_stream_header`)."""

    width: int
    count: int
    nbits: int
    block_size: int
    alphabet: int

    @property
    def nblocks(self) -> int:
        return -(-self.count // self.block_size)


def read_stream_header(data: bytes | bytearray | memoryview) -> StreamHeader:
    """The header of a serialized stream, checked against the length of ``data``; allocates nothing.

    A reader that knows how many symbols to expect (the packed file does, from a tensor's shape)
    checks ``count`` here before :meth:`HuffmanStream.from_bytes` sizes anything from it.
    """
    data = memoryview(data).cast("B")
    if len(data) < _STREAM_HEADER.size:
        raise ValueError(f"Huffman stream truncated: {len(data)} bytes, shorter than its header")
    magic, version, width, _, count, nbits, block_size, alphabet = _STREAM_HEADER.unpack_from(data)
    if magic != _STREAM_MAGIC:
        raise ValueError("not a Huffman stream (bad magic bytes)")
    if version != _STREAM_VERSION:
        raise ValueError(f"Huffman stream version {version} is not supported (this reader: {_STREAM_VERSION})")
    if width not in (0, 2, 4, 8) or block_size < 1 or alphabet > MAX_ALPHABET:
        raise ValueError("Huffman stream header is corrupted")
    header = StreamHeader(width, count, nbits, block_size, alphabet)
    # Block offsets are stored whenever there are bits and several blocks; without them the decoder
    # would need a stored offset per block that the bytes do not hold.
    if width == 0 and nbits and header.nblocks > 1:
        raise ValueError("Huffman stream header is corrupted: several blocks of bits but no block lengths")
    stored_lengths = max(header.nblocks - 1, 0) if width else 0
    expected = _STREAM_HEADER.size + alphabet + width * stored_lengths + -(-nbits // 8)
    if len(data) != expected:
        raise ValueError(f"Huffman stream truncated or corrupted: {len(data)} bytes, header promises {expected}")
    return header


def default_block_size(count: int) -> int:
    """The block size :func:`huffman_encode` picks for ``count`` symbols: ``max(256, isqrt(count))``."""
    return max(MIN_BLOCK_SIZE, math.isqrt(count))


def huffman_encode(symbols: np.ndarray, block_size: int | None = None) -> HuffmanStream:
    """Canonical Huffman coding of non-negative integer symbols (below :data:`MAX_ALPHABET`).

    Every symbol's code and bit offset are computed at once; each code (at most 20 bits, starting at
    any bit of a byte) lies within a 32-bit window starting at its first byte, so it is scattered as
    at most four bytes, each added with ``np.bincount`` (codes never share a bit, so adding is OR).

    Args:
        symbols: any integer array; it is flattened.
        block_size: symbols per lockstep-decoded block. Default ``max(256, isqrt(count))``, which
            balances the decoder's Python iterations (one per symbol of a block) against the stored
            block offsets (one per block).

    Example:
        >>> stream = huffman_encode(np.array([0, 0, 0, 0, 0, 0, 1, 2]))
        >>> stream.lengths.tolist(), stream.nbits, stream.bits.tolist()
        ([1, 2, 2], 10, [2, 192])
        >>> huffman_decode(stream).tolist()
        [0, 0, 0, 0, 0, 0, 1, 2]
    """
    symbols = _as_symbols(symbols)
    count = symbols.size
    if block_size is None:
        block_size = default_block_size(count)
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive integer")
    nblocks = -(-count // block_size)
    if count == 0:
        return HuffmanStream(np.zeros(0, np.uint8), np.zeros(0, np.uint8), 0, 0, block_size, np.zeros(0, np.int64))
    lengths = code_lengths(np.bincount(symbols))
    if np.count_nonzero(lengths) == 1:
        return HuffmanStream(lengths, np.zeros(0, np.uint8), count, 0, block_size, np.zeros(nblocks, np.int64))

    codes = canonical_codes(lengths)
    symbol_lengths = lengths[symbols]
    nbits = int(symbol_lengths.sum(dtype=np.int64))
    out = np.zeros(-(-nbits // 8) + 4, dtype=np.uint8)  # 4 spare bytes: the last code's window
    window_bytes = (7 + int(lengths.max()) + 7) // 8
    offsets = np.empty(nblocks, dtype=np.int64)
    chunk = block_size * max(1, _ENCODE_CHUNK // block_size)  # whole blocks, so offsets align
    carry = 0
    for lo in range(0, count, chunk):
        length = symbol_lengths[lo : lo + chunk].astype(np.int64)
        ends = np.cumsum(length) + carry
        starts = ends - length
        carry = int(ends[-1])
        offsets[lo // block_size : lo // block_size + -(-length.size // block_size)] = starts[::block_size]
        # Left-align each code in a 32-bit window beginning at the byte of its first bit.
        window = codes[symbols[lo : lo + chunk]].astype(np.int64) << (32 - (starts & 7) - length)
        first_byte = starts >> 3
        base = int(first_byte[0])
        span = int(first_byte[-1]) - base + window_bytes
        local = first_byte - base
        for k in range(window_bytes):
            part = (window >> (24 - 8 * k)) & 0xFF
            out[base : base + span] += np.bincount(local + k, weights=part, minlength=span).astype(np.uint8)
    return HuffmanStream(lengths, out[: -(-nbits // 8)].copy(), count, nbits, block_size, offsets)


def huffman_decode(stream: HuffmanStream) -> np.ndarray:
    """Decode a :class:`HuffmanStream` to its symbols, in the narrowest of uint8/16/32.

    A table indexed by the next ``L`` bits (``L`` the longest code) gives the symbol and its code
    length. All blocks advance together: iteration ``j`` decodes the ``j``-th symbol of every block,
    so the Python loop runs ``block_size`` times whatever the stream's length. Each block must end
    exactly where the next begins, which catches corrupted bits or tables (``ValueError``).

    Example:
        >>> huffman_decode(huffman_encode(np.array([5, 5, 5]))).tolist()
        [5, 5, 5]
        >>> huffman_decode(huffman_encode(np.array([], dtype=np.int64))).tolist()
        []
    """
    _check_stream(stream)
    count, block_size = stream.count, stream.block_size
    alphabet = stream.lengths.size
    dtype = np.uint8 if alphabet <= 1 << 8 else np.uint16 if alphabet <= 1 << 16 else np.uint32
    if count == 0:
        return np.zeros(0, dtype=dtype)
    used = np.flatnonzero(stream.lengths)
    if used.size == 1:
        return np.full(count, used[0], dtype=dtype)

    max_length = int(stream.lengths.max())
    table_symbol, table_length = decode_table(stream.lengths, max_length, dtype)
    # A stream shorter than one block is one short block: a header's block size never sizes memory.
    steps = min(block_size, count)
    # Bytes past the end: a corrupted block may overrun by up to a block of codes before the check.
    padded = np.concatenate([stream.bits, np.zeros((steps * max_length) // 8 + 8, np.uint8)])
    # A big-endian 32-bit word starting at every byte: an unaligned view, one gather per iteration.
    words = np.ndarray(shape=(padded.size - 3,), dtype=">u4", buffer=padded, strides=(1,))

    nblocks = stream.offsets.size
    last_block = count - (nblocks - 1) * block_size
    out = np.empty((nblocks, steps), dtype=dtype)
    position = stream.offsets.copy()
    shift = np.int64(32 - max_length)
    mask = np.int64((1 << max_length) - 1)
    active = nblocks
    for j in range(steps):
        if j == last_block:
            active = nblocks - 1  # the last block is shorter; its row stops being read
        p = position[:active]
        peek = (words[p >> 3] >> (shift - (p & 7))) & mask
        out[:active, j] = table_symbol[peek]
        p += table_length[peek]

    expected = np.append(stream.offsets[1:], stream.nbits)
    if not np.array_equal(position, expected):
        raise ValueError("Huffman stream corrupted: the decoded blocks do not end where they should")
    return out.reshape(-1)[:count]


def huffman_nbytes(frequencies: np.ndarray, block_size: int | None = None) -> int:
    """Serialized size of the stream :func:`huffman_encode` would build from these frequencies.

    Computes the code lengths only, so choosing between two encodings costs no encoding.

    Example:
        >>> symbols = np.array([0] * 90 + [1] * 10)
        >>> huffman_nbytes(np.bincount(symbols)) == huffman_encode(symbols).nbytes
        True
    """
    frequencies = np.asarray(frequencies, dtype=np.int64)
    count = int(frequencies.sum())
    if block_size is None:
        block_size = default_block_size(count)
    lengths = code_lengths(frequencies)
    alphabet = int(np.flatnonzero(frequencies)[-1]) + 1 if count else 0
    if np.count_nonzero(lengths) <= 1:
        return _STREAM_HEADER.size + alphabet
    nbits = int((frequencies * lengths).sum())
    nblocks = -(-count // block_size)
    # Block lengths are bounded by block_size * max length; the stored width follows from that bound.
    width = _width_for(block_size * int(lengths.max()))
    return _STREAM_HEADER.size + alphabet + width * (nblocks - 1) + -(-nbits // 8)


def _as_symbols(symbols: np.ndarray) -> np.ndarray:
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.size == 0:
        return symbols.astype(np.int64)
    if not np.issubdtype(symbols.dtype, np.integer):
        raise ValueError(f"symbols must be integers, got dtype {symbols.dtype}")
    low, high = int(symbols.min()), int(symbols.max())
    if low < 0 or high >= MAX_ALPHABET:
        raise ValueError(f"symbols must be in [0, {MAX_ALPHABET}), got values in [{low}, {high}]")
    return symbols


def _width_for(value: int) -> int:
    return 2 if value < 1 << 16 else 4 if value < 1 << 32 else 8


def _block_length_width(stream: HuffmanStream) -> int:
    # From the bound on a block's bits rather than the actual lengths, so huffman_nbytes is exact.
    if stream.offsets.size <= 1 or stream.nbits == 0:
        return 0
    return _width_for(stream.block_size * int(stream.lengths.max()))


def _check_stream(stream: HuffmanStream) -> None:
    """Reject a table or layout that could not come from :func:`huffman_encode`."""
    lengths = stream.lengths
    used = np.count_nonzero(lengths)
    nblocks = -(-stream.count // stream.block_size)
    if stream.count and used == 0:
        raise ValueError("Huffman stream corrupted: symbols but no codes")
    if lengths.size and int(lengths.max()) > MAX_CODE_LENGTH:
        raise ValueError(f"Huffman stream corrupted: a code longer than {MAX_CODE_LENGTH} bits")
    if used > 1 and np.sum(np.ldexp(1.0, -lengths[lengths > 0].astype(np.int64))) > 1.0:
        raise ValueError("Huffman stream corrupted: the code lengths violate the Kraft inequality")
    if used > 1 and not stream.count <= stream.nbits <= stream.count * int(lengths.max()):
        # Every code is 1 to max-length bits: this bounds a stream's count by its size in bytes.
        raise ValueError(f"Huffman stream corrupted: {stream.nbits} bits cannot hold {stream.count} symbols")
    if stream.offsets.size != nblocks or stream.nbits > 8 * stream.bits.size:
        raise ValueError("Huffman stream corrupted: block offsets or bit count inconsistent")
    if nblocks and (stream.offsets[0] != 0 or np.any(np.diff(stream.offsets) < 0) or stream.offsets[-1] > stream.nbits):
        raise ValueError("Huffman stream corrupted: block offsets out of order")
