"""CompressionReport: what the compression cost and what it saved, read at a glance at the end of fit."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from rich.console import Console, Group
from rich.table import Table
from typing_extensions import override

from ..methods.latency import interleaved_latency, onnx_runner, torch_runner
from ..methods.report import CompressionSummary, compression_report, human_bytes
from ..methods.structure import strip_structure
from .base import compression_callbacks
from .monitor import choose_monitor, measure_logged
from .targets import compressible_root, detached


class CompressionReport(Callback):
    """The bottom line of a compression run, printed, logged and saved when ``fit`` ends.

    The monitored validation metric is measured right before any compression callback first changes
    the model (in ``setup`` for a decomposition at epoch 0, at ``start_epoch`` for the others) and
    again at fit end, on the finalized model: both, and the change, go into the summary and the logger
    under the metric's last name part (``val/acc`` gives ``compression/acc_before``, ``compression/acc_after``,
    ``compression/acc_change``), with ``compression/ratio``, ``compression/bytes_before`` and
    ``compression/bytes_after``, beside the
    ``report/*`` totals. The bytes after are the files the callbacks wrote (int8 ONNX, packed file)
    when there are, else the report's estimate. CPU latency at batch 1 compares the model before and
    after in the runtime that serves it (ONNX Runtime for an int8 file, else torch). The full per-layer
    report goes to a JSON file in the log directory, with two PNGs beside it when matplotlib is installed
    (bytes per layer; the metric against size).

    Put it after the compression callbacks in the list: callbacks' ``on_fit_end`` run in list order,
    so the report sees the finalized model and the files written.

    Args:
        monitor: the validation metric to compare, a name the module logs in ``validation_step`` (as
            ModelCheckpoint's ``monitor``). Default: the first logged name with "acc" in it, else the
            first one. The report runs the module's own ``validation_step`` over the validation data.
        input_size: one input's shape without the batch dimension, for MACs and latency. Default: the
            data module's ``input_shape``, else the module's ``example_input_array``.
        filename: JSON file name, written into ``trainer.log_dir`` (or ``default_root_dir``).
        verbose: also print the per-layer table (it is always in the JSON).
        print_summary: print the summary on rank 0.
        latency: measure CPU latency at batch 1 before and after (needs an input size).
        plots: write the PNGs beside the JSON.
        log_layers: also log per-layer sparsity and bits.
        on_test: report at the end of ``test`` as well (no before/after there).

    Example:
        >>> import tempfile
        >>> import lightning.pytorch as pl
        >>> from lightning_compress import CompressionReport, DigitsDataModule, ImageClassifier, IterativePruning
        >>> report = CompressionReport(print_summary=False, latency=False, plots=False)
        >>> pruning = IterativePruning(sparsity=0.75, schedule="one_shot", start_epoch=0)
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[pruning, report], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False,
        ...                      default_root_dir=tempfile.mkdtemp())
        >>> trainer.fit(ImageClassifier("digits_cnn", optimizer="adamw", lr=0.01), datamodule=DigitsDataModule())
        >>> round(report.summary.sparsity, 2), report.summary.compression_ratio > 1.5, report.monitor_name
        (0.74, True, 'val/acc')
        >>> 0 <= report.metric_before <= 1 and 0 <= report.metric_after <= 1, report.last_path.name
        (True, 'compression_report.json')
    """

    def __init__(
        self,
        monitor: str | None = None,
        input_size: Sequence[int] | None = None,
        filename: str = "compression_report.json",
        verbose: bool = False,
        print_summary: bool = True,
        latency: bool = True,
        plots: bool = True,
        log_layers: bool = False,
        on_test: bool = False,
    ) -> None:
        if input_size is not None and (len(input_size) == 0 or any(int(s) < 1 for s in input_size)):
            raise ValueError(f"input_size={input_size!r} must be a shape like [3, 32, 32] with positive sizes")
        self.monitor = monitor
        self.input_size = tuple(int(s) for s in input_size) if input_size is not None else None
        self.filename = filename
        self.verbose = verbose
        self.print_summary = print_summary
        self.latency = latency
        self.plots = plots
        self.log_layers = log_layers
        self.on_test = on_test
        self.monitor_name: str | None = None  # checkpointed, with metric_before
        self.metric_before: float | None = None
        self.metric_after: float | None = None
        self.summary: CompressionSummary | None = None
        self.last_path: Path | None = None
        self._reference: torch.nn.Module | None = None  # the model as it was before compression
        self._measured = False

    # ------------------------------------------------------------------ before

    def measure_before(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called by the compression callbacks right before one first changes the model (once a fit)."""
        if self._measured or trainer.state.fn != "fit":
            return
        self._measured = True
        with detached(pl_module):
            # Without the (still inactive) masks and fake-quant wrappers: they cost time, not accuracy.
            self._reference = strip_structure(copy.deepcopy(compressible_root(pl_module))).cpu().eval()
        logged = measure_logged(trainer, pl_module)
        self.monitor_name = choose_monitor(logged, self.monitor)
        if self.monitor_name in logged:
            self.metric_before = logged[self.monitor_name]
        else:
            rank_zero_warn(f"CompressionReport: the validation step logs no {self.monitor_name or 'metric'!r} "
                           f"(it logs {sorted(logged) or 'nothing, or there is no validation data'}); "
                           "the metric before compression is not measured")

    # ------------------------------------------------------------------ after

    def _input_size(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, ...] | None:
        if self.input_size is not None:
            return self.input_size
        shape = getattr(trainer.datamodule, "input_shape", None) if trainer.datamodule is not None else None
        example = getattr(pl_module, "example_input_array", None)
        if shape is None and isinstance(example, torch.Tensor):
            shape = tuple(example.shape[1:])
        return tuple(shape) if shape is not None else None

    def _artifacts(self, trainer: pl.Trainer) -> dict[str, dict[str, Any]]:
        """The files the compression callbacks wrote: path -> kind and bytes."""
        out = {}
        for callback in trainer.callbacks:
            artifact = getattr(callback, "artifact", None)
            path = getattr(artifact, "path", None)
            if path is not None and Path(path).is_file():
                kind = "onnx-int8" if str(path).endswith(".onnx") else "packed"
                out[str(path)] = {"kind": kind, "bytes": Path(path).stat().st_size}
        return out

    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> CompressionSummary:
        root = compressible_root(pl_module)
        size = self._input_size(trainer, pl_module)
        summary = compression_report(root, size)
        self.summary = summary
        extra: dict[str, Any] = {"artifacts": self._artifacts(trainer) if stage == "fit" else {}}
        # Layers a technique had to leave as they were (why, per layer): the report says so, not only a warning.
        left_whole = {name: f"{type(c).__name__}: {why}" for c in compression_callbacks(trainer)
                      for name, why in c.summary.get("left_whole", {}).items()}
        if left_whole:
            extra["left_whole"] = left_whole
        if stage == "fit" and self.monitor_name is not None:
            logged = measure_logged(trainer, pl_module)
            self.metric_after = logged.get(self.monitor_name)
        reference = compression_report(self._reference, size) if self._reference is not None else None
        before_bytes = reference.dense_bytes if reference is not None else summary.dense_bytes
        after_bytes = min((a["bytes"] for a in extra["artifacts"].values()), default=summary.compressed_bytes)
        extra.update(monitor=self.monitor_name, metric_before=self.metric_before, metric_after=self.metric_after,
                     bytes_before=before_bytes, bytes_after=after_bytes,
                     macs_before=reference.macs if reference is not None else None,
                     ratio=before_bytes / after_bytes if after_bytes else float("inf"))
        if stage == "fit" and self.latency and size is not None:
            extra["latency"] = self._latency(root, size, extra["artifacts"])
        summary.extra.update(extra)
        if trainer.logger is not None:
            metrics = summary.metrics(per_layer=self.log_layers)
            # Named after the monitored metric ("val/acc" -> compression/acc_before), so that two runs
            # monitoring different metrics never share a curve.
            short = (self.monitor_name or "metric").rsplit("/", 1)[-1]
            metrics.update({f"compression/{k}": float(v) for k, v in (
                (f"{short}_before", self.metric_before), (f"{short}_after", self.metric_after),
                ("bytes_before", before_bytes), ("bytes_after", after_bytes), ("ratio", extra["ratio"]))
                if v is not None})
            if self.metric_before is not None and self.metric_after is not None:
                metrics[f"compression/{short}_change"] = self.metric_after - self.metric_before
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # on every process: the directory is broadcast
        self._write(folder, summary, stage)
        return summary

    def _latency(self, root, size, artifacts: dict) -> dict[str, Any] | None:
        """Batch-1 CPU latency before and after, in the runtime that serves the model."""
        example = torch.randn(1, *size)
        onnx_files = [path for path, a in artifacts.items() if a["kind"] == "onnx-int8"]
        try:
            if onnx_files and self._reference is not None:
                from ..methods.quantization.export import export_fp32_onnx

                reference = Path(onnx_files[0]).with_name(".reference.fp32.onnx")
                export_fp32_onnx(self._reference, reference, example)
                try:
                    times = interleaved_latency({"before": onnx_runner(reference, example),
                                                 "after": onnx_runner(onnx_files[0], example)})
                finally:
                    reference.unlink(missing_ok=True)
                runtime = "onnxruntime"
            else:
                with detached(root):
                    after = copy.deepcopy(root)  # the trained module stays where the Trainer left it
                runners = {"after": torch_runner(after, example)}
                if self._reference is not None:
                    runners["before"] = torch_runner(self._reference, example)
                times = interleaved_latency(runners)
                runtime = "torch"
        except Exception as error:  # a model that does not run on a random input of this shape
            rank_zero_warn(f"CompressionReport: latency not measured ({type(error).__name__}: {error})")
            return None
        return {"runtime": runtime, "batch": 1, **{f"{k}_ms": v * 1e3 for k, v in times.items()}}

    @rank_zero_only
    def _write(self, folder: Path, summary: CompressionSummary, stage: str) -> None:
        name = self.filename if stage == "fit" else f"{Path(self.filename).stem}_{stage}.json"
        self.last_path = summary.to_json(folder / name)
        pictures = []
        if self.plots:
            from ..methods.plots import frontier_chart, layers_chart

            pictures.append(layers_chart(summary, self.last_path.with_name(f"{Path(name).stem}_layers.png")))
            extra = summary.extra
            if extra.get("metric_before") is not None and extra.get("metric_after") is not None:
                points = {"before": (extra["bytes_before"], extra["metric_before"]),
                          "after": (extra["bytes_after"], extra["metric_after"])}
                pictures.append(frontier_chart(points, extra["monitor"], self.last_path.with_name(f"{Path(name).stem}_frontier.png")))
        if self.print_summary:
            console = Console() if Console().is_terminal else Console(width=160)
            if self.verbose:
                console.print(summary.table(title=f"Compression report ({stage})"))
            console.print(self._compact(summary, [p for p in pictures if p is not None]))
        rank_zero_info(f"CompressionReport: written to {self.last_path}")

    def _compact(self, summary: CompressionSummary, pictures: list[Path]) -> Group:
        extra = summary.extra
        table = Table(title="Compression", show_header=True, title_justify="left")
        for column in ("", "before", "after", "change"):
            table.add_column(column, justify="left" if not column else "right")
        before, after = extra.get("metric_before"), extra.get("metric_after")
        if extra.get("monitor") is not None:
            change = f"{after - before:+.4f}" if before is not None and after is not None else ""
            table.add_row(extra["monitor"], _fmt(before), _fmt(after), change)
        what = "the file" if extra.get("artifacts") else "estimated"
        table.add_row(f"bytes ({what})", human_bytes(extra["bytes_before"]), human_bytes(extra["bytes_after"]),
                      f"{extra['ratio']:.1f}x smaller")
        table.add_row("weights", f"{summary.params:,} fp32", f"{summary.nonzeros:,} non-zero, "
                      f"{summary.bits_per_weight:.2f} bits", f"{summary.sparsity:.1%} sparse")
        if summary.macs is not None:
            macs_before = extra.get("macs_before")
            table.add_row("MACs (dense kernels)", f"{macs_before:,}" if macs_before else "", f"{summary.macs:,}",
                          f"{macs_before / summary.macs:.2f}x fewer" if macs_before and summary.macs else "")
        latency = extra.get("latency")
        if latency:
            b, a = latency.get("before_ms"), latency.get("after_ms")
            table.add_row(f"CPU latency, batch 1 ({latency['runtime']})", f"{b:.3f} ms" if b else "",
                          f"{a:.3f} ms", f"{b / a:.2f}x as fast" if b and a else "")
        lines = [f"{artifact['kind']} file: {path} ({human_bytes(artifact['bytes'])})"
                 for path, artifact in extra.get("artifacts", {}).items()]
        left = list(extra.get("left_whole", {}).items())
        if left:
            lines.append(f"left whole ({len(left)}): " + "; ".join(f"{n} ({why})" for n, why in left[:3])
                         + (" ..." if len(left) > 3 else ""))
        lines += [f"report: {self.last_path}"] + [f"picture: {picture}" for picture in pictures]
        return Group(table, *lines)

    # ------------------------------------------------------------------ hooks and state

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report(trainer, pl_module, "fit")
        self._reference, self._measured = None, False

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on_test:
            self.report(trainer, pl_module, "test")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"monitor_name": self.monitor_name, "metric_before": self.metric_before}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor_name = state_dict.get("monitor_name", self.monitor_name)
        self.metric_before = state_dict.get("metric_before", self.metric_before)
        self._measured = self.metric_before is not None


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
