"""One-dimensional k-means for weight sharing (Deep Compression's codebooks).

In one dimension the clusters of Lloyd's algorithm are intervals of the sorted values, bounded by
the midpoints between neighbouring centroids. So the values are sorted once, and each iteration
needs only a ``searchsorted`` of the k-1 midpoints and the cluster sums read off a cumulative sum:
O(k log n) per iteration instead of the O(nk) distance matrix of a generic k-means (scikit-learn's
KMeans takes minutes on VGG19's 20M weights; this takes seconds).
"""

from __future__ import annotations

import torch

INITS = ("linear", "density", "random")


def _initial_centroids(sorted_values: torch.Tensor, k: int, init: str, generator: torch.Generator | None) -> torch.Tensor:
    n = sorted_values.numel()
    if init == "linear":  # Han et al.'s best: evenly spaced over [min, max], so large weights get centroids
        return torch.linspace(float(sorted_values[0]), float(sorted_values[-1]), k, dtype=torch.float64)
    if init == "density":  # evenly spaced in the CDF: centroids crowd where the weights are
        positions = ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long().clamp(max=n - 1)
        return sorted_values[positions].double()
    if init == "random":
        return sorted_values[torch.randperm(n, generator=generator)[:k]].double().sort().values
    raise ValueError(f"init={init!r} is not known; valid: {', '.join(map(repr, INITS))}")


def kmeans_1d(
    values: torch.Tensor, k: int, init: str = "linear", iters: int = 50, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster scalar ``values`` into at most ``k`` centroids.

    Returns ``(centroids, labels)``: ``centroids`` sorted ascending (float32, length ``k``; a
    centroid that lost all its members keeps its last position), ``labels`` int64 like ``values``.

    Example:
        >>> values = torch.tensor([0.1, 0.11, 0.5, 0.52, 0.9])
        >>> centroids, labels = kmeans_1d(values, k=3)
        >>> [round(c, 3) for c in centroids.tolist()], labels.tolist()
        ([0.105, 0.51, 0.9], [0, 0, 1, 1, 2])
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    if init not in INITS:
        raise ValueError(f"init={init!r} is not known; valid: {', '.join(map(repr, INITS))}")
    flat = values.detach().reshape(-1)
    if flat.numel() == 0:
        return torch.zeros(k, dtype=torch.float32, device=flat.device), torch.zeros(0, dtype=torch.long, device=flat.device)
    sorted_values, order = flat.float().sort()
    generator = torch.Generator().manual_seed(seed)
    centroids = _initial_centroids(sorted_values.cpu(), min(k, flat.numel()), init, generator).to(flat.device)
    # float64 running sums: float32 cumulative sums over millions of weights lose the cluster means
    cumsum = torch.cat([torch.zeros(1, dtype=torch.float64, device=flat.device), sorted_values.double().cumsum(0)])
    for _ in range(iters):
        bounds = torch.searchsorted(sorted_values, ((centroids[1:] + centroids[:-1]) / 2).float())
        edges = torch.cat([bounds.new_zeros(1), bounds, bounds.new_tensor([flat.numel()])])
        counts = edges[1:] - edges[:-1]
        sums = cumsum[edges[1:]] - cumsum[edges[:-1]]
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated.sort().values
    bounds = torch.searchsorted(sorted_values, ((centroids[1:] + centroids[:-1]) / 2).float())
    edges = torch.cat([bounds.new_zeros(1), bounds, bounds.new_tensor([flat.numel()])])
    counts = edges[1:] - edges[:-1]
    # The weights become their centroid's value: make each centroid the mean of its final members.
    sums = cumsum[edges[1:]] - cumsum[edges[:-1]]
    centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    sorted_labels = torch.repeat_interleave(torch.arange(len(centroids), device=flat.device), counts)
    labels = torch.empty_like(sorted_labels)
    labels[order] = sorted_labels
    out = torch.zeros(k, dtype=torch.float32, device=flat.device)
    out[: len(centroids)] = centroids.float()
    if len(centroids) < k:  # fewer values than centroids: pad with the last one (never referenced)
        out[len(centroids) :] = out[len(centroids) - 1]
    return out, labels.view(values.shape)
