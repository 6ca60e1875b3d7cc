from __future__ import annotations

import csv
import json

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger

from lightning_compress import CompressionReport, DigitsDataModule, ImageClassifier


def test_writes_json_logs_metrics_and_reads_input_shape(tmp_path):
    callback = CompressionReport(print_table=False)
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
    callback = CompressionReport(print_table=True, on_test=True, input_size=[1, 8, 8])
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
