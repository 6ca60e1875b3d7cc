"""IterativePruning against no pruning and against Lightning's ModelPruning, on the CPU proxy model.

Three measurements, each written to ``benchmarks/results/pruning_<name>.json``:

* ``overhead``: mean training-step time (forward, backward, optimizer step and every callback hook,
  mask updates included) of the dense model, of IterativePruning (AGP, masks updated every 100 steps,
  with and without rehabilitation) and of ModelPruning at the same sparsity. Configurations run
  round-robin, ``--repeats`` times, and each keeps its fastest repeat (the least disturbed by the rest
  of the machine); ratios are against the dense run of the same process.
* ``accuracy``: fine-tune the proxy baseline (``checkpoints/proxy/baseline.ckpt``, from
  ``python -m benchmarks.proxy``) for the same epochs with the same optimizer under (a) ModelPruning,
  global L1, pruned at each epoch end along the cubic ramp, no lottery-ticket resets, and
  (b) IterativePruning, global AGP along the same ramp, with and without rehabilitation.
* ``filter_latency``: CPU inference latency of a VGG19 whose filters were pruned 50% (physically
  removed) against the dense VGG19, batch 1 and 32, with the MAC reduction beside it.

    python -m benchmarks.pruning_proxy overhead
    python -m benchmarks.pruning_proxy accuracy --sparsity 0.9 0.98
    python -m benchmarks.pruning_proxy filter_latency
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lightning_compress import IterativePruning, compression_report
from lightning_compress.methods.pruning.channels import find_channel_groups
from lightning_compress.methods.pruning.pruner import Pruner
from lightning_compress.models import create_model

from .proxy import CHECKPOINT, proxy_datamodule, proxy_module, proxy_trainer

RESULTS = Path(__file__).parent / "results"


def _device() -> str:
    return f"CPU, {torch.get_num_threads()} threads ({platform.machine()})"


def _write(name: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"pruning_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


class StepTimer(pl.Callback):
    """Wall time from the first hook of a training batch to the last (put it first in the list)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


def cubic(step_fraction: float, final: float) -> float:
    return final * (1.0 - (1.0 - min(1.0, step_fraction)) ** 3)


def model_pruning(model: nn.Module, final: float, ramp_epochs: int) -> ModelPruning:
    """Lightning's ModelPruning along the cubic ramp: at the end of epoch e the sparsity is s(e + 1).

    torch.nn.utils.prune's ``amount`` is a fraction of the weights still unpruned, so each epoch's
    amount is the share of the survivors that must go to reach the next point of the ramp.
    """

    def amount(epoch: int) -> float:
        before = cubic(epoch / ramp_epochs, final)
        after = cubic((epoch + 1) / ramp_epochs, final)
        return max(0.0, (after - before) / (1.0 - before))

    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return ModelPruning(
        "l1_unstructured",
        parameters_to_prune=layers,
        amount=amount,
        use_global_unstructured=True,
        use_lottery_ticket_hypothesis=False,
        make_pruning_permanent=True,
        verbose=0,
    )


def overhead(args) -> None:
    def configs(module):
        return {
            "dense": [],
            "iterative_pruning": [IterativePruning(sparsity=0.9, schedule="agp", start_epoch=0, end_epoch=2,
                                                   frequency=100, scope="global", log_layers=False)],
            "iterative_pruning_rehabilitation": [IterativePruning(sparsity=0.9, schedule="agp", start_epoch=0,
                                                                  end_epoch=2, frequency=100, scope="global",
                                                                  rehabilitation=True, log_layers=False)],
            # amount 0.9 at the first epoch end: the second epoch runs at the same sparsity as ours.
            "lightning_model_pruning": [model_pruning(module.model, 0.9, ramp_epochs=1)],
        }

    names = list(configs(proxy_module()))
    best: dict[str, float] = {}
    for repeat in range(args.repeats):
        for name in names:
            pl.seed_everything(0)
            module = proxy_module()
            timer = StepTimer()
            trainer = proxy_trainer(2, [timer] + configs(module)[name], limit_train_batches=args.batches,
                                    limit_val_batches=0, enable_progress_bar=False)
            trainer.fit(module, datamodule=proxy_datamodule(args.data_dir))
            mean = statistics.fmean(timer.times[2:])  # the first steps warm up allocators
            best[name] = min(best.get(name, float("inf")), mean)
            print(f"repeat {repeat} {name}: {mean * 1e3:.1f} ms/step")
    _write("overhead", {
        "benchmark": "pruning_overhead",
        "model": "vgg_proxy", "device": _device(), "batch_size": 128, "steps_per_run": 2 * args.batches,
        "repeats": args.repeats, "sparsity": 0.9, "mask_update_every_steps": 100,
        "seconds_per_step": {k: round(v, 5) for k, v in best.items()},
        "ratio_vs_dense": {k: round(v / best["dense"], 3) for k, v in best.items()},
        "ratio_vs_model_pruning": {k: round(v / best["lightning_model_pruning"], 3) for k, v in best.items()},
    })


