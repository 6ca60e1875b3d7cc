from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_compress.data import random_crop_flip


def _is_crop_of(out: torch.Tensor, src: torch.Tensor, padding: int) -> bool:
    padded = F.pad(src, (padding,) * 4)
    h, w = src.shape[-2:]
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            if torch.equal(out, crop) or torch.equal(out, crop.flip(-1)):
                return True
    return False


def test_every_output_is_a_padded_crop_possibly_flipped():
    torch.manual_seed(0)
    images = torch.randint(1, 255, (64, 3, 12, 12), dtype=torch.uint8)
    out = random_crop_flip(images, padding=4)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert all(_is_crop_of(o, i, 4) for o, i in zip(out, images))


def test_offsets_and_flips_vary_across_the_batch():
    torch.manual_seed(0)
    images = torch.randint(1, 255, (256, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, padding=2)
    untouched = sum(torch.equal(o, i) for o, i in zip(out, images))
    flipped_only = sum(torch.equal(o, i.flip(-1)) for o, i in zip(out, images))
    # offset (2, 2) and no flip has probability 1/50; both counts must be small but the batch varied
    assert 0 < untouched < 30 and 0 < flipped_only < 30
    assert (out == 0).any()  # some padding came in


def test_no_padding_no_flip_is_identity():
    images = torch.rand(4, 3, 5, 5)
    assert torch.equal(random_crop_flip(images, padding=0, flip=False), images)


def test_rejects_non_batches():
    with pytest.raises(ValueError, match="N, C, H, W"):
        random_crop_flip(torch.zeros(3, 32, 32))
