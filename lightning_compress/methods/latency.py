"""CPU latency at batch 1 of models (in torch) or files (in ONNX Runtime), measured side by side.

Two models are compared by taking turns, run after run, and reporting medians: on a shared machine
the background load then weighs on both alike, which measuring one after the other does not give.

Example:
    >>> import torch
    >>> from torch import nn
    >>> small, large = nn.Linear(8, 8), nn.Sequential(*(nn.Linear(256, 256) for _ in range(8)))
    >>> times = interleaved_latency({"small": torch_runner(small, torch.randn(1, 8)),
    ...                              "large": torch_runner(large, torch.randn(1, 256))}, repeats=20)
    >>> times["small"] < times["large"]
    True
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn


def torch_runner(model: nn.Module, example: torch.Tensor) -> Callable[[], None]:
    """One forward of ``model`` (on the CPU, in eval mode, without autograd) on ``example``."""
    model = model.cpu().eval()
    example = example.cpu()

    def run() -> None:
        with torch.inference_mode():
            model(example)

    return run


def onnx_runner(path, example: torch.Tensor, threads: int | None = None) -> Callable[[], None]:
    """One run of the ONNX file at ``path`` in ONNX Runtime on ``example``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    # Sessions that take turns with others must not spin their threads between runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: example.cpu().numpy()}
    return lambda: session.run(None, feed)


def interleaved_latency(runners: dict[str, Callable[[], None]], repeats: int = 50, warmup: int = 5) -> dict[str, float]:
    """Median seconds per run of each runner, the runners taking turns (order rotated every round)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
