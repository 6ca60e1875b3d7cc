"""TensorDecomposition on the CPU proxy model: our rank allocation against per-mode energy ranks.

Starts from ``checkpoints/proxy/baseline.ckpt`` (``python -m benchmarks proxy``). The peer is the
plain recipe of the DESIGN table: Tucker-2 of every 3x3 conv with per-mode energy ranks (TensorLy's
``partial_tucker``, exact ranks). Ours is ``target_compression`` set to the compression the peer
reached, ranks in multiples of 8: same parameter count, ranks allocated across the network. Both
are fine-tuned for ``--epochs`` with the same schedule; test accuracy on the proxy's 2,000 test images.

    python -m benchmarks decomposition [--energy 0.8] [--epochs 8]

``flattened-vs-cp`` compares, on the digits CNN (scikit-learn's 8x8 digits, seconds on a CPU), the
flattened convolutions of Jin et al. 2014 against CP at the same parameter count per layer, and the
tensor train against Tucker-2 likewise: every 3x3 conv of the trained network is factorized by each
method (CP's rank, Tucker's ranks are the largest whose layer has no more parameters than the other's),
then the same fine-tuning; reconstruction errors, and test accuracy before and after fine-tuning.

    python -m benchmarks decomposition flattened-vs-cp [--terms 1 2] [--tt-rank 0.5] [--epochs 8]
"""

from __future__ import annotations

import copy
import json
import time

import lightning.pytorch as pl
import torch

from lightning_compress import DigitsDataModule, ImageClassifier, TensorDecomposition
from lightning_compress.methods.decomposition import Geometry, factorize
from lightning_compress.methods.decomposition.apply import set_submodule
from lightning_compress.methods.decomposition.flattened import flattened, flattened_full_terms
from lightning_compress.methods.decomposition.layers import cp_params, tucker_params
from lightning_compress.methods.decomposition.tensor_train import clamp_tt_ranks, tensor_train, tt_bounds

from .common import (RESULTS, cp_like, machine, parser, peer_energy_tucker, proxy_baseline, proxy_datamodule, proxy_test,
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


def _digits_trainer(epochs: int) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def _digits_test(module, dm) -> float:
    return _digits_trainer(1).test(module, datamodule=dm, verbose=False)[0]["test/acc"]


def _tucker_like(layer, params: int):
    """Tucker-2 at the largest ranks, in the layer's channel ratio, with no more than ``params`` parameters."""
    g = Geometry.of(layer)
    for r_out in range(g.out_features, 0, -1):
        r_in = max(1, round(r_out * g.in_features / g.out_features))
        if tucker_params(r_out, r_in, g) <= params:
            return factorize.tucker2(layer, r_out, r_in)
    return factorize.tucker2(layer, 1, 1)


def _term_norm_ratio(chain, dense: torch.Tensor) -> float | None:
    """Root of the summed squared norms of the rank-1 terms over the kernel's norm, for CP and flattened
    chains: at most 1 when the terms are orthogonal, far above when large terms cancel (a degenerate CP,
    which fine-tuning handles badly)."""
    if chain.method not in ("cp", "flattened"):
        return None
    first = chain.reduce if chain.method == "cp" else chain.lateral
    norms = [first.weight.flatten(1).norm(dim=1), chain.vertical.weight.flatten(1).norm(dim=1),
             chain.horizontal.weight.flatten(1).norm(dim=1)]
    if chain.method == "cp":
        norms.append(chain.expand.weight.flatten(2).norm(dim=(0, 2)))
    return round(float(torch.stack(norms).prod(0).norm() / dense.norm()), 3)


def _factorized(trained, names: list[str], build) -> tuple[ImageClassifier, dict]:
    module = copy.deepcopy(trained)
    layers = {}
    for name in names:
        layer = module.model.get_submodule(name)
        new = build(name, layer)
        set_submodule(module.model, name, new)
        layers[name] = {"method": new.method, "ranks": list(new.ranks), "params": new.params,
                        "dense_params": Geometry.of(layer).params, "error": round(new.error, 5),
                        "term_norm_ratio": _term_norm_ratio(new, layer.weight.detach())}
    return module, layers


def flattened_vs_cp(args) -> None:
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed)
    dm = DigitsDataModule(batch_size=64)
    trained = ImageClassifier("digits_cnn", model_kwargs={"width": args.width}, optimizer="sgd", lr=args.lr)
    _digits_trainer(args.epochs).fit(trained, datamodule=dm)
    base_acc = _digits_test(trained, dm)
    names = [n for n, m in trained.model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    pairs = []
    for terms in args.terms:
        def flat(name, layer, s=terms):
            return flattened(layer, min(s, flattened_full_terms(Geometry.of(layer))))
        pairs.append((f"flattened, {terms} term(s) per filter", flat, cp_like))
    for fraction in args.tt_rank:
        def tt(name, layer, f=fraction):
            g = Geometry.of(layer)
            return tensor_train(layer, clamp_tt_ranks(g, [max(1, round(f * b)) for b in tt_bounds(g)]))
        pairs.append((f"tt, rank fraction {fraction}", tt, _tucker_like))
    rows = []
    for label, first, peer in pairs:
        module_a, layers_a = _factorized(trained, names, first)
        module_b, layers_b = _factorized(trained, names, lambda n, layer: peer(layer, layers_a[n]["params"]))
        for module, layers in ((module_a, layers_a), (module_b, layers_b)):
            before = _digits_test(module, dm)
            pl.seed_everything(args.seed)
            module.hparams.lr = args.finetune_lr
            start = time.perf_counter()
            _digits_trainer(args.finetune_epochs).fit(module, datamodule=dm)
            row = {"comparison": label, "method": next(iter(layers.values()))["method"],
                   "params": _params(module.model), "factorized_params": sum(v["params"] for v in layers.values()),
                   "dense_layer_params": sum(v["dense_params"] for v in layers.values()),
                   "mean_error": round(sum(v["error"] for v in layers.values()) / len(layers), 5),
                   "test_acc_before_finetune": before, "test_acc": _digits_test(module, dm),
                   "finetune_seconds": round(time.perf_counter() - start, 2), "layers": layers}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
    write_result(args.output, {"machine": machine(), "model": f"digits_cnn(width={args.width})", "epochs": args.epochs,
                               "finetune_epochs": args.finetune_epochs, "lr": args.lr, "finetune_lr": args.finetune_lr,
                               "seed": args.seed, "dense_params": _params(trained.model), "baseline_test_acc": base_acc,
                               "runs": rows})


def main(argv: list[str] | None = None) -> None:
    ap = parser("decomposition", __doc__)
    sub = ap.add_subparsers(dest="what", metavar="{flattened-vs-cp}", help="(none: the proxy comparison below)")
    p = sub.add_parser("flattened-vs-cp", help="flattened vs CP, TT vs Tucker-2, at equal parameters on the digits CNN")
    p.add_argument("--terms", type=int, nargs="+", default=[1, 2], help="flattened terms per filter")
    p.add_argument("--tt-rank", type=float, nargs="+", default=[0.5], help="TT ranks as fractions of each unfolding's")
    p.add_argument("--width", type=int, default=32, help="digits_cnn width (channels of the first conv)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs of the dense network")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=str(RESULTS / "decomposition_flattened_digits.json"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--energy", type=float, nargs="+", default=[0.8])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--output", default=str(RESULTS / "decomposition_proxy.json"))
    args = ap.parse_args(argv)
    if args.what == "flattened-vs-cp":
        return flattened_vs_cp(args)

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
