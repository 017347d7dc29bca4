"""Rigorous bounds on the floating-point evaluation error of a network's logits, near an input.

A margin certificate (radius = margin / (√2·L)) is a theorem about the REAL-arithmetic network f. The model
that is deployed computes f̂ in floating point, and f̂ ≠ f: a point certified for f can be flipped for f̂ by a
perturbation that only moves the rounding (Jin et al. 2022). This module bounds ‖f̂(z) − f(z)‖₂ for every z
with ‖z − x‖₂ ≤ ε, so that the certificate can cover the deployed evaluation.

**The network.** ``model`` is first frozen: :func:`lipkern.models.to_vanilla` replaces every lipkern layer by
the plain layer holding the weight it applies (AOL's rescaled weight, the Spectral / CPL eval weights and
step sizes, in the model's own dtype), and that copy is upcast exactly to float64. The certificate is about
this frozen network: its float32 export (``to_vanilla``) evaluated by any summation order, and the lipkern
model itself wherever it computes the same weights.

**The error model** (Higham, Accuracy and Stability of Numerical Algorithms, §3.1 and Lemma 3.1). With unit
roundoff u, γ_n = n·u / (1 − n·u). A dot product of n terms plus a bias, computed in ANY order (blocked, split,
with or without FMA), errs by at most γ_{n+1}·(|W|·|h| + |b|) entrywise; with TF32 (the first 10 mantissa
bits of each operand read, u_op = 2⁻¹⁰, accumulation charged 2⁻²² per term as in lipkern/ops/aol.py) by
((1 + u_op)²(1 + γ_{n+1}) − 1)·(|W|·|h| + |b|). Below the smallest normal number a result, or a flushed
(denormals-are-zero) operand, errs by an ABSOLUTE amount: every layer is charged 2⁻¹²⁶ (float32; 2⁻¹⁰²²
float64) per operation, weighted by the factors a flushed operand meets; weights below it are refused. ReLU,
MaxMin, max pooling, flatten, channel selections and padding copy or compare values: exact. LeakyReLU's slope
is itself rounded to float32 by PyTorch: 2u + u². Affine per-channel maps (BatchNorm in eval mode, Normalize)
are charged γ_12 (resp. γ_4) of |s|·(|h| + |μ|) + |β| for their few elementary operations, each assumed within
1.5 ulps (rsqrt). Convolutions must be computed as sums of products: the float64 evaluation here runs with
cuDNN off; a CUDA deployment must not use cuDNN's FFT or Winograd algorithms (``torch.backends.cudnn.enabled
= False`` guarantees it). ``evaluation="auto"`` reads PyTorch's float32 precision settings (TF32 where on;
bfloat16 operands are refused).

**The propagation.** Let h_k(z) be the exact input of layer k at the network input z, ĥ_k(z) the deployed
one, E_k(z) = ‖ĥ_k(z) − h_k(z)‖₂, β_k a guaranteed bound of the layer's Lipschitz constant, M_k one of the
prefix x ↦ h_k(x). A layer's own rounding at its computed input is at most C_k + S_k·‖ĥ_k(z) − h_k(x)‖₂ (a
center term at the exact center activation h_k(x), a spread term), and ‖ĥ_k(z) − h_k(x)‖ ≤ E_k(z) + M_k·ε.
The center h_k(x) is known through the float64 evaluation g_k of the same frozen network, with its own
a-posteriori bound e_k ≥ ‖g_k − h_k(x)‖ (the same rules with u = 2⁻⁵³, at the computed g_k exactly). Hence
    e_{k+1} = β_k e_k + C⁶⁴_k,
    E_{k+1}(z) ≤ P_{k+1} + Q_{k+1} ε,  P_{k+1} = β_k P_k + C_k + S_k (e_k + P_k),  Q_{k+1} = β_k Q_k + S_k (M_k + Q_k),
    M_{k+1} = β_k M_k,
with the terms C, S of the deployed precision evaluated at g_k (|h_k(x)| ≤ |g_k| + |g_k − h_k(x)| moves the
difference into S_k·e_k). A residual block adds both paths and the rounding of the sum. Every quantity is
computed in float64 from non-negative terms and inflated by a relative 2⁻⁴⁰·(terms), more than the float64
rounding of its computation.

**The certificate** (:func:`lipkern.certify.certified_accuracy`): for the predicted class y of the float64
logits g and any other class j, |(f̂_y − f̂_j)(z) − (f_y − f_j)(z)| ≤ √2·E(z), so
    (f̂_y − f̂_j)(z) ≥ (g_y − g_j) − √2·(e + P) − (L_yj + √2·Q)·ε   for ‖z − x‖ ≤ ε,
and the radius is min_j ((g_y − g_j) − √2(e + P)) / (L_yj + √2·Q) (global L: L_yj = √2·L): inside it the
deployed network cannot change its prediction, whatever its summation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

import torch
from torch import nn

from lipkern._registry import TypeRegistry
from lipkern._rounding import fraction_up
from lipkern.bounds.chain import abs_line_sums
from lipkern.bounds.operators import LinearMap, abs_norm_upper, plain_layer_operator

__all__ = ["PRECISIONS", "EvaluationError", "OneLipschitz", "Precision", "RoundingAnalysis", "gamma",
           "register_lipschitz_proof", "register_rounding_rule"]

_U64 = 2.0 ** -53


@dataclass(frozen=True)
class Precision:
    """A floating-point evaluation: ``unit`` the unit roundoff of accumulation and element-wise operations,
    ``operand_unit`` the rounding of matmul / conv operands before their products (TF32: 2⁻¹⁰; 0 if none)."""

    name: str
    unit: float
    operand_unit: float = 0.0


# TF32 reads the first 10 mantissa bits of each operand (truncation: 2⁻¹⁰) and tensor cores may align and
# accumulate by truncation (2⁻²² per term, the model of lipkern/ops/aol.py; Fasi et al. 2021).
PRECISIONS = {"float32": Precision("float32", 2.0 ** -24), "tf32": Precision("tf32", 2.0 ** -22, 2.0 ** -10),
              "float64": Precision("float64", _U64)}
# The smallest normal number: below it a result (or, with flush-to-zero / denormals-are-zero, an operand) is
# off by at most this much in ABSOLUTE terms, which no relative γ covers.
_SMALLEST_NORMAL = {"float32": 2.0 ** -126, "tf32": 2.0 ** -126, "float64": 2.0 ** -1022}


def gamma(n: int, precision: Precision) -> float:
    """(1 + u_op)²·(1 + γ_n) − 1 with γ_n = n·u / (1 − n·u), rounded up (exact rationals): the relative error
    bound of an n-term dot product (or n elementary operations) in ``precision``."""
    u, op = Fraction(precision.unit), Fraction(precision.operand_unit)
    if n * u >= 1:
        raise ValueError(f"rounding: {n} accumulated terms exceed what unit roundoff {precision.unit} bounds")
    return fraction_up((1 + op) ** 2 * (1 + n * u / (1 - n * u)) - 1)


def _inflate(t, terms: int):
    """A float64 value computed from ≤ ``terms`` non-negative rounded operations, made an upper bound."""
    return t * (1.0 + (terms + 8) * 2.0 ** -40)


class EvaluationError(NamedTuple):
    """For a batch x: ``logits`` (B, C) the float64 evaluation g of the frozen network; ``exact`` (B,) a bound
    on ‖g − f(x)‖₂ (f the real-arithmetic network); ``center`` (B,) and ``slope``: for every z with
    ‖z − x‖₂ ≤ ε the deployed evaluation errs by ‖f̂(z) − f(z)‖₂ ≤ center + slope·ε (zero for 'exact')."""

    logits: torch.Tensor
    exact: torch.Tensor
    center: torch.Tensor
    slope: float


@dataclass
class _State:
    g: torch.Tensor  # float64 evaluation, (B, ...)
    e64: torch.Tensor  # (B,) ‖g − h(x)‖ bound
    p: torch.Tensor  # (B,) deployed error at the center
    q: float  # deployed error per unit of ε
    m: float  # Lipschitz bound of the prefix

    def advance(self, g, lip: float, c64, c32, s32: float, absolute: tuple = (0.0, 0.0)) -> "_State":
        """The rules of the module docstring for one layer of Lipschitz bound ``lip`` whose own rounding is
        c64 (float64, at g) and c32 + s32·spread (deployed), plus the absolute underflow terms (float64,
        deployed)."""
        e64 = _inflate(lip * self.e64 + c64 + absolute[0], 4)
        p = _inflate(lip * self.p + c32 + s32 * (self.e64 + self.p) + absolute[1], 8)
        q = _inflate(lip * self.q + s32 * (self.m + self.q), 8)
        return _State(g, e64, p, q, _inflate(lip * self.m, 1))


def _norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample ℓ₂ norms (B,) of non-negative float64 terms, rounded up; scaled by the largest entry first,
    so that tiny entries do not underflow in the squares (nor huge ones overflow)."""
    flat = t.flatten(1)
    largest = flat.amax(dim=1, keepdim=True) if flat.shape[1] else flat.new_zeros(flat.shape[0], 1)
    safe = torch.where(largest > 0, largest, torch.ones_like(largest))
    norm = torch.linalg.vector_norm(flat / safe, dim=1) * safe[:, 0]
    return _inflate(torch.where(largest[:, 0] > 0, norm, torch.zeros_like(norm)), flat.shape[1] + 4)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _Step:
    """One layer of the frozen float64 network: ``apply(state)`` evaluates it and advances the bounds.
    ``operations``: a bound on Σ over one output entry of the magnitudes each underflow can cost (in units of
    the smallest normal number), times √(output entries) (set by the parser): the absolute terms."""

    operations: float = 0.0

    def underflow_count(self) -> float:
        """Per output entry: the operations whose result (or flushed operand, weighted by its factor) may
        underflow."""
        return 1.0

    def absolute(self, precision: Precision | None) -> tuple[float, float]:
        deployed = 0.0 if precision is None else _SMALLEST_NORMAL[precision.name] * self.operations
        return _SMALLEST_NORMAL["float64"] * self.operations, _inflate(deployed, 2)

    def apply(self, state: _State, precision: Precision | None) -> _State:
        raise NotImplementedError


