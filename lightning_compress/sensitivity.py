"""The ``lightning-compress-sensitivity`` command: per-layer pruning sensitivity of a recipe's model.

It builds the model and data module of a recipe the way ``lightning-compress`` does, loads a
checkpoint, and runs :func:`~lightning_compress.methods.pruning.sensitivity.sensitivity_analysis`
with top-1 accuracy on the first validation batches. Into ``--output_dir`` go ``sensitivity.json``
(the curves), ``sensitivity.png`` (their plot) and ``sparsity.yaml`` (per-layer sparsities that cost
at most ``--max_drop`` accuracy each, to paste as a pruning callback's ``sparsity:``).

Example:
    lightning-compress fit --config recipes/digits/baseline.yaml
    lightning-compress-sensitivity --config recipes/digits/baseline.yaml \\
        --ckpt_path checkpoints/digits_baseline/best.ckpt --max_drop 0.01 --data.init_args.batch_size=128
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Sequence

import torch
import yaml
from lightning.pytorch import LightningDataModule
from rich.console import Console
from rich.table import Table
from torch import nn

from .cli import build_cli
from .methods.atomic import write_atomic
from .methods.pruning.sensitivity import DEFAULT_LEVELS, SensitivityResult, sensitivity_analysis
from .module import load_weights

Batch = tuple[torch.Tensor, torch.Tensor]


def run_sensitivity(
    config_paths: list[str],
    ckpt_path: str | None = None,
    output_dir: str = "sensitivity",
    levels: Sequence[float] = DEFAULT_LEVELS,
    targets: list[str] | None = None,
    max_drop: float = 0.01,
    val_batches: int | None = 20,
    overrides: Sequence[str] = (),
) -> SensitivityResult:
    """Sensitivity analysis of the inner network (``module.model``) of a recipe; writes three files.

    Args:
        config_paths: recipe YAML files, applied in order as ``--config`` of ``lightning-compress``.
        ckpt_path: Lightning checkpoint or state dict to analyse; None keeps the weights the recipe
            gives (its ``model.weights``, else a fresh initialisation).
        output_dir: where ``sensitivity.json``, ``sensitivity.png`` and ``sparsity.yaml`` go.
        levels: sparsities in [0, 1) to try on each layer.
        targets: fnmatch globs over layer names of the inner network; default every Conv2d / Linear.
        max_drop: accuracy each layer may lose (0.01 = one point) in ``sparsity.yaml``.
        val_batches: evaluate on this many batches of ``val_dataloader()``; None for all of them.
        overrides: further ``lightning-compress`` arguments, e.g. ``["--data.init_args.batch_size=64"]``.

    The evaluation runs in fp32 on the first CUDA device if there is one, else on the CPU, whatever
    the recipe's trainer says (the trainer is built, so its accelerator must exist on this machine).

    Example (from the repository's root; with a trained ``ckpt_path`` the sparsities mean something):
        >>> import tempfile
        >>> result = run_sensitivity(["recipes/digits/baseline.yaml"], None, tempfile.mkdtemp(), levels=[0.5, 0.9],
        ...                          val_batches=2)
        >>> sorted(result.sparsity_for(0.02))
        ['classifier', 'features.0', 'features.3', 'features.7']
    """
    if not config_paths:
        raise ValueError("config_paths=[] is empty; give at least one recipe, e.g. ['recipes/digits/baseline.yaml']")
    if not max_drop >= 0:
        raise ValueError(f"max_drop={max_drop} must be >= 0 (accuracy a layer may lose, e.g. 0.01)")
    if val_batches is not None and val_batches < 1:
        raise ValueError(f"val_batches={val_batches} must be >= 1, or None for the whole validation set")

    args = [arg for path in config_paths for arg in ("--config", str(path))] + list(overrides)
    with warnings.catch_warnings():
        # LightningCLI warns when given args while sys.argv has some: here the args are sys.argv,
        # less this command's own options.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        cli = build_cli(args, run=False)
    network: nn.Module = cli.model.model
    if ckpt_path:
        network.load_state_dict(load_weights(ckpt_path))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    network.to(device)

    # Every layer x level pass evaluates the same images: load, transfer and normalise them once.
    batches = _evaluation_batches(cli.datamodule, val_batches, device)
    if cli.model.hparams.get("channels_last"):
        batches = [(images.contiguous(memory_format=torch.channels_last), labels) for images, labels in batches]
    result = sensitivity_analysis(network, lambda model: top1_accuracy(model, batches), levels, targets)

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    result.to_json(output / "sensitivity.json")
    _write_sparsity_yaml(output / "sparsity.yaml", result, max_drop, len(batches))
    try:
        title = f"Pruning sensitivity: {cli.model.hparams.model}"
        result.plot(output / "sensitivity.png", title=title, metric="top-1 accuracy")
    except ImportError as error:
        # The curves are in the JSON already; a missing plotting library must not discard the run.
        warnings.warn(f"sensitivity.png not written: {error}", stacklevel=2)
    return result


def _evaluation_batches(datamodule: LightningDataModule, count: int | None, device: torch.device) -> list[Batch]:
    datamodule.prepare_data()
    datamodule.setup("validate")
    batches = []
    for batch in datamodule.val_dataloader():
        if count is not None and len(batches) == count:
            break
        # The hooks a Trainer would call, in its order; with no trainer attached the data modules
        # normalise without augmenting.
        batch = datamodule.on_before_batch_transfer(batch, 0)
        batch = datamodule.transfer_batch_to_device(batch, device, 0)
        batches.append(datamodule.on_after_batch_transfer(batch, 0))
    if not batches:
        raise ValueError(f"datamodule={type(datamodule).__name__}: val_dataloader() gave no batches")
    return batches


@torch.no_grad()
def top1_accuracy(model: nn.Module, batches: list[Batch]) -> float:
    """Fraction of the images in ``batches`` whose highest logit is their label (model in eval mode)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=batches[0][1].device)
    total = 0
    for images, labels in batches:
        correct += (model(images).argmax(dim=1) == labels).sum()
        total += labels.numel()
    return correct.item() / total


