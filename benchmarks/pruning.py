"""IterativePruning against no pruning and against Lightning's ModelPruning, on the CPU proxy model.

Three measurements, each written to ``benchmarks/results/pruning_<name>.json``:

* ``overhead``: mean training-step time (forward, backward, optimizer step and every callback hook,
  mask updates included) of the dense model, of IterativePruning (AGP, masks updated every 100 steps,
  with and without rehabilitation) and of ModelPruning at the same sparsity. Configurations run
  round-robin, ``--repeats`` times, and each keeps its fastest repeat (the least disturbed by the rest
  of the machine); ratios are against the dense run of the same process.
* ``accuracy``: fine-tune the proxy baseline (``checkpoints/proxy/baseline.ckpt``, from
  ``python -m benchmarks proxy``) for the same epochs with the same optimizer under (a) ModelPruning,
  global L1, pruned at each epoch end along the cubic ramp, no lottery-ticket resets, and
  (b) IterativePruning, global AGP along the same ramp, with and without rehabilitation.
* ``filter-latency``: CPU inference latency of a VGG19 whose filters were pruned 50% (physically
  removed) against the dense VGG19, batch 1 and 32, with the MAC reduction beside it.

    python -m benchmarks pruning overhead
    python -m benchmarks pruning accuracy --sparsity 0.9 0.98
    python -m benchmarks pruning filter-latency
    python -m benchmarks pruning coverage       # ours and Torch-Pruning (the peers extra) on ten networks

* ``coverage``: which networks our coupled filter pruning and Torch-Pruning's dependency graph can
  prune, at the same per-layer ratio of channels: MACs, parameters and batch-1 torch latency of each.
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import lightning.pytorch as pl
import torch

from lightning_compress import IterativePruning, compression_report
from lightning_compress.methods.pruning.channels import analyse_channels, find_channel_groups
from lightning_compress.methods.pruning.pruner import Pruner
from lightning_compress.models import create_model

from .common import (StepTimer, machine, median_seconds, model_latency, torch_pruning, model_pruning, parser, proxy_baseline, proxy_datamodule,
                     proxy_module, proxy_test, proxy_trainer, sparsity, write_result)


def _write(name: str, result: dict) -> None:
    write_result(f"pruning_{name}.json", result)
    print(json.dumps(result, indent=2))


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
        "model": "vgg_proxy", "machine": machine(), "batch_size": 128, "steps_per_run": 2 * args.batches,
        "repeats": args.repeats, "sparsity": 0.9, "mask_update_every_steps": 100,
        "seconds_per_step": {k: round(v, 5) for k, v in best.items()},
        "ratio_vs_dense": {k: round(v / best["dense"], 3) for k, v in best.items()},
        "ratio_vs_model_pruning": {k: round(v / best["lightning_model_pruning"], 3) for k, v in best.items()},
    })


def accuracy(args) -> None:
    proxy_baseline()  # fails early, before any training, when the checkpoint is missing
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
            module = proxy_baseline(lr=args.lr)
            trainer = proxy_trainer(args.epochs, make(module), enable_progress_bar=False, num_sanity_val_steps=0)
            start = time.perf_counter()
            dm = proxy_datamodule(args.data_dir)
            trainer.fit(module, datamodule=dm)
            seconds = time.perf_counter() - start
            test = trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"]
            rows.append({"method": name, "seed": seed, "target_sparsity": final,
                         "sparsity": round(sparsity(module.model), 4),
                         "test_acc": round(test, 4), "train_seconds": round(seconds, 1)})
            print(rows[-1])
    base_acc = proxy_test(proxy_baseline(), proxy_datamodule(args.data_dir))
    for row in rows:
        row["delta_points"] = round(100 * (row["test_acc"] - base_acc), 2)
    _write(args.output, {
        "benchmark": "pruning_accuracy", "model": "vgg_proxy", "machine": machine(),
        "baseline_test_acc": round(base_acc, 4), "epochs": args.epochs, "ramp_epochs": ramp, "lr": args.lr,
        "note": "same start weights, optimizer, schedule and epochs for every method; global magnitude ranking; "
                "train_seconds are wall times on a shared machine, not a speed comparison (see pruning_overhead.json)",
        "results": rows,
    })


def filter_latency(args) -> None:
    torch.manual_seed(0)
    dense = create_model("vgg19_bn").eval()
    slim = create_model("vgg19_bn")
    slim.load_state_dict(dense.state_dict())
    channels = analyse_channels(slim)
    pruner = Pruner(slim, find_channel_groups(slim, channels), structure="filter", channels=channels)
    pruner.attach()
    pruner.update(args.filter_sparsity, first=True)
    pruner.finalize()
    slim.eval()
    macs_dense = compression_report(dense, (3, 32, 32)).macs
    macs_slim = compression_report(slim, (3, 32, 32)).macs
    result = {"benchmark": "pruning_filter_latency", "model": "vgg19_bn", "machine": machine(),
              "filter_sparsity": args.filter_sparsity,
              "params": {"dense": sum(p.numel() for p in dense.parameters()),
                         "slim": sum(p.numel() for p in slim.parameters())},
              "macs": {"dense": macs_dense, "slim": macs_slim},
              "mac_reduction": round(macs_dense / macs_slim, 2), "latency_s": {}, "speedup": {}}
    for batch in (1, 32):
        # interleaved so that both models see the same machine state
        d, s = [], []
        for _ in range(3):
            d.append(model_latency(dense, batch, args.repeats))
            s.append(model_latency(slim, batch, args.repeats))
        result["latency_s"][f"batch_{batch}"] = {"dense": round(min(d), 5), "slim": round(min(s), 5)}
        result["speedup"][f"batch_{batch}"] = round(min(d) / min(s), 2)
    _write("filter_latency", result)


def _coverage_nets() -> dict:
    import torchvision.models as tv

    return {  # name: (builder, input side)
        "vgg19_bn": (lambda: create_model("vgg19_bn"), 32),
        "resnet18 (torchvision)": (lambda: tv.resnet18(num_classes=10), 32),
        "resnet50 (torchvision)": (lambda: tv.resnet50(num_classes=10), 32),
        "mobilenet_v2": (lambda: create_model("mobilenet_v2"), 32),
        "mobilenet_v3_small (torchvision)": (lambda: tv.mobilenet_v3_small(num_classes=10), 64),
        "shufflenet_v2_x1_0": (lambda: create_model("shufflenet_v2_x1_0"), 32),
        "shufflenet_v2_x1_0 (torchvision)": (lambda: tv.shufflenet_v2_x1_0(num_classes=10), 64),
        "squeezenet1_0 (torchvision)": (lambda: tv.squeezenet1_0(num_classes=10), 64),
        "squeezenet1_1": (lambda: create_model("squeezenet1_1"), 32),
        "xception": (lambda: create_model("xception"), 32),
    }


def _ours(model: torch.nn.Module, ratio: float) -> None:
    channels = analyse_channels(model)
    pruner = Pruner(model, find_channel_groups(model, channels), structure="filter", channels=channels)
    pruner.attach()
    pruner.update(ratio, first=True)
    pruner.finalize()


def coverage(args) -> None:
    """Which networks each library prunes, at the same per-layer channel ratio: MACs, parameters, batch-1 latency."""
    from importlib import metadata

    rows = []
    for name, (build, side) in _coverage_nets().items():
        torch.manual_seed(0)
        dense = build().eval()
        example = torch.randn(1, 3, side, side)
        size = (3, side, side)
        row = {"model": name, "input": list(size), "macs_dense": compression_report(dense, size).macs,
               "params_dense": sum(p.numel() for p in dense.parameters())}
        convs = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
        row["plain_convs"] = len(convs)
        row["plain_convs_we_prune"] = len(find_channel_groups(dense))
        models = {"dense": dense}
        for library, prune in (("ours", lambda m: _ours(m, args.ratio)),
                               ("torch_pruning", lambda m: torch_pruning(m, args.ratio, example))):
            model = copy.deepcopy(dense)
            try:
                prune(model)
                model.eval()
                with torch.no_grad():
                    model(example)
            except Exception as err:  # the finding itself: which library cannot prune which network
                row[library] = {"error": f"{type(err).__name__}: {err}"[:300]}
                continue
            macs = compression_report(model, size).macs
            row[library] = {"macs": macs, "mac_reduction": round(row["macs_dense"] / macs, 2),
                            "params": sum(p.numel() for p in model.parameters())}
            models[library] = model
        with torch.inference_mode():
            seconds = median_seconds({k: (lambda m=m: m(example)) for k, m in models.items()}, args.repeats)
        for library in models:
            if library != "dense":
                row[library]["latency_ms"] = round(1000 * seconds[library], 3)
                row[library]["speedup"] = round(seconds["dense"] / seconds[library], 2)
        row["latency_ms_dense"] = round(1000 * seconds["dense"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    _write("coverage", {"benchmark": "pruning_coverage", "machine": machine(), "ratio": args.ratio,
                        "torch_pruning": metadata.version("torch-pruning"), "threads": torch.get_num_threads(),
                        "note": "random weights (structure only); both prune a fraction `ratio` of each layer's (group's) "
                                "channels by L1 magnitude, the output layer kept; latency: torch eager, batch 1, "
                                "median of interleaved runs",
                        "results": rows})


def main(argv: list[str] | None = None) -> None:
    ap = parser("pruning", __doc__)
    sub = ap.add_subparsers(dest="what", required=True)
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
    p = sub.add_parser("coverage", help="which nets ours and Torch-Pruning prune (needs torch-pruning)")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=20)
    p = sub.add_parser("filter-latency")
    p.add_argument("--filter-sparsity", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=10)
    for p in sub.choices.values():
        p.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    {"overhead": overhead, "accuracy": accuracy, "filter-latency": filter_latency, "coverage": coverage}[args.what](args)


if __name__ == "__main__":
    main()
