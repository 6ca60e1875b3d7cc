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


def keep_batch(batch):
    """collate_fn for :class:`TensorBatchDataset`: the batch is already stacked."""
    return batch
