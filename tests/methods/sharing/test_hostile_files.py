"""Packed files from a hostile sender: fuzzed fields behind recomputed checksums, and known attacks.

Every load runs in one child process whose address space is capped at 1.5 GiB above what it maps
at rest, with a timeout per load (:mod:`.bounded_loads`): a load that allocates what a file claims
instead of what it holds fails the test instead of the machine. Each load must end in a
``ValueError`` naming the file, or in a model: bit-exact where the mutation cannot change what the
file holds, and otherwise exactly the tensors (names, dtypes, shapes) the rewritten manifest declares.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lightning_compress.methods.sharing.huffman import default_block_size
from lightning_compress.methods.sharing.packed import load_compressed, save_compressed

from .bounded_loads import BoundedLoader
from .packed_files import BASES, HEADER_FIELDS, STREAM_FIELDS, Packed, state_of

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc/self/status: Linux only")

INTERESTING = [0, 1, 2, 3, 7, 8, 16, 31, 32, 255, 256, 65535, 65536, 65537, 1 << 20, (1 << 31) - 1, 1 << 31,
               (1 << 32) - 1, 1 << 32, 4_000_000_000, 1 << 40, 1 << 53, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
NAMES = ["raw", "bits", "nonzero_of", "dense_codebook", "sparse_codebook", "sparse_raw", "product_codebook", "float32", "float16",
         "bfloat16", "int64", "bool", "int32", "conv", "linear", "data", "codes", "gaps", "codebook", "values"]
ints = st.one_of(st.sampled_from(INTERESTING), st.integers(-300, 300), st.sampled_from([-1, -(1 << 63)]))
json_values = st.one_of(
    ints, ints, st.floats(allow_nan=False), st.sampled_from(NAMES), st.text(max_size=6), st.none(), st.booleans(),
    st.lists(ints, max_size=4), st.dictionaries(st.sampled_from(["data", "codes", "x"]), st.lists(ints, max_size=3),
                                                max_size=2),
)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bases")
    paths = {}
    for name, build in BASES.items():
        source = build()
        paths[name] = folder / f"{name}.lcpk"
        save_compressed(source, paths[name])
        loaded, reference = load_compressed(paths[name]), state_of(source)
        assert list(loaded) == list(reference) and all(torch.equal(loaded[k], v) for k, v in reference.items())
    return paths


@pytest.fixture(scope="module")
def loader(bases):
    loader = BoundedLoader({name: str(path) for name, path in bases.items()})
    yield loader
    loader.close()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mutated") / "mutated.lcpk"


def _signature(manifest) -> list:
    return [[meta["name"], meta["dtype"], meta["shape"]] for meta in manifest["tensors"]]


def mutate(data: st.DataObject, packed: Packed) -> tuple[bytes, str]:
    """One hostile rewrite and what a load of it may end in: "exact", "exact_or_error", "declared"."""
    kind = data.draw(st.sampled_from(["header", "manifest", "structure", "stream", "payload", "resize", "harmless"]))
    tensors = packed.manifest["tensors"]
    if kind == "header":
        name = data.draw(st.sampled_from([*HEADER_FIELDS, "manifest_hash"]))
        if name == "manifest_hash":
            text = zlib.compress(json.dumps(packed.manifest, separators=(",", ":")).encode(), 9)
            out = bytearray(packed.to_bytes(rehash=False, manifest_text=text))
            out[16 + data.draw(st.integers(0, 31))] ^= 1 << data.draw(st.integers(0, 7))
            return bytes(out), "exact_or_error"
        offset, form = HEADER_FIELDS[name]
        value = data.draw(st.binary(min_size=4, max_size=4) if form == "4s" else ints)
        packed.header[name] = value if form == "4s" else value % (1 << 8 * struct.calcsize(form))
        return packed.to_bytes(rehash=False), "exact_or_error"
    if kind == "manifest":
        meta = data.draw(st.sampled_from(tensors + [packed.manifest]))
        keys = list(meta) + ["new"]
        if meta is not packed.manifest:
            keys += [f"shape.{i}" for i in range(len(meta["shape"]))]
            keys += [f"parts.{part}.{i}" for part in meta["parts"] for i in (0, 1)]
        key = data.draw(st.sampled_from(keys))
        original = _get(meta, key)
        if isinstance(original, int) and not isinstance(original, bool) and data.draw(st.booleans()):
            value = original + data.draw(st.integers(-3, 3).filter(bool))
        else:
            value = data.draw(json_values)
        _set(meta, key, value)
        return packed.to_bytes(rehash=False), "declared"
    if kind == "structure":
        action = data.draw(st.sampled_from(["delete", "duplicate", "drop", "swap_field", "reverse"]))
        index = data.draw(st.integers(0, len(tensors) - 1))
        if action == "delete":
            del tensors[index][data.draw(st.sampled_from(sorted(tensors[index])))]
        elif action == "duplicate":
            tensors.insert(data.draw(st.integers(0, len(tensors))), json.loads(json.dumps(tensors[index])))
        elif action == "drop":
            del tensors[index]
        elif action == "swap_field":
            other = data.draw(st.integers(0, len(tensors) - 1))
            key = data.draw(st.sampled_from(["name", "dtype", "shape", "encoding", "parts", "kind", "source"]))
            a, b = tensors[index].get(key), tensors[other].get(key)
            _set(tensors[index], key, b)
            _set(tensors[other], key, a)
        else:
            tensors.reverse()
        return packed.to_bytes(rehash=False), "declared"
    if kind == "stream":
        streams = packed.streams()
        if not streams:
            return packed.to_bytes(rehash=False), "exact"
        _, _, offset = data.draw(st.sampled_from(streams))
        name = data.draw(st.sampled_from(list(STREAM_FIELDS)))
        if name == "magic":
            value = data.draw(st.binary(min_size=4, max_size=4))
        elif data.draw(st.booleans()):
            value = packed.stream_field(offset, name) + data.draw(st.integers(-3, 3).filter(bool))
        else:
            value = data.draw(ints)
        packed.set_stream_field(offset, name, value)
        # The reserved field is ignored; every other change is caught or, like a count of the
        # right size, decodes to the same symbols.
        return packed.to_bytes(), "exact_or_error"
    if kind == "payload":
        if not packed.payload:
            return packed.to_bytes(), "exact"
        streams = packed.streams()
        if streams and data.draw(st.booleans()):  # the stream's header and code-length table
            position = data.draw(st.sampled_from(streams))[2] + data.draw(st.integers(0, 40))
        else:
            position = data.draw(st.integers(0, len(packed.payload) - 1))
        position = min(position, len(packed.payload) - 1)
        packed.payload[position] = data.draw(st.integers(0, 255))
        stale = data.draw(st.integers(0, 9)) == 0  # now and then the sender does not recompute the sum
        return packed.to_bytes(rehash=not stale), "declared"
    if kind == "resize":
        position = data.draw(st.integers(0, len(packed.payload)))
        if data.draw(st.booleans()):
            del packed.payload[position : position + data.draw(st.integers(1, 64))]
        else:
            packed.payload[position:position] = data.draw(st.binary(min_size=1, max_size=64))
        return packed.to_bytes(), "declared"
    # harmless: what a reader must ignore, or another spelling of the same manifest
    action = data.draw(st.sampled_from(["unknown_key", "kind", "spelling", "version_1", "reserved"]))
    if action == "unknown_key":
        data.draw(st.sampled_from(tensors + [packed.manifest]))["comment"] = data.draw(json_values)
    elif action == "kind":
        for meta in tensors:
            if meta.get("kind"):
                meta["kind"] = {"conv": "linear", "linear": "conv"}[meta["kind"]]
    elif action == "spelling":
        text = json.dumps(packed.manifest, indent=data.draw(st.sampled_from([None, 1, 4])), sort_keys=True)
        text = zlib.compress(text.encode(), data.draw(st.integers(0, 9)))
        return packed.to_bytes(rehash=False, manifest_text=text), "exact"
    elif action == "version_1":
        packed.version = 1
    else:
        packed.header["reserved"] = data.draw(st.integers(1, 65535))
    return packed.to_bytes(rehash=False), "exact"


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_every_hostile_rewrite_is_refused_or_loads_what_it_declares(data, bases, loader, scratch):
    base = data.draw(st.sampled_from(sorted(bases)))
    original = Packed.parse(bases[base].read_bytes())
    packed = original.copy()
    content, expect = mutate(data, packed)
    scratch.write_bytes(content)
    reply = loader.load(scratch, base)
    outcome = reply["outcome"]
    # --hypothesis-show-statistics: how often each outcome, and each check, is reached
    event(f"{expect}: {outcome}")
    if outcome == "value_error":
        event(_reason(reply["message"]))
    assert outcome != "error", reply["message"]
    assert reply["seconds"] < 5, reply
    if outcome == "value_error":
        assert str(scratch) in reply["message"]  # the error names the file
        assert expect != "exact", reply["message"]
    elif outcome == "loaded":
        assert expect == "declared", f"{expect}: a changed model from a rewrite that must not change it"
        assert reply["signature"] == _signature(Packed.parse(content).manifest)


def test_a_four_billion_symbol_stream_is_refused_before_it_is_allocated(tmp_path, loader):
    """The attack of the issue: one symbol, zero bits each, 4e9 of them, behind valid checksums."""
    path = tmp_path / "zeros.lcpk"
    save_compressed({"fc.weight": torch.full((64, 64), 0.5)}, path)
    packed = Packed.parse(path.read_bytes())
    entry = packed.entry("fc.weight")
    assert entry["encoding"] == "dense_codebook"  # one code, 1, for every weight: a stream of no bits
    offset = entry["parts"]["codes"][0]
    assert packed.stream_field(offset, "nbits") == 0 and packed.stream_field(offset, "count") == 64 * 64
    count = 4_000_000_000

    # The stream alone: its count disagrees with the 64 x 64 shape.
    alone = packed.copy()
    alone.set_stream_field(offset, "count", count)
    alone.set_stream_field(offset, "block_size", count)  # one block: no offsets to store either
    path.write_bytes(alone.to_bytes())
    reply = loader.load(path, "mixed", timeout=30)
    assert reply["outcome"] == "value_error", reply
    assert str(path) in reply["message"] and "'fc.weight'" in reply["message"] and "'parts.codes'" in reply["message"]
    assert "4,000,000,000 symbols" in reply["message"] and "4,096" in reply["message"]
    assert reply["seconds"] < 1

    # The shape made to agree: now the shape itself is past what a file of a few hundred bytes may decode to.
    agreeing = alone.copy()
    agreeing.set_stream_field(offset, "block_size", default_block_size(count))
    agreeing.entry("fc.weight")["shape"] = [count]
    path.write_bytes(agreeing.to_bytes())
    reply = loader.load(path, "mixed", timeout=30)
    assert reply["outcome"] == "value_error", reply
    assert "'fc.weight', field 'shape'" in reply["message"] and "max_decoded_bytes" in reply["message"]
    assert reply["seconds"] < 1


def test_a_manifest_that_inflates_a_thousandfold_is_refused(tmp_path, loader, bases):
    packed = Packed.parse(bases["mixed"].read_bytes())
    text = json.dumps(packed.manifest).encode()
    bomb = text[:-1] + b',"padding":"' + b" " * (20 << 20) + b'"}'  # 20 MB of spaces, 20 KB compressed
    path = tmp_path / "bomb.lcpk"
    path.write_bytes(packed.to_bytes(rehash=False, manifest_text=zlib.compress(bomb, 9)))
    reply = loader.load(path, "mixed", timeout=30)
    assert reply["outcome"] == "value_error" and "inflates past" in reply["message"], reply


def test_json_nested_thousands_deep_is_refused(tmp_path, bases):
    packed = Packed.parse(bases["mixed"].read_bytes())
    text = b'{"format":"lightning_compress.packed","tensors":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = tmp_path / "deep.lcpk"
    path.write_bytes(packed.to_bytes(rehash=False, manifest_text=zlib.compress(text)))
    with pytest.raises(ValueError, match="unreadable manifest"):
        load_compressed(path)


def test_a_base_file_taken_apart_and_put_together_is_the_same_file(bases):
    """Sanity for the fuzz test: what it rewrites is the file as the writer laid it out."""
    for path in bases.values():
        data = path.read_bytes()
        assert Packed.parse(data).to_bytes(rehash=False) == data
        assert hashlib.sha256(Packed.parse(data).payload).hexdigest() == Packed.parse(data).manifest["payload_sha256"]


def _reason(message: str) -> str:
    """The check a message comes from: its field, or the container's complaint, without the numbers."""
    found = re.search(r"field '([^']+)'", message) or re.search(r"\((unreadable manifest|[a-zA-Z -]+)", message)
    reason = found.group(1) if found else message.split(": ", 1)[-1][:40]
    return "refused at " + re.sub(r"\[\d+\]", "[i]", reason)


def _get(meta: dict, key: str):
    node = meta
    for part in key.split("."):
        if isinstance(node, list):
            node = node[int(part)] if int(part) < len(node) else None
        elif isinstance(node, dict):
            node = node.get(part)
        else:
            return None
    return node


def _set(meta: dict, key: str, value) -> None:
    *path, last = key.split(".")
    node = meta
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is None and last in node and key in ("kind", "source"):
        del node[last]
    else:
        node[last] = value
