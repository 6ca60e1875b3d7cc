"""``lightning-compress inspect`` / ``evaluate`` on the three kinds of file, and one line for every mistake."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from lightning_compress import DigitsDataModule, ImageClassifier, IterativePruning, QuantizationAwareTraining, WeightSharing
from lightning_compress.cli import main

RECIPE = ["--config", "recipes/digits/baseline.yaml"]


def _fit(callbacks, folder):
    pl.seed_everything(0)
    module = ImageClassifier("digits_cnn", optimizer="adamw", lr=0.01)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=callbacks, logger=False, default_root_dir=folder,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    return trainer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifacts")
    pruning = IterativePruning(sparsity=0.8, schedule="one_shot", start_epoch=0, finalize=False)
    trainer = _fit([pruning, WeightSharing(weight_bits=4, start_epoch=1, finalize=False, export="model.lcpk")], folder)
    trainer.save_checkpoint(folder / "last.ckpt")
    pytest.importorskip("onnxruntime")
    _fit([QuantizationAwareTraining(export="model.onnx", calibration_batches=2)], folder)
    return folder


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_inspect_each_kind(files, capsys):
    code, out, _ = _run(capsys, "inspect", str(files / "model.lcpk"))
    assert code == 0 and "sparse_codebook" in out and "features.3.weight" in out and "in fp32 ->" in out
    code, out, _ = _run(capsys, "inspect", str(files / "model.onnx"))
    assert code == 0 and "int8" in out and "4 int8 layers" in out and "QuantizeLinear" in out
    code, out, _ = _run(capsys, "inspect", str(files / "last.ckpt"))
    assert code == 0 and "pruned, shared" in out and "IterativePruning" in out and "4 compressed layers" in out


def test_evaluate_each_kind_in_its_runtime(files, capsys):
    for name, runtime in (("model.lcpk", "torch"), ("model.onnx", "onnxruntime"), ("last.ckpt", "torch")):
        code, out, err = _run(capsys, "evaluate", str(files / name), *RECIPE)
        assert code == 0, err
        accuracy = float(out.split("accuracy ")[1].split("%")[0]) / 100
        assert 0.5 < accuracy <= 1 and f"({runtime})" in out and "ms at batch 1" in out


@pytest.mark.parametrize("argv, message", [
    (["inspect", "missing.lcpk"], "missing.lcpk: no such file"),
    (["inspect", "pyproject.toml"], "not a packed file, an ONNX file or a checkpoint"),
    (["evaluate", "{model.lcpk}"], "evaluate needs the recipe the file was made with: --config"),
    (["evaluate", "{model.lcpk}", "--config", "recipes/digits/baseline.yaml", "--model.model", "vgg_proxy"],
     "does not fit this CifarVGG: the file holds"),
    (["inspect", "{truncated.lcpk}"], "truncated.lcpk"),
    # A damaged file is named as damaged before any model or data is built for it.
    (["evaluate", "{flipped.lcpk}", *RECIPE], "flipped.lcpk: the file is truncated or corrupted (payload SHA-256"),
    (["evaluate", "{model.lcpk}", *RECIPE, "--model.model", "small_cnn"],
     "model (ImageClassifier): model='small_cnn' is not registered; valid names:"),
    (["evaluate", "{model.lcpk}", "--config", "recipes/vgg19_cifar10/baseline.yaml", "--data.init_args.data_dir",
      "{empty}"], "the recipe's test data: CIFAR-10 was not found under"),
])
def test_every_mistake_is_one_line_and_status_2(files, capsys, argv, message, tmp_path):
    packed = (files / "model.lcpk").read_bytes()
    (tmp_path / "truncated.lcpk").write_bytes(packed[:200])
    (tmp_path / "flipped.lcpk").write_bytes(packed[:-50] + bytes([packed[-50] ^ 0xFF]) + packed[-49:])
    (tmp_path / "empty").mkdir()
    names = {"{model.lcpk}": str(files / "model.lcpk"), "{truncated.lcpk}": str(tmp_path / "truncated.lcpk"),
             "{flipped.lcpk}": str(tmp_path / "flipped.lcpk"), "{empty}": str(tmp_path / "empty")}
    argv = [names.get(a, a) for a in argv]
    before = sorted(p.name for p in files.iterdir())
    code, out, err = _run(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in files.iterdir()) == before  # nothing written


def test_a_bad_value_in_a_recipe_is_one_line_with_the_key_the_value_and_the_rule(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("trainer:\n  callbacks:\n    - class_path: lightning_compress.IterativePruning\n"
                      "      init_args: {sparsity: 1.5}\n")
    code, _, err = _run(capsys, "fit", *RECIPE, "--config", str(recipe))
    assert code == 2
    assert err.strip().splitlines()[-1] == ("lightning-compress: trainer.callbacks (IterativePruning): "
                                            "sparsity=1.5 must be in [0, 1)")
    assert "Traceback" not in err
