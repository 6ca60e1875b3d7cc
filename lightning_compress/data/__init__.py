"""Data modules: CIFAR-10 (download, local batches, JPEG zip or folder) and scikit-learn's digits."""

from .augment import random_crop_flip
from .cifar10 import CIFAR10DataModule
from .digits import DigitsDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "random_crop_flip"]