def _write_sparsity_yaml(path: Path, result: SensitivityResult, max_drop: float, batch_count: int) -> None:
    header = (
        f"# Per-layer sparsity from pruning sensitivity analysis: each layer pruned alone loses at most\n"
        f"# max_drop={max_drop} top-1 accuracy (baseline {result.baseline:.4f} on {batch_count} validation batches).\n"
        f"# Paste as the pruning callback's `sparsity:`; keys are layer names inside the module's `model`.\n"
    )
    write_atomic(path, header + yaml.safe_dump(result.sparsity_for(max_drop), sort_keys=False))


def _float_list(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0.5,0.7,0.9")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-compress-sensitivity",
        description="Prune each layer alone at increasing sparsity, measure top-1 accuracy, and derive "
        "per-layer sparsities. Arguments not listed here (e.g. --data.init_args.batch_size=64) go to "
        "the recipe, as in lightning-compress.",
        # Prefix matching would let an override such as --max_epochs pass for --max_drop.
        allow_abbrev=False,
    )
    parser.add_argument("--config", action="append", required=True, help="recipe YAML; repeat to layer several")
    parser.add_argument("--ckpt_path", help="checkpoint to analyse (default: the recipe's weights)")
    parser.add_argument("--output_dir", default="sensitivity", help="folder of the three output files")
    parser.add_argument(
        "--levels",
        type=_float_list,
        default=list(DEFAULT_LEVELS),
        help="comma-separated sparsities in [0, 1) (default: %(default)s)",
    )
    parser.add_argument("--targets", action="append", help="glob of layer names to analyse; repeatable (default: all)")
    parser.add_argument("--max_drop", type=float, default=0.01, help="accuracy a layer may lose (default: 0.01)")
    parser.add_argument("--val_batches", type=int, default=20, help="validation batches to evaluate; 0 for all")
    args, overrides = parser.parse_known_args(argv)
    if overrides and not overrides[0].startswith("--"):
        parser.error(f"unrecognised argument {overrides[0]!r}: recipe overrides look like --data.init_args.batch_size=64")

    result = run_sensitivity(
        config_paths=args.config,
        ckpt_path=args.ckpt_path,
        output_dir=args.output_dir,
        levels=args.levels,
        targets=args.targets,
        max_drop=args.max_drop,
        val_batches=args.val_batches or None,
        overrides=overrides,
    )
    _print_summary(result, args.max_drop, Path(args.output_dir))


def _print_summary(result: SensitivityResult, max_drop: float, output_dir: Path) -> None:
    table = Table(title=f"Sparsity per layer at max_drop={max_drop} (baseline top-1 {result.baseline:.4f})")
    table.add_column("layer")
    table.add_column("weights", justify="right")
    table.add_column("sparsity", justify="right")
    for layer, sparsity in result.sparsity_for(max_drop).items():
        table.add_row(layer, f"{result.params[layer]:,}", f"{sparsity:.2f}")
    console = Console()
    console.print(table)
    written = [name for name in ("sensitivity.json", "sensitivity.png", "sparsity.yaml") if (output_dir / name).is_file()]
    console.print(f"Wrote {', '.join(written)} to {output_dir}")


if __name__ == "__main__":
    main()
