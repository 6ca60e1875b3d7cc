"""Every callback on networks users bring, inside their own LightningModule, through Lightning's entry points.

One test per (network, callback configuration) runs the whole chain a user goes through and checks the
outcome at each step, not only that nothing raised:

1. ``fit`` (a ModelCheckpoint saves every epoch): the compression happened as asked;
2. ``validate``, ``test``, ``predict`` on the same Trainer: finite results, compression intact;
3. ``test(ckpt_path=...)`` on a fresh module with fresh callbacks, from a checkpoint saved after fit
   (same loss as the trained module) and from one saved during fit (the structure is rebuilt);
4. ``load_from_checkpoint`` of both (the user's one-line ``on_load_checkpoint``): same outputs;
5. resume ``fit(ckpt_path=...)`` from the mid-fit checkpoint with fresh objects: ends where the
   uninterrupted run ended;
6. a second ``fit`` of the trained module with the same callback objects: the compression holds.

Cells a callback cannot do are refused in ``setup`` with the layer, the reason and the fix
(:data:`REFUSED`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_compress import IterativePruning, QuantizationAwareTraining, TensorDecomposition, WeightSharing, load_compressed
from lightning_compress.callbacks.targets import resolve_targets
from lightning_compress.methods.decomposition import Factorized
from lightning_compress.methods.pruning.masks import is_prunable
from lightning_compress.methods.quantization import is_quantized

from tests.ort_sessions import exact_session

from .models import NETWORKS, UserClassifier, loader

_CONVS = (nn.Conv1d, nn.Conv2d)


def _has_kxk_conv(net: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size != (1, 1) for m in net.modules())


def _decomposition_method(network: str) -> str:
    net = NETWORKS[network][0]()
    return "tucker" if _has_kxk_conv(net) else "svd"


@dataclass
class Config:
    """A callback list for a network, and what must hold of the network after fit."""

    make: Callable[[str, object], list[Callback]]
    check: Callable[[nn.Module, list[Callback], bool], None]


# ------------------------------------------------------------------ what each technique must leave
# Each check gets the user's LightningModule (targets are relative to it: it has no ``.model``).


def _targeted(module: nn.Module, targets, accept) -> list[str]:
    return resolve_targets(module, targets, accept, "layer")


def _check_pruned(module: nn.Module, callbacks: list[Callback], final: bool) -> None:
    pruning = next(c for c in callbacks if isinstance(c, IterativePruning))
    names = _targeted(module, pruning.targets, is_prunable)
    for name in names:
        weight = module.get_submodule(name).weight
        zeros = float((weight == 0).float().mean())
        if final:
            assert zeros == pytest.approx(pruning.sparsity, abs=0.02), (name, zeros)
        else:
            assert zeros > 0, name
    if pruning.targets is not None:  # and nothing else
        others = [n for n in _targeted(module, None, is_prunable) if n not in names]
        assert all(bool((module.get_submodule(n).weight != 0).all()) for n in others)


def _check_quantized(module: nn.Module, callbacks: list[Callback], final: bool) -> None:
    qat = next(c for c in callbacks if isinstance(c, QuantizationAwareTraining))
    layers = {n: m for n, m in module.named_modules() if is_quantized(m)}
    assert layers, "no layer was quantized"
    assert all(int(m.weight_bits) == qat.weight_bits for m in layers.values())
    if qat.targets is not None:
        assert sorted(layers) == sorted(_targeted(module, qat.targets, lambda m: is_quantized(m)))
    if final:
        assert all(bool(m.activation_observed) for m in layers.values())  # the learned ranges came along


def _check_decomposed(module: nn.Module, callbacks: list[Callback], final: bool) -> None:
    factorized = {n for n, m in module.named_modules() if isinstance(m, Factorized)}
    assert factorized, "no layer was factorized"
    decomposition = next(c for c in callbacks if isinstance(c, TensorDecomposition))
    if decomposition.targets is not None:
        assert factorized == set(_targeted(module, decomposition.targets, lambda m: isinstance(m, Factorized)))


def _check_shared(module: nn.Module, callbacks: list[Callback], final: bool) -> None:
    sharing = next(c for c in callbacks if isinstance(c, WeightSharing))
    if not final:
        return  # start_epoch=None: shared at fit end
    for name in _targeted(module, sharing.targets, is_prunable):
        values = module.get_submodule(name).weight.detach().unique().numel()
        assert values <= 2**sharing.weight_bits, (name, values)


def _check_composed(module: nn.Module, callbacks: list[Callback], final: bool) -> None:
    _check_decomposed(module, callbacks, final)
    _check_quantized(module, callbacks, final)
    if final:
        zeros = [float((m.weight == 0).float().mean()) for m in module.modules() if is_quantized(m)]
        assert zeros and max(zeros) == pytest.approx(0.5, abs=0.02), zeros


# ------------------------------------------------------------------ configurations

TARGETS = {  # explicit targets: two layers of each kind, named as the user's module names them
    ("small_cnn", "prune"): ["net.3", "net.8"],
    ("small_cnn", "qat"): ["net.3"],
    ("small_cnn", "decompose"): ["net.3"],
    ("small_cnn", "share"): ["net.0", "net.8"],
    ("linear_transformer", "prune"): ["net.blocks.*.mlp.*"],
    ("linear_transformer", "qat"): ["net.blocks.0.q", "net.head"],
    ("linear_transformer", "decompose"): ["net.blocks.*.mlp.0"],
    ("linear_transformer", "share"): ["net.embed", "net.blocks.1.*"],
}


def _prune(network, tmp, targets=None):
    return [IterativePruning(sparsity=0.5, schedule="agp", start_epoch=0, end_epoch=2, frequency=1, targets=targets)]


def _qat(network, tmp, targets=None):
    # The deep torchvision nets get a few steps from random init here: BatchNorm's running statistics are
    # then far from the batches', and in evaluation their activations grow past every learned range
    # (thousands at ResNet-18's head), which no int8 file reproduces. QAT of a trained network starts
    # from consistent statistics; freezing them from the start (freeze_bn_epoch=0) gives the same here.
    freeze = 0 if network in ("resnet18", "mobilenet_v3_small") else None
    return [QuantizationAwareTraining(weight_bits=8, activation_bits=8, targets=targets, freeze_bn_epoch=freeze,
                                      export=str(tmp / "model.onnx"), calibration_batches=2)]


def _decompose(network, tmp, targets=None):
    return [TensorDecomposition(method=_decomposition_method(network), rank=0.5, rank_multiple=1, targets=targets,
                                print_table=False)]


def _share(network, tmp, targets=None):
    return [WeightSharing(weight_bits=4, export=str(tmp / "model.lcpk"), targets=targets)]


def _composed(network, tmp, targets=None):
    return [
        TensorDecomposition(method=_decomposition_method(network), rank=0.5, rank_multiple=1, print_table=False),
        IterativePruning(sparsity=0.5, schedule="one_shot", start_epoch=1),
        QuantizationAwareTraining(weight_bits=8, activation_bits=8),
    ]


CONFIGS = {
    "prune": Config(_prune, _check_pruned),
    "qat": Config(_qat, _check_quantized),
    "decompose": Config(_decompose, _check_decomposed),
    "share": Config(_share, _check_shared),
    "composed": Config(_composed, _check_composed),
}

def _slim(network, tmp, targets=None):
    return [IterativePruning(sparsity=0.5, schedule="one_shot", start_epoch=0, structure="filter",
                             criterion="bn_scale", scope="global", bn_penalty=1e-3,
                             channel_multiple=1)]  # 16 and 32 channels: multiples of 8 would overshoot a half


def _check_slimmed(module: nn.Module, callbacks: list[Callback], final: bool) -> None:
    """Half of the channels go: masked during the fit, removed from the convolutions at its end."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    alive = [int(c.weight_mask.flatten(1).any(1).sum()) if hasattr(c, "weight_mask") else c.out_channels for c in convs]
    assert sum(alive) <= 0.6 * (16 + 32), alive
    if final:
        assert [c.out_channels for c in convs] == alive and not any(hasattr(c, "weight_mask") for c in convs)


