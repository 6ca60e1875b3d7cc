"""QuantizationAwareTraining: fake-quant QAT with a straight-through estimator, or PTQ calibration."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from ..methods.quantization import ROUNDINGS, Format, bake_quantized_weight, calibrate, can_quantize, quantize_layer
from ..methods.quantization.formats import check_bits, check_fixed_point, check_scheme
from ..methods.quantization.shared_ranges import shared_range_groups, tie_input_ranges
from .base import CompressionCallback, artifact_path, working
from .targets import batch_inputs, compressible_root, detached, resolve_targets

MODES = ("qat", "ptq")


class QuantizationAwareTraining(CompressionCallback):
    """Fake-quantize the weights and input activations of Conv1d / Conv2d / Linear layers while training (QAT),
    or only calibrate the activation ranges on training batches without any update (PTQ).

    The layers are swapped in place in ``setup`` (same Parameter objects, so optimizers and DDP are
    untouched); scales come from the weights (per output channel by default) and from an exponential
    moving average of each layer's input min / max, kept in buffers that travel in checkpoints and are
    synchronized across DDP processes. Quantization runs in fp32 also under bf16 autocast.

    Args:
        weight_bits: 1..16 (1 needs ``scheme="binary"``).
        activation_bits: 1..16, or None to leave activations in floating point.
        scheme: ``"affine"`` (weights symmetric, activations affine with a zero point), ``"symmetric"``
            (both with zero point 0), ``"fixed_point"`` (``<IL, FL>`` formats, Gupta et al. 2015) or
            ``"binary"`` (BinaryConnect weights: the sign of the full-precision weight, which is what the
            optimizer updates and which is clipped to [-1, 1]).
        per_channel: one weight scale per output channel (else per tensor).
        mode: ``"qat"`` trains with fake quantization; ``"ptq"`` calibrates on ``calibration_batches``
            training batches at the start of fit and stops (run ``test`` / ``validate`` for the accuracy).
        start_epoch: epoch from which fake quantization is on (QAT).
        freeze_observers_epoch: from this epoch the activation ranges stop moving (None: never).
        freeze_bn_epoch: from this epoch BatchNorm uses and keeps its running statistics (None: never).
        calibration_batches: batches seen by PTQ calibration.
        fixed_point: ``(IL, FL)`` of the weights for ``scheme="fixed_point"`` (IL + FL = weight_bits;
            default IL 1: weights in [-1, 1)).
        activation_fixed_point: ``(IL, FL)`` of the activations (default IL = activation_bits // 2).
        rounding: ``"nearest"`` or ``"stochastic"`` (fixed-point rounding; stochastic binarization).
        binary_activations: with ``scheme="binary"``, binarize activations too (BNN); the first layer's
            input (the image) stays in floating point.
        momentum: of the activation range's moving average.
        shared_ranges: layers that read parts of one joined tensor (concatenated, split, sliced or reshaped:
            ShuffleNetV2's split halves) quantize their inputs on one range, the union of theirs, as int8
            runtimes need to move such data as bytes (see
            :mod:`lightning_compress.methods.quantization.shared_ranges`); found by tracing the network
            with ``torch.fx`` (one that does not trace keeps a range per layer). False: a range per layer.
        targets: module-name globs; default every Conv1d, Conv2d and Linear.
        finalize: at fit end the weights take their quantized values for good (the full-precision copy
            the optimizer trained is dropped): the model computes what it computed at the last step, and
            its layers stay fake-quant so that ``validate`` / ``test`` measure the quantized model. False
            keeps the full-precision weights (to go on training them later).
        export: path of an int8 QDQ ONNX file written at fit end on rank 0 (BatchNorm folded, our
            weight scales and activation ranges imposed; ONNX Runtime calibrates the rest on
            ``calibration_batches`` training batches); a relative path is under the Trainer's log
            directory. Needs the ``export`` extra (onnx, onnxruntime).
        export_executorch: path of an int8 ExecuTorch program (``.pte``, XNNPACK backend) written at fit
            end on rank 0, with the same weights and ranges imposed (PT2E calibrates the rest on
            ``calibration_batches`` training batches); a relative path is under the Trainer's log
            directory. Needs the ``edge`` extra (executorch).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_compress import DigitsDataModule, ImageClassifier, QuantizationAwareTraining
        >>> qat = QuantizationAwareTraining(weight_bits=4, activation_bits=8)
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[qat], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> module = ImageClassifier("digits_cnn", optimizer="adamw", lr=0.01)
        >>> trainer.fit(module, datamodule=DigitsDataModule())
        >>> int(module.model.features[3].weight_bits), type(module.model.features[3]).__name__
        (4, 'QuantConv2d')
    """

    def __init__(
        self,
        weight_bits: int = 8,
        activation_bits: int | None = 8,
        scheme: Literal["affine", "symmetric", "fixed_point", "binary"] = "affine",
        per_channel: bool = True,
        mode: Literal["qat", "ptq"] = "qat",
        start_epoch: int = 0,
        freeze_observers_epoch: int | None = None,
        freeze_bn_epoch: int | None = None,
        calibration_batches: int = 32,
        fixed_point: tuple[int, int] | None = None,
        activation_fixed_point: tuple[int, int] | None = None,
        rounding: Literal["nearest", "stochastic"] = "nearest",
        binary_activations: bool = False,
        momentum: float = 0.1,
        shared_ranges: bool = True,
        targets: list[str] | None = None,
        finalize: bool = True,
        export: str | None = None,
        export_executorch: str | None = None,
    ) -> None:
        check_bits("weight_bits", weight_bits)
        check_bits("activation_bits", activation_bits, allow_none=True)
        check_scheme(scheme, weight_bits)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not known; valid: {', '.join(map(repr, MODES))}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding={rounding!r} is not known; valid: {', '.join(map(repr, ROUNDINGS))}")
        for name, value in (("start_epoch", start_epoch), ("freeze_observers_epoch", freeze_observers_epoch),
                            ("freeze_bn_epoch", freeze_bn_epoch)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r} must be an integer >= 0" + ("" if name == "start_epoch" else " or None"))
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"calibration_batches={calibration_batches!r} must be an integer >= 1")
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum={momentum!r} must be in (0, 1]")
        if binary_activations and scheme != "binary":
            raise ValueError(f"binary_activations=True needs scheme='binary', got scheme={scheme!r}")
        if scheme == "binary" and mode == "ptq":
            raise ValueError("scheme='binary' trains the sign of full-precision weights: use mode='qat'")
        if scheme == "fixed_point":
            fixed_point = check_fixed_point("fixed_point", fixed_point, weight_bits) or (1, weight_bits - 1)
            if activation_bits is not None:
                activation_fixed_point = check_fixed_point("activation_fixed_point", activation_fixed_point, activation_bits) or (
                    max(1, activation_bits // 2), activation_bits - max(1, activation_bits // 2))
        elif fixed_point is not None or activation_fixed_point is not None:
            raise ValueError(f"fixed_point / activation_fixed_point apply to scheme='fixed_point', not {scheme!r}")
        super().__init__(targets)
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        self.scheme = scheme
        self.per_channel = per_channel
        self.mode = mode
        self.start_epoch = start_epoch
        self.freeze_observers_epoch = freeze_observers_epoch
        self.freeze_bn_epoch = freeze_bn_epoch
        self.calibration_batches = calibration_batches
        self.fixed_point = tuple(fixed_point) if fixed_point else None
        self.activation_fixed_point = tuple(activation_fixed_point) if activation_fixed_point else None
        self.rounding = rounding
        self.binary_activations = binary_activations
        self.momentum = momentum
        self.shared_ranges = shared_ranges
        self.finalize = finalize
        if export is not None and (scheme in ("fixed_point", "binary") or weight_bits > 8
                                   or (activation_bits is not None and activation_bits > 8)):
            raise ValueError(f"export needs 2..8-bit affine or symmetric weights and activations (an int8 ONNX file); "
                             f"got scheme={scheme!r}, weight_bits={weight_bits}, activation_bits={activation_bits}")
        if export_executorch is not None and (scheme in ("fixed_point", "binary") or weight_bits > 8
                                              or (activation_bits is not None and activation_bits > 8)):
            raise ValueError(f"export_executorch needs 2..8-bit affine or symmetric weights and activations (an int8 "
                             f"ExecuTorch program); got scheme={scheme!r}, weight_bits={weight_bits}, "
                             f"activation_bits={activation_bits}")
        self.export = export
        self.export_executorch = export_executorch
        self.artifact = None  # OnnxExport of the file written at fit end
        self.executorch_artifact = None  # ExecutorchExport of the program written at fit end
        self.calibrated = False  # checkpointed (PTQ)
        self.enabled = False  # fake quantization was on at some step of this fit
        self.range_groups: list[list[str]] = []  # layer names that share one input range, found in setup
        self._told_groups = False
        self._observing = False  # set each epoch by _set_flags

    order = 2

    def _state_key_fields(self) -> dict[str, Any]:
        return {"targets": self.targets, "weight_bits": self.weight_bits, "activation_bits": self.activation_bits,
                "scheme": self.scheme, "mode": self.mode}

    def weight_format(self) -> Format:
        if self.scheme == "fixed_point":
            return Format(self.weight_bits, "fixed_point", self.fixed_point[0], self.rounding)
        if self.scheme == "binary":
            return Format(1, "binary", rounding=self.rounding)
        return Format(self.weight_bits, "symmetric")

    def activation_format(self, first: bool) -> Format | None:
        if self.activation_bits is None:
            return None
        if self.scheme == "fixed_point":
            return Format(self.activation_bits, "fixed_point", self.activation_fixed_point[0], self.rounding)
        if self.scheme == "binary" and self.binary_activations and not first:
            return Format(1, "binary", rounding=self.rounding)
        return Format(self.activation_bits, "symmetric" if self.scheme == "symmetric" else "affine")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        root = self._attach(trainer, pl_module)
        names = resolve_targets(root, self.targets, can_quantize, "Conv1d/Conv2d/Linear layer",
                                fix="QuantizationAwareTraining fake-quantizes Conv1d, Conv2d and Linear layers")
        self._claim(trainer, root, names, accept=can_quantize)
        epoch = trainer.current_epoch if trainer is not None else 0
        if stage == "fit" and (self.mode == "ptq" or epoch >= self.start_epoch):
            self._before_change(trainer, pl_module)  # fake quantization acts from the first step
        # Before any checkpoint loads: its scales and ranges fill these buffers.
        for index, (name, layer) in enumerate(self.layers.items()):
            quantize_layer(layer, self.weight_format(), self.activation_format(first=index == 0), self.momentum,
                           self.per_channel)
        if stage == "fit":
            self._set_flags(epoch)  # a later start_epoch: the layers compute in float until then
        if self.shared_ranges:
            ours = set(names)
            groups = [[n for n in group if n in ours] for group in shared_range_groups(root)]
            self.range_groups = [group for group in groups if len(group) > 1]
            if self.range_groups and not self._told_groups:
                rank_zero_info(f"QuantizationAwareTraining: {sum(map(len, self.range_groups))} layers that read parts of "
                               f"one joined tensor share an input range, in {len(self.range_groups)} groups")
                self._told_groups = True
        max_epochs = trainer.max_epochs if trainer is not None else None
        if stage == "fit" and self.mode == "qat" and max_epochs is not None and 0 <= max_epochs <= self.start_epoch:
            rank_zero_warn(f"QuantizationAwareTraining(start_epoch={self.start_epoch}) never fake-quantizes: fit has "
                           f"max_epochs={max_epochs}. Use start_epoch < {max_epochs}.")
        self._setup_done(pl_module)

    def _set_flags(self, epoch: int) -> None:
        observing = self.mode == "qat" and (self.freeze_observers_epoch is None or epoch < self.freeze_observers_epoch)
        for layer in self.layers.values():
            layer.quant_enabled = self.mode == "ptq" or epoch >= self.start_epoch
            layer.observing = observing
        self._observing = observing and epoch >= self.start_epoch  # ranges move in this epoch's steps
        self.enabled = self.enabled or self.mode == "ptq" or epoch >= self.start_epoch

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode != "ptq":
            return
        if not self.calibrated:
            def forward(model, batch):
                model(batch_inputs(trainer.strategy.batch_to_device(batch)))

            seen = calibrate(pl_module, islice(trainer.train_dataloader, self.calibration_batches), forward)
            tie_input_ranges(self._root, self.range_groups)
            self.calibrated = True
            rank_zero_info(f"QuantizationAwareTraining: PTQ calibrated {len(self._names)} layers on {seen} batches")
        self._set_flags(0)
        trainer.should_stop = True  # PTQ changes no weight: nothing to train

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.start_epoch > 0 and self.mode == "qat":
            self._before_change(trainer, pl_module)
        self._set_flags(trainer.current_epoch)
        if trainer.current_epoch == self.start_epoch and self.mode == "qat":
            rank_zero_info(f"QuantizationAwareTraining: fake quantization on in {len(self._names)} layers "
                           f"(weights {self.weight_format().bits} bits, activations {self.activation_bits})")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.freeze_bn_epoch is not None and trainer.current_epoch >= self.freeze_bn_epoch:
            # Each batch: Lightning sets the module back to train mode after validation.
            for module in pl_module.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.range_groups and self._observing:
            tie_input_ranges(self._root, self.range_groups)  # after this step's observers moved
        if self.scheme == "binary":
            with torch.no_grad():  # BinaryConnect: the real-valued weights stay in [-1, 1]
                for layer in self.layers.values():
                    layer.weight.clamp_(-1, 1)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            rank_zero_warn(f"QuantizationAwareTraining never fake-quantized in this fit (start_epoch={self.start_epoch}, "
                           f"fit ran {trainer.current_epoch} epochs): the model trained in floating point")
        path = artifact_path(trainer, self.export)  # on every process: the log directory is broadcast
        edge_path = artifact_path(trainer, self.export_executorch)
        if path is not None and trainer.global_rank == 0:
            self._export(trainer, pl_module, path)
        if edge_path is not None and trainer.global_rank == 0:
            self._export_executorch(trainer, pl_module, edge_path)
        if self.finalize:
            for layer in self.layers.values():
                bake_quantized_weight(layer)

    def _calibration_inputs(self, trainer: pl.Trainer) -> list:
        """The first ``calibration_batches`` training inputs, on the CPU, as the model sees them."""
        loader = trainer.datamodule.train_dataloader() if trainer.datamodule is not None else trainer.train_dataloader
        # batch_to_device applies the data module's on_after_batch_transfer (normalisation, for one).
        return [batch_inputs(trainer.strategy.batch_to_device(batch)).cpu()
                for batch in islice(loader, self.calibration_batches)]

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path) -> None:
        from ..methods.quantization.export import export_onnx

        batches = self._calibration_inputs(trainer)
        with detached(pl_module), working(f"QuantizationAwareTraining: exporting int8 ONNX, ONNX Runtime calibrating "
                                          f"on {len(batches)} batches"):
            self.artifact = export_onnx(compressible_root(pl_module), path, batches)
        s = self.artifact
        rank_zero_info(f"QuantizationAwareTraining: wrote {s.path} ({s.int8_bytes:,} bytes; fp32 ONNX {s.fp32_bytes:,}, "
                       f"{s.compression_ratio:.2f}x)")
        if trainer.logger is not None:
            trainer.logger.log_metrics({"quantization/onnx_int8_bytes": float(s.int8_bytes),
                                        "quantization/onnx_fp32_bytes": float(s.fp32_bytes)}, step=trainer.global_step)

    def _export_executorch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path) -> None:
        from ..methods.quantization.executorch_export import export_executorch

        batches = self._calibration_inputs(trainer)
        with detached(pl_module), working(f"QuantizationAwareTraining: exporting an int8 ExecuTorch program, PT2E "
                                          f"calibrating on {len(batches)} batches"):
            self.executorch_artifact = s = export_executorch(compressible_root(pl_module), path, batches)
        rank_zero_info(f"QuantizationAwareTraining: wrote {s.path} ({s.bytes:,} bytes; fp32 parameters "
                       f"{s.fp32_parameter_bytes:,}, {s.compression_ratio:.2f}x)")
        if trainer.logger is not None:
            trainer.logger.log_metrics({"quantization/executorch_bytes": float(s.bytes)}, step=trainer.global_step)

    @property
    @override
    def summary(self) -> dict[str, Any]:
        return {
            "technique": "quantization",
            "layers": list(self._names),
            "weight_bits": self.weight_format().bits,
            "activation_bits": self.activation_bits,
            "scheme": self.scheme,
            "enabled": self.enabled,
            "artifact": None if self.artifact is None else {
                "path": str(self.artifact.path), "bytes": self.artifact.int8_bytes,
                "fp32_onnx_bytes": self.artifact.fp32_bytes, "quantized_layers": self.artifact.quantized_layers},
            "executorch_artifact": None if self.executorch_artifact is None else {
                "path": str(self.executorch_artifact.path), "bytes": self.executorch_artifact.bytes,
                "quantized_layers": self.executorch_artifact.quantized_layers},
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"calibrated": self.calibrated}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_fields(state_dict, {"calibrated": bool})
