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
import copy
import json
import math
from pathlib import Path

import torch
import yaml

from lightning_compress.data.cifar10_source import default_cache_dir, default_data_dir

from .common import BATCH_SIZE, RESULTS, TEST_IMAGES, TRAIN_IMAGES, machine, median_seconds, ort_session, parser, read_result, write_result
from .common_recipes import RECIPES, ROOT, rescale_epochs, run_config

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


def scale_config(config: dict, data_dir: str, cache_dir: str) -> dict:
    """The recipe at CPU-proxy scale (the rule in the module docstring); ``config`` is left untouched."""
    config = copy.deepcopy(config)
    trainer, model, data = config["trainer"], config["model"], config["data"]["init_args"]
    old_epochs, old_batch = trainer["max_epochs"], data.get("batch_size", 128)
    baseline = not model.get("weights")
    epochs = BASELINE_EPOCHS[model["model"]] if baseline else max(1, round(old_epochs * EPOCH_FRACTION))
    steps_ratio = (epochs * math.ceil(TRAIN_IMAGES / BATCH_SIZE)) / (old_epochs * math.ceil(FULL_TRAIN_IMAGES / old_batch))
    trainer.update(accelerator="cpu", devices=1, precision="32-true", enable_progress_bar=False)
    rescale_epochs(trainer, epochs, steps_ratio)
    model["lr"] = model["lr"] * BATCH_SIZE / old_batch
    if model["model"] in SCALED_WIDTHS:
        model["model_kwargs"] = {**(model.get("model_kwargs") or {}), "width": SCALED_WIDTHS[model["model"]]}
    data.update(data_dir=data_dir, cache_dir=cache_dir, batch_size=BATCH_SIZE, train_subset=TRAIN_IMAGES,
                test_subset=TEST_IMAGES, split_seed=0, val_size=0)
    return config


def run_one(name: str, recipe: str, peer: str | None, rows: dict, data_dir: str, cache_dir: str) -> dict:
    config = scale_config(yaml.safe_load((RECIPES / recipe).read_text()), data_dir, cache_dir)
    return run_config(name, recipe, config, peer, rows, WORK)


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
