"""Lightning callbacks: they decide when a compression method runs, log it and checkpoint its state."""

from .pruning import IterativePruning
from .quantization import QuantizationAwareTraining
from .report import CompressionReport
from .decomposition import TensorDecomposition
from .sharing import WeightSharing

__all__ = ["CompressionReport", "IterativePruning", "QuantizationAwareTraining", "TensorDecomposition", "WeightSharing"]