class _Exact(_Step):
    """Copies, comparisons, reshapes: no rounding; Lipschitz ``lip``."""

    def __init__(self, module, lip: float = 1.0):
        self.module, self.lip = module, lip

    def apply(self, state, precision):
        zero = torch.zeros_like(state.e64)
        return state.advance(self.module(state.g), self.lip, zero, zero, 0.0, self.absolute(precision))


class _Affine(_Step):
    """y = W h + b (nn.Linear, nn.Conv2d, average pooling): a dot product of ``terms`` products each.
    ``lip``: a proven bound of ‖W‖ (an AOL / certified Spectral layer: 1), else computed (guaranteed)."""

    def __init__(self, module, operator, bias, terms: int, lip: float | None = None):
        self.module, self.operator, self.terms = module, operator, terms
        self.abs_operator = operator.abs()
        self.abs_bias = None if bias is None else bias.detach().abs()
        self.lip = float(operator.upper_bound()) if lip is None else lip
        self.abs_norm = abs_norm_upper(operator)
        self.row_sum, self.col_sum = abs_line_sums(operator)

    def underflow_count(self) -> float:
        # each product with a flushed operand: |w|·2⁻¹²⁶ (weights are normal: checked); each rounded result
        return self.row_sum + self.terms + 2

    def magnitude_vector(self, g: torch.Tensor) -> torch.Tensor:
        """|W|·|g| + |b| (B, *out), non-negative; each entry within a relative γ_terms (float64) of the exact."""
        t = self.abs_operator.forward(g.abs())
        if self.abs_bias is not None:
            t = t + self.abs_bias.reshape(-1, *([1] * (t.dim() - 2)))
        return t

    def magnitude(self, g: torch.Tensor) -> torch.Tensor:
        """‖|W|·|g| + |b|‖₂ per sample, rounded up."""
        return _inflate(_norm(self.magnitude_vector(g)), self.terms)

    def apply(self, state, precision):
        rho = self.magnitude(state.g)
        c64 = gamma(self.terms, PRECISIONS["float64"]) * rho
        g32 = gamma(self.terms, precision) if precision is not None else 0.0
        return state.advance(self.module(state.g), self.lip, c64, g32 * rho, g32 * self.abs_norm,
                             self.absolute(precision))


