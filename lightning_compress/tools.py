"""``lightning-compress inspect FILE`` and ``lightning-compress evaluate FILE``: what is in an artifact,
and what it does, without writing code.

* ``inspect`` reads a packed file (``.lcpk``), an int8 ONNX file or a Lightning checkpoint and prints
  what it holds: per tensor its encoding, sparsity, distinct values and bytes; the int8 layers and the
  operators of an ONNX graph; a checkpoint's compression structure and its callbacks' state.
* ``evaluate`` runs it in the runtime that serves it, on a recipe's test data: the packed file and the
  checkpoint in the recipe's model (in torch), the ONNX file in ONNX Runtime; accuracy and batch-1
  CPU latency.

A missing file, a file of another kind, a damaged one or a model that does not match ends in one line
on stderr and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from .methods.report import human_bytes


class ArtifactError(Exception):
    """A user's mistake with an artifact: printed as one line, no traceback."""


def kind_of(path: Path) -> str:
    """``"packed"``, ``"onnx"`` or ``"checkpoint"``, from the file's first bytes (not its name)."""
    if not path.exists():
        raise ArtifactError(f"{path}: no such file")
    if not path.is_file():
        raise ArtifactError(f"{path}: not a file")
    head = path.read_bytes()[:8]
    if head[:4] == b"LCPK":
        return "packed"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save: a zip archive, or a legacy pickle
        return "checkpoint"
    if path.suffix == ".onnx" or head[:1] == b"\x08":  # ONNX: a protobuf whose first field is ir_version
        return "onnx"
    raise ArtifactError(f"{path}: not a packed file, an ONNX file or a checkpoint (it starts with {head[:4]!r})")


# ------------------------------------------------------------------ inspect


def inspect_packed(path: Path) -> Table:
    from .methods.sharing.container import read_packed
    from .methods.sharing.packed import load_compressed

    try:
        state = load_compressed(path)  # every check first: the manifest is read below only once it passed
        manifest = read_packed(path)[0]
    except ValueError as error:
        raise ArtifactError(str(error)) from None
    table = Table(title=f"{path} ({human_bytes(path.stat().st_size)}, packed format {manifest.get('version')})")
    for column in ("tensor", "shape", "encoding", "sparsity", "distinct", "bits", "stored"):
        table.add_column(column, justify="left" if column in ("tensor", "encoding") else "right")
    fp32 = 0
    for entry in manifest["tensors"]:
        tensor = state[entry["name"]]
        fp32 += tensor.numel() * 4
        nonzero = tensor[tensor != 0] if tensor.is_floating_point() else tensor.flatten()
        distinct = int(nonzero.unique().numel()) if tensor.numel() else 0
        bits = math.ceil(math.log2(distinct)) if distinct > 1 else distinct
        stored = sum(length for _, length in entry["parts"].values())
        sparsity = 1 - nonzero.numel() / tensor.numel() if tensor.numel() else 0.0
        table.add_row(entry["name"], "x".join(map(str, tensor.shape)) or "scalar", entry["encoding"],
                      f"{sparsity:.1%}", f"{distinct:,}", str(bits) if "codebook" in entry["encoding"] else "",
                      human_bytes(stored))
    table.caption = f"{len(manifest['tensors'])} tensors; {human_bytes(fp32)} in fp32 -> {human_bytes(path.stat().st_size)} " \
                    f"({fp32 / max(1, path.stat().st_size):.1f}x)"
    return table


