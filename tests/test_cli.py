from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_compress.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(ROOT.glob("recipes/**/*.yaml"))


def _ids(paths):
    return [str(p.relative_to(ROOT / "recipes")) for p in paths]


def test_recipes_exist():
    names = set(_ids(RECIPES))
    assert "quickstart.yaml" in names
    for model in ("vgg19", "squeezenet1_1", "mobilenet_v2", "shufflenet_v2", "xception"):
        assert f"{model}_cifar10/baseline.yaml" in names
    for model in ("squeezenet1_1", "mobilenet_v2", "shufflenet_v2", "xception"):
        assert f"{model}_cifar10/qat_int8.yaml" in names
    for model in ("squeezenet1_1", "mobilenet_v2", "shufflenet_v2", "xception"):
        assert f"{model}_cifar10/filter_prune.yaml" in names
    for variant in ("prune_95", "prune_98", "filter_prune", "slimming", "qat_int8", "qat_w4a8", "tucker", "tt", "cp",
                    "flattened", "weight_sharing", "weight_sharing_pq", "deep_compression", "composed"):
        assert f"vgg19_cifar10/{variant}.yaml" in names


@pytest.mark.parametrize("recipe", RECIPES, ids=_ids(RECIPES))
def test_print_config(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["model"] == yaml.safe_load(recipe.read_text())["model"]["model"]
    assert config["data"]["class_path"].startswith("lightning_compress.")


@pytest.mark.parametrize("recipe", RECIPES, ids=_ids(RECIPES))
def test_fast_dev_run(recipe, tiny_cifar_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # recipes write under ./checkpoints
    args = ["fit", "--config", str(recipe), "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu"]
    if "weights:" in recipe.read_text():  # compression recipes start from a baseline not trained here
        args.append("--model.weights=null")
    if "model: vgg19_bn" in recipe.read_text() or "model: xception" in recipe.read_text():
        # The same layers at a quarter of the width: one step of every VGG19 recipe (CP's ALS on the
        # full-width convs alone takes minutes on two cores) stays within CI's time. Xception's too: on
        # CPUs without bf16 kernels, bf16-mixed runs its depthwise convs one group at a time.
        args.append('--model.model_kwargs={"width": 0.25}')
    if "model: mobilenet_v2" in recipe.read_text() or "model: shufflenet_v2" in recipe.read_text():
        # Their depthwise convs too, in fp32 and contiguous: one step in bf16-mixed channels_last took minutes
        # on two cores.
        args += ["--trainer.precision=32-true", "--model.channels_last=false"]
    if "CIFAR10DataModule" in recipe.read_text():
        args += [
            f"--data.init_args.data_dir={tiny_cifar_dir}",
            f"--data.init_args.cache_dir={tmp_path / 'cache'}",
            "--data.init_args.batch_size=4",
        ]
    cli = build_cli(args)
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1


def test_cli_offers_fit_validate_test_only():
    from lightning_compress.cli import CompressCLI

    assert set(CompressCLI.subcommands()) == {"fit", "validate", "test"}


def test_test_subcommand_from_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    baseline = str(ROOT / "recipes" / "digits" / "baseline.yaml")
    build_cli(["fit", "--config", baseline, "--trainer.max_epochs=1"])
    ckpt = tmp_path / "checkpoints" / "digits_baseline" / "last.ckpt"
    assert ckpt.is_file()
    cli = build_cli(["test", "--config", baseline, f"--ckpt_path={ckpt}"])
    assert cli.trainer.callback_metrics["test/acc"] > 0.5


def test_the_quickstart_compresses_and_says_what_it_cost(tmp_path):
    """The README's first command: a baseline, then pruning and sharing into a packed file, in one fit."""
    from lightning_compress import CompressionReport

    cli = build_cli(["fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"),
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    report = next(c for c in cli.trainer.callbacks if isinstance(c, CompressionReport))
    extra = report.summary.extra
    packed = tmp_path / "lightning_logs" / "version_0" / "model.lcpk"  # under the run's directory
    assert list(extra["artifacts"]) == [str(packed)] and extra["ratio"] > 10
    assert report.metric_before > 0.95 and report.metric_after > report.metric_before - 0.03
