"""Find CIFAR-10 on disk (or download it), decode it once, and cache it as uint8 tensors.

Readable sources, looked for in this order under ``data_dir``:

1. a cache file written by an earlier run (in ``cache_dir``, keyed by the source's path, size and mtime);
2. ``cifar-10-batches-py/``: torchvision's download (read with ``torchvision.datasets.CIFAR10``);
3. ``cifar10-jpeg.zip`` (or ``data_dir`` itself being such a zip): ``train/<class>/*.jpg`` and
   ``test/<class>/*.jpg``, possibly under one top folder;
4. the same layout unpacked as folders;
5. with ``download=True``, torchvision's download into ``data_dir``.

A cache file that does not load or fails its checks (keys, dtypes, shapes, label counts, CRC-32 of the
tensors) is reported with a warning, removed and rebuilt from the source. A source file that is damaged
or incomplete raises :class:`DamagedDataError` naming the file.
"""

from __future__ import annotations

import hashlib
import os
import uuid
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DATA_ENV = "LIGHTNING_COMPRESS_DATA"
CACHE_ENV = "LIGHTNING_COMPRESS_CACHE"
ZIP_NAME = "cifar10-jpeg.zip"
BATCHES_DIR = "cifar-10-batches-py"
# 2: the cache file carries a CRC-32 of its tensors. Part of the cache key, so files of version 1
# (no CRC) are never read and reported as damaged; they are simply no longer used.
_CACHE_VERSION = 2
_DECODE_CHUNK = 2048  # images per decode_jpeg call: bounds the memory of the list of byte tensors
_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
_CRC_KEY = "crc32"
# What zipfile raises on a truncated or overwritten archive: on opening, or only when a member is read.
_ZIP_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error)


class DamagedDataError(ValueError):
    """A CIFAR-10 source file is damaged or incomplete; the message names the file and the fix."""


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
    # A damaged zip fails is_zipfile; named *.zip it is still meant as the source, and reading it then
    # says that it is damaged rather than that no data was found.
    if data_dir.is_file() and (data_dir.suffix.lower() == ".zip" or zipfile.is_zipfile(data_dir)):
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


def _damaged(path: Path, problem: str) -> DamagedDataError:
    return DamagedDataError(
        f"The CIFAR-10 source {path} is damaged or incomplete: {problem}.\n"
        "An interrupted download or copy, or a full disk, leaves a file like this. To fix: re-download or "
        f"re-copy it, or point data_dir (--data.data_dir PATH) or the {DATA_ENV} environment variable at an "
        "intact copy."
    )


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


def _as_bytes_tensor(blob: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def _decode_all(blobs: list[bytes], names: list[str], source: Path, in_zip: bool) -> torch.Tensor:
    """Decode JPEGs ``names`` (members of the zip ``source``, or files under the folder ``source``)."""

    def culprit(name: str, problem: str) -> DamagedDataError:
        return _damaged(source, f"its member {name!r} {problem}") if in_zip else _damaged(source / name, problem)

    images = []
    for start in range(0, len(blobs), _DECODE_CHUNK):
        chunk = blobs[start : start + _DECODE_CHUNK]
        try:
            images.extend(decode_jpeg([_as_bytes_tensor(b) for b in chunk], mode=ImageReadMode.RGB))
        except (RuntimeError, ValueError):  # ValueError: torch.frombuffer of an empty file
            # One batched call does not say which image failed: decode them one by one to name it.
            for blob, name in zip(chunk, names[start : start + _DECODE_CHUNK]):
                try:
                    decode_jpeg(_as_bytes_tensor(blob), mode=ImageReadMode.RGB)
                except (RuntimeError, ValueError) as err:
                    raise culprit(name, f"does not decode as a JPEG ({err})") from err
            raise
    for image, name in zip(images, names):
        if image.shape != (3, 32, 32):
            where = f"{source}, member {name!r}" if in_zip else f"{source / name}"
            raise ValueError(
                f"{where} decodes to a {image.shape[1]}x{image.shape[2]} image; CIFAR-10 images are 32x32 RGB. "
                f"To fix: point data_dir (--data.data_dir PATH) or {DATA_ENV} at CIFAR-10 itself."
            )
    return torch.stack(images) if images else torch.empty(0, 3, 32, 32, dtype=torch.uint8)


def _split_members(names: list[str], split: str) -> list[tuple[str, int]]:
    """``(name, label)`` of the JPEGs of one split, in a fixed order (class, then file name)."""
    members = []
    for name in names:
        parts = name.split("/")
        if len(parts) >= 3 and parts[-3] == split and parts[-2] in CLASSES and name.lower().endswith((".jpg", ".jpeg")):
            members.append((name, CLASSES.index(parts[-2])))
    return sorted(members, key=lambda m: (m[1], m[0]))


def _read_zip(path: Path) -> CIFAR10Arrays:
    try:
        archive = zipfile.ZipFile(path)
    except _ZIP_ERRORS as err:
        raise _damaged(path, f"it does not open as a zip archive ({err})") from err
    with archive as zf:
        names = zf.namelist()
        tensors = {}
        for split in ("train", "test"):
            members = _split_members(names, split)
            if not members:
                raise ValueError(f"{path} holds no {split}/<class>/*.jpg files (classes: {', '.join(CLASSES)})")
            blobs = []
            for name, _ in members:
                try:
                    blobs.append(zf.read(name))
                except _ZIP_ERRORS as err:
                    raise _damaged(path, f"its member {name!r} does not read ({err})") from err
            tensors[f"{split}_images"] = _decode_all(blobs, [n for n, _ in members], path, in_zip=True)
            tensors[f"{split}_labels"] = torch.tensor([label for _, label in members], dtype=torch.int64)
    return CIFAR10Arrays(**tensors)


def _read_folder(root: Path) -> CIFAR10Arrays:
    tensors = {}
    for split in ("train", "test"):
        files = [str(p.relative_to(root).as_posix()) for p in (root / split).glob("*/*") if p.is_file()]
        members = _split_members(files, split)
        if not members:
            raise ValueError(f"{root / split} holds no <class>/*.jpg files (classes: {', '.join(CLASSES)})")
        blobs = [(root / n).read_bytes() for n, _ in members]
        tensors[f"{split}_images"] = _decode_all(blobs, [n for n, _ in members], root, in_zip=False)
        tensors[f"{split}_labels"] = torch.tensor([label for _, label in members], dtype=torch.int64)
    return CIFAR10Arrays(**tensors)


def _read_torchvision(root: Path, download: bool) -> CIFAR10Arrays:
    from torchvision.datasets import CIFAR10

    tensors = {}
    for split, train in (("train", True), ("test", False)):
        try:
            ds = CIFAR10(str(root), train=train, download=download)
        except RuntimeError as err:  # its md5 check: a batch file is missing, truncated or edited
            if download:
                raise
            raise _damaged(root / BATCHES_DIR, f"torchvision rejects it ({err})") from err
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


def _checksum(tensors: dict[str, torch.Tensor]) -> int:
    # torch.load checks the archive's structure but not the tensors' bytes: overwritten bytes inside a
    # tensor load silently. CRC-32 of ~180 MB takes well under a second next to the load itself.
    crc = 0
    for key in _KEYS:
        tensor = tensors[key].contiguous()
        crc = zlib.crc32(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}".encode(), crc)
        crc = zlib.crc32(tensor.numpy(), crc)
    return crc


def _cache_problem(payload: object) -> str | None:
    """Why ``payload`` (what ``torch.load`` returned) is not a sound cache, or None if it is."""
    if not isinstance(payload, dict) or set(payload) != {*_KEYS, _CRC_KEY}:
        found = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        return f"it holds {found}, not the keys {[*_KEYS, _CRC_KEY]}"
    for split in ("train", "test"):
        images, labels = payload[f"{split}_images"], payload[f"{split}_labels"]
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)):
            return f"{split}_images is not a uint8 tensor of shape (N, 3, 32, 32)"
        if not (isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and labels.shape == (len(images),)):
            return f"{split}_labels is not an int64 tensor of {len(images)} labels, one per image"
        if not len(labels):
            return f"it holds no {split} images"
        if labels.min() < 0 or labels.max() >= len(CLASSES):
            return f"{split}_labels holds values outside 0..{len(CLASSES) - 1}"
    if not isinstance(payload[_CRC_KEY], int) or payload[_CRC_KEY] != _checksum(payload):
        return "its tensors do not match their CRC-32 (bytes changed after writing)"
    return None


