from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from lightning_compress.methods.pruning import sensitivity as sensitivity_module
from lightning_compress.methods.pruning.sensitivity import (
    DEFAULT_LEVELS,
    SensitivityResult,
    sensitivity_analysis,
)


class ScaledLinear(nn.Linear):
    """A Linear subclass: the default targets must include it."""


def tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),  # "0": 36 weights
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        ScaledLinear(4 * 4 * 4, 3),  # "4": 192 weights
    )


def zero_counts(model: nn.Module) -> dict[str, int]:
    return {name: int((m.weight == 0).sum()) for name, m in model.named_modules() if name in ("0", "4")}


def test_default_levels():
    assert DEFAULT_LEVELS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def test_curves_one_value_per_layer_and_level_with_exact_zero_counts():
    model = tiny_model()
    seen = []

    def evaluate(m: nn.Module) -> float:
        seen.append(zero_counts(m))
        return float(len(seen))  # the call number: shows which evaluation landed where

    levels = [0.1, 0.5, 0.95]
    result = sensitivity_analysis(model, evaluate, levels=levels, progress=False)

    assert result.levels == levels
    assert list(result.curves) == ["0", "4"]
    assert result.params == {"0": 36, "4": 192}
    assert result.baseline == 1.0 and seen[0] == {"0": 0, "4": 0}
    assert result.curves == {"0": [2.0, 3.0, 4.0], "4": [5.0, 6.0, 7.0]}
    # Exactly round(level * numel) zeros in the pruned layer, none in the other one.
    assert seen[1:4] == [{"0": round(s * 36), "4": 0} for s in levels]
    assert seen[4:7] == [{"0": 0, "4": round(s * 192)} for s in levels]


def test_prunes_the_smallest_magnitudes():
    model = nn.Sequential(nn.Linear(4, 5, bias=False))
    original = torch.randperm(20).float().sub(10).reshape(5, 4)  # distinct magnitudes up to ties of +-k
    with torch.no_grad():
        model[0].weight.copy_(original)
    zero_masks = []

    def evaluate(m: nn.Module) -> float:
        zero_masks.append(m[0].weight == 0)
        return 0.0

    sensitivity_analysis(model, evaluate, levels=[0.25], progress=False)

    zeroed = zero_masks[1]  # [0] is the baseline
    assert int(zeroed.sum()) == 5
    # Every zeroed weight was at most as large in magnitude as every weight kept.
    assert original[zeroed].abs().max() <= original[~zeroed].abs().min()


def test_model_left_bit_exact_and_in_its_modes():
    model = tiny_model()
    model.train()
    model[1].eval()  # a mixed state must come back as it was, not as all-train or all-eval
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]

    def evaluate(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return float(m(torch.randn(2, 1, 6, 6)).sum())

    sensitivity_analysis(model, evaluate, progress=False)

    after = model.state_dict()
    for key, value in before.items():
        # Compared as raw bits: -0.0 vs 0.0 or a last-ulp change would fail here.
        assert torch.equal(value.reshape(-1).view(torch.uint8), after[key].reshape(-1).view(torch.uint8)), key
    assert [m.training for m in model.modules()] == modes


def test_model_restored_when_evaluate_raises():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def evaluate(m: nn.Module) -> float:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("evaluation failed")
        return 0.0

    with pytest.raises(RuntimeError, match="evaluation failed"):
        sensitivity_analysis(model, evaluate, levels=[0.5, 0.9], progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_targets_are_globs_and_levels_are_sorted():
    result = sensitivity_analysis(tiny_model(), lambda m: 0.5, levels=[0.5, 0.1, 0.5], targets=["4"], progress=False)
    assert list(result.curves) == ["4"]
    assert result.levels == [0.1, 0.5]

    nested = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 1))
    result = sensitivity_analysis(nested, lambda m: 0.5, levels=[0.5], targets=["0.*"], progress=False)
    assert list(result.curves) == ["0.0", "0.1"]


def test_progress_bar_runs():
    result = sensitivity_analysis(tiny_model(), lambda m: 1.0, levels=[0.5], progress=True)
    assert result.curves == {"0": [1.0], "4": [1.0]}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"levels": []}, r"levels=\[\] is empty"),
        ({"levels": [0.5, 1.0]}, r"levels=\[0.5, 1.0\]: \[1.0\] outside \[0, 1\)"),
        ({"levels": [-0.1]}, r"outside \[0, 1\)"),
        ({"targets": ["classifier*"]}, r"targets=\['classifier\*'\]: \['classifier\*'\] match no .*available: 0, 4$"),
        ({"targets": ["0", "1"]}, r"targets=\['0', '1'\]: \['1'\] match no"),  # "1" is a BatchNorm2d
        ({"targets": "4"}, r"targets='4' must be a list"),
    ],
)
def test_errors_name_argument_value_and_range(kwargs, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        sensitivity_analysis(model, lambda m: 0.0, progress=False, **kwargs)


def test_error_lists_available_layers_truncated():
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(30)])
    with pytest.raises(ValueError, match=r"available: 0, 1, .*, 19, \.\.\. \(10 more\)"):
        sensitivity_analysis(model, lambda m: 0.0, targets=["nothing"], progress=False)


def test_error_without_prunable_layers():
    with pytest.raises(ValueError, match="has no nn.Conv2d or nn.Linear"):
        sensitivity_analysis(nn.Sequential(nn.ReLU()), lambda m: 0.0, progress=False)


def make_result() -> SensitivityResult:
    return SensitivityResult(
        baseline=0.9,
        levels=[0.1, 0.2, 0.3, 0.4],
        curves={
            "robust": [0.9, 0.9, 0.89, 0.88],  # never below 0.88
            "dips": [0.9, 0.89, 0.85, 0.88],  # recovers at 0.4 after failing at 0.3
            "fragile": [0.8, 0.9, 0.9, 0.9],  # fails at the first level
        },
        params={"robust": 100, "dips": 10, "fragile": 1},
    )


def test_sparsity_for_takes_the_largest_level_below_which_every_level_passes():
    result = make_result()
    # 0.9 - 0.02 = 0.88 up to rounding: 0.88 itself passes.
    assert result.sparsity_for(0.02) == {"robust": 0.4, "dips": 0.2, "fragile": 0.0}
    assert result.sparsity_for(0.0) == {"robust": 0.2, "dips": 0.1, "fragile": 0.0}
    assert result.sparsity_for(0.5) == {"robust": 0.4, "dips": 0.4, "fragile": 0.4}


def test_sparsity_for_rejects_a_negative_drop():
    with pytest.raises(ValueError, match=r"max_drop=-0.1 must be >= 0"):
        make_result().sparsity_for(-0.1)


def test_json_round_trip(tmp_path):
    result = make_result()
    result.to_json(tmp_path / "sensitivity.json")
    assert SensitivityResult.from_json(tmp_path / "sensitivity.json") == result


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    make_result().plot(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        make_result().plot(tmp_path / "curves.png")


def test_methods_do_not_import_lightning():
    source = sensitivity_module.__loader__.get_source(sensitivity_module.__name__)
    assert "lightning" not in source.replace("lightning_compress", "")

