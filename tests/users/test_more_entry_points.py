"""The rest of the entry points, on a user's own module: torch.compile, bf16-mixed, several instances of
one callback, DDP spawned on two CPU processes, and a fresh process resuming a mid-fit checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_compress import IterativePruning, QuantizationAwareTraining, TensorDecomposition, WeightSharing
from lightning_compress.methods.decomposition import Factorized
from lightning_compress.methods.quantization import is_quantized

from .models import UserClassifier, loader
from .test_entry_points import CONFIGS, _outputs, _trainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_compile(name, tmp_path):
    """``trainer.fit(torch.compile(module))``: Lightning compiles the forward after the callbacks' setup.

    aot_eager runs dynamo and AOTAutograd (what sees our class swaps, buffers and autograd functions)
    without inductor's code generation, which takes minutes on two cores.
    """
    network = "small_cnn"
    module, callbacks = UserClassifier(network), CONFIGS[name].make(network, tmp_path)
    _trainer(callbacks, max_epochs=3).fit(torch.compile(module, backend="aot_eager"), loader(network), loader(network))
    CONFIGS[name].check(module, callbacks, True)
    x = next(iter(loader(network)))[0]
    module.eval()
    with torch.no_grad():
        assert torch.allclose(torch.compile(module, backend="aot_eager")(x), module(x), atol=1e-5)


@pytest.mark.parametrize("network", ["small_cnn", "linear_transformer"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_mixed(network, name, tmp_path):
    module, callbacks = UserClassifier(network), CONFIGS[name].make(network, tmp_path)
    trainer = _trainer(callbacks, max_epochs=3, precision="bf16-mixed")
    trainer.fit(module, loader(network), loader(network))
    CONFIGS[name].check(module, callbacks, True)
    assert torch.isfinite(torch.tensor(trainer.test(module, loader(network), verbose=False)[0]["test_loss"]))


def _two_of_each(tmp_path):
    return {
        "pruning": [IterativePruning(sparsity=0.5, schedule="one_shot", start_epoch=0, targets=["net.0"]),
                    IterativePruning(sparsity=0.8, schedule="one_shot", start_epoch=1, targets=["net.3", "net.8"])],
        "quantization": [QuantizationAwareTraining(weight_bits=8, targets=["net.0"]),
                         QuantizationAwareTraining(weight_bits=4, targets=["net.3", "net.8"])],
        "decomposition": [TensorDecomposition(method="tucker", rank=0.5, rank_multiple=1, targets=["net.3"], print_table=False),
                          TensorDecomposition(method="svd", rank=2, rank_multiple=1, targets=["net.8"], print_table=False)],
        "sharing": [WeightSharing(weight_bits=3, start_epoch=1, targets=["net.0"]),
                    WeightSharing(weight_bits=5, start_epoch=1, targets=["net.3", "net.8"])],
    }


def _check_two(kind: str, module) -> None:
    net = module.net
    if kind == "pruning":
        zeros = [float((net[i].weight == 0).float().mean()) for i in (0, 3, 8)]
        assert zeros == [pytest.approx(0.5, abs=0.02), pytest.approx(0.8, abs=0.02), pytest.approx(0.8, abs=0.05)]
    elif kind == "quantization":
        assert [int(net[i].weight_bits) for i in (0, 3, 8)] == [8, 4, 4]
    elif kind == "decomposition":
        assert isinstance(net[3], Factorized) and net[3].method == "tucker"
        assert isinstance(net[8], Factorized) and net[8].method == "svd" and net[8].ranks == (2,)
    else:
        assert [net[i].weight.unique().numel() <= 2**b for i, b in ((0, 3), (3, 5), (8, 5))] == [True] * 3
        assert net[0].weight.unique().numel() < net[3].weight.unique().numel()


@pytest.mark.parametrize("kind", ["pruning", "quantization", "decomposition", "sharing"])
def test_two_instances_of_a_callback_each_keep_their_own_state(kind, tmp_path):
    network = "small_cnn"
    module = UserClassifier(network)
    trainer = _trainer(_two_of_each(tmp_path)[kind], tmp_path)
    trainer.fit(module, loader(network), loader(network))
    _check_two(kind, module)
    states = torch.load(tmp_path / "ckpt" / "epoch=2.ckpt", weights_only=True)["callbacks"]
    assert len([key for key in states if key.startswith(type(_two_of_each(tmp_path)[kind][0]).__name__)]) == 2
    fresh = UserClassifier(network)
    _trainer(_two_of_each(tmp_path)[kind]).test(fresh, loader(network), ckpt_path=str(tmp_path / "ckpt" / "epoch=2.ckpt"),
                                                 verbose=False)
    _check_two(kind, fresh)


def test_two_instances_on_one_layer_are_refused_with_the_layer_and_the_fix():
    callbacks = [IterativePruning(sparsity=0.5, targets=["net.*"]), IterativePruning(sparsity=0.8, targets=["net.3"])]
    with pytest.raises(ValueError, match=r"both target \['net.3'\].*disjoint `targets`"):
        _trainer(callbacks).fit(UserClassifier("small_cnn"), loader("small_cnn"))


class SaveEachRank(pl.Callback):
    """Each process's tensors at the end of fit, after the compression callbacks finalized."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        state = {k: v for k, v in pl_module.state_dict().items() if torch.is_tensor(v)}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


@pytest.mark.parametrize("name", ["composed", "share"])
def test_ddp_spawn_on_two_cpu_processes(name, tmp_path):
    """Both processes end with the same compressed network, and the main process gets it back whole."""
    network = "small_cnn"
    module, callbacks = UserClassifier(network), CONFIGS[name].make(network, tmp_path)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=3,
                         callbacks=[*callbacks, SaveEachRank(tmp_path)], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, loader(network), loader(network))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # The main process's module was never set up: what it holds came back through the state dict alone.
    CONFIGS[name].check(module, callbacks, True)
    main = {k: v for k, v in module.state_dict().items() if torch.is_tensor(v)}
    assert main.keys() == rank0.keys() and all(torch.equal(main[k], rank0[k]) for k in main)
    if name == "composed":
        assert any(is_quantized(m) for m in module.net.modules())


def test_resume_in_a_fresh_process_matches_the_uninterrupted_run(tmp_path):
    def run(*args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run([sys.executable, "-m", "tests.users.resume_script", *args], check=True, cwd=ROOT, env=env,
                       timeout=600)

    run(str(tmp_path / "full"))
    run(str(tmp_path / "resumed"), "--resume", str(tmp_path / "full" / "ckpt" / "epoch=0.ckpt"))
    full = torch.load(tmp_path / "full" / "outputs.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "outputs.pt", weights_only=True)
    assert torch.allclose(full, resumed, atol=1e-5)
