"""Running one recipe config through the CLI with a peer swapped in, and measuring its artifact: shared by
the CPU-proxy recipes benchmark (:mod:`benchmarks.recipes`) and the full-scale GPU one (:mod:`benchmarks.fullscale`).

Peers run the same recipe with one callback swapped for the other library's: Lightning ``ModelPruning`` for
``IterativePruning``, TensorLy Tucker at energy ranks for ``TensorDecomposition``, torch.ao FX QAT for
``QuantizationAwareTraining``, Torch-Pruning for filter pruning, CP at flattened's parameters.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from lightning_compress import IterativePruning, QuantizationAwareTraining, WeightSharing, compression_report, save_compressed
from lightning_compress.callbacks.targets import compressible_root
from lightning_compress.cli import build_cli
from lightning_compress.methods.decomposition.apply import set_submodule

from .common import cp_like, export_fp32, fx_qat, model_pruning, ort_session, peer_energy_tucker, torch_pruning_to_macs, tucker_params

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
EPOCH_KEYS = ("start_epoch", "end_epoch", "freeze_observers_epoch", "freeze_bn_epoch")


def _slug(name: str) -> str:
    return name.replace("/", "__").replace(" ", "_").replace(".", "")


def rescale_epochs(trainer: dict, epochs: int, steps_ratio: float) -> None:
    """``max_epochs`` := ``epochs``; the callbacks' epoch-valued arguments scale alike, ``frequency`` (in
    optimizer steps) by ``steps_ratio``, the ratio of the new run's steps to the recipe's."""
    old_epochs = trainer["max_epochs"]
    trainer["max_epochs"] = epochs
    for callback in trainer.get("callbacks", []):
        args = callback.get("init_args") or {}
        ramp = isinstance(args.get("end_epoch"), int) and args["end_epoch"] > args.get("start_epoch", 0)
        for key in EPOCH_KEYS:
            if isinstance(args.get(key), int):
                args[key] = min(epochs, round(args[key] * epochs / old_epochs))
        if ramp and args["end_epoch"] <= args.get("start_epoch", 0):  # a ramp rounded away: one epoch of it
            args["end_epoch"] = args.get("start_epoch", 0) + 1
        if isinstance(args.get("frequency"), int):
            args["frequency"] = max(1, round(args["frequency"] * steps_ratio))


def _callback_args(config: dict, class_name: str) -> dict | None:
    for callback in config["trainer"].get("callbacks", []):
        if callback["class_path"].rsplit(".", 1)[-1] == class_name:
            return callback.get("init_args") or {}
    return None


def _drop_callback(trainer, class_name: str) -> None:
    trainer.callbacks[:] = [c for c in trainer.callbacks if type(c).__name__ != class_name]  # by name: a config's class


# ----------------------------------------------------------------------------------------- peers


def _peer_model_pruning(cli, config: dict, rows: dict) -> None:
    args = _callback_args(config, "IterativePruning")
    _drop_callback(cli.trainer, "IterativePruning")
    # torch.nn.utils.prune flattens weights with view(), which NHWC (channels_last) weights refuse
    cli.model.hparams.channels_last = False
    cli.model.model.to(memory_format=torch.contiguous_format)
    cli.trainer.callbacks.insert(0, model_pruning(cli.model.model, args["sparsity"], args["end_epoch"] - args["start_epoch"]))


def _peer_tensorly_tucker(cli, config: dict, rows: dict) -> None:
    """TensorLy Tucker at the per-mode energy that gives the parameter count of our Tucker row."""
    ours = rows.get("vgg19/tucker")
    if ours is None:
        raise SystemExit("the TensorLy peer matches our Tucker row's size: run vgg19/tucker first")
    _drop_callback(cli.trainer, "TensorDecomposition")
    model = cli.model.model
    low, high = 0.0, 1.0
    for _ in range(30):  # bisection: the smallest energy whose parameter count reaches ours
        mid = (low + high) / 2
        low, high = (mid, high) if tucker_params(model, mid) < ours["params"] else (low, mid)
    peer_energy_tucker(model, high)
    cli.model.peer_note = f"energy {high:.4f}"


def _peer_torch_ao_qat(cli, config: dict, rows: dict) -> None:
    _drop_callback(cli.trainer, "QuantizationAwareTraining")
    _drop_callback(cli.trainer, "CompressionReport")  # it cannot read torch.ao's observers
    cli.model.hparams.channels_last = False
    cli.model.model = fx_qat(cli.model.model.to(memory_format=torch.contiguous_format))


def _peer_torch_pruning(cli, config: dict, rows: dict) -> None:
    """Torch-Pruning at our filter-pruning row's MACs, pruned once at the start; the same epochs, optimizer and
    schedule then fine-tune it (the recipe without IterativePruning)."""
    model = config["model"]["model"]
    ours = next((r for n, r in rows.items() if n.endswith("/filter_prune") and r["model"] == model and not r["peer"]), None)
    if ours is None:
        raise SystemExit("the Torch-Pruning peer matches our filter-pruning row's MACs: run that row first")
    _drop_callback(cli.trainer, "IterativePruning")
    cli.model.model, ratio = torch_pruning_to_macs(cli.model.model, ours["macs"])
    cli.model.peer_note = f"pruning_ratio {ratio:.4f}"


FLATTENED_STAGES = ("lateral", "vertical", "horizontal", "combine")


def _peer_cp_same_params(cli, config: dict, rows: dict) -> None:
    """CP in place of flattened, on each layer our flattened row factorized, at the largest rank within the
    parameters that layer has there: the two at equal parameters per layer, the same fine-tuning after."""
    ours = rows.get("vgg19/flattened")
    if ours is None:
        raise SystemExit("the CP peer matches our flattened row's parameters per layer: run vgg19/flattened first")
    budget: dict[str, int] = {}
    for layer in ours["layers"]:
        parent, _, stage = layer["name"].rpartition(".")
        if stage in FLATTENED_STAGES:
            budget[parent] = budget.get(parent, 0) + layer["params"]
    _drop_callback(cli.trainer, "TensorDecomposition")
    model = cli.model.model
    ranks = []
    for name, params in budget.items():
        chain = cp_like(model.get_submodule(name), params)
        set_submodule(model, name, chain)
        ranks.append(chain.ranks[0])
    cli.model.peer_note = f"{len(budget)} layers, CP ranks {min(ranks)}-{max(ranks)}"


def _ours_one_shot(cli, config: dict, rows: dict) -> None:
    """Our filter pruning pruned once at fit start, as the Torch-Pruning row is: what the schedule is worth."""
    args = {k: v for k, v in _callback_args(config, "IterativePruning").items() if k not in ("end_epoch", "frequency")}
    _drop_callback(cli.trainer, "IterativePruning")
    cli.trainer.callbacks.insert(0, IterativePruning(**{**args, "schedule": "one_shot", "start_epoch": 0}))


PEERS = {"model_pruning": _peer_model_pruning, "cp_same_params": _peer_cp_same_params, "torch_pruning": _peer_torch_pruning, "one_shot": _ours_one_shot, "tensorly_tucker": _peer_tensorly_tucker, "torch_ao_qat": _peer_torch_ao_qat}
PEER_LABELS = {"model_pruning": "Lightning ModelPruning", "torch_pruning": "Torch-Pruning 1.6 (MagnitudeImportance)",
               "one_shot": "ours, one-shot at fit start (as Torch-Pruning)", "tensorly_tucker": "TensorLy Tucker, energy ranks",
               "cp_same_params": "ours, CP at flattened's parameters per layer",
               "torch_ao_qat": "torch.ao FX QAT"}


# ------------------------------------------------------------------------------------ measuring


def _test_batches(datamodule):
    datamodule.setup("test")
    for batch in datamodule.test_dataloader():
        images, labels = datamodule.on_after_batch_transfer(batch, 0)
        yield images.contiguous(), labels


@torch.inference_mode()
def _accuracy(predict, datamodule) -> float:
    correct = total = 0
    for images, labels in _test_batches(datamodule):
        correct += int((predict(images).argmax(1) == labels).sum())
        total += len(labels)
    return correct / total


def _ort_predict(path: Path, exact: bool = False):
    """``exact``: the int8 arithmetic the file describes (see ``ort_session``); the default session is what a
    user of this CPU gets."""
    session = ort_session(path, torch.get_num_threads(), exact=exact)
    return lambda images: torch.from_numpy(session.run(None, {"input": images.numpy()})[0])


def _state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _layers(report, net: nn.Module) -> list[dict]:
    return [{"name": layer.name, "kind": layer.kind, "shape": list(net.get_submodule(layer.name).weight.shape),
             "params": layer.params, "nonzeros": layer.nonzeros, "bits": float(layer.bits)} for layer in report.layers]


def _on_device(net: nn.Module, device: torch.device | None):
    if device is None:
        return net
    net = net.to(device)
    return lambda images: net(images.to(device)).cpu()


def measure(cli, config: dict, run_dir: Path, peer: str | None, work: Path,
            device: torch.device | None = None) -> dict:
    """Accuracy of the artifact in its runtime, its size on disk, the model's cost by the report.

    ``device``: where the float artifacts are evaluated, in torch (on a GPU the fp32 ONNX files of the
    float rows are not written: PyTorch is their runtime there); None: ONNX Runtime on the CPU.
    """
    net = compressible_root(cli.model).eval()
    with torch.no_grad():
        for parameter in net.parameters():
            # -0.0 + 0.0 = +0.0: torch's pruning leaves -0.0 where it multiplied a negative weight by its
            # mask, and the packed file keeps -0.0 as a value to round-trip bit-exactly; a fair size
            # comparison stores every pruned weight as the same zero.
            parameter.add_(0.0)
    dm = cli.datamodule
    row: dict = {"accuracy_torch": _accuracy(_on_device(net, device), dm)}
    net = net.cpu()
    qat = _callback_args(config, "QuantizationAwareTraining") if peer is None else None
    shared = _callback_args(config, "WeightSharing")
    if peer == "torch_ao_qat":
        from torch.ao.quantization.quantize_fx import convert_fx

        converted = convert_fx(copy.deepcopy(net).cpu().eval())
        artifact = run_dir / "model.torch_ao.pt"
        torch.jit.save(torch.jit.trace(converted, torch.randn(1, 3, 32, 32)), artifact)
        row.update(runtime="torch", accuracy=_accuracy(converted, dm), latency_file=str(artifact.relative_to(work)))
        row.update(file=str(artifact.relative_to(work)), file_bytes=artifact.stat().st_size,
                   file_format="TorchScript int8 (torch.ao convert_fx)", params=None)
        return row
    report = compression_report(net, input_size=(3, 32, 32))
    row.update(params=report.params, nonzeros=report.nonzeros, bits_per_weight=report.bits_per_weight,
               macs=report.macs, sparse_macs=report.sparse_macs, layers=_layers(report, net),
               state_dict_bytes=_state_dict_bytes(net))
    if qat and qat.get("export"):
        # resolved: a relative export path lands under the log directory, itself relative to WORK (the cwd)
        artifact = next(Path(c.artifact.path).resolve() for c in cli.trainer.callbacks
                        if isinstance(c, QuantizationAwareTraining))
        row.update(runtime="onnxruntime", accuracy=_accuracy(_ort_predict(artifact), dm),
                   accuracy_int8_exact=_accuracy(_ort_predict(artifact, exact=True), dm),
                   file_format="ONNX QDQ int8", latency_file=str(artifact.relative_to(work)))
    else:
        if shared and shared.get("export"):  # the recipe wrote it; WeightSharing kept its summary
            summary = next(c.artifact for c in cli.trainer.callbacks if isinstance(c, WeightSharing))
            artifact = Path(summary.path).resolve()
        else:
            artifact = run_dir / "model.lcpk"
            summary = save_compressed(net, artifact)
        weights = sum(sum(layer.part_bytes.values()) for layer in summary.layers)
        row["packed_bytes"] = {"weights": weights, "other_tensors": summary.other_bytes,  # where the bytes go
                               "manifest": summary.manifest_bytes, "header": summary.file_bytes - weights
                               - summary.other_bytes - summary.manifest_bytes}
        row["file_format"] = "packed (lightning_compress .lcpk)"
        if device is not None:
            row.update(runtime="torch", accuracy=row["accuracy_torch"])
        else:
            fp32 = run_dir / "model.fp32.onnx"
            export_fp32(net, fp32)
            row.update(runtime="onnxruntime", accuracy=_accuracy(_ort_predict(fp32), dm), latency_file=str(fp32.relative_to(work)))
        if peer is None and not config["model"].get("weights") and device is None:  # traced for torch.ao's row
            torch.jit.save(torch.jit.trace(copy.deepcopy(net).to(memory_format=torch.contiguous_format),
                                           torch.randn(1, 3, 32, 32)), run_dir / "model.fp32.pt")
    row.update(file=str(artifact.relative_to(work)), file_bytes=artifact.stat().st_size)
    return row


@contextlib.contextmanager
def _cwd(path: Path):
    previous = Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def run_config(name: str, recipe: str, config: dict, peer: str | None, rows: dict, work: Path,
               device: torch.device | None = None, callbacks: tuple = ()) -> dict:
    """Train one (scaled) recipe config, with ``peer`` swapped in, and measure it; ``callbacks`` are added
    to the Trainer's (timers)."""
    run_dir = work / "runs" / _slug(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    with _cwd(work):  # the recipe's relative paths (checkpoints/..., model.weights) resolve beneath work
        cli = build_cli(["--config", str(config_path)], run=False)
        if peer:
            PEERS[peer](cli, config, rows)
        cli.trainer.callbacks.extend(callbacks)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        train_seconds = time.perf_counter() - start
        row = {"name": name, "recipe": f"recipes/{recipe}", "model": config["model"]["model"],
               "peer": PEER_LABELS.get(peer), "epochs": config["trainer"]["max_epochs"],
               "train_seconds": round(train_seconds, 1)}
        if getattr(cli.model, "peer_note", None):
            row["peer_note"] = cli.model.peer_note
        row.update(measure(cli, config, run_dir, peer, work, device))
    return row
