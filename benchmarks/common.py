"""What the benchmarks share: the machine description, result files, latency measurement, the CPU
proxy protocol, the ONNX helpers and the peers (the other libraries' ways of doing what we do).

A benchmark module imports from here and from ``lightning_compress``, never from another benchmark,
so that each can change, or be deleted, alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_compress import CIFAR10DataModule, ImageClassifier

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parents[1] / "README.md"


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's argument parser, named as it is invoked: ``python -m benchmarks NAME``."""
    return argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


# ---------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    # platform.processor() is empty or just the architecture on Linux; /proc/cpuinfo names the part
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """What a result was measured on; every result file holds it under ``"machine"``. Call it after
    ``torch.set_num_threads``: the thread count is the one the measurement used."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": _version("onnxruntime"),
            "cpu": _cpu_model(), "arch": platform.machine(), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ----------------------------------------------------------------------------------- result files


def result_path(name: str | Path) -> Path:
    """A bare file name lives in ``benchmarks/results/``; a path is taken as given."""
    path = Path(name)
    return RESULTS / path if path.parent == Path(".") else path


def read_result(name: str | Path) -> dict | None:
    """A results JSON as written, or None when absent. Files written before ``"machine"`` existed
    describe it as ``"device"`` (a string) instead; nothing here requires either."""
    path = result_path(name)
    return json.loads(path.read_text()) if path.is_file() else None


def write_result(name: str | Path, data: dict, indent: int = 2) -> Path:
    """Write a results JSON atomically: a run killed mid-write leaves the previous file whole, which
    matters for the files that are rewritten row by row (recipes, decomposition-vgg19)."""
    path = result_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=indent) + "\n")
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would otherwise become the result's mode
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------- latency


def median_seconds(runners: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each runner. The runners take turns call by call, so drift in the
    machine's speed (two shared cores) hits them alike; the first ``warmup`` rounds are not timed."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def model_latency(model: nn.Module, batch: int, repeats: int) -> float:
    """Median CPU inference seconds of a CIFAR-shaped model at a batch size."""
    x = torch.randn(batch, 3, 32, 32)
    return median_seconds({"model": lambda: model(x)}, repeats)["model"]


class StepTimer(pl.Callback):
    """Wall time from the first hook of a training batch to the last (put it first in the list)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


def sync_device() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class EpochTimer(pl.Callback):
    """Wall seconds of each epoch's training steps (the device synchronized at both ends), without the
    validation and checkpointing that Lightning runs before ``on_train_epoch_end``."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sync_device()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == trainer.num_training_batches - 1:  # the epoch's last step
            sync_device()
            self.seconds.append(time.perf_counter() - self._start)


# ------------------------------------------------------------------------------ the proxy protocol

CHECKPOINT = Path("checkpoints/proxy/baseline.ckpt")
# The fixed protocol: change it and every earlier proxy figure stops being comparable.
TRAIN_IMAGES = 10_000
TEST_IMAGES = 2_000
BATCH_SIZE = 128
EPOCHS = 15
LR = 0.05


def proxy_datamodule(data_dir: str | None = None, batch_size: int = BATCH_SIZE) -> CIFAR10DataModule:
    # val_size 0: validation is the fixed 2,000-image test subset, so every epoch reports the figure.
    return CIFAR10DataModule(
        data_dir, batch_size=batch_size, val_size=0, train_subset=TRAIN_IMAGES, test_subset=TEST_IMAGES, split_seed=0
    )


def proxy_module(weights: str | None = None, lr: float = LR) -> ImageClassifier:
    return ImageClassifier("vgg_proxy", optimizer="sgd", lr=lr, weight_decay=5e-4, scheduler="cosine", weights=weights)


def proxy_trainer(max_epochs: int = EPOCHS, callbacks: list | None = None, **kwargs) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=callbacks or [],
                      enable_model_summary=False, deterministic=True, **kwargs)


def proxy_baseline(lr: float = LR) -> ImageClassifier:
    """The trained proxy model every proxy benchmark starts from (``python -m benchmarks proxy``)."""
    if not CHECKPOINT.is_file():
        raise SystemExit(f"{CHECKPOINT} is missing: run `python -m benchmarks proxy` first")
    return proxy_module(weights=str(CHECKPOINT), lr=lr)


def proxy_test(module: pl.LightningModule, datamodule: CIFAR10DataModule) -> float:
    return proxy_trainer(1, enable_progress_bar=False).test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]


def sparsity(model: nn.Module) -> float:
    """Fraction of Conv / Linear weights that are zero (biases and BatchNorm not counted)."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return 1 - sum(int(torch.count_nonzero(w)) for w in weights) / sum(w.numel() for w in weights)


# ------------------------------------------------------------------------------------------- ONNX


def export_fp32(model: nn.Module, path: Path) -> None:
    """The fp32 ONNX file ONNX Runtime serves a non-int8 model from: input ``input``, dynamic batch."""
    model = copy.deepcopy(model).float().eval().to(memory_format=torch.contiguous_format)
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)


