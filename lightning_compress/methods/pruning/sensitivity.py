"""Pruning sensitivity analysis (Han et al., 2015): how much accuracy each layer loses when pruned alone.

Each prunable layer in turn has the smallest-magnitude fraction of its weight set to zero, at every
level of a sweep (0.1 .. 0.95 by default), the model is evaluated, and the weight is restored. The
result is one accuracy curve per layer. Layers whose curve stays flat can be pruned hard; layers
whose curve drops early (often the first convolution and the classifier) should be pruned lightly.
:meth:`SensitivityResult.sparsity_for` turns the curves into per-layer sparsities, keyed by layer name,
in the ``{layer_glob: sparsity}`` form a pruning callback accepts.

Pure PyTorch: the evaluation is a callable, so any loop or metric can drive it.
"""

from __future__ import annotations

import fnmatch
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from ..atomic import write_atomic

DEFAULT_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)

# Accuracies are ratios such as 0.49 that arithmetic like 0.5 - 0.01 misses by one ulp; a level that
# meets the threshold on paper must not fail it on rounding.
_TOLERANCE = 1e-9


@dataclass
class SensitivityResult:
    """The outcome of :func:`sensitivity_analysis`.

    Attributes:
        baseline: the metric of the unpruned model.
        levels: the sparsities tried, ascending.
        curves: layer name -> the metric at each of ``levels``.
        params: layer name -> number of weights in the layer (to weigh where pruning pays).
    """

    baseline: float
    levels: list[float]
    curves: dict[str, list[float]]
    params: dict[str, int]

    def sparsity_for(self, max_drop: float) -> dict[str, float]:
        """Per layer, the largest level L such that the metric at every level <= L is >= baseline - max_drop.

        A layer whose curve dips below the threshold and recovers at a higher level keeps the level
        before the dip: the recovery is evaluation noise, not a safe sparsity. A layer that fails at
        the lowest level gets 0.0. The keys are exact layer names, which are valid globs.
        """
        if not max_drop >= 0:
            raise ValueError(f"max_drop={max_drop} must be >= 0 (a drop in the metric, e.g. 0.01 for one point)")
        threshold = self.baseline - max_drop - _TOLERANCE
        sparsity = {}
        for layer, curve in self.curves.items():
            chosen = 0.0
            for level, metric in sorted(zip(self.levels, curve)):
                if metric < threshold:
                    break
                chosen = level
            sparsity[layer] = chosen
        return sparsity

    def to_json(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> SensitivityResult:
        data = json.loads(Path(path).read_text())
        return cls(
            baseline=float(data["baseline"]),
            levels=[float(v) for v in data["levels"]],
            curves={k: [float(v) for v in curve] for k, curve in data["curves"].items()},
            params={k: int(v) for k, v in data["params"].items()},
        )

    def plot(self, path: str | Path, title: str = "Pruning sensitivity", metric: str = "metric") -> None:
        """Write the curves as an image (one line per layer, dashed baseline); needs matplotlib.

        ``metric`` labels the y axis; the format follows the suffix of ``path`` (``.png``, ``.pdf``, ...).
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError(
                "SensitivityResult.plot needs matplotlib: pip install matplotlib (or the 'dev' extra)"
            ) from error

        # A bare Figure on an Agg canvas: no pyplot, so no global backend switch and no open windows.
        figure = Figure(figsize=(8, 5), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for layer, curve in self.curves.items():
            axes.plot(self.levels, curve, marker="o", markersize=3, label=layer)
        axes.axhline(self.baseline, color="black", linestyle="--", linewidth=1, label="baseline")
        axes.set_xlabel("sparsity of the layer (fraction of weights pruned)")
        axes.set_ylabel(metric)
        axes.set_title(title)
        axes.grid(alpha=0.3)
        # Deep networks have dozens of layers: a second legend column keeps the legend within the figure.
        axes.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=1 + len(self.curves) // 25)
        # savefig on a file object takes the format from the argument, not from the name.
        image_format = Path(path).suffix.lstrip(".") or None
        write_atomic(path, lambda file: figure.savefig(file, format=image_format, dpi=120))


def sensitivity_analysis(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    levels: Sequence[float] = DEFAULT_LEVELS,
    targets: list[str] | None = None,
    progress: bool = True,
) -> SensitivityResult:
    """Prune each layer alone by weight magnitude at each level, evaluate, and restore it.

    Args:
        model: the network; left exactly as it was (weights bit for bit, train/eval mode), also
            when ``evaluate`` raises.
        evaluate: returns the metric of the model it is given, higher is better (top-1 accuracy,
            say). It should not change the model: evaluate in eval mode under ``torch.no_grad``.
        levels: sparsities in [0, 1) to try; sorted and de-duplicated.
        targets: fnmatch globs over ``model.named_modules()`` names choosing the layers; default
            every ``nn.Conv2d`` and ``nn.Linear`` (subclasses included). Only such layers can match,
            and each glob must match at least one.
        progress: show a progress bar.

    At level ``s`` exactly ``round(s * numel)`` weights of the layer become zero, the smallest in
    absolute value (ties broken arbitrarily), so the sparsity is the one asked for even when many
    weights are equal.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(64, 4)
        >>> y = model(x).argmax(1)  # labels the unpruned model gets all right
        >>> def accuracy(m):
        ...     with torch.no_grad():
        ...         return (m(x).argmax(1) == y).float().mean().item()
        >>> result = sensitivity_analysis(model, accuracy, levels=[0.25, 0.5], progress=False)
        >>> result.baseline, result.levels, list(result.curves)
        (1.0, [0.25, 0.5], ['0', '2'])
        >>> sparsity = result.sparsity_for(max_drop=0.05)  # {'0': ..., '2': ...}, ready for a callback
    """
    levels = _check_levels(levels)
    layers = _select_layers(model, targets)
    modes = {module: module.training for module in model.modules()}
    curves: dict[str, list[float]] = {}
    try:
        with _progress_bar(progress) as bar:
            task = bar.add_task("baseline", total=1 + len(layers) * len(levels))
            baseline = float(evaluate(model))
            bar.advance(task)
            for name, layer in layers.items():
                bar.update(task, description=name)
                curves[name] = []
                for level in levels:
                    with _pruned(layer.weight, level):
                        curves[name].append(float(evaluate(model)))
                    bar.advance(task)
    finally:
        for module, training in modes.items():
            module.training = training
    params = {name: layer.weight.numel() for name, layer in layers.items()}
    return SensitivityResult(baseline=baseline, levels=levels, curves=curves, params=params)


def _check_levels(levels: Sequence[float]) -> list[float]:
    levels = sorted({float(level) for level in levels})
    if not levels:
        raise ValueError("levels=[] is empty; give at least one sparsity in [0, 1), e.g. 0.5")
    bad = [level for level in levels if not 0 <= level < 1]
    if bad:
        raise ValueError(f"levels={levels}: {bad} outside [0, 1); a sparsity is the fraction of weights pruned")
    return levels


def _select_layers(model: nn.Module, targets: list[str] | None) -> dict[str, nn.Module]:
    prunable = {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
    if not prunable:
        raise ValueError(f"model={type(model).__name__} has no nn.Conv2d or nn.Linear layer to prune")
    if targets is None:
        return prunable
    if isinstance(targets, str):
        raise ValueError(f"targets={targets!r} must be a list of globs, e.g. [{targets!r}]")
    # A glob that matches nothing is a typo more often than not: fail rather than skip its layers.
    unmatched = [glob for glob in targets if not any(fnmatch.fnmatchcase(name, glob) for name in prunable)]
    if unmatched:
        names = list(prunable)
        shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
        raise ValueError(f"targets={list(targets)}: {unmatched} match no nn.Conv2d / nn.Linear layer; available: {shown}")
    return {name: m for name, m in prunable.items() if any(fnmatch.fnmatchcase(name, glob) for glob in targets)}


@contextmanager
def _pruned(weight: torch.Tensor, level: float) -> Iterator[None]:
    """The weight with its ``round(level * numel)`` smallest |values| zeroed, restored bit for bit on exit."""
    original = weight.detach().clone()
    count = round(level * weight.numel())
    try:
        with torch.no_grad():
            if count:
                # flatten() reads in logical order whatever the memory format, so the mask lines up
                # with the weight's shape even for a channels_last weight.
                smallest = weight.detach().abs().flatten().topk(count, largest=False).indices
                mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
                mask[smallest] = True
                weight.masked_fill_(mask.view(weight.shape), 0)
        yield
    finally:
        with torch.no_grad():
            weight.copy_(original)


def _progress_bar(enabled: bool) -> Progress:
    # A disabled rich Progress accepts the same calls and draws nothing. Only on a terminal, as the
    # callbacks' bars: in a log a bar is a line of noise.
    return Progress(
        TextColumn("sensitivity [bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled or not Console().is_terminal,
    )
