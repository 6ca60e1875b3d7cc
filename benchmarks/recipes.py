"""Run the recipes themselves at CPU-proxy scale and measure what each one produced.

    python -m benchmarks recipes run               # every run below (about an hour on two cores)
    python -m benchmarks recipes run --only vgg19  # runs whose name starts with a prefix
    python -m benchmarks recipes latency           # ONNX Runtime / torch latency of every artifact
    python -m benchmarks recipes latency-paired    # each row against its own baseline only
    python -m benchmarks report recipes            # README table and the PNG plots from the JSON

Each run loads a recipe from ``recipes/``, scales it down with one fixed rule (below), trains it through
the same LightningCLI that ``lightning-compress fit`` uses, and measures the result: test accuracy of
the artifact in the runtime that would serve it (ONNX Runtime for the int8 files, PyTorch otherwise),
parameters and non-zeros, bits per weight, MACs, the size of the file on disk and its ratio to the
fp32 state dict of the baseline of the same model, the training wall time. Peers run the same recipe
with one callback swapped for the other library's: Lightning ``ModelPruning`` for ``IterativePruning``,
TensorLy Tucker at energy ranks for ``TensorDecomposition``, torch.ao FX QAT for
``QuantizationAwareTraining``. Rows are written to ``benchmarks/results/recipes_cpu.json`` as they
finish; an interrupted ``run`` resumes where it stopped (``--force`` reruns).

The CPU scale (a GPU run would use the recipes unchanged): the proxy protocol's data (10,000 training
images, the fixed 2,000-image test subset, batch 128, learning rate scaled with the batch), VGG19 and
Xception at a quarter of their width, fp32; baselines train 15 epochs (mobile nets 5: their depthwise
convolutions are slow on two cores), compression recipes a fifth of their epochs with every epoch-valued callback
argument scaled alike and step-valued ones (``frequency``) by the ratio of optimizer steps.
Run artifacts go to ``checkpoints/recipes_cpu/`` (the recipes' own relative paths, beneath it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from lightning_compress import IterativePruning, QuantizationAwareTraining, WeightSharing, compression_report, save_compressed
from lightning_compress.callbacks.targets import compressible_root
from lightning_compress.cli import build_cli
from lightning_compress.data.cifar10_source import default_cache_dir, default_data_dir
from lightning_compress.methods.decomposition.apply import set_submodule

from .common import (BATCH_SIZE, RESULTS, cp_like, TEST_IMAGES, TRAIN_IMAGES, export_fp32, fx_qat, machine, median_seconds,
                     model_pruning, ort_session, parser, peer_energy_tucker, read_result, torch_pruning_to_macs, tucker_params,
                     write_result)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RESULTS_FILE = RESULTS / "recipes_cpu.json"
WORK = ROOT / "checkpoints" / "recipes_cpu"

FULL_TRAIN_IMAGES = 50_000
BASELINE_EPOCHS = {"vgg19_bn": 15, "mobilenet_v2": 5, "shufflenet_v2_x1_0": 5, "squeezenet1_1": 5, "xception": 5}
EPOCH_FRACTION = 0.2
VGG_WIDTH = 0.25
# Xception at full width has 4.5x MobileNetV2's MACs, most in depthwise-separable convs, which run slowly
# on two cores: the CPU scale narrows it as it narrows VGG19.
SCALED_WIDTHS = {"vgg19_bn": VGG_WIDTH, "xception": 0.25}
WARMUP = 10  # TorchScript optimizes a graph over its first runs
EPOCH_KEYS = ("start_epoch", "end_epoch", "freeze_observers_epoch", "freeze_bn_epoch")

# (row name, recipe, peer swapped in). Order matters: compression rows need their baseline's
# checkpoint, and the TensorLy peer matches the parameter count of our Tucker row.
RUNS = [
    ("vgg19/baseline", "vgg19_cifar10/baseline.yaml", None),
    ("vgg19/prune_95", "vgg19_cifar10/prune_95.yaml", None),
    ("vgg19/prune_98", "vgg19_cifar10/prune_98.yaml", None),
    ("vgg19/prune_98 ModelPruning", "vgg19_cifar10/prune_98.yaml", "model_pruning"),
    ("vgg19/filter_prune", "vgg19_cifar10/filter_prune.yaml", None),
    ("vgg19/slimming", "vgg19_cifar10/slimming.yaml", None),
    ("vgg19/qat_int8", "vgg19_cifar10/qat_int8.yaml", None),
    ("vgg19/qat_int8 torch.ao", "vgg19_cifar10/qat_int8.yaml", "torch_ao_qat"),
    ("vgg19/qat_w4a8", "vgg19_cifar10/qat_w4a8.yaml", None),
    ("vgg19/tucker", "vgg19_cifar10/tucker.yaml", None),
    ("vgg19/tucker TensorLy energy", "vgg19_cifar10/tucker.yaml", "tensorly_tucker"),
    ("vgg19/tt", "vgg19_cifar10/tt.yaml", None),
    ("vgg19/cp", "vgg19_cifar10/cp.yaml", None),
    ("vgg19/flattened", "vgg19_cifar10/flattened.yaml", None),
    ("vgg19/flattened CP same params", "vgg19_cifar10/flattened.yaml", "cp_same_params"),
    ("vgg19/weight_sharing", "vgg19_cifar10/weight_sharing.yaml", None),
    ("vgg19/weight_sharing_pq", "vgg19_cifar10/weight_sharing_pq.yaml", None),
    ("vgg19/deep_compression", "vgg19_cifar10/deep_compression.yaml", None),
    ("vgg19/composed", "vgg19_cifar10/composed.yaml", None),
    ("squeezenet1_1/baseline", "squeezenet1_1_cifar10/baseline.yaml", None),
    ("squeezenet1_1/qat_int8", "squeezenet1_1_cifar10/qat_int8.yaml", None),
    ("squeezenet1_1/filter_prune", "squeezenet1_1_cifar10/filter_prune.yaml", None),
    ("squeezenet1_1/filter_prune Torch-Pruning", "squeezenet1_1_cifar10/filter_prune.yaml", "torch_pruning"),
    ("shufflenet_v2/baseline", "shufflenet_v2_cifar10/baseline.yaml", None),
    ("shufflenet_v2/qat_int8", "shufflenet_v2_cifar10/qat_int8.yaml", None),
    ("shufflenet_v2/filter_prune", "shufflenet_v2_cifar10/filter_prune.yaml", None),
    ("mobilenet_v2/baseline", "mobilenet_v2_cifar10/baseline.yaml", None),
    ("mobilenet_v2/qat_int8", "mobilenet_v2_cifar10/qat_int8.yaml", None),
    ("mobilenet_v2/filter_prune", "mobilenet_v2_cifar10/filter_prune.yaml", None),
    ("mobilenet_v2/filter_prune Torch-Pruning", "mobilenet_v2_cifar10/filter_prune.yaml", "torch_pruning"),
    ("mobilenet_v2/filter_prune one-shot", "mobilenet_v2_cifar10/filter_prune.yaml", "one_shot"),
    ("xception/baseline", "xception_cifar10/baseline.yaml", None),
    ("xception/qat_int8", "xception_cifar10/qat_int8.yaml", None),
    ("xception/prune", "xception_cifar10/prune.yaml", None),
    ("xception/filter_prune", "xception_cifar10/filter_prune.yaml", None),
]


def _slug(name: str) -> str:
    return name.replace("/", "__").replace(" ", "_").replace(".", "")


def scale_config(config: dict, data_dir: str, cache_dir: str) -> dict:
    """The recipe at CPU-proxy scale (the rule in the module docstring); ``config`` is left untouched."""
    config = copy.deepcopy(config)
    trainer, model, data = config["trainer"], config["model"], config["data"]["init_args"]
    old_epochs, old_batch = trainer["max_epochs"], data.get("batch_size", 128)
    baseline = not model.get("weights")
    epochs = BASELINE_EPOCHS[model["model"]] if baseline else max(1, round(old_epochs * EPOCH_FRACTION))
    steps_ratio = (epochs * math.ceil(TRAIN_IMAGES / BATCH_SIZE)) / (old_epochs * math.ceil(FULL_TRAIN_IMAGES / old_batch))
    trainer.update(accelerator="cpu", devices=1, precision="32-true", max_epochs=epochs, enable_progress_bar=False)
    for callback in trainer.get("callbacks", []):
        args = callback.get("init_args") or {}
        for key in EPOCH_KEYS:
            if isinstance(args.get(key), int):
                args[key] = min(epochs, round(args[key] * epochs / old_epochs))
        if isinstance(args.get("frequency"), int):
            args["frequency"] = max(1, round(args["frequency"] * steps_ratio))
    model["lr"] = model["lr"] * BATCH_SIZE / old_batch
    if model["model"] in SCALED_WIDTHS:
        model["model_kwargs"] = {**(model.get("model_kwargs") or {}), "width": SCALED_WIDTHS[model["model"]]}
    data.update(data_dir=data_dir, cache_dir=cache_dir, batch_size=BATCH_SIZE, train_subset=TRAIN_IMAGES,
                test_subset=TEST_IMAGES, split_seed=0, val_size=0)
    return config


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
    for images, labels in datamodule.test_dataloader():
        yield datamodule.on_after_batch_transfer((images, labels), 0)[0].contiguous(), labels


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


def measure(cli, config: dict, run_dir: Path, peer: str | None) -> dict:
    """Accuracy of the artifact in its runtime, its size on disk, the model's cost by the report."""
    net = compressible_root(cli.model).eval()
    with torch.no_grad():
        for parameter in net.parameters():
            # -0.0 + 0.0 = +0.0: torch's pruning leaves -0.0 where it multiplied a negative weight by its
            # mask, and the packed file keeps -0.0 as a value to round-trip bit-exactly; a fair size
            # comparison stores every pruned weight as the same zero.
            parameter.add_(0.0)
    dm = cli.datamodule
    row: dict = {"accuracy_torch": _accuracy(net, dm)}
    qat = _callback_args(config, "QuantizationAwareTraining") if peer is None else None
    shared = _callback_args(config, "WeightSharing")
    if peer == "torch_ao_qat":
        from torch.ao.quantization.quantize_fx import convert_fx

        converted = convert_fx(copy.deepcopy(net).cpu().eval())
        artifact = run_dir / "model.torch_ao.pt"
        torch.jit.save(torch.jit.trace(converted, torch.randn(1, 3, 32, 32)), artifact)
        row.update(runtime="torch", accuracy=_accuracy(converted, dm), latency_file=str(artifact.relative_to(WORK)))
        row.update(file=str(artifact.relative_to(WORK)), file_bytes=artifact.stat().st_size,
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
                   file_format="ONNX QDQ int8", latency_file=str(artifact.relative_to(WORK)))
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
        fp32 = run_dir / "model.fp32.onnx"
        export_fp32(net, fp32)
        row.update(runtime="onnxruntime", accuracy=_accuracy(_ort_predict(fp32), dm),
                   file_format="packed (lightning_compress .lcpk)", latency_file=str(fp32.relative_to(WORK)))
        if peer is None and not config["model"].get("weights"):  # a baseline: also traced for torch.ao's row
            torch.jit.save(torch.jit.trace(copy.deepcopy(net).to(memory_format=torch.contiguous_format),
                                           torch.randn(1, 3, 32, 32)), run_dir / "model.fp32.pt")
    row.update(file=str(artifact.relative_to(WORK)), file_bytes=artifact.stat().st_size)
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