def ort_session(path: Path, threads: int, spinning: bool = True, exact: bool = False):
    """``spinning=False`` for sessions that take turns with torch: ONNX Runtime's threads otherwise
    busy-wait after each run and starve whatever runs next on the same cores. ``exact``: ONNX Runtime's
    u8 x s8 kernels on x86 CPUs without VNNI add pairs of products in 16 bits and saturate;
    ``session.x64quantprecision`` runs the arithmetic the file describes, as VNNI and Arm CPUs do anyway."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if exact:
        options.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------ peers


def cubic(step_fraction: float, final: float) -> float:
    return final * (1.0 - (1.0 - min(1.0, step_fraction)) ** 3)


def model_pruning(model: nn.Module, final: float, ramp_epochs: int):
    """Lightning's ModelPruning along the cubic ramp: at the end of epoch e the sparsity is s(e + 1).

    torch.nn.utils.prune's ``amount`` is a fraction of the weights still unpruned, so each epoch's
    amount is the share of the survivors that must go to reach the next point of the ramp.
    """
    from lightning.pytorch.callbacks import ModelPruning

    def amount(epoch: int) -> float:
        before = cubic(epoch / ramp_epochs, final)
        after = cubic((epoch + 1) / ramp_epochs, final)
        return max(0.0, (after - before) / (1.0 - before))

    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return ModelPruning("l1_unstructured", parameters_to_prune=layers, amount=amount, use_global_unstructured=True,
                        use_lottery_ticket_hypothesis=False, make_pruning_permanent=True, verbose=0)


def fx_qat(model: nn.Module) -> nn.Module:
    """torch.ao FX graph-mode QAT with the default x86 QAT qconfig."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    model.train()
    return prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), (torch.randn(2, 3, 32, 32),))


def _tucker_layers(model: nn.Module, energy: float):
    """The peer's layers (every KxK, ungrouped convolution) with their per-mode energy ranks."""
    from lightning_compress.methods.decomposition.ranks import energy_rank, spectrum

    for name, layer in list(model.named_modules()):
        if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1) and layer.groups == 1:
            w = layer.weight.detach()
            r_out = energy_rank(spectrum(w.reshape(w.shape[0], -1)), energy)
            r_in = energy_rank(spectrum(w.transpose(0, 1).reshape(w.shape[1], -1)), energy)
            yield name, layer, r_out, r_in


def peer_energy_tucker(model: nn.Module, energy: float) -> None:
    """TensorLy ``partial_tucker`` (10 HOOI sweeps) at per-mode energy ranks, exact ranks, always 3 stages."""
    from lightning_compress.methods.decomposition import factorize
    from lightning_compress.methods.decomposition.apply import set_submodule

    for name, layer, r_out, r_in in _tucker_layers(model, energy):
        set_submodule(model, name, factorize.tucker2(layer, r_out, r_in, n_iter_max=10, solver="tensorly",
                                                      stages=(True, True)))


def tucker_params(model: nn.Module, energy: float) -> int:
    """Parameters after :func:`peer_energy_tucker` at ``energy``, without factorizing (for bisection)."""
    total = sum(p.numel() for p in model.parameters())
    for _, layer, r_out, r_in in _tucker_layers(model, energy):
        w = layer.weight
        factorized = w.shape[1] * r_in + r_in * r_out * w.shape[2] * w.shape[3] + r_out * w.shape[0]
        total += factorized - w.numel()  # the bias moves to the last stage unchanged
    return total


def torch_pruning(model: nn.Module, ratio: float, example: torch.Tensor) -> None:
    """Torch-Pruning in place: its dependency graph, ``MagnitudeImportance(p=1)``, ``ratio`` of each layer's
    channels, the output layer ignored (the peer of our filter pruning)."""
    import torch_pruning as tp

    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                         ignored_layers=[last]).step()


def torch_pruning_to_macs(model: nn.Module, target_macs: int, input_size=(3, 32, 32)) -> tuple[nn.Module, float]:
    """Torch-Pruning (its dependency graph, ``MagnitudeImportance(p=1)``, per-layer ratios, the output layer
    ignored) at the pruning ratio whose MACs (counted by our report, as for our rows) come closest to
    ``target_macs`` from above or at it; returns the pruned copy and the ratio. It raises where Torch-Pruning
    cannot prune the network (ShuffleNetV2's channel shuffle)."""
    from lightning_compress import compression_report

    def pruned(ratio: float) -> nn.Module:
        copy_ = copy.deepcopy(model).cpu().eval().to(memory_format=torch.contiguous_format)
        torch_pruning(copy_, ratio, torch.randn(1, *input_size))
        return copy_

    low, high = 0.0, 0.9
    for _ in range(12):  # bisection: the smallest ratio whose MACs reach the target
        mid = (low + high) / 2
        macs = compression_report(pruned(mid), input_size=input_size).macs
        low, high = (mid, high) if macs > target_macs else (low, mid)
    return pruned(high), high


def cp_like(layer, params: int):
    """CP at the largest rank whose layer has no more than ``params`` parameters (a peer at a size)."""
    from lightning_compress.methods.decomposition import Geometry, factorize
    from lightning_compress.methods.decomposition.layers import cp_params

    g = Geometry.of(layer)
    bias = g.out_features if g.bias else 0
    rank = max(1, (params - bias) // (cp_params(1, g) - bias))
    return factorize.cp(layer, rank)
