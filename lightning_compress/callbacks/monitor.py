"""The module's own validation metric, measured outside Lightning's loops (before and after compression).

CompressionReport needs the validation metric at moments Lightning runs no validation: right before
a compression callback first changes the model (in ``setup``, at an epoch's start) and at fit end.
A nested ``trainer.validate`` is not allowed inside ``fit``, so the module's own ``validation_step``
runs over the validation data here, with ``self.log`` / ``self.log_dict`` captured: the figure is the
one the module logs (a torchmetrics metric computed over the whole set, or a value averaged over the
batches weighted by their sizes), whatever the module is.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import lightning.pytorch as pl
import torch
from torchmetrics import Metric


def validation_loader(trainer: pl.Trainer) -> Any | None:
    """The validation data of this fit: the data module's, or the loaders given to ``fit``; None if none."""
    if trainer.datamodule is not None:
        try:
            return trainer.datamodule.val_dataloader()
        except NotImplementedError:
            return None
    source = trainer.fit_loop.epoch_loop.val_loop._data_source  # the val_dataloaders given to fit()
    if not source.is_defined():
        return None
    return source.dataloader()


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 1


def _loaders(data: Any) -> Iterable:
    return data if isinstance(data, (list, tuple)) else [data]


@torch.no_grad()
def measure_logged(trainer: pl.Trainer, pl_module: pl.LightningModule, max_batches: int | None = None) -> dict[str, float]:
    """Run ``pl_module.validation_step`` over the validation data and return what it logs, per name.

    The module runs on the strategy's device (moved there and back when it is elsewhere), in eval
    mode; torchmetrics objects it logs are computed over all batches and reset afterwards, so the
    training loop's own metrics are not disturbed. Empty when there is no validation data.
    """
    data = validation_loader(trainer)
    if data is None:
        return {}
    values: dict[str, list[tuple[float, int]]] = defaultdict(list)
    metrics: dict[str, Metric] = {}
    size = [1]

    def log(name: str, value: Any, *args: Any, batch_size: int | None = None, **kwargs: Any) -> None:
        if isinstance(value, Metric):
            metrics[name] = value
        else:
            values[name].append((float(torch.as_tensor(value).float().mean()), batch_size or size[0]))

    def log_dict(dictionary: dict, *args: Any, batch_size: int | None = None, **kwargs: Any) -> None:
        for name, value in dictionary.items():
            log(name, value, batch_size=batch_size)

    device = trainer.strategy.root_device
    parameter = next(pl_module.parameters(), None)
    home = parameter.device if parameter is not None else device
    training = pl_module.training
    pl_module.log, pl_module.log_dict = log, log_dict  # instance attributes shadow the methods
    try:
        pl_module.to(device).eval()
        for loader_index, loader in enumerate(_loaders(data)):
            for batch_index, batch in enumerate(loader):
                if max_batches is not None and batch_index >= max_batches:
                    break
                size[0] = _batch_size(batch)
                batch = trainer.strategy.batch_to_device(batch, device)
                if len(_loaders(data)) > 1:
                    pl_module.validation_step(batch, batch_index, loader_index)
                else:
                    pl_module.validation_step(batch, batch_index)
        out = {name: float(metric.compute()) for name, metric in metrics.items()}
        for name, pairs in values.items():
            total = sum(n for _, n in pairs)
            out[name] = sum(v * n for v, n in pairs) / total if total else float("nan")
        return out
    finally:
        for metric in metrics.values():
            metric.reset()
        del pl_module.log, pl_module.log_dict
        pl_module.to(home).train(training)


def choose_monitor(logged: dict[str, float], monitor: str | None) -> str | None:
    """``monitor`` when given; else the first logged name with "acc" in it, else the first one."""
    if monitor is not None:
        return monitor
    for name in logged:
        if "acc" in name.lower():
            return name
    return next(iter(logged), None)
