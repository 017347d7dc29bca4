"""Norms of sub-networks A_k ⋯ A_j of a chain of linear maps: guaranteed bounds and exact head norms.

LipLT (papers.md §1) needs ‖A_k ⋯ A_j‖₂ for all O(K²) sub-chains. Two functions:

- :func:`chain_upper_bounds`: a (K, K) float64 matrix of GUARANTEED upper bounds (floating-point rounding of
  every step included) of the norms of the exact real-arithmetic operators (the weights as stored).
- :func:`head_chain_norms`: the norms of the chains that end at the last map (C = its out_features, small:
  the logits), exactly from C×C Gram matrices: a guaranteed bound (``sound=True``) or a differentiable value.

**Rounding model.** float64, round to nearest, gradual underflow: every product of two numbers errs by
≤ u·|result| + η (u = 2⁻⁵³, η = 2⁻¹⁰⁷⁵), every sum by ≤ u·|result|. A dot product of n terms computed in ANY
order (blocked, pairwise, FMA) satisfies |fl(xᵀy) − xᵀy| ≤ γ_n·|x|ᵀ|y| + n·2⁻¹⁰⁷⁴ with γ_n = nu/(1 − nu)
(Higham 2002, §3.1; terms that are exact zeros — zero padding, the holes of a strided transpose — add
nothing). n is the most nonzero products summed into one output entry: :meth:`LinearMap.accumulation_length`
for the forward map, ``LinearMap.adjoint_accumulation_length`` for the adjoint. This assumes a classical convolution/GEMM
(im2col + GEMM, direct loops), which is what PyTorch runs for float64 on the CPU; on CUDA, cuDNN is disabled
during the sweeps (no FFT/Winograd algorithms) and cuBLAS's DGEMM is classical. Emulated FP64 GEMMs (opt-in
on some GPUs) are not covered.

**Sweep error (a posteriori).** A sweep pushes a basis through maps t = j, j+1, … (or adjoints downward):
X̂_{t+1} = fl(A_t X̂_t) = A_t X̂_t + Δ_t with |Δ_t| ≤ γ_{n_t}·|A_t|·|X̂_t| + μ_t entrywise (X̂_t the COMPUTED
input), μ_t = n_t·2⁻¹⁰⁷⁴. Unrolling, X̂_{k+1} − A_k⋯A_j = Σ_{t=j..k} (A_k⋯A_{t+1})·Δ_t, hence

    ‖Â_{k..j} − A_{k..j}‖₂ ≤ Σ_t U[t+1, k]·δ_t,    δ_t = γ_{n_t}·‖|A_t|‖₂·‖X̂_t‖_F + μ_t·√(rows·cols)

(‖Δ‖₂ ≤ ‖Δ‖_F ≤ γ‖|A||X̂|‖_F + μ·√(entries) ≤ γ‖|A|‖₂‖X̂‖_F + …; ‖|A_t|‖₂ from
:func:`lipkern.bounds.operators.abs_norm_upper`, ‖X̂_t‖_F² a computed sum of squares divided by 1 − γ). For
the identity basis ‖X̂_t‖_F ≤ √(rows)·‖A_{t−1}⋯A_j‖₂, so δ_t is ~1e-13 of the norm at these sizes. U[t+1, k]
bounds a SHORTER chain (U of the empty chain is 1), so chains are resolved by increasing length. Unlike an
a-priori bound through the |A_k|⋯|A_j| chain, the factors do not compound over the chain's length.

Scalars are combined in Python floats rounded upward (math.nextafter after each operation); tensors of
nonnegative values are multiplied by safety factors that exceed their few roundings.
"""

from __future__ import annotations

import math

import torch

