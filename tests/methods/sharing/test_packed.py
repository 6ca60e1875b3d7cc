"""The packed file: bit-exact round trips, honest sizes, and errors that say what is wrong."""

from __future__ import annotations

import io
import json
import pickle
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_compress.methods.pruning import add_mask, set_mask
from lightning_compress.methods.sharing.packed import load_compressed, save_compressed
from lightning_compress.methods.sharing.summary import PackedSummary
from lightning_compress.methods.sharing.tensor_codecs import MAX_CODEBOOK


def bits_of(tensor: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that -0.0 != 0.0 and NaN == NaN: what "bit-exact" means."""
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bool or not tensor.is_floating_point():
        return tensor
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def assert_bit_exact(loaded: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(reference)
    for key, value in reference.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        assert torch.equal(bits_of(loaded[key]), bits_of(value)), key


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )


@torch.no_grad()
def prune_and_share(model: nn.Module, sparsity: float = 0.9, levels: int = 32) -> None:
    """Zero the smallest magnitudes of every Conv / Linear weight and snap the rest to 32 levels."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight = module.weight
            threshold = weight.abs().flatten().quantile(sparsity)
            kept = weight.abs() > threshold
            grid = torch.quantile(weight[kept], torch.linspace(0, 1, levels), interpolation="nearest")
            nearest = grid[(weight.unsqueeze(-1) - grid).abs().argmin(-1)]
            weight.copy_(torch.where(kept, nearest, torch.zeros(())))


@pytest.fixture(scope="module")
def pruned_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = small_cnn()
    prune_and_share(model)
    model.train()(torch.randn(4, 3, 8, 8))  # non-trivial BatchNorm statistics and num_batches_tracked
    return model.state_dict()


@pytest.fixture
def pruned_cnn(pruned_state) -> nn.Module:
    """The CNN, 90% of each Conv / Linear weight zero, 32 distinct values in the rest, BatchNorm used."""
    model = small_cnn().eval()
    model.load_state_dict(pruned_state)
    return model


def torch_save_bytes(state: dict[str, torch.Tensor]) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def test_pruned_shared_cnn_round_trips_and_is_much_smaller_than_torch_save(pruned_cnn, tmp_path):
    path = tmp_path / "cnn.lcpk"
    summary = save_compressed(pruned_cnn, path)
    reference = pruned_cnn.state_dict()

    fresh = small_cnn()
    assert_bit_exact(load_compressed(path, model=fresh), reference)
    assert_bit_exact(fresh.state_dict(), reference)

    assert summary.file_bytes == path.stat().st_size
    assert torch_save_bytes(reference) > 10 * summary.file_bytes
    # The first conv (864 weights) is too small for two streams' headers to pay: its codes go dense.
    assert [layer.encoding for layer in summary.layers] == ["dense_codebook"] + ["sparse_codebook"] * 3
    assert [layer.index_bits for layer in summary.layers] == [0, 8, 8, 5]
    assert all(layer.distinct == 32 for layer in summary.layers)
    assert summary.dense_bytes > summary.pruned_bytes > summary.shared_bytes > summary.file_bytes
    assert summary.other_tensors == 4 * 1 + 3 * 5  # biases; BatchNorm weight, bias, mean, var, count


def test_summary_serializes_and_renders(pruned_cnn, tmp_path):
    from rich.console import Console

    summary = save_compressed(pruned_cnn, tmp_path / "cnn.lcpk", codebook_bits={"conv": 8, "linear": 7})
    record = json.loads(json.dumps(summary.to_dict()))
    assert record["stages"]["+ huffman"] == summary.file_bytes
    assert record["compression_ratio"] == pytest.approx(summary.dense_bytes / summary.file_bytes)
    assert [layer["shared_index_bits"] for layer in record["layers"]] == [8, 8, 8, 7]
    layer = summary.layers[1]
    assert layer.stored_bytes == sum(layer.part_bytes.values())
    assert set(layer.part_bytes) == {"gaps", "codes", "codebook"}
    assert 0 < layer.code_bits < 5 and 0 < layer.gap_bits < 8  # Huffman beats the fixed widths here
    console = Console(record=True, width=200)
    console.print(summary.table())
    text = console.export_text()
    assert "3.weight" in text and "sparse_codebook" in text and "+ huffman" in text
    # 32 values and the filler code need 6 bits: a narrower codebook_bits is overruled, and said so.
    narrow = save_compressed(pruned_cnn, tmp_path / "cnn.lcpk", codebook_bits=5)
    assert narrow.layers[-1].shared_index_bits == 6 and "codebook_bits=5" in narrow.layers[-1].note


def test_dense_random_model_falls_back_to_raw_values(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 300), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Linear(1000, 80))
    with torch.no_grad():  # 80,000 weights, 90% zeros: more distinct values than a codebook holds
        model[3].weight.mul_(torch.rand_like(model[3].weight) < 0.9)
    path = tmp_path / "dense.lcpk"
    summary = save_compressed(model, path)
    assert_bit_exact(load_compressed(path), model.state_dict())

    by_name = {layer.name: layer for layer in summary.layers}
    assert by_name["0.weight"].encoding == "raw" and by_name["0.weight"].distinct > MAX_CODEBOOK
    assert "stored raw" in by_name["0.weight"].note
    # 576 distinct values, no zeros: a codebook fits but codes + codebook outweigh the raw values
    assert by_name["2.weight"].encoding == "raw" and not by_name["2.weight"].note
    assert summary.file_bytes <= summary.dense_bytes + summary.manifest_bytes + 64  # never above raw fp32
    assert by_name["3.weight"].encoding == "sparse_raw" and by_name["3.weight"].distinct > MAX_CODEBOOK - 10_000


