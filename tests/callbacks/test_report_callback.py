from __future__ import annotations

import csv
import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_compress import CompressionReport, DigitsDataModule, ImageClassifier


def test_writes_json_logs_metrics_and_reads_input_shape(tmp_path):
    callback = CompressionReport(print_summary=False)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=CSVLogger(tmp_path), callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(ImageClassifier("digits_cnn"), datamodule=DigitsDataModule())
    path = tmp_path / "lightning_logs" / "version_0" / "compression_report.json"
    assert callback.last_path == path
    data = json.loads(path.read_text())
    assert data["params"] == 24_058 and data["input_size"] == [1, 8, 8] and data["macs"] > 0
    trainer.logger.save()
    with open(path.parent / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert "report/params" in header and "report/compression_ratio" in header


def test_on_test_writes_a_second_report(tmp_path):
    callback = CompressionReport(verbose=True, on_test=True, input_size=[1, 8, 8])
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, callbacks=[callback], default_root_dir=tmp_path,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    module, dm = ImageClassifier("digits_cnn"), DigitsDataModule()
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    assert (tmp_path / "compression_report.json").is_file()
    assert (tmp_path / "compression_report_test.json").is_file()


def test_bad_input_size():
    with pytest.raises(ValueError, match="input_size"):
        CompressionReport(input_size=[3, 0, 32])


def test_the_metric_before_compression_and_after_it_the_files_and_the_pictures(tmp_path, capsys):
    """A short baseline, pruning from epoch 2 and sharing into a packed file: the report measures val/acc
    right before pruning first changes the model and at fit end, lists the file, and draws two PNGs."""
    from lightning_compress import IterativePruning, WeightSharing

    report = CompressionReport()
    callbacks = [IterativePruning(sparsity=0.8, schedule="agp", start_epoch=2, end_epoch=4, frequency=5),
                 WeightSharing(weight_bits=4, start_epoch=5, export="model.lcpk"), report]
    trainer = pl.Trainer(accelerator="cpu", max_epochs=6, logger=CSVLogger(tmp_path), callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    pl.seed_everything(0)
    trainer.fit(ImageClassifier("digits_cnn", optimizer="adamw", lr=0.01), datamodule=DigitsDataModule(batch_size=64))
    assert report.monitor_name == "val/acc"
    assert report.metric_before > 0.85  # two epochs of training: the baseline, not the random init
    assert 0.5 < report.metric_after <= 1
    extra = report.summary.extra
    folder = tmp_path / "lightning_logs" / "version_0"
    assert list(extra["artifacts"]) == [str(folder / "model.lcpk")]
    assert extra["bytes_after"] == (folder / "model.lcpk").stat().st_size and extra["ratio"] > 5
    assert extra["latency"]["runtime"] == "torch" and extra["latency"]["before_ms"] > 0
    assert (folder / "compression_report_layers.png").is_file() and (folder / "compression_report_frontier.png").is_file()
    printed = capsys.readouterr().out
    assert "val/acc" in printed and "x smaller" in printed and "model.lcpk" in printed
    trainer.logger.save()
    with open(folder / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert {"compression/acc_before", "compression/acc_after", "compression/acc_change", "compression/ratio"} <= set(header)


def test_a_users_module_and_another_metric(tmp_path):
    from lightning_compress import QuantizationAwareTraining
    from tests.users.models import UserClassifier, loader

    report = CompressionReport(monitor="val_loss", print_summary=False, plots=False)
    qat = QuantizationAwareTraining(start_epoch=1, export="model.onnx", calibration_batches=2)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, default_root_dir=tmp_path, callbacks=[qat, report],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = UserClassifier("small_cnn")
    module.example_input_array = torch.randn(1, 3, 8, 8)  # how a user's module gives MACs and latency a shape
    trainer.fit(module, loader("small_cnn"), loader("small_cnn", batches=2, seed=1))
    assert report.monitor_name == "val_loss" and report.metric_before > 0 and report.metric_after > 0
    assert report.summary.macs > 0 and report.summary.extra["macs_before"] == report.summary.macs  # QAT keeps the MACs
    latency = report.summary.extra["latency"]
    assert latency["runtime"] == "onnxruntime" and latency["before_ms"] > 0 and latency["after_ms"] > 0
    assert str(tmp_path / "model.onnx") in report.summary.extra["artifacts"]
