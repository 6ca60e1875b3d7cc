"""The benchmarks import and dispatch through one entry point, share one set of helpers, the peers
they configure follow the intended schedule, and the README shows what the results JSONs hold."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def test_model_pruning_amounts_compose_to_the_cubic_ramp():
    from benchmarks.common import cubic, model_pruning

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    peer = model_pruning(model, final=0.98, ramp_epochs=8)
    remaining = 1.0
    for epoch in range(10):
        remaining *= 1.0 - peer.amount(epoch)
        assert 1.0 - remaining == pytest.approx(cubic((epoch + 1) / 8, 0.98))
    assert 1.0 - remaining == pytest.approx(0.98)
    assert len(peer._parameters_to_prune) == 2  # convolutions and linear layers only, no BatchNorm


def test_every_listed_benchmark_imports_and_has_main():
    import importlib

    from benchmarks.__main__ import BENCHMARKS

    modules = {module for module, _ in BENCHMARKS.values()}
    files = {p.stem for p in BENCHMARKS_DIR.glob("*.py") if not p.stem.startswith("common")} - {"__init__", "__main__"}
    assert modules == files  # every benchmark is listed, and every listed one exists
    for module in modules:
        assert callable(importlib.import_module(f"benchmarks.{module}").main)


def test_entry_point_lists_and_dispatches(capsys):
    from benchmarks.__main__ import BENCHMARKS, main

    assert main([]) == 0 and main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {name} " in listing for name in BENCHMARKS)
    assert main(["no-such-benchmark"]) == 2
    for name in BENCHMARKS:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        assert f"python -m benchmarks {name}" in capsys.readouterr().out


def test_no_benchmark_imports_another_benchmarks_names():
    """Helpers used by several benchmarks live in common.py (or a common_*.py beside it); a benchmark
    imports no other benchmark."""
    for path in BENCHMARKS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                assert node.module.startswith("common"), (path.name, node.module)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks"):
                raise AssertionError((path.name, node.module))


def test_benchmarks_call_the_library_by_its_current_names():
    """Every keyword given to a callback or to the Pruner is one of its parameters (the renames:
    start_epoch, weight_bits, finalize, export), and a written file is read as ``callback.artifact``."""
    import inspect

    import lightning_compress
    from lightning_compress.methods.pruning.pruner import Pruner

    classes = {c.__name__: c for c in (lightning_compress.IterativePruning, lightning_compress.WeightSharing,
                                       lightning_compress.TensorDecomposition,
                                       lightning_compress.QuantizationAwareTraining, Pruner)}
    called = set()
    for path in BENCHMARKS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                assert node.attr != "export_summary", path.name
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in classes:
                called.add(node.func.id)
                parameters = inspect.signature(classes[node.func.id]).parameters
                for keyword in node.keywords:
                    assert keyword.arg is None or keyword.arg in parameters, (path.name, node.func.id, keyword.arg)
    assert called == set(classes)  # the check saw every one of them


def test_results_write_atomically_and_old_files_still_load(tmp_path):
    from benchmarks.common import RESULTS, machine, read_result, write_result

    info = machine()
    assert {"python", "torch", "onnxruntime", "cpu", "cpu_threads"} <= set(info)
    path = write_result(tmp_path / "r.json", {"machine": info, "x": 1})
    assert json.loads(path.read_text()) == {"machine": info, "x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind
    assert read_result(tmp_path / "missing.json") is None
    for result in RESULTS.glob("*.json"):  # written before "machine" existed, some of them
        assert isinstance(read_result(result.name), dict)


def test_median_seconds_times_every_runner():
    from benchmarks.common import median_seconds, model_latency

    calls = {"a": 0, "b": 0}
    seconds = median_seconds({k: (lambda k=k: calls.__setitem__(k, calls[k] + 1)) for k in calls}, repeats=5, warmup=2)
    assert calls == {"a": 7, "b": 7} and set(seconds) == {"a", "b"}
    assert model_latency(nn.Sequential(nn.Conv2d(3, 4, 3)), batch=1, repeats=3) > 0


def test_frontier_table_comes_from_the_results_jsons(tmp_path):
    from benchmarks import report

    rows = report.frontier_rows()
    assert {r["technique"] for r in rows} == {"pruning", "deep compression", "decomposition", "quantization"}
    assert all(r["source"].endswith(".json") for r in rows)
    table = report.frontier_table(rows)
    assert table.count("\n") == len(rows) + 1 and "<" not in table
    report.frontier_plot(rows, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    readme = report.README.read_text()
    assert table in readme  # the README shows what the JSONs hold


def test_report_rewrites_only_between_the_markers():
    from benchmarks import report

    readme = report.README.read_text()
    bodies = report.sections(list(report.SECTIONS), plots=False)
    assert report.update_readme(readme, bodies) == readme  # what is there is what the JSONs give
    text = "before\n<!-- frontier:start -->\nold\n<!-- frontier:end -->\nafter\n"
    assert report.update_readme(text, {"frontier": "new"}) == text.replace("old", "new")
    with pytest.raises(ValueError):
        report.update_readme("no markers", {"recipes": "x"})


def _recipe(name):
    import yaml

    from benchmarks.recipes import RECIPES

    return yaml.safe_load((RECIPES / name).read_text())


def test_recipe_scaling_keeps_each_schedule_in_proportion():
    from benchmarks.common import BATCH_SIZE, TEST_IMAGES, TRAIN_IMAGES
    from benchmarks.recipes import SCALED_WIDTHS, VGG_WIDTH, scale_config

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
    xception = scale_config(_recipe("xception_cifar10/filter_prune.yaml"), "DATA", "CACHE")
    assert xception["model"]["model_kwargs"] == {"width": SCALED_WIDTHS["xception"]}


def test_every_benchmarked_recipe_scales_to_a_valid_schedule():
    from benchmarks.common_recipes import EPOCH_KEYS
    from benchmarks.recipes import RUNS, scale_config

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
    from benchmarks.common import peer_energy_tucker, tucker_params

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 24, 3), nn.ReLU(), nn.Conv2d(24, 8, 1))
    predicted = tucker_params(model, 0.7)
    peer_energy_tucker(model, 0.7)
    assert predicted == sum(p.numel() for p in model.parameters())
    assert predicted < 3 * 16 * 9 + 16 + 16 * 24 * 9 + 24 + 24 * 8 + 8


def test_recipes_table_comes_from_the_results_json(tmp_path):
    from benchmarks import report

    if not report.RECIPES_SOURCE.is_file():
        pytest.skip("benchmarks/results/recipes_cpu.json not written yet")
    data = report.read_result(report.RECIPES_SOURCE)
    table = report.recipes_table(data)
    assert table.count("\n") == len(data["runs"]) + 1
    assert table in report.README.read_text()  # the README shows what the JSON holds
    report.recipes_plot(data, tmp_path / "frontier.png")
    shown = report.recipes_layers_plot(data, tmp_path / "layers.png")
    assert (tmp_path / "layers.png").stat().st_size > 10_000
    assert all(row["name"].startswith("vgg19/") and not row.get("peer") for row in shown)


def test_fullscale_covers_every_vgg19_recipe_with_valid_schedules():
    from benchmarks.common_recipes import EPOCH_KEYS, RECIPES
    from benchmarks.fullscale import Plan, full_config, runs

    table = runs()
    recipes = {recipe for recipe, _ in table.values()}
    assert recipes == {str(p.relative_to(RECIPES)) for p in (RECIPES / "vgg19_cifar10").glob("*.yaml")}
    assert {peer for _, peer in table.values()} >= {"model_pruning", "tensorly_tucker", "torch_ao_qat"}
    plan = Plan()
    for recipe in recipes:
        config = full_config(recipe, plan, "DATA", "CACHE")
        trainer, data = config["trainer"], config["data"]["init_args"]
        assert trainer["accelerator"] == "gpu" and trainer["precision"] == "bf16-mixed" and data["device_resident"]
        assert data["batch_size"] == plan.batch_size and config["model"]["compile"] == plan.compile
        epochs = trainer["max_epochs"]
        assert epochs == (plan.baseline_epochs if recipe.endswith("baseline.yaml") else min(epochs, plan.recipe_epochs))
        for callback in trainer.get("callbacks", []):
            args = callback.get("init_args") or {}
            assert all(0 <= args[k] <= epochs for k in EPOCH_KEYS if isinstance(args.get(k), int)), recipe
            if "end_epoch" in args:
                assert args["start_epoch"] < args["end_epoch"], recipe


def test_fullscale_smoke_writes_the_table(tiny_cifar_dir, tmp_path, monkeypatch):
    """``python -m benchmarks.fullscale --smoke``: the GPU command's code on the CPU at tiny scale, a row of
    each kind with its peer; the JSON is copied to $OUT after each row."""
    from benchmarks import fullscale

    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    results = tmp_path / "fullscale.json"
    fullscale.main(["--smoke", "--data-dir", str(tiny_cifar_dir), "--cache-dir", str(tmp_path / "cache"),
                    "--work", str(tmp_path / "work"), "--results", str(results),
                    "--only", "vgg19/baseline", "vgg19/prune_98", "vgg19/qat_int8", "vgg19/tucker"])
    data = json.loads(results.read_text())
    assert json.loads((tmp_path / "out" / results.name).read_text()) == data
    assert data["plain_loop_epoch_seconds"] > 0 and data["ours_epoch_seconds"] > 0
    rows = {r["name"]: r for r in data["rows"]}
    assert [r for r in rows.values() if "error" in r] == []
    assert set(rows) == {"vgg19/baseline", "vgg19/prune_98", "vgg19/prune_98 ModelPruning", "vgg19/qat_int8",
                         "vgg19/qat_int8 torch.ao", "vgg19/tucker", "vgg19/tucker TensorLy energy", "vgg19/tucker_15"}
    for r in rows.values():
        assert {"recipe", "peer", "accuracy", "file_bytes", "ratio", "epoch_seconds"} <= set(r), r["name"]
        assert 0 <= r["accuracy"] <= 1 and r["file_bytes"] > 0 and r["epoch_seconds"] > 0
    assert rows["vgg19/baseline"]["ratio"] == pytest.approx(rows["vgg19/baseline"]["state_dict_bytes"] / rows["vgg19/baseline"]["file_bytes"])
    assert rows["vgg19/prune_98"]["nonzeros"] < 0.05 * rows["vgg19/prune_98"]["params"]  # the recipe's 98 %
    assert rows["vgg19/prune_98 ModelPruning"]["peer"] == "Lightning ModelPruning"
    assert rows["vgg19/qat_int8"]["runtime"] == "onnxruntime" and rows["vgg19/tucker"]["ratio"] > 5
    assert rows["vgg19/prune_98"]["runtime"] == "torch"  # float rows: torch on the training device, as on a GPU
    assert rows["vgg19/tucker TensorLy energy"]["params"] >= rows["vgg19/tucker"]["params"]  # matched to ours
    # The README's section renders from such a JSON (never from a smoke run's), with its plot.
    from benchmarks import common_report_fullscale

    assert not common_report_fullscale.measured(data)
    data["smoke"] = False
    assert common_report_fullscale.measured(data)
    text = "\n".join([common_report_fullscale.header(data), common_report_fullscale.table(data), common_report_fullscale.targets(data)])
    assert "| prune_98 | Lightning ModelPruning |" in text and "prune_98 ahead of Lightning ModelPruning" in text
    assert "<= 1.05x a plain PyTorch loop" in text
    from benchmarks.report import recipes_plot

    common_report_fullscale.plot(data, tmp_path / "frontier.png", recipes_plot)
    assert (tmp_path / "frontier.png").stat().st_size > 0
