"""TensorDecomposition on the CPU proxy model: our rank allocation against per-mode energy ranks.

Starts from ``checkpoints/proxy/baseline.ckpt`` (``python -m benchmarks.proxy``). The peer is the
plain recipe of the DESIGN table: Tucker-2 of every 3x3 conv with per-mode energy ranks (TensorLy's
``partial_tucker``, exact ranks). Ours is ``target_compression`` set to the compression the peer
reached, ranks in multiples of 8: same parameter count, ranks allocated across the network. Both
are fine-tuned for ``--epochs`` with the same schedule; test accuracy on the proxy's 2,000 test images.

    python -m benchmarks.decomposition_proxy [--energy 0.8] [--epochs 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_compress import TensorDecomposition
from lightning_compress.methods.decomposition import factorize
from lightning_compress.methods.decomposition.apply import set_submodule

from .proxy import CHECKPOINT, proxy_datamodule, proxy_module, proxy_trainer

RESULTS = Path(__file__).parent / "results"


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def peer_energy_tucker(model: torch.nn.Module, energy: float) -> None:
    """The peer: TensorLy ``partial_tucker`` (10 HOOI sweeps) at per-mode energy ranks, exact ranks, always 3 stages."""
    from lightning_compress.methods.decomposition.ranks import energy_rank, spectrum

    for name, layer in list(model.named_modules()):
        if isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1) and layer.groups == 1:
            w = layer.weight.detach()
            r_out = energy_rank(spectrum(w.reshape(w.shape[0], -1)), energy)
            r_in = energy_rank(spectrum(w.transpose(0, 1).reshape(w.shape[1], -1)), energy)
            set_submodule(model, name, factorize.tucker2(layer, r_out, r_in, n_iter_max=10, solver="tensorly",
                                                          stages=(True, True)))


def _finetune(module, dm, epochs: int, callbacks: list) -> tuple[float, float, float]:
    trainer = proxy_trainer(epochs, callbacks, enable_progress_bar=False)
    before = trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"] if not callbacks else None
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    after = trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"]
    return before, after, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--energy", type=float, nargs="+", default=[0.8])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--output", default=str(RESULTS / "decomposition_proxy.json"))
    args = parser.parse_args()
    if not CHECKPOINT.is_file():
        raise SystemExit(f"{CHECKPOINT} is missing: run `python -m benchmarks.proxy` first")

    dm = proxy_datamodule(args.data_dir)
    baseline = proxy_module(weights=str(CHECKPOINT))
    dense_params = _params(baseline.model)
    base_acc = proxy_trainer(1, enable_progress_bar=False).test(baseline, datamodule=dm, verbose=False)[0]["test/acc"]
    rows = []
    for energy in args.energy:
        pl.seed_everything(0)
        peer = proxy_module(weights=str(CHECKPOINT), lr=args.lr)
        peer_energy_tucker(peer.model, energy)
        compression = dense_params / _params(peer.model)
        before, after, seconds = _finetune(peer, dm, args.epochs, [])
        rows.append({"method": f"peer: TensorLy partial_tucker, per-mode energy {energy}", "params": _params(peer.model),
                     "compression": compression, "test_acc_before_finetune": before, "test_acc": after,
                     "delta_points": 100 * (after - base_acc), "train_seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)

        pl.seed_everything(0)
        ours = proxy_module(weights=str(CHECKPOINT), lr=args.lr)
        callback = TensorDecomposition(method="tucker", target_compression=compression, rank_multiple=8,
                                       print_table=False, filename=None)
        callback.decompose(None, ours)
        before = proxy_trainer(1, enable_progress_bar=False).test(ours, datamodule=dm, verbose=False)[0]["test/acc"]
        _, after, seconds = _finetune(ours, dm, args.epochs, [callback])
        rows.append({"method": f"ours: target_compression={compression:.2f}, rank_multiple=8", "params": _params(ours.model),
                     "compression": dense_params / _params(ours.model), "test_acc_before_finetune": before,
                     "test_acc": after, "delta_points": 100 * (after - base_acc), "train_seconds": seconds,
                     "ranks": {d.name: d.ranks for d in callback.plan}})
        print(json.dumps(rows[-1]), flush=True)
    out = {"baseline_test_acc": base_acc, "dense_params": dense_params, "epochs": args.epochs, "lr": args.lr, "runs": rows}
    Path(args.output).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
