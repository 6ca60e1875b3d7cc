"""Layers that read parts of one joined tensor share one input range (``shared_ranges``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.methods.quantization import Format, calibrate, quantize_layer
from lightning_compress.methods.quantization.shared_ranges import shared_range_groups, tie_input_ranges


class SplitJoin(nn.Module):
    """ShuffleNetV2's stride-1 block, twice: one half goes on, the other through a conv, then a channel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.first = nn.Conv2d(4, 4, 1)
        self.second = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(8, 5, 1)
        self.other = nn.Linear(8, 3)  # reads a pooled (averaged) view: not the same values

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for conv in (self.first, self.second):
            keep, through = x.chunk(2, dim=1)
            x = torch.cat((keep, torch.relu(conv(through))), dim=1)
            b, c, h, w = x.size()
            x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        return self.head(x).mean((2, 3)), self.other(x.mean((2, 3)))


def _quantized(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    for name, layer in model.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            quantize_layer(layer, Format(8, "symmetric"), None if name in skip else Format(8, "affine"))
    return model


def test_layers_reading_one_joined_tensor_form_one_group():
    assert shared_range_groups(_quantized(SplitJoin())) == [["first", "head", "second"]]


def test_a_layer_with_another_activation_format_stays_out():
    assert shared_range_groups(_quantized(SplitJoin(), skip=("head",))) == [["first", "second"]]


def test_a_network_that_does_not_trace_has_no_groups():
    class DataDependent(SplitJoin):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else super().forward(-x)

    assert shared_range_groups(_quantized(DataDependent())) == []


def test_tied_layers_take_the_union_of_the_observed_ranges_and_compute_on_it():
    torch.manual_seed(0)
    model = _quantized(SplitJoin()).eval()
    calibrate(model, [torch.randn(4, 3, 8, 8) for _ in range(2)])
    groups = shared_range_groups(model)
    layers = [model.get_submodule(name) for name in groups[0]]
    low = min(float(layer.activation_min) for layer in layers)
    high = max(float(layer.activation_max) for layer in layers)
    assert len({(float(layer.activation_min), float(layer.activation_max)) for layer in layers}) > 1
    tie_input_ranges(model, groups)
    assert {(float(layer.activation_min), float(layer.activation_max)) for layer in layers} == {(low, high)}
    assert len({tuple(map(float, layer.activation_scale_zero_point())) for layer in layers}) == 1
    assert float(model.stem.activation_max) != high  # the stem reads the image: in no group


def test_layers_that_saw_nothing_take_the_range_of_those_that_did():
    model = _quantized(SplitJoin())
    model.first.activation_min.fill_(-1.0)
    model.first.activation_max.fill_(2.0)
    model.first.activation_observed.fill_(True)
    tie_input_ranges(model, [["first", "head", "second"]])
    for layer in (model.first, model.second, model.head):
        assert bool(layer.activation_observed) and float(layer.activation_min) == -1.0
        assert float(layer.activation_max) == 2.0


def test_a_group_nobody_observed_stays_unobserved():
    model = _quantized(SplitJoin())
    tie_input_ranges(model, [["first", "second"]])
    assert not bool(model.first.activation_observed) and not bool(model.second.activation_observed)


@pytest.mark.parametrize("builder", ["shufflenet_v2_x1_0", "squeezenet1_1", "mobilenet_v2"])
def test_registry_networks_trace(builder):
    from lightning_compress.models import create_model

    groups = shared_range_groups(_quantized(create_model(builder, num_classes=10)))
    if builder == "shufflenet_v2_x1_0":  # each stage's split halves and the next stage's two branches
        assert [len(group) for group in groups] == [2, 5, 9, 4]
    elif builder == "mobilenet_v2":  # residual Adds change values: nothing to share
        assert groups == []
    else:  # each fire module's two expand convs read the same squeezed tensor
        assert [len(group) for group in groups] == [2] * 8
