import pytest
import torch
from torch import nn

from lightning_compress.methods.decomposition import factorize
from lightning_compress.methods.decomposition.layers import Factorized, tucker_stages, Geometry


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.fixture
def conv():
    torch.manual_seed(0)
    return nn.Conv2d(12, 20, 3, stride=2, padding=2, dilation=2, bias=True).double()


def test_tucker_at_full_rank_reproduces_the_dense_output(conv):
    x = torch.randn(2, 12, 15, 15, dtype=torch.float64)
    layer = factorize.tucker2(conv, 20, 12, stages=(True, True))
    assert [n for n, _ in layer.named_children()] == ["reduce", "core", "expand"]
    assert layer.core.stride == (2, 2) and layer.core.dilation == (2, 2) and layer.core.padding == (2, 2)
    assert _rel(layer(x), conv(x)) < 1e-10
    assert layer.error < 1e-10


def test_tucker_full_rank_in_fp32_is_within_1e4():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, 3, padding=1)
    x = torch.randn(4, 32, 8, 8)
    layer = factorize.tucker2(conv, 48, 32, stages=(True, True))
    assert _rel(layer(x), conv(x)) < 1e-4


def test_tucker_error_is_measured_and_matches_the_output_of_a_linear_map(conv):
    layer = factorize.tucker2(conv, 8, 4)
    dense_again = nn.Conv2d(12, 20, 3, stride=2, padding=2, dilation=2, bias=False).double()
    with torch.no_grad():
        w = layer.core.weight
        if hasattr(layer, "reduce"):
            w = torch.einsum("oikl,in->onkl", w, layer.reduce.weight[:, :, 0, 0])
        if hasattr(layer, "expand"):
            w = torch.einsum("oikl,no->nikl", w, layer.expand.weight[:, :, 0, 0])
        dense_again.weight.copy_(w)
    assert layer.error == pytest.approx(_rel(dense_again.weight, conv.weight), rel=1e-9)


@pytest.mark.parametrize("sweeps", [1, 3])
def test_own_hooi_matches_tensorly_partial_tucker_sweep_for_sweep(sweeps):
    torch.manual_seed(0)
    conv = nn.Conv2d(48, 64, 3)
    ours = factorize.tucker2(conv, 16, 12, n_iter_max=sweeps, stages=(True, True))
    theirs = factorize.tucker2(conv, 16, 12, n_iter_max=sweeps, solver="tensorly", stages=(True, True))
    assert ours.error == pytest.approx(theirs.error, abs=1e-9)
    x = torch.randn(1, 48, 6, 6)
    assert torch.allclose(ours(x), theirs(x), atol=1e-4)  # same subspaces, so the same layer


def test_stages_that_do_not_pay_are_folded():
    g = Geometry.of(nn.Conv2d(3, 64, 3))
    assert tucker_stages(16, 3, g) == (False, True)  # no 1x1 over 3 input channels
    assert tucker_stages(64, 64, Geometry.of(nn.Conv2d(64, 64, 3))) == (False, False)
    assert tucker_stages(16, 16, Geometry.of(nn.Conv2d(64, 64, 3))) == (True, True)


def test_cp_recovers_an_exactly_low_rank_kernel_with_the_geometry():
    torch.manual_seed(0)
    rank = 5
    a, b, c, d = torch.randn(16, rank), torch.randn(8, rank), torch.randn(3, rank), torch.randn(3, rank)
    conv = nn.Conv2d(8, 16, 3, stride=(2, 1), padding=1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("or,ir,hr,wr->oihw", a, b, c, d))
    layer = factorize.cp(conv, rank, n_iter_max=200)
    assert [n for n, _ in layer.named_children()] == ["reduce", "vertical", "horizontal", "expand"]
    assert layer.vertical.groups == rank and layer.vertical.stride == (2, 1)
    x = torch.randn(2, 8, 9, 9)
    assert layer.error < 1e-3
    assert _rel(layer(x), conv(x)) < 1e-3


@pytest.mark.parametrize("layer", [nn.Linear(30, 20), nn.Conv2d(30, 20, 1, stride=2)])
def test_svd_at_full_rank_reproduces_linear_and_1x1_conv(layer):
    torch.manual_seed(0)
    x = torch.randn(3, 30) if isinstance(layer, nn.Linear) else torch.randn(3, 30, 6, 6)
    out = factorize.svd(layer, 20)
    assert isinstance(out, Factorized) and out.ranks == (20,)
    assert _rel(out(x), layer(x)) < 1e-5


def test_svd_error_is_the_energy_of_the_dropped_values():
    torch.manual_seed(0)
    layer = nn.Linear(40, 30)
    s = torch.linalg.svdvals(layer.weight.detach().double())
    out = factorize.svd(layer, 10)
    assert out.error == pytest.approx(float((s[10:] ** 2).sum().sqrt() / (s**2).sum().sqrt()), rel=1e-6)


def test_pruning_mask_is_applied_before_factorizing():
    from lightning_compress.methods.pruning import masks

    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    masks.add_mask(layer)
    layer.weight_mask[:, :8] = False
    out = factorize.svd(layer, 8)
    assert out.reduce.weight[:, :8].abs().max() < 1e-6