from lipkern._checks import as_int
from lipkern._rounding import add_up as _add
from lipkern._rounding import div_up as _div
from lipkern._rounding import gamma_up as _gamma
from lipkern._rounding import one_minus_gamma_down as _one_minus_gamma
from lipkern._rounding import mul_up as _mul
from lipkern._rounding import sqrt_up as _sqrt
from lipkern._rounding import up as _up
from lipkern.bounds.certificate import certified_square_bound, cholesky_certificate
from lipkern.bounds.gram import gram_upper_bound
from lipkern.bounds.operators import LinearMap, abs_norm_upper
from lipkern.bounds.probing import DEFAULT_GRAM_LIMIT, _sum_squares_upper, gram_chains, gram_costs
from lipkern.ops.power_iteration import times_power_of_two

__all__ = ["DEFAULT_DENSE_LIMIT", "MAX_HEAD_CLASSES", "chain_upper_bounds", "head_chain_norms"]

DEFAULT_DENSE_LIMIT = 2**22  # entries of an explicit chain matrix (32 MiB in float64)
GRAM_CHAIN_FLOPS = {"cpu": 1e12, "cuda": 1e14}  # the most work of one chain's Gram certificate (sweeps + Cholesky)
MAX_HEAD_CLASSES = 1024
_U = 2.0**-53
_ETA = 2.0**-1074  # the smallest subnormal: twice the absolute rounding of a product in the subnormal range
_BATCH_ELEMENTS = 2**22  # basis vectors per batch × the widest feature count of a sweep
_SQUARINGS = 48  # normalized squarings of the C×C Gram in the differentiable λ_max



def _nan_max(a: float, b: float) -> float:
    """max with NaN (an overflowed intermediate) read as inf."""
    return math.inf if math.isnan(a) or math.isnan(b) else max(a, b)


# ----------------------------------------------------------------------------------------------------------
# Input checks and accumulation lengths.
# ----------------------------------------------------------------------------------------------------------
def _check_maps(maps, name: str, check_values: bool) -> list[LinearMap]:
    if not isinstance(maps, (list, tuple)) or len(maps) == 0:
        raise ValueError(f"{name}: maps must be a non-empty list of LinearMap, got {maps!r}")
    for i, m in enumerate(maps):
        if not isinstance(m, LinearMap):
            raise TypeError(f"{name}: maps[{i}] is a {type(m).__name__}, not a LinearMap")
        if not m.weight.is_floating_point():
            raise TypeError(f"{name}: maps[{i}] has a {m.weight.dtype} weight (floating point needed)")
        if m.weight.device != maps[0].weight.device:
            raise ValueError(f"{name}: maps[{i}] is on {m.weight.device}, maps[0] on {maps[0].weight.device}")
    for i in range(len(maps) - 1):
        if maps[i].out_features != maps[i + 1].in_features:
            raise ValueError(f"{name}: maps[{i}] gives {maps[i].out_features} features ({maps[i].out_shape}), "
                             f"maps[{i + 1}] takes {maps[i + 1].in_features} ({maps[i + 1].in_shape})")
    if check_values:
        for i, m in enumerate(maps):
            if not torch.isfinite(m.weight).all():
                raise ValueError(f"{name}: maps[{i}] has NaN or Inf weights")
    return list(maps)


def abs_line_sums(m: LinearMap) -> tuple[float, float]:
    """Guaranteed upper bounds of the largest row sum and column sum of |A| (‖A‖_∞-like and ‖A‖₁-like): |A|·𝟙
    and |A|ᵀ·𝟙 computed by the |W| map in float64 (nonnegative sums of n products: exact ≤ (computed +
    n·2⁻¹⁰⁷⁴)/(1 − γ_n))."""
    w = m.weight.detach().to(torch.float64).abs()
    ones_in = torch.ones(1, m.in_features, dtype=torch.float64, device=w.device)
    ones_out = torch.ones(1, m.out_features, dtype=torch.float64, device=w.device)
    rows = _nan_max(0.0, m.forward(ones_in, w).max().item())
    cols = _nan_max(0.0, m.adjoint(ones_out, w).max().item())
    n_rows, n_cols = m.accumulation_length(), m.adjoint_accumulation_length()
    rows = _div(_add(rows, n_rows * _ETA), _one_minus_gamma(n_rows))
    cols = _div(_add(cols, n_cols * _ETA), _one_minus_gamma(n_cols))
    return rows, cols


