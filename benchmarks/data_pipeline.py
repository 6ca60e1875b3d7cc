"""Throughput of CIFAR10DataModule against plain tensor indexing and per-image torchvision transforms.

Measured in one run, on whatever CPU (or GPU, with --device cuda) this runs on:

* cold start: decode the source into the cache; warm start: a fresh data module loading the cache;
* images/s through the training loader plus ``on_after_batch_transfer`` (crop, flip, normalise);
* the same number of batches by plain indexing of the uint8 tensor plus normalisation (the floor:
  no augmentation at all), and by torchvision.transforms.v2 applied per image in ``__getitem__``
  (the usual pipeline), both with the default collate.

    python -m benchmarks data-pipeline [--data-dir DIR] [--device cpu]
"""

from __future__ import annotations

import json
import tempfile
import time

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_compress import CIFAR10DataModule
from lightning_compress.data.augment import normalize
from lightning_compress.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD

from .common import machine, parser, write_result


class _FakeTrainer:
    training = True
    global_step = 0
    global_rank = 0


class PerImageTransforms(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        from torchvision.transforms import v2

        self.images, self.labels = images, labels
        self.transform = v2.Compose([
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def _rate(batches, device: torch.device, step) -> float:
    n, start = 0, time.perf_counter()
    for images, labels in batches:
        images, labels = step(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        n += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    ap = parser("data-pipeline", __doc__)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--device", default="cpu", help="where the batches go (cpu, cuda)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--batches", type=int, default=100)
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as cache:
        dm = CIFAR10DataModule(args.data_dir, batch_size=args.batch_size, val_size=0, cache_dir=cache)
        start = time.perf_counter()
        dm.prepare_data()
        dm.setup()
        cold = time.perf_counter() - start
        start = time.perf_counter()
        warm_dm = CIFAR10DataModule(args.data_dir, batch_size=args.batch_size, val_size=0, cache_dir=cache)
        warm_dm.prepare_data()
        warm_dm.setup()
        warm = time.perf_counter() - start

    dm.trainer = _FakeTrainer()  # so on_after_batch_transfer augments, as in training
    loader = dm.train_dataloader()

    def take(it):
        return (b for _, b in zip(range(args.batches), it))

    ours = _rate(take(iter(loader)), device, lambda x, y: dm.on_after_batch_transfer((x, y), 0))

    images, labels = dm.train_set.images, dm.train_set.labels

    def plain_batches():
        for _ in range(args.batches):
            idx = torch.randint(0, len(labels), (args.batch_size,))
            yield images[idx], labels[idx]

    plain = _rate(plain_batches(), device, lambda x, y: (normalize(x, CIFAR10_MEAN, CIFAR10_STD), y))
    per_image_loader = DataLoader(PerImageTransforms(images, labels), batch_size=args.batch_size, shuffle=True)
    per_image = _rate(take(iter(per_image_loader)), device, lambda x, y: (x, y))

    result = {
        "benchmark": "data_pipeline",
        "machine": machine(),
        "device": str(device),  # the device the batches were moved to, one of the settings
        "batch_size": args.batch_size,
        "batches": args.batches,
        "cold_start_s": round(cold, 2),
        "warm_start_s": round(warm, 2),
        "images_per_s": {
            "datamodule_with_device_augmentation": round(ours),
            "plain_tensor_indexing_no_augmentation": round(plain),
            "torchvision_v2_per_image": round(per_image),
        },
        "ratio_datamodule_vs_plain": round(ours / plain, 3),
        "ratio_datamodule_vs_per_image": round(ours / per_image, 2),
    }
    write_result(f"data_pipeline_{device.type}.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
