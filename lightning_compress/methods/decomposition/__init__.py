"""Low-rank factorization of convolutions (Tucker-2, CP) and linear layers (SVD), with rank selection."""

from .allocation import allocate_ranks
from .apply import apply_plan, restore_factorized
from .layers import METHODS, Factorized, Geometry
from .plan import LayerDecision, plan_decomposition, plan_from_state, plan_to_state
from .ranks import parse_rank

__all__ = [
    "METHODS",
    "Factorized",
    "Geometry",
    "LayerDecision",
    "allocate_ranks",
    "apply_plan",
    "parse_rank",
    "plan_decomposition",
    "plan_from_state",
    "plan_to_state",
    "restore_factorized",
]
