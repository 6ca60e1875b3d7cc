"""The full-scale VGG19-BN / CIFAR-10 table on one GPU, in one command: the baseline, every recipe, the peers.

    python -m benchmarks fullscale                 # one GPU, the whole data set, full width (about 9 minutes)
    python -m benchmarks fullscale --profile       # two epochs of ours beside a plain PyTorch loop, profiled
    python -m benchmarks fullscale --smoke         # the same code on the CPU at tiny scale (the tests run it)

First a plain PyTorch loop (the same model, batch, bf16 autocast, channels_last, fused SGD, device-resident
data with the same crop and flip, compiled as ours is) sets the speed to compare with; then the baseline
recipe trains through the recipes' own LightningCLI, and every recipe of ``recipes/vgg19_cifar10/`` starts
from it, each beside its peer where it has one (Lightning ``ModelPruning``, TensorLy Tucker, torch.ao FX
QAT: :mod:`benchmarks.recipes` swaps one callback). Per row: test accuracy of the artifact in the runtime
that serves it (ONNX Runtime for the int8 files, PyTorch on the GPU for the float and packed ones), file
bytes and their ratio to the baseline's fp32 state dict, MACs, train time and median epoch time.

Rows go to ``benchmarks/results/fullscale_gpu.json`` as they finish and are copied to ``$OUT`` (the folder
that comes back from a device machine) each time, so a run cut short still returns what it finished. Rows
are ordered by what the targets need first; one that would not finish within ``--budget`` seconds is
skipped and named in ``skipped``. The recipes run at ``--recipe-epochs`` (their epoch-valued callback
arguments scale alike), the baseline at ``--baseline-epochs``; a batch of ``--batch-size`` with the
learning rate scaled linearly from the recipes' 256.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from torch import nn

from lightning_compress.data.augment import normalize, random_crop_flip
from lightning_compress.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD
from lightning_compress.data.cifar10_source import default_cache_dir, default_data_dir, load_cifar10
from lightning_compress.models import create_model

from .common import RESULTS, EpochTimer, machine, parser, sync_device, write_result
from .common_recipes import PEER_LABELS, RECIPES, ROOT, rescale_epochs, run_config

RESULTS_FILE = RESULTS / "fullscale_gpu.json"
RECIPE_BATCH = 256
# (row, recipe, peer swapped in), in the order the rows run: what the targets read first (baseline, 98 / 99 %,
# Tucker 30x / 15x, int8, w4a8, Deep Compression), each with its peer next to it, then the rest. A peer runs
# after the row of ours it matches (TensorLy at our Tucker's parameters, CP at flattened's).
TABLE = [
    ("vgg19/baseline", "baseline", None),
    ("vgg19/prune_98", "prune_98", None), ("vgg19/prune_98 ModelPruning", "prune_98", "model_pruning"),
    ("vgg19/tucker", "tucker", None), ("vgg19/tucker TensorLy energy", "tucker", "tensorly_tucker"),
    ("vgg19/qat_int8", "qat_int8", None), ("vgg19/qat_int8 torch.ao", "qat_int8", "torch_ao_qat"),
    ("vgg19/deep_compression", "deep_compression", None), ("vgg19/qat_w4a8", "qat_w4a8", None),
    ("vgg19/prune_99", "prune_99", None), ("vgg19/tucker_15", "tucker_15", None), ("vgg19/prune_95", "prune_95", None),
    ("vgg19/weight_sharing", "weight_sharing", None), ("vgg19/composed", "composed", None),
    ("vgg19/filter_prune", "filter_prune", None), ("vgg19/slimming", "slimming", None), ("vgg19/cp", "cp", None),
    ("vgg19/tt", "tt", None), ("vgg19/flattened", "flattened", None),
    ("vgg19/flattened CP same params", "flattened", "cp_same_params"), ("vgg19/weight_sharing_pq", "weight_sharing_pq", None),
]
# H200 SXM dense bf16 tensor-core rate from NVIDIA's data sheet; the share reported is of this figure.
SPEC_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


@dataclass(frozen=True)
class Plan:
    accelerator: str = "gpu"
    precision: str = "bf16-mixed"
    batch_size: int = 512
    eval_batch_size: int = 2048
    baseline_epochs: int = 80
    recipe_epochs: int = 15
    compile: bool | str = "default"
    train_subset: int | None = None
    test_subset: int | None = None
    width: float | None = None  # VGG19 at full width unless set
    budget_seconds: float = 530.0


SMOKE = Plan(accelerator="cpu", precision="32-true", batch_size=32, eval_batch_size=64, baseline_epochs=1,
             recipe_epochs=2, compile=False, train_subset=96, test_subset=64, width=0.25, budget_seconds=1e9)


def runs() -> dict[str, tuple[str, str | None]]:
    return {name: (f"vgg19_cifar10/{recipe}.yaml", peer) for name, recipe, peer in TABLE}


def full_config(recipe: str, plan: Plan, data_dir: str, cache_dir: str) -> dict:
    """The recipe on the plan's device, batch, epochs and data; the recipe file is not touched."""
    config = yaml.safe_load((RECIPES / recipe).read_text())
    trainer, model, data = config["trainer"], config["model"], config["data"]["init_args"]
    old_epochs, old_batch = trainer["max_epochs"], data.get("batch_size", RECIPE_BATCH)
    baseline = not model.get("weights")
    epochs = plan.baseline_epochs if baseline else min(old_epochs, plan.recipe_epochs)
    train_images = plan.train_subset or 50_000
    steps_ratio = (epochs * math.ceil(train_images / plan.batch_size)) / (old_epochs * math.ceil(50_000 / old_batch))
    trainer.update(accelerator=plan.accelerator, devices=1, precision=plan.precision, enable_progress_bar=False,
                   benchmark=plan.accelerator == "gpu", log_every_n_steps=50, num_sanity_val_steps=0,
                   check_val_every_n_epoch=max(1, epochs))  # validation once, at the end: the table reads test accuracy
    rescale_epochs(trainer, epochs, steps_ratio)
    for callback in trainer.get("callbacks", []):
        if callback["class_path"].endswith("ModelCheckpoint"):  # one save, at the end: a VGG19 save is a second
            callback.setdefault("init_args", {})["every_n_epochs"] = epochs
    model["lr"] = model["lr"] * plan.batch_size / old_batch
    model["compile"] = plan.compile
    if plan.width is not None:
        model["model_kwargs"] = {**(model.get("model_kwargs") or {}), "width": plan.width}
    data.update(data_dir=data_dir, cache_dir=cache_dir, batch_size=plan.batch_size, eval_batch_size=plan.eval_batch_size,
                val_size=0, split_seed=0, device_resident=True, train_subset=plan.train_subset, test_subset=plan.test_subset)
    return config


