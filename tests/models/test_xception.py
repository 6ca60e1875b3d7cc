from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_compress import (ImageClassifier, IterativePruning, QuantizationAwareTraining, TensorDecomposition,
                                WeightSharing, compression_report)
from lightning_compress.models import create_model
from lightning_compress.models.xception import SeparableConv2d, XceptionBlock

# The same block types at a quarter of the width and one middle block: the callback tests below train
# it for a few steps on two CPU cores.
SMALL = {"width": 0.25, "middle_blocks": 1}


class _RandomImages(pl.LightningDataModule):
    def __init__(self, n: int = 32, batch_size: int = 8) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.data = torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=generator),
                                                   torch.randint(0, 10, (n,), generator=generator))
        self.batch_size = batch_size

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=self.batch_size)


def _fit(module, callbacks, max_epochs: int = 1) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_epochs=max_epochs, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=_RandomImages())
    return trainer


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_logits_and_final_maps_at_every_width():
    model = create_model("xception", num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        assert model.features(torch.zeros(1, 3, 32, 32)).shape == (1, 1024, 4, 4)
        small = create_model("xception", num_classes=3, **SMALL).eval()
        assert small(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert small.classifier.in_features == 256 and len(small.features.middle) == 1


def test_parameter_count_is_a_few_million_and_grows_with_the_middle_flow():
    model = create_model("xception")
    params = sum(p.numel() for p in model.parameters())
    assert 3_000_000 < params < 5_000_000
    assert compression_report(model, input_size=(3, 32, 32)).macs == 398_931_968
    eight = sum(p.numel() for p in create_model("xception", middle_blocks=8).parameters())
    # One middle block: three separable convs 384 -> 384 (depthwise 3x3 + pointwise) and their BatchNorms.
    assert eight - params == 4 * 3 * (384 * 9 + 384 * 384 + 2 * 384)


def test_blocks_are_depthwise_separable_with_projection_shortcuts_where_the_shape_changes():
    model = create_model("xception")
    separable = [m for m in model.modules() if isinstance(m, SeparableConv2d)]
    assert len(separable) == 3 * 2 + 4 * 3 + 2 + 2  # entry, middle, exit block, exit convs
    for sep in separable:
        dw, pw = sep.depthwise, sep.pointwise
        assert dw.kernel_size == (3, 3) and dw.groups == dw.in_channels == dw.out_channels == pw.in_channels
        assert pw.kernel_size == (1, 1) and pw.groups == 1
    blocks = [m for m in model.modules() if isinstance(m, XceptionBlock)]
    assert len(blocks) == 3 + 4 + 1
    projections = [b.shortcut[0] for b in blocks if not isinstance(b.shortcut, nn.Identity)]
    assert [(p.kernel_size, p.stride) for p in projections] == [((1, 1), (1, 1))] + [((1, 1), (2, 2))] * 3
    assert all(isinstance(b.shortcut, nn.Identity) for b in model.features.middle)
    # No aggressive stem: full resolution until the second entry block.
    assert all(c.stride == (1, 1) for c in _convs(model.features.stem).values())


@torch.no_grad()
def test_the_shortcut_is_added_to_the_branch():
    """With the branch's last BatchNorm at zero a block is its shortcut alone: an identity for a middle block
    (which the first ReLU would break if it acted in place on the shortcut's input)."""
    model = create_model("xception").eval()
    for block in (model.features.middle[0], model.features.entry[1]):
        bn = block.branch[-1] if isinstance(block.branch[-1], nn.BatchNorm2d) else block.branch[-2]
        bn.weight.zero_()
        bn.bias.zero_()
    x = torch.randn(2, 384, 8, 8)
    torch.testing.assert_close(model.features.middle[0](x), x, rtol=0, atol=0)
    x = torch.randn(2, 128, 32, 32)
    entry = model.features.entry[1]
    torch.testing.assert_close(entry(x), entry.shortcut(x))
    assert entry(x).shape == (2, 256, 16, 16)


@pytest.mark.parametrize("kwargs, message", [({"width": 0}, "width=0"), ({"middle_blocks": -1}, "middle_blocks=-1")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model("xception", **kwargs)


def test_qat_int8_onnx_export_agrees_with_the_fake_quant_model(tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from tests.ort_sessions import exact_session

    pl.seed_everything(0)
    module = ImageClassifier("xception", model_kwargs=SMALL, optimizer="adamw", lr=1e-3)
    path = tmp_path / "xception.int8.onnx"
    qat = QuantizationAwareTraining(weight_bits=8, activation_bits=8, export=str(path), calibration_batches=2)
    _fit(module, [qat])
    layers = len(_convs(module.model)) + 1  # every conv (depthwise, pointwise, projections) and the head
    # Not 4x: a depthwise filter has 9 weights, and its per-channel scale, zero point and folded bias stay wide.
    assert qat.artifact.quantized_layers == layers and qat.artifact.int8_bytes < qat.artifact.fp32_bytes / 2
    graph = onnx.load(str(path)).graph
    assert sum(node.op_type == "DequantizeLinear" for node in graph.node) >= layers
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = module.model.eval()(x)
    got = torch.from_numpy(exact_session(path).run(None, {"input": x.numpy()})[0])
    assert float((got - expected).abs().mean() / expected.abs().mean()) < 0.1


def test_unstructured_pruning_reaches_its_sparsity_and_filter_pruning_removes_coupled_filters():
    pl.seed_everything(0)
    module = ImageClassifier("xception", model_kwargs=SMALL, lr=0.01)
    pruning = IterativePruning(sparsity=0.8, schedule="one_shot", scope="global")
    _fit(module, [pruning])
    weights = [m.weight for m in module.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / sum(w.numel() for w in weights) == pytest.approx(0.8, abs=0.01)

    # Residual adds and depthwise convs tie channels of several convs together: they are pruned as groups,
    # every pointwise conv too, and the pruned network computes what its masked version did.
    module = ImageClassifier("xception", model_kwargs=SMALL, lr=0.01)
    dense = _convs(module.model)
    # channel_multiple=1: the small network's 8- and 16-channel convs would otherwise be left whole or halved
    pruning = IterativePruning(sparsity=0.5, schedule="one_shot", structure="filter", channel_multiple=1)
    _fit(module, [pruning])
    convs = _convs(module.model)
    plain = [n for n, c in dense.items() if c.groups == 1]
    assert all(convs[n].out_channels < dense[n].out_channels for n in plain), {n: convs[n].out_channels for n in plain}
    assert convs["features.stem.0"].out_channels == 4 and convs["features.exit.4.pointwise"].out_channels == 128
    assert module.model.classifier.in_features == 128
    with torch.no_grad():
        assert module.model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_svd_factorizes_the_pointwise_convs_and_weight_sharing_clusters_every_layer():
    pl.seed_everything(0)
    module = ImageClassifier("xception", model_kwargs=SMALL, lr=0.01)
    dense = sum(p.numel() for p in module.model.parameters())
    decomposition = TensorDecomposition(method="svd", rank=0.25, rank_multiple=1, filename=None, print_table=False)
    sharing = WeightSharing(weight_bits=4, start_epoch=1)
    _fit(module, [decomposition, sharing], max_epochs=2)
    assert sum(p.numel() for p in module.model.parameters()) < 0.6 * dense
    depthwise = [m for m in module.model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 3 * 2 + 3 + 2 + 2  # untouched: SVD does not apply to grouped convs
    # Each factorized pointwise conv is two 1x1 convs, and sharing clusters both.
    assert len(sharing.layers) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.model.modules())
    assert "features.middle.0.branch.1.pointwise.reduce" in sharing.layers
    for name, layer in sharing.layers.items():
        assert torch.unique(layer.weight).numel() <= 16, name
