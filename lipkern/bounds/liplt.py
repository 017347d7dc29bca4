"""The LipLT algebra of a parsed model (the derivation: :mod:`lipkern.bounds.network`'s docstring).

:func:`build_plan` turns the items of :mod:`lipkern.bounds.parsing` into LipLT segments (maximal runs of maps
and activations) and opaque blocks; :func:`_segment_value` / :func:`_sequence_value` evaluate the recursion,
either on estimates (:class:`_Plain`, differentiable) or with every operation rounded upward
(:class:`_Upward`, :func:`_sound_bound`: a guaranteed bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn

from lipkern._checks import as_shape
from lipkern._rounding import fraction_up as _float_up
from lipkern._rounding import sqrt_int_up as _sqrt_up
from lipkern._rounding import tensor_up
from lipkern.bounds.parsing import BoundParser, _Constant, _Map, _ResidualBlock, _Slope

__all__ = ["METHODS", "build_plan"]

METHODS = ("liplt", "product")
_HEAD_LIMIT = 256  # the exact head norms (C passes through the segment) for logits up to this many classes


@dataclass(eq=False)
class _Segment:
    maps: list
    slopes: list  # (α, β) Fractions between consecutive maps
    index: int = -1


@dataclass(eq=False)
class _Plan:
    blocks: list
    segments: list = field(default_factory=list)
    classes: int | None = None


# ----------------------------------------------------------------------------------------------------------
# Blocks: LipLT segments, constants, residuals.
# ----------------------------------------------------------------------------------------------------------
def _compose(first, second):
    """Slopes of φ₂∘φ₁ for slope-restricted φ₁ ∈ [α₁, β₁], φ₂ ∈ [α₂, β₂]: the hull of the four products."""
    if first is None:
        return second
    products = [a * b for a in first for b in second]
    return (min(products), max(products))


def _max_abs(slopes) -> float:
    return _float_up(max(abs(slopes[0]), abs(slopes[1])))


def _build_blocks(items: list, method: str, segments: list) -> list:
    blocks, maps, between, pending = [], [], [], None

    def flush():
        nonlocal maps, between, pending
        if maps:
            seg = _Segment(maps, between, len(segments))
            segments.append(seg)
            blocks.append(seg)
        if pending is not None:
            blocks.append(_Constant(_max_abs(pending), "activation"))
        maps, between, pending = [], [], None

    for item in items:
        if isinstance(item, _Map):
            if maps and method == "product":
                flush()
            if maps:
                between.append(pending or (Fraction(1), Fraction(1)))
            elif pending is not None:
                blocks.append(_Constant(_max_abs(pending), "activation"))
            pending = None
            maps.append(item)
        elif isinstance(item, _Slope):
            pending = _compose(pending, (item.alpha, item.beta))
        else:
            flush()
            if isinstance(item, _ResidualBlock):
                skip = None if item.skip is None else _build_blocks(item.skip, method, segments)
                blocks.append(_ResidualBlock(_build_blocks(item.branch, method, segments), skip))
            else:
                blocks.append(item)
    flush()
    return blocks


def _coefficients(seg: _Segment) -> tuple[list, list, float]:
    """(full (K,), coef (K, K), slope product) rounded up: full[k] = |∏_{i<k} a_i|,
    coef[j][k] = b_j·|∏_{i=j+1}^{k−1} a_i| (j < k), product = ∏ max(|α_i|, |β_i|)."""
    count = len(seg.maps)
    a = [abs(alpha + beta) / 2 for alpha, beta in seg.slopes]
    b = [(beta - alpha) / 2 for alpha, beta in seg.slopes]
    full, coef = [0.0] * count, [[0.0] * count for _ in range(count)]
    for k in range(count):
        full[k] = _float_up(math.prod(a[:k], start=Fraction(1)))
        for j in range(k):
            coef[j][k] = _float_up(b[j] * math.prod(a[j + 1:k], start=Fraction(1)))
    product = _float_up(math.prod((x + y for x, y in zip(a, b)), start=Fraction(1)))
    return full, coef, product


def build_plan(model: nn.Module, input_shape, method: str = "liplt", pairwise: bool = False, sound: bool = False,
               activation_slopes=None, lipschitz_constants=None) -> _Plan:
    """Parse ``model`` on inputs of ``input_shape`` (no batch dim) into segments and opaque blocks."""
    if method not in METHODS:
        raise ValueError(f"lipschitz_bound: method must be one of {METHODS}, got {method!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"lipschitz_bound: model must be an nn.Module, got {type(model).__name__}")
    if sound and any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ValueError("lipschitz_bound: the model is on the meta device (shapes only): a bound "
                         "needs values")
    try:
        shape = as_shape(input_shape, "input_shape", minimum=0)
    except TypeError:
        raise ValueError(f"lipschitz_bound: input_shape must be a tuple of ints, got {input_shape!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"lipschitz_bound: input_shape must be a non-empty tuple of positive ints (one input "
                         f"without the batch dim, e.g. (3, 32, 32)), got {input_shape!r}")
    parser = BoundParser(model, sound, activation_slopes, lipschitz_constants)
    items, out = parser.parse(model, shape)
    plan = _Plan([])
    plan.blocks = _build_blocks(items, method, plan.segments)
    if pairwise:
        last = plan.blocks[-1] if plan.blocks else None
        if not isinstance(last, _Segment) or items[-1] is not last.maps[-1]:
            raise ValueError("lipschitz_bound(pairwise=True): the model must end with a linear layer (the logits), "
                             "not an activation or an opaque block")
        plan.classes = math.prod(out)
    return plan


# ----------------------------------------------------------------------------------------------------------
# Evaluation: the same recursion on estimates (tensors) or on guaranteed bounds (each op rounded up).
# ----------------------------------------------------------------------------------------------------------
class _Plain:
    """Estimate arithmetic: ordinary tensor ops, vectorized sums."""

    @staticmethod
    def mul(a, b):
        return a * b

    @staticmethod
    def add(a, b):
        return a + b

    @staticmethod
    def weighted_sum(coef, col, m):
        return (coef * col * m).sum(0)

    @staticmethod
    def prod(t):
        return t.prod(0)


class _Upward:
    """float64 tensors, every IEEE operation followed by nextafter(+inf): each result ≥ its exact value
    (nonnegative operands; correct rounding makes nextafter of the rounded result an upper bound)."""

    @staticmethod
    def _up(t):
        return tensor_up(t)

    def mul(self, a, b):
        return self._up(torch.as_tensor(a, dtype=torch.float64) * b)

    def add(self, a, b):
        return self._up(torch.as_tensor(a, dtype=torch.float64) + b)

    def weighted_sum(self, coef, col, m):
        total = None
        for j in range(col.shape[0]):
            term = self.mul(self.mul(coef[j], col[j]), m[j])
            total = term if total is None else self.add(total, term)
        return total

    def prod(self, t):
        total = t[0]
        for j in range(1, t.shape[0]):
            total = self.mul(total, t[j])
        return total


def _expand(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.reshape(coef.shape + (1,) * (like.dim() - 1))


def _segment_value(norms: torch.Tensor, head, coefs, ar) -> torch.Tensor:
    """min(LipLT, product) of one segment. norms (K, K): norms[j, k] ≥ / ≈ ‖A_k⋯A_j‖; head (K, C, C) or None:
    the pairwise norms of the chains ending at the last map; coefs = (full (K,), coef (K, K), slope product)."""
    full, coef, slope_product = coefs
    count = norms.shape[0]
    if count == 1 and head is None:  # one map: LipLT = product = its norm (no activations inside a segment)
        return norms[0, 0]
    m = []
    for k in range(count):
        col = head if (head is not None and k == count - 1) else norms[:, k]
        value = col[0] if k == 0 else ar.mul(full[k], col[0])
        if k > 0:
            stacked = torch.stack(m)
            value = ar.add(value, ar.weighted_sum(_expand(coef[:k, k], col[1:k + 1]), col[1:k + 1],
                                                  _expand(stacked, col[1:k + 1])))
        m.append(value)
    diag = norms.diagonal()
    last = diag[-1] if head is None else head[-1]
    product = last if count == 1 else ar.mul(ar.prod(diag[:-1]), last)
    product = ar.mul(product, slope_product)
    return torch.minimum(m[-1], product)


def _sequence_value(blocks, seg_values, ar, one):
    """∏ of the blocks' values. The first factor is taken as it is and constants 1 (MaxMin, a certified CPL
    layer, a max pool with disjoint windows) are skipped: both exact, and no graph node per layer."""
    total = None
    for block in blocks:
        if isinstance(block, _Segment):
            value = seg_values[block.index]
        elif isinstance(block, _ResidualBlock):
            skip = one if block.skip is None else _sequence_value(block.skip, seg_values, ar, one)
            value = ar.add(skip, _sequence_value(block.branch, seg_values, ar, one))
        else:
            value = block.value
            if value == 1.0:
                continue
        total = value if total is None else ar.mul(total, value)
    if total is None:
        return one
    return total if isinstance(total, torch.Tensor) else ar.mul(one, total)


def _coefficient_tensors(seg, dtype, device):
    full, coef, product = _coefficients(seg)
    return (torch.tensor(full, dtype=dtype, device=device), torch.tensor(coef, dtype=dtype, device=device),
            torch.tensor(product, dtype=dtype, device=device))


def _sound_bound(plan: _Plan, pairwise: bool, chain_options: dict) -> torch.Tensor:
    from lipkern.bounds.chain import chain_upper_bounds, head_chain_norms

    ar, cpu = _Upward(), torch.device("cpu")
    seg_values = []
    for seg in plan.segments:
        maps = [m.current(precise=True, detach=True) for m in seg.maps]
        maps = [m.to(torch.float64) if m.weight.dtype != torch.float64 else m for m in maps]
        device = maps[0].weight.device
        maps = [m.with_weight(m.weight.to(device)) for m in maps]
        bounds = chain_upper_bounds(maps, **chain_options)
        norms = bounds.to(cpu)
        head = None
        last = norms[:, -1].clone()
        if pairwise and seg is plan.blocks[-1]:
            off_diagonal = 1 - torch.eye(plan.classes, dtype=torch.float64)
            head = torch.minimum(head_chain_norms(maps, pairwise=True, sound=True, chain_bounds=bounds).to(cpu),
                                 ar.mul(_sqrt_up(2), last)[:, None, None] * off_diagonal)
        elif seg is plan.blocks[-1] and maps[-1].out_features <= _HEAD_LIMIT:
            norms[:, -1] = torch.minimum(last, head_chain_norms(maps, pairwise=False, sound=True,
                                                                     chain_bounds=bounds).to(cpu))
        correction = _inexact_corrections(seg.maps, norms)
        if correction is not None:  # of the real maps: the float64 ones plus their rounding (tiny)
            norms = ar.add(norms, correction)
            if head is not None:
                head = ar.add(head, ar.mul(_sqrt_up(2), correction[:, -1])[:, None, None] * off_diagonal)
        seg_values.append(_segment_value(norms, head, _coefficient_tensors(seg, torch.float64, cpu), ar))
    value = _sequence_value(plan.blocks, seg_values, ar, torch.ones((), dtype=torch.float64))
    if pairwise:  # exact zeros on the diagonal (the upward rounding made them the smallest subnormal)
        value = value * (1 - torch.eye(plan.classes, dtype=torch.float64))
    return value


def _inexact_corrections(maps: list, norms: torch.Tensor) -> torch.Tensor | None:
    """Chains through maps whose float64 weight M_i is within a relative r_i of the real one M_i + Δ_i
    (‖Δ_i‖ ≤ r_i‖M_i‖): ‖∏(M_i + Δ_i)‖ ≤ ‖∏M_i‖ + (∏(1 + r_i) − 1)·∏‖M_i‖ (expand the product). Returns the
    (K, K) upper triangle of these additive terms (exact rationals rounded up), with ‖M_i‖ ≤ norms[i, i];
    None when every map is exact."""
    rel = [Fraction(m.relative_error) for m in maps]
    if not any(rel):
        return None
    k = len(maps)
    diag = [Fraction(float(norms[i, i])) for i in range(k)]
    out = torch.zeros(k, k, dtype=torch.float64)
    for j in range(k):
        growth, product = Fraction(1), Fraction(1)
        for i in range(j, k):
            growth *= 1 + rel[i]
            product *= diag[i]
            out[j, i] = _float_up((growth - 1) * product)
    return out
