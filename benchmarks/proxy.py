"""The CPU proxy benchmark: a quarter-width VGG11-BN on a fixed CIFAR-10 subset.

When no GPU is at hand, compression is measured against this model: the same layer types and depth
pattern as the VGG19 of the recipes, trained to a stable accuracy in minutes on two CPU cores.
Later benchmarks import ``proxy_datamodule``, ``proxy_module`` and ``proxy_trainer`` so that every
technique is measured on identical data, schedule and starting weights.

    python -m benchmarks.proxy            # trains the baseline with seeds 0 and 1, writes
                                          # benchmarks/results/proxy_baseline.json and, of seed 0,
                                          # checkpoints/proxy/baseline.ckpt
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_compress import CIFAR10DataModule, ImageClassifier

RESULTS = Path(__file__).parent / "results"
CHECKPOINT = Path("checkpoints/proxy/baseline.ckpt")

# The fixed protocol: change it and every earlier proxy figure stops being comparable.
TRAIN_IMAGES = 10_000
TEST_IMAGES = 2_000
BATCH_SIZE = 128
EPOCHS = 15
LR = 0.05


def proxy_datamodule(data_dir: str | None = None, batch_size: int = BATCH_SIZE) -> CIFAR10DataModule:
    # val_size 0: validation is the fixed 2,000-image test subset, so every epoch reports the figure.
    return CIFAR10DataModule(
        data_dir, batch_size=batch_size, val_size=0, train_subset=TRAIN_IMAGES, test_subset=TEST_IMAGES, split_seed=0
    )


def proxy_module(weights: str | None = None, lr: float = LR) -> ImageClassifier:
    return ImageClassifier("vgg_proxy", optimizer="sgd", lr=lr, weight_decay=5e-4, scheduler="cosine", weights=weights)


def proxy_trainer(max_epochs: int = EPOCHS, callbacks: list | None = None, **kwargs) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=callbacks or [],
        enable_model_summary=False,
        deterministic=True,
        **kwargs,
    )


def train_once(data_dir: str | None, epochs: int, seed: int) -> tuple[ImageClassifier, pl.Trainer, float, float]:
    pl.seed_everything(seed, workers=True)
    dm, module = proxy_datamodule(data_dir), proxy_module()
    trainer = proxy_trainer(epochs, enable_progress_bar=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    train_s = time.perf_counter() - start
    test_acc = trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"]
    return module, trainer, test_acc, train_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the first seed's model is saved")
    args = parser.parse_args()

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
        "model": "vgg_proxy",
        "params": sum(p.numel() for p in module.model.parameters()),
        "train_images": TRAIN_IMAGES,
        "test_images": TEST_IMAGES,
        "epochs": args.epochs,
        "test_acc_mean": round(sum(accs) / len(accs), 4),
        "test_acc_range": [min(accs), max(accs)],
        "runs": runs,
        "checkpoint_seed": args.seeds[0],
        "device": f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "proxy_baseline.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
