"""TensorDecomposition on VGG19-BN / CIFAR-10: accuracy after fine-tuning, training step time, latency.

    python -m benchmarks decomposition-vgg19 train --output results.json
        Trains the baseline (``--baseline-epochs``, the recipe's settings: SGD + Nesterov, cosine, label
        smoothing 0.1, bf16-mixed and channels_last on a GPU), then for each ``--targets`` factor:
        Tucker-2 with ``target_compression`` (whole-model parameters), test accuracy right after the
        factorization, ``--finetune-epochs`` of fine-tuning, test accuracy and seconds per epoch. The
        dense and decomposed models' training step times are also measured on one synthetic batch in
        the same process (ratios, not absolute figures, are the claim). Meant for a GPU; runs anywhere.
    python -m benchmarks decomposition-vgg19 speed
        CPU: seconds to plan and factorize all 16 convolutions, and inference latency dense vs
        decomposed at batch 1 and 32, beside the MAC reduction.

Results go to ``benchmarks/results/`` (``--output`` to change), written after each phase so an
interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_compress import CIFAR10DataModule, ImageClassifier, TensorDecomposition, compression_report
from lightning_compress.methods.decomposition import apply_plan, plan_decomposition, plan_from_state
from lightning_compress.models import create_model

from .common import RESULTS, EpochTimer, machine, model_latency, parser, peer_energy_tucker, write_result


def _trainer(epochs: int, callbacks: list, gpu: bool) -> pl.Trainer:
    return pl.Trainer(
        accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-mixed" if gpu else "32-true",
        max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        benchmark=gpu,
    )


def _module(lr: float, weights: str | None = None) -> ImageClassifier:
    return ImageClassifier("vgg19_bn", optimizer="sgd", lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4,
                           scheduler="cosine", label_smoothing=0.1, channels_last=True, weights=weights)


def _test(module: ImageClassifier, dm: CIFAR10DataModule, gpu: bool) -> float:
    return float(_trainer(1, [], gpu).test(module, datamodule=dm, verbose=False)[0]["test/acc"])


def step_seconds(model: torch.nn.Module, batch: int, steps: int, device: torch.device) -> float:
    """Median seconds of one SGD training step on a synthetic batch (bf16 autocast on a GPU)."""
    model = model.to(device).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    gpu = device.type == "cuda"
    times = []
    for i in range(steps + 10):
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if gpu:
            torch.cuda.synchronize()
        if i >= 10:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train(args: argparse.Namespace) -> None:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    torch.set_float32_matmul_precision("high")
    out = {"machine": machine(), "settings": vars(args).copy(), "runs": []}

    def save() -> None:
        write_result(args.output, out)

    dm = CIFAR10DataModule(args.data_dir, batch_size=args.batch_size, val_size=0, train_subset=args.train_subset,
                           test_subset=args.test_subset)
    pl.seed_everything(0)
    baseline = _module(args.lr)
    timer = EpochTimer()
    start = time.perf_counter()
    _trainer(args.baseline_epochs, [timer], gpu).fit(baseline, datamodule=dm)
    base_acc = _test(baseline, dm, gpu)
    ckpt = Path(tempfile.gettempdir()) / "decomposition_vgg19_baseline.pt"  # 80 MB: not a result to keep
    torch.save({"state_dict": {f"model.{k}": v for k, v in baseline.model.state_dict().items()}}, ckpt)
    out["baseline"] = {
        "epochs": args.baseline_epochs, "test_acc": base_acc, "params": _params(baseline.model),
        "epoch_seconds": timer.seconds, "median_epoch_seconds": sorted(timer.seconds)[len(timer.seconds) // 2],
        "wall_seconds": time.perf_counter() - start,
    }
    save()
    print(json.dumps(out["baseline"]), flush=True)

    for target in args.targets:
        pl.seed_everything(0)
        module = _module(args.finetune_lr, weights=str(ckpt))
        decomposition = TensorDecomposition(method="tucker", target_compression=target, rank_multiple=args.rank_multiple,
                                            print_table=False, filename=None)
        factorize_start = time.perf_counter()
        decomposition.decompose(None, module)
        factorize_seconds = time.perf_counter() - factorize_start
        acc_before = _test(module, dm, gpu)
        timer = EpochTimer()
        start = time.perf_counter()
        # The callback's work is done (decomposed=True): it now only records the plan in checkpoints.
        _trainer(args.finetune_epochs, [decomposition, timer], gpu).fit(module, datamodule=dm)
        acc_after = _test(module, dm, gpu)
        report = compression_report(module.model, input_size=(3, 32, 32))
        run = {
            "method": "tucker", "target_compression": target, "rank_multiple": args.rank_multiple,
            "params": _params(module.model), "compression": out["baseline"]["params"] / _params(module.model),
            "macs": report.macs, "factorize_seconds": factorize_seconds,
            "test_acc_before_finetune": acc_before, "test_acc": acc_after, "delta_points": 100 * (acc_after - base_acc),
            "finetune_epochs": args.finetune_epochs, "epoch_seconds": timer.seconds,
            "median_epoch_seconds": sorted(timer.seconds)[len(timer.seconds) // 2],
            "layers": [d.to_dict() for d in decomposition.plan],
        }
        run["epoch_time_vs_dense"] = run["median_epoch_seconds"] / out["baseline"]["median_epoch_seconds"]
        out["runs"].append(run)
        save()
        print(json.dumps({k: v for k, v in run.items() if k not in ("layers", "epoch_seconds")}), flush=True)

    # Step time of the same architectures on one synthetic batch, dense first, in this process.
    dense = create_model("vgg19_bn")
    dense_macs = compression_report(dense, input_size=(3, 32, 32)).macs
    steps = {"dense": step_seconds(dense, args.batch_size, args.steps, device)}
    for target in args.targets:
        model = create_model("vgg19_bn")
        model.load_state_dict(baseline.model.state_dict())
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        apply_plan(model, plan_decomposition(model, names, "tucker", target_compression=target, rank_multiple=args.rank_multiple))
        steps[f"tucker_{target:g}x"] = step_seconds(model, args.batch_size, args.steps, device)
        steps[f"tucker_{target:g}x_mac_reduction"] = dense_macs / compression_report(model, input_size=(3, 32, 32)).macs
    out["step_seconds"] = steps
    out["step_time_vs_dense"] = {k: v / steps["dense"] for k, v in steps.items() if not k.endswith("reduction")}
    save()
    print(json.dumps(out["step_time_vs_dense"]), flush=True)

    for energy in args.peer_energy:
        # The peer of the DESIGN table: TensorLy partial_tucker at per-mode energy ranks, exact ranks.
        pl.seed_everything(0)
        peer = _module(args.finetune_lr, weights=str(ckpt))
        factorize_start = time.perf_counter()
        peer_energy_tucker(peer.model, energy)
        factorize_seconds = time.perf_counter() - factorize_start
        peer.model.to(memory_format=torch.channels_last)
        steps[f"peer_energy_{energy:g}"] = step_seconds(copy.deepcopy(peer.model), args.batch_size, args.steps, device)
        out["step_time_vs_dense"][f"peer_energy_{energy:g}"] = steps[f"peer_energy_{energy:g}"] / steps["dense"]
        acc_before = _test(peer, dm, gpu)
        timer = EpochTimer()
        _trainer(args.peer_epochs, [timer], gpu).fit(peer, datamodule=dm)
        acc_after = _test(peer, dm, gpu)
        run = {
            "method": f"peer: TensorLy partial_tucker, per-mode energy {energy:g}, exact ranks",
            "params": _params(peer.model), "compression": out["baseline"]["params"] / _params(peer.model),
            "factorize_seconds": factorize_seconds, "test_acc_before_finetune": acc_before, "test_acc": acc_after,
            "delta_points": 100 * (acc_after - base_acc), "finetune_epochs": args.peer_epochs,
            "epoch_seconds": timer.seconds, "median_epoch_seconds": sorted(timer.seconds)[len(timer.seconds) // 2],
        }
        run["epoch_time_vs_dense"] = run["median_epoch_seconds"] / out["baseline"]["median_epoch_seconds"]
        out["peers"] = out.get("peers", []) + [run]
        save()
        print(json.dumps({k: v for k, v in run.items() if k != "epoch_seconds"}), flush=True)
    ckpt.unlink(missing_ok=True)


def speed(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    dense = create_model("vgg19_bn").eval()
    if args.weights:
        dense.load_state_dict({k[len("model."):]: v for k, v in torch.load(args.weights, weights_only=True)["state_dict"].items()})
    names = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Conv2d)]
    dense_report = compression_report(dense, input_size=(3, 32, 32))
    rows = []
    dense_latency = {b: model_latency(dense.eval(), b, args.repeats) for b in (1, 32)}
    trained_plans = {}
    if args.plans:
        # Ranks chosen from trained weights (the GPU run's JSON): the architecture whose latency counts.
        trained_plans = {run["target_compression"]: plan_from_state(run["layers"])
                         for run in json.loads(Path(args.plans).read_text())["runs"]}
    for target in args.targets:
        model = create_model("vgg19_bn").eval()
        model.load_state_dict(dense.state_dict())
        start = time.perf_counter()
        plan = plan_decomposition(model, names, "tucker", target_compression=target, rank_multiple=args.rank_multiple)
        planned = time.perf_counter()
        apply_plan(model, plan)
        done = time.perf_counter()
        if target in trained_plans:
            model = create_model("vgg19_bn").eval()
            apply_plan(model, trained_plans[target], from_weights=False)
        report = compression_report(model, input_size=(3, 32, 32))
        latency = {b: model_latency(model.eval(), b, args.repeats) for b in (1, 32)}
        rows.append({
            "target_compression": target, "params": report.params, "compression": dense_report.params / report.params,
            "mac_reduction": dense_report.macs / report.macs, "plan_seconds": planned - start,
            "factorize_seconds": done - planned, "total_seconds": done - start,
            "ranks_from": "trained weights (--plans)" if target in trained_plans else "the weights above",
            "latency_seconds": latency, "speedup": {b: dense_latency[b] / latency[b] for b in latency},
        })
        print(json.dumps(rows[-1]), flush=True)
    out = {"machine": machine(), "weights": args.weights or "random init (seed 0)", "plans": args.plans,
           "dense_params": dense_report.params, "dense_macs": dense_report.macs, "dense_latency_seconds": dense_latency,
           "runs": rows}
    write_result(args.output, out)


def main(argv: list[str] | None = None) -> None:
    ap = parser("decomposition-vgg19", __doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data-dir", default=None)
    t.add_argument("--output", default=str(RESULTS / "decomposition_vgg19_gpu.json"))
    t.add_argument("--baseline-epochs", type=int, default=60)
    t.add_argument("--finetune-epochs", type=int, default=30)
    t.add_argument("--targets", type=float, nargs="+", default=[30.0, 15.0])
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--finetune-lr", type=float, default=0.02)
    t.add_argument("--rank-multiple", type=int, default=8)
    t.add_argument("--steps", type=int, default=50, help="timed steps of the synthetic step benchmark")
    t.add_argument("--peer-energy", type=float, nargs="*", default=[0.8],
                   help="also fine-tune the TensorLy energy-rank peer at these energies (none: skip)")
    t.add_argument("--peer-epochs", type=int, default=20)
    t.add_argument("--train-subset", type=int, default=None)
    t.add_argument("--test-subset", type=int, default=None)
    s = sub.add_parser("speed")
    s.add_argument("--output", default=str(RESULTS / "decomposition_vgg19_cpu_speed.json"))
    s.add_argument("--targets", type=float, nargs="+", default=[15.0, 30.0])
    s.add_argument("--rank-multiple", type=int, default=8)
    s.add_argument("--repeats", type=int, default=20)
    s.add_argument("--weights", default=None, help="a checkpoint of trained weights (default: random init)")
    s.add_argument("--plans", default=None, help="a `train` results JSON: measure latency at its ranks")
    args = ap.parse_args(argv)
    train(args) if args.command == "train" else speed(args)


if __name__ == "__main__":
    main()
