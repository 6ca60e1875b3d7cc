"""ExecuTorch int8 (XNNPACK) against ONNX Runtime int8 and fp32 on the CPU, batch 1, in one run.

    python -m benchmarks executorch-latency                  # VGG19-BN and MobileNetV2
    python -m benchmarks executorch-latency --repeats 100

Each model is randomly initialised (CIFAR-10 shapes: 3x32x32, 10 classes), its Conv2d / Linear layers
fake-quantized (int8 per-channel symmetric weights, uint8 affine activations) and calibrated on random
batches with the methods API; then written four ways: ONNX fp32, our int8 QDQ ONNX (``export_onnx``),
our int8 ExecuTorch program (``export_executorch``) and, for reference, the fp32 model lowered to
ExecuTorch's XNNPACK backend. The four runners take turns call by call (interleaved medians, see
``common.median_seconds``) on ``--threads`` threads each. Writes
``benchmarks/results/executorch_latency_cpu.json``; needs the ``edge`` extra (executorch).
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

from lightning_compress.methods.quantization import Format, calibrate, quantize_layer
from lightning_compress.methods.quantization.executorch_export import export_executorch
from lightning_compress.methods.quantization.export import export_onnx
from lightning_compress.models import create_model

from .common import export_fp32, machine, median_seconds, ort_session, parser, write_result

MODELS = {"vgg19_bn": {}, "mobilenet_v2": {}}


def _executorch_fp32(model: torch.nn.Module, path: Path) -> None:
    """The float model lowered to XNNPACK as it is: what ExecuTorch serves without quantization."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with torch.no_grad():
        program = torch.export.export(copy.deepcopy(model).eval(), (torch.randn(1, 3, 32, 32),))
    path.write_bytes(to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)


def _run_model(name: str, folder: Path, args, runtime) -> dict:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **MODELS[name])
    calibration = [torch.randn(16, 3, 32, 32) for _ in range(4)]
    # BatchNorm statistics of the random inputs: with its initial ones a random MobileNetV2's logits are
    # about 1e-10, which no int8 program represents, and the error below would say nothing.
    for layer in model.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.reset_running_stats()
            layer.momentum = None  # the plain average over the batches
    with torch.no_grad():
        for batch in calibration:
            model.train()(batch)
    model.eval()
    quantized = copy.deepcopy(model)
    for layer in quantized.modules():
        if type(layer) in (torch.nn.Conv2d, torch.nn.Linear):
            quantize_layer(layer, Format(8, "symmetric"), Format(8, "affine"))
    calibrate(quantized, [(b, None) for b in calibration])
    files = {"onnx_fp32": folder / f"{name}_fp32.onnx", "onnx_int8": folder / f"{name}_int8.onnx",
             "executorch_int8": folder / f"{name}_int8.pte", "executorch_fp32": folder / f"{name}_fp32.pte"}
    export_seconds = {}
    for key, write in (("onnx_fp32", lambda p: export_fp32(model, p)),
                       ("onnx_int8", lambda p: export_onnx(quantized, p, calibration)),
                       ("executorch_int8", lambda p: export_executorch(quantized, p, calibration)),
                       ("executorch_fp32", lambda p: _executorch_fp32(model, p))):
        start = time.perf_counter()
        write(files[key])
        export_seconds[key] = time.perf_counter() - start

    x = torch.randn(1, 3, 32, 32)
    sessions = {k: ort_session(files[k], args.threads, spinning=False) for k in ("onnx_fp32", "onnx_int8")}
    methods = {k: runtime.load_program(files[k]).load_method("forward") for k in ("executorch_int8", "executorch_fp32")}
    runners = {k: (lambda s=s: s.run(None, {"input": x.numpy()})) for k, s in sessions.items()}
    runners |= {k: (lambda m=m: m.execute([x])) for k, m in methods.items()}
    # The int8 program's logits beside the fake-quant model's on the timed input (random weights: no
    # accuracy to speak of, only that both compute the same network).
    with torch.no_grad():
        reference = quantized(x)
    int8_logits = methods["executorch_int8"].execute([x])[0]
    onnx_logits = torch.from_numpy(sessions["onnx_int8"].run(None, {"input": x.numpy()})[0])
    seconds = median_seconds(runners, args.repeats)
    row = {"model": name, "model_kwargs": MODELS[name], "batch": 1, "seconds": seconds,
           "speedup_vs_onnx_fp32": {k: seconds["onnx_fp32"] / v for k, v in seconds.items()},
           "executorch_int8_vs_onnx_int8": seconds["onnx_int8"] / seconds["executorch_int8"],
           "bytes": {k: p.stat().st_size for k, p in files.items()}, "export_seconds": export_seconds,
           # Both int8 runtimes against the fake-quant model: what each program loses beyond it.
           "executorch_int8_logits_rel_error": float((int8_logits - reference).abs().mean() / reference.abs().mean()),
           "onnx_int8_logits_rel_error": float((onnx_logits - reference).abs().mean() / reference.abs().mean())}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = parser("executorch-latency", __doc__)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--output", default="executorch_latency_cpu.json")
    args = ap.parse_args(argv)
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    torch.set_num_threads(args.threads)
    portable_lib._unsafe_reset_threadpool(args.threads)  # XNNPACK's pool: the same thread count as the others
    runtime = Runtime.get()
    with tempfile.TemporaryDirectory() as folder:
        rows = [_run_model(name, Path(folder), args, runtime) for name in args.models]
    info = machine() | {"executorch": metadata.version("executorch"), "torchao": metadata.version("torchao"),
                        "executorch_threads": portable_lib._threadpool_get_thread_count()}
    result = {"machine": info, "threads": args.threads, "repeats": args.repeats, "runs": rows}
    write_result(args.output, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
