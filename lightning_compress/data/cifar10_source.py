"""Find CIFAR-10 on disk (or download it), decode it once, and cache it as uint8 tensors.

Readable sources, looked for in this order under ``data_dir``:

1. a cache file written by an earlier run (in ``cache_dir``, keyed by the source's path, size and mtime);
2. ``cifar-10-batches-py/``: torchvision's download (read with ``torchvision.datasets.CIFAR10``);
3. ``cifar10-jpeg.zip`` (or ``data_dir`` itself being such a zip): ``train/<class>/*.jpg`` and
   ``test/<class>/*.jpg``, possibly under one top folder;
4. the same layout unpacked as folders;
5. with ``download=True``, torchvision's download into ``data_dir``.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DATA_ENV = "LIGHTNING_COMPRESS_DATA"
CACHE_ENV = "LIGHTNING_COMPRESS_CACHE"
ZIP_NAME = "cifar10-jpeg.zip"
BATCHES_DIR = "cifar-10-batches-py"
_CACHE_VERSION = 1
_DECODE_CHUNK = 2048  # images per decode_jpeg call: bounds the memory of the list of byte tensors


@dataclass
class CIFAR10Arrays:
    """The whole data set as uint8 ``(N, 3, 32, 32)`` images and int64 labels."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.__dict__)


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV, "data")).expanduser()


def default_cache_dir() -> Path:
    if CACHE_ENV in os.environ:
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning_compress"


def find_source(data_dir: Path) -> tuple[str, Path] | None:
    """Return ``(kind, path)`` of the first readable source under ``data_dir``, or None."""
    if data_dir.is_file() and zipfile.is_zipfile(data_dir):
        return "zip", data_dir
    if (data_dir / BATCHES_DIR / "data_batch_1").is_file():
        return "batches", data_dir
    if (data_dir / ZIP_NAME).is_file():
        return "zip", data_dir / ZIP_NAME
    for root in (data_dir, data_dir / "cifar10-jpeg", data_dir / "CIFAR-10-images"):
        if (root / "train" / CLASSES[0]).is_dir() and (root / "test" / CLASSES[0]).is_dir():
            return "folder", root
    return None


def not_found_message(data_dir: Path, download: bool, error: Exception | None = None) -> str:
    lines = [
        f"CIFAR-10 was not found under data_dir={str(data_dir)!r} (resolved: {data_dir.resolve()}).",
        "Looked for:",
        f"  - {data_dir / BATCHES_DIR}/ (torchvision's download)",
        f"  - {data_dir / ZIP_NAME} (JPEG zip: train/<class>/*.jpg, test/<class>/*.jpg)",
        f"  - {data_dir}/train/<class>/ and {data_dir}/test/<class>/ (the zip unpacked)",
    ]
    if download:
        lines.append(f"The download failed too: {error!r}")
    lines += [
        "To fix: pass download=True on a machine with internet access (--data.download true), or point",
        f"data_dir (--data.data_dir PATH) or the {DATA_ENV} environment variable at a folder holding one of these.",
    ]
    return "\n".join(lines)


def _fingerprint(kind: str, path: Path) -> str:
    stat = path.stat()
    if path.is_dir():  # a folder's mtime does not see edits inside class folders; count the files instead
        size = sum(1 for _ in path.glob("*/*/*"))
    else:
        size = stat.st_size
    key = f"{_CACHE_VERSION}|{kind}|{path.resolve()}|{size}|{stat.st_mtime_ns}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def cache_path(cache_dir: Path, kind: str, path: Path) -> Path:
    return cache_dir / f"cifar10-{kind}-{_fingerprint(kind, path)}.pt"


