from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.methods.pruning import add_mask, clear_pruned_optimizer_state, remove_mask, set_mask
from lightning_compress.methods.pruning.masks import MaskedConv2d, MaskedLinear
from lightning_compress.methods.pruning.selection import global_keep, keep_top, layer_keep, with_hysteresis


def _half_mask(weight):
    return (torch.arange(weight.numel()) % 2 == 0).view(weight.shape)


@pytest.mark.parametrize("layer", [nn.Conv2d(3, 4, 3), nn.Linear(6, 5), nn.Conv1d(2, 3, 3)])
def test_add_mask_keeps_parameters_and_keys(layer):
    weight, bias = layer.weight, layer.bias
    keys = set(layer.state_dict())
    add_mask(layer)
    assert layer.weight is weight and layer.bias is bias
    assert set(layer.state_dict()) == keys | {"weight_mask"}
    assert layer.weight_mask.dtype == torch.bool and layer.weight_mask.all()
    add_mask(layer)  # idempotent
    remove_mask(layer)
    assert set(layer.state_dict()) == keys and type(layer) in (nn.Conv2d, nn.Linear, nn.Conv1d)


def test_masked_forward_equals_dense_with_zeros():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    dense = nn.Conv2d(3, 4, 3)
    dense.load_state_dict(conv.state_dict())
    add_mask(conv)
    mask = _half_mask(conv.weight)
    set_mask(conv, mask, zero_pruned=False)
    with torch.no_grad():
        dense.weight.mul_(mask)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(conv(x), dense(x), atol=1e-6)
    assert isinstance(conv, MaskedConv2d)


def test_gradient_masked_without_rehabilitation_and_straight_through_with_it():
    torch.manual_seed(0)
    for straight_through in (False, True):
        layer = add_mask(nn.Linear(6, 4), straight_through=straight_through)
        set_mask(layer, _half_mask(layer.weight), zero_pruned=not straight_through)
        layer(torch.randn(3, 6)).square().sum().backward()
        pruned_grad = layer.weight.grad[~layer.weight_mask]
        if straight_through:
            assert (pruned_grad != 0).all()  # dense weights keep learning
        else:
            assert (pruned_grad == 0).all()
    assert isinstance(layer, MaskedLinear)


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
])
def test_pruned_weights_stay_zero_under_momentum_and_decay(make_opt):
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    opt = make_opt(layer.parameters())
    for _ in range(3):  # build up momentum / Adam moments on every weight first
        opt.zero_grad()
        layer(torch.randn(4, 8)).square().sum().backward()
        opt.step()
    add_mask(layer)
    set_mask(layer, _half_mask(layer.weight))
    clear_pruned_optimizer_state(opt, [layer])
    for _ in range(20):
        opt.zero_grad()
        layer(torch.randn(4, 8)).square().sum().backward()
        opt.step()
    assert (layer.weight[~layer.weight_mask] == 0).all()
    assert (layer.weight[layer.weight_mask] != 0).all()


def test_channels_last_mask_follows_weight_format():
    conv = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    add_mask(conv)
    assert conv.weight_mask.is_contiguous(memory_format=torch.channels_last)
    set_mask(conv, keep_top(conv.weight.abs(), 100))
    assert int(conv.weight_mask.sum()) == 100 and conv.weight.is_contiguous(memory_format=torch.channels_last)
    out = conv(torch.randn(1, 8, 6, 6).to(memory_format=torch.channels_last))
    assert out.shape == (1, 16, 4, 4)


def test_add_mask_refuses_unknown_layers():
    with pytest.raises(TypeError, match="cannot mask a BatchNorm2d"):
        add_mask(nn.BatchNorm2d(3))


def test_selection_counts_are_exact_even_with_ties():
    scores = torch.zeros(1000)
    scores[:10] = torch.arange(1, 11).float()
    keep = keep_top(scores, 300)
    assert int(keep.sum()) == 300 and keep[:10].all()
    masks = layer_keep({"a": torch.rand(100), "b": torch.rand(50)}, {"a": 0.9, "b": 0.5})
    assert int(masks["a"].sum()) == 10 and int(masks["b"].sum()) == 25


def test_global_keep_ranks_across_layers_and_never_empties_a_layer():
    big = torch.linspace(1, 2, 100)
    small = torch.linspace(0, 0.1, 10)
    masks = global_keep({"big": big, "small": small}, sparsity=0.5)
    # the 55 largest of 110 are all in "big"; "small" would be emptied, so it keeps its best weight
    assert int(masks["big"].sum()) == 55 and masks["big"][-55:].all()
    assert int(masks["small"].sum()) == 1 and masks["small"][-1]


def test_hysteresis_keeps_a_kept_weight_until_it_falls_past_the_margin():
    scores = torch.tensor([1.0, 1.05, 2.0])
    kept = torch.tensor([True, False, True])
    # Without hysteresis 1.05 beats 1.0; with a 10% margin the kept 1.0 (counts 1.1) stays.
    assert keep_top(scores, 2).tolist() == [False, True, True]
    assert keep_top(with_hysteresis(scores, kept, 0.1), 2).tolist() == [True, False, True]
    # A pruned weight that grew past the margin is spliced back.
    scores = torch.tensor([1.0, 1.2, 2.0])
    assert keep_top(with_hysteresis(scores, kept, 0.1), 2).tolist() == [False, True, True]
