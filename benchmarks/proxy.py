"""The CPU proxy benchmark: a quarter-width VGG11-BN on a fixed CIFAR-10 subset.

When no GPU is at hand, compression is measured against this model: the same layer types and depth
pattern as the VGG19 of the recipes, trained to a stable accuracy in minutes on two CPU cores. The
protocol (data, schedule, starting weights) lives in ``benchmarks/common.py`` so that every proxy
benchmark measures its technique on identical terms.

    python -m benchmarks proxy    # trains the baseline with seeds 0 and 1, writes
                                  # benchmarks/results/proxy_baseline.json and, of seed 0,
                                  # checkpoints/proxy/baseline.ckpt
"""

from __future__ import annotations

import json
import time

import lightning.pytorch as pl

from lightning_compress import ImageClassifier

from .common import (CHECKPOINT, EPOCHS, TEST_IMAGES, TRAIN_IMAGES, machine, parser, proxy_datamodule, proxy_module,
                     proxy_trainer, write_result)


def train_once(data_dir: str | None, epochs: int, seed: int) -> tuple[ImageClassifier, pl.Trainer, float, float]:
    pl.seed_everything(seed, workers=True)
    dm, module = proxy_datamodule(data_dir), proxy_module()
    trainer = proxy_trainer(epochs, enable_progress_bar=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    train_s = time.perf_counter() - start
    test_acc = trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"]
    return module, trainer, test_acc, train_s


def main(argv: list[str] | None = None) -> None:
    ap = parser("proxy", __doc__)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the first seed's model is saved")
    args = ap.parse_args(argv)

    runs = []
    for i, seed in enumerate(args.seeds):
        module, trainer, test_acc, train_s = train_once(args.data_dir, args.epochs, seed)
        runs.append({"seed": seed, "test_acc": round(test_acc, 4), "train_seconds": round(train_s, 1),
                     "seconds_per_epoch": round(train_s / args.epochs, 2)})
        print(runs[-1])
        if i == 0:
            CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(CHECKPOINT)
    accs = [r["test_acc"] for r in runs]
    result = {
        "benchmark": "proxy_baseline",
        "machine": machine(),
        "model": "vgg_proxy",
        "params": sum(p.numel() for p in module.model.parameters()),
        "train_images": TRAIN_IMAGES,
        "test_images": TEST_IMAGES,
        "epochs": args.epochs,
        "test_acc_mean": round(sum(accs) / len(accs), 4),
        "test_acc_range": [min(accs), max(accs)],
        "runs": runs,
        "checkpoint_seed": args.seeds[0],
    }
    write_result("proxy_baseline.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