def _filter(network, tmp, targets=None):
    return [IterativePruning(sparsity=0.5, schedule="one_shot", start_epoch=0, structure="filter")]


def _check_filtered(module: nn.Module, callbacks: list[Callback], final: bool) -> None:
    """Channels tied by residual adds go as groups: masked during the fit, removed from every layer that
    carries them at its end (depthwise convs and shuffles: tests/callbacks/test_pruning.py)."""
    network = next(n for n, (build, _) in NETWORKS.items() if type(build()) is type(module.net))
    dense = {n: m.out_channels for n, m in NETWORKS[network][0]().named_modules() if isinstance(m, nn.Conv2d)}
    convs = {n: m for n, m in module.net.named_modules() if isinstance(m, nn.Conv2d)}
    alive = {n: int(c.weight_mask.flatten(1).any(1).sum()) if hasattr(c, "weight_mask") else c.out_channels
             for n, c in convs.items()}
    assert sum(alive.values()) < 0.75 * sum(dense.values()), alive
    if final:
        assert {n: c.out_channels for n, c in convs.items()} == alive
        assert not any(hasattr(c, "weight_mask") for c in convs.values())


def _tt(network, tmp, targets=None):
    return [TensorDecomposition(method="tt", rank=0.5, rank_multiple=1, print_table=False)]


