import pytest
import torch
from torch import nn

from lightning_compress.methods.decomposition import (
    Factorized,
    apply_plan,
    plan_decomposition,
    plan_from_state,
    plan_to_state,
    restore_factorized,
)
from lightning_compress.methods.decomposition.allocation import allocate_ranks, layer_positions, lower_hull


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU(),
        nn.Conv2d(64, 64, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def _convs(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_plan_skips_what_the_method_cannot_factorize_and_says_why():
    model = _net()
    plan = {d.name: d for d in plan_decomposition(model, _convs(model), "tucker", 0.5)}
    assert plan["6"].method == "skip" and "depthwise" in plan["6"].note
    assert plan["8"].method == "skip" and "1x1" in plan["8"].note
    assert plan["3"].method == "tucker" and plan["3"].ranks == (32, 16)
    assert plan["3"].params_after < plan["3"].params_before


def test_apply_changes_only_planned_layers_and_the_error_is_recorded():
    model = _net()
    x = torch.randn(2, 3, 16, 16)
    plan = plan_decomposition(model, _convs(model), "tucker", "energy:0.95", rank_multiple=1)
    replaced = apply_plan(model, plan)
    assert replaced == [d.name for d in plan if d.method != "skip"]
    for d in plan:
        if d.method != "skip":
            assert isinstance(model.get_submodule(d.name), Factorized)
            assert d.error is not None and d.error <= d.estimated_error + 1e-9
    assert model(x).shape == (2, 10)


def test_svd_plan_targets_linear_and_1x1():
    model = _net()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    plan = {d.name: d for d in plan_decomposition(model, names, "svd", 8, rank_multiple=1)}
    assert plan["8"].method == "svd" and plan["12"].method == "svd"
    assert plan["3"].method == "skip" and "(3, 3) kernel" in plan["3"].note


def test_int_rank_above_a_mode_is_clamped_with_a_warning():
    model = _net()
    with pytest.warns(UserWarning, match="clamped"):
        plan = plan_decomposition(model, ["3"], "tucker", 48, rank_multiple=1)
    assert plan[0].ranks[1] <= 32


def test_target_compression_meets_the_total_parameter_budget():
    model = _net()
    total = _params(model)
    plan = plan_decomposition(model, _convs(model), "tucker", target_compression=3, rank_multiple=1)
    apply_plan(model, plan)
    assert _params(model) <= total / 3
    assert _params(model) > total / 3 * 0.9  # and does not overshoot by much


def test_target_compression_out_of_reach_names_the_argument():
    model = _net()
    with pytest.raises(ValueError, match=r"target_compression=1000 is out of reach"):
        plan_decomposition(model, _convs(model), "tucker", target_compression=1000)


def test_budget_goes_first_to_the_layer_that_loses_least():
    torch.manual_seed(0)
    low_rank, full_rank = nn.Conv2d(32, 32, 3), nn.Conv2d(32, 32, 3)
    with torch.no_grad():  # rank 4 in both channel modes
        low_rank.weight.copy_(torch.einsum("or,rskl,is->oikl", torch.randn(32, 4), torch.randn(4, 4, 3, 3), torch.randn(32, 4)))
    layers = {"low": low_rank, "full": full_rank}
    total = sum(p.numel() for m in layers.values() for p in m.parameters())
    ranks = allocate_ranks(layers, "tucker", 1.5, total, multiple=4)
    assert ranks["low"] == (4, 4)
    assert ranks["full"] is None or ranks["full"][0] * ranks["full"][1] > 16


def test_lower_hull_is_convex_and_monotone():
    costs = torch.tensor([10.0, 8.0, 6.0, 4.0, 2.0, 7.0]).numpy()
    errors = torch.tensor([0.0, 0.1, 0.15, 0.5, 1.0, 0.5]).numpy()
    hull = lower_hull(costs, errors)
    assert [costs[i] for i in hull] == sorted(costs[i] for i in hull)
    assert [errors[i] for i in hull] == sorted((errors[i] for i in hull), reverse=True)
    assert 5 not in hull  # dominated


def test_macs_metric_uses_spatial_sizes():
    model = _net()
    x = torch.zeros(1, 3, 16, 16)
    positions = layer_positions(model, x, ["0", "3", "12"])
    assert positions == {"0": (256, 256), "3": (256, 64), "12": (1, 1)}
    plan = {d.name: d for d in plan_decomposition(model, _convs(model), "tucker", 0.5, metric="macs", example=x)}
    assert plan["3"].macs_before == 64 * 32 * 9 * 64
    assert plan["3"].macs_after < plan["3"].macs_before


def test_restore_from_shapes_then_load_gives_the_same_outputs():
    model = _net()
    plan = plan_decomposition(model, _convs(model), "tucker", "energy:0.9", rank_multiple=4)
    apply_plan(model, plan)
    state = model.state_dict()
    fresh = _net(seed=1)
    restored = restore_factorized(fresh, state)
    assert restored == [d.name for d in plan if d.method != "skip"]
    fresh.load_state_dict(state)
    x = torch.randn(2, 3, 16, 16)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    assert restore_factorized(fresh, state) == []  # idempotent


def test_plan_replays_through_plain_values():
    model = _net()
    plan = plan_decomposition(model, _convs(model), "cp", 8, rank_multiple=1)
    apply_plan(model, plan, n_iter_max=5)
    again = plan_from_state(plan_to_state(plan))
    fresh = _net(seed=2)
    apply_plan(fresh, again, from_weights=False)
    fresh.load_state_dict(model.state_dict())
    assert [d.to_dict() for d in again] == [d.to_dict() for d in plan]


def test_unknown_method_and_metric():
    model = _net()
    with pytest.raises(ValueError, match=r"method='qr' is not known"):
        plan_decomposition(model, ["0"], "qr")
    with pytest.raises(ValueError, match=r"metric='flops' is not known"):
        plan_decomposition(model, ["0"], "tucker", metric="flops")
