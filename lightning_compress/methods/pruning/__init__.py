"""Pruning methods in plain PyTorch: masks, schedules, selection, structured channel removal."""

from .masks import add_mask, clear_pruned_optimizer_state, is_masked, masked_modules, remove_mask, set_mask
from .schedule import PruningSchedule

__all__ = [
    "PruningSchedule",
    "add_mask",
    "clear_pruned_optimizer_state",
    "is_masked",
    "masked_modules",
    "remove_mask",
    "set_mask",
]
