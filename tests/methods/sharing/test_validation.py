"""Each check of a packed file's declared fields, one rewrite each: the error names file, tensor and field.

Every rewrite recomputes both SHA-256 sums (:mod:`.packed_files`), as a hostile sender would, so what
refuses it is the check behind the sums. The sizes involved are small, so these run in-process; the
rewrites that would allocate gigabytes without the checks are in ``test_hostile_files.py``, under a
capped address space.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import pytest
import torch

from lightning_compress.methods.sharing.packed import load_compressed, save_compressed
from lightning_compress.methods.sharing.validation import decoded_budget

from .packed_files import Packed, mixed_state, pruned_shared_model


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("originals")
    files = {}
    for name, source in (("model", pruned_shared_model()), ("mixed", mixed_state())):
        save_compressed(source, folder / name)
        files[name] = (folder / name).read_bytes()
    return files


def _lengths_table(packed: Packed, tensor: str, part: str) -> tuple[int, int]:
    """Payload offset and size of a stream's code-length table."""
    offset = packed.entry(tensor)["parts"][part][0]
    return offset + 32, packed.stream_field(offset, "alphabet")


def _set_lengths(tensor: str, part: str, lengths):
    """Rewrite (symbol, length) pairs of a stream's code-length table."""
    def edit(packed: Packed) -> None:
        start, alphabet = _lengths_table(packed, tensor, part)
        for symbol, length in lengths(packed.payload[start : start + alphabet]):
            packed.payload[start + symbol] = length
    return edit


def _longest(table) -> int:
    return max(range(len(table)), key=table.__getitem__)


def _entry_set(tensor: str, key: str, value):
    def edit(packed: Packed) -> None:
        packed.entry(tensor)[key] = value
    return edit


def _part_span(tensor: str, part: str, span):
    def edit(packed: Packed) -> None:
        packed.entry(tensor)["parts"][part] = span(packed.entry(tensor)["parts"][part], len(packed.payload))
    return edit


def _stream_set(tensor: str, part: str, field: str, value):
    def edit(packed: Packed) -> None:
        offset = packed.entry(tensor)["parts"][part][0]
        packed.set_stream_field(offset, field, value(packed.stream_field(offset, field)))
    return edit


def _shrink_codebook(packed: Packed) -> None:
    """One value fewer in the codebook (and its bytes): the top code now lies past it."""
    entry = packed.entry("2.weight")
    entry["codebook_size"] -= 1
    entry["parts"]["codebook"][1] -= 4


def _shape_to_entries(packed: Packed) -> None:
    """A shape with room for every entry, but not for where the gaps lead."""
    entry = packed.entry("2.weight")
    entry["shape"] = [packed.stream_field(entry["parts"]["gaps"][0], "count")]
    packed.entry("2.weight_mask")["shape"] = entry["shape"]


def _scramble_bits(packed: Packed) -> None:
    """Every code bit set: the stream decodes, but its blocks end elsewhere than its header says."""
    entry = packed.entry("4.weight")
    offset, length = entry["parts"]["codes"]
    start = offset + 32 + packed.stream_field(offset, "alphabet")
    packed.payload[offset + length - 16 : offset + length] = b"\xff" * 16
    assert start < offset + length - 16


def _drop(tensor: str):
    def edit(packed: Packed) -> None:
        packed.manifest["tensors"] = [meta for meta in packed.manifest["tensors"] if meta["name"] != tensor]
    return edit


def _duplicate(packed: Packed) -> None:
    packed.manifest["tensors"].append(dict(packed.entry("0.bias")))


