"""What a model costs: parameters, non-zeros, bits per weight, bytes and MACs, per layer and in total.

The report reads module state only, never a callback's memory, so it describes a model however it
got there (a checkpoint loaded in a fresh process included). A compression method makes itself
visible to it in one of two ways:

* buffers and attributes on the layer: ``weight_mask`` (non-zero = kept) and ``weight_bits``
  (bits per stored weight, an int or a 0-d tensor);
* a method ``compression_stats(self) -> dict`` on the layer, returning any of ``nonzeros``, ``bits``,
  ``compressed_bytes``, ``index_bits`` and ``note``, which override what the report would infer.

Shared weights (a codebook) are seen either way they exist: while training, by the buffers
``weight_code`` / ``weight_codebook``; after they were folded into a plain layer, by the weight holding
few distinct non-zero values (at most 2^16, and at most one per 8 non-zeros, which trained fp32
weights never do). Each weight then costs ``ceil(log2(#centroids))`` bits plus one fp32 per centroid.
Product-quantized weights likewise: by ``weight_pq_code`` / ``weight_pq_codebook``, or, folded, by the
column blocks of sub-vectors repeating (:func:`.sharing.product.folded_layout`); a weight costs
``ceil(log2(#centroids)) / subvector_size`` bits plus the codebooks' fp32 sub-vectors.

Bytes: ``dense_bytes`` is every parameter in fp32. ``compressed_bytes`` stores each Conv / Linear weight
at its bits, densely or, when cheaper, as non-zeros each with a relative index of ``index_bits``
(8 for convolutions, 5 for linear layers, as in Deep Compression); other parameters (biases,
normalisation) stay fp32. It is an estimate of the storage format; the packed artifact written by
``save_compressed`` is the measured figure.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .atomic import write_atomic
from .sharing.product import CODEBOOK as PRODUCT_CODEBOOK
from .sharing.product import folded_layout, is_product_shared

_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_INDEX_BITS = {"Linear": 5}  # relative-index bits of sparse storage; convolutions: 8
_DEFAULT_INDEX_BITS = 8


@dataclass
class LayerStats:
    """Cost of one Conv / Linear layer (its weight, bias and anything else it owns)."""

    name: str
    kind: str
    params: int
    nonzeros: int
    bits: float
    dense_bytes: float
    compressed_bytes: float
    macs: int | None = None
    sparse_macs: int | None = None
    note: str = ""

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.params if self.params else 0.0


@dataclass
class CompressionSummary:
    """A per-layer table and totals; ``metrics()`` flattens it for a logger, ``to_json`` writes it."""

    layers: list[LayerStats]
    params: int
    nonzeros: int
    dense_bytes: float
    compressed_bytes: float
    macs: int | None
    sparse_macs: int | None
    input_size: tuple[int, ...] | None
    other_params: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.params if self.params else 0.0

    @property
    def compression_ratio(self) -> float:
        return self.dense_bytes / self.compressed_bytes if self.compressed_bytes else float("inf")

    @property
    def bits_per_weight(self) -> float:
        """Mean bits of the Conv / Linear weights, weighted by their sizes."""
        weights = sum(layer.params for layer in self.layers)
        return sum(layer.bits * layer.params for layer in self.layers) / weights if weights else 32.0

    def metrics(self, prefix: str = "report/", per_layer: bool = False) -> dict[str, float]:
        out = {
            "params": float(self.params),
            "nonzeros": float(self.nonzeros),
            "sparsity": self.sparsity,
            "bits_per_weight": self.bits_per_weight,
            "dense_bytes": float(self.dense_bytes),
            "compressed_bytes": float(self.compressed_bytes),
            "compression_ratio": self.compression_ratio,
        }
        if self.macs is not None:
            out["macs"] = float(self.macs)
            out["sparse_macs"] = float(self.sparse_macs)
        if per_layer:
            for layer in self.layers:
                out[f"sparsity/{layer.name}"] = layer.sparsity
                out[f"bits/{layer.name}"] = float(layer.bits)
        return {prefix + k: v for k, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "layers"}
        data.update(sparsity=self.sparsity, compression_ratio=self.compression_ratio, bits_per_weight=self.bits_per_weight)
        data["layers"] = [dict(asdict(layer), sparsity=layer.sparsity) for layer in self.layers]
        return data

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, json.dumps(self.to_dict(), indent=2))

    def table(self, title: str = "Compression report"):
        """A ``rich.table.Table`` of the layers and the totals."""
        from rich.table import Table

        table = Table(title=title, show_footer=True)
        macs_known = self.macs is not None
        columns = ["layer", "type", "params", "non-zeros", "sparsity", "bits", "fp32 bytes", "compressed bytes"]
        footers = [
            "total",
            f"(+{self.other_params:,} other)" if self.other_params else "",
            f"{self.params:,}",
            f"{self.nonzeros:,}",
            f"{self.sparsity:.1%}",
            f"{self.bits_per_weight:.2f}",
            human_bytes(self.dense_bytes),
            f"{human_bytes(self.compressed_bytes)} ({self.compression_ratio:.1f}x)",
        ]
        if macs_known:
            columns.append("MACs")
            footers.append(f"{self.macs:,}")
        for column, footer in zip(columns, footers):
            table.add_column(column, footer=footer, justify="left" if column in ("layer", "type") else "right")
        for layer in self.layers:
            row = [
                layer.name,
                layer.kind + (f" ({layer.note})" if layer.note else ""),
                f"{layer.params:,}",
                f"{layer.nonzeros:,}",
                f"{layer.sparsity:.1%}",
                f"{layer.bits:g}",
                human_bytes(layer.dense_bytes),
                human_bytes(layer.compressed_bytes),
            ]
            if macs_known:
                row.append(f"{layer.macs:,}" if layer.macs is not None else "-")
            table.add_row(*row)
        return table


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.50 KB"``: sizes for tables."""
    for unit in ("B", "KB", "MB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _codebook_size(module: nn.Module, effective: torch.Tensor, nonzeros: int) -> int | None:
    """Number of shared values of a layer's weight, or None when it is not shared."""
    code = module._buffers.get("weight_code")
    if code is not None and bool((code >= 0).any()):
        return module.weight_codebook.numel()
    if nonzeros < 8 * 2:
        return None
    values = effective[effective != 0]
    distinct = int(torch.unique(values).numel())
    return distinct if distinct <= 2**16 and distinct * 8 <= nonzeros else None


def _product_layout(module: nn.Module, effective: torch.Tensor) -> tuple[int, int] | None:
    """``(subvector_size, centroids)`` of a product-quantized weight, from its buffers or its values."""
    codebook = module._buffers.get(PRODUCT_CODEBOOK)
    if is_product_shared(module) and codebook is not None:
        return int(codebook.shape[2]), int(codebook.shape[1])
    return folded_layout(effective) if effective.ndim > 1 else None


def _weight_stats(name: str, module: nn.Module) -> LayerStats:
    weight = module.weight.detach()
    mask = getattr(module, "weight_mask", None)
    effective = weight if mask is None else weight * (mask != 0).to(weight.dtype)
    kind = type(module).__name__
    nonzeros = int(torch.count_nonzero(effective))
    stats: dict[str, Any] = {
        "nonzeros": nonzeros,
        "bits": _as_float(getattr(module, "weight_bits", 32)),
        "index_bits": _INDEX_BITS.get(kind, _DEFAULT_INDEX_BITS),
        "note": "",
    }
    codebook_bytes = 0.0
    shared = _codebook_size(module, effective, nonzeros) if not hasattr(module, "weight_bits") else None
    if shared is not None:
        stats["bits"] = float(max(1, math.ceil(math.log2(shared))))
        stats["note"] = f"shared, {shared} values"
        codebook_bytes = 4.0 * shared
    # Product quantization has no pruned entries; sub-vectors of a pruned weight repeat for want of values.
    dense = mask is None and nonzeros == weight.numel()
    product = _product_layout(module, effective) if not hasattr(module, "weight_bits") and dense else None
    if product is not None:
        size, centroids = product
        bits = max(1, math.ceil(math.log2(centroids))) / size
        codebooks = 4.0 * centroids * weight[0].numel()  # K x size floats per column block
        if shared is None or bits * weight.numel() / 8 + codebooks < stats["bits"] * weight.numel() / 8 + codebook_bytes:
            stats["bits"] = bits
            stats["note"] = f"product-quantized, {centroids} centroids of {size} per sub-space"
            codebook_bytes = codebooks
    custom = getattr(module, "compression_stats", None)
    if callable(custom):
        stats.update(custom())
    numel = weight.numel()
    others = sum(p.numel() for pname, p in module.named_parameters(recurse=False) if pname != "weight")
    if "compressed_bytes" not in stats:
        dense_bits = numel * stats["bits"]
        sparse_bits = stats["nonzeros"] * (stats["bits"] + stats["index_bits"])
        stats["compressed_bytes"] = min(dense_bits, sparse_bits) / 8 + 4 * others + codebook_bytes
    return LayerStats(
        name=name,
        kind=kind,
        params=numel + others,
        nonzeros=stats["nonzeros"] + others,
        bits=stats["bits"],
        dense_bytes=4.0 * (numel + others),
        compressed_bytes=float(stats["compressed_bytes"]),
        note=stats["note"],
    )


def _count_macs(model: nn.Module, layers: dict[str, LayerStats], input_size: Sequence[int]) -> None:
    """Multiply-accumulates of one image through each Conv / Linear, recorded by forward hooks."""
    modules = dict(model.named_modules())
    handles = []

    def hook(name: str):
        def record(module: nn.Module, inputs, output) -> None:
            per_image = output[0].numel() if output.ndim > 1 else output.numel()
            if isinstance(module, nn.Linear):
                macs = per_image * module.in_features
            else:
                macs = per_image * (module.in_channels // module.groups) * module.weight[0, 0].numel()
            stats = layers[name]
            stats.macs = (stats.macs or 0) + macs
            weight_count = module.weight.numel()
            density = (stats.nonzeros - (stats.params - weight_count)) / weight_count if weight_count else 1.0
            stats.sparse_macs = (stats.sparse_macs or 0) + int(round(macs * density))

        return record

    for name in layers:
        handles.append(modules[name].register_forward_hook(hook(name)))
    was_training = model.training
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    try:
        model.eval()  # eval: a report must not move BatchNorm statistics
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def compression_report(model: nn.Module, input_size: Sequence[int] | None = None) -> CompressionSummary:
    """Size, sparsity, bits and (given ``input_size``) MACs of ``model``, per Conv / Linear layer and in total.

    Args:
        model: any module; its weights are read as they are now (masks and bit widths included).
        input_size: the shape of one input without the batch dimension, e.g. ``(3, 32, 32)``; when
            given, one forward pass in eval mode counts multiply-accumulates per image.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
        >>> report = compression_report(model, input_size=(3, 4, 4))
        >>> report.params, report.macs
        (1514, 4736)
    """
    layers: dict[str, LayerStats] = {}
    counted: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, _WEIGHT_LAYERS) and isinstance(getattr(module, "weight", None), torch.Tensor):
            layers[name] = _weight_stats(name, module)
            counted.update(id(p) for p in module.parameters(recurse=False))
    other = [p for p in model.parameters() if id(p) not in counted]
    other_params = sum(p.numel() for p in other)
    if input_size is not None and layers:
        _count_macs(model, layers, tuple(input_size))
    rows = list(layers.values())
    macs_known = input_size is not None and bool(rows)
    return CompressionSummary(
        layers=rows,
        params=sum(r.params for r in rows) + other_params,
        nonzeros=sum(r.nonzeros for r in rows) + sum(int(torch.count_nonzero(p.detach())) for p in other),
        dense_bytes=sum(r.dense_bytes for r in rows) + 4.0 * other_params,
        compressed_bytes=sum(r.compressed_bytes for r in rows) + 4.0 * other_params,
        macs=sum(r.macs or 0 for r in rows) if macs_known else None,
        sparse_macs=sum(r.sparse_macs or 0 for r in rows) if macs_known else None,
        input_size=tuple(input_size) if input_size is not None else None,
        other_params=other_params,
    )