class _Diagonal(_Step):
    """y = s·(h − μ) + β per channel (BatchNorm in eval mode, Normalize), ``roundings`` roundings each."""

    def __init__(self, module, scale, mean, shift, roundings: int):
        self.module, self.roundings = module, roundings
        self.scale, self.mean = scale.detach().abs(), mean.detach().abs()
        self.shift = None if shift is None else shift.detach().abs()
        self.lip = _inflate(float(self.scale.max()), 8)  # s is float64-computed: a few ulps, covered

    def underflow_count(self) -> float:
        return self.lip + self.roundings + 1

    def apply(self, state, precision):
        shape = (-1, *([1] * (state.g.dim() - 2)))
        t = self.scale.reshape(shape) * (state.g.abs() + self.mean.reshape(shape))
        if self.shift is not None:
            t = t + self.shift.reshape(shape)
        rho = _inflate(_norm(t), 4)
        c64 = gamma(self.roundings, PRECISIONS["float64"]) * rho
        g32 = gamma(self.roundings, precision) if precision is not None else 0.0
        return state.advance(self.module(state.g), self.lip, c64, g32 * rho, g32 * self.lip,
                             self.absolute(precision))


class _LeakyReLU(_Step):
    """max(h, a·h): a·h rounded once on the negative side; in float32 the slope itself is first rounded to
    float32 (PyTorch casts it), so the deployed product errs by (2u + u²)·|a·h| (float64: one rounding)."""

    def __init__(self, module):
        self.module = module
        self.slope = abs(float(module.negative_slope))
        self.lip = max(1.0, self.slope)

    def underflow_count(self) -> float:
        return self.slope + 1

    def apply(self, state, precision):
        rho = _inflate(self.slope * _norm(state.g.abs()), 2)
        u = precision.unit if precision is not None else 0.0
        relative = 2 * u + u * u
        return state.advance(self.module(state.g), self.lip, _U64 * rho, relative * rho, relative * self.slope,
                             self.absolute(precision))