def inspect_onnx(path: Path) -> Table:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ArtifactError("inspecting ONNX files needs the `export` extra: pip install 'lightning-compress[export]'") from None
    try:
        model = onnx.load(str(path))
    except Exception as error:  # protobuf's DecodeError and friends: a damaged or foreign file
        raise ArtifactError(f"{path}: not a readable ONNX file ({type(error).__name__})") from None
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    table = Table(title=f"{path} ({human_bytes(path.stat().st_size)}, opset "
                        f"{max((o.version for o in model.opset_import), default='?')})")
    for column in ("layer (node)", "op", "weight", "weight type", "input quantized"):
        table.add_column(column)
    int8 = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        dq = producer.get(node.input[1])
        stored = initializers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else initializers.get(node.input[1])
        if stored is None:
            continue
        dtype = onnx.TensorProto.DataType.Name(stored.data_type).lower()
        int8 += dtype in ("int8", "uint8")
        source = producer.get(node.input[0])
        table.add_row(node.name or "?", node.op_type, "x".join(map(str, numpy_helper.to_array(stored).shape)), dtype,
                      "yes" if source is not None and source.op_type == "DequantizeLinear" else "no")
    ops = Counter(node.op_type for node in graph.node)
    table.caption = f"{int8} int8 layers; operators: " + ", ".join(f"{op} {n}" for op, n in ops.most_common())
    return table


def inspect_checkpoint(path: Path) -> Table:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, or holding code (weights_only refuses it)
        raise ArtifactError(f"{path}: not a readable checkpoint ({type(error).__name__}: {str(error)[:120]})") from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ArtifactError(f"{path}: neither a Lightning checkpoint nor a state dict")
    title = f"{path} ({human_bytes(path.stat().st_size)}"
    if "epoch" in checkpoint:
        title += f", epoch {checkpoint['epoch']}, step {checkpoint.get('global_step')}"
    table = Table(title=title + ")")
    for column in ("layer", "compression", "detail"):
        table.add_column(column)
    layers: dict[str, list[tuple[str, str]]] = {}
    for key, value in state.items():
        layer, _, entry = key.rpartition(".")
        if entry == "weight_mask":
            layers.setdefault(layer, []).append(("pruned", f"{1 - float(value.float().mean()):.1%} of the weights masked"))
        elif entry == "weight_bits":
            layers.setdefault(layer, []).append(("fake-quant", f"{int(value)}-bit weights"))
        elif entry == "weight_codebook":
            layers.setdefault(layer, []).append(("shared", f"a codebook of {value.numel()}"))
        elif entry == "weight" and layer.endswith((".core", ".reduce", ".expand")):
            parent, _, stage = layer.rpartition(".")
            layers.setdefault(parent, []).append(("factorized", f"{stage} {tuple(value.shape)}"))
    for layer, notes in layers.items():
        kinds = list(dict.fromkeys(kind for kind, _ in notes))
        table.add_row(layer, ", ".join(kinds), "; ".join(detail for _, detail in notes))
    for key, value in (checkpoint.get("callbacks") or {}).items():
        if isinstance(value, dict):
            shown = {k: v for k, v in value.items() if not isinstance(v, (list, dict)) or len(str(v)) < 60}
            table.add_row(key.split("{")[0], "callback state", ", ".join(f"{k}={v}" for k, v in shown.items()))
    params = sum(v.numel() for k, v in state.items() if torch.is_tensor(v) and k.endswith(("weight", "bias")))
    table.caption = f"{len(state)} tensors, {params:,} weights and biases; " + \
                    ("no compression structure" if not layers else f"{len(layers)} compressed layers")
    return table


def inspect(path: Path) -> Table:
    return {"packed": inspect_packed, "onnx": inspect_onnx, "checkpoint": inspect_checkpoint}[kind_of(path)](path)


# ------------------------------------------------------------------ evaluate


def _recipe(args: list[str]):
    from .cli import refusal_message, build_cli

    if not any(a == "--config" or a.startswith("--config=") for a in args):
        raise ArtifactError("evaluate needs the recipe the file was made with: --config RECIPE.yaml")
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both args and a command line
    # The Trainer's start-up lines (devices, seed, tips) are not what evaluate is asked for.
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        cli = build_cli(args + ["--trainer.logger=false"], run=False)
    except SystemExit as exit_:
        raise ArtifactError(f"the recipe arguments do not parse (status {exit_.code})") from None
    except Exception as error:
        message = refusal_message(error)
        if message is None:
            raise
        raise ArtifactError(message) from None
    finally:
        sys.argv = argv
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return cli.model, cli.datamodule


