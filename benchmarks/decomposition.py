"""TensorDecomposition on the CPU proxy model: our rank allocation against per-mode energy ranks.

Starts from ``checkpoints/proxy/baseline.ckpt`` (``python -m benchmarks proxy``). The peer is the
plain recipe of the DESIGN table: Tucker-2 of every 3x3 conv with per-mode energy ranks (TensorLy's
``partial_tucker``, exact ranks). Ours is ``target_compression`` set to the compression the peer
reached, ranks in multiples of 8: same parameter count, ranks allocated across the network. Both
are fine-tuned for ``--epochs`` with the same schedule; test accuracy on the proxy's 2,000 test images.

    python -m benchmarks decomposition [--energy 0.8] [--epochs 8]
"""

from __future__ import annotations

import json
import time

import lightning.pytorch as pl
import torch

from lightning_compress import TensorDecomposition

from .common import (RESULTS, machine, parser, peer_energy_tucker, proxy_baseline, proxy_datamodule, proxy_test,
                     proxy_trainer, write_result)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _finetune(module, dm, epochs: int, callbacks: list) -> tuple[float, float, float]:
    trainer = proxy_trainer(epochs, callbacks, enable_progress_bar=False)
    before = trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"] if not callbacks else None
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    after = trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"]
    return before, after, seconds


def main(argv: list[str] | None = None) -> None:
    ap = parser("decomposition", __doc__)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--energy", type=float, nargs="+", default=[0.8])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--output", default=str(RESULTS / "decomposition_proxy.json"))
    args = ap.parse_args(argv)

    dm = proxy_datamodule(args.data_dir)
    baseline = proxy_baseline()
    dense_params = _params(baseline.model)
    base_acc = proxy_test(baseline, dm)
    rows = []
    for energy in args.energy:
        pl.seed_everything(0)
        peer = proxy_baseline(lr=args.lr)
        peer_energy_tucker(peer.model, energy)
        compression = dense_params / _params(peer.model)
        before, after, seconds = _finetune(peer, dm, args.epochs, [])
        rows.append({"method": f"peer: TensorLy partial_tucker, per-mode energy {energy}", "params": _params(peer.model),
                     "compression": compression, "test_acc_before_finetune": before, "test_acc": after,
                     "delta_points": 100 * (after - base_acc), "train_seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)

        pl.seed_everything(0)
        ours = proxy_baseline(lr=args.lr)
        callback = TensorDecomposition(method="tucker", target_compression=compression, rank_multiple=8,
                                       print_table=False, filename=None)
        callback.decompose(None, ours)
        before = proxy_test(ours, dm)
        _, after, seconds = _finetune(ours, dm, args.epochs, [callback])
        rows.append({"method": f"ours: target_compression={compression:.2f}, rank_multiple=8", "params": _params(ours.model),
                     "compression": dense_params / _params(ours.model), "test_acc_before_finetune": before,
                     "test_acc": after, "delta_points": 100 * (after - base_acc), "train_seconds": seconds,
                     "ranks": {d.name: d.ranks for d in callback.plan}})
        print(json.dumps(rows[-1]), flush=True)
    write_result(args.output, {"machine": machine(), "baseline_test_acc": base_acc, "dense_params": dense_params,
                               "epochs": args.epochs, "lr": args.lr, "runs": rows})


if __name__ == "__main__":
    main()