def _absolute_norm_bound(m: LinearMap) -> float:
    """‖A‖₂ ≤ √(‖A‖₁‖A‖_∞) (guaranteed, cheap, loose)."""
    rows, cols = abs_line_sums(m)
    return _mul(_sqrt(rows), _sqrt(cols))


def _cudnn_off(device: torch.device):
    """Classical float64 convolutions only (cuDNN may pick FFT/Winograd algorithms); a no-op on the CPU."""
    return torch.backends.cudnn.flags(enabled=False)


# ----------------------------------------------------------------------------------------------------------
# A guaranteed norm of an explicit float64 matrix (Cholesky certificate, Gram iteration as the fallback).
# ----------------------------------------------------------------------------------------------------------
def _norm_estimate(mat: torch.Tensor) -> float:
    """σ̂ ≈ ‖M‖₂ (an estimate: the certificate decides): λ_max of the small Gram side when that has ≤ 1024
    rows (eigvalsh, accurate to ~u·σ²), else Lanczos bidiagonalization."""
    from lipkern.bounds.spectral import _lanczos_top

    if min(mat.shape) <= 1024:
        small = mat @ mat.T if mat.shape[0] <= mat.shape[1] else mat.T @ mat
        return torch.linalg.eigvalsh(small)[-1].clamp_min(0.0).sqrt().item()

    u0 = torch.ones(mat.shape[1], dtype=mat.dtype, device=mat.device)
    u0 = u0 + torch.arange(mat.shape[1], dtype=mat.dtype, device=mat.device).sin()  # generic start
    u, _ = _lanczos_top(lambda x: mat @ x, lambda y: mat.T @ y, u0, 400, 1e-13)
    return (torch.linalg.vector_norm(mat @ u) / torch.linalg.vector_norm(u)).item()


def matrix_norm_upper(mat: torch.Tensor) -> float:
    """A guaranteed upper bound (Python float) of ‖M‖₂ for an explicit float64 matrix (m, n).

    M is scaled by a power of two (largest entry in [0.5, 1); exact except entries 2¹⁰²² times smaller than
    the largest, which may become subnormal: ≤ √(mn)·2⁻¹⁰⁷⁴ in norm, added). σ̂ an estimate (:func:`_norm_estimate`),
    then the Cholesky certificate of ((1+ρ)σ̂)²I − MᵀM ⪰ 0 (:mod:`lipkern.bounds.certificate`, its theorem
    gives the bound) for ρ = 1e-12, 1e-10, …; if none succeeds, Gram iteration (:func:`gram_upper_bound`)."""
    if mat.numel() == 0:
        return 0.0
    largest = mat.abs().max().item()
    if not math.isfinite(largest):
        return math.inf
    if largest == 0.0:
        return 0.0
    exponent = math.frexp(largest)[1]
    scaled = times_power_of_two(mat, torch.tensor(-exponent, device=mat.device))
    rows, cols = scaled.shape
    slack = math.sqrt(rows * cols) * _ETA
    sigma = _norm_estimate(scaled)
    bound = math.inf
    for rho in (1e-12, 1e-10, 1e-8, 1e-6, 1e-4):
        lam0 = ((1 + rho) * sigma) ** 2
        if not 2.0**-1000 <= lam0 <= 2.0**100:
            break
        if cholesky_certificate(scaled[None], torch.tensor(lam0, dtype=torch.float64)).item():
            square = certified_square_bound(torch.tensor(lam0, dtype=torch.float64), rows, cols).item()
            bound = _sqrt(_up(square))
            break
    if not math.isfinite(bound):
        bound = gram_upper_bound(scaled[None], rtol=1e-7, lower=sigma).item()
    return math.nextafter(math.ldexp(_add(bound, slack), exponent), math.inf)  # subnormal results round


# ----------------------------------------------------------------------------------------------------------
# Sweeps: push a basis through consecutive maps, keep the requested explicit matrices and the error terms.
# ----------------------------------------------------------------------------------------------------------
class _Sweep:
    """Result of one sweep. ``deltas[t]``: bound on ‖Δ_t‖₂ of the step through map t; ``matrices[t]``: the
    computed (basis, features) matrix after map t (the transpose of the chain for a forward sweep)."""

    def __init__(self):
        self.deltas: dict[int, float] = {}
        self.matrices: dict[int, torch.Tensor] = {}


