from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lightning_compress import compression_report


def _hand_model() -> nn.Sequential:
    """conv 2->4 (3x3, bias), BN, linear 4*2*2 -> 3: small enough to count by hand."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3))


def test_dense_counts_by_hand():
    report = compression_report(_hand_model(), input_size=(2, 2, 2))
    conv, linear = report.layers
    assert (conv.name, conv.kind, conv.params) == ("0", "Conv2d", 2 * 4 * 9 + 4)
    assert (linear.name, linear.params) == ("3", 16 * 3 + 3)
    assert report.other_params == 8  # BatchNorm weight and bias
    assert report.params == 76 + 51 + 8
    assert conv.macs == 4 * 2 * 2 * (2 * 9) and linear.macs == 3 * 16
    assert report.macs == 288 + 48
    assert report.dense_bytes == 4 * report.params
    assert report.compressed_bytes == report.dense_bytes and report.compression_ratio == 1.0
    assert report.bits_per_weight == 32


def test_zeros_masks_and_bits_are_read_from_module_state():
    model = _hand_model()
    conv, linear = model[0], model[3]
    with torch.no_grad():
        conv.weight[:2] = 0  # 36 of 72 weights exactly zero
    linear.register_buffer("weight_mask", (torch.arange(48) % 4 == 0).view(3, 16).float())  # 12 kept
    linear.weight_bits = 4
    report = compression_report(model, input_size=(2, 2, 2))
    rconv, rlin = report.layers
    assert rconv.nonzeros == 36 + 4 and rconv.sparsity == pytest.approx(36 / 76)
    assert rlin.nonzeros == 12 + 3 and rlin.bits == 4
    # conv: sparse 36 * (32 + 8) = 1440 bits < dense 72 * 32 = 2304 bits; plus the fp32 bias
    assert rconv.compressed_bytes == 1440 / 8 + 4 * 4
    # linear: sparse 12 * (4 + 5) = 108 bits < dense 48 * 4 = 192 bits; plus the fp32 bias
    assert rlin.compressed_bytes == 108 / 8 + 3 * 4
    assert rconv.sparse_macs == 288 // 2 and rlin.sparse_macs == 48 // 4
    assert report.bits_per_weight == pytest.approx((76 * 32 + 51 * 4) / 127)
    assert report.compression_ratio == pytest.approx(report.dense_bytes / report.compressed_bytes)


def test_compression_stats_method_overrides():
    model = _hand_model()
    model[3].compression_stats = lambda: {"bits": 2, "compressed_bytes": 10.0, "note": "codebook"}
    rlin = compression_report(model).layers[1]
    assert (rlin.bits, rlin.compressed_bytes, rlin.note) == (2, 10.0, "codebook")


@pytest.mark.parametrize("folded", [False, True], ids=["buffers", "folded"])
def test_product_quantized_weights_cost_their_codes_and_codebooks(folded):
    from lightning_compress.methods.sharing.product import remove_product_buffers, share_product

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(96, 256, bias=False), nn.Linear(256, 10))
    share_product(model[1], bits=4, subvector_size=8)  # 12 sub-spaces of 16 centroids
    if folded:  # as at fit end: the weight holds its centroids, the buffers are gone
        remove_product_buffers(model[1])
    shared, plain = compression_report(model).layers
    assert shared.bits == 4 / 8 and "16 centroids of 8" in shared.note
    assert shared.compressed_bytes == 256 * 96 * 0.5 / 8 + 4 * 16 * 96  # codes + fp32 codebooks
    assert plain.bits == 32 and plain.note == ""  # trained fp32 weights do not repeat sub-vectors


def test_a_pruned_weight_is_not_taken_for_product_quantized():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 512, bias=False))
    with torch.no_grad():
        model[0].weight[torch.rand(512, 96) < 0.98] = 0  # its sub-vectors repeat: mostly zeros
    layer = compression_report(model).layers[0]
    assert layer.bits == 32 and "product" not in layer.note


def test_report_does_not_move_batchnorm_or_change_mode():
    model = _hand_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compression_report(model, input_size=(2, 2, 2))
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_without_input_size_no_macs_and_json(tmp_path):
    report = compression_report(_hand_model())
    assert report.macs is None and "report/macs" not in report.metrics()
    data = json.loads(report.to_json(tmp_path / "r.json").read_text())
    assert data["params"] == 135 and len(data["layers"]) == 2 and data["layers"][0]["sparsity"] == 0.0
    metrics = report.metrics(per_layer=True)
    assert metrics["report/params"] == 135 and "report/sparsity/0" in metrics


def test_table_renders():
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(compression_report(_hand_model(), input_size=(2, 2, 2)).table())
    text = console.export_text()
    assert "Conv2d" in text and "Linear" in text and "total" in text and "336" in text