def _flattened(network, tmp, targets=None):
    return [TensorDecomposition(method="flattened", rank=2, print_table=False)]


def _pq(network, tmp, targets=None):
    return [WeightSharing(method="pq", weight_bits=3, subvector_size={"net.0": 3, "*": 4}, start_epoch=1,
                          export=str(tmp / "model.lcpk"))]


def _check_product_shared(module: nn.Module, callbacks: list[Callback], final: bool) -> None:
    """After fit: each weight's column blocks hold at most 2**bits distinct sub-vectors (its centroids)."""
    convs = [m for m in module.net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not final:
        return  # the mid-fit checkpoint is from before clustering (start_epoch=1)
    for m in convs:
        rows = m.weight.detach().reshape(m.weight.shape[0], -1)
        size = 3 if m is module.net[0] else 4
        first_block = rows[:, :size]
        assert first_block.unique(dim=0).shape[0] <= 8


# Configurations run on one network of the matrix only (name -> (network, config)).
EXTRA = {
    "tt": ("small_cnn", Config(_tt, _check_decomposed)),
    "flattened": ("small_cnn", Config(_flattened, _check_decomposed)),
    "pq": ("small_cnn", Config(_pq, _check_product_shared)),
    "slim": ("small_cnn", Config(_slim, _check_slimmed)),
    "filter_residual": ("resnet18", Config(_filter, _check_filtered)),
}

# Cells refused in setup, and the words the refusal must contain (the layer or reason, and the fix).
REFUSED: dict[tuple[str, str], tuple[str, ...]] = {}


def _trainer(callbacks, tmp=None, max_epochs=3, **kwargs) -> pl.Trainer:
    if tmp is not None:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=tmp / "ckpt", filename="{epoch}", save_top_k=-1)]
    return pl.Trainer(accelerator="cpu", max_epochs=max_epochs, callbacks=callbacks, logger=False,
                      enable_checkpointing=tmp is not None, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, **kwargs)


def _outputs(module: pl.LightningModule, network: str) -> torch.Tensor:
    x = next(iter(loader(network, batches=1, batch_size=16, seed=7)))[0]
    module.eval()
    with torch.no_grad():
        return module(x)


def _loss(results: list[dict]) -> float:
    return float(results[0]["test_loss"])


def _check_artifacts(module: pl.LightningModule, callbacks: list[Callback], network: str) -> None:
    """The files written at fit end run as the model does: int8 ONNX in ONNX Runtime, the packed file reloaded."""
    x = next(iter(loader(network, batches=1, batch_size=256, seed=3)))[0]
    module.eval()
    with torch.no_grad():
        logits = module(x)
    for callback in callbacks:
        if isinstance(callback, QuantizationAwareTraining) and callback.export:
            pytest.importorskip("onnxruntime")
            session = exact_session(callback.artifact.path)
            got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
            scale = float(logits.std())
            assert float((got - logits).abs().max()) <= 0.1 * scale
            # Top-1 where the model has a margin: a near-tie (these briefly trained nets have some) is
            # flipped by any rounding, and says nothing of the file.
            top2 = logits.topk(2, dim=1).values
            decided = top2[:, 0] - top2[:, 1] > 0.01 * scale
            agreement = float((got.argmax(1) == logits.argmax(1))[decided].float().mean())
            assert decided.float().mean() > 0.9 and agreement >= 0.99, (float(decided.float().mean()), agreement)
        if isinstance(callback, WeightSharing) and callback.export:
            fresh = UserClassifier(network)
            load_compressed(callback.export, model=fresh)
            fresh.eval()
            with torch.no_grad():
                assert torch.equal(fresh(x), logits)


