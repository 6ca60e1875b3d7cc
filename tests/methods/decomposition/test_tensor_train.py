import math

import pytest
import torch
from torch import nn

from lightning_compress import compression_report
from lightning_compress.methods.decomposition import Factorized, Geometry, apply_plan, plan_decomposition, restore_factorized
from lightning_compress.methods.decomposition.allocation import estimated_error, layer_spectra
from lightning_compress.methods.decomposition.tensor_train import (TTCore, clamp_tt_ranks, tensor_train, tt_bounds,
                                                                   tt_full_ranks, tt_macs, tt_modes, tt_params)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 10))


def test_modes_are_balanced_factors():
    assert tt_modes(64) == (4, 4, 4) and tt_modes(10) == (5, 2, 1) and tt_modes(7) == (7, 1, 1)
    assert tt_modes(120) == (6, 5, 4) and math.prod(tt_modes(4096)) == 4096


def test_full_rank_conv_reproduces_the_layer_with_its_geometry():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 20, 3, stride=2, padding=2, dilation=2).double()
    layer = tensor_train(conv, tt_full_ranks(Geometry.of(conv)))
    assert [n for n, _ in layer.named_children()] == ["core0", "core1", "core2", "core3"]
    assert layer.ranks == (12, 36, 20)
    assert layer.core1.kernel_size == (3, 1) and layer.core1.stride == (2, 1) and layer.core1.dilation == (2, 1)
    assert layer.core2.kernel_size == (1, 3) and layer.core2.padding == (0, 2)
    x = torch.randn(2, 12, 15, 15, dtype=torch.float64)
    assert _rel(layer(x), conv(x)) < 1e-10 and layer.error < 1e-10


def test_full_rank_in_fp32_is_within_1e5():
    torch.manual_seed(0)
    conv, linear = nn.Conv2d(16, 24, 3, padding=1), nn.Linear(64, 48)
    x, v = torch.randn(2, 16, 8, 8), torch.randn(5, 64)
    assert _rel(tensor_train(conv, tt_full_ranks(Geometry.of(conv)))(x), conv(x)) < 1e-5
    assert _rel(tensor_train(linear, tt_full_ranks(Geometry.of(linear)))(v), linear(v)) < 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_tt_matrix_runs_core_by_core_on_any_leading_dims(bias):
    torch.manual_seed(0)
    linear = nn.Linear(120, 84, bias=bias).double()
    layer = tensor_train(linear, tt_full_ranks(Geometry.of(linear)))
    assert all(isinstance(stage, TTCore) for stage in layer)
    # modes (7, 4, 3) x (6, 5, 4), full ranks (42, 12)
    assert [tuple(s.weight.shape) for s in layer] == [(7 * 42, 6), (4 * 12, 42 * 5), (3, 12 * 4)]
    x = torch.randn(3, 7, 120, dtype=torch.float64)
    assert _rel(layer(x), linear(x)) < 1e-10
    assert (layer.core2.bias is not None) == bias and layer.core0.bias is None


def test_truncated_error_is_measured_within_the_tt_svd_bound_and_params_counted():
    torch.manual_seed(0)
    for layer in (nn.Conv2d(16, 32, 3), nn.Linear(64, 48)):
        g = Geometry.of(layer)
        ranks = clamp_tt_ranks(g, (4, 8, 4)[: len(tt_bounds(g))])
        tt = tensor_train(layer, ranks)
        bound = estimated_error("tt", g, layer_spectra("tt", layer), tt.ranks)
        assert 0 < tt.error <= bound + 1e-9
        assert tt.params == tt_params(g, tt.ranks) == sum(p.numel() for p in tt.parameters()) < g.params


def test_ranks_are_clamped_to_what_the_cores_can_use():
    g = Geometry.of(nn.Conv2d(1, 16, 3))
    assert tt_bounds(g) == [1, 3, 9] and tt_full_ranks(g) == (1, 3, 9)
    assert clamp_tt_ranks(g, (8, 8, 8)) == (1, 3, 8)


def test_rank_rules_pick_each_tt_rank_from_its_unfolding():
    model = _net()
    names = ["0", "2", "6", "8"]
    full = plan_decomposition(model, names, "tt", 1.0, rank_multiple=1)
    assert full[1].method == "skip" and "save no parameters" in full[1].note  # full ranks cost more than dense
    half = {d.name: d for d in plan_decomposition(model, names, "tt", 0.5, rank_multiple=1)}
    assert half["2"].ranks == (8, 24, 12) and half["2"].params_after < half["2"].params_before
    energy = {d.name: d for d in plan_decomposition(model, names, "tt", "energy:0.6", rank_multiple=1)}
    # Each unfolding keeps 0.6 of its norm: the TT-SVD bound is sqrt(3 * (1 - 0.6^2)) for three ranks.
    assert energy["2"].method == "tt" and energy["2"].estimated_error <= math.sqrt(3 * (1 - 0.36)) + 1e-9
    with pytest.warns(UserWarning, match="clamped"):
        plan_decomposition(model, ["2"], "tt", 100)


def test_target_compression_budget_with_tt():
    model = _net()
    dense = sum(p.numel() for p in model.parameters())
    plan = plan_decomposition(model, ["0", "2", "6", "8"], "tt", target_compression=1.5, rank_multiple=2)
    apply_plan(model, plan)
    assert sum(p.numel() for p in model.parameters()) <= dense / 1.5
    assert any(isinstance(m, Factorized) for m in model.modules())


def test_restore_from_shapes_then_load_gives_the_same_outputs():
    model = _net()
    plan = plan_decomposition(model, ["0", "2", "6", "8"], "tt", "energy:0.9", rank_multiple=2)
    apply_plan(model, plan)
    state = model.state_dict()
    fresh = _net(seed=1)
    assert restore_factorized(fresh, state) == [d.name for d in plan if d.method != "skip"]
    fresh.load_state_dict(state)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), fresh(x))
    assert restore_factorized(fresh, state) == []


def test_report_counts_the_cores_macs():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    model = nn.Sequential(tensor_train(linear, (8, 8)))
    report = compression_report(model, input_size=(64,))
    assert report.params == tt_params(Geometry.of(linear), model[0].ranks)
    assert report.macs == tt_macs(Geometry.of(linear), model[0].ranks, (1, 1))


def test_bad_tt_ranks_are_refused_by_name():
    g = Geometry.of(nn.Conv2d(8, 8, 3))
    from lightning_compress.methods.decomposition.tensor_train import build_tt

    with pytest.raises(ValueError, match=r"tt of a conv layer needs 3 ranks, got 2"):
        build_tt(g, (2, 2))
    with pytest.raises(ValueError, match=r"rank=0 is not valid"):
        plan_decomposition(_net(), ["2"], "tt", 0)
