"""Small real packed files, and the means to rewrite one as a hostile sender would.

A hostile file is not a damaged one: its sender recomputes both SHA-256 sums, so the checks behind
the sums are what a rewrite reaches. :class:`Packed` splits a file into header fields, manifest and
payload, and :meth:`Packed.to_bytes` reassembles it with the sums recomputed (or left stale).
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_compress.methods.decomposition.factorize import tucker2
from lightning_compress.methods.pruning import add_mask, set_mask
from lightning_compress.methods.sharing.codebook import share_weights
from lightning_compress.methods.sharing.product import share_product

HEADER = struct.Struct("<4sHHQ32s")
STREAM_HEADER = struct.Struct("<4sBBHQQII")
# Byte offset and struct format of each field of a Huffman stream's header.
STREAM_FIELDS = {
    "magic": (0, "4s"), "version": (4, "B"), "width": (5, "B"), "reserved": (6, "H"), "count": (8, "Q"),
    "nbits": (16, "Q"), "block_size": (24, "I"), "alphabet": (28, "I"),
}
HEADER_FIELDS = {"magic": (0, "4s"), "version": (4, "H"), "reserved": (6, "H"), "manifest_size": (8, "Q")}


@dataclass
class Packed:
    """A packed file taken apart: edit ``manifest`` / ``payload`` / ``header``, then :meth:`to_bytes`."""

    manifest: dict[str, Any]
    payload: bytearray
    version: int = 2
    header: dict[str, Any] = field(default_factory=dict)  # overrides of HEADER_FIELDS

    @classmethod
    def parse(cls, data: bytes) -> Packed:
        _, version, _, size, _ = HEADER.unpack_from(data)
        text = data[HEADER.size : HEADER.size + size]
        manifest = json.loads(zlib.decompress(text) if version >= 2 else text)
        return cls(manifest, bytearray(data[HEADER.size + size :]), version)

    def copy(self) -> Packed:
        return Packed(copy.deepcopy(self.manifest), bytearray(self.payload), self.version, dict(self.header))

    def to_bytes(self, rehash: bool = True, manifest_text: bytes | None = None) -> bytes:
        """The file; with ``rehash`` the payload's size and sum are rewritten to match the payload."""
        manifest = self.manifest
        if rehash and isinstance(manifest, dict):
            manifest = {**manifest, "payload_bytes": len(self.payload),
                        "payload_sha256": hashlib.sha256(self.payload).hexdigest()}
        if manifest_text is None:
            manifest_text = json.dumps(manifest, separators=(",", ":")).encode()
            if self.version >= 2:
                manifest_text = zlib.compress(manifest_text, 9)
        header = bytearray(HEADER.pack(b"LCPK", self.version, 0, len(manifest_text),
                                       hashlib.sha256(manifest_text).digest()))
        for name, value in self.header.items():
            offset, form = HEADER_FIELDS[name]
            struct.pack_into("<" + form, header, offset, value)
        return bytes(header) + manifest_text + bytes(self.payload)

    def streams(self) -> list[tuple[int, str, int]]:
        """(tensor index, part, payload offset) of every Huffman stream."""
        return [
            (index, part, span[0])
            for index, meta in enumerate(self.manifest["tensors"])
            for part, span in meta.get("parts", {}).items()
            if part in ("gaps", "codes")
        ]

    def stream_field(self, offset: int, name: str) -> Any:
        at, form = STREAM_FIELDS[name]
        return struct.unpack_from("<" + form, self.payload, offset + at)[0]

    def set_stream_field(self, offset: int, name: str, value: Any) -> None:
        at, form = STREAM_FIELDS[name]
        if form != "4s":
            value %= 1 << (8 * struct.calcsize(form))  # what fits the field
        struct.pack_into("<" + form, self.payload, offset + at, value)

    def entry(self, name: str) -> dict[str, Any]:
        return next(meta for meta in self.manifest["tensors"] if meta["name"] == name)


@torch.no_grad()
def prune_(layer: nn.Module, sparsity: float) -> None:
    """Zero the smallest magnitudes of a layer's weight (pruning "by setting weights to zero")."""
    weight = layer.weight
    threshold = weight.abs().flatten().quantile(sparsity)
    weight.masked_fill_(weight.abs() <= threshold, 0.0)  # +0.0: mul_ would leave -0.0 values


def pruned_shared_model() -> nn.Module:
    """Pruned and shared: dense and sparse codebooks, a derived mask, sharing buffers, BatchNorm."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 32, 3), nn.Flatten(), nn.Linear(512, 64), nn.Linear(64, 10)
    )
    for index, sparsity in ((0, 0.5), (2, 0.9), (4, 0.95), (5, 0.6)):
        prune_(model[index], sparsity)
    add_mask(model[2])
    set_mask(model[2], model[2].weight != 0)
    for index, bits in ((0, 3), (2, 4), (4, 5)):
        share_weights(model[index], bits)
    model[1].running_mean.uniform_(-1, 1)
    model[1].num_batches_tracked += 3
    return model


def factorized_model() -> nn.Module:
    """A Tucker-2 Factorized convolution (its 1x1 and core convolutions), one of them pruned."""
    torch.manual_seed(1)
    layer = tucker2(nn.Conv2d(16, 24, 3, padding=1), out_rank=8, in_rank=6)
    prune_(layer.core, 0.8)
    return nn.Sequential(layer, nn.ReLU(), nn.Conv2d(24, 4, 1))


def raw_model() -> nn.Module:
    """Never shared: raw weights, and sparse raw values (more distinct values than a codebook holds)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(40, 30), nn.Linear(1000, 80))
    with torch.no_grad():
        model[1].weight.masked_fill_(torch.rand_like(model[1].weight) < 0.1, 0.0)
    return model


def mixed_state() -> dict[str, torch.Tensor]:
    """A bare state dict: half and bfloat16 weights, bit-packed flags, an empty weight, -0.0, integers."""
    torch.manual_seed(3)
    weight = torch.randn(16, 4, 3, 3).round()
    weight[0, 0, 0] = -0.0
    return {
        "conv.weight": weight,
        "half.weight": torch.randn(12, 12).half().mul(torch.rand(12, 12) < 0.3),
        "bf16.weight": torch.randn(8, 8).bfloat16(),
        "empty.weight": torch.zeros(0, 5),
        "zeros.weight": torch.zeros(6, 6),
        "flags": torch.rand(3, 7) < 0.5,
        "count": torch.tensor(7),
        "u8": torch.randint(0, 255, (9,), dtype=torch.uint8),
    }


def product_model() -> nn.Module:
    """Product-quantized: a Linear and a conv stored as per-sub-space codebooks (found from their buffers)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 24, 3), nn.Flatten(), nn.Linear(24, 40))
    share_product(model[0], bits=2, subvector_size=6)
    share_product(model[2], bits=3, subvector_size=4)
    return model


BASES = {"pruned_shared": pruned_shared_model, "factorized": factorized_model, "raw": raw_model, "mixed": mixed_state,
         "product": product_model}
"""The real files the fuzz test starts from: each builds a module or a state dict."""


def state_of(source: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return source.state_dict() if isinstance(source, nn.Module) else source