class _ResidualLayer(_Step):
    """A layer z = h − (something of h) whose rounding at a computed input is ``_terms(_norms(g), precision)``:
    (center, spread)."""

    def apply(self, state, precision):
        norms = self._norms(state.g)
        c64, _ = self._terms(norms, PRECISIONS["float64"])
        if precision is None:
            zero = torch.zeros_like(c64)
            return state.advance(self.module(state.g), self.lip, c64, zero, 0.0, self.absolute(precision))
        c32, s32 = self._terms(norms, precision)
        return state.advance(self.module(state.g), self.lip, c64, c32, s32, self.absolute(precision))


class _PlainCPL(_ResidualLayer):
    """z = h − t·Wᵀ relu(W h + b) (the frozen CPL layer), computed as p = W h + b (``terms`` products, error
    e_p ≤ γ_a(|W||h| + |b|)), r = relu(p) (exact), v = Wᵀ r (``adjoint_terms``), w = t·v, z = h − w. The error
    of p reaches v through Wᵀ·relu, a LINEAR propagation (‖W‖, not ‖|W|‖), so at the computed input h
        ‖v̂ − v‖ ≤ ‖W‖ γ_a ρ_W + γ_m (ρ_V + ‖|W|‖ γ_a ρ_W),  ρ_W = ‖|W||h| + |b|‖, ρ_V = ‖|Wᵀ| relu(W h + b)‖,
        ‖ẑ − z‖ ≤ (1 + u)² t ‖v̂ − v‖ + (2u + u²) t ‖W‖ ‖relu(W h + b)‖ + u ‖h‖,
    each term at the center g plus its growth with ‖h − g‖ (ρ_W by ‖|W|‖, ρ_V by ‖|W|‖·‖W‖, relu(W h + b) by
    ‖W‖). ``proven``: a certified CPL layer, whose step t ≤ 2/‖W‖² is proven: Lipschitz 1 and ‖W‖ ≤ √(2/t);
    else ‖W‖ ≤ U computed and the Lipschitz bound max(1, t·U² − 1)."""

    def __init__(self, module, operator, bias, terms: int, adjoint_terms: int, proven: bool = False):
        self.module = module
        self.step = float(module.h)
        upper = _inflate(math.sqrt(2.0 / self.step), 2) if proven and self.step > 0 else None
        self.affine = _Affine(None, operator, bias, terms, lip=upper)
        self.adjoint_terms = adjoint_terms
        upper = self.affine.lip  # ≥ ‖W‖
        # the Jacobian I − t·WᵀDW (0 ≤ D ≤ I) has its eigenvalues in [1 − tU², 1]
        self.lip = 1.0 if proven else max(1.0, _inflate(self.step * upper * upper, 3) - 1.0)

    def underflow_count(self) -> float:
        # the first product's underflows reach z through t·|Wᵀ|; the second product's and the two
        # element-wise operations directly
        first = self.affine.row_sum + self.affine.terms + 2
        # a flushed operand of the adjoint product (relu output) costs |Wᵀ|'s column sum, times t
        return (first * (1 + self.step * self.affine.col_sum) + self.adjoint_terms + self.step + 4
                + self.affine.col_sum * (2 + self.step))

    def _norms(self, g: torch.Tensor):
        """(ρ_W, ‖relu(W g + b)‖, ρ_V, ‖g‖) per sample, each rounded up to cover the exact value at g."""
        width = self.affine.abs_norm
        g64 = gamma(self.affine.terms, PRECISIONS["float64"])
        rho_w = self.affine.magnitude(g)
        pre = self.affine.operator.forward(g)
        if self.affine.abs_bias is not None:
            pre = pre + self.module.bias.detach().reshape(-1, *([1] * (pre.dim() - 2)))
        relu = pre.clamp_min(0)  # within γ64·(|W||g| + |b|) of the exact relu(W g + b) (entrywise)
        relu_norm = _inflate(_norm(relu), 2) + g64 * rho_w
        rho_v = _inflate(_norm(self.affine.abs_operator.adjoint(relu)), self.adjoint_terms) + width * g64 * rho_w
        return rho_w, relu_norm, rho_v, _norm(g.abs())

    def _terms(self, norms, precision: Precision):
        """(center (B,), spread): the layer's rounding at a computed input h is ≤ center + spread·‖h − g‖."""
        rho_w, relu_norm, rho_v, g_norm = norms
        a, m, u = gamma(self.affine.terms, precision), gamma(self.adjoint_terms, precision), precision.unit
        wn, width, t = self.affine.lip, self.affine.abs_norm, self.step
        error_v = wn * a * rho_w + m * (rho_v + width * a * rho_w)
        center = (1 + u) ** 2 * t * error_v + (2 * u + u * u) * t * wn * relu_norm + u * g_norm
        growth_v = wn * a * width + m * (width * wn + width * a * width)
        spread = (1 + u) ** 2 * t * growth_v + (2 * u + u * u) * t * wn * wn + u
        return _inflate(center, 16), _inflate(spread, 16)