CASES = {
    # (file, edit, tensor named, field named, what the message says)
    "unknown dtype": ("model", _entry_set("0.bias", "dtype", "float128"), "0.bias", "dtype", "not one of"),
    "unknown encoding": ("model", _entry_set("0.bias", "encoding", "lzma"), "0.bias", "encoding", "not one of"),
    "unknown kind": ("model", _entry_set("0.weight", "kind", "rnn"), "0.weight", "kind", "not one of"),
    "weight without kind": ("model", _entry_set("0.weight", "kind", None), "0.weight", "kind", "missing"),
    "integer weight": ("model", _entry_set("0.weight", "dtype", "int32"), "0.weight", "dtype", "floating-point"),
    "float flags": ("mixed", _entry_set("flags", "dtype", "float32"), "flags", "dtype", "bool"),
    "raw bool": ("mixed", _entry_set("u8", "dtype", "bool"), "u8", "dtype", "stored as bits"),
    "negative size": ("model", _entry_set("0.bias", "shape", [-1, -8]), "0.bias", "shape", "integers in"),
    "fractional size": ("model", _entry_set("0.bias", "shape", [8.0]), "0.bias", "shape", "integers in"),
    "65 dimensions": ("model", _entry_set("0.bias", "shape", [1] * 65), "0.bias", "shape", "at most 64"),
    "size past the budget": ("model", _entry_set("0.weight", "shape", [1 << 30, 16]), "0.weight", "shape",
                             "max_decoded_bytes"),
    "missing part": ("model", lambda p: p.entry("2.weight")["parts"].pop("gaps"), "2.weight", "parts", "has the parts"),
    "part past the payload": ("model", _part_span("0.bias", "data", lambda s, n: [n - 8, s[1]]), "0.bias",
                              "parts.data", "beyond the"),
    "part not a span": ("model", _part_span("0.bias", "data", lambda s, n: [s[0]]), "0.bias", "parts.data",
                        "not \\[offset, length\\]"),
    "negative offset": ("model", _part_span("0.bias", "data", lambda s, n: [-4, s[1]]), "0.bias", "parts.data",
                        "non-negative"),
    "raw bytes for another shape": ("model", _entry_set("0.bias", "shape", [9]), "0.bias", "parts.data", "need 36"),
    "flag bytes for another shape": ("mixed", _entry_set("flags", "shape", [3, 70]), "flags", "parts.data", "need 27"),
    "codebook too large": ("model", _entry_set("2.weight", "codebook_size", 1 << 17), "2.weight", "codebook_size",
                           "65536"),
    "codebook size and bytes disagree": ("model", _entry_set("2.weight", "codebook_size", 17), "2.weight",
                                         "parts.codebook", "17 values"),
    "code past the codebook": ("model", _shrink_codebook, "2.weight", "parts.codes",
                               r"alphabet of \d+ symbols; codebook_size=\d+ \(plus the zero code\) allows"),
    "index bits out of range": ("model", _entry_set("2.weight", "index_bits", 17), "2.weight", "index_bits", "16"),
    "gap wider than index bits": ("model", _entry_set("2.weight", "index_bits", 2), "2.weight", "parts.gaps",
                                  "index_bits=2 allows 4"),
    "codes for another shape": ("model", _entry_set("0.weight", "shape", [8, 3, 3, 2]), "0.weight", "parts.codes",
                                "implies 144 \\(one code per weight\\)"),
    "more gaps than positions": ("model", _entry_set("2.weight", "shape", [4]), "2.weight", "parts.gaps",
                                 "for a tensor of 4 positions"),
    "codes and gaps disagree": ("model", _stream_set("2.weight", "codes", "count", lambda n: n + 1), "2.weight",
                                "parts.codes", r"the gaps hold \d+ entries"),
    "values and gaps disagree": ("model", _part_span("5.weight", "values", lambda s, n: [s[0], s[1] - 4]),
                                 "5.weight", "parts.values", "entries of 4 bytes"),
    "bit count off by one": ("model", _stream_set("4.weight", "codes", "nbits", lambda n: n - 1), "4.weight",
                             "parts.codes", "promises|do not end where"),
    "Kraft inequality": ("model", _set_lengths("2.weight", "codes", lambda table: [(s, 1) for s in range(len(table))]),
                         "2.weight", "parts.codes", "Kraft"),
    "code longer than 20 bits": ("model", _set_lengths("2.weight", "codes", lambda table: [(_longest(table), 21)]),
                                 "2.weight", "parts.codes", "longer than 20"),
    "foreign block size": ("model", _stream_set("4.weight", "codes", "block_size", lambda n: n + 1), "4.weight",
                           "parts.codes", "the writer uses"),
    "header promises more bytes": ("model", _stream_set("4.weight", "codes", "alphabet", lambda n: n + 1),
                                   "4.weight", "parts.codes", "header promises"),
    "gaps past the end": ("model", _shape_to_entries, "2.weight", "parts.gaps", "beyond numel"),
    "bits that end elsewhere": ("model", _scramble_bits, "4.weight", "parts.codes", "do not end where"),
    "mask of a missing weight": ("model", _drop("2.weight"), "2.weight_mask", "source", "not a weight"),
    "mask of a bias": ("model", _entry_set("2.weight_mask", "source", "2.bias"), "2.weight_mask", "source",
                       "not a weight"),
    "mask of another size": ("model", _entry_set("2.weight_mask", "shape", [32, 8, 3, 2]), "2.weight_mask", "source",
                             "has 2,304 values"),
    "name twice": ("model", _duplicate, "0.bias", "name", "appears twice"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_field_that_breaks_the_format_is_named(case, originals, tmp_path):
    file, edit, tensor, field, detail = CASES[case]
    packed = Packed.parse(originals[file])
    edit(packed)
    path = tmp_path / "hostile.lcpk"
    path.write_bytes(packed.to_bytes())
    with pytest.raises(ValueError) as error:
        load_compressed(path)
    message = str(error.value)
    assert message.startswith(f"{path}: invalid packed file: tensor {tensor!r}, field {field!r}: "), message
    assert re.search(detail, message), message


@pytest.mark.parametrize("field, value, detail", [
    ("format", "other.format", "field 'format'"),
    ("tensors", {"0.bias": 1}, "field 'tensors'"),
    ("payload_bytes", "12", "payload_bytes='12'"),
])
def test_a_manifest_field_that_breaks_the_format_is_named(field, value, detail, originals, tmp_path):
    packed = Packed.parse(originals["model"])
    packed.manifest[field] = value
    path = tmp_path / "hostile.lcpk"
    path.write_bytes(packed.to_bytes(rehash=field != "payload_bytes"))
    with pytest.raises(ValueError, match=re.escape(detail)) as error:
        load_compressed(path)
    assert str(path) in str(error.value)


def test_harmless_rewrites_load_bit_exactly(originals, tmp_path):
    """What the reader ignores (unknown keys, the layer kind, the JSON's spelling) changes nothing."""
    reference = load_compressed(_write(tmp_path / "a.lcpk", originals["model"]))
    packed = Packed.parse(originals["model"])
    packed.manifest["comment"] = "from a newer writer"
    packed.entry("0.weight")["kind"] = "linear"
    packed.entry("0.bias")["extra"] = [1, 2]
    text = zlib.compress(__import__("json").dumps(packed.manifest, indent=2, sort_keys=True).encode(), 1)
    loaded = load_compressed(_write(tmp_path / "b.lcpk", packed.to_bytes(rehash=False, manifest_text=text)))
    assert list(loaded) == list(reference)
    assert all(torch.equal(loaded[key], value) for key, value in reference.items())


def test_the_budget_can_be_raised_or_lowered(originals, tmp_path):
    path = _write(tmp_path / "model.lcpk", originals["model"])
    decoded = sum(t.numel() * t.element_size() for t in load_compressed(path).values())
    with pytest.raises(ValueError, match="field 'shape'.*max_decoded_bytes"):
        load_compressed(path, max_decoded_bytes=decoded - 1)
    assert len(load_compressed(path, max_decoded_bytes=decoded)) == len(load_compressed(path))
    # An all-zero layer costs a few dozen bytes whatever its size: the floor admits one of 16 M weights.
    zeros = tmp_path / "zeros.lcpk"
    save_compressed({"big.weight": torch.zeros(4096, 4096)}, zeros)
    assert zeros.stat().st_size < 1000 and decoded_budget(zeros.stat().st_size) == 64 << 20
    assert not load_compressed(zeros)["big.weight"].any()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
