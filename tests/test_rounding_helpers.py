"""lipkern._rounding, the one module of directed-rounding helpers, against exact rationals (hypothesis):
each result is on the promised side of the exact value, and the "smallest / largest such float" helpers are
exactly that (their neighbour is on the wrong side). Subnormal and underflowing operands included."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lipkern._rounding import (add_up, cast_down, cast_up, div_down, div_up, down, fraction_up, gamma_up, mul_up,
                               one_minus_gamma_down, sqrt_int_up, sqrt_up, tensor_up, up)

finite = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True)
positive = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False, allow_subnormal=True)
tiny = st.floats(min_value=-1e-300, max_value=1e-300, allow_nan=False, allow_subnormal=True)


def _at_least(x: float, exact: Fraction) -> bool:
    return x == math.inf or Fraction(x) >= exact


def _at_most(x: float, exact: Fraction) -> bool:
    return x == -math.inf or Fraction(x) <= exact


@settings(max_examples=400, deadline=None)
@given(a=st.one_of(finite, tiny), b=st.one_of(finite, tiny))
def test_sums_and_products_bound_the_exact_value(a, b):
    assume(math.isfinite(a + b) and math.isfinite(a * b))
    exact_sum, exact_product = Fraction(a) + Fraction(b), Fraction(a) * Fraction(b)
    assert _at_least(up(a + b), exact_sum) and _at_most(down(a + b), exact_sum)
    assert _at_least(add_up(a, b), exact_sum)
    assert _at_least(mul_up(a, b), exact_product)
    assert mul_up(a, 0.0) == 0.0 and mul_up(0.0, math.inf) == 0.0


@settings(max_examples=300, deadline=None)
@given(terms=st.lists(st.one_of(finite, tiny), min_size=1, max_size=8))
def test_add_up_of_many_terms(terms):
    assert _at_least(add_up(*terms), sum(Fraction(t) for t in terms))


@settings(max_examples=400, deadline=None)
@given(a=positive, b=st.floats(min_value=1e-300, allow_nan=False, allow_infinity=False))
def test_quotients_bound_the_exact_value(a, b):
    exact = Fraction(a) / Fraction(b)
    upper, lower = div_up(a, b), div_down(a, b)
    if math.isfinite(upper):
        assert Fraction(upper) >= exact
    assert Fraction(lower) <= exact
    if math.isfinite(a / b):  # div_down is the largest float at or below the quotient
        assert Fraction(math.nextafter(lower, math.inf)) > exact
    assert div_down(a, 0.0) == math.inf and div_down(a, math.inf) == 0.0
    assert div_down(1e308, 1e-308) == 1.7976931348623157e308


@settings(max_examples=300, deadline=None)
@given(a=positive, n=st.integers(0, 10 ** 40))
def test_square_roots(a, n):
    assert sqrt_up(a) == math.inf or Fraction(sqrt_up(a)) ** 2 >= Fraction(a)
    r = sqrt_int_up(n)
    assert Fraction(r) ** 2 >= n and Fraction(math.nextafter(r, 0.0)) ** 2 < n or n == 0


@settings(max_examples=300, deadline=None)
@given(numerator=st.integers(-10 ** 30, 10 ** 30), denominator=st.integers(1, 10 ** 30))
def test_fraction_up_is_the_smallest_float_above(numerator, denominator):
    q = Fraction(numerator, denominator)
    f = fraction_up(q)
    assert Fraction(f) >= q and Fraction(math.nextafter(f, -math.inf)) < q


@settings(max_examples=300, deadline=None)
@given(value=st.floats(min_value=-3e38, max_value=3e38, allow_nan=False, allow_subnormal=True))
def test_casts_to_float32(value):
    above = cast_up(value, torch.float32)
    assert Fraction(above) >= Fraction(value) and float(numpy.float32(above)) == above
    assert Fraction(float(numpy.nextafter(numpy.float32(above), numpy.float32(-math.inf)))) < Fraction(value) \
        or above == value
    if abs(value) < 3e38:
        bf16 = cast_up(value, torch.bfloat16)
        assert Fraction(bf16) >= Fraction(value) and torch.tensor(bf16).to(torch.bfloat16).double().item() == bf16
    below = cast_down(torch.tensor([value], dtype=torch.float64), torch.float32)
    assert below.dtype == torch.float32 and Fraction(below.item()) <= Fraction(value)
    next_up = torch.nextafter(below, torch.tensor([math.inf]))
    assert Fraction(next_up.item()) > Fraction(value) or below.item() == value


@settings(max_examples=200, deadline=None)
@given(a=st.lists(st.floats(-1e200, 1e200, allow_subnormal=True), min_size=1, max_size=6),
       b=st.lists(st.floats(-1e-200, 1e-200, allow_subnormal=True), min_size=1, max_size=6))
def test_tensor_up_after_each_operation(a, b):
    n = min(len(a), len(b))
    x, y = torch.tensor(a[:n], dtype=torch.float64), torch.tensor(b[:n], dtype=torch.float64)
    product = tensor_up(x * y)
    for p, u, v in zip(product.tolist(), a, b):
        assert Fraction(p) >= Fraction(u) * Fraction(v)


def test_nan_means_no_bound():
    assert up(math.nan) == math.inf and down(math.nan) == -math.inf and add_up(1.0, math.nan) == math.inf
    assert mul_up(math.nan, 0.0) == math.inf and mul_up(2.0, math.nan) == math.inf


def test_products_stay_upper_bounds_when_subnormals_are_flushed():
    """torch.set_flush_denormal(True) sets the CPU's flush-to-zero flags, which Python floats obey too: a
    product below the normal range must not come back as 0."""
    if not torch.set_flush_denormal(True):
        return  # this CPU has no such mode
    try:
        assert Fraction(mul_up(1e-160, 1e-160)) >= Fraction(1e-160) * Fraction(1e-160)
        assert mul_up(-1e-160, 1e-160) >= -1e-320 and mul_up(1e-160, 1e-160) > 0
    finally:
        torch.set_flush_denormal(False)


@given(st.integers(0, 2**53))
def test_gamma_bounds_the_exact_rational(n):
    """γ_n = nu/(1 − nu) with u = 2⁻⁵³, exactly in rationals: gamma_up ≥ it, 1 − gamma_up ≥ one_minus_gamma_down."""
    nu = Fraction(n, 2**53)
    if nu >= Fraction(1, 2):
        assert gamma_up(n) == math.inf and one_minus_gamma_down(n) == -math.inf
        return
    exact = nu / (1 - nu)
    assert Fraction(gamma_up(n)) >= exact
    assert Fraction(one_minus_gamma_down(n)) <= 1 - exact
