from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.methods.pruning import surgery
import torchvision

from lightning_compress.methods.pruning.channel_graph import ChannelDependencies, LayerChannels, analyse_channels
from lightning_compress.methods.pruning.channels import ChannelGroup, find_channel_groups, unsupported_convs
from lightning_compress.methods.pruning.surgery import remove_channels, resize_to_state_dict
from lightning_compress.methods.pruning.masks import MaskedConv2d, MaskedLinear, add_mask, is_prunable
from lightning_compress.models import create_model


def _randomise(model: nn.Module) -> nn.Module:
    """Non-trivial biases and BatchNorm state, so that equivalence tests cannot pass by zeros alone."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.normal_()
    return model


def _half_keep(model: nn.Module, groups: dict[str, ChannelGroup]) -> dict[str, torch.Tensor]:
    """Keep every other channel of each grouped conv (the odd ones, so channel 0 goes too)."""
    return {name: torch.arange(model.get_submodule(name).out_channels) % 2 == 1 for name in groups}


@torch.no_grad()
def _zero_removed(model: nn.Module, groups: dict[str, ChannelGroup], keep: dict[str, torch.Tensor]) -> None:
    """The state masked filter training leaves: removed filters and their BatchNorm scale and shift at zero."""
    for name, mask in keep.items():
        model.get_submodule(name).weight[~mask] = 0
        norm = model.get_submodule(groups[name].norm)
        norm.weight[~mask] = 0
        norm.bias[~mask] = 0


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_vgg_proxy_every_conv_is_a_group_with_its_batchnorm():
    model = create_model("vgg_proxy")
    groups = find_channel_groups(model)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert list(groups) == convs and len(convs) == 8
    assert unsupported_convs(model) == {}
    for name, group in groups.items():
        index = int(name.split(".")[1])
        assert group.norm == f"features.{index + 1}"
        assert isinstance(model.get_submodule(group.norm), nn.BatchNorm2d)
        assert group.coupled == (name,)  # a plain chain: nothing is tied
    # Each conv reads the previous conv's channels; the last reaches the classifier through pool and flatten.
    layers = analyse_channels(model).layers
    assert [layers[c].inputs for c in convs[1:]] == [layers[c].outputs for c in convs[:-1]]
    assert layers["classifier"] == LayerChannels("linear", layers[convs[-1]].outputs, None, 1)
    assert groups[convs[-1]] == ChannelGroup(convs[-1], "features.26", (convs[-1],))


@torch.no_grad()
def _zero_classes(model: nn.Module, deps, class_keep: list[bool]) -> None:
    """The state masked training leaves with coupled groups: every removed channel zero wherever it is produced."""
    for name, layer in deps.layers.items():
        if layer.outputs is not None:
            gone = torch.tensor([not class_keep[k] for k in layer.outputs])
            module = model.get_submodule(name)
            module.weight[gone] = 0
            if module.bias is not None:
                module.bias[gone] = 0


_COUPLED = {  # a builder and the input size it needs
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32),
    "mobilenet_v2": (lambda: create_model("mobilenet_v2"), 16),
    "shufflenet_v2_x1_0": (lambda: create_model("shufflenet_v2_x1_0"), 16),
    "squeezenet1_0 (torchvision)": (lambda: torchvision.models.squeezenet1_0(num_classes=10), 48),
    "xception": (lambda: create_model("xception"), 16),
}


@pytest.mark.parametrize("name", list(_COUPLED))
def test_coupled_channels_are_removed_together_and_the_outputs_stay(name):
    """Residual adds, depthwise convs, concatenations and channel shuffles: a random fifth of the tied
    groups removed from a randomised network leaves its outputs unchanged, and the network smaller."""
    build, size = _COUPLED[name]
    model = _randomise(build()).eval()
    deps = analyse_channels(model)
    groups = find_channel_groups(model, deps)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(deps.reasons) | set(groups) == convs and not set(deps.reasons) & set(groups)
    assert len(groups) > len(convs) / 3
    # Every conv is pruned, directly or through its producer, except an output layer.
    assert all("depthwise" in why or "model output" in why for why in deps.reasons.values()), deps.reasons
    generator = torch.Generator().manual_seed(0)
    class_keep = [k in deps.pinned or bool(torch.rand(1, generator=generator) > 0.2) for k in range(len(deps.members))]
    for layer in deps.layers.values():  # a layer that would lose everything keeps its first group
        classes = layer.outputs or layer.inputs
        if classes and not any(class_keep[k] for k in classes):
            class_keep[classes[0]] = True
    keep = {c: torch.tensor([class_keep[k] for k in deps.layers[c].outputs]) for c in groups}
    _zero_classes(model, deps, class_keep)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    params = _params(model)

    remove_channels(model, keep, example_input=x)

    assert _params(model) < 0.9 * params
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
    fresh = build()  # a checkpoint of the smaller network loads into a fresh one, depthwise convs too
    resize_to_state_dict(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_ties_of_a_residual_add_a_depthwise_conv_a_concatenation_and_a_shuffle():
    resnet = analyse_channels(torchvision.models.resnet18(num_classes=10))
    # The stem, layer1's two blocks and their adds: one group per channel across five convs.
    assert resnet.coupled()["conv1"] == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert resnet.members[0] == [("conv1", 0), ("layer1.0.conv2", 0), ("layer1.1.conv2", 0)]
    mobilenet = analyse_channels(create_model("mobilenet_v2"))
    expand, depthwise = mobilenet.layers["features.2.conv.0.0"], mobilenet.layers["features.2.conv.1.0"]
    assert depthwise.kind == "depthwise" and depthwise.inputs == depthwise.outputs == expand.outputs
    squeeze = analyse_channels(torchvision.models.squeezenet1_1(num_classes=10)).layers
    # A fire module's output is the concatenation of its two expand convs.
    assert squeeze["features.4.squeeze"].inputs == squeeze["features.3.expand1x1"].outputs + squeeze["features.3.expand3x3"].outputs
    shuffle = analyse_channels(create_model("shufflenet_v2_x1_0"))
    # Stage 2's first block: after the shuffle, channel i of branch1 and channel i of branch2 sit side by side
    # and are tied; the next block's branch2 reads the second half of the shuffled channels.
    b1, b2 = shuffle.layers["stage2.0.branch1.2"].outputs, shuffle.layers["stage2.0.branch2.5"].outputs
    assert all(x == y for x, y in zip(b1, b2))
    assert "stage2.1.branch2.0" in find_channel_groups(create_model("shufflenet_v2_x1_0"))


def test_inconsistent_keep_of_tied_convs_is_refused_before_anything_changes():
    model = torchvision.models.resnet18(num_classes=10)
    stem = model.conv1
    half = torch.arange(64) % 2 == 0
    with pytest.raises(ValueError, match=r"tied to channels of \['layer1.0.conv2', 'layer1.1.conv2'\]"):
        remove_channels(model, {"conv1": half})
    everything = {"conv1": half, "layer1.0.conv2": half, "layer1.1.conv2": ~half}
    with pytest.raises(ValueError, match="which is tied to it"):
        remove_channels(model, everything)
    assert model.conv1 is stem
    remove_channels(model, {"conv1": half, "layer1.0.conv2": half, "layer1.1.conv2": half})
    assert model.conv1.out_channels == model.layer1[1].conv2.out_channels == model.layer2[0].conv1.in_channels == 32


def test_remove_half_of_vgg_proxy_shrinks_it_and_keeps_outputs_of_the_zeroed_model():
    model = _randomise(create_model("vgg_proxy")).eval()
    groups = find_channel_groups(model)
    keep = _half_keep(model, groups)
    _zero_removed(model, groups, keep)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    params = _params(model)

    counts = remove_channels(model, keep, example_input=x)

    assert counts == {name: int(mask.sum()) for name, mask in keep.items()}
    assert all(model.get_submodule(g.norm).num_features == counts[name] for name, g in groups.items())
    assert model.classifier.in_features == counts["features.25"]
    assert _params(model) < 0.3 * params  # conv cost scales with in * out channels: about a quarter left
    assert not model.training and not model.features[1].training  # eval mode carried over
    with torch.no_grad():
        actual = model(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # The shrunk model is again fully analysable: it can be pruned again.
    assert list(find_channel_groups(model)) == list(groups)


class _FlattenHead(nn.Module):
    """conv -> BN -> activation -> flatten written in forward, the way hand-written models do it."""

    def __init__(self, flatten: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 16, 5)
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        if self.flatten == "view":
            x = x.view(x.size(0), -1)
        else:
            x = torch.flatten(x, 1)
        return self.fc(x)


@pytest.mark.parametrize(
    "build",
    [
        lambda: nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(96, 5)
        ),
        lambda: _FlattenHead("view"),
        lambda: _FlattenHead("torch.flatten"),
    ],
    ids=["sequential", "view", "torch.flatten"],
)
def test_linear_consumer_loses_a_block_of_features_per_channel(build):
    model = _randomise(build()).eval()
    groups = find_channel_groups(model)
    (conv,) = groups
    deps = analyse_channels(model)
    (linear,) = [n for n, layer in deps.layers.items() if layer.kind == "linear"]
    assert deps.layers[linear].features_per_channel == 16  # 4x4 maps flattened
    keep = {conv: torch.tensor([True, False, True, True, False, True])}
    _zero_removed(model, groups, keep)
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        expected = model(x)

    assert remove_channels(model, keep) == {conv: 4}

    assert model.get_submodule(linear).in_features == 4 * 16
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_channels_last_weights_stay_channels_last():
    model = _randomise(create_model("vgg_proxy")).eval().to(memory_format=torch.channels_last)
    groups = find_channel_groups(model)
    keep = _half_keep(model, groups)
    _zero_removed(model, groups, keep)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
    remove_channels(model, keep)
    for name in groups:
        weight = model.get_submodule(name).weight
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_resize_to_state_dict_rebuilds_a_fresh_model_for_a_pruned_checkpoint():
    pruned = _randomise(create_model("vgg_proxy")).eval()
    remove_channels(pruned, _half_keep(pruned, find_channel_groups(pruned)))
    state = pruned.state_dict()

    fresh = create_model("vgg_proxy").eval()
    resized = resize_to_state_dict(fresh, state)

    convs_and_norms = [n for n, m in fresh.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    assert resized == convs_and_norms + ["classifier"]
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned(x))
    assert resize_to_state_dict(fresh, state) == []  # already matching: nothing to do


def test_masked_layers_stay_masked_with_sliced_masks():
    model = _randomise(create_model("vgg_proxy")).eval()
    for m in model.modules():
        if is_prunable(m):
            add_mask(m, straight_through=True)
    torch.manual_seed(1)
    for m in model.modules():
        if hasattr(m, "weight_mask"):
            m.weight_mask.copy_(torch.rand(m.weight_mask.shape) > 0.3)  # some unstructured sparsity too
    originals = {name: m.weight_mask.clone() for name, m in model.named_modules() if hasattr(m, "weight_mask")}
    groups = find_channel_groups(model)
    assert list(groups) == [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    keep = _half_keep(model, groups)
    _zero_removed(model, groups, keep)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)

    remove_channels(model, keep)

    first, second = model.features[0], model.features[4]
    assert type(first) is MaskedConv2d and first.straight_through
    assert type(model.classifier) is MaskedLinear
    kept0, kept1 = keep["features.0"], keep["features.4"]
    # features.4 lost output filters (its own group) and input channels (consumer of features.0).
    assert torch.equal(first.weight_mask, originals["features.0"][kept0])
    assert torch.equal(second.weight_mask, originals["features.4"][kept1][:, kept0])
    assert torch.equal(model.classifier.weight_mask, originals["classifier"][:, keep["features.25"]])
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)

    fresh = create_model("vgg_proxy").eval()
    for m in fresh.modules():
        if is_prunable(m):
            add_mask(m)
    resize_to_state_dict(fresh, model.state_dict())
    assert type(fresh.features[0]) is MaskedConv2d
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(fresh.features[4].weight_mask, second.weight_mask)


def test_keep_errors_name_the_conv_and_leave_the_model_untouched():
    model = create_model("vgg_proxy")
    conv = model.features[0]
    with pytest.raises(ValueError, match=r"keep\['features.0'\] keeps no channel"):
        # The valid first entry is not applied either: every entry is checked before any surgery.
        remove_channels(model, {"features.4": torch.ones(32, dtype=torch.bool), "features.0": torch.zeros(16).bool()})
    with pytest.raises(ValueError, match=r"keep\['features.0'\] must be a bool tensor of shape \(16,\), got dtype"):
        remove_channels(model, {"features.0": torch.ones(16)})
    with pytest.raises(ValueError, match=r"must be a bool tensor of shape \(16,\), got .*shape=\(8,\)"):
        remove_channels(model, {"features.0": torch.ones(8, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'features.2'.*it is a ReLU, not a Conv2d.*Supported convs: 'features.0'"):
        remove_channels(model, {"features.2": torch.ones(16, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'nope'.*no module of that name"):
        remove_channels(model, {"nope": torch.ones(16, dtype=torch.bool)})
    assert model.features[0] is conv and model.features[4].in_channels == 16


def test_a_failed_shape_check_undoes_every_replacement(monkeypatch):
    """A wrong analysis (here: a Linear block size of 1 instead of 16) must not leave a half-pruned model."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(96, 5))
    originals = list(model)
    right = analyse_channels(model)
    wrong = ChannelDependencies(dict(right.layers), right.members, {}, right.norms, {})
    wrong.layers["3"] = LayerChannels("linear", right.layers["3"].inputs, None, 1)
    monkeypatch.setattr(surgery, "analyse_channels", lambda m: wrong)
    with pytest.raises(RuntimeError):
        remove_channels(model, {"0": torch.tensor([True, False] * 3)}, example_input=torch.randn(1, 3, 4, 4))
    assert all(new is old for new, old in zip(model, originals))