def test_channels_last_weights_round_trip(pruned_cnn, tmp_path):
    model = pruned_cnn.to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    path = tmp_path / "cl.lcpk"
    save_compressed(model, path)
    fresh = small_cnn().to(memory_format=torch.channels_last)
    assert_bit_exact(load_compressed(path, model=fresh), model.state_dict())
    assert fresh[3].weight.is_contiguous(memory_format=torch.channels_last)  # load_state_dict keeps the layout


def test_bare_state_dict_of_every_dtype_round_trips(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(16, 8, 3, 3).round()  # few distinct values
    weight[0, 0, 0, 0], weight[0, 0, 0, 1], weight[0, 0, 0, 2] = -0.0, float("nan"), float("inf")
    state = {
        "conv.weight": weight,
        "fc.weight": torch.randn(10, 40).mul(torch.rand(10, 40) < 0.1),
        "half.weight": torch.randn(30, 30).half(),
        "bf16.weight": torch.randn(30, 30).bfloat16(),
        "f64.weight": torch.randn(4, 4, dtype=torch.float64),
        "zeros.weight": torch.zeros(5, 5),
        "empty.weight": torch.zeros(0, 5),
        "int.weight": torch.arange(12).reshape(3, 4),
        "fc.bias": torch.randn(10),
        "count": torch.tensor(7),
        "flags": torch.rand(3, 5) < 0.5,
        "u8": torch.randint(0, 255, (9,), dtype=torch.uint8),
    }
    path = tmp_path / "state.lcpk"
    summary = save_compressed(state, path)
    assert_bit_exact(load_compressed(path), state)
    kinds = {layer.name: layer.kind for layer in summary.layers}
    assert kinds == {"conv.weight": "conv", "fc.weight": "linear", "half.weight": "linear", "bf16.weight": "linear",
                     "f64.weight": "linear", "zeros.weight": "linear", "empty.weight": "linear"}


def test_masks_cost_nothing_when_they_match_the_zeros(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Linear(8, 8))
    for layer in model:
        add_mask(layer)
        set_mask(layer, torch.rand_like(layer.weight) < 0.3)
    with torch.no_grad():
        model[1].weight_mask[0, 0] = True  # kept but zero: this mask is not the non-zero pattern
        model[1].weight[0, 0] = 0.0
    path = tmp_path / "masked.lcpk"
    save_compressed(model, path)
    manifest = json.loads(_manifest_bytes(path.read_bytes()))
    encodings = {entry["name"]: entry["encoding"] for entry in manifest["tensors"]}
    assert encodings["0.weight_mask"] == "nonzero_of" and encodings["1.weight_mask"] == "bits"
    fresh = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Linear(8, 8))
    for layer in fresh:
        add_mask(layer)
    assert_bit_exact(load_compressed(path, model=fresh), model.state_dict())