def run_one(name: str, recipe: str, peer: str | None, rows: dict, data_dir: str, cache_dir: str) -> dict:
    config = scale_config(yaml.safe_load((RECIPES / recipe).read_text()), data_dir, cache_dir)
    run_dir = WORK / "runs" / _slug(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    with _cwd(WORK):  # the recipe's relative paths (checkpoints/..., model.weights) resolve beneath WORK
        cli = build_cli(["--config", str(config_path)], run=False)
        if peer:
            PEERS[peer](cli, config, rows)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        train_seconds = time.perf_counter() - start
        row = {"name": name, "recipe": f"recipes/{recipe}", "model": config["model"]["model"],
               "peer": PEER_LABELS.get(peer), "epochs": config["trainer"]["max_epochs"],
               "train_seconds": round(train_seconds, 1)}
        if getattr(cli.model, "peer_note", None):
            row["peer_note"] = cli.model.peer_note
        row.update(measure(cli, config, run_dir, peer))
    return row


def _load(results: str | Path = RESULTS_FILE) -> dict:
    return read_result(results) or {"runs": []}


def _save(data: dict, results: str | Path = RESULTS_FILE) -> None:
    baselines = {r["model"]: r for r in data["runs"] if r["name"].endswith("/baseline")}
    for r in data["runs"]:
        base = baselines.get(r["model"])
        if base:
            r["delta_points"] = round(100 * (r["accuracy"] - base["accuracy"]), 2)
            r["ratio_vs_fp32_state_dict"] = base["state_dict_bytes"] / r["file_bytes"]
    write_result(results, data, indent=1)


def run(args: argparse.Namespace) -> None:
    data = _load(args.results)
    for legacy in ("device", "torch"):  # what "machine" replaced
        data.pop(legacy, None)
    data.update(machine=machine(), scale=__doc__.split("The CPU scale")[1].split("Run artifacts")[0].strip())
    done = {r["name"]: r for r in data["runs"]}
    data_dir, cache_dir = str(Path(args.data_dir or default_data_dir()).resolve()), str(Path(default_cache_dir()).resolve())
    for name, recipe, peer in RUNS:
        if args.only and not any(name.startswith(prefix) for prefix in args.only):
            continue
        if name in done and not args.force:
            print(f"{name}: done, skipped (--force reruns it)")
            continue
        row = run_one(name, recipe, peer, done, data_dir, cache_dir)
        done[name] = row
        data["runs"] = [done[n] for n, _, _ in RUNS if n in done]
        _save(data, args.results)
        print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)


