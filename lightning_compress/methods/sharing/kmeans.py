"""k-means for weight sharing: one-dimensional (Deep Compression's codebooks) and of sub-vectors
(product quantization, :func:`kmeans_vectors`).

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


def kmeans_vectors(
    points: torch.Tensor, k: int, iters: int = 50, seed: int = 0, chunk_elements: int = 1 << 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster each of ``B`` independent sets of ``n`` points in ``d`` dimensions into ``k`` centroids.

    ``points`` is ``(B, n, d)`` (product quantization: ``B`` sub-spaces, the ``n`` rows' sub-vectors
    in each). Lloyd's algorithm from a k-means++ seeding (Arthur and Vassilvitskii 2007), every set at
    once. Distances are exact differences in float64, not the ``|x|^2 - 2xc + |c|^2`` expansion, and
    the means are float64 sums: so when a set has at most ``k`` distinct points every point becomes
    its own centroid, bit for bit. ``chunk_elements`` bounds the distance tensor of one step.

    Returns ``(centroids, labels)``: ``(B, k, d)`` float32 (a centroid that lost all its members
    keeps its last position; with fewer than ``k`` points the rest repeat the last one, never
    referenced) and ``(B, n)`` int64.

    Example:
        >>> points = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.2]]])
        >>> centroids, labels = kmeans_vectors(points, k=2)
        >>> labels.tolist(), [[round(v, 3) for v in c] for c in centroids[0].tolist()]
        ([[0, 0, 1, 1]], [[0.05, 0.0], [5.0, 5.1]])
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    if points.ndim != 3:
        raise ValueError(f"points of shape {tuple(points.shape)}; expected (sets, points, dims)")
    sets, n, d = points.shape
    x = points.detach().double()
    if n == 0 or sets == 0:
        return torch.zeros(sets, k, d, dtype=torch.float32, device=x.device), torch.zeros(sets, n, dtype=torch.long, device=x.device)
    centroids = _seed_plus_plus(x.cpu(), min(k, n), seed).to(x.device)
    step = max(1, chunk_elements // (n * centroids.shape[1] * d))
    for _ in range(iters):
        updated = _means(x, _nearest(x, centroids, step), centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    labels = _nearest(x, centroids, step)
    centroids = _means(x, labels, centroids)  # each centroid the mean of its final members, as in 1-D
    out = torch.empty(sets, k, d, dtype=torch.float32, device=x.device)
    out[:, : centroids.shape[1]] = centroids.float()
    out[:, centroids.shape[1] :] = out[:, centroids.shape[1] - 1 : centroids.shape[1]]
    return out, labels


def _seed_plus_plus(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k-means++: each next centroid drawn with probability proportional to the squared distance to the
    nearest one so far (so a point already chosen is never chosen again while others are left)."""
    generator = torch.Generator().manual_seed(seed)
    sets, n, _ = x.shape
    rows = torch.arange(sets)
    chosen = [x[rows, torch.randint(n, (sets,), generator=generator)]]
    closest = (x - chosen[0][:, None]).square().sum(-1)
    for _ in range(1, k):
        total = closest.sum(1, keepdim=True)
        weights = torch.where(total > 0, closest, torch.ones_like(closest))  # all covered: any point
        pick = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        chosen.append(x[rows, pick])
        closest = torch.minimum(closest, (x - chosen[-1][:, None]).square().sum(-1))
    return torch.stack(chosen, 1)


def _nearest(x: torch.Tensor, centroids: torch.Tensor, step: int) -> torch.Tensor:
    return torch.cat([
        (x[i : i + step, :, None] - centroids[i : i + step, None]).square().sum(-1).argmin(-1)
        for i in range(0, x.shape[0], step)
    ])


def _means(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    sets, k, d = centroids.shape
    index = (labels + torch.arange(sets, device=x.device)[:, None] * k).reshape(-1)
    sums = torch.zeros(sets * k, d, dtype=torch.float64, device=x.device).index_add_(0, index, x.reshape(-1, d))
    counts = torch.bincount(index, minlength=sets * k).reshape(sets, k, 1)
    return torch.where(counts > 0, sums.reshape(sets, k, d) / counts.clamp(min=1), centroids)
