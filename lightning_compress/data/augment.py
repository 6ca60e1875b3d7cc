"""Batch augmentation on whatever device the batch is on.

Per-image PIL transforms in DataLoader workers are the bottleneck of small-image training on a fast
GPU; the same random crop and flip done as one gather on the whole uint8 batch cost next to nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(
    images: torch.Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop of each image from its zero-padded copy, plus a random horizontal flip.

    The same as torchvision's ``RandomCrop(size, padding)`` followed by ``RandomHorizontalFlip()``
    applied per image, done for the whole batch in a single indexing operation.

    Args:
        images: ``(N, C, H, W)`` batch, any dtype (uint8 is cheapest).
        padding: zero padding on each side; the crop offset is uniform in ``[0, 2 * padding]``.
        flip: mirror each image left-right with probability 1/2.
        generator: source of randomness (on the images' device); default the global RNG.

    Example:
        >>> x = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).view(2, 3, 8, 8)
        >>> random_crop_flip(x, padding=2).shape
        torch.Size([2, 3, 8, 8])
    """
    if images.ndim != 4:
        raise ValueError(f"images must be a (N, C, H, W) batch, got shape {tuple(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding={padding} must be >= 0")
    n, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    rows = dy + torch.arange(h, device=device)  # (N, H)
    cols = torch.arange(w, device=device).expand(n, w)
    if flip:
        mirrored = torch.rand(n, 1, device=device, generator=generator) < 0.5
        cols = torch.where(mirrored, cols.flip(1), cols)
    cols = dx + cols  # (N, W)
    batch = torch.arange(n, device=device)[:, None, None]
    # Advanced indexing on dims 0, 2, 3 with a slice on dim 1 puts the channel dim last.
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` in [0, 255] -> float32, standardised per channel."""
    mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float().div_(255.0) - mean_t) / std_t
