import math

import pytest
import torch
from torch import nn

from lightning_compress.methods.decomposition import Geometry, apply_plan, plan_decomposition, restore_factorized
from lightning_compress.methods.decomposition.allocation import estimated_error, layer_spectra
from lightning_compress.methods.decomposition.flattened import (dropped_energy, flattened, flattened_full_terms,
                                                                flattened_params, nested_terms)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(24, 24, (3, 5), padding=(1, 2)), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))


def test_full_terms_reproduce_the_layer_with_its_geometry():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 20, 3, stride=2, padding=2, dilation=2).double()
    full = flattened_full_terms(Geometry.of(conv))
    layer = flattened(conv, full)
    assert full == 9 and [n for n, _ in layer.named_children()] == ["lateral", "vertical", "horizontal", "combine"]
    assert layer.vertical.groups == layer.horizontal.groups == 9 * 20 and layer.combine.groups == 20
    assert layer.vertical.stride == (2, 1) and layer.horizontal.dilation == (1, 2)
    x = torch.randn(2, 12, 15, 15, dtype=torch.float64)
    assert _rel(layer(x), conv(x)) < 1e-10 and layer.error < 1e-10
    fp32 = nn.Conv2d(16, 24, 3, padding=1)
    v = torch.randn(2, 16, 8, 8)
    assert _rel(flattened(fp32, 9)(v), fp32(v)) < 1e-5
    assert flattened_full_terms(Geometry.of(nn.Conv2d(1, 8, 3))) == 3  # a single-channel filter is a 3x3 matrix


def test_one_term_is_the_three_stage_chain_of_jin_et_al_and_recovers_a_separable_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1).double()
    a, b, c = (torch.randn(16, n, dtype=torch.float64) for n in (8, 3, 3))
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("oc,oh,ow->ochw", a, b, c))
    layer = flattened(conv, 1)
    assert [n for n, _ in layer.named_children()] == ["lateral", "vertical", "horizontal"]
    assert layer.horizontal.bias is not None and layer.error < 1e-10
    assert layer.params == flattened_params(1, Geometry.of(conv)) == 16 * (8 + 3 + 3) + 16


def test_terms_are_orthogonal_and_als_improves_on_their_truncation():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3)
    w = conv.weight.detach().double()
    norms, a, b, c = nested_terms(w)
    assert torch.allclose(torch.einsum("ot,oct,oht,owt->ochw", norms, a, b, c), w, atol=1e-12)
    assert torch.allclose((norms**2).sum(1), (w**2).sum((1, 2, 3)))
    for terms in (1, 3):
        start = math.sqrt(dropped_energy(norms)[terms])
        layer = flattened(conv, terms)
        assert layer.error <= start + 1e-9
        estimate = estimated_error("flattened", Geometry.of(conv), layer_spectra("flattened", conv), (terms,))
        assert estimate == pytest.approx(start)


def test_rank_rules_give_terms_per_filter():
    model = _net()
    names = ["0", "2", "4"]
    assert [d.ranks for d in plan_decomposition(model, names, "flattened", 1)] == [(1,), (1,), (1,)]
    assert plan_decomposition(model, ["2"], "flattened", 0.34)[0].ranks == (4,)  # ceil(0.34 * 9)
    energy = plan_decomposition(model, ["2"], "flattened", "energy:0.7")[0]
    norms = layer_spectra("flattened", model[2])[0][0]
    s = energy.ranks[0]
    assert dropped_energy(norms)[s] <= 1 - 0.49 < dropped_energy(norms)[s - 1]
    with pytest.warns(UserWarning, match="clamped"):
        # clamped to 9 terms, which save nothing on a 3x3x3 filter
        assert plan_decomposition(model, ["0"], "flattened", 20)[0].method == "skip"
    for bad in ("vbmf", "svt:0.1"):
        with pytest.raises(ValueError, match=rf"rank='{bad}' is not valid for method='flattened'"):
            plan_decomposition(model, names, "flattened", bad)
    with pytest.raises(ValueError, match=r"terms=10 is out of range for \(24, 16, 3, 3\): give 1\.\.9"):
        flattened(model[2], 10)


def test_target_compression_budget_with_flattened():
    model = _net()
    dense = sum(p.numel() for p in model.parameters())
    plan = plan_decomposition(model, ["0", "2", "4"], "flattened", target_compression=2.0)
    apply_plan(model, plan)
    assert sum(p.numel() for p in model.parameters()) <= dense / 2


def test_restore_from_shapes_then_load_gives_the_same_outputs():
    model = _net()
    plan = plan_decomposition(model, ["2", "4"], "flattened", 2)
    plan += plan_decomposition(model, ["0"], "flattened", 1)
    apply_plan(model, plan, n_iter_max=3)
    state = model.state_dict()
    fresh = _net(seed=1)
    assert restore_factorized(fresh, state) == ["0", "2", "4"]
    fresh.load_state_dict(state)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), fresh(x))
    assert restore_factorized(fresh, state) == []
