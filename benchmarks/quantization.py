"""QuantizationAwareTraining on the CPU: step time against fp32 and torch.ao FX QAT, accuracy on the
proxy model, and ONNX Runtime int8 latency against fp32 and against ONNX Runtime's own quantize_static.

    python -m benchmarks quantization step-time     # vgg_proxy, fp32 vs ours vs torch.ao FX QAT
    python -m benchmarks quantization accuracy      # from checkpoints/proxy/baseline.ckpt
    python -m benchmarks quantization onnx-latency  # VGG19-BN and MobileNetV2, batch 1 and 32
    python -m benchmarks quantization onnx-models   # every recipe's model, int8 vs fp32, batch 1

Each writes ``benchmarks/results/quantization_<name>.json``; ratios are within one run.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_compress import QuantizationAwareTraining
from lightning_compress.methods.quantization import Format, calibrate, quantize_layer
from lightning_compress.methods.quantization.export import export_onnx
from lightning_compress.methods.quantization.shared_ranges import shared_range_groups, tie_input_ranges
from lightning_compress.models import create_model

from .common import (StepTimer, export_fp32, fx_qat, machine, median_seconds, ort_session, parser, proxy_baseline,
                     proxy_datamodule, proxy_module, proxy_test, proxy_trainer, write_result)


def _write(name: str, result: dict) -> None:
    write_result(f"{name}.json", result)
    print(json.dumps(result, indent=2))


def step_time(args) -> None:
    names = ["fp32", "ours_qat_int8", "torch_ao_fx_qat_int8"]
    best: dict[str, float] = {}
    for repeat in range(args.repeats):
        for name in names:
            pl.seed_everything(0)
            module = proxy_module()
            callbacks = [StepTimer()]
            if name == "ours_qat_int8":
                callbacks.append(QuantizationAwareTraining(weight_bits=8, activation_bits=8))
            if name == "torch_ao_fx_qat_int8":
                module.model = fx_qat(module.model)
            trainer = proxy_trainer(1, callbacks, limit_train_batches=args.batches, limit_val_batches=0,
                                    enable_progress_bar=False)
            trainer.fit(module, datamodule=proxy_datamodule(args.data_dir))
            mean = statistics.fmean(callbacks[0].times[3:])
            best[name] = min(best.get(name, float("inf")), mean)
            print(f"repeat {repeat} {name}: {mean * 1e3:.1f} ms/step", flush=True)
    _write("quantization_step_time", {
        "model": "vgg_proxy", "machine": machine(), "batch_size": 128, "steps_per_run": args.batches,
        "repeats": args.repeats, "seconds_per_step": {k: round(v, 5) for k, v in best.items()},
        "ratio_vs_fp32": {k: round(v / best["fp32"], 3) for k, v in best.items()},
        "ours_vs_torch_ao": round(best["ours_qat_int8"] / best["torch_ao_fx_qat_int8"], 3),
    })


def _ort_accuracy(path: Path, dm) -> float:
    session = ort_session(path, 2)
    dm.setup("test")
    correct = total = 0
    for images, labels in dm.test_dataloader():
        images = dm.on_after_batch_transfer((images, labels), 0)[0]
        out = session.run(None, {"input": images.numpy()})[0]
        correct += int((torch.from_numpy(out).argmax(1) == labels).sum())
        total += len(labels)
    return correct / total


def _ort_static(fp32_path: Path, out: Path, batches: list[torch.Tensor]) -> None:
    """The peer: ONNX Runtime's quantize_static, QDQ, per-channel int8 weights, uint8 activations, after
    ONNX Runtime's recommended pre-processing (shape inference, graph optimization: BatchNorm folded)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = fp32_path.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32_path), str(prepared))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": b.numpy()} for b in batches])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _calibration_batches(dm, n: int) -> list[torch.Tensor]:
    dm.setup("fit")
    out = []
    for images, labels in dm.train_dataloader():
        out.append(dm.on_after_batch_transfer((images, labels), 0)[0])
        if len(out) == n:
            break
    return out


