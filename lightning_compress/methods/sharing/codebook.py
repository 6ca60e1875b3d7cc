"""Weight sharing on a layer: a codebook of centroids, one code per weight, gradients tied per centroid.

The layer keeps its ``weight`` Parameter, which always holds exactly ``codebook[code]`` (zero where
``code == -1``, i.e. pruned). Two buffers record the sharing: ``weight_codebook`` (2^bits float32
centroids) and ``weight_code`` (int32, one per weight: DDP broadcasts buffers, and gloo, its CPU
backend, has no int16 collectives). Fine-tuning the centroids (Han et al. 2016: each centroid's
gradient is the sum of its members' gradients, codes fixed) is done on the weight
itself: :func:`tie_gradients` replaces every member's gradient by its cluster's sum, so all members
of a cluster receive the same update from any element-wise optimizer (SGD with momentum, Adam) and
stay equal; :func:`sync_to_codebook` then re-reads the centroids and rewrites the weights, which
also absorbs rounding differences. The optimizer, its Parameter references and DDP are untouched.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..distributed import broadcast_
from .kmeans import kmeans_1d
from .product import remove_product_buffers


def is_shared(module: nn.Module) -> bool:
    """Whether ``module`` carries clustered codes (codes of an unclustered placeholder are all -1)."""
    code = module._buffers.get("weight_code") if hasattr(module, "_buffers") else None
    return code is not None and bool((code >= 0).any())


def add_codebook_buffers(module: nn.Module, bits: int) -> None:
    """Register empty (all -1) sharing buffers, so that a checkpoint's values can load into them."""
    if "weight_code" not in module._buffers:
        module.register_buffer("weight_code", torch.full_like(module.weight, -1, dtype=torch.int32))
        module.register_buffer("weight_codebook", torch.zeros(2**bits, dtype=torch.float32, device=module.weight.device))


def _kept(module: nn.Module) -> torch.Tensor:
    """Positions that take a centroid: the pruning mask when there is one, else the non-zeros."""
    mask = module._buffers.get("weight_mask")
    return mask.bool() if mask is not None else module.weight.detach() != 0


@torch.no_grad()
def share_weights(module: nn.Module, bits: int, init: str = "linear", iters: int = 50, seed: int = 0) -> None:
    """Cluster the layer's kept weights into 2^bits centroids and snap each weight to its centroid."""
    add_codebook_buffers(module, bits)
    if module.weight_codebook.numel() != 2**bits:
        module.weight_codebook = torch.zeros(2**bits, dtype=torch.float32, device=module.weight.device)
    kept = _kept(module)
    centroids, labels = kmeans_1d(module.weight[kept], 2**bits, init=init, iters=iters, seed=seed)
    code = torch.full_like(module.weight, -1, dtype=torch.int32)
    code[kept] = labels.to(torch.int32)
    module.weight_code.copy_(code)
    module.weight_codebook.copy_(centroids)
    write_weights(module)


def write_weights(module: nn.Module) -> None:
    """Each weight := its centroid's value (zero where pruned)."""
    code = module.weight_code
    values = module.weight_codebook.to(module.weight.dtype)[code.long().clamp(min=0)]
    module.weight.copy_(torch.where(code >= 0, values, torch.zeros((), dtype=values.dtype, device=values.device)))


def _cluster_sum(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """Per-centroid sum of ``tensor`` over the cluster's members (pruned entries add nothing).

    Written with fixed shapes (pruned entries add a zero to centroid 0) rather than a boolean index or
    ``bincount``: both size their output from the data, which on a GPU waits for it, once per layer and step.
    """
    code = module.weight_code.long()
    kept = code >= 0
    values = torch.where(kept, tensor.float(), torch.zeros((), device=tensor.device))
    sums = torch.zeros(module.weight_codebook.numel(), dtype=torch.float32, device=tensor.device)
    return sums.index_add_(0, code.clamp(min=0).flatten(), values.flatten())


def _cluster_sizes(module: nn.Module) -> torch.Tensor:
    return _cluster_sum(module, torch.ones_like(module.weight_code, dtype=torch.float32))


@torch.no_grad()
def tie_gradients(module: nn.Module, reduce: str = "sum") -> None:
    """Every member's gradient becomes its cluster's summed (or mean) gradient; pruned entries get none.

    ``"sum"`` is the true gradient of the loss with respect to the centroid (Han et al.); ``"mean"``
    divides it by the cluster size, which keeps SGD's step size independent of how many weights
    share a centroid.
    """
    grad = module.weight.grad
    if grad is None:
        return
    sums = _cluster_sum(module, grad)
    code = module.weight_code.long()
    if reduce == "mean":
        sums = sums / _cluster_sizes(module).clamp(min=1)
    grad.copy_(torch.where(code >= 0, sums.to(grad.dtype)[code.clamp(min=0)], torch.zeros((), dtype=grad.dtype, device=grad.device)))


@torch.no_grad()
def sync_to_codebook(module: nn.Module) -> None:
    """Centroids := mean of their members' current weights; weights := their centroid."""
    counts = _cluster_sizes(module)
    sums = _cluster_sum(module, module.weight.detach())
    module.weight_codebook.copy_(torch.where(counts > 0, sums / counts.clamp(min=1), module.weight_codebook))
    write_weights(module)


def remove_codebook_buffers(module: nn.Module) -> None:
    """Drop the sharing buffers, scalar or product-quantized (:mod:`.product`); the weights already hold
    the shared values."""
    module._buffers.pop("weight_code", None)
    module._buffers.pop("weight_codebook", None)
    remove_product_buffers(module)


def codebook_stats(module: nn.Module) -> dict:
    """What the compression report reads from a shared layer."""
    bits = int(math.log2(module.weight_codebook.numel()))
    kept = int((module.weight_code >= 0).sum())
    return {"bits": bits, "nonzeros": kept, "note": f"shared, {module.weight_codebook.numel()} centroids"}


@torch.no_grad()
def broadcast_codebooks(modules) -> None:
    """Rank 0's codes and codebooks on every process (k-means is deterministic; this rules out device
    ties), and the weights rewritten from them. No-op outside torch.distributed."""
    for module in modules:
        broadcast_(module.weight_code)
        broadcast_(module.weight_codebook)
        write_weights(module)