def steady_epoch_seconds(seconds: list[float]) -> float | None:
    """Median epoch time without the first epoch (compilation, cuDNN autotuning, warm caches)."""
    steady = seconds[1:] or seconds
    return statistics.median(steady) if steady else None


# ------------------------------------------------------------------------------- plain loop


def plain_loop_epoch_seconds(plan: Plan, data_dir: str, cache_dir: str, epochs: int = 3) -> dict:
    """The same training in a hand-written PyTorch loop: what the Lightning stack is measured against."""
    device = torch.device("cuda" if plan.accelerator == "gpu" else "cpu")
    data = load_cifar10(Path(data_dir), Path(cache_dir), False)
    images, labels = data.train_images, data.train_labels
    if plan.train_subset:
        images, labels = images[: plan.train_subset], labels[: plan.train_subset]
    images, labels = images.to(device), labels.to(device)
    torch.manual_seed(0)
    model = create_model("vgg19_bn", num_classes=10, **({"width": plan.width} if plan.width else {}))
    model = model.to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1 * plan.batch_size / RECIPE_BATCH, momentum=0.9, nesterov=True,
                                weight_decay=5e-4, **({"fused": True} if device.type == "cuda" else {}))
    forward = torch.compile(model, mode=None if plan.compile is True else plan.compile) if plan.compile else model
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    bf16 = plan.precision.startswith("bf16")
    steps = len(images) // plan.batch_size
    seconds = []
    for _ in range(epochs):
        sync_device()
        start = time.perf_counter()
        order = torch.randperm(len(images), device=device)
        for step in range(steps):
            index = order[step * plan.batch_size : (step + 1) * plan.batch_size]
            x = normalize(random_crop_flip(images[index], padding=4), CIFAR10_MEAN, CIFAR10_STD)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = criterion(forward(x.contiguous(memory_format=torch.channels_last)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync_device()
        seconds.append(time.perf_counter() - start)
    return {"epoch_seconds": steady_epoch_seconds(seconds), "all_epoch_seconds": [round(s, 3) for s in seconds],
            "steps_per_epoch": steps}


# --------------------------------------------------------------------------------- the table


def _device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def _spec_tflops() -> float | None:
    name = _device_name()
    return next((v for k, v in SPEC_BF16_TFLOPS.items() if k in name), None)


def _table_row(name: str, recipe: str, peer: str | None, row: dict, seconds: list[float]) -> dict:
    keep = ("accuracy", "accuracy_torch", "accuracy_int8_exact", "runtime", "file_format", "file_bytes", "params",
            "nonzeros", "macs", "sparse_macs", "bits_per_weight", "state_dict_bytes", "epochs", "train_seconds", "peer_note")
    out = {"name": name, "recipe": f"recipes/{recipe}", "peer": PEER_LABELS.get(peer, False) if peer else False}
    out.update({k: row[k] for k in keep if k in row})
    out["epoch_seconds"] = steady_epoch_seconds(seconds)
    out["all_epoch_seconds"] = [round(s, 3) for s in seconds]
    return out


def _finish(data: dict) -> None:
    base = next((r for r in data["rows"] if r["name"] == "vgg19/baseline" and "accuracy" in r), None)
    if base is None:
        return
    data["ours_epoch_seconds"] = base["epoch_seconds"]
    for r in data["rows"]:
        if "accuracy" in r:
            r["delta_points"] = round(100 * (r["accuracy"] - base["accuracy"]), 2)
            r["ratio"] = base["state_dict_bytes"] / r["file_bytes"]
            r["epoch_vs_baseline"] = r["epoch_seconds"] / base["epoch_seconds"] if base["epoch_seconds"] else None
    if base.get("macs") and base["epoch_seconds"]:
        images = data["plan"]["train_subset"] or 50_000
        flops = 3 * 2 * base["macs"] * images  # forward, and a backward of about twice its cost
        data["images_per_second"] = round(images / base["epoch_seconds"], 1)
        spec = _spec_tflops()
        data["bf16_share_of_spec"] = flops / base["epoch_seconds"] / (spec * 1e12) if spec else None


def _write(data: dict, path: Path, out: Path | None) -> None:
    _finish(data)
    write_result(path, data, indent=1)
    if out is not None:  # a run cut by the device's limit still returns the rows it finished
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.name)


def table(args: argparse.Namespace, plan: Plan) -> dict:
    data_dir = str(Path(args.data_dir or default_data_dir()).resolve())
    cache_dir = str(Path(args.cache_dir or default_cache_dir()).resolve())
    work = Path(args.work).resolve()
    # A fresh start: Lightning would write last-v1.ckpt beside an earlier run's last.ckpt, and the recipes
    # would start from the earlier baseline.
    shutil.rmtree(work, ignore_errors=True)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else (Path(args.out) if args.out else None)
    path = Path(args.results)
    start = time.perf_counter()
    data = {"device": _device_name(), "machine": machine(), "smoke": args.smoke, "plan": asdict(plan),
            "command": "python -m benchmarks fullscale" + (" --smoke" if args.smoke else ""),
            "ours_epoch_seconds": None, "plain_loop_epoch_seconds": None, "rows": [], "skipped": []}
    plain = plain_loop_epoch_seconds(plan, data_dir, cache_dir)
    data["plain_loop_epoch_seconds"], data["plain_loop"] = plain["epoch_seconds"], plain
    _write(data, path, out)
    print(f"plain loop: {plain}", flush=True)
    done: dict[str, dict] = {}
    for name, (recipe, peer) in runs().items():
        if args.only and not any(name.startswith(p) for p in args.only):
            continue
        config = full_config(recipe, plan, data_dir, cache_dir)
        if peer == "torch_ao_qat":
            config["model"]["compile"] = False  # an FX-prepared GraphModule with observers: torch.ao runs it eagerly
        elapsed = time.perf_counter() - start
        expected = _expected_seconds(config, data, plan)
        if elapsed + expected > plan.budget_seconds:
            data["skipped"].append({"name": name, "why": f"{expected:.0f} s expected, {plan.budget_seconds - elapsed:.0f} s left"})
            _write(data, path, out)
            continue
        timer = EpochTimer()
        try:
            row = run_config(name, recipe, config, peer, done, work, _eval_device(plan), callbacks=(timer,))
        except Exception as error:  # noqa: BLE001 - one failed row must not lose the others
            data["rows"].append({"name": name, "recipe": f"recipes/{recipe}", "peer": PEER_LABELS.get(peer, False) if peer else False,
                                 "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]})
            _write(data, path, out)
            print(f"{name}: FAILED {error}", flush=True)
            if name == "vgg19/baseline":
                break  # every other row starts from it
            continue
        done[name] = row
        data["rows"].append(_table_row(name, recipe, peer, row, timer.seconds))
        data["seconds_so_far"] = round(time.perf_counter() - start, 1)
        _write(data, path, out)
        print(json.dumps({k: v for k, v in data["rows"][-1].items() if k != "all_epoch_seconds"}), flush=True)
    return data


def _eval_device(plan: Plan) -> torch.device:
    """Float and packed artifacts are evaluated in torch on the training device (the smoke run takes the
    GPU run's path, on the CPU)."""
    return torch.device("cuda") if plan.accelerator == "gpu" else torch.device("cpu")


def _expected_seconds(config: dict, data: dict, plan: Plan) -> float:
    """Epochs at the baseline's epoch time (the plain loop's before it) with twice that for a peer's slower
    step, plus a minute for compilation and measurement."""
    per_epoch = data.get("ours_epoch_seconds") or data.get("plain_loop_epoch_seconds") or 0.0
    return config["trainer"]["max_epochs"] * per_epoch * 1.5 + (60 if plan.accelerator == "gpu" else 0)


# ------------------------------------------------------------------------------------ profile


def profile(args: argparse.Namespace, plan: Plan) -> None:
    """Ours and the plain loop side by side for two epochs each, with torch.profiler's table of the
    second epoch of ours (``fullscale_profile.txt`` beside the JSON, and in ``$OUT``)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from lightning_compress.cli import build_cli

    data_dir = str(Path(args.data_dir or default_data_dir()).resolve())
    cache_dir = str(Path(args.cache_dir or default_cache_dir()).resolve())
    plain = plain_loop_epoch_seconds(plan, data_dir, cache_dir, epochs=2)
    config = full_config("vgg19_cifar10/baseline.yaml", plan, data_dir, cache_dir)
    config["trainer"].update(max_epochs=2, logger=False, enable_checkpointing=False, callbacks=[])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

    class ProfileSecondEpoch(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                self.prof = torch_profile(activities=activities)
                self.prof.__enter__()

        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                sync_device()
                self.prof.__exit__(None, None, None)

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "profile.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = build_cli(["--config", str(config_path)], run=False)
    timer, prof = EpochTimer(), ProfileSecondEpoch()
    cli.trainer.callbacks.extend([timer, prof])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    text = (f"device: {_device_name()}\nplain loop: {plain}\nours epochs: {timer.seconds}\n\n"
            + prof.prof.key_averages().table(sort_by=sort, row_limit=40))
    path = Path(args.results).with_name("fullscale_profile.txt")
    path.write_text(text)
    out = os.environ.get("OUT") or args.out
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / path.name)
    print(text)


def main(argv: list[str] | None = None) -> None:
    ap = parser("fullscale", __doc__)
    ap.add_argument("--smoke", action="store_true", help="the CPU at tiny scale: VGG19 at 1/4 width, 96 images")
    ap.add_argument("--profile", action="store_true", help="two epochs of ours beside the plain loop, torch.profiler table")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--work", default=str(ROOT / "checkpoints" / "fullscale"), help="where the runs write their checkpoints")
    ap.add_argument("--results", default=str(RESULTS_FILE))
    ap.add_argument("--out", default=None, help="also copy the JSON here after each row (default: $OUT when set)")
    ap.add_argument("--only", nargs="*", default=None, help="row-name prefixes; vgg19/baseline is needed by every other row")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--baseline-epochs", type=int, default=None)
    ap.add_argument("--recipe-epochs", type=int, default=None)
    ap.add_argument("--train-subset", type=int, default=None, help="training images (default: all; smoke: 96)")
    ap.add_argument("--width", type=float, default=None, help="VGG19 width multiplier (default: 1; smoke: 0.25)")
    ap.add_argument("--budget", type=float, default=None, help="seconds; rows that would not finish in it are skipped")
    ap.add_argument("--compile", default=None, help="false, true or a torch.compile mode (default: 'default' on a GPU)")
    args = ap.parse_args(argv)
    plan = SMOKE if args.smoke else Plan()
    overrides = {"batch_size": args.batch_size, "baseline_epochs": args.baseline_epochs,
                 "recipe_epochs": args.recipe_epochs, "budget_seconds": args.budget,
                 "train_subset": args.train_subset, "width": args.width}
    if args.compile is not None:
        overrides["compile"] = {"false": False, "true": True}.get(args.compile.lower(), args.compile)
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    if plan.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("no GPU here: run with --smoke for the CPU check at tiny scale")
    if args.profile:
        profile(args, plan)
    else:
        table(args, plan)


if __name__ == "__main__":
    main()
