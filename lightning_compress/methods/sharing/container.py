"""The packed file's container: header, manifest and payload, each checked with SHA-256.

:func:`write_packed` lays out the parts of every tensor (from :mod:`.tensor_codecs`) and writes the
file atomically (:mod:`..atomic`); :func:`read_packed` checks it before anything is decoded. Nothing
is pickled, so reading a file never runs code. The checksums catch damage, not intent (anyone can
recompute them): :mod:`.validation` then checks what the manifest declares.

File layout (integers little-endian)::

    offset  size  field
    0       4     magic b"LCPK"
    4       2     format version (2; version 1 files, whose manifest is not compressed, still load)
    6       2     reserved, 0
    8       8     manifest length m
    16      32    SHA-256 of the manifest
    48      m     manifest, zlib-compressed UTF-8 JSON: {"format", "version", "payload_bytes", "payload_sha256",
                  "tensors": [{"name", "dtype", "shape", "encoding", "parts": {part: [offset, length]},
                  and per encoding "kind", "index_bits", "codebook_size", "source"}]}
    48 + m        payload: every tensor's parts back to back; offsets are relative to its start
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path
from typing import Any

from ..atomic import atomic_open

MAGIC = b"LCPK"
FORMAT_VERSION = 2
# Version 2 compresses the manifest with zlib: its JSON repeats key names for every tensor, and in a
# small pruned and shared model it was a fifth of the file (14 KB of 78 KB for a quarter-width VGG19).
READABLE_VERSIONS = (1, 2)

HEADER = struct.Struct("<4sHHQ32s")

# The manifest inflates at most this much (plus MANIFEST_FLOOR): zlib can inflate 1000-fold, and the
# JSON is parsed whole. The writer's manifests inflate 5 to 15 times (key names repeat per tensor).
MANIFEST_EXPANSION = 64
MANIFEST_FLOOR = 1 << 20


def write_packed(path: Path, entries: list[tuple[dict[str, Any], dict[str, bytes]]]) -> tuple[bytes, int]:
    """Lay the parts out, write header + manifest + payload; return the manifest and payload size."""
    payload_hash = hashlib.sha256()
    offset = 0
    tensors = []
    for meta, parts in entries:
        meta["parts"] = {}
        for part, data in parts.items():
            meta["parts"][part] = [offset, len(data)]
            payload_hash.update(data)
            offset += len(data)
        tensors.append(meta)
    manifest = json.dumps(
        {"format": "lightning_compress.packed", "version": FORMAT_VERSION, "payload_bytes": offset,
         "payload_sha256": payload_hash.hexdigest(), "tensors": tensors},
        separators=(",", ":"),
    ).encode("utf-8")
    manifest = zlib.compress(manifest, 9)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(manifest), hashlib.sha256(manifest).digest())
    # Written beside the target and renamed, so an interrupted save never leaves a half file at path.
    with atomic_open(path) as file:
        file.write(header)
        file.write(manifest)
        for _, parts in entries:
            for data in parts.values():
                file.write(data)
    return manifest, offset


def read_packed(path: Path) -> tuple[Any, memoryview, int]:
    """Check magic, version and both checksums; return the manifest, the payload and the file's size.

    The manifest is parsed JSON, checked for nothing but the payload's size and hash: what its
    tensors declare is :func:`.validation.check_manifest`'s to check.
    """
    data = path.read_bytes()
    if data[:4] != MAGIC[: len(data[:4])]:  # a prefix of the magic is a truncated file of ours
        raise ValueError(
            f"{path} is not a lightning_compress packed file (starts with {data[:4]!r}, expected {MAGIC!r})"
        )
    version = struct.unpack_from("<H", data, 4)[0] if len(data) >= 6 else FORMAT_VERSION
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{path}: packed format version {version} is not supported (this reader knows versions "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    if len(data) < HEADER.size:
        raise corrupted(path, f"{len(data)} bytes, shorter than the {HEADER.size}-byte header")
    _, _, _, manifest_size, manifest_hash = HEADER.unpack_from(data)
    view = memoryview(data)
    manifest_bytes = view[HEADER.size : HEADER.size + manifest_size]
    if len(manifest_bytes) != manifest_size:
        raise corrupted(path, f"the manifest needs {manifest_size} bytes, the file has {len(manifest_bytes)}")
    if hashlib.sha256(manifest_bytes).digest() != manifest_hash:
        raise corrupted(path, "manifest SHA-256 mismatch")
    text = _inflate(path, manifest_bytes) if version >= 2 else bytes(manifest_bytes)
    try:
        manifest = json.loads(text.decode("utf-8"))
        expected_size, expected_hash = manifest["payload_bytes"], manifest["payload_sha256"]
    # RecursionError: JSON nested thousands deep, which only a hand-made manifest has.
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError, ValueError) as error:
        raise corrupted(path, f"unreadable manifest: {error!r}") from error
    if type(expected_size) is not int or not isinstance(expected_hash, str):
        raise corrupted(path, f"unreadable manifest: payload_bytes={expected_size!r:.40}, "
                              f"payload_sha256={expected_hash!r:.80}")
    payload = view[HEADER.size + manifest_size :]
    if len(payload) != expected_size:
        raise corrupted(path, f"payload of {len(payload)} bytes, the manifest says {expected_size}")
    if hashlib.sha256(payload).hexdigest() != expected_hash:
        raise corrupted(path, "payload SHA-256 mismatch")
    return manifest, payload, len(data)


def _inflate(path: Path, compressed: memoryview) -> bytes:
    """zlib-decompress the manifest, stopping at its bound rather than allocating what it claims."""
    limit = MANIFEST_FLOOR + MANIFEST_EXPANSION * len(compressed)
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(compressed, limit)
    except zlib.error as error:
        raise corrupted(path, f"unreadable manifest: {error}") from error
    if inflater.unconsumed_tail:
        raise corrupted(path, f"the manifest inflates past {limit:,} bytes ({MANIFEST_EXPANSION} times its "
                              f"{len(compressed):,} compressed bytes, plus {MANIFEST_FLOOR:,})")
    if not inflater.eof:
        raise corrupted(path, "unreadable manifest: the zlib stream is incomplete")
    return text


def corrupted(path: Path, detail: str) -> ValueError:
    return ValueError(f"{path}: the file is truncated or corrupted ({detail})")
