from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import lightning_compress.sensitivity as sensitivity_cli
from lightning_compress.cli import build_cli
from lightning_compress.module import load_weights
from lightning_compress.sensitivity import main, run_sensitivity

ROOT = Path(__file__).resolve().parents[1]
BASELINE = str(ROOT / "recipes" / "digits" / "baseline.yaml")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A digits baseline checkpoint after a few training steps (the recipe writes under ./checkpoints)."""
    folder = tmp_path_factory.mktemp("fit")
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        patch.chdir(folder)
        # The CLI saves config.yaml into the recipe's checkpoint folder before ModelCheckpoint looks at it.
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        build_cli(
            [
                "fit",
                "--config",
                BASELINE,
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=3",
                "--trainer.limit_val_batches=1",
                "--trainer.enable_progress_bar=false",
                "--trainer.logger=false",
            ]
        )
    path = folder / "checkpoints" / "digits_baseline" / "last.ckpt"
    assert path.is_file()
    return path


def test_main_writes_curves_plot_and_sparsity_yaml(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    analysed = {}
    real_analysis = sensitivity_cli.sensitivity_analysis

    def spy(model, evaluate, levels, targets):
        analysed["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return real_analysis(model, evaluate, levels, targets, progress=False)

    monkeypatch.setattr(sensitivity_cli, "sensitivity_analysis", spy)
    main(
        [
            "--config",
            BASELINE,
            "--ckpt_path",
            str(checkpoint),
            "--levels",
            "0.5,0.9",
            "--val_batches",
            "2",
            "--output_dir",
            "out",
            "--data.init_args.batch_size=16",  # passed through to the recipe
        ]
    )

    out = tmp_path / "out"
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    curves = json.loads((out / "sensitivity.json").read_text())
    assert curves["levels"] == [0.5, 0.9]
    assert list(curves["curves"]) == ["features.0", "features.3", "features.7", "classifier"]
    # Two batches of 16: every accuracy is a multiple of 1/32.
    assert all((value * 32).is_integer() for curve in curves["curves"].values() for value in curve)

    sparsity = yaml.safe_load((out / "sparsity.yaml").read_text())
    assert isinstance(sparsity, dict) and list(sparsity) == list(curves["curves"])
    assert all(isinstance(value, float) and 0 <= value < 1 for value in sparsity.values())

    # The weights analysed are the checkpoint's, not a fresh initialisation.
    for key, value in load_weights(checkpoint).items():
        assert torch.equal(analysed["state"][key], value), key


def test_untrained_model_with_targets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_sensitivity(
        [BASELINE],
        ckpt_path=None,
        output_dir="out",
        levels=[0.5],
        targets=["features.*"],
        max_drop=0.05,
        val_batches=1,
    )
    assert list(result.curves) == ["features.0", "features.3", "features.7"]
    assert yaml.safe_load((tmp_path / "out" / "sparsity.yaml").read_text()) == result.sparsity_for(0.05)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"config_paths": []}, r"config_paths=\[\] is empty"),
        ({"max_drop": -0.01}, r"max_drop=-0.01 must be >= 0"),
        ({"val_batches": 0}, r"val_batches=0 must be >= 1"),
    ],
)
def test_run_sensitivity_checks_arguments_before_building(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_sensitivity(**{"config_paths": [BASELINE], **kwargs})


@pytest.mark.parametrize(
    "argv",
    [
        [],  # --config is required
        ["--config", BASELINE, "--levels", "0.5,half"],
        ["--config", BASELINE, "fit"],  # a subcommand is no override
    ],
)
def test_main_rejects_bad_command_lines(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_cifar_batches_are_normalised_once_and_reused(tiny_cifar_dir, tmp_path, monkeypatch):
    """The CIFAR data module yields uint8 batches; the evaluation must see them normalised, every time."""
    monkeypatch.chdir(tmp_path)
    recipe = str(ROOT / "recipes" / "vgg19_cifar10" / "baseline.yaml")  # channels_last, bf16 trainer
    seen = []
    real_accuracy = sensitivity_cli.top1_accuracy

    def spy(model, batches):
        seen.append(batches)
        return real_accuracy(model, batches)

    monkeypatch.setattr(sensitivity_cli, "top1_accuracy", spy)
    result = run_sensitivity(
        [recipe],
        output_dir="out",
        levels=[0.5],
        targets=["classifier*"],
        val_batches=2,
        overrides=[
            "--model.model=vgg_proxy",
            "--trainer.accelerator=cpu",
            f"--data.init_args.data_dir={tiny_cifar_dir}",
            f"--data.init_args.cache_dir={tmp_path / 'cache'}",
            "--data.init_args.batch_size=4",
        ],
    )

    assert len(seen) == 1 + len(result.curves) and all(batches is seen[0] for batches in seen)
    assert len(seen[0]) == 2
    images, labels = seen[0][0]
    assert images.dtype == torch.float32 and images.shape == (8, 3, 32, 32)  # eval batches are 2 x batch_size
    assert images.min() < 0 and images.abs().max() < 5  # normalised: neither 0..255 nor 0..1
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert (tmp_path / "out" / "sparsity.yaml").is_file()