class _PlainSLL(_ResidualLayer):
    """z = h − Wᵀ(s ⊙ relu(W h + b)) (the frozen SLL layer), computed as p = W h + b (γ_a), r = relu(p), r' =
    r ⊙ s (one rounding), v = Wᵀ r' (γ_m), z = h − v (one rounding). With U ≥ ‖S^{1/2}W‖ (√2 for a layer
    1-Lipschitz by proof) and s_max = max s, at the computed input h:
        ‖v̂ − v‖ ≤ U·(√s_max (1 + u) γ_a ρ_W + u‖√s ⊙ r‖) + γ_m (ρ_V + ‖|W|‖ (s_max (1 + u) γ_a ρ_W
                   + u √s_max ‖√s ⊙ r‖)),   ρ_V = ‖|Wᵀ|(s ⊙ r)‖,
        ‖ẑ − z‖ ≤ (1 + u)‖v̂ − v‖ + u (‖h‖ + U ‖√s ⊙ r‖),
    every term at the center g plus its growth with ‖h − g‖ (ρ_W by ‖|W|‖, ‖√s ⊙ r‖ by U, ρ_V by
    ‖|W|‖·√s_max·U)."""

    def __init__(self, module, operator, bias, terms: int, adjoint_terms: int, proven: bool):
        from lipkern.bounds.operators import LinearMap

        self.module = module
        self.affine = _Affine(None, operator, bias, terms, lip=math.inf)  # ‖W‖ itself is not needed
        self.adjoint_terms = adjoint_terms
        self.scale = module.scale.detach().to(torch.float64)
        if not bool(torch.isfinite(self.scale).all()) or bool((self.scale < 0).any()):
            raise ValueError(f"RoundingAnalysis: {type(module).__name__} has a negative or non-finite scale")
        self.s_max = float(self.scale.max()) if self.scale.numel() else 0.0
        root = self.scale.sqrt().reshape(-1, *([1] * (operator.weight.dim() - 1)))
        if proven:
            self.scaled_norm = _inflate(math.sqrt(2.0), 2)
        else:
            weight = root * operator.weight.to(torch.float64)  # each entry within (2u + u²) of the exact
            scaled = LinearMap(operator.kind, weight, operator.in_shape, operator.out_shape, operator.geometry)
            slack = 3 * _U64 * abs_norm_upper(scaled)  # |ΔA| ≤ 3u·|A| entrywise, so ‖ΔA‖ ≤ 3u‖|A|‖
            self.scaled_norm = _inflate(float(scaled.upper_bound()) + slack, 4)
        self.lip = 1.0 if proven else max(1.0, _inflate(self.scaled_norm ** 2, 2) - 1.0)

    def underflow_count(self) -> float:
        first = self.affine.row_sum + self.affine.terms + 2
        # flushed r' = s ⊙ relu(p) or adjoint operands cost |Wᵀ|'s column sum each
        return (first * (1 + self.s_max * self.affine.col_sum) + self.adjoint_terms + self.s_max + 4
                + self.affine.col_sum * (2 + self.s_max))

    def _norms(self, g):
        hidden_shape = (-1, *([1] * (g.dim() - 2)))
        g64 = gamma(self.affine.terms, PRECISIONS["float64"])
        rho_w = self.affine.magnitude(g)
        pre = self.affine.operator.forward(g)
        if self.affine.abs_bias is not None:
            pre = pre + self.module.bias.detach().reshape(hidden_shape)
        relu = pre.clamp_min(0)  # within γ64·(|W||g| + |b|) of the exact one
        s = self.scale.reshape(hidden_shape)
        root_s_max = math.sqrt(self.s_max)
        scaled_relu = _inflate(_norm(s.sqrt() * relu), 4) + root_s_max * g64 * rho_w
        rho_v = (_inflate(_norm(self.affine.abs_operator.adjoint(s * relu)), self.adjoint_terms + 2)
                 + self.affine.abs_norm * self.s_max * g64 * rho_w)
        return rho_w, scaled_relu, rho_v, _norm(g.abs())

    def _terms(self, norms, precision: Precision):
        rho_w, scaled_relu, rho_v, g_norm = norms
        a, m, u = gamma(self.affine.terms, precision), gamma(self.adjoint_terms, precision), precision.unit
        big_u, width, s_max = self.scaled_norm, self.affine.abs_norm, self.s_max
        root = math.sqrt(s_max) * (1 + 2 * u)
        inner = s_max * (1 + u) * a * rho_w + u * root * scaled_relu
        error_v = big_u * (root * (1 + u) * a * rho_w + u * scaled_relu) + m * (rho_v + width * inner)
        center = (1 + u) * error_v + u * (g_norm + big_u * scaled_relu)
        growth_inner = s_max * (1 + u) * a * width + u * root * big_u
        growth_v = big_u * (root * (1 + u) * a * width + u * big_u) + m * (width * root * big_u + width * growth_inner)
        spread = (1 + u) * growth_v + u * (1 + big_u * big_u)
        return _inflate(center, 16), _inflate(spread, 16)


