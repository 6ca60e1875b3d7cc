"""Product quantization of a layer's weight (Gong et al. 2014), with centroid fine-tuning.

The weight is seen as a matrix of rows (a Linear's ``(out, in)``; a convolution's kernel as
``(out, in * kh * kw)``, in its memory order), and each row is cut into sub-vectors of
``subvector_size`` consecutive entries. The sub-vectors in one column block form a sub-space: k-means
(:func:`.kmeans.kmeans_vectors`) finds ``2**bits`` centroids per sub-space (at most one per row), and
each sub-vector is replaced by its nearest centroid. A layer stores a small integer per sub-vector
instead of ``subvector_size`` floats, plus one codebook per sub-space.

As with the scalar codebooks of :mod:`.codebook`, the layer keeps its ``weight`` Parameter, which
always holds exactly the centroids its codes name. Two buffers record the sharing:
``weight_pq_code`` (int32, ``(rows, blocks)``, -1 before clustering) and ``weight_pq_codebook``
(float32, ``(blocks, K, subvector_size)``, ``K = min(2**bits, rows)``); both shapes follow from
the layer's shape and the arguments alone, so they are registered before a checkpoint loads.
Fine-tuning: :func:`tie_gradients` gives every sub-vector the summed (or mean) gradient of the
sub-vectors that share its centroid, the gradient of that centroid, so that any element-wise
optimizer moves them together; :func:`sync_to_codebook` then re-reads the centroids as their
members' means and rewrites the weight.

Pruned weights have no place here: a sub-vector with some entries pruned has no centroid to take.
A layer with a pruning mask is refused (:func:`unsupported`); scalar sharing keeps pruned zeros.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> layer = nn.Linear(16, 64)
    >>> share_product(layer, bits=3, subvector_size=4)  # 4 sub-spaces, 8 centroids each
    >>> tuple(layer.weight_pq_code.shape), tuple(layer.weight_pq_codebook.shape)
    ((64, 4), (4, 8, 4))
    >>> torch.equal(layer.weight, reconstruct(layer))  # the weight holds its centroids exactly
    True
    >>> layer(torch.randn(2, 16)).sum().backward()
    >>> tie_gradients(layer)  # every member of a centroid now has that centroid's gradient
    >>> sync_to_codebook(layer)
    >>> int(layer.weight[:, :4].unique(dim=0).shape[0]) <= 8
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..distributed import broadcast_
from .kmeans import kmeans_vectors

CODE = "weight_pq_code"
CODEBOOK = "weight_pq_codebook"


def row_length(module: nn.Module) -> int:
    """Entries per row of the weight seen as a matrix: ``in`` (Linear), ``in * kh * kw`` (conv)."""
    weight = module.weight
    return math.prod(weight.shape[1:]) if weight.ndim > 1 else 1


def divisors(n: int) -> list[int]:
    """The sub-vector sizes that cut a row of ``n`` entries evenly."""
    return [d for d in range(1, n + 1) if n % d == 0]


def unsupported(module: nn.Module, subvector_size: int) -> str | None:
    """Why product quantization with ``subvector_size`` cannot apply to the layer, or None."""
    if "weight_mask" in module._buffers:
        return ("it carries a pruning mask, and a sub-vector with pruned entries has no centroid to take; "
                "use method='kmeans', which keeps pruned weights at zero")
    length = row_length(module)
    if length % subvector_size:
        shown = divisors(length)
        listed = ", ".join(map(str, shown[:12])) + (", ..." if len(shown) > 12 else "")
        return f"its rows hold {length} weights, which subvector_size={subvector_size} does not divide (valid: {listed})"
    return None


def _check(module: nn.Module, subvector_size: int) -> None:
    if isinstance(subvector_size, bool) or not isinstance(subvector_size, int) or subvector_size < 1:
        raise ValueError(f"subvector_size={subvector_size!r} must be an integer >= 1")
    reason = unsupported(module, subvector_size)
    if reason is not None:
        raise ValueError(f"product quantization of a {type(module).__name__}: {reason}")


def codebook_shape(module: nn.Module, bits: int, subvector_size: int) -> tuple[int, int, int]:
    """``(blocks, K, subvector_size)``: one codebook per column block, at most one centroid per row."""
    rows = module.weight.shape[0]
    return row_length(module) // subvector_size, max(1, min(2**bits, rows)), subvector_size


def add_product_buffers(module: nn.Module, bits: int, subvector_size: int) -> None:
    """Register placeholder buffers (codes -1) of the shapes the arguments imply, so that a checkpoint's
    values load into them; buffers of other shapes are replaced. Idempotent."""
    _check(module, subvector_size)
    weight = module.weight
    blocks, k, d = codebook_shape(module, bits, subvector_size)
    code, codebook = module._buffers.get(CODE), module._buffers.get(CODEBOOK)
    if code is None or tuple(code.shape) != (weight.shape[0], blocks):
        module.register_buffer(CODE, torch.full((weight.shape[0], blocks), -1, dtype=torch.int32, device=weight.device))
    if codebook is None or tuple(codebook.shape) != (blocks, k, d):
        module.register_buffer(CODEBOOK, torch.zeros(blocks, k, d, dtype=torch.float32, device=weight.device))
    if not any(getattr(hook, "hook", hook) is _keep_own_buffers for hook in module._load_state_dict_pre_hooks.values()):
        module.register_load_state_dict_pre_hook(_keep_own_buffers)


@torch.no_grad()
def folded_layout(weight: torch.Tensor, max_subvector_size: int = 16) -> tuple[int, int] | None:
    """``(subvector_size, centroids)`` of a product-quantized weight that was folded into a plain layer
    (its buffers dropped at fit end), read off the weight alone: among the sub-vector lengths whose
    column blocks each hold at most one distinct sub-vector per two rows (trained fp32 weights never
    repeat so), the one whose codes and codebooks take the fewest bits; ``centroids`` is the most distinct
    sub-vectors of any block. None when no length repeats so.

    Example:
        >>> layer = nn.Linear(16, 64)
        >>> share_product(layer, bits=3, subvector_size=4)
        >>> remove_product_buffers(layer)
        >>> folded_layout(layer.weight)
        (4, 8)
        >>> folded_layout(nn.Linear(16, 64).weight) is None
        True
    """
    matrix = weight.detach().reshape(weight.shape[0], -1)
    rows, length = matrix.shape
    best = None
    for size in divisors(length):
        if not 2 <= size <= max_subvector_size:
            continue
        blocks = matrix.reshape(rows, length // size, size)
        if 2 * torch.unique(blocks[:, 0], dim=0).shape[0] > rows:  # the usual case, decided by one block
            continue
        centroids = max(torch.unique(blocks[:, b], dim=0).shape[0] for b in range(blocks.shape[1]))
        if 2 * centroids > rows:
            continue
        bits = rows * (length // size) * max(1, math.ceil(math.log2(centroids))) + 32 * centroids * length
        if best is None or bits < best[0]:
            best = (bits, size, centroids)
    return None if best is None else best[1:]


def _keep_own_buffers(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """A state dict written without the sharing buffers (after fit end dropped them) keeps the layer's own,
    as :func:`..structure.restore_structure` does for the scalar codebooks."""
    for name in (CODE, CODEBOOK):
        buffer = module._buffers.get(name)
        if buffer is not None and prefix + name not in state_dict and prefix + "weight" in state_dict:
            state_dict[prefix + name] = buffer


def is_product_shared(module: nn.Module) -> bool:
    """Whether the layer carries clustered product codes (a placeholder's are all -1)."""
    code = module._buffers.get(CODE) if hasattr(module, "_buffers") else None
    return code is not None and bool((code >= 0).any())


def _subvectors(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``(rows, blocks, subvector_size)`` view of a weight-shaped tensor."""
    rows, blocks = module._buffers[CODE].shape
    return tensor.reshape(rows, blocks, -1)


@torch.no_grad()
def share_product(module: nn.Module, bits: int, subvector_size: int, iters: int = 50, seed: int = 0) -> None:
    """Cluster each sub-space's sub-vectors into ``min(2**bits, rows)`` centroids; snap the weight to them."""
    add_product_buffers(module, bits, subvector_size)
    points = _subvectors(module, module.weight.detach()).transpose(0, 1)  # (blocks, rows, d)
    k = module._buffers[CODEBOOK].shape[1]
    centroids, labels = kmeans_vectors(points, k, iters=iters, seed=seed)
    module._buffers[CODE].copy_(labels.t())
    module._buffers[CODEBOOK].copy_(centroids)
    write_weights(module)


def reconstruct(module: nn.Module) -> torch.Tensor:
    """The weight the codes and codebooks describe (the weight's dtype and shape)."""
    code, codebook = module._buffers[CODE].long(), module._buffers[CODEBOOK]
    blocks = torch.arange(code.shape[1], device=code.device)
    values = codebook[blocks[None, :], code.clamp(min=0)]  # (rows, blocks, d)
    return values.to(module.weight.dtype).reshape(module.weight.shape)


@torch.no_grad()
def write_weights(module: nn.Module) -> None:
    """Each sub-vector := its centroid."""
    module.weight.copy_(reconstruct(module))


def _centroid_index(module: nn.Module) -> torch.Tensor:
    """Row of each sub-vector's centroid in the codebook flattened to ``(blocks * K, d)``."""
    code = module._buffers[CODE].long()
    k = module._buffers[CODEBOOK].shape[1]
    return code + torch.arange(code.shape[1], device=code.device)[None, :] * k


def _centroid_sums(module: nn.Module, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per centroid: the sum of its members' sub-vectors of ``tensor`` (float64) and their count."""
    index = _centroid_index(module).reshape(-1)
    blocks, k, d = module._buffers[CODEBOOK].shape
    sums = torch.zeros(blocks * k, d, dtype=torch.float64, device=tensor.device)
    sums.index_add_(0, index, _subvectors(module, tensor).reshape(-1, d).double())
    # not bincount: on a GPU it reads the largest index back to size its output, a wait every step
    counts = torch.zeros(blocks * k, dtype=torch.long, device=index.device).index_add_(
        0, index, torch.ones_like(index))[:, None]
    return index, sums, counts


@torch.no_grad()
def tie_gradients(module: nn.Module, reduce: str = "sum") -> None:
    """Every sub-vector's gradient becomes its centroid's: the sum (Gong et al.'s fine-tuning, the true
    gradient of the centroid) or the mean of its members' gradients."""
    grad = module.weight.grad
    if grad is None:
        return
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce={reduce!r} is not known; valid: 'sum', 'mean'")
    index, sums, counts = _centroid_sums(module, grad)
    if reduce == "mean":
        sums = sums / counts.clamp(min=1)
    grad.copy_(sums[index].to(grad.dtype).reshape(grad.shape))


@torch.no_grad()
def sync_to_codebook(module: nn.Module) -> None:
    """Centroids := the mean of their members' current sub-vectors; the weight := its centroids."""
    _, sums, counts = _centroid_sums(module, module.weight.detach())
    codebook = module._buffers[CODEBOOK]
    means = (sums / counts.clamp(min=1)).float().reshape(codebook.shape)
    codebook.copy_(torch.where(counts.reshape(*codebook.shape[:2], 1) > 0, means, codebook))
    write_weights(module)


def remove_product_buffers(module: nn.Module) -> None:
    """Drop the product-quantization buffers; the weight already holds its centroids."""
    module._buffers.pop(CODE, None)
    module._buffers.pop(CODEBOOK, None)


@torch.no_grad()
def broadcast_product(modules) -> None:
    """Rank 0's codes and codebooks on every process and the weights rewritten from them (no-op outside
    torch.distributed)."""
    for module in modules:
        broadcast_(module._buffers[CODE])
        broadcast_(module._buffers[CODEBOOK])
        write_weights(module)
