"""Deep Compression on the CPU proxy model: prune (AGP + rehabilitation) -> share (k-means) -> packed file.

Starts from ``checkpoints/proxy/baseline.ckpt`` (``python -m benchmarks proxy``); prunes globally to
``--sparsity`` along AGP over the first ``--ramp`` epochs with DNS rehabilitation, clusters every
layer into 2^``--bits`` centroids at epoch ``--share-epoch``, fine-tunes the centroids to the end
(once with the summed centroid gradient of the paper, once with its mean), and writes the packed file.
The ratio is against ``torch.save`` of the fp32 state dict of the same network.

    python -m benchmarks deep-compression
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_compress import IterativePruning, WeightSharing, load_compressed

from .common import (machine, parser, proxy_baseline, proxy_datamodule, proxy_module, proxy_test, proxy_trainer,
                     sparsity, write_result)


def main(argv: list[str] | None = None) -> None:
    ap = parser("deep-compression", __doc__)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--bits", type=int, default=5, help="WeightSharing's weight_bits")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--ramp", type=int, default=6)
    ap.add_argument("--share-epoch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.01)
    args = ap.parse_args(argv)

    dm = proxy_datamodule(args.data_dir)
    baseline = proxy_baseline()
    base_acc = proxy_test(baseline, dm)
    buffer = io.BytesIO()
    torch.save(baseline.model.state_dict(), buffer)
    fp32_bytes = buffer.getbuffer().nbytes

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for reduce in ("sum", "mean"):
            pl.seed_everything(0)
            path = Path(folder) / f"proxy_{reduce}.lcpk"
            module = proxy_baseline(lr=args.lr)
            callbacks = [
                IterativePruning(sparsity=args.sparsity, schedule="agp", start_epoch=0, end_epoch=args.ramp,
                                 frequency=100, scope="global", rehabilitation=True, log_layers=False),
                WeightSharing(weight_bits=args.bits, start_epoch=args.share_epoch, export=str(path), centroid_gradient=reduce),
            ]
            trainer = proxy_trainer(args.epochs, callbacks, enable_progress_bar=False, num_sanity_val_steps=0)
            start = time.perf_counter()
            trainer.fit(module, datamodule=dm)
            seconds = time.perf_counter() - start
            acc = trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"]
            # the file, loaded into a fresh network, must score the same
            fresh = proxy_module()
            load_compressed(path, model=fresh.model)
            file_acc = proxy_test(fresh, dm)
            summary = callbacks[1].artifact
            rows.append({
                "centroid_gradient": reduce,
                "sparsity": round(sparsity(module.model), 4),
                "test_acc": round(acc, 4),
                "test_acc_from_file": round(file_acc, 4),
                "delta_points": round(100 * (acc - base_acc), 2),
                "file_bytes": path.stat().st_size,
                "ratio_vs_fp32_state_dict": round(fp32_bytes / path.stat().st_size, 1),
                "stages_bytes": summary.stages(),
                "train_seconds": round(seconds, 1),
            })
            print(rows[-1])
    result = {
        "benchmark": "deep_compression_proxy", "model": "vgg_proxy", "machine": machine(),
        "baseline_test_acc": round(base_acc, 4), "fp32_state_dict_bytes": fp32_bytes,
        "sparsity_target": args.sparsity, "bits": args.bits, "epochs": args.epochs, "ramp_epochs": args.ramp,
        "share_epoch": args.share_epoch, "lr": args.lr, "optimizer": "sgd", "results": rows,
    }
    write_result("deep_compression_proxy.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
