"""Directed rounding: bounds that hold with their own floating-point rounding.

IEEE 754 arithmetic rounds each operation to nearest, so a computed result lies within half an ulp of the exact
one, subnormals included; the next float toward +inf (−inf) is then ≥ (≤) the exact value. Every helper here
applies that rule to one operation on Python floats (IEEE doubles), float64 tensors, or a cast to a narrower
dtype. NaN means "no bound": upward results turn it into +inf, downward ones into −inf. Where subnormals are
flushed to zero the rule fails below 2⁻¹⁰²²: ``mul_up``, the one helper whose results reach there in practice
(products of small norms), clamps to the smallest normal number. Property tests against exact rationals:
tests/test_rounding_helpers.py.
"""

from __future__ import annotations

import math
import sys
from fractions import Fraction

import numpy
import torch

__all__ = ["add_up", "cast_down", "cast_up", "div_down", "div_up", "down", "fraction_up", "gamma_up", "mul_up",
           "one_minus_gamma_down", "smallest_normal", "sqrt_int_up", "sqrt_up", "tensor_up", "up"]


def up(x: float) -> float:
    """A float ≥ the exact value that ``x`` is the round-to-nearest result of (NaN: +inf)."""
    if math.isnan(x):
        return math.inf
    return math.nextafter(x, math.inf)


def down(x: float) -> float:
    """A float ≤ the exact value that ``x`` is the round-to-nearest result of (NaN: −inf)."""
    if math.isnan(x):
        return -math.inf
    return math.nextafter(x, -math.inf)


def add_up(*terms: float) -> float:
    """An upper bound of the exact sum of the terms."""
    total = 0.0
    for t in terms:
        total = up(total + t)
    return total


_TINY = 2.0 ** -1022  # the smallest normal double


def mul_up(a: float, b: float) -> float:
    """An upper bound of a·b (a zero factor gives 0, also against inf). A product below the normal range is
    returned as the smallest normal number (or 0 when negative): an upper bound also where subnormals are
    flushed to zero (``torch.set_flush_denormal(True)`` sets the CPU's flags for Python floats too). NaN: +inf."""
    if math.isnan(a) or math.isnan(b):
        return math.inf
    if a == 0.0 or b == 0.0:
        return 0.0
    product = a * b
    if abs(product) < _TINY:
        return _TINY if (a > 0) == (b > 0) else 0.0
    return up(product)


def div_up(a: float, b: float) -> float:
    """An upper bound of a / b (b ≠ 0)."""
    return up(a / b)


def div_down(numerator: float, denominator: float) -> float:
    """numerator / denominator (both ≥ 0) rounded toward 0: exact when representable; +inf for a zero
    denominator, 0 for an infinite one, the largest float for an overflowing quotient."""
    if denominator == 0:
        return math.inf
    if math.isinf(denominator):
        return 0.0
    quotient = numerator / denominator
    if math.isinf(quotient):
        return sys.float_info.max
    if Fraction(quotient) * Fraction(denominator) > Fraction(numerator):
        quotient = math.nextafter(quotient, 0.0)
    return quotient


def sqrt_up(a: float) -> float:
    """An upper bound of √a (a ≥ 0)."""
    return up(math.sqrt(a))


def gamma_up(n: int) -> float:
    """γ_n = nu/(1 − nu) for float64 (u = 2⁻⁵³), rounded up: the relative error bound of an n-term sum or dot
    product in any order (Higham 2002, §3.1); +inf when nu ≥ 1/2 (nu and 1 − nu are exact for n < 2⁵²)."""
    nu = n * 2.0**-53
    return math.inf if nu >= 0.5 else div_up(nu, 1.0 - nu)


def one_minus_gamma_down(n: int) -> float:
    """1 − γ_n rounded down (a divisor that makes a quotient an upper bound); −inf past γ_n = inf."""
    return down(1.0 - gamma_up(n))


def fraction_up(x: Fraction | int) -> float:
    """The smallest float ≥ the exact rational x."""
    f = float(x)
    return f if Fraction(f) >= x else math.nextafter(f, math.inf)


def sqrt_int_up(n: int) -> float:
    """The smallest float whose square is ≥ the integer n ≥ 0 (√n rounded up, exactly)."""
    r = math.sqrt(n)
    return r if Fraction(r) ** 2 >= n else math.nextafter(r, math.inf)


_SMALLEST_NORMAL = {dtype: torch.finfo(dtype).tiny
                    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}


def smallest_normal(dtype: torch.dtype) -> float:
    """torch.finfo(dtype).tiny, looked up (the layers ask every training step; torch.finfo costs a few µs)."""
    return _SMALLEST_NORMAL.get(dtype) or torch.finfo(dtype).tiny


def tensor_up(t: torch.Tensor) -> torch.Tensor:
    """Elementwise: the next value above each round-to-nearest result (float tensors)."""
    return torch.nextafter(t, torch.full_like(t, math.inf))


_NUMPY = {torch.float64: numpy.float64, torch.float32: numpy.float32, torch.float16: numpy.float16}


def cast_up(value: float, dtype: torch.dtype) -> float:
    """The smallest value of floating ``dtype`` that is ≥ ``value``, as a Python float (float16/32/64 without a
    tensor: kernel scalar arguments; other dtypes, e.g. bfloat16, through a CPU tensor)."""
    kind = _NUMPY.get(dtype)
    if kind is not None:
        with numpy.errstate(over="ignore"):  # beyond the dtype's range: inf, as the cast gives
            v = kind(value)
            if float(v) < value:
                v = numpy.nextafter(v, kind(math.inf))
        return float(v)
    t = torch.tensor(value, dtype=torch.float64).to(dtype)  # (bfloat16: no numpy type)
    if t.double().item() < value:
        t = torch.nextafter(t, torch.tensor(math.inf, dtype=dtype))
    return t.double().item()


def cast_down(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest value of ``dtype`` that is ≤ each entry of a float64 tensor; tensor ops only
    (compilable)."""
    t = value.to(dtype)
    return torch.where(t.double() > value, torch.nextafter(t, torch.full_like(t, -math.inf)), t)