def _decode_all(blobs: list[bytes]) -> torch.Tensor:
    images = []
    for start in range(0, len(blobs), _DECODE_CHUNK):
        chunk = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs[start : start + _DECODE_CHUNK]]
        images.extend(decode_jpeg(chunk, mode=ImageReadMode.RGB))
    out = torch.stack(images) if images else torch.empty(0, 3, 32, 32, dtype=torch.uint8)
    if out.shape[1:] != (3, 32, 32):
        raise ValueError(f"expected 32x32 RGB images, decoded shape {tuple(out.shape[1:])}")
    return out


def _split_members(names: list[str], split: str) -> list[tuple[str, int]]:
    """``(name, label)`` of the JPEGs of one split, in a fixed order (class, then file name)."""
    members = []
    for name in names:
        parts = name.split("/")
        if len(parts) >= 3 and parts[-3] == split and parts[-2] in CLASSES and name.lower().endswith((".jpg", ".jpeg")):
            members.append((name, CLASSES.index(parts[-2])))
    return sorted(members, key=lambda m: (m[1], m[0]))


def _read_zip(path: Path) -> CIFAR10Arrays:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        tensors = {}
        for split in ("train", "test"):
            members = _split_members(names, split)
            if not members:
                raise ValueError(f"{path} holds no {split}/<class>/*.jpg files (classes: {', '.join(CLASSES)})")
            tensors[f"{split}_images"] = _decode_all([zf.read(n) for n, _ in members])
            tensors[f"{split}_labels"] = torch.tensor([label for _, label in members], dtype=torch.int64)
    return CIFAR10Arrays(**tensors)


def _read_folder(root: Path) -> CIFAR10Arrays:
    tensors = {}
    for split in ("train", "test"):
        files = [str(p.relative_to(root).as_posix()) for p in (root / split).glob("*/*") if p.is_file()]
        members = _split_members(files, split)
        if not members:
            raise ValueError(f"{root / split} holds no <class>/*.jpg files (classes: {', '.join(CLASSES)})")
        tensors[f"{split}_images"] = _decode_all([(root / n).read_bytes() for n, _ in members])
        tensors[f"{split}_labels"] = torch.tensor([label for _, label in members], dtype=torch.int64)
    return CIFAR10Arrays(**tensors)


def _read_torchvision(root: Path, download: bool) -> CIFAR10Arrays:
    from torchvision.datasets import CIFAR10

    tensors = {}
    for split, train in (("train", True), ("test", False)):
        ds = CIFAR10(str(root), train=train, download=download)
        tensors[f"{split}_images"] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        tensors[f"{split}_labels"] = torch.tensor(ds.targets, dtype=torch.int64)
    return CIFAR10Arrays(**tensors)


def _locate(data_dir: Path, download: bool) -> tuple[str, Path]:
    source = find_source(data_dir)
    if source is not None:
        return source
    if download:
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            _read_torchvision(data_dir, download=True)
        except Exception as err:  # offline, DNS, disk: all end in the same advice
            raise FileNotFoundError(not_found_message(data_dir, download, err)) from err
        return "batches", data_dir
    raise FileNotFoundError(not_found_message(data_dir, download))


def prepare_cifar10(data_dir: Path, cache_dir: Path, download: bool = False) -> Path:
    """Make sure a decoded cache exists (decoding the source once if not); return its path."""
    kind, path = _locate(data_dir, download)
    target = cache_path(cache_dir, kind, path)
    if target.is_file():
        return target
    arrays = {"zip": _read_zip, "folder": _read_folder}.get(kind)
    data = arrays(path) if arrays else _read_torchvision(path, download=False)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write then rename: an interrupted run never leaves a half-written cache behind.
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    torch.save(data.as_dict(), tmp)
    os.replace(tmp, target)
    return target


def load_cifar10(data_dir: Path, cache_dir: Path, download: bool = False) -> CIFAR10Arrays:
    """Decoded CIFAR-10 from the cache (building it first if needed)."""
    target = prepare_cifar10(data_dir, cache_dir, download)
    # weights_only: a cache file is plain tensors, and loading it must never run code.
    return CIFAR10Arrays(**torch.load(target, weights_only=True))