def _one_line(error: Exception) -> str:
    """A multi-line message as one line: its first line and the line that says how to fix it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    fix = next((index for index, line in enumerate(lines) if index and line.startswith("To fix")), None)
    if not lines:
        return type(error).__name__
    return " ".join([lines[0], *lines[fix:]]) if fix is not None else lines[0]


def _test_batches(datamodule) -> list[tuple[torch.Tensor, torch.Tensor]]:
    datamodule.setup("test")
    batches = []
    for batch in datamodule.test_dataloader():
        # The data module's own transfer hooks (normalisation on the device, for CIFAR-10), on the CPU.
        batch = datamodule.on_before_batch_transfer(batch, 0)
        batch = datamodule.transfer_batch_to_device(batch, torch.device("cpu"), 0)
        batches.append(datamodule.on_after_batch_transfer(batch, 0))
    return batches


def evaluate(path: Path, recipe_args: list[str]) -> dict[str, Any]:
    from .methods.latency import interleaved_latency, onnx_runner, torch_runner

    kind = kind_of(path)
    state = None
    if kind == "packed":  # a damaged file says so before a model and data are built for it
        from .methods.sharing.packed import load_compressed

        try:
            state = load_compressed(path)
        except ValueError as error:
            raise ArtifactError(_one_line(error)) from None
    module, datamodule = _recipe(recipe_args)
    try:
        batches = _test_batches(datamodule)
    except (FileNotFoundError, ValueError) as error:
        raise ArtifactError(f"the recipe's test data: {_one_line(error)}") from None
    if kind == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ArtifactError("evaluating ONNX files needs the `export` extra: pip install 'lightning-compress[export]'") from None
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:
            raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({str(error).strip().splitlines()[-1][:150]})") from None
        name = session.get_inputs()[0].name
        predict = lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])  # noqa: E731
        runner, runtime = onnx_runner(path, batches[0][0][:1]), "onnxruntime"
    else:
        network = module.model if hasattr(module, "model") else module
        try:
            if kind == "packed":
                from .methods.structure import restore_structure

                restore_structure(network, state)
                network.load_state_dict(state)
            else:
                module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True).get("state_dict", {}))
        except (RuntimeError, ValueError, KeyError) as error:
            if kind == "packed":  # what the file holds against what the recipe's model has, key by key
                from .methods.sharing.packed import state_mismatch

                mismatch = state_mismatch(path, state, network)
                if mismatch is not None:
                    raise ArtifactError(str(mismatch).replace("\n  ", "; ")) from None
            raise ArtifactError(f"{path} does not fit the recipe's model: {str(error).splitlines()[0][:200]}") from None
        network.eval()
        predict = lambda x: network(x)  # noqa: E731
        runner, runtime = torch_runner(network, batches[0][0][:1]), "torch"
    correct = total = 0
    with torch.inference_mode():
        for images, labels in batches:
            correct += int((predict(images).argmax(1) == labels).sum())
            total += len(labels)
    latency = interleaved_latency({"file": runner})["file"]
    return {"file": str(path), "kind": kind, "runtime": runtime, "accuracy": correct / total, "images": total,
            "latency_ms": latency * 1e3}


# ------------------------------------------------------------------ command line


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"lightning-compress {argv[0]}", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="a packed .lcpk file, an int8 .onnx file or a .ckpt checkpoint")
    if argv[0] == "evaluate":
        parser.epilog = "Any other argument goes to the recipe, as for `lightning-compress test` (--config RECIPE ...)."
    args, rest = parser.parse_known_args(argv[1:])
    if rest and argv[0] == "inspect":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    console = Console() if Console().is_terminal else Console(width=160)
    try:
        if argv[0] == "inspect":
            console.print(inspect(args.file))
        else:
            result = evaluate(args.file, rest)
            console.print(f"{result['file']}: accuracy {result['accuracy']:.2%} on {result['images']:,} test images "
                          f"({result['runtime']}); CPU latency {result['latency_ms']:.3f} ms at batch 1")
    except ArtifactError as error:
        print(f"lightning-compress {argv[0]}: {error}", file=sys.stderr)
        return 2
    return 0