def run_chain(network: str, name: str, tmp, targets=None) -> None:
    config = CONFIGS[name] if name in CONFIGS else EXTRA[name][1]
    train, val = loader(network), loader(network, batches=2, seed=1)
    make = lambda: config.make(network, tmp, targets) if targets is not None else config.make(network, tmp)  # noqa: E731

    # 1. fit, checkpoints every epoch
    module, callbacks = UserClassifier(network), make()
    trainer = _trainer(callbacks, tmp)
    trainer.fit(module, train, val)
    config.check(module, callbacks, True)
    expected = _outputs(module, network)
    assert torch.isfinite(expected).all()
    _check_artifacts(module, callbacks, network)

    # 2. validate / test / predict on the same Trainer
    assert torch.isfinite(torch.tensor(trainer.validate(module, val, verbose=False)[0]["val_loss"]))
    tested = _loss(trainer.test(module, val, verbose=False))
    predictions = trainer.predict(module, val)
    assert torch.isfinite(torch.cat(predictions)).all()
    config.check(module, callbacks, True)
    assert torch.allclose(_outputs(module, network), expected, atol=1e-6)
    after, during = tmp / "after.ckpt", tmp / "ckpt" / "epoch=0.ckpt"
    trainer.save_checkpoint(after)

    # 3. test(ckpt_path) on a fresh module with fresh callbacks: after fit and during it
    fresh, fresh_callbacks = UserClassifier(network), make()
    assert _loss(_trainer(fresh_callbacks).test(fresh, val, ckpt_path=str(after), verbose=False)) == pytest.approx(tested, abs=1e-5)
    config.check(fresh, fresh_callbacks, True)
    assert torch.allclose(_outputs(UserClassifier.load_from_checkpoint(after), network), expected, atol=1e-5)
    mid, mid_callbacks = UserClassifier(network), make()
    assert torch.isfinite(torch.tensor(_loss(_trainer(mid_callbacks).test(mid, val, ckpt_path=str(during), verbose=False))))
    config.check(mid, mid_callbacks, False)

    # 4. load_from_checkpoint into the user's class (after fit: above)
    assert torch.isfinite(_outputs(UserClassifier.load_from_checkpoint(during), network)).all()

    # 5. resume from the mid-fit checkpoint with fresh objects: ends where the uninterrupted run did
    resumed, resumed_callbacks = UserClassifier(network), make()
    _trainer(resumed_callbacks).fit(resumed, train, val, ckpt_path=str(during))
    config.check(resumed, resumed_callbacks, True)
    assert torch.allclose(_outputs(resumed, network), expected, atol=1e-4)

    # 6. a second fit of the trained module with the same callback objects
    _trainer(callbacks, max_epochs=2).fit(module, train, val)
    assert torch.isfinite(_outputs(module, network)).all()
    config.check(module, callbacks, True)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("network", list(NETWORKS))
def test_every_entry_point(network, name, tmp_path):
    refused = REFUSED.get((network, name))
    if refused:
        with pytest.raises(ValueError) as error:
            run_chain(network, name, tmp_path)
        assert all(word in str(error.value) for word in refused), str(error.value)
        return
    run_chain(network, name, tmp_path)


@pytest.mark.parametrize("network, name", list(TARGETS))
def test_every_entry_point_with_explicit_targets(network, name, tmp_path):
    run_chain(network, name, tmp_path, targets=TARGETS[(network, name)])


@pytest.mark.parametrize("name", list(EXTRA))
def test_every_entry_point_of_a_configuration_for_one_network(name, tmp_path):
    run_chain(EXTRA[name][0], name, tmp_path)
