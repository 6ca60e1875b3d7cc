"""The benchmark scripts import, and the peer they configure follows the intended schedule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn


def test_model_pruning_amounts_compose_to_the_cubic_ramp():
    from benchmarks.pruning_proxy import cubic, model_pruning

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    peer = model_pruning(model, final=0.98, ramp_epochs=8)
    remaining = 1.0
    for epoch in range(10):
        remaining *= 1.0 - peer.amount(epoch)
        assert 1.0 - remaining == pytest.approx(cubic((epoch + 1) / 8, 0.98))
    assert 1.0 - remaining == pytest.approx(0.98)
    assert len(peer._parameters_to_prune) == 2  # convolutions and linear layers only, no BatchNorm


def test_benchmark_modules_import():
    import benchmarks.data_pipeline  # noqa: F401
    import benchmarks.proxy  # noqa: F401


def test_new_benchmark_modules_import():
    import benchmarks.decomposition_proxy  # noqa: F401
    import benchmarks.decomposition_vgg19  # noqa: F401
    import benchmarks.quantization_proxy  # noqa: F401


def test_frontier_table_comes_from_the_results_jsons(tmp_path):
    from benchmarks import frontier

    rows = frontier.rows()
    assert {r["technique"] for r in rows} == {"pruning", "deep compression", "decomposition", "quantization"}
    assert all(r["source"].endswith(".json") for r in rows)
    table = frontier.table(rows)
    assert table.count("\n") == len(rows) + 1 and "<" not in table
    frontier.plot(rows, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    readme = frontier.README.read_text()
    assert table in readme  # the README shows what the JSONs hold


def _recipe(name):
    import yaml

    from benchmarks.recipes import RECIPES

    return yaml.safe_load((RECIPES / name).read_text())


def test_recipe_scaling_keeps_each_schedule_in_proportion():
    from benchmarks.recipes import BATCH_SIZE, TEST_IMAGES, TRAIN_IMAGES, VGG_WIDTH, scale_config

    recipe = _recipe("vgg19_cifar10/deep_compression.yaml")
    original = copy.deepcopy(recipe)
    scaled = scale_config(recipe, "DATA", "CACHE")
    assert recipe == original  # the recipe itself is not touched
    assert scaled["trainer"]["max_epochs"] == 6 and scaled["trainer"]["accelerator"] == "cpu"
    pruning, sharing = (c["init_args"] for c in scaled["trainer"]["callbacks"][:2])
    assert (pruning["start_epoch"], pruning["end_epoch"], sharing["start_epoch"]) == (0, 4, 5)  # 0, 20, 25 of 30
    # 100 steps of 196 per epoch over 30 epochs -> the same share of 79 steps per epoch over 6 epochs
    assert pruning["frequency"] == round(100 * (6 * 79) / (30 * 196))
    assert scaled["model"]["lr"] == pytest.approx(original["model"]["lr"] * BATCH_SIZE / 256)
    assert scaled["model"]["model_kwargs"] == {"width": VGG_WIDTH}
    data = scaled["data"]["init_args"]
    assert (data["train_subset"], data["test_subset"], data["data_dir"]) == (TRAIN_IMAGES, TEST_IMAGES, "DATA")
    baseline = scale_config(_recipe("mobilenet_v2_cifar10/baseline.yaml"), "DATA", "CACHE")
    assert baseline["trainer"]["max_epochs"] == 5 and "model_kwargs" not in baseline["model"]


def test_every_benchmarked_recipe_scales_to_a_valid_schedule():
    from benchmarks.recipes import EPOCH_KEYS, RUNS, scale_config

    for _, recipe, _ in RUNS:
        scaled = scale_config(_recipe(recipe), "DATA", "CACHE")
        epochs = scaled["trainer"]["max_epochs"]
        for callback in scaled["trainer"].get("callbacks", []):
            args = callback.get("init_args") or {}
            for key in EPOCH_KEYS:
                if isinstance(args.get(key), int):
                    assert 0 <= args[key] <= epochs, (recipe, key)
            if "end_epoch" in args:
                assert args["start_epoch"] < args["end_epoch"], recipe


def test_peer_tucker_parameter_count_matches_the_factorized_model():
    from benchmarks.decomposition_proxy import peer_energy_tucker
    from benchmarks.recipes import _tucker_params

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 24, 3), nn.ReLU(), nn.Conv2d(24, 8, 1))
    predicted = _tucker_params(model, 0.7)
    peer_energy_tucker(model, 0.7)
    assert predicted == sum(p.numel() for p in model.parameters())
    assert predicted < 3 * 16 * 9 + 16 + 16 * 24 * 9 + 24 + 24 * 8 + 8


def test_recipes_table_comes_from_the_results_json(tmp_path):
    from benchmarks import recipes_report

    if not recipes_report.SOURCE.is_file():
        pytest.skip("benchmarks/results/recipes_cpu.json not written yet")
    data = recipes_report.load()
    table = recipes_report.table(data)
    assert table.count("\n") == len(data["runs"]) + 1
    assert table in recipes_report.README.read_text()  # the README shows what the JSON holds
    recipes_report.frontier_plot(data, tmp_path / "frontier.png")
    shown = recipes_report.layers_plot(data, tmp_path / "layers.png")
    assert (tmp_path / "layers.png").stat().st_size > 10_000
    assert all(row["name"].startswith("vgg19/") and not row.get("peer") for row in shown)
