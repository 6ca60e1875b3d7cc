"""Rank rules: how many components of a weight's unfolding to keep.

Every rule reads the singular values of one matrix (a mode unfolding of a conv kernel, or a linear
weight) and returns a rank in ``1..len(spectrum)``:

* an ``int``: that rank (clamped to the mode size by the caller, with a warning);
* a ``float`` in (0, 1]: that fraction of the mode size, rounded up;
* ``"energy:x"``: the smallest rank whose projection keeps the fraction ``x`` of the Frobenius norm,
  ``sqrt(sum kept s^2 / sum s^2) >= x`` (the "approximation ratio" of the VGG19 study);
* ``"vbmf"``: analytic empirical variational Bayesian matrix factorisation (Nakajima et al., JMLR
  2013): the noise variance is estimated by minimising the free energy, and the singular values above
  the EVB threshold are kept;
* ``"svt"``: singular value hard thresholding at Gavish and Donoho's optimal threshold for unknown
  noise (IEEE Trans. IT 2014), ``omega(beta) * median(s)``; ``"svt:t"`` keeps the values ``>= t * s_max``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

RULES = ("int", "fraction", "energy", "vbmf", "svt")
VALID = "an int >= 1, a float in (0, 1], 'energy:x' with x in (0, 1], 'vbmf', 'svt' or 'svt:t' with t in (0, 1)"


@dataclass(frozen=True)
class RankRule:
    kind: str
    value: float | None = None

    def __str__(self) -> str:
        if self.kind == "int":
            return str(int(self.value))
        if self.kind == "fraction":
            return f"{self.value:g}"
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"


def parse_rank(rank: int | float | str, argument: str = "rank") -> RankRule:
    """Read a user's ``rank`` argument; ValueError naming ``argument``, the value and the valid forms."""
    bad = ValueError(f"{argument}={rank!r} is not valid; give {VALID}")
    if isinstance(rank, bool):
        raise bad
    if isinstance(rank, int):
        if rank < 1:
            raise bad
        return RankRule("int", rank)
    if isinstance(rank, float):
        if not 0 < rank <= 1:
            raise bad
        return RankRule("fraction", rank)
    if not isinstance(rank, str):
        raise bad
    name, _, value = rank.strip().lower().partition(":")
    if name == "vbmf" and not value:
        return RankRule("vbmf")
    if name == "svt" and not value:
        return RankRule("svt")
    if name in ("energy", "svt") and value:
        try:
            x = float(value)
        except ValueError:
            raise bad from None
        upper_ok = x <= 1 if name == "energy" else x < 1
        if not (0 < x and upper_ok):
            raise ValueError(
                f"{argument}={rank!r}: {name} must be in (0, 1{']' if name == 'energy' else ')'}; give {VALID}"
            )
        return RankRule(name, x)
    raise bad


def spectrum(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D tensor, descending, in float64.

    Through the eigenvalues of the smaller Gram matrix: for the wide unfoldings of conv kernels
    (512 x 4608) that is several times faster than an SVD, and float64 keeps the small values accurate.
    """
    m = matrix.detach().to(torch.float64)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    values = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    return values.flip(0)


def select_rank(rule: RankRule, values: torch.Tensor, shape: tuple[int, int]) -> int:
    """The rank ``rule`` picks for a matrix of ``shape`` whose singular values are ``values``."""
    size = len(values)
    if rule.kind == "int":
        return int(rule.value)
    if rule.kind == "fraction":
        return max(1, math.ceil(rule.value * size - 1e-9))
    if rule.kind == "energy":
        return energy_rank(values, rule.value)
    if rule.kind == "vbmf":
        return max(1, vbmf_rank(values, shape))
    if rule.kind == "svt":
        return max(1, svt_rank(values, shape, rule.value))
    raise ValueError(f"unknown rank rule {rule.kind!r}; valid: {', '.join(RULES)}")


def energy_rank(values: torch.Tensor, ratio: float) -> int:
    """Smallest r with ``sqrt(sum(values[:r]^2) / sum(values^2)) >= ratio``."""
    energy = values.double() ** 2
    total = float(energy.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(energy, 0) / total
    # A relative tolerance, so that ratio 1.0 asks for the numerical rank, not for rounding noise.
    return int(torch.searchsorted(kept, ratio**2 * (1 - 1e-12)).item()) + 1


def svt_rank(values: torch.Tensor, shape: tuple[int, int], relative: float | None = None) -> int:
    """Number of singular values above the hard threshold."""
    s = values.double()
    if relative is not None:
        return int((s >= relative * s[0]).sum())
    beta = min(shape) / max(shape)
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    return int((s > omega * torch.median(s)).sum())


def vbmf_rank(values: torch.Tensor, shape: tuple[int, int]) -> int:
    """Rank by analytic empirical VBMF with the noise variance estimated (Nakajima et al. 2013).

    ``values`` are all ``min(shape)`` singular values of an ``L x M`` matrix (``L <= M``). The free
    energy as a function of the noise variance is minimised on the interval the paper proves holds
    the optimum; the rank is the number of singular values above ``sqrt(M sigma^2 x_bar)``.
    """
    from scipy.optimize import minimize_scalar  # scipy comes with scikit-learn

    s2 = np.sort(values.double().cpu().numpy())[::-1] ** 2
    L, M = min(shape), max(shape)
    H = len(s2)
    if H < L:
        raise ValueError(f"vbmf needs all {L} singular values, got {H}")
    s2 = s2[:L]
    if s2[0] == 0:
        return 0
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)

    def free_energy(sigma2: float) -> float:
        x = s2 / (M * sigma2)
        large = x > x_bar
        xl = x[large]
        tau = 0.5 * (xl - (1 + alpha) + np.sqrt(np.maximum((xl - (1 + alpha)) ** 2 - 4 * alpha, 0)))
        small = x[~large]
        return float(
            np.sum(small - np.log(np.maximum(small, 1e-300)))
            + np.sum(xl - tau + np.log((tau + 1) / xl) + alpha * np.log(tau / alpha + 1))
        )

    e_h = min(math.ceil(L / (1 + alpha)) - 1, H)  # components that can be signal at most
    upper = float(s2.sum()) / (L * M)
    tail = s2[e_h:] if e_h < L else s2[-1:]
    lower = max(float(tail[0]) / (M * x_bar), float(tail.mean()) / M, upper * 1e-12)
    if lower >= upper:
        sigma2 = upper
    else:
        sigma2 = float(minimize_scalar(free_energy, bounds=(lower, upper), method="bounded").x)
    threshold = M * sigma2 * x_bar
    return int((s2 > threshold).sum())


def round_rank(rank: int, size: int, multiple: int) -> int:
    """Round ``rank`` up to a multiple of ``multiple`` (tensor-core friendly widths), within ``1..size``."""
    if multiple > 1:
        rank = math.ceil(rank / multiple) * multiple
    return max(1, min(rank, size))
