"""Pure PyTorch compression methods: no Lightning imports, usable from any training loop."""

from .report import CompressionSummary, LayerStats, compression_report

__all__ = ["CompressionSummary", "LayerStats", "compression_report"]
