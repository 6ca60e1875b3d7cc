"""The pictures of a compression report: bytes per layer, and where the run moved on accuracy and size.

Drawn with matplotlib when it is installed (the ``dev`` extra has it); without it nothing is drawn and
the callers say so. Files are written whole or not at all (a temporary file, then a rename).
"""

from __future__ import annotations

from pathlib import Path

from .atomic import write_atomic
from .report import CompressionSummary, human_bytes


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display, and no clash with a notebook's backend choice
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda file: figure.savefig(file, dpi=120, bbox_inches="tight", format="png"))


def layers_chart(summary: CompressionSummary, path: str | Path, title: str = "Bytes per layer") -> Path | None:
    """A bar per Conv / Linear layer: its fp32 bytes and its compressed bytes (log scale), with the bits
    and density written on it. None when matplotlib is missing."""
    plt = _pyplot()
    if plt is None or not summary.layers:
        return None
    layers = summary.layers
    figure, axes = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 2), 4.2))
    x = range(len(layers))
    axes.bar([i - 0.2 for i in x], [layer.dense_bytes for layer in layers], width=0.4, label="fp32", color="#bbbbbb")
    axes.bar([i + 0.2 for i in x], [layer.compressed_bytes for layer in layers], width=0.4, label="compressed",
             color="#3070b0")
    for i, layer in zip(x, layers):
        density = layer.nonzeros / layer.params if layer.params else 1.0
        axes.annotate(f"{layer.bits:g}b\n{density:.0%}", (i + 0.2, layer.compressed_bytes), fontsize=6,
                      ha="center", va="bottom")
    axes.set_yscale("log")
    axes.set_xticks(list(x), [layer.name for layer in layers], rotation=60, ha="right", fontsize=7)
    axes.set_ylabel("bytes")
    axes.set_title(f"{title}: {human_bytes(summary.dense_bytes)} -> {human_bytes(summary.compressed_bytes)} "
                   f"({summary.compression_ratio:.1f}x)")
    axes.legend(fontsize=8)
    try:
        return _save(figure, Path(path))
    finally:
        plt.close(figure)


def frontier_chart(points: dict[str, tuple[float, float]], metric: str, path: str | Path) -> Path | None:
    """``points``: name -> (bytes, metric value), e.g. before and after; an arrow from the first to the
    last. None when matplotlib is missing."""
    plt = _pyplot()
    if plt is None or not points:
        return None
    figure, axes = plt.subplots(figsize=(5.5, 4.0))
    names = list(points)
    for name in names:
        size, value = points[name]
        axes.scatter([size], [value], s=40, zorder=3)
        axes.annotate(f"{name}\n{human_bytes(size)}, {value:.4g}", (size, value), fontsize=8, xytext=(6, 6),
                      textcoords="offset points")
    if len(names) > 1:
        (x0, y0), (x1, y1) = points[names[0]], points[names[-1]]
        axes.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": "#555555"})
    axes.set_xscale("log")
    axes.set_xlabel("bytes")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} against size")
    axes.grid(alpha=0.3)
    try:
        return _save(figure, Path(path))
    finally:
        plt.close(figure)