class _Residual(_Step):
    """skip(h) + branch(h): both paths from the same state, then one rounded addition."""

    def __init__(self, module, branch: list, skip: list | None):
        self.module, self.branch, self.skip = module, branch, skip

    def apply(self, state, precision):
        b = _run(self.branch, state, precision)
        s = state if self.skip is None else _run(self.skip, state, precision)
        g = s.g + b.g
        u = precision.unit if precision is not None else 0.0
        g_norm = _norm(g.abs())
        absolute = self.absolute(precision)  # a flushed (subnormal) sum
        # |fl(a + b) − (a + b)| ≤ u|a + b| ≤ 2u|fl(a + b)|
        e64 = _inflate(s.e64 + b.e64 + 2 * _U64 * g_norm + absolute[0], 4)
        m = _inflate(s.m + b.m, 1)
        spread = s.e64 + b.e64 + s.p + b.p  # deployed sum at the center: within these of g
        p = _inflate(s.p + b.p + u * (g_norm + spread) + absolute[1], 8)
        q = _inflate(s.q + b.q + u * (m + s.q + b.q), 8)
        return _State(g, e64, p, q, m)


def _run(steps: list, state: _State, precision) -> _State:
    for step in steps:
        state = step.apply(state, precision)
    return state


# ----------------------------------------------------------------------------------------------------------
# Registries: module types declare their rules next to their own code (lipkern.nn, lipkern.models).
# ----------------------------------------------------------------------------------------------------------
_RULES = TypeRegistry("register_rounding_rule")  # frozen module type -> rule(analysis, module, shape) -> (steps, shape)
_PROOFS = TypeRegistry("register_lipschitz_proof")  # layer type -> proof(layer) -> OneLipschitz | None


class OneLipschitz(NamedTuple):
    """A layer 1-Lipschitz by proof: at every input size (``input_size`` None) or at this one (H, W)."""

    input_size: tuple | None = None


def register_rounding_rule(*classes: type, replace: bool = False, helpers: tuple[str, ...] = ()):
    """Decorator: ``rule(analysis, module, shape) -> (steps, output shape)`` analyzes the floating-point
    evaluation of a module of ``classes`` (in the frozen network :func:`lipkern.models.to_vanilla` makes),
    with the helpers of :class:`RoundingAnalysis` (``exact``, ``diagonal``, ``residual_layer``, ``parse``,
    ``sequence``, ``residual``). ``replace`` / ``helpers``: as for :func:`lipkern.bounds.register_bound_rule`."""
    return _RULES.register(*classes, replace=replace, helpers=helpers)


def register_lipschitz_proof(*classes: type, replace: bool = False, helpers: tuple[str, ...] = ()):
    """Decorator: ``proof(layer) -> OneLipschitz | None`` says whether a layer of ``classes`` is 1-Lipschitz by
    proof (its constant is then 1 in the analysis, not computed again). ``helpers``: the methods its forward
    and its proof rely on (a subclass overriding one gets no proof)."""
    return _PROOFS.register(*classes, replace=replace, helpers=helpers)


def _proven_layers(model: nn.Module, frozen: nn.Module) -> dict[int, tuple | None]:
    """id of each frozen module that replaces a layer 1-Lipschitz by proof -> the input size (H, W) the proof
    is for (None: any size), from the layers' registered proofs."""
    frozen_modules = dict(frozen.named_modules())
    proven = {}
    for name, module in model.named_modules():
        proof = _PROOFS.rule_for(module)
        claim = None if proof is None or name not in frozen_modules else proof(module)
        if claim is not None:
            proven[id(frozen_modules[name])] = claim.input_size
    return proven