def accuracy(args) -> None:
    dm = proxy_datamodule(args.data_dir)
    baseline = proxy_baseline()
    base_acc = proxy_test(baseline, dm)
    rows = []
    configs = {
        "ptq_int8": dict(weight_bits=8, activation_bits=8, mode="ptq"),
        "qat_int8": dict(weight_bits=8, activation_bits=8),
        "qat_w4a8": dict(weight_bits=4, activation_bits=8),
        "qat_fixed_point_w8a8_<2,6>_<4,4>": dict(weight_bits=8, activation_bits=8, scheme="fixed_point",
                                                fixed_point=(2, 6), activation_fixed_point=(4, 4)),
        "qat_binary_weights_a8": dict(weight_bits=1, activation_bits=8, scheme="binary"),
    }
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        calibration = _calibration_batches(proxy_datamodule(args.data_dir), args.calibration_batches)
        fp32_path, peer_path = folder / "fp32.onnx", folder / "peer.onnx"
        export_fp32(baseline.model, fp32_path)
        _ort_static(fp32_path, peer_path, calibration)
        peer_acc = _ort_accuracy(peer_path, dm)
        rows.append({"config": "peer: onnxruntime quantize_static (PTQ, per-channel int8)", "test_acc": peer_acc,
                     "delta_points": 100 * (peer_acc - base_acc), "onnx_bytes": peer_path.stat().st_size})
        print(json.dumps(rows[-1]), flush=True)
        for name, kwargs in configs.items():
            pl.seed_everything(0)
            module = proxy_baseline(lr=args.lr)
            exportable = kwargs.get("scheme", "affine") == "affine"
            path = folder / f"{name}.onnx"
            qat = QuantizationAwareTraining(calibration_batches=args.calibration_batches,
                                            export=str(path) if exportable else None, **kwargs)
            epochs = 1 if kwargs.get("mode") == "ptq" else args.epochs
            trainer = proxy_trainer(epochs, [qat], enable_progress_bar=False, limit_val_batches=0)
            start = time.perf_counter()
            trainer.fit(module, datamodule=dm)
            seconds = time.perf_counter() - start
            acc = trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"]
            row = {"config": name, "epochs": 0 if kwargs.get("mode") == "ptq" else epochs, "test_acc": acc,
                   "delta_points": 100 * (acc - base_acc), "train_seconds": seconds}
            if exportable:
                row["onnx_test_acc"] = _ort_accuracy(path, dm)
                row["onnx_bytes"] = path.stat().st_size
                row["fp32_onnx_bytes"] = fp32_path.stat().st_size
            rows.append(row)
            print(json.dumps(row), flush=True)
    _write("quantization_accuracy", {"model": "vgg_proxy", "machine": machine(), "baseline_test_acc": base_acc,
                                     "lr": args.lr, "runs": rows})


def _op_counts(path: Path) -> dict[str, int]:
    """Operators of the graph ONNX Runtime actually runs (after its optimizations)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    optimized = path.with_suffix(".optimized.onnx")
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = {}
    for node in onnx.load(str(optimized)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def onnx_latency(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for name in args.models:
            torch.manual_seed(0)
            model = create_model(name).eval()
            calibration = [torch.randn(16, 3, 32, 32) for _ in range(4)]
            fp32, peer, ours = folder / f"{name}_fp32.onnx", folder / f"{name}_peer.onnx", folder / f"{name}_ours.onnx"
            export_fp32(model, fp32)
            _ort_static(fp32, peer, calibration)
            quantized = copy.deepcopy(model)
            for layer in quantized.modules():
                if type(layer) in (torch.nn.Conv2d, torch.nn.Linear):
                    quantize_layer(layer, Format(8, "symmetric"), Format(8, "affine"))
            calibrate(quantized, [(b, None) for b in calibration])
            export_onnx(quantized, ours, calibration)
            files = {"fp32": fp32, "ort_quantize_static": peer, "ours": ours}
            sessions = {k: ort_session(p, args.threads) for k, p in files.items()}
            ops = {"ort_quantize_static": _op_counts(peer), "ours": _op_counts(ours)}
            for batch in (1, 32):
                x = torch.randn(batch, 3, 32, 32).numpy()
                runners = {k: (lambda s=s: s.run(None, {"input": x})) for k, s in sessions.items()}
                seconds = median_seconds(runners, args.repeats if batch == 1 else max(5, args.repeats // 4))
                rows.append({"model": name, "batch": batch, "seconds": seconds, "int8_graph_ops": ops,
                             "speedup_vs_fp32": {k: seconds["fp32"] / v for k, v in seconds.items()},
                             "ours_vs_quantize_static": seconds["ort_quantize_static"] / seconds["ours"],
                             "bytes": {k: p.stat().st_size for k, p in files.items()}})
                print(json.dumps(rows[-1]), flush=True)
    _write("quantization_onnx_latency", {"machine": machine(), "threads": args.threads, "repeats": args.repeats,
                                         "runs": rows})


def _exact_session(path: Path):
    """The int8 arithmetic the file describes: x86 CPUs without VNNI otherwise saturate u8 x s8 sums at 16 bits."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _float_islands(counts_path: Path) -> dict[str, int]:
    """Where the int8 graph ONNX Runtime runs leaves int8: what each DequantizeLinear of an activation feeds."""
    import onnx

    graph = onnx.load(str(counts_path)).graph
    initializers = {init.name for init in graph.initializer}
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    islands: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] not in initializers:
            for op in readers.get(node.output[0], ["graph output"]):
                islands[op] = islands.get(op, 0) + 1
    return dict(sorted(islands.items()))


