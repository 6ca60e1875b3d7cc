"""The Huffman code itself: length-limited code lengths, and the canonical codes they define.

Codes are canonical: assigned in order of (length, symbol) from the table of code lengths, so that
the table alone defines the code and a stream needs to store nothing else. Code lengths are limited
to :data:`MAX_CODE_LENGTH` bits, which bounds the decode table at ``2**MAX_CODE_LENGTH`` entries.
:mod:`.huffman` writes and reads symbol streams with these codes.
"""

from __future__ import annotations

import heapq

import numpy as np

MAX_CODE_LENGTH = 20
"""Longest Huffman code, in bits: the decode table has ``2**MAX_CODE_LENGTH`` entries (5 MB at most)."""


def code_lengths(frequencies: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths (uint8) for symbol frequencies, limited to ``max_length`` bits.

    An optimal Huffman tree is built with a heap over the used symbols. If it is deeper than
    ``max_length`` (a very skewed distribution over many symbols), the frequencies are halved (a used
    symbol keeps at least 1) and the tree rebuilt until it fits: flatter frequencies give a shallower
    tree, and all-equal frequencies give depth ``ceil(log2(used))``. A single used symbol gets length
    1 (its stream then stores no bits).

    Example:
        >>> code_lengths(np.array([10, 0, 3, 1, 1])).tolist()
        [1, 0, 2, 3, 3]
    """
    frequencies = np.asarray(frequencies, dtype=np.int64)
    used = np.flatnonzero(frequencies)
    if used.size > 1 << max_length:
        raise ValueError(f"{used.size} symbols cannot all get codes of at most {max_length} bits")
    lengths = np.zeros(frequencies.size, dtype=np.uint8)
    if used.size == 1:
        lengths[used] = 1
    if used.size <= 1:
        return lengths
    weights = frequencies[used]
    while True:
        depth = _huffman_depths(weights)
        if depth.max() <= max_length:
            lengths[used] = depth
            return lengths
        weights = np.maximum(weights >> 1, 1)


def _huffman_depths(weights: np.ndarray) -> np.ndarray:
    """Leaf depths of a Huffman tree over ``weights`` (at least two), with deterministic tie-breaking."""
    n = weights.size
    heap = [(int(w), i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    parent = np.zeros(2 * n - 1, dtype=np.int64)
    for node in range(n, 2 * n - 1):
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
    # Parents are created after their children, so one pass from the root down sets every depth.
    depth = np.zeros(2 * n - 1, dtype=np.int64).tolist()
    parents = parent.tolist()
    for node in range(2 * n - 3, -1, -1):
        depth[node] = depth[parents[node]] + 1
    return np.asarray(depth[:n], dtype=np.uint8)


def _canonical_order(lengths: np.ndarray) -> np.ndarray:
    used = np.flatnonzero(lengths)
    return used[np.lexsort((used, lengths[used]))]  # by length, then by symbol


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Code of every symbol (uint32; 0 for unused ones), from the code-length table alone."""
    order = _canonical_order(lengths)
    max_length = int(lengths.max())
    # Left-aligned to max_length bits, canonical codes are the running sum of 2**(max_length - length).
    span = np.int64(1) << (max_length - lengths[order].astype(np.int64))
    left_aligned = np.cumsum(span) - span
    codes = np.zeros(lengths.size, dtype=np.uint32)
    codes[order] = left_aligned >> (max_length - lengths[order].astype(np.int64))
    return codes


def decode_table(lengths: np.ndarray, max_length: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Symbol and code length for every ``max_length``-bit prefix; length 0 marks an invalid prefix."""
    order = _canonical_order(lengths)
    span = np.int64(1) << (max_length - lengths[order].astype(np.int64))
    size = 1 << max_length
    table_symbol = np.zeros(size, dtype=dtype)
    table_length = np.zeros(size, dtype=np.uint8)
    filled = int(span.sum())
    table_symbol[:filled] = np.repeat(order.astype(dtype), span)
    table_length[:filled] = np.repeat(lengths[order], span)
    return table_symbol, table_length
