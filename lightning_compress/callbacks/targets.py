"""Resolve module-name globs (``targets``) against a model: shared by every compression callback."""

from __future__ import annotations

from contextlib import contextmanager
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..methods.coverage import bypassed_layers


def compressible_root(pl_module: nn.Module) -> nn.Module:
    """The network a callback works on: ``pl_module.model`` when there is one (ImageClassifier), else the module.

    Globs are relative to it, so ``"features.*"`` reads as in the model definition.
    """
    inner = getattr(pl_module, "model", None)
    return inner if isinstance(inner, nn.Module) else pl_module


def resolve_targets(
    model: nn.Module, targets: Iterable[str] | None, accept: Callable[[nn.Module], bool], what: str, fix: str = ""
) -> list[str]:
    """Names of the modules that ``accept`` takes and, given ``targets``, that match one of its globs.

    Layers whose forward never runs (their parent reads their weights directly, see
    :mod:`lightning_compress.methods.coverage`) are never candidates. Raises a ValueError naming the
    globs that match nothing with the names that would have matched, or, without targets, the kinds
    of layer the model holds instead, and ``fix``.
    """
    bypassed = bypassed_layers(model)
    candidates = [name for name, module in model.named_modules() if name and accept(module) and name not in bypassed]
    if targets is None:
        if not candidates:
            kinds = sorted({type(m).__name__ for m in model.modules()
                            if any(p.ndim >= 2 for p in m.parameters(recurse=False))})
            raise ValueError(f"the model has no {what}; its weights are in {', '.join(kinds) or 'no layer'}"
                             + (f". {fix}" if fix else ""))
        return candidates
    targets = list(targets)
    unmatched = [glob for glob in targets if not any(fnmatchcase(name, glob) for name in candidates)]
    if unmatched:
        shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
        reasons = [f"{name}: {why}" for name, why in bypassed.items() if any(fnmatchcase(name, g) for g in unmatched)]
        raise ValueError(f"targets={unmatched!r} match no {what}" + (f" ({'; '.join(reasons[:3])})" if reasons else "")
                         + f"; candidates are: {shown or 'none'}" + (f". {fix}" if fix else ""))
    return [name for name in candidates if any(fnmatchcase(name, glob) for glob in targets)]


def first_match(name: str, globs: Iterable[str]) -> str | None:
    return next((glob for glob in globs if fnmatchcase(name, glob)), None)


def lookup(root: nn.Module | None, names: list[str]) -> dict[str, nn.Module]:
    """The modules called ``names`` under ``root``, looked up now.

    Callbacks keep names, not module objects: a layer may be replaced after setup (a filter-pruned
    checkpoint resizes layers before it loads).
    """
    return {name: root.get_submodule(name) for name in names} if root is not None else {}


def batch_inputs(batch: Any) -> torch.Tensor:
    """The network's input in a batch: the batch itself, its first element, or its ``"input"`` entry.

    What calibration and export feed the network; other batch layouts name the fix.
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("input", "inputs", "x", "image", "images"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise ValueError(
        f"cannot find the network's input in a training batch of type {type(batch).__name__}: batches must be a "
        "tensor, a tuple / list whose first element is the input, or a dict with an 'input' tensor"
    )


@contextmanager
def detached(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with the Trainer references of its LightningModules taken off for the duration.

    A deep copy of a LightningModule (an export, a reference copy) would otherwise copy its whole
    Trainer, dataloaders and loggers included.
    """
    held = [(m, m.__dict__.get("_trainer")) for m in module.modules() if "_trainer" in m.__dict__]
    for m, _ in held:
        m.__dict__["_trainer"] = None
    try:
        yield module
    finally:
        for m, trainer in held:
            m.__dict__["_trainer"] = trainer
