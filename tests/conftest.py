from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_compress.data.cifar10_source import CLASSES

TRAIN_PER_CLASS = 6
TEST_PER_CLASS = 2


def write_tiny_cifar_zip(path: Path, prefix: str = "") -> Path:
    """A CIFAR-10-shaped JPEG zip: each image is one flat colour that encodes its class."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
            for label, name in enumerate(CLASSES):
                for i in range(count):
                    pixels = np.full((32, 32, 3), 20 + label * 25, dtype=np.uint8)
                    pixels[0, 0] = rng.integers(0, 255, 3)  # distinct files, same class colour
                    buf = io.BytesIO()
                    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
                    zf.writestr(f"{prefix}{split}/{name}/{i:04d}.jpg", buf.getvalue())
    return path


@pytest.fixture(scope="session")
def tiny_cifar_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cifar")
    write_tiny_cifar_zip(folder / "cifar10-jpeg.zip")
    return folder


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def real_cifar_dir() -> Path:
    """The full CIFAR-10 when LIGHTNING_COMPRESS_DATA points at a copy (CI does); else skip."""
    folder = os.environ.get("LIGHTNING_COMPRESS_DATA")
    if not folder or not (Path(folder) / "cifar10-jpeg.zip").is_file():
        pytest.skip("set LIGHTNING_COMPRESS_DATA to a folder with cifar10-jpeg.zip to run this test")
    return Path(folder)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist each worker is one process per core: torch's own threads would oversubscribe them.
    import torch

    torch.set_num_threads(1)
