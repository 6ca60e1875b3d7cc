import math

import pytest
import torch

from lightning_compress.methods.decomposition.ranks import (
    RankRule,
    energy_rank,
    parse_rank,
    round_rank,
    select_rank,
    spectrum,
    svt_rank,
    vbmf_rank,
)


@pytest.mark.parametrize(
    "value, rule",
    [(4, RankRule("int", 4)), (0.25, RankRule("fraction", 0.25)), (1.0, RankRule("fraction", 1.0)),
     ("energy:0.9", RankRule("energy", 0.9)), ("vbmf", RankRule("vbmf")), ("svt", RankRule("svt")),
     ("SVT:0.1", RankRule("svt", 0.1))],
)
def test_parse_rank_accepts_the_documented_forms(value, rule):
    assert parse_rank(value) == rule


@pytest.mark.parametrize("value", [0, -3, 0.0, 1.5, "energy:0", "energy:1.2", "energy:x", "svt:1", "tucker", True, None])
def test_parse_rank_rejects_with_argument_and_value(value):
    with pytest.raises(ValueError, match=r"rank=") as info:
        parse_rank(value)
    assert repr(value) in str(info.value)


def _low_rank_plus_noise(rows, cols, rank, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(rows, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, cols, generator=g, dtype=torch.float64)
    return signal + noise * torch.randn(rows, cols, generator=g, dtype=torch.float64)


def test_spectrum_matches_svd():
    m = torch.randn(20, 50, dtype=torch.float64)
    assert torch.allclose(spectrum(m), torch.linalg.svdvals(m), atol=1e-9)
    assert torch.allclose(spectrum(m.T), torch.linalg.svdvals(m), atol=1e-9)


def test_energy_rank_is_the_smallest_rank_keeping_the_norm_fraction():
    values = torch.tensor([4.0, 3.0])  # energies 16 and 9 of 25: rank 1 keeps sqrt(0.64) = 0.8
    assert energy_rank(values, 0.8) == 1
    assert energy_rank(values, 0.81) == 2
    assert energy_rank(values, 1.0) == 2
    assert energy_rank(torch.tensor([5.0, 0.0, 0.0]), 1.0) == 1  # the numerical rank, not the size


@pytest.mark.parametrize("shape", [(60, 200), (200, 60)])
def test_vbmf_and_svt_recover_the_rank_of_a_noisy_low_rank_matrix(shape):
    m = _low_rank_plus_noise(*shape, rank=6, noise=0.3)
    s = spectrum(m)
    assert vbmf_rank(s, shape) == 6
    assert svt_rank(s, shape) == 6
    assert select_rank(RankRule("vbmf"), s, shape) == 6


def test_vbmf_of_pure_noise_keeps_almost_nothing():
    m = torch.randn(80, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert vbmf_rank(spectrum(m), (80, 300)) <= 1


def test_relative_svt_and_fraction():
    s = torch.tensor([10.0, 5.0, 1.0, 0.5])
    assert svt_rank(s, (4, 4), 0.1) == 3
    assert select_rank(RankRule("fraction", 0.5), s, (4, 4)) == 2
    assert select_rank(RankRule("fraction", 0.3), s, (4, 4)) == math.ceil(1.2)


def test_round_rank_rounds_up_to_the_multiple_within_the_mode():
    assert round_rank(13, 64, 8) == 16
    assert round_rank(61, 64, 8) == 64
    assert round_rank(3, 3, 8) == 3
    assert round_rank(5, 64, 1) == 5
