"""A map-style data set over in-memory tensors that hands the DataLoader whole batches.

With ``__getitems__`` the DataLoader fetches a batch with one tensor index instead of N item
lookups and a collate (PyTorch >= 2.0); DDP's ``DistributedSampler`` still works, since this is an
ordinary map-style data set.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class TensorBatchDataset(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.images[idx], self.labels[idx]


class IndexBatchDataset(Dataset):
    """Batches of positions into a data set kept elsewhere (on the device), tagged with its split's name.

    The DataLoader then moves a few kilobytes of indices per batch instead of the images, and the gather
    happens on the device (:class:`~lightning_compress.data.CIFAR10DataModule` with ``device_resident``).
    Samplers, DDP's ``DistributedSampler`` included, see an ordinary map-style data set of the same length,
    so the order of the batches is the one the images themselves would have had.
    """

    def __init__(self, split: str, length: int) -> None:
        self.split = split
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor]:
        return self.split, torch.tensor([index])

    def __getitems__(self, indices: list[int]) -> tuple[str, torch.Tensor]:
        return self.split, torch.as_tensor(indices, dtype=torch.int64)


def keep_batch(batch):
    """collate_fn for :class:`TensorBatchDataset`: the batch is already stacked."""
    return batch
