"""Several compression callbacks in one Trainer: the order they must come in, and what cannot mix.

The order is the order of the structural changes each makes in ``setup``: decompose (new layers),
then prune the layers that exist (masks on the factors), then quantize (fake-quant layers that apply
the masks first, so pruned weights stay exact zeros), then share (codebooks). Each callback calls
:func:`check_composition` in its ``setup``, so a wrong order or an unsupported mix fails before any
work, with the fix in the message. Callbacks are recognised by class (subclasses included), and one
callback may appear several times on different layers.
"""

from __future__ import annotations

import lightning.pytorch as pl


def _pipeline() -> list[type]:
    from .decomposition import TensorDecomposition
    from .pruning import IterativePruning
    from .quantization import QuantizationAwareTraining
    from .sharing import WeightSharing

    return [TensorDecomposition, IterativePruning, QuantizationAwareTraining, WeightSharing]


def _kind(callback) -> type | None:
    return next((cls for cls in _pipeline() if isinstance(callback, cls)), None)


def check_composition(trainer: pl.Trainer | None) -> None:
    """Raise a ValueError naming the problem when the Trainer's compression callbacks cannot work together."""
    if trainer is None:  # a callback's setup used outside a Trainer
        return
    _check_strategy(trainer)
    present = [(c, _kind(c)) for c in trainer.callbacks if _kind(c) is not None]
    if len(present) < 2:
        return
    kinds = [kind for _, kind in present]
    order = _pipeline()
    names = [type(c).__name__ for c, _ in present]
    if [order.index(k) for k in kinds] != sorted(order.index(k) for k in kinds):
        wanted = [k.__name__ for k in order if k in kinds]
        raise ValueError(
            f"compression callbacks are in the order {names}; put them in the order {wanted} "
            "(decompose, then prune the factors, then quantize, then share)"
        )
    by_kind: dict[type, list] = {}
    for callback, kind in present:
        by_kind.setdefault(kind, []).append(callback)
    TensorDecomposition, IterativePruning, QuantizationAwareTraining, WeightSharing = order
    others = lambda kind: [n for (c, k), n in zip(present, names) if k is not kind]  # noqa: E731
    for decomposition in by_kind.get(TensorDecomposition, []):
        if decomposition.start_epoch != 0 and others(TensorDecomposition):
            raise ValueError(
                f"TensorDecomposition(start_epoch={decomposition.start_epoch}) replaces layers during fit, under the "
                f"other compression callbacks ({others(TensorDecomposition)}); use start_epoch=0 when composing"
            )
    for pruning in by_kind.get(IterativePruning, []):
        if pruning.structure == "filter":
            raise ValueError("IterativePruning(structure='filter') removes channels at fit end and does not compose "
                             f"with other compression callbacks ({[n for c, n in zip(present, names) if c is not pruning]}); "
                             "use structure='unstructured'")
    if QuantizationAwareTraining in by_kind and WeightSharing in by_kind:
        raise ValueError("QuantizationAwareTraining and WeightSharing both choose the weights' values (a uniform "
                         "grid vs k-means centroids); use one of them")


def _check_strategy(trainer: pl.Trainer) -> None:
    """Sharded strategies hold a shard of each weight per process: masks, codebooks and factorizations of
    whole layers cannot work on them. Refused by name, before any work."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        raise ValueError(
            f"the compression callbacks run on single-device and DDP strategies; {type(trainer.strategy).__name__} "
            "shards the weights across processes. Use strategy='ddp' (or 'auto' on one device)."
        )
