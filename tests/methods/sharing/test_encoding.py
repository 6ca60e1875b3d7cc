"""Relative sparse indices and canonical Huffman coding: exact round trips for any input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_compress.methods.sharing.huffman import HuffmanStream, huffman_decode, huffman_encode, huffman_nbytes
from lightning_compress.methods.sharing.huffman_codes import MAX_CODE_LENGTH, code_lengths
from lightning_compress.methods.sharing.relative_index import absolute_positions, relative_indices

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def symbol_streams(draw) -> np.ndarray:
    """Uniform, skewed (geometric), one repeated symbol, empty and single-symbol streams."""
    shape = draw(st.sampled_from(["uniform", "skewed", "repeated", "tiny"]))
    if shape == "tiny":
        return np.array(draw(st.lists(st.integers(0, 4095), max_size=2)), dtype=np.int64)
    size = draw(st.integers(0, 3000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    alphabet = draw(st.integers(1, 4096))
    if shape == "uniform":
        return rng.integers(0, alphabet, size)
    if shape == "skewed":
        return (rng.geometric(draw(st.floats(0.05, 0.95)), size) - 1).clip(max=alphabet - 1)
    return np.full(size, alphabet - 1)


@FAST
@given(symbols=symbol_streams(), block_size=st.one_of(st.none(), st.integers(1, 40)))
def test_huffman_round_trips_through_decode_and_bytes(symbols, block_size):
    stream = huffman_encode(symbols, block_size=block_size)
    np.testing.assert_array_equal(huffman_decode(stream), symbols)

    data = stream.to_bytes()
    assert len(data) == stream.nbytes
    np.testing.assert_array_equal(huffman_decode(HuffmanStream.from_bytes(data)), symbols)
    if block_size is None:
        frequencies = np.bincount(symbols) if symbols.size else np.zeros(0, np.int64)
        assert huffman_nbytes(frequencies) == len(data)


@FAST
@given(symbols=symbol_streams())
def test_huffman_is_within_one_bit_of_the_entropy(symbols):
    stream = huffman_encode(symbols)
    counts = np.bincount(symbols)[np.bincount(symbols) > 0] if symbols.size else np.zeros(0)
    if counts.size < 2:
        assert stream.nbits == 0  # zero or one distinct symbol: nothing to say beyond the count
        return
    p = counts / counts.sum()
    entropy = float(-(p * np.log2(p)).sum())
    assert entropy - 1e-9 <= stream.bits_per_symbol < entropy + 1


@FAST
@given(frequencies=st.lists(st.integers(0, 10**6), min_size=1, max_size=300), max_length=st.integers(9, 20))
def test_code_lengths_are_a_complete_prefix_code_within_the_limit(frequencies, max_length):
    lengths = code_lengths(np.array(frequencies), max_length=max_length)
    used = np.array(frequencies) > 0
    assert np.array_equal(lengths > 0, used)
    assert lengths.max() <= max_length
    if used.sum() > 1:  # Kraft equality: every bit string decodes
        assert np.sum(2.0 ** -lengths[used].astype(float)) == pytest.approx(1.0)


def test_length_limit_is_applied_to_fibonacci_frequencies():
    fibonacci = [1, 1]
    while len(fibonacci) < 24:
        fibonacci.append(fibonacci[-1] + fibonacci[-2])
    symbols = np.repeat(np.arange(24), fibonacci)  # an unlimited Huffman tree would be 23 deep
    stream = huffman_encode(symbols)
    assert stream.lengths.max() == MAX_CODE_LENGTH
    np.testing.assert_array_equal(huffman_decode(stream), symbols)


def test_skewed_stream_is_smaller_than_fixed_width():
    rng = np.random.default_rng(0)
    symbols = (rng.geometric(0.3, 200_000) - 1).clip(max=255)  # 8-bit fixed width
    stream = huffman_encode(symbols)
    assert len(stream.to_bytes()) < 0.45 * symbols.size  # about 3 bits per symbol instead of 8
    np.testing.assert_array_equal(huffman_decode(stream), symbols)


def test_bit_order_is_msb_first():
    stream = huffman_encode(np.array([1, 0, 0, 0]))  # codes: 0 -> "0", 1 -> "1"
    assert stream.bits.tolist() == [0b1000_0000] and stream.nbits == 4


def test_huffman_rejects_bad_input_and_bad_bytes():
    with pytest.raises(ValueError, match="symbols must be in"):
        huffman_encode(np.array([0, -1]))
    with pytest.raises(ValueError, match="integers"):
        huffman_encode(np.array([0.5]))
    data = huffman_encode(np.arange(1000) % 7, block_size=100).to_bytes()
    with pytest.raises(ValueError, match="truncated"):
        HuffmanStream.from_bytes(data[:-1])
    with pytest.raises(ValueError, match="truncated"):
        HuffmanStream.from_bytes(data[:10])
    with pytest.raises(ValueError, match="not a Huffman stream"):
        HuffmanStream.from_bytes(b"XXXX" + data[4:])
    corrupted = bytearray(data)
    corrupted[32] = 1  # symbol 0 gets a 1-bit code beside the others: the lengths break Kraft
    with pytest.raises(ValueError, match="Kraft"):
        HuffmanStream.from_bytes(bytes(corrupted))


@st.composite
def sparse_positions(draw) -> tuple[np.ndarray, int]:
    """Sorted distinct positions, with steps long enough to need several fillers."""
    steps = draw(st.lists(st.integers(1, 700), max_size=200))
    positions = np.cumsum(np.array(steps, dtype=np.int64)) - 1
    numel = int(positions[-1]) + 1 + draw(st.integers(0, 300)) if positions.size else draw(st.integers(0, 300))
    return positions, numel


@FAST
@given(case=sparse_positions(), index_bits=st.sampled_from([2, 3, 5, 8]), seed=st.integers(0, 2**16))
def test_relative_indices_round_trip_with_fillers(case, index_bits, seed):
    positions, numel = case
    gaps, is_filler = relative_indices(positions, numel, index_bits, return_fillers=True)
    max_gap = 2**index_bits - 1
    assert gaps.size == positions.size + is_filler.sum()
    assert (gaps <= max_gap).all() and (gaps[is_filler] == max_gap).all()
    steps = np.diff(positions, prepend=-1)
    assert is_filler.sum() == ((steps - 1) >> index_bits).sum()  # no more fillers than needed
    np.testing.assert_array_equal(relative_indices(positions, numel, index_bits), gaps)
    np.testing.assert_array_equal(absolute_positions(gaps, is_filler=is_filler, numel=numel), positions)

    # Paired with a code stream in which 0 marks the fillers, (gap, code) alone round-trips.
    codes = np.zeros(gaps.size, dtype=np.int64)
    codes[~is_filler] = np.random.default_rng(seed).integers(1, 33, positions.size)
    gap_stream, code_stream = (
        huffman_decode(HuffmanStream.from_bytes(huffman_encode(stream).to_bytes())) for stream in (gaps, codes)
    )
    decoded = absolute_positions(gap_stream, is_filler=code_stream == 0, numel=numel)
    np.testing.assert_array_equal(decoded, positions)
    np.testing.assert_array_equal(code_stream[code_stream != 0], codes[~is_filler])


def test_relative_indices_documented_example_and_errors():
    gaps, is_filler = relative_indices(np.array([0, 8, 9]), numel=10, index_bits=3, return_fillers=True)
    assert gaps.tolist() == [0, 7, 0] and not is_filler.any()  # a gap of 7 fits 3 bits: no filler
    gaps, is_filler = relative_indices(np.array([8]), numel=9, index_bits=3, return_fillers=True)
    assert gaps.tolist() == [7, 0] and is_filler.tolist() == [True, False]  # a gap of exactly 8 needs a filler
    with pytest.raises(ValueError, match="strictly increasing"):
        relative_indices(np.array([3, 3]), 10, 3)
    with pytest.raises(ValueError, match="numel"):
        relative_indices(np.array([10]), 10, 3)
    with pytest.raises(ValueError, match="index_bits"):
        relative_indices(np.array([1]), 10, 0)
    with pytest.raises(ValueError, match="beyond numel"):
        absolute_positions(np.array([5, 5]), numel=10)