# ------------------------------------------------------------------------------------- latency


def latency(args: argparse.Namespace) -> None:
    """Median batch-1 latency of every artifact; all take turns run by run, so drift hits them alike.
    Speedups are against the same model's baseline in the same runtime."""
    data = _load()
    runners = {}
    torch.set_num_threads(args.threads)
    for r in data["runs"]:
        path = WORK / r["latency_file"]
        runner = _runner(r, args.threads)
        if runner is None:  # an artifact of an earlier session, since deleted: its figures stay, marked
            print(f"{r['name']}: {path} is gone; keeping its latency from an earlier run")
            r["latency_run"] = "earlier"
            continue
        r.pop("latency_run", None)
        runners[r["name"]] = runner
        if r["name"].endswith("/baseline") and (path.parent / "model.fp32.pt").is_file():
            runners[r["name"] + " (torch)"] = torch.jit.load(str(path.parent / "model.fp32.pt")).eval()
    x = torch.randn(1, 3, 32, 32)
    median = median_seconds({name: (lambda r=runner: r(x)) for name, runner in runners.items()}, args.repeats, WARMUP)
    for r in data["runs"]:
        if r["name"] not in median:
            continue
        base = f"{r['name'].split('/')[0]}/baseline" + (" (torch)" if r["runtime"] == "torch" else "")
        r["latency_ms"] = round(1000 * median[r["name"]], 3)
        r["speedup"] = median[base] / median[r["name"]] if base in median else None
    data["latency"] = {"batch": 1, "threads": args.threads, "repeats": args.repeats, "machine": machine(),
                       "baseline_torch_ms": {k: round(1000 * v, 3) for k, v in median.items() if k.endswith("(torch)")}}
    _save(data)
    for r in data["runs"]:
        print(f"{r['name']:40s} {r.get('latency_ms') or float('nan'):8.3f} ms  {r.get('speedup') or float('nan'):.2f}x"
              + (" (earlier run)" if r.get("latency_run") else ""))


