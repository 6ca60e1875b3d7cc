"""Number formats a tensor is fake-quantized to, and the checks that name a bad argument.

* ``affine``: integers in ``[0, 2^b - 1]`` with a scale and a zero point (activations; weights use
  the symmetric range so that exported int8 weights have zero point 0, as ONNX Runtime's int8
  kernels expect);
* ``symmetric``: integers in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, zero point 0;
* ``fixed_point``: ``<IL, FL>`` of Gupta et al. (2015): ``IL`` integer bits (sign included) and ``FL``
  fractional bits, step ``2^-FL``, saturating at the range, rounding to nearest or stochastically;
* ``binary``: ``+1 / -1`` (BinaryConnect), deterministic (sign) or stochastic (hard sigmoid).
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMES = ("affine", "symmetric", "fixed_point", "binary")
ROUNDINGS = ("nearest", "stochastic")


@dataclass(frozen=True)
class Format:
    """How one tensor is quantized."""

    bits: int
    scheme: str  # "affine" | "symmetric" | "fixed_point" | "binary"
    integer_bits: int = 0  # fixed_point only: IL (sign included); FL = bits - IL
    rounding: str = "nearest"

    @property
    def fractional_bits(self) -> int:
        return self.bits - self.integer_bits

    def int_range(self, signed: bool) -> tuple[int, int]:
        """Integer range of the stored values."""
        if self.scheme == "affine" and not signed:
            return 0, 2**self.bits - 1
        if self.scheme == "fixed_point":
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return -(2 ** (self.bits - 1) - 1), 2 ** (self.bits - 1) - 1


def check_bits(name: str, bits: int | None, allow_none: bool = False) -> None:
    if bits is None and allow_none:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"{name}={bits!r} must be an integer in 1..16" + (" or None (not quantized)" if allow_none else ""))


def check_scheme(scheme: str, bits: int, name: str = "scheme") -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"{name}={scheme!r} is not known; valid: {', '.join(map(repr, SCHEMES))}")
    if scheme != "binary" and bits < 2:
        raise ValueError(f"{name}={scheme!r} needs at least 2 bits, got {bits}; 1 bit is scheme='binary'")


def check_fixed_point(name: str, value: tuple[int, int] | list[int] | None, bits: int) -> tuple[int, int] | None:
    """``value`` is ``(IL, FL)``; IL + FL must equal the bit width (IL counts the sign bit)."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name}={value!r} must be (IL, FL): integer and fractional bits")
    il, fl = value
    if il < 1 or fl < 0:
        raise ValueError(f"{name}={tuple(value)!r}: IL must be >= 1 (it holds the sign) and FL >= 0")
    if il + fl != bits:
        raise ValueError(f"{name}={tuple(value)!r}: IL + FL = {il + fl} must equal the bit width {bits}")
    return il, fl