class RoundingAnalysis:
    """The evaluation-error bounds of a network (module docstring), prepared once for inputs of
    ``input_shape`` (without the batch dim): ``analysis(x)`` gives the :class:`EvaluationError` of a batch.

    model: any model :func:`lipkern.models.to_vanilla` freezes into nn.Sequential (nested), ConvNet / CPLNet
    / LipLTNet, Residual, nn.Linear, nn.Conv2d ('zeros' / 'circular'), PlainCPLLinear / PlainCPLConv2d,
    PlainSLLLinear / PlainSLLConv2d,
    nn.BatchNorm1d/2d (eval), Normalize, nn.AvgPool2d, nn.MaxPool2d, ReLU, LeakyReLU, MaxMin, channel
    selections, PixelUnshuffle, PixelShuffle, Flatten, Unflatten, Identity; anything else raises a TypeError
    naming it. precision: 'float32', 'tf32', 'float64' (the deployed evaluation), or None (bound only the
    float64 evaluation against the real-arithmetic network)."""

    def __init__(self, model: nn.Module, input_shape, precision: str | None = "float32", device=None):
        from lipkern.models import to_vanilla

        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"RoundingAnalysis: precision must be one of {', '.join(PRECISIONS)} or None, got "
                             f"{precision!r}")
        self.precision = None if precision is None else PRECISIONS[precision]
        frozen = to_vanilla(model)
        if device is not None:
            frozen = frozen.to(device)
        self.model = frozen.to(torch.float64)  # exact: every float32 / float16 value is a float64 value
        self._refuse_subnormal_parameters()
        self.proven = _proven_layers(model, self.model)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.steps, self.output_shape = self._parse(self.model, self.input_shape)

    def __call__(self, x: torch.Tensor) -> EvaluationError:
        g = x.detach().to(torch.float64, copy=True)  # a copy: nothing in the network writes into the caller's x
        if g.shape[1:] != self.input_shape:
            raise ValueError(f"RoundingAnalysis: prepared for inputs {self.input_shape}, got {tuple(g.shape[1:])}")
        zero = torch.zeros(g.shape[0], dtype=torch.float64, device=g.device)
        # classical float64 convolutions: cuDNN may pick FFT / Winograd algorithms, outside the error model
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=False):
            state = _run(self.steps, _State(g, zero, zero, 0.0, 1.0), self.precision)
        return EvaluationError(state.g, state.e64, state.p, state.q)

    def _refuse_subnormal_parameters(self) -> None:
        """A weight below the smallest normal number of the deployed precision may be flushed to zero there
        (an error relative to the activation it multiplies, outside the error model): refused."""
        name = "float64" if self.precision is None else self.precision.name
        smallest = _SMALLEST_NORMAL[name]
        for label, t in (*self.model.named_parameters(), *self.model.named_buffers()):
            if t.is_floating_point() and bool(((t != 0) & (t.abs() < smallest)).any()):
                raise ValueError(f"RoundingAnalysis: {label} has entries below {smallest:.3g} (subnormal in {name}: "
                                 "a kernel may flush them to zero); set them to zero to certify this network")

    # -- parsing the frozen network ------------------------------------------------------------------------
    def _shape_after(self, module, shape) -> tuple[int, ...]:
        with torch.no_grad():
            out = module(torch.zeros(2, *shape, dtype=torch.float64, device=self._device()))
        return tuple(out.shape[1:])

    def _device(self):
        for t in (*self.model.parameters(), *self.model.buffers()):
            return t.device
        return torch.device("cpu")

    def _parse(self, module, shape) -> tuple[list, tuple]:
        from lipkern.bounds.parsing import reject_hooks

        reject_hooks(module, f"RoundingAnalysis: {type(module).__name__}")
        rule = _RULES.rule_for(module)
        if rule is None:
            raise TypeError(f"RoundingAnalysis: the floating-point error of {type(module).__name__} is not "
                            f"analyzed (supported, in the network lipkern.models.to_vanilla exports, which turns "
                            f"lipkern's AOL / Spectral / CPL / SLL layers into plain ones: {_RULES.names()}); "
                            "certify with evaluation=None to leave the logits' rounding unbounded, or "
                            "evaluation='exact' for the real-arithmetic network of supported layers")
        return rule(self, module, shape)

    # -- helpers of the rules ------------------------------------------------------------------------------
    def parse(self, module, shape) -> tuple[list, tuple]:
        return self._parse(module, shape)

    def sequence(self, modules, shape) -> tuple[list, tuple]:
        steps = []
        for child in modules:
            new, shape = self._parse(child, shape)
            steps += new
        return steps, shape

    def layer(self, module, shape, build) -> tuple[list, tuple]:
        """One step ``build(output shape)`` with its underflow terms."""
        out = self._shape_after(module, shape)
        step = build(out)
        step.operations = _inflate(step.underflow_count() * math.sqrt(math.prod(out)), 2)
        return [step], out

    def exact(self, module, shape, lip: float = 1.0) -> tuple[list, tuple]:
        """Copies, comparisons, reshapes, permutations: no rounding, Lipschitz ``lip``."""
        return self.layer(module, shape, lambda out: _Exact(module, lip))

    def diagonal(self, module, shape, scale, shift, bias, roundings: int) -> tuple[list, tuple]:
        """(h − shift)·scale + bias per channel, ``roundings`` roundings of ≤ 1.5 ulp each."""
        return self.layer(module, shape, lambda out: _Diagonal(module, scale, shift, bias, roundings))

    def residual_layer(self, module, shape, kind: str) -> tuple[list, tuple]:
        """An exported CPL (``kind`` 'cpl') or SLL ('sll') layer h − Wᵀ(…relu(W h + b))."""
        step = {"cpl": _PlainCPL, "sll": _PlainSLL}[kind]
        operator = plain_layer_operator(module, shape)
        return self.layer(module, shape, lambda out: step(
            module, operator, module.bias, operator.accumulation_length() + 1,
            operator.adjoint_accumulation_length() + 1, self._lip(module, shape) is not None))

    def affine(self, module, shape, operator, bias, terms: int, lip: float | None = None) -> tuple[list, tuple]:
        """x ↦ operator·x + bias with dot products of ``terms`` roundings per output."""
        return self.layer(module, shape, lambda out: _Affine(module, operator, bias, terms, lip))

    def residual(self, module, branch, skip, shape) -> tuple[list, tuple]:
        """skip(h) + branch(h) (skip None: the identity)."""
        from lipkern.bounds.parsing import inplace_modules

        inplace = [type(m).__name__ for m in inplace_modules(module)]
        if inplace:
            raise ValueError(f"RoundingAnalysis: a Residual block contains in-place modules ({', '.join(inplace)}"
                             "); use inplace=False inside residual blocks")
        branch_steps, out = self._parse(branch, shape)
        skip_steps, skip_out = (None, shape) if skip is None else self._parse(skip, shape)
        if tuple(skip_out) != tuple(out):
            raise ValueError(f"RoundingAnalysis: a Residual block's branch gives {tuple(out)}, its skip "
                             f"{tuple(skip_out)} (broadcasting them is not analyzed)")
        step = _Residual(module, branch_steps, skip_steps)
        step.operations = math.sqrt(math.prod(out))  # the sum, if flushed
        return [step], out

    def _lip(self, module, shape) -> float | None:
        """1 for a layer 1-Lipschitz by proof AT THIS INPUT SIZE (a certified conv's proof is for its own
        input_size), else None (computed)."""
        if id(module) not in self.proven:
            return None
        size = self.proven[id(module)]
        return 1.0 if size is None or tuple(shape[1:]) == tuple(size) else None


