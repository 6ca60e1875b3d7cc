"""What a packed file costs, layer by layer, beside Deep Compression's stage-by-stage sizes.

:func:`.packed.save_compressed` returns a :class:`PackedSummary`: the file's size, the sizes the
same weights would have after each stage of Han et al. 2016 (its Table 1 columns: dense, pruned,
"+ shared", "+ huffman"), and one :class:`PackedLayer` per weight. :func:`stage_bytes` computes a
layer's pruned and shared sizes from its counts, without encoding anything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..report import human_bytes


@dataclass
class PackedLayer:
    """How one Conv / Linear weight was stored, and what each Deep Compression stage would cost it.

    ``gap_bits`` and ``code_bits`` are the Huffman averages per stored gap / code (``code_bits`` is
    per weight for the dense encodings, per sub-vector for ``product_codebook``, whose ``distinct`` is
    the largest sub-space codebook, the dtype's width for raw values). Stage bytes:
    ``pruned_bytes`` = the entries (fillers included) with ``index_bits`` relative indices and fp32
    values, ``shared_bytes`` = the same indices plus fixed-width codebook indices and an fp32
    codebook; each stage takes the dense layout instead where that is smaller, as the file does.
    ``stored_bytes`` is the sum of ``part_bytes``: what the layer costs in the file.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    numel: int
    nonzeros: int
    distinct: int
    encoding: str
    index_bits: int
    entries: int
    fillers: int
    gap_bits: float
    code_bits: float
    shared_index_bits: int
    part_bytes: dict[str, int]
    dense_bytes: int
    pruned_bytes: int
    shared_bytes: int
    note: str = ""

    @property
    def stored_bytes(self) -> int:
        return sum(self.part_bytes.values())


@dataclass
class PackedSummary:
    """The file's size beside Deep Compression's stage-by-stage sizes (its Table 1 columns).

    ``dense_bytes``: the whole state dict with every floating tensor in fp32 (others at their own
    width). ``pruned_bytes``: weights in CSR-like form (relative indices + fp32 values).
    ``shared_bytes``: relative indices + fixed-width codebook indices + fp32 codebooks.
    ``file_bytes``: after Huffman coding, the actual file, headers and manifest included. The
    non-weight tensors count at their stored size in the last three.
    """

    path: str
    file_bytes: int
    manifest_bytes: int
    dense_bytes: int
    pruned_bytes: int
    shared_bytes: int
    other_tensors: int
    other_bytes: int
    layers: list[PackedLayer] = field(default_factory=list)

    @property
    def compression_ratio(self) -> float:
        """Dense fp32 bytes over file bytes."""
        return self.dense_bytes / self.file_bytes if self.file_bytes else float("inf")

    def stages(self) -> dict[str, int]:
        return {"dense": self.dense_bytes, "pruned": self.pruned_bytes, "+ shared": self.shared_bytes,
                "+ huffman": self.file_bytes}

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (JSON-serializable), layers included."""
        out = asdict(self)
        for layer, record in zip(self.layers, out["layers"]):
            record["shape"] = list(layer.shape)
            record["stored_bytes"] = layer.stored_bytes
        out["stages"] = self.stages()
        out["compression_ratio"] = self.compression_ratio
        return out

    def table(self, title: str = "Packed file"):
        """A ``rich.table.Table``: one row per weight, the totals as its footer, the stages as caption."""
        from rich.table import Table

        stored = sum(layer.stored_bytes for layer in self.layers)
        numel = sum(layer.numel for layer in self.layers)
        nonzeros = sum(layer.nonzeros for layer in self.layers)
        stages = " -> ".join(f"{name} {human_bytes(size)}" for name, size in self.stages().items())
        table = Table(title=title, show_footer=True,
                      caption=f"{stages} ({self.compression_ratio:.1f}x); other tensors {self.other_tensors}: "
                              f"{human_bytes(self.other_bytes)}, manifest {human_bytes(self.manifest_bytes)}")
        columns = {
            "layer": "total", "encoding": "", "numel": f"{numel:,}", "nonzeros": f"{nonzeros:,}", "distinct": "",
            "gap bits": "", "code bits": "", "stored": human_bytes(stored),
            "pruned": human_bytes(sum(layer.pruned_bytes for layer in self.layers)),
            "shared": human_bytes(sum(layer.shared_bytes for layer in self.layers)),
            "dense fp32": human_bytes(sum(layer.dense_bytes for layer in self.layers)),
        }
        notes = any(layer.note for layer in self.layers)
        if notes:
            columns["note"] = ""
        for column, footer in columns.items():
            justify = "left" if column in ("layer", "encoding", "note") else "right"
            table.add_column(column, footer=footer, justify=justify)
        for layer in self.layers:
            table.add_row(
                layer.name, layer.encoding, f"{layer.numel:,}", f"{layer.nonzeros:,}", f"{layer.distinct:,}",
                f"{layer.gap_bits:.2f}" if layer.entries and "sparse" in layer.encoding else "-",
                f"{layer.code_bits:.2f}", human_bytes(layer.stored_bytes), human_bytes(layer.pruned_bytes),
                human_bytes(layer.shared_bytes), human_bytes(layer.dense_bytes), *([layer.note] if notes else []),
            )
        return table


def stage_bytes(
    numel: int, nonzeros: int, entries: int, fillers: int, index_bits: int, codebook_size: int | None,
    shared_bits: int | None, notes: list[str],
) -> tuple[int, int, int]:
    """Deep Compression's pruned and shared sizes of one layer, and the index width of the latter.

    Each stage takes the cheaper of its sparse layout (``entries`` with ``index_bits`` relative
    indices) and the dense one, as the file does.
    """
    pruned = min(numel * 4, math.ceil(entries * (index_bits + 32) / 8))
    if codebook_size is None:
        return pruned, pruned, 32
    # The zero code is needed by fillers (sparse) and by the zeros themselves (dense).
    width_sparse = _bits_for(codebook_size + (fillers > 0))
    width_dense = _bits_for(codebook_size + (nonzeros < numel))
    if shared_bits is not None:
        if shared_bits < max(width_sparse, width_dense):
            notes.append(f"{codebook_size:,} codebook values need more than codebook_bits={shared_bits}")
        width_sparse, width_dense = max(shared_bits, width_sparse), max(shared_bits, width_dense)
    sparse_bits, dense_bits = entries * (index_bits + width_sparse), numel * width_dense
    shared = math.ceil(min(sparse_bits, dense_bits) / 8) + codebook_size * 4
    return pruned, shared, width_sparse if sparse_bits <= dense_bits else width_dense


def _bits_for(symbols: int) -> int:
    return max(int(symbols) - 1, 0).bit_length()  # ceil(log2(symbols)); one symbol needs no bits
