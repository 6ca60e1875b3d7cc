"""Several compression callbacks in one Trainer: the order they must come in, and what cannot mix.

The order is the order of the structural changes each makes in ``setup``: decompose (new layers),
then prune the layers that exist (masks on the factors), then quantize (fake-quant layers that apply
the masks first, so pruned weights stay exact zeros), then share (codebooks). Each callback calls
:func:`check_composition` in its ``setup``, so a wrong order or an unsupported mix fails before any
work, with the fix in the message.
"""

from __future__ import annotations

import lightning.pytorch as pl

ORDER = ("TensorDecomposition", "IterativePruning", "QuantizationAwareTraining", "WeightSharing")


def check_composition(trainer: pl.Trainer | None) -> None:
    """Raise a ValueError naming the problem when the Trainer's compression callbacks cannot work together."""
    if trainer is None:  # a callback's setup used outside a Trainer
        return
    present = [c for c in trainer.callbacks if type(c).__name__ in ORDER]
    names = [type(c).__name__ for c in present]
    if len(present) < 2:
        return
    ranks = [ORDER.index(n) for n in names]
    if ranks != sorted(ranks):
        raise ValueError(
            f"compression callbacks are in the order {names}; put them in the order "
            f"{[n for n in ORDER if n in names]} (decompose, then prune the factors, then quantize, then share)"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"each compression callback may appear once; got {names}")
    by_name = dict(zip(names, present))
    decomposition = by_name.get("TensorDecomposition")
    if decomposition is not None and decomposition.epoch != 0:
        raise ValueError(
            f"TensorDecomposition(epoch={decomposition.epoch}) replaces layers during fit, under the other "
            f"compression callbacks ({[n for n in names if n != 'TensorDecomposition']}); use epoch=0 when composing"
        )
    pruning = by_name.get("IterativePruning")
    if pruning is not None and pruning.structure == "filter" and len(present) > 1:
        raise ValueError("IterativePruning(structure='filter') removes channels at fit end and does not compose "
                         f"with {[n for n in names if n != 'IterativePruning']}; use structure='unstructured'")
    if "QuantizationAwareTraining" in by_name and "WeightSharing" in by_name:
        raise ValueError("QuantizationAwareTraining and WeightSharing both choose the weights' values (a uniform "
                         "grid vs k-means centroids); use one of them")
