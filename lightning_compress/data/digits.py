"""The 8x8 handwritten digits that ship inside scikit-learn: a data set that needs no download."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from .sampling import EpochSeededRandomSampler
from .tensor_dataset import TensorBatchDataset, keep_batch


class DigitsDataModule(pl.LightningDataModule):
    """1,797 grey 8x8 digit images (scikit-learn's ``load_digits``), split train / val / test by ``split_seed``.

    Args:
        batch_size: training batch size.
        val_fraction / test_fraction: shares of the 1,797 images held out.
        split_seed: seed of the split.

    Example:
        >>> dm = DigitsDataModule(batch_size=64)
        >>> dm.setup()
        >>> len(dm.train_set), len(dm.val_set), len(dm.test_set)
        (1257, 270, 270)
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self, batch_size: int = 64, val_fraction: float = 0.15, test_fraction: float = 0.15, split_seed: int = 0
    ) -> None:
        super().__init__()
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < value < 0.5:
                raise ValueError(f"{name}={value} must be in (0, 0.5)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.train_set = self.val_set = self.test_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are 0..16; centre them so the first layer sees zero-mean inputs.
        images = (torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0 - 0.5) / 0.5
        labels = torch.from_numpy(digits.target).long()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
        n_val, n_test = round(self.val_fraction * len(labels)), round(self.test_fraction * len(labels))
        val_idx, test_idx, train_idx = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
        self.train_set = TensorBatchDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorBatchDataset(images[val_idx], labels[val_idx])
        self.test_set = TensorBatchDataset(images[test_idx], labels[test_idx])

    def _loader(self, dataset: TensorBatchDataset, shuffle: bool) -> DataLoader:
        sampler = EpochSeededRandomSampler(dataset) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=keep_batch)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
