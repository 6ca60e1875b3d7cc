from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.methods.sharing import kmeans_1d, share_weights, sync_to_codebook, tie_gradients
from lightning_compress.methods.sharing.codebook import is_shared


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_labels_are_nearest_centroids_and_centroids_are_means(init):
    torch.manual_seed(0)
    values = torch.randn(5000)
    centroids, labels = kmeans_1d(values, 16, init=init, iters=100)
    assert centroids.shape == (16,) and torch.all(centroids[1:] >= centroids[:-1])
    nearest = (values[:, None] - centroids[None, :]).abs().argmin(1)
    assert (centroids[nearest] == centroids[labels]).float().mean() > 0.99  # converged (Lloyd's fixed point)
    for j in labels.unique():
        assert centroids[j] == pytest.approx(values[labels == j].mean().item(), abs=1e-5)


def test_linear_init_spans_the_extremes_density_init_follows_the_mass():
    from lightning_compress.methods.sharing.kmeans import _initial_centroids

    values = torch.cat([torch.randn(10_000) * 0.01, torch.tensor([1.0, -1.0])]).sort().values
    linear = _initial_centroids(values, 8, "linear", None)
    density = _initial_centroids(values, 8, "density", None)
    assert linear.max() == pytest.approx(1.0) and linear.min() == pytest.approx(-1.0)
    assert density.abs().max() < 0.05  # no initial centroid near the two outliers


def test_fewer_values_than_centroids_and_empty_input():
    centroids, labels = kmeans_1d(torch.tensor([3.0, 1.0]), 4)
    assert centroids[labels].tolist() == [3.0, 1.0]
    centroids, labels = kmeans_1d(torch.empty(0), 4)
    assert labels.numel() == 0 and centroids.shape == (4,)


def test_bad_arguments():
    with pytest.raises(ValueError, match="init='kmeans\\+\\+'.*'linear', 'density', 'random'"):
        kmeans_1d(torch.randn(10), 4, init="kmeans++")
    with pytest.raises(ValueError, match="k=0"):
        kmeans_1d(torch.randn(10), 0)


def test_share_weights_keeps_zeros_and_respects_masks():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    with torch.no_grad():
        layer.weight[:, :32] = 0
    share_weights(layer, bits=3)
    assert is_shared(layer)
    assert (layer.weight[:, :32] == 0).all() and (layer.weight_code[:, :32] == -1).all()
    assert layer.weight[:, 32:].unique().numel() <= 8
    assert torch.equal(layer.weight[:, 32:], layer.weight_codebook[layer.weight_code[:, 32:].long()])

    from lightning_compress.methods.pruning import add_mask, set_mask

    masked = add_mask(nn.Linear(16, 8), straight_through=True)
    mask = torch.rand(8, 16) > 0.5
    set_mask(masked, mask, zero_pruned=False)  # rehabilitation: dense values stay behind the mask
    share_weights(masked, bits=2)
    assert torch.equal(masked.weight_code >= 0, mask)


def test_tied_gradients_keep_cluster_members_equal_under_sgd_momentum():
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    share_weights(layer, bits=2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    before = layer.weight_codebook.clone()
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(8, 32)).square().sum().backward()
        grad = layer.weight.grad.clone()
        tie_gradients(layer)
        code = layer.weight_code.long()
        for j in range(4):
            members = layer.weight.grad[code == j]
            assert torch.allclose(members, grad[code == j].sum().expand_as(members))
        opt.step()
        for j in range(4):
            assert layer.weight[code == j].unique().numel() == 1  # members moved together
        sync_to_codebook(layer)
    assert not torch.equal(before, layer.weight_codebook)  # the centroids learned
    assert layer.weight.unique().numel() <= 4


def test_mean_reduction_divides_by_cluster_size():
    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    share_weights(layer, bits=1)
    layer(torch.randn(3, 16)).sum().backward()
    raw = layer.weight.grad.clone()
    tie_gradients(layer, "mean")
    code = layer.weight_code.long()
    for j in range(2):
        members = code == j
        if members.any():
            assert torch.allclose(layer.weight.grad[members], raw[members].mean().expand(int(members.sum())))