def test_sparse_or_dense_form_is_chosen_by_size(tmp_path):
    torch.manual_seed(0)
    levels = torch.tensor([-0.5, 0.5, 1.0])
    state = {
        "dense.weight": levels[torch.randint(0, 3, (64, 64))],  # no zeros: gaps would be pure overhead
        "sparse.weight": torch.where(torch.rand(64, 64) < 0.02, levels[torch.randint(0, 3, (64, 64))], 0.0),
        # -0.0 is a value, not a zero (bit-exact round trip): a layer of them is all non-zeros.
        "negative_zeros.weight": torch.full((64, 64), -0.0),
    }
    summary = save_compressed(state, tmp_path / "choice.lcpk")
    by_name = {layer.name: layer for layer in summary.layers}
    assert by_name["dense.weight"].encoding == "dense_codebook"
    assert by_name["sparse.weight"].encoding == "sparse_codebook"
    assert by_name["negative_zeros.weight"].nonzeros == 64 * 64 and "-0.0" in by_name["negative_zeros.weight"].note
    assert_bit_exact(load_compressed(tmp_path / "choice.lcpk"), state)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 12), min_size=2, max_size=4),
    sparsity=st.floats(0.0, 1.0),
    levels=st.integers(1, 300),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_any_sparse_shared_weight_round_trips(shape, sparsity, levels, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    grid = torch.randn(levels, generator=generator)
    weight = grid[torch.randint(0, levels, shape, generator=generator)]
    weight = torch.where(torch.rand(shape, generator=generator) >= sparsity, weight, 0.0).to(dtype)
    weight.view(-1)[:: max(1, weight.numel() // 3)] *= -0.0  # a few signed zeros and sign flips
    state = {"layer.weight": weight}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "w.lcpk"
        save_compressed(state, path, index_bits=2)  # tiny index width: many fillers
        assert_bit_exact(load_compressed(path), state)


def _manifest_bytes(data: bytes) -> bytes:
    size = int.from_bytes(data[8:16], "little")
    return zlib.decompress(data[48 : 48 + size])


@pytest.fixture
def packed_file(pruned_cnn, tmp_path) -> Path:
    path = tmp_path / "cnn.lcpk"
    save_compressed(pruned_cnn, path)
    return path


@pytest.mark.parametrize("keep", [0, 2, 20, 60, -1000, -1])
def test_truncated_file_is_reported(packed_file, keep):
    data = packed_file.read_bytes()
    packed_file.write_bytes(data[:keep])
    with pytest.raises(ValueError, match="truncated or corrupted") as error:
        load_compressed(packed_file)
    assert str(packed_file) in str(error.value)


@pytest.mark.parametrize("where", ["manifest", "payload", "manifest length"])
def test_flipped_byte_is_reported(packed_file, where):
    data = bytearray(packed_file.read_bytes())
    manifest_end = 48 + int.from_bytes(data[8:16], "little")
    index = {"manifest": 60, "payload": (manifest_end + len(data)) // 2, "manifest length": 9}[where]
    data[index] ^= 0x10
    packed_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_compressed(packed_file)


def test_other_files_and_versions_are_refused(packed_file, tmp_path):
    for name, content in {"text.txt": b"hello, world", "model.pt": None}.items():
        other = tmp_path / name
        if content is None:
            torch.save({"w": torch.zeros(3)}, other)
        else:
            other.write_bytes(content)
        with pytest.raises(ValueError, match="not a lightning_compress packed file"):
            load_compressed(other)
    data = bytearray(packed_file.read_bytes())
    data[4:6] = (99).to_bytes(2, "little")
    packed_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="version 99"):
        load_compressed(packed_file)


def test_version_1_files_with_a_plain_manifest_still_load(packed_file, pruned_cnn):
    import hashlib

    data = packed_file.read_bytes()
    assert int.from_bytes(data[4:6], "little") == 2
    text = _manifest_bytes(data)  # version 1 stored this JSON as it is
    payload = data[48 + int.from_bytes(data[8:16], "little") :]
    header = b"LCPK" + (1).to_bytes(2, "little") + data[6:8] + len(text).to_bytes(8, "little") + hashlib.sha256(text).digest()
    packed_file.write_bytes(header + text + payload)
    assert_bit_exact(load_compressed(packed_file), pruned_cnn.state_dict())


def test_a_model_of_another_architecture_gets_one_short_error(packed_file):
    other = nn.Sequential(nn.Conv2d(3, 16, 3), *small_cnn()[1:], nn.Linear(10, 2))
    before = {key: value.clone() for key, value in other.state_dict().items()}
    with pytest.raises(ValueError) as error:
        load_compressed(packed_file, model=other)
    # What the model lacks or has extra (the first five, then a count) and the shapes that differ.
    assert str(error.value).splitlines() == [
        f"{packed_file} does not fit this Sequential: the file holds 23 tensors, the model's state has 25",
        "  in the model, not in the file (2): '12.weight', '12.bias'",
        "  shapes that differ (2): '0.weight': file (32, 3, 3, 3), model (16, 3, 3, 3); '0.bias': file (32,), "
        "model (16,)",
    ]
    # Refused before anything was copied: the model is as it was.
    assert all(torch.equal(value, before[key]) for key, value in other.state_dict().items())
    with pytest.raises(ValueError, match=r"in the file, not in the model \(21\): '1.weight', '1.bias', "
                                         r"'1.running_mean', '1.running_var', '1.num_batches_tracked' and 16 more"):
        load_compressed(packed_file, model=nn.Sequential(nn.Conv2d(3, 32, 3)))


def test_a_model_that_rebuilds_its_structure_on_load_is_compared_after_the_rebuild(packed_file, pruned_cnn):
    from lightning_compress.methods.structure import restore_structure_on_load

    fresh = restore_structure_on_load(small_cnn())  # a load pre-hook: compared after torch's attempt
    assert_bit_exact(load_compressed(packed_file, model=fresh), pruned_cnn.state_dict())
    larger = restore_structure_on_load(nn.Sequential(*small_cnn(), nn.Linear(10, 2)))
    with pytest.raises(ValueError, match=r"in the model, not in the file \(2\): '12.weight', '12.bias'"):
        load_compressed(packed_file, model=larger)


def test_loading_never_unpickles(packed_file, pruned_cnn, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading a packed file must not unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert_bit_exact(load_compressed(packed_file), pruned_cnn.state_dict())


def test_invalid_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown layer kinds"):
        save_compressed(nn.Linear(2, 2), tmp_path / "x.lcpk", index_bits={"fc": 5})
    with pytest.raises(ValueError, match="index_bits"):
        save_compressed(nn.Linear(2, 2), tmp_path / "x.lcpk", index_bits=0)
    with pytest.raises(TypeError, match="not a tensor"):
        save_compressed({"weight": [1.0]}, tmp_path / "x.lcpk")
    with pytest.raises(TypeError, match="nn.Module or a state dict"):
        save_compressed(42, tmp_path / "x.lcpk")
    assert not (tmp_path / "x.lcpk").exists()


def test_summary_type(pruned_cnn, tmp_path):
    summary = save_compressed(pruned_cnn, tmp_path / "cnn.lcpk")
    assert isinstance(summary, PackedSummary) and summary.compression_ratio > 10
    np.testing.assert_equal(summary.stages()["+ huffman"], (tmp_path / "cnn.lcpk").stat().st_size)


def test_a_file_with_valid_checksums_but_inconsistent_content_is_refused(packed_file):
    """Checksums only prove the bytes are as written: decoding still validates what they say."""
    import hashlib

    data = packed_file.read_bytes()
    manifest = json.loads(_manifest_bytes(data))
    payload = data[48 + int.from_bytes(data[8:16], "little") :]
    entry = next(entry for entry in manifest["tensors"] if entry["encoding"] == "sparse_codebook")
    entry["codebook_size"] += 1
    text = zlib.compress(json.dumps(manifest).encode())
    header = data[:8] + len(text).to_bytes(8, "little") + hashlib.sha256(text).digest()
    packed_file.write_bytes(header + text + payload)
    with pytest.raises(ValueError, match=f"invalid packed file: tensor '{entry['name']}', field 'parts.codebook'"):
        load_compressed(packed_file)


def test_table_shows_notes(tmp_path):
    from rich.console import Console

    summary = save_compressed({"fc.weight": torch.randn(300, 300)}, tmp_path / "raw.lcpk")
    console = Console(record=True, width=250)
    console.print(summary.table())
    assert "stored raw" in console.export_text()