def _runner(r: dict, threads: int):
    """A callable that runs the row's artifact on one input, or None when the artifact is gone."""
    path = WORK / r["latency_file"]
    if not path.is_file():
        return None
    if r["runtime"] == "onnxruntime":
        # without spinning: spinning ORT threads starved the torch runner that came next on two
        # cores (torch.ao's model took 32 ms between ORT sessions and 0.46 ms alone)
        session = ort_session(path, threads, spinning=False)
        return lambda x: session.run(None, {"input": x.numpy()})
    return torch.jit.load(str(path)).eval()


def latency_paired(args: argparse.Namespace) -> None:
    """Each row against its own baseline only, the two taking turns: no other model's weights pass through
    the caches between their runs, as they do in ``latency`` (where the light nets' int8 files measured
    1.31-1.63x against 1.51-1.71x this way). Writes ``latency_paired_ms`` and ``speedup_paired``."""
    data = _load()
    torch.set_num_threads(args.threads)
    rows = {r["name"]: r for r in data["runs"]}
    x = torch.randn(1, 3, 32, 32)
    for r in data["runs"]:
        base = rows.get(f"{r['name'].split('/')[0]}/baseline")
        if base is None or base is r or base["runtime"] != r["runtime"]:
            continue
        runners = {"baseline": _runner(base, args.threads), "row": _runner(r, args.threads)}
        if None in runners.values():
            continue
        median = median_seconds({k: (lambda f=f: f(x)) for k, f in runners.items()}, args.repeats, WARMUP)
        r["latency_paired_ms"] = round(1000 * median["row"], 3)
        r["speedup_paired"] = median["baseline"] / median["row"]
        print(f"{r['name']:40s} {r['latency_paired_ms']:8.3f} ms  {r['speedup_paired']:.2f}x against "
              f"{1000 * median['baseline']:.3f} ms", flush=True)
    data["latency_paired"] = {"batch": 1, "threads": args.threads, "repeats": args.repeats, "machine": machine()}
    _save(data)


def main(argv: list[str] | None = None) -> None:
    ap = parser("recipes", __doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and measure the recipes at CPU-proxy scale")
    r.add_argument("--data-dir", default=None)
    r.add_argument("--only", nargs="*", default=None, help="row-name prefixes, e.g. vgg19 or vgg19/tucker")
    r.add_argument("--force", action="store_true", help="rerun rows already in the results JSON")
    r.add_argument("--results", default=str(RESULTS_FILE),
                   help="the results JSON (another file: a partial run that leaves the README's table as it is)")
    lat = sub.add_parser("latency", help="batch-1 CPU latency of every artifact, taking turns")
    lat.add_argument("--threads", type=int, default=2)
    lat.add_argument("--repeats", type=int, default=100)
    pair = sub.add_parser("latency-paired", help="batch-1 CPU latency of every row against its own baseline only")
    pair.add_argument("--threads", type=int, default=2)
    pair.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args(argv)
    {"run": run, "latency": latency, "latency-paired": latency_paired}[args.command](args)


if __name__ == "__main__":
    main()
