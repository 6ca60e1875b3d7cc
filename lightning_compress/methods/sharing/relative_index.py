"""Relative sparse indices: Deep Compression's CSR-like position stream, with filler entries.

Deep Compression (Han et al. 2016) stores a pruned layer's non-zeros as a stream of gaps, each the
distance from the previous non-zero, so that a small fixed width of ``index_bits`` bits holds it;
:func:`relative_indices` builds that stream and :func:`absolute_positions` reverses it, both in
vectorized numpy, independent of PyTorch. The gaps are then Huffman-coded (:mod:`.huffman`).

The filler convention
---------------------
Every entry of the index stream occupies one position of the flattened weight; its gap ``g`` is the
number of positions skipped since the previous entry (the first entry counts from position -1, so a
non-zero at position 0 has gap 0): ``position = previous + g + 1``. A gap must fit in ``b`` bits,
``g <= M = 2**b - 1``. A non-zero that is ``s > M`` positions after the previous one is preceded by
``s >> b`` *filler* entries, each with gap ``M`` (so each advances by ``2**b`` positions) and then
written with gap ``s & M``. A filler stands on a position that holds zero, exactly as Deep
Compression's "filler zero": it is written like any entry, with a value of zero. The gap stream alone
does not say which entries are fillers (a real non-zero may have gap ``M`` too); the value stream
does: the code of a filler is the reserved symbol ``0``, whose value is zero, and real codebook
indices are stored as ``index + 1``. ``relative_indices(..., return_fillers=True)`` returns the
filler flags to build that code stream; ``absolute_positions(gaps, is_filler=codes == 0)`` reverses it.
"""

from __future__ import annotations

import numpy as np


def relative_indices(
    positions: np.ndarray, numel: int, index_bits: int, *, return_fillers: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Gaps between successive non-zeros, each fitting in ``index_bits`` bits, fillers included.

    Args:
        positions: strictly increasing positions of the non-zeros in the flattened tensor.
        numel: the tensor's size; every position must be below it.
        index_bits: bits per stored gap (Deep Compression: 8 for convolutions, 5 for linear layers).
        return_fillers: also return a bool array flagging the filler entries.

    Returns:
        ``gaps`` (uint8, or uint16 above 8 bits), one per entry, and with ``return_fillers`` the
        filler flags: ``len(gaps) == len(positions) + flags.sum()``. See the module docstring for the
        convention.

    Example:
        >>> gaps, filler = relative_indices(np.array([1, 3, 20]), numel=24, index_bits=3, return_fillers=True)
        >>> gaps.tolist(), filler.tolist()
        ([1, 1, 7, 7, 0], [False, False, True, True, False])
        >>> absolute_positions(gaps, is_filler=filler).tolist()
        [1, 3, 20]
    """
    if not isinstance(index_bits, (int, np.integer)) or not 1 <= index_bits <= 16:
        raise ValueError(f"index_bits={index_bits!r} must be an integer in [1, 16]")
    positions = np.asarray(positions)
    if positions.ndim != 1 or (positions.size and not np.issubdtype(positions.dtype, np.integer)):
        raise ValueError(f"positions must be a 1-D integer array, got shape {positions.shape} {positions.dtype}")
    positions = positions.astype(np.int64, copy=False)
    steps = np.diff(positions, prepend=np.int64(-1))
    if positions.size and (steps.min() < 1 or positions[-1] >= numel):
        raise ValueError(f"positions must be strictly increasing and within [0, numel={numel})")

    skipped = steps - 1
    fillers = skipped >> index_bits
    # Entry i of the output: fillers[i] fillers with gap M, then the non-zero with gap skipped & M.
    real_at = np.cumsum(fillers + 1) - 1
    total = int(real_at[-1]) + 1 if positions.size else 0
    max_gap = (1 << index_bits) - 1
    gaps = np.full(total, max_gap, dtype=np.uint8 if index_bits <= 8 else np.uint16)
    gaps[real_at] = skipped & max_gap
    if not return_fillers:
        return gaps
    is_filler = np.ones(total, dtype=bool)
    is_filler[real_at] = False
    return gaps, is_filler


def absolute_positions(
    gaps: np.ndarray, is_filler: np.ndarray | None = None, *, numel: int | None = None
) -> np.ndarray:
    """Inverse of :func:`relative_indices`: the position of every entry, or of the non-fillers only.

    Args:
        gaps: the gap stream (any non-negative integers; fillers need no special value here).
        is_filler: flags of the filler entries (with a code stream, ``codes == 0``); their positions
            are dropped. None: the positions of every entry, fillers included.
        numel: when given, a ``ValueError`` if an entry falls at or beyond it.

    Example:
        >>> absolute_positions(np.array([0, 2, 7, 1], dtype=np.uint8)).tolist()
        [0, 3, 11, 13]
    """
    # In place: one int64 per entry at the peak (the loader's largest temporary for a sparse layer).
    positions = np.asarray(gaps).astype(np.int64).reshape(-1)
    positions += 1  # an entry advances its gap plus its own position
    np.cumsum(positions, out=positions)
    positions -= 1
    if numel is not None and positions.size and positions[-1] >= numel:
        raise ValueError(f"the gap stream reaches position {int(positions[-1])}, beyond numel={numel}")
    if is_filler is not None:
        is_filler = np.asarray(is_filler, dtype=bool)
        if is_filler.shape != positions.shape:
            raise ValueError(f"is_filler has {is_filler.size} flags for {positions.size} gaps")
        positions = positions[~is_filler]
    return positions