def _load_cache(target: Path) -> CIFAR10Arrays | None:
    """The cache at ``target``; None when there is none, or it is damaged (then warned about and removed)."""
    if not target.is_file():
        return None
    try:
        # weights_only: a cache file is plain tensors, and loading it must never run code.
        payload = torch.load(target, weights_only=True, map_location="cpu")
    except MemoryError:
        raise
    except Exception as err:  # truncated: OSError or RuntimeError; garbage: UnpicklingError; and others
        # torch's messages run on with advice about checkpoints that does not apply here: keep the cause.
        cause = (str(err).splitlines() or [""])[0].split(". ")[0][:200]
        problem = f"torch.load fails on it ({type(err).__name__}: {cause})"
    else:
        problem = _cache_problem(payload)
    if problem is None:
        return CIFAR10Arrays(**{key: payload[key] for key in _KEYS})
    warnings.warn(
        f"The CIFAR-10 cache file {target} is damaged or unreadable ({problem}); it is removed and rebuilt "
        "from the source. A full disk, a disk error or an interrupted copy of the cache folder leaves such files.",
        stacklevel=4,
    )
    # Removed before rebuilding: a full disk is a common cause, and the rebuild needs the room.
    target.unlink(missing_ok=True)
    return None


def _write_cache(target: Path, data: CIFAR10Arrays) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = data.as_dict()
    payload = {**tensors, _CRC_KEY: _checksum(tensors)}
    # A uniquely named file in the same folder, then one rename: a reader (another rank, a later run)
    # finds no file or a whole one at ``target``, never the half that an interrupted write leaves.
    tmp = target.with_name(f"{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # else after a crash the rename can be on disk before the data is
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _cached(data_dir: Path, cache_dir: Path, download: bool) -> tuple[Path, CIFAR10Arrays]:
    kind, path = _locate(data_dir, download)
    target = cache_path(cache_dir, kind, path)
    data = _load_cache(target)
    if data is None:
        reader = {"zip": _read_zip, "folder": _read_folder}.get(kind)
        data = reader(path) if reader else _read_torchvision(path, download=False)
        _write_cache(target, data)
    return target, data


def prepare_cifar10(data_dir: Path, cache_dir: Path, download: bool = False) -> Path:
    """Make sure a sound decoded cache exists (decoding the source if it is missing or damaged); return its path."""
    return _cached(data_dir, cache_dir, download)[0]


def load_cifar10(data_dir: Path, cache_dir: Path, download: bool = False) -> CIFAR10Arrays:
    """Decoded CIFAR-10 from the cache (building it first if it is missing or damaged)."""
    return _cached(data_dir, cache_dir, download)[1]
