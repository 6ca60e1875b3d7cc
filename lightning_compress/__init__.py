"""lightning_compress: model compression inside the PyTorch Lightning training loop.

The techniques arrive one by one; what is importable here is what is implemented.
"""

from .callbacks import (
    CompressionReport,
    IterativePruning,
    QuantizationAwareTraining,
    TensorDecomposition,
    WeightSharing,
)
from .data import CIFAR10DataModule, DigitsDataModule
from .methods import compression_report
from .methods.structure import plain_state_dict, restore_structure, restore_structure_on_load
from .methods.sharing.packed import load_compressed, save_compressed
from .models import create_model, list_models
from .module import ImageClassifier

__version__ = "0.1.0"

__all__ = [
    "CIFAR10DataModule",
    "CompressionReport",
    "DigitsDataModule",
    "ImageClassifier",
    "IterativePruning",
    "QuantizationAwareTraining",
    "TensorDecomposition",
    "WeightSharing",
    "compression_report",
    "create_model",
    "list_models",
    "load_compressed",
    "plain_state_dict",
    "restore_structure",
    "restore_structure_on_load",
    "save_compressed",
]