def _sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return 1 - sum(int(torch.count_nonzero(w)) for w in weights) / sum(w.numel() for w in weights)


def accuracy(args) -> None:
    if not CHECKPOINT.is_file():
        raise SystemExit(f"{CHECKPOINT} is missing: run `python -m benchmarks.proxy` first")
    ramp = args.epochs - args.final_epochs
    rows = []
    for seed, final in [(seed, final) for final in args.sparsity for seed in args.seeds]:
        methods = {
            "lightning_model_pruning": lambda m: [model_pruning(m.model, final, ramp)],
            "iterative_pruning_agp": lambda m: [IterativePruning(sparsity=final, schedule="agp", start_epoch=0,
                                                                 end_epoch=ramp, frequency=100, scope="global",
                                                                 log_layers=False)],
            "iterative_pruning_agp_rehabilitation": lambda m: [IterativePruning(
                sparsity=final, schedule="agp", start_epoch=0, end_epoch=ramp, frequency=100, scope="global",
                rehabilitation=True, log_layers=False)],
        }
        for name, make in methods.items():
            pl.seed_everything(seed)
            module = proxy_module(weights=str(CHECKPOINT), lr=args.lr)
            trainer = proxy_trainer(args.epochs, make(module), enable_progress_bar=False, num_sanity_val_steps=0)
            start = time.perf_counter()
            dm = proxy_datamodule(args.data_dir)
            trainer.fit(module, datamodule=dm)
            seconds = time.perf_counter() - start
            test = trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"]
            rows.append({"method": name, "seed": seed, "target_sparsity": final,
                         "sparsity": round(_sparsity(module.model), 4),
                         "test_acc": round(test, 4), "train_seconds": round(seconds, 1)})
            print(rows[-1])
    baseline = proxy_module(weights=str(CHECKPOINT))
    trainer = proxy_trainer(1, enable_progress_bar=False)
    base_acc = trainer.test(baseline, datamodule=proxy_datamodule(args.data_dir), verbose=False)[0]["test/acc"]
    for row in rows:
        row["delta_points"] = round(100 * (row["test_acc"] - base_acc), 2)
    _write(args.output, {
        "benchmark": "pruning_accuracy", "model": "vgg_proxy", "device": _device(),
        "baseline_test_acc": round(base_acc, 4), "epochs": args.epochs, "ramp_epochs": ramp, "lr": args.lr,
        "note": "same start weights, optimizer, schedule and epochs for every method; global magnitude ranking; "
                "train_seconds are wall times on a shared machine, not a speed comparison (see pruning_overhead.json)",
        "results": rows,
    })


def _latency(model: nn.Module, batch: int, repeats: int) -> float:
    x = torch.randn(batch, 3, 32, 32)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def filter_latency(args) -> None:
    torch.manual_seed(0)
    dense = create_model("vgg19_bn").eval()
    slim = create_model("vgg19_bn")
    slim.load_state_dict(dense.state_dict())
    groups = find_channel_groups(slim)
    pruner = Pruner(slim, list(groups), structure="filter", groups=groups)
    pruner.attach()
    pruner.update(args.filter_sparsity, first=True)
    pruner.finalize()
    slim.eval()
    macs_dense = compression_report(dense, (3, 32, 32)).macs
    macs_slim = compression_report(slim, (3, 32, 32)).macs
    result = {"benchmark": "pruning_filter_latency", "model": "vgg19_bn", "device": _device(),
              "filter_sparsity": args.filter_sparsity,
              "params": {"dense": sum(p.numel() for p in dense.parameters()),
                         "slim": sum(p.numel() for p in slim.parameters())},
              "macs": {"dense": macs_dense, "slim": macs_slim},
              "mac_reduction": round(macs_dense / macs_slim, 2), "latency_s": {}, "speedup": {}}
    for batch in (1, 32):
        # interleaved so that both models see the same machine state
        d, s = [], []
        for _ in range(3):
            d.append(_latency(dense, batch, args.repeats))
            s.append(_latency(slim, batch, args.repeats))
        result["latency_s"][f"batch_{batch}"] = {"dense": round(min(d), 5), "slim": round(min(s), 5)}
        result["speedup"][f"batch_{batch}"] = round(min(d) / min(s), 2)
    _write("filter_latency", result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("overhead")
    p.add_argument("--batches", type=int, default=100, help="training batches per epoch (2 epochs)")
    p.add_argument("--repeats", type=int, default=2)
    p = sub.add_parser("accuracy")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.98])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--final-epochs", type=int, default=4, help="epochs at the final sparsity after the ramp")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--output", default="accuracy", help="results/pruning_<output>.json")
    p = sub.add_parser("filter_latency")
    p.add_argument("--filter-sparsity", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=10)
    for p in sub.choices.values():
        p.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    {"overhead": overhead, "accuracy": accuracy, "filter_latency": filter_latency}[args.what](args)


if __name__ == "__main__":
    main()