def test_tracing_failure_makes_every_conv_unsupported():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            x = self.a(x)
            return self.b(x) if x.sum() > 0 else x  # control flow on values: fx cannot trace it

    model = DataDependent()
    assert find_channel_groups(model) == {}
    reasons = unsupported_convs(model)
    assert list(reasons) == ["a", "b"] and all(r.startswith("symbolic tracing failed") for r in reasons.values())
    with pytest.raises(ValueError, match="'a'.*symbolic tracing failed"):
        remove_channels(model, {"a": torch.ones(4, dtype=torch.bool)})


@pytest.mark.parametrize("multiple", [1, 8])
def test_channel_multiple_keeps_multiples_of_it_in_every_pruned_conv(multiple):
    from lightning_compress.methods.pruning.pruner import Pruner

    torch.manual_seed(0)
    model = _randomise(create_model("mobilenet_v2", num_classes=10)).eval()
    dense = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    channels = analyse_channels(model)
    names = list(find_channel_groups(model, channels))
    pruner = Pruner(model, names, structure="filter", channels=channels, channel_multiple=multiple)
    pruner.attach()
    pruner.update(0.31, first=True)
    pruner.finalize()
    counts = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    pruned = {n: c for n, c in counts.items() if c < dense[n]}
    assert len(pruned) > 30  # the target was reached: most convs lost channels
    odd = {n: c for n, c in pruned.items() if c % 8}
    if multiple == 8:
        assert not odd, odd
    else:
        assert odd  # 31% of 32, 96, 144, ... channels: counts such as 22 and 99
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_channel_multiple_rounds_to_the_nearest_count_by_score():
    from lightning_compress.methods.pruning.coupled import CoupledChannels

    model = nn.Sequential(nn.Conv2d(3, 20, 3), nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 4, 1))
    channels = analyse_channels(model)
    coupled = CoupledChannels(channels, ["0"])
    scores = {"0": torch.arange(20, dtype=torch.float)}  # channel i scores i
    for kept, want in ((11, 8), (13, 16), (12, 16), (19, 20), (3, 8)):
        keep = {"0": torch.arange(20) >= 20 - kept}
        rounded = coupled.round_kept(keep, scores, 8)["0"]
        assert int(rounded.sum()) == want and bool(rounded[20 - want:].all())  # the best-scored ones
    assert coupled.round_kept(keep, scores, 1) is keep
