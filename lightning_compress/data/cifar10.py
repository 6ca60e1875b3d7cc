"""CIFAR-10 as a LightningDataModule: decoded once into a uint8 cache, augmented on the device."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from .augment import normalize, random_crop_flip
from .cifar10_source import CLASSES, default_cache_dir, default_data_dir, load_cifar10, prepare_cifar10
from .sampling import EpochSeededRandomSampler, global_seed
from .tensor_dataset import IndexBatchDataset, TensorBatchDataset, keep_batch

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 from torchvision's download, its ``cifar-10-batches-py`` folder, or the JPEG zip / folder.

    The first run decodes the source into one uint8 tensor file in ``cache_dir``; later runs load that
    file (about a second). Batches travel to the device as uint8 and are cropped (4-px padding),
    flipped and normalised there in ``on_after_batch_transfer``, so the DataLoader does no per-image work.
    A damaged cache file is rebuilt with a warning; a damaged source raises
    :class:`~lightning_compress.data.cifar10_source.DamagedDataError` (a ``ValueError``) naming the file.

    Args:
        data_dir: folder holding the data (see :mod:`lightning_compress.data.cifar10_source`), or the zip
            itself. Default: ``$LIGHTNING_COMPRESS_DATA``, else ``./data``.
        batch_size: training batch size per process.
        eval_batch_size: validation / test batch size (default: ``2 * batch_size``).
        val_size: images held out of the 50,000 training images for validation, chosen by
            ``split_seed``; 0 validates on the test set (the common CIFAR practice; then the
            reported validation accuracy is the test accuracy).
        train_subset / test_subset: keep only this many training / test images (a fixed,
            class-balanced-in-expectation random subset chosen by ``split_seed``): for quick runs.
        split_seed: seed of the split and the subsets; the same on every DDP rank.
        augment: random crop with 4-px padding and horizontal flip on training batches.
        download: let torchvision download the data when no local copy is found.
        cache_dir: where the decoded tensors go. Default: ``$LIGHTNING_COMPRESS_CACHE``, else
            ``~/.cache/lightning_compress``.
        num_workers: DataLoader workers (0 is fastest: a batch is one tensor index).
        device_resident: copy each split to the training device once (CIFAR-10's 50,000 training images
            are 150 MB as uint8) and let the DataLoader hand out batches of indices only: the gather, crop,
            flip and normalisation all run on the device, and the host does no per-batch copy or pinning.
            The batches (order, crops) are the same as without it.

    Shuffling and augmentation are functions of the seed of ``seed_everything``, the epoch and the
    step, so a run resumed from a checkpoint sees the same batches as an uninterrupted one.

    Example (nothing is read until ``prepare_data`` / ``setup``; ``trainer.fit(model, datamodule=dm)`` does it):
        >>> dm = CIFAR10DataModule(data_dir="data", batch_size=256, val_size=0)
        >>> dm.num_classes, dm.input_shape, dm.classes[:3]
        (10, (3, 32, 32), ('airplane', 'automobile', 'bird'))
    """

    num_classes = len(CLASSES)
    input_shape = (3, 32, 32)
    classes = CLASSES

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        train_subset: int | None = None,
        test_subset: int | None = None,
        split_seed: int = 0,
        augment: bool = True,
        download: bool = False,
        cache_dir: str | None = None,
        num_workers: int = 0,
        device_resident: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= val_size < 50_000:
            raise ValueError(f"val_size={val_size} must be in [0, 50000)")
        for name, value in (("train_subset", train_subset), ("test_subset", test_subset)):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be a positive number of images or None")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.val_size = val_size
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.split_seed = split_seed
        self.augment = augment
        self.download = download
        self.num_workers = num_workers
        self.device_resident = device_resident
        self.train_set = self.val_set = self.test_set = None
        self._resident: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node: the only place that decodes and writes.
        prepare_cifar10(self.data_dir, self.cache_dir, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        data = load_cifar10(self.data_dir, self.cache_dir, self.download)
        generator = torch.Generator().manual_seed(self.split_seed)
        order = torch.randperm(len(data.train_labels), generator=generator)
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        if self.train_subset is not None:
            train_idx = train_idx[: self.train_subset]
        test_idx = torch.arange(len(data.test_labels))
        if self.test_subset is not None:
            test_idx = torch.randperm(len(test_idx), generator=generator)[: self.test_subset].sort().values
        self.train_set = TensorBatchDataset(data.train_images[train_idx], data.train_labels[train_idx])
        self.test_set = TensorBatchDataset(data.test_images[test_idx], data.test_labels[test_idx])
        self.val_set = (
            TensorBatchDataset(data.train_images[val_idx], data.train_labels[val_idx]) if self.val_size else self.test_set
        )

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        dataset = getattr(self, f"{split}_set")
        if self.device_resident:
            dataset = IndexBatchDataset(split, len(dataset))
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochSeededRandomSampler(dataset) if shuffle else None,
            drop_last=shuffle and len(dataset) > batch_size,
            collate_fn=keep_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available() and not self.device_resident,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def _gather(self, split: str, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (split, indices.device)
        if key not in self._resident:  # once per split and device
            dataset = getattr(self, f"{split}_set")
            self._resident[key] = (dataset.images.to(indices.device), dataset.labels.to(indices.device))
        images, labels = self._resident[key]
        return images[indices], labels[indices]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch[0], str):  # device_resident: (split, indices)
            batch = self._gather(*batch)
        images, labels = batch
        trainer = self.trainer  # None outside a Trainer
        if self.augment and trainer is not None and trainer.training:
            # Seeded by the step (and rank): a resumed run draws the same crops as an uninterrupted one.
            seed = (global_seed() * 1_000_003 + trainer.global_step) * 64 + trainer.global_rank
            generator = torch.Generator(device=images.device).manual_seed(seed)
            images = random_crop_flip(images, padding=4, generator=generator)
        return normalize(images, CIFAR10_MEAN, CIFAR10_STD), labels