def onnx_models(args) -> None:
    """Each recipe's model (random weights: latency only), fake-quantized and calibrated as in onnx-latency,
    written as fp32 ONNX (as exported, and with its shape arithmetic folded as the int8 export folds it)
    and as our int8 file; the three sessions take turns call by call, batch 1."""
    from lightning_compress.methods.quantization.onnx_shapes import fold_shapes
    import onnx

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for name in args.models:
            torch.manual_seed(0)
            model = create_model(name, num_classes=10).eval()
            calibration = [torch.randn(16, 3, 32, 32) for _ in range(4)]
            files = {k: folder / f"{name}_{k}.onnx" for k in ("fp32", "fp32_shapes_folded", "int8")}
            export_fp32(model, files["fp32"])
            folded = onnx.load(str(files["fp32"]))
            fold_shapes(folded, calibration[0][:1].numpy())
            onnx.save(folded, str(files["fp32_shapes_folded"]))
            quantized = copy.deepcopy(model)
            for layer in quantized.modules():
                if type(layer) in (torch.nn.Conv2d, torch.nn.Linear):
                    quantize_layer(layer, Format(8, "symmetric"), Format(8, "affine"))
            calibrate(quantized, [(b, None) for b in calibration])
            if args.shared_ranges:  # as QuantizationAwareTraining(shared_ranges=True) does
                tie_input_ranges(quantized, shared_range_groups(quantized))
            start = time.perf_counter()
            export_onnx(quantized, files["int8"], calibration)
            export_seconds = time.perf_counter() - start
            ops = {k: _op_counts(p) for k, p in files.items()}
            islands = _float_islands(files["int8"].with_suffix(".optimized.onnx"))
            x = torch.randn(8, 3, 32, 32)
            with torch.no_grad():
                expected = quantized(x)
            got = torch.from_numpy(_exact_session(files["int8"]).run(None, {"input": x.numpy()})[0])
            sessions = {k: ort_session(p, args.threads, spinning=args.spinning) for k, p in files.items()}
            one = x[:1].numpy()
            seconds = median_seconds({k: (lambda s=s: s.run(None, {"input": one})) for k, s in sessions.items()},
                                     args.repeats)
            rows.append({"model": name, "batch": 1, "seconds": seconds,
                         "int8_speedup": {k: seconds[k] / seconds["int8"] for k in ("fp32", "fp32_shapes_folded")},
                         "ops": ops, "int8_dequantize_readers": islands, "export_seconds": export_seconds,
                         "int8_vs_fake_quant_rel_error": float((got - expected).abs().mean() / expected.abs().mean()),
                         "bytes": {k: p.stat().st_size for k, p in files.items()}})
            print(json.dumps(rows[-1]), flush=True)
    _write("quantization_onnx_models", {"machine": machine(), "threads": args.threads, "repeats": args.repeats,
                                        "spinning": args.spinning, "shared_ranges": args.shared_ranges, "runs": rows})


def main(argv: list[str] | None = None) -> None:
    ap = parser("quantization", __doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("step-time")
    s.add_argument("--data-dir", default=None)
    s.add_argument("--batches", type=int, default=30)
    s.add_argument("--repeats", type=int, default=2)
    a = sub.add_parser("accuracy")
    a.add_argument("--data-dir", default=None)
    a.add_argument("--epochs", type=int, default=3)
    a.add_argument("--lr", type=float, default=0.005)
    a.add_argument("--calibration-batches", type=int, default=16)
    o = sub.add_parser("onnx-latency")
    o.add_argument("--models", nargs="+", default=["vgg19_bn", "mobilenet_v2"])
    o.add_argument("--threads", type=int, default=2)
    o.add_argument("--repeats", type=int, default=200)
    m = sub.add_parser("onnx-models")
    m.add_argument("--models", nargs="+", default=["squeezenet1_1", "shufflenet_v2_x1_0", "mobilenet_v2", "vgg19_bn",
                                                   "xception"])
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--repeats", type=int, default=300)
    # As the recipes' latency: without spinning, ONNX Runtime's idle threads do not take the shared cores.
    m.add_argument("--spinning", action="store_true")
    m.add_argument("--no-shared-ranges", dest="shared_ranges", action="store_false",
                   help="a learned input range per layer, also where layers read parts of one joined tensor")
    args = ap.parse_args(argv)
    {"step-time": step_time, "accuracy": accuracy, "onnx-latency": onnx_latency,
     "onnx-models": onnx_models}[args.command](args)


if __name__ == "__main__":
    main()