class _AbsNorms(dict):
    """{t: ‖|A_t|‖₂ bound} of one chain, each computed once, on first use (every sweep and Gram shares them)."""

    def __init__(self, maps: list[LinearMap]):
        super().__init__()
        self.maps = maps

    def __missing__(self, t: int) -> float:
        self[t] = value = abs_norm_upper(self.maps[t])
        return value


def _sweep(maps: list[LinearMap], start: int, stop: int, forward: bool, keep: set[int],
           abs_norms: dict | None = None) -> _Sweep:
    """Push the identity basis of map ``start``'s input (forward) or output (adjoint) through maps
    start..stop (forward: increasing; adjoint: decreasing), in float64 (channels-last for conv inputs).
    Returns the error terms δ_t of every step and the matrices after the steps in ``keep``."""
    abs_norms = _AbsNorms(maps) if abs_norms is None else abs_norms
    step = 1 if forward else -1
    order = list(range(start, stop + step, step))
    device = maps[start].weight.device
    w64 = {t: maps[t].weight.detach().to(torch.float64) for t in order}
    first = maps[start].in_features if forward else maps[start].out_features
    first_shape = maps[start].in_shape if forward else maps[start].out_shape
    count = first
    widest = max([first] + [maps[t].out_features if forward else maps[t].in_features for t in order])
    batch = max(1, min(count, _BATCH_ELEMENTS // widest))
    out_features = {t: maps[t].out_features if forward else maps[t].in_features for t in order}
    squares = dict.fromkeys(order, 0.0)  # ≥ ‖X̂_t‖_F², X̂_t the computed input of step t
    kept = {t: [] for t in order if t in keep}
    for lo in range(0, count, batch):
        hi = min(count, lo + batch)
        x = torch.zeros(hi - lo, first, dtype=torch.float64, device=device)
        x[torch.arange(hi - lo, device=device), torch.arange(lo, hi, device=device)] = 1.0
        x = x.view(hi - lo, *first_shape)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)  # faster float64 transposed convs on the CPU
        for t in order:
            m = maps[t]
            squares[t] = _add(squares[t], _sum_squares_upper(x))
            x = (m.forward if forward else m.adjoint)(x, w64[t])
            if t in kept:
                kept[t].append(x.reshape(hi - lo, -1))
    result = _Sweep()
    for t in order:
        n = maps[t].accumulation_length() if forward else maps[t].adjoint_accumulation_length()
        mu = n * _ETA
        # ‖Δ_t‖₂ ≤ ‖Δ_t‖_F ≤ γ_n·‖|A_t|‖₂·‖X̂_t‖_F + μ·√(entries)
        result.deltas[t] = _add(_mul(_mul(_gamma(n), abs_norms[t]), _sqrt(squares[t])),
                                _mul(mu, _sqrt(float(count) * out_features[t])))
        if t in kept:
            result.matrices[t] = torch.cat(kept[t])
    return result


# ----------------------------------------------------------------------------------------------------------
# Sub-chain bounds.
# ----------------------------------------------------------------------------------------------------------
def _zero_chains(maps: list[LinearMap]) -> set:
    """The chains (j, k) whose operator is exactly zero: every product path from an input entry to an output entry
    meets a zero weight or padding (a chain that only reads padding). Found by pushing ones through the chain's
    0/1 weight pattern: the entries are sums of products of non-negative integers, so an
    output is 0 only if every path is blocked; any algorithm's rounding of such sums stays far below ½. Rounding
    errors of the float chain never reach such an output either, which the Gram path's error terms cannot see."""
    zero = set()
    for j in range(len(maps)):
        x = torch.ones(1, *maps[j].in_shape, dtype=torch.float64, device=maps[j].weight.device)
        for k in range(j, len(maps)):
            pattern = (maps[k].weight != 0).to(torch.float64)
            x = maps[k].forward(x, pattern)
            # (NaN, from counts that overflowed: nonzero; one host read per sub-chain, at certification time)
            if not bool(((x.abs() >= 0.5) | x.isnan()).any()):
                zero.update((j, t) for t in range(k, len(maps)))
                break
    return zero


def chain_upper_bounds(maps: list[LinearMap], *, dense_limit: int = DEFAULT_DENSE_LIMIT,
                       gram_limit: int = DEFAULT_GRAM_LIMIT) -> torch.Tensor:
    """U (K, K) float64: U[j, k] ≥ ‖A_k ⋯ A_j‖₂ for j ≤ k (GUARANTEED, rounding included); U[j, k] = 0 for j > k.

    maps: K :class:`LinearMap` in application order (maps[i+1] takes maps[i]'s output). Not differentiable;
    reads values on the host. Each U[j, k] is the smallest of
    (a) single maps: ``maps[i].upper_bound()`` (the layer certificates of :mod:`lipkern.bounds.spectral`),
        used where the explicit matrix of the map is too large;
    (b) where in_features_j·out_features_k ≤ ``dense_limit``: the explicit chain matrix Â, computed in float64
        by pushing the identity basis of the smaller side through the chain (forward maps from j, or adjoints
        from k, in batches; one sweep serves every chain with the same start/end), bounded by
        :func:`matrix_norm_upper` (Cholesky certificate) plus the sweep error Σ_t U[t+1, k]·δ_t of the module
        docstring (the adjoint sweep: Σ_t U[j, t−1]·δ_t). Tight: the error terms are ~1e-12 relative;
    (b') chains too large for (b) whose Gram certificate on the smaller side stores ≤ ``gram_limit`` entries (s²,
        or the band of a local Gram) and costs ≤ ``GRAM_CHAIN_FLOPS`` on the device: the certified Gram matrix
        of that side, formed by probing (:mod:`lipkern.bounds.probing`; for zero-padded conv chains, a few probes
        per channel instead of s), error terms of the same kind;
    (c) splits: min_m U[j, m]·U[m+1, k] (submultiplicativity), which contains the product ∏ u_i of (a).
    Products and sums of bounds are rounded upward. Chains too large for (b) and (b') get only (c): sound,
    looser (the product of norms of the parts). ``dense_limit=0`` / ``gram_limit=0`` disable (b) / (b').
    The cost of (b) is min(in, out) basis vectors through the chain and one Gram product; of
    (b'), the probes through the chain and back, and a Cholesky of side s (dense: s³/3 flops, 2·s² floats; a
    local Gram on the CPU: its band of pixel rows).
    """
    maps = _check_maps(maps, "chain_upper_bounds", check_values=True)
    dense_limit = as_int(dense_limit, "chain_upper_bounds: dense_limit", minimum=0)
    gram_limit = as_int(gram_limit, "chain_upper_bounds: gram_limit", minimum=0)
    k_count = len(maps)
    with torch.no_grad(), _cudnn_off(maps[0].weight.device):
        abs_norms = _AbsNorms(maps)
        dense, errors = _dense_chains(maps, dense_limit, abs_norms)
        grams = _gram_chains(maps, dense, gram_limit, abs_norms)
        zero = _zero_chains(maps)
        bounds = [[math.inf] * k_count for _ in range(k_count)]

        def norm(j: int, k: int) -> float:
            return 1.0 if j > k else bounds[j][k]

        for length in range(1, k_count + 1):
            for j in range(0, k_count - length + 1):
                k = j + length - 1
                if (j, k) in zero:  # exactly the zero operator (no path from an input to an output)
                    bounds[j][k] = 0.0
                    continue
                best = math.inf
                if (j, k) in dense:
                    # errors[(j, k)]: (factor chain (a, b), δ) pairs; the chains are shorter: already final
                    best = _add(dense[(j, k)], *[_mul(norm(a, b), delta) for a, b, delta in errors[(j, k)]])
                if (j, k) in grams:
                    gram = grams[(j, k)]
                    e1 = _add(0.0, *[_mul(norm(a, b), phi) for a, b, phi in gram.first])
                    e2 = _add(0.0, *[_mul(norm(a, b), phi) for a, b, phi in gram.second])
                    best = min(best, gram.norm_bound(e1, e2))
                for m in range(j, k):
                    best = min(best, _mul(bounds[j][m], bounds[m + 1][k]))
                if length == 1 and not math.isfinite(best):
                    best = maps[j].upper_bound().item()
                bounds[j][k] = best
    out = torch.zeros(k_count, k_count, dtype=torch.float64)
    for j in range(k_count):
        for k in range(j, k_count):
            out[j, k] = bounds[j][k]
    return out.to(maps[0].weight.device)


def _dense_chains(maps: list[LinearMap], dense_limit: int, abs_norms: dict | None = None):
    """Explicit chains within ``dense_limit``: {(j, k): ‖Â‖ bound}, {(j, k): [(a, b, δ)]} with the error
    ‖Â − A_{k..j}‖ ≤ Σ U[a, b]·δ over the listed pairs (U of an empty chain a > b is 1)."""
    k_count = len(maps)
    forward_from: dict[int, set[int]] = {}
    adjoint_from: dict[int, set[int]] = {}
    for j in range(k_count):
        for k in range(j, k_count):
            n_in, n_out = maps[j].in_features, maps[k].out_features
            if n_in * n_out > dense_limit:
                continue
            if n_in <= n_out:
                forward_from.setdefault(j, set()).add(k)
            else:
                adjoint_from.setdefault(k, set()).add(j)
    dense: dict[tuple[int, int], float] = {}
    errors: dict[tuple[int, int], list] = {}
    for j, ends in forward_from.items():
        sweep = _sweep(maps, j, max(ends), True, ends, abs_norms)
        for k in ends:
            dense[(j, k)] = matrix_norm_upper(sweep.matrices.pop(k))
            errors[(j, k)] = [(t + 1, k, sweep.deltas[t]) for t in range(j, k + 1)]
    for k, starts in adjoint_from.items():
        sweep = _sweep(maps, k, min(starts), False, starts, abs_norms)
        for j in starts:
            bound = matrix_norm_upper(sweep.matrices.pop(j))
            if (j, k) not in dense or bound < dense[(j, k)]:
                dense[(j, k)] = bound
                errors[(j, k)] = [(j, t - 1, sweep.deltas[t]) for t in range(j, k + 1)]
    return dense, errors


def _gram_chains(maps: list[LinearMap], dense: dict, gram_limit: int, abs_norms: dict) -> dict:
    """{(j, k): GramChain} for the chains not in ``dense`` whose certificate on the smaller side stores at most
    ``gram_limit`` entries (:func:`lipkern.bounds.probing.gram_costs`: s² or the band of a local Gram) and cost
    at most GRAM_CHAIN_FLOPS on the maps' device (a time box: a minute or so per chain on a 2-core CPU)."""
    chains = {}
    for j in range(len(maps)):
        for k in range(j, len(maps)):
            side = "in" if maps[j].in_features <= maps[k].out_features else "out"
            if (j, k) in dense:
                continue
            entries, flops = gram_costs(maps[j:k + 1], side)
            if entries <= gram_limit and flops <= GRAM_CHAIN_FLOPS.get(maps[j].weight.device.type, math.inf):
                chains[(j, k)] = side
    return gram_chains(maps, chains, abs_norms)


# ----------------------------------------------------------------------------------------------------------
# Chains that end at the last map (the logits).
# ----------------------------------------------------------------------------------------------------------
def head_chain_norms(maps: list[LinearMap], pairwise: bool = False, sound: bool = True, *,
                     chain_bounds: torch.Tensor | None = None) -> torch.Tensor:
    """Norms of the chains A_K ⋯ A_j that end at the last map, for j = 0..K-1 (C = maps[-1].out_features).

    Returns r (K,) with r[j] = ‖A_K ⋯ A_j‖₂, or with ``pairwise=True`` (K, C, C) with
    r[j, a, b] = ‖(e_a − e_b)ᵀ A_K ⋯ A_j‖₂ (zero diagonal). One adjoint sweep of the C basis vectors from the
    last map down gives G_j = (A_K⋯A_j)ᵀ[e_1..e_C] (rows: C × in_features_j) for every j; ‖A_K⋯A_j‖₂² is the
    largest eigenvalue of the C×C Gram G_j G_jᵀ, the pairwise norms are ‖G_j[a] − G_j[b]‖₂ (explicit
    differences: no cancellation of the Gram form M_aa + M_bb − 2M_ab).

    sound=True: float64, no_grad, GUARANTEED upper bounds: ‖Ĝ_j‖₂ by :func:`matrix_norm_upper`, plus the sweep
    error e_j = Σ_t P[j, t−1]·δ_t (module docstring) with P[j, t−1] ≥ ‖A_{t−1}⋯A_j‖₂: ``chain_bounds[j, t−1]``
    when given (the U of :func:`chain_upper_bounds`, tightest), else ∏_{i=j}^{t−1} u_i with u_i the smaller of
    ``maps[i].upper_bound()`` and √(‖A_i‖₁‖A_i‖_∞) (the error term then grows with ∏u_i / ‖A_{t−1}⋯A_j‖);
    pairwise: ‖d̂‖₂ of the computed difference rows with its rounding, + √2·e_j.
    sound=False: differentiable in the weights, computed in their (promoted, at least float32) dtype, no host
    read: λ_max of the Gram by normalized repeated squaring (48 squarings, then the Rayleigh quotient with the
    converged projector held fixed: exact up to rounding, gradient v vᵀ for a simple top eigenvalue).
    C ≤ MAX_HEAD_CLASSES (1024): the sweep costs C passes through the network and keeps C × in_features_j
    per j, and the Gram/certificate work grows as C³ (use :func:`chain_upper_bounds` beyond).
    """
    maps = _check_maps(maps, "head_chain_norms", check_values=sound)
    classes = maps[-1].out_features
    if classes > MAX_HEAD_CLASSES:
        raise ValueError(f"head_chain_norms: the last map has {classes} outputs; the Gram approach is limited to "
                         f"{MAX_HEAD_CLASSES} (C passes through the network, C×C Gram matrices); use "
                         "chain_upper_bounds")
    if sound:
        if chain_bounds is not None and tuple(chain_bounds.shape) != (len(maps), len(maps)):
            raise ValueError(f"head_chain_norms: chain_bounds must be ({len(maps)}, {len(maps)}), got "
                             f"{tuple(chain_bounds.shape)}")
        if chain_bounds is not None and not bool(((chain_bounds >= 0) & ~chain_bounds.isnan()).all()):
            raise ValueError("head_chain_norms: chain_bounds must be upper bounds (>= 0, not NaN), as from "
                             "chain_upper_bounds")
        return _head_sound(maps, pairwise, chain_bounds)
    return _head_differentiable(maps, pairwise)


def _pairs(classes: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.triu_indices(classes, classes, 1, device=device).unbind(0)


def _head_sound(maps: list[LinearMap], pairwise: bool, chain_bounds: torch.Tensor | None) -> torch.Tensor:
    k_count, classes = len(maps), maps[-1].out_features
    device = maps[0].weight.device
    with torch.no_grad(), _cudnn_off(device):
        sweep = _sweep(maps, k_count - 1, 0, False, set(range(k_count)))
        if chain_bounds is None:
            singles = [min(_absolute_norm_bound(maps[i]), maps[i].upper_bound().item()) for i in range(k_count - 1)]
        else:
            given = chain_bounds.detach().to(torch.float64).cpu().tolist()
        errors = []
        for j in range(k_count):
            total, prefix = 0.0, 1.0  # prefix: bound of A_{t-1}⋯A_j
            for t in range(j, k_count):
                total = _add(total, _mul(prefix, sweep.deltas[t]))
                if t < k_count - 1:
                    prefix = _mul(prefix, singles[t]) if chain_bounds is None else given[j][t]
            errors.append(total)
        if not pairwise:
            values = [_add(matrix_norm_upper(sweep.matrices[j]), errors[j]) for j in range(k_count)]
            return torch.tensor(values, dtype=torch.float64, device=device)
        a, b = _pairs(classes, device)
        out = torch.zeros(k_count, classes, classes, dtype=torch.float64, device=device)
        for j in range(k_count):
            g = sweep.matrices[j]
            upper = _row_norms_upper(g[a] - g[b]) + _mul(math.sqrt(2.0) * (1 + 4 * _U), errors[j])
            upper = upper * (1 + 4 * _U)  # the addition above
            out[j, a, b] = upper
            out[j, b, a] = upper
        return out


def _row_norms_upper(d: torch.Tensor) -> torch.Tensor:
    """(P,) upper bounds of the Euclidean norms of the EXACT differences whose computed values are the rows of
    ``d`` (P, n) (one rounded subtraction each: |d_exact| ≤ |d̂|/(1 − u)). Each row is scaled by a power of two
    (largest entry in [0.5, 1): no overflow; squares below 2⁻¹⁰⁷⁴ add ≤ n·2⁻¹⁰⁷⁴ to the sum), the sum of n
    squares errs by ≤ γ_n of itself, and the final sqrt, ldexp and factors by a few u (covered by 1 + 16u)."""
    n = d.shape[1]
    largest = d.abs().amax(1)
    exponent = torch.frexp(largest).exponent
    scaled = times_power_of_two(d, -exponent[:, None])
    squares = (scaled * scaled).sum(1)
    squares = (squares + n * _ETA) / _one_minus_gamma(n)
    norms = squares.sqrt() * ((1 + 16 * _U) / (1 - _U))
    return torch.where(largest > 0, times_power_of_two(norms, exponent) + _ETA, 0.0)  # subnormal results round


def _common_dtype(maps: list[LinearMap]) -> torch.dtype:
    dtype = torch.float32
    for m in maps:
        dtype = torch.promote_types(dtype, m.weight.dtype)
    return dtype


def _top_eigenvalue(gram: torch.Tensor) -> torch.Tensor:
    """λ_max of a symmetric PSD (C, C) matrix, differentiable and without host synchronization: N ← N²/‖N²‖_F
    (48 times) converges to the projector on the top eigenspace (weights (λ_i/λ_1)^(2^48)); the Rayleigh
    quotient tr(N M)/tr(N) with N held fixed is then λ_max up to rounding, with gradient N/tr(N)."""
    tiny = torch.finfo(gram.dtype).tiny
    with torch.no_grad():
        n = gram.detach()
        for _ in range(_SQUARINGS):
            n = n / torch.linalg.matrix_norm(n).clamp_min(tiny)
            n = n @ n
        n = n / torch.linalg.matrix_norm(n).clamp_min(tiny)
    return (n * gram).sum() / n.diagonal().sum().clamp_min(tiny)


def _head_differentiable(maps: list[LinearMap], pairwise: bool) -> torch.Tensor:
    dtype = _common_dtype(maps)
    classes, device = maps[-1].out_features, maps[0].weight.device
    x = torch.eye(classes, dtype=dtype, device=device)
    rows = [None] * len(maps)
    for t in range(len(maps) - 1, -1, -1):
        x = maps[t].adjoint(x, maps[t].weight.to(dtype)).reshape(classes, -1)
        rows[t] = x
    if not pairwise:
        tiny = torch.finfo(dtype).tiny
        return torch.stack([_top_eigenvalue(g @ g.T).clamp_min(tiny).sqrt() for g in rows])
    a, b = _pairs(classes, device)
    out = torch.zeros(len(maps), classes, classes, dtype=dtype, device=device)
    norms = torch.stack([torch.linalg.vector_norm(g[a] - g[b], dim=1) for g in rows])  # (K, P)
    out = out.index_put((torch.arange(len(maps), device=device)[:, None], a, b), norms)
    return out.index_put((torch.arange(len(maps), device=device)[:, None], b, a), norms)
