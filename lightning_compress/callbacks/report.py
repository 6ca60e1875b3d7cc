"""CompressionReport: the size / sparsity / bits / MACs table at the end of fit, logged and saved."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from ..methods.report import CompressionSummary, compression_report


class CompressionReport(Callback):
    """Report what the trained model costs when ``fit`` (and, optionally, ``test``) ends.

    Prints a table (rich), logs ``report/*`` metrics to the Trainer's logger and writes the full
    report as JSON into the log directory. Put it after the compression callbacks in the list:
    callbacks' ``on_fit_end`` hooks run in list order, so the report sees the finalized model.

    Args:
        input_size: one input's shape without the batch dimension, for the MAC count. Default: the
            data module's ``input_shape`` when it has one; without either, MACs are not counted.
        filename: JSON file name, written into ``trainer.log_dir`` (or ``default_root_dir``).
        log_layers: also log per-layer sparsity and bits.
        print_table: print the table on rank 0.
        on_test: report at the end of ``test`` as well.

    Example:
        >>> import tempfile
        >>> import lightning.pytorch as pl
        >>> from lightning_compress import CompressionReport, DigitsDataModule, ImageClassifier, IterativePruning
        >>> report = CompressionReport(print_table=False)
        >>> pruning = IterativePruning(sparsity=0.75, schedule="one_shot", start_epoch=0)
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[pruning, report], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False,
        ...                      default_root_dir=tempfile.mkdtemp())
        >>> trainer.fit(ImageClassifier("digits_cnn", optimizer="adamw", lr=0.01), datamodule=DigitsDataModule())
        >>> round(report.summary.sparsity, 2), report.summary.compression_ratio > 1.5, report.last_path.name
        (0.74, True, 'compression_report.json')
    """

    def __init__(
        self,
        input_size: Sequence[int] | None = None,
        filename: str = "compression_report.json",
        log_layers: bool = True,
        print_table: bool = True,
        on_test: bool = False,
    ) -> None:
        if input_size is not None and (len(input_size) == 0 or any(int(s) < 1 for s in input_size)):
            raise ValueError(f"input_size={input_size!r} must be a shape like [3, 32, 32] with positive sizes")
        self.input_size = tuple(int(s) for s in input_size) if input_size is not None else None
        self.filename = filename
        self.log_layers = log_layers
        self.print_table = print_table
        self.on_test = on_test
        self.summary: CompressionSummary | None = None
        self.last_path: Path | None = None

    def _input_size(self, trainer: pl.Trainer) -> tuple[int, ...] | None:
        if self.input_size is not None:
            return self.input_size
        shape = getattr(trainer.datamodule, "input_shape", None)
        if shape is None:
            rank_zero_warn("CompressionReport: no input_size given and the data module has no input_shape; MACs not counted")
        return tuple(shape) if shape is not None else None

    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> CompressionSummary:
        model = getattr(pl_module, "model", pl_module)
        summary = compression_report(model, self._input_size(trainer))
        self.summary = summary
        if trainer.logger is not None:
            trainer.logger.log_metrics(summary.metrics(per_layer=self.log_layers), step=trainer.global_step)
        self._write(trainer, summary, stage)
        return summary

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, summary: CompressionSummary, stage: str) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        name = self.filename if stage == "fit" else f"{Path(self.filename).stem}_{stage}.json"
        self.last_path = summary.to_json(folder / name)
        if self.print_table:
            from rich.console import Console

            console = Console()
            if not console.is_terminal:  # logs and CI: wide enough that layer names are not cut
                console = Console(width=160)
            console.print(summary.table(title=f"Compression report ({stage})"))
        rank_zero_info(f"CompressionReport: written to {self.last_path}")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report(trainer, pl_module, "fit")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_test:
            self.report(trainer, pl_module, "test")