# ----------------------------------------------------------------------------------------------------------
# Rules of torch's modules.
# ----------------------------------------------------------------------------------------------------------
@register_rounding_rule(nn.Sequential)
def _sequential_rule(analysis: RoundingAnalysis, module, shape):
    return analysis.sequence(list(module), shape)


@register_rounding_rule(nn.ReLU, nn.Flatten, nn.Unflatten, nn.Identity, nn.PixelUnshuffle, nn.PixelShuffle)
def _exact_rule(analysis: RoundingAnalysis, module, shape):
    return analysis.exact(module, shape)


@register_rounding_rule(nn.MaxPool2d)
def _max_pool_rule(analysis: RoundingAnalysis, module, shape):
    """Exact; Lipschitz √(the most windows covering one pixel)."""
    def build(out):
        covering = 1
        for k, s, d, o in zip(_pair(module.kernel_size), _pair(module.stride or module.kernel_size),
                              _pair(module.dilation), out[-2:]):
            covering *= min(k, -(-((k - 1) * d + 1) // s), o)
        return _Exact(module, _inflate(math.sqrt(covering), 1))
    return analysis.layer(module, shape, build)


@register_rounding_rule(nn.LeakyReLU)
def _leaky_relu_rule(analysis: RoundingAnalysis, module, shape):
    return analysis.layer(module, shape, lambda out: _LeakyReLU(module))


@register_rounding_rule(nn.Linear)
def _linear_rule(analysis: RoundingAnalysis, module, shape):
    operator = LinearMap.dense(module.weight.detach(), shape)
    return analysis.affine(module, shape, operator, module.bias, operator.accumulation_length() + 1,
                           analysis._lip(module, shape))


@register_rounding_rule(nn.Conv2d, helpers=("_conv_forward",))
def _conv_rule(analysis: RoundingAnalysis, module, shape):
    if module.padding_mode not in ("zeros", "circular"):
        raise TypeError(f"RoundingAnalysis: Conv2d with padding_mode={module.padding_mode!r} is not analyzed")
    operator = LinearMap.conv2d(module.weight.detach(), shape, module.stride, module.padding, module.dilation,
                                module.groups, module.padding_mode)
    return analysis.affine(module, shape, operator, module.bias, operator.accumulation_length() + 1,
                           analysis._lip(module, shape))


@register_rounding_rule(nn.AvgPool2d)
def _avg_pool_rule(analysis: RoundingAnalysis, module, shape):
    kernel = _pair(module.kernel_size)
    if module.ceil_mode or (any(_pair(module.padding)) and not module.count_include_pad):
        raise TypeError("RoundingAnalysis: AvgPool2d with ceil_mode or count_include_pad=False is not analyzed")
    divisor = module.divisor_override or kernel[0] * kernel[1]
    weight = torch.full((shape[0], 1, *kernel), 1.0 / divisor, dtype=torch.float64, device=analysis._device())
    operator = LinearMap.conv2d(weight, shape, _pair(module.stride or module.kernel_size), _pair(module.padding), 1,
                                shape[0])
    # the sum of k² terms, then a division (or a product by 1/k²: one more rounding)
    return analysis.affine(module, shape, operator, None, kernel[0] * kernel[1] + 2)


@register_rounding_rule(nn.BatchNorm1d, nn.BatchNorm2d)
def _batch_norm_rule(analysis: RoundingAnalysis, module, shape):
    if module.running_var is None or module.training:
        raise TypeError("RoundingAnalysis: BatchNorm needs running statistics and eval mode")
    scale = torch.rsqrt(module.running_var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    return analysis.diagonal(module, shape, scale, module.running_mean, module.bias, 12)  # ≤ 8 roundings, ≤ 1.5 ulp
