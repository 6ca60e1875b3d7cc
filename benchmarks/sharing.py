"""Weight sharing: product quantization against scalar k-means at equal packed-file bytes (CPU, digits).

``pq-vs-kmeans`` trains the digits CNN (``--width``) for ``--epochs``, then, from that one baseline,
shares every Conv / Linear layer (``start_epoch=0``), fine-tunes the centroids for
``--finetune-epochs`` and writes the packed file, for scalar k-means
(``WeightSharing(method="kmeans")``) at each of ``--kmeans-bits`` and product quantization
(``method="pq"``) at each of ``--pq-bits`` x ``--pq-sizes``. The first convolution, whose rows hold
9 weights, takes sub-vectors of 9 (one 3x3 kernel each) whatever the size. Every file is loaded into
a fresh network, which must hold the fine-tuned weights bit for bit, and its test accuracy is the
one reported. The comparison at equal bytes pairs each scalar point with the most accurate product
point whose file is no larger, and each product point with the most accurate scalar one. The test
split holds 270 images: one image is 0.37 points of accuracy.

    python -m benchmarks sharing pq-vs-kmeans
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_compress import DigitsDataModule, ImageClassifier, WeightSharing, load_compressed, save_compressed
from lightning_compress.models import create_model

from .common import machine, parser, write_result


def _module(width: int, lr: float) -> ImageClassifier:
    return ImageClassifier("digits_cnn", model_kwargs={"width": width}, optimizer="adamw", lr=lr, weight_decay=0.0)


def _trainer(epochs: int, callbacks: list, root: Path) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=callbacks, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, default_root_dir=root)


def _test_acc(network: torch.nn.Module, width: int, dm: DigitsDataModule, root: Path) -> float:
    module = _module(width, 1e-3)
    module.model.load_state_dict(network.state_dict())
    return float(_trainer(1, [], root).test(module, datamodule=dm, verbose=False)[0]["test/acc"])


def _share(args, dm: DigitsDataModule, baseline: dict, root: Path, method: str, bits: int, size: int | None) -> dict:
    pl.seed_everything(0)
    module = _module(args.width, args.finetune_lr)
    module.model.load_state_dict(baseline)
    name = f"{method}_b{bits}" + (f"_d{size}" if size else "")
    extra = {"method": "pq", "subvector_size": {"features.0": 9, "*": size}} if method == "pq" else {}
    sharing = WeightSharing(weight_bits=bits, start_epoch=0, export=str(root / f"{name}.lcpk"), **extra)
    start = time.perf_counter()
    _trainer(args.finetune_epochs, [sharing], root).fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    summary = sharing.artifact
    fresh = create_model("digits_cnn", width=args.width)
    load_compressed(summary.path, model=fresh)
    exact = all(torch.equal(fresh.state_dict()[k], v) for k, v in module.model.state_dict().items())
    if not exact:
        raise AssertionError(f"{name}: the packed file does not hold the fine-tuned weights")
    numel = sum(layer.numel for layer in summary.layers)
    weight_bytes = sum(layer.stored_bytes for layer in summary.layers)
    row = {
        "method": method, "weight_bits": bits, "subvector_size": size,
        "test_acc": round(_test_acc(fresh, args.width, dm, root), 4),
        "file_bytes": summary.file_bytes, "weight_bytes": weight_bytes,
        "bits_per_weight": round(8 * weight_bytes / numel, 3),
        "encodings": sorted({layer.encoding for layer in summary.layers}),
        "finetune_seconds": round(seconds, 1),
    }
    print(json.dumps(row))
    return row


def _at_equal_bytes(rows: list[dict], budget_method: str, other: str) -> list[dict]:
    """For each ``budget_method`` point: the most accurate ``other`` point whose file is no larger."""
    pairs = []
    for point in (r for r in rows if r["method"] == budget_method):
        fits = [r for r in rows if r["method"] == other and r["file_bytes"] <= point["file_bytes"]]
        best = max(fits, key=lambda r: (r["test_acc"], -r["file_bytes"]), default=None)
        pairs.append({
            budget_method: _label(point), f"{budget_method}_bytes": point["file_bytes"],
            f"{budget_method}_acc": point["test_acc"],
            other: None if best is None else _label(best), f"{other}_bytes": None if best is None else best["file_bytes"],
            f"{other}_acc": None if best is None else best["test_acc"],
        })
    return pairs


def _label(row: dict) -> str:
    return f"{row['weight_bits']} bits" + (f", sub-vectors of {row['subvector_size']}" if row["subvector_size"] else "")


def pq_vs_kmeans(args) -> None:
    torch.set_num_threads(args.threads)
    dm = DigitsDataModule(batch_size=64)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        pl.seed_everything(0)
        module = _module(args.width, args.lr)
        start = time.perf_counter()
        _trainer(args.epochs, [], root).fit(module, datamodule=dm)
        baseline_seconds = time.perf_counter() - start
        baseline = {k: v.clone() for k, v in module.model.state_dict().items()}
        dense = save_compressed(module.model, root / "dense.lcpk")
        base_acc = _test_acc(module.model, args.width, dm, root)
        rows = [_share(args, dm, baseline, root, "kmeans", bits, None) for bits in args.kmeans_bits]
        rows += [_share(args, dm, baseline, root, "pq", bits, size) for size in args.pq_sizes for bits in args.pq_bits]
    result = {
        "benchmark": "pq_vs_kmeans", "model": f"digits_cnn(width={args.width})", "data": "scikit-learn digits",
        "machine": machine(), "baseline_test_acc": round(base_acc, 4), "baseline_file_bytes": dense.file_bytes,
        "weights": sum(layer.numel for layer in dense.layers), "epochs": args.epochs,
        "baseline_seconds": round(baseline_seconds, 1), "finetune_epochs": args.finetune_epochs, "lr": args.lr,
        "finetune_lr": args.finetune_lr, "optimizer": "adamw",
        "results": rows,
        "kmeans_budget": _at_equal_bytes(rows, "kmeans", "pq"),
        "pq_budget": _at_equal_bytes(rows, "pq", "kmeans"),
    }
    write_result(args.output, result)
    print(json.dumps({k: result[k] for k in ("baseline_test_acc", "baseline_file_bytes", "kmeans_budget", "pq_budget")},
                     indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = parser("sharing", __doc__)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pq-vs-kmeans", help="product quantization vs scalar k-means at equal packed-file bytes")
    p.add_argument("--width", type=int, default=64, help="digits_cnn width (its convolutions have width, 2x, 4x channels)")
    p.add_argument("--epochs", type=int, default=5, help="baseline training epochs")
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--finetune-lr", type=float, default=0.001)
    p.add_argument("--kmeans-bits", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--pq-bits", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--pq-sizes", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default="pq_vs_kmeans_digits.json", help="file name under benchmarks/results/")
    args = ap.parse_args(argv)
    pq_vs_kmeans(args)


if __name__ == "__main__":
    main()
