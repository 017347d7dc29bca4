"""Spectral norms of convolution and linear layers: estimates and guaranteed upper bounds.

``conv2d_spectral_norm`` returns ``SpectralNorm(estimate, upper)`` for the true operator of a layer (its
padding, stride, dilation and groups, at the real input size):

- ``estimate`` converges to ‖A‖₂ from below (Lanczos bidiagonalization on the true operator, restarted, with
  a residual-based stopping rule; batched power iteration for 'fft'), or for 'fft' on the CPU with frequency
  matrices of side ≤ 64 is exact to rounding at once (:func:`largest_singular_value`: LAPACK's Hermitian
  eigensolver on the Grams; ``n_iter`` and ``rtol`` do not apply, and rounding may put it a few units of the
  dtype's eps above ‖A‖₂); it is never called a bound.
- ``upper`` is a guaranteed upper bound, floating-point error included (computed in float64):
  * circular padding, stride s dividing n: the operator is (a row selection of) the strided circular
    convolution on the n×n input, whose norm is max_μ ‖B(μ)‖ over the frequency matrices of
    :func:`frequency_matrices` (Sedghi et al. 2019 for s = 1; subsampling aliases s_h·s_w frequencies into
    one block row for s > 1), so ‖A‖ ≤ √m·max_μ ‖B(μ)‖, m = the most output rows that hit one circulant row
    (1 unless the padding is wider than 'same'); equality when the output has n/s rows and columns;
  * circular padding, stride not dividing n: rows (i·s mod n) of the stride-1 circulant, with multiplicity;
  * zero padding: A is a submatrix of the strided circular convolution on N ≥ n + max(pad), s | N, per
    axis (the wrap-around never reaches the support), so ‖A‖ ≤ its norm; the circular norm at the *same*
    n is not a bound. The gap closes as n grows (measured: 3.9% at n = 8, 1.0% at 16, 0.12% at 32 for
    random 3×3 kernels, c = 16);
  * any padding, small operators (in·out ≤ :data:`DENSE_LIMIT`, 2²⁰ entries on a CPU, 2²⁶ on a GPU): the explicit
    float64 matrix with its a-posteriori rounding term and a Cholesky certificate
    (:func:`lipkern.bounds.chain.chain_upper_bounds`' dense path): within ~1e-9 of the exact norm;
  * larger operators (not exact circular ones) with at most :data:`GRAM_SIZE` = 2¹⁴ rows and columns whose
    Gram matrix on the smaller side fits :data:`GRAM_LIMIT` entries and :data:`GRAM_FLOPS` (zero padding: a
    band of pixel rows, a few probes per channel; e.g. 16 channels at 32×32 in seconds on a 2-core CPU):
    that Gram's Cholesky certificate (:mod:`lipkern.bounds.probing`): within ~1e-7 of the exact norm;
  * groups: the operator is block diagonal, groups combine by max;
  * max_ω ‖K̂(ω)‖ is bounded by a Cholesky certificate of λI − K̂ᴴK̂ ⪰ 0 for all frequencies at once
    (``lipkern.bounds.certificate``; Gram iteration, ``lipkern.bounds.gram``, for any frequency it cannot
    certify) plus the proven error of computing
    K̂(ω) by an explicit float64 DFT of the kernel taps.
- ``method``: 'power' (estimate on the true operator, Lanczos), 'fft' (circular padding where the bound above is exact:
  batched power iteration over all frequency matrices, exact in the limit, or the CPU eigensolver above, with
  its certified upper bound),
  'upper' (the bound only), 'auto' (the fastest exact estimate and the tightest bound for the case).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lipkern._checks import as_int, as_positive_float
from lipkern.bounds.certificate import FrequencyBlocks, _twiddles, certify_max_norm
from lipkern.bounds.gram import gram_upper_bound
from lipkern.ops.conv_power_iteration import (
    ConvGeometry,
    conv_adjoint,
    conv_bilinear,
    conv_operator,
    initial_conv_vectors,
)
from lipkern.ops.power_iteration import (batched_power_iteration, initial_vectors, power_of_two_scale,
                                         times_power_of_two)

__all__ = ["SpectralNorm", "conv2d_spectral_norm", "frequency_matrices", "linear_spectral_norm"]

_U = 2.0 ** -53
METHODS = ("auto", "power", "fft", "upper")
# in_features·out_features of a conv bounded by its explicit matrix (Cholesky certificate): about 0.4 s on a
# 2-core CPU at 2²⁰ (1,024 × 1,024); a GPU's float64 Cholesky takes 2²⁶ (8,192 × 8,192) in well under a second.
DENSE_LIMIT = {"cpu": 2**20, "cuda": 2**26}
GRAM_LIMIT = {"cpu": 2**27, "cuda": 2**30}  # float64 entries of a probed Gram certificate (band or dense)
GRAM_FLOPS = {"cpu": 3e11, "cuda": 1e13}  # its sweeps and Cholesky: a few seconds on a 2-core CPU
GRAM_SIZE = 2**14  # the most rows or columns of a layer so certified (larger: the circular embedding, ≤ 1% at n ≥ 16)


class SpectralNorm(NamedTuple):
    """estimate: converges to ‖A‖₂ from below (None for method='upper').
    upper: a guaranteed upper bound, float64 (None for method='power')."""

    estimate: torch.Tensor | None
    upper: torch.Tensor | None


# ----------------------------------------------------------------------------------------------------------
# Frequency matrices of a circular convolution, with a proven error bound.
# ----------------------------------------------------------------------------------------------------------
def frequency_matrices(weight: torch.Tensor, size: tuple[int, int], dilation=(1, 1), groups: int = 1,
                       stride=(1, 1)):
    """The matrices whose largest singular value is the norm of the strided circular convolution on an
    N_h×N_w input (stride s must divide N), in complex128, and a bound on their computation error.

    Stride 1 (Sedghi et al.): K̂(ω) ∈ ℂ^{out/g × in/g}, the DFT of the kernel taps, for the N_h·(N_w//2+1)
    frequencies that represent all others up to conjugation.
    Stride s: subsampling aliases the frequencies ω = μ + jN/s, so per μ ∈ [0, N/s)² the operator is
    B(μ) = [K̂(μ + j N/s)]_j / √(s_h s_w) ∈ ℂ^{out/g × s_h s_w in/g} (the per-block phase of the padding shift is
    a unitary right factor and drops out); ‖A‖ = max_μ ‖B(μ)‖ exactly. Returned unscaled, with ``scale`` =
    1/√(s_h s_w) to apply to their norms.

    Returns (matrices (groups·#frequencies, rows, cols), error, scale). ``error`` bounds
    ‖computed - exact‖₂ of every (unscaled) matrix: each entry is a sum of kh·kw tap·twiddle products with
    accurately computed twiddles (phases reduced mod N in integers), so it errs by at most c·u·Σ_x |K_oi(x)|;
    the spectral norm of the error is at most its Frobenius norm, √(s_h s_w) times that of one K̂ for the
    unscaled block row. Taps that wrap around (kernel larger than N) add up, as they should.
    """
    out_c, in_g, kh, kw = weight.shape
    (nh, nw), (dh, dw), (sh, sw) = size, dilation, stride
    if nh % sh or nw % sw:
        raise ValueError(f"frequency_matrices: stride {stride} must divide the size {size}")
    half = (sh, sw) == (1, 1)
    w64 = weight.detach().to(torch.float64)
    th = _twiddles(nh, kh, dh, nh, weight.device)
    tw = _twiddles(nw, kw, dw, nw // 2 + 1 if half else nw, weight.device)
    khat = torch.einsum("oiab,ua,vb->uvoi", w64.to(torch.complex128), th, tw)
    og = out_c // groups
    if half:
        matrices = khat.reshape(nh, nw // 2 + 1, groups, og, in_g).permute(2, 0, 1, 3, 4).reshape(-1, og, in_g)
    else:
        mh, mw = nh // sh, nw // sw  # frequency index = j·M + μ
        blocks = khat.reshape(sh, mh, sw, mw, groups, og, in_g).permute(4, 1, 3, 5, 0, 2, 6)
        matrices = blocks.reshape(groups * mh * mw, og, sh * sw * in_g)
    tap_sums = w64.abs().sum((2, 3)).reshape(groups, og, in_g)
    c = 256 + 8 * (kh * kw + kh + kw)
    # the error of the stacked block row [K̂_j] is at most √(s_h s_w) times that of one K̂ (Frobenius norms)
    error = c * _U * _frobenius(tap_sums).max() * math.sqrt(sh * sw) * 1.01
    return matrices, error, 1.0 / math.sqrt(sh * sw)


def _frobenius(t: torch.Tensor) -> torch.Tensor:
    """‖t‖_F over the last two dims without underflow or overflow: scaled by a power of two first."""
    largest = t.abs().amax()
    if largest == 0 or not torch.isfinite(largest):
        return torch.linalg.matrix_norm(t)
    exponent = torch.frexp(largest).exponent
    return times_power_of_two(torch.linalg.matrix_norm(times_power_of_two(t, -exponent)), exponent)


# ----------------------------------------------------------------------------------------------------------
# Which circular operator bounds the layer.
# ----------------------------------------------------------------------------------------------------------
class _Embedding(NamedTuple):
    """‖A‖ ≤ factor·‖C‖ for C the circular conv on ``size`` with ``stride``; equality when ``exact``."""

    size: tuple[int, int]
    stride: tuple[int, int]
    factor: float
    exact: bool


def _round_up_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _circular_embedding(g: ConvGeometry) -> _Embedding:
    sizes, strides, factor, exact = [], [], 1, True
    for axis in range(2):
        n, s, n_out = g.input_size[axis], g.stride[axis], g.output_size[axis]
        lo, hi = g.padding[2 * axis], g.padding[2 * axis + 1]
        if g.padding_mode == "zeros":
            # rows i·s (i < n_out) and columns [0, n) of the strided circular conv on N, with the wrap-around
            # never reaching the support: N ≥ n + pad, N > (n_out - 1)·s, and s | N.
            sizes.append(_round_up_to(max(n + max(lo, hi), (n_out - 1) * s + 1), s))
            strides.append(s)
            exact = False
        elif n % s == 0:
            # output row i is row i mod (n/s) of the strided circulant; rows repeat when n_out > n/s
            sizes.append(n)
            strides.append(s)
            factor *= -(-n_out // (n // s))
            exact = exact and n_out == n // s
        else:
            # rows (i·s) mod n of the stride-1 circulant, counted with their multiplicity
            sizes.append(n)
            strides.append(1)
            factor *= torch.bincount((torch.arange(n_out) * s) % n, minlength=n).max().item()
            exact = False
    return _Embedding(tuple(sizes), tuple(strides), math.sqrt(factor), exact)


def _explicit_upper(weight: torch.Tensor, g: ConvGeometry, probed: bool = True) -> torch.Tensor | None:
    """The certified bound (0-dim float64) of the explicit matrix where in·out ≤ DENSE_LIMIT, else (``probed``) of
    the Gram matrix of the smaller side formed by probing (:mod:`lipkern.bounds.probing`) where the operator has
    at most GRAM_SIZE rows and columns, the Gram stores ≤ GRAM_LIMIT entries and costs ≤ GRAM_FLOPS (on the
    weight's device); None otherwise (or for a zero or non-finite weight)."""
    from lipkern._rounding import mul_up as _mul
    from lipkern._rounding import sqrt_up as _sqrt
    from lipkern.bounds.chain import _add, _cudnn_off, _dense_chains
    from lipkern.bounds.operators import LinearMap, abs_norm_upper
    from lipkern.bounds.probing import gram_chains, gram_costs

    in_shape = (weight.shape[1] * g.groups, *g.input_size)
    out_shape = (weight.shape[0], *g.output_size)
    device = weight.device.type if weight.device.type in DENSE_LIMIT else "cpu"
    w64 = weight.detach().to(torch.float64) * _reaching_taps(g, weight.device)  # the same operator
    largest = float(w64.abs().max()) if w64.numel() else 0.0
    if not 0.0 < largest < math.inf:
        return None
    # far from 1, work on W·2⁻ᵉ (largest tap in [0.5, 1)): exact, except taps 2¹⁰²² times smaller than the largest,
    # which may become subnormal (≤ 2⁻¹⁰⁷⁴ each; an entry of the operator sums ≤ n of them, n the accumulation
    # length, so ‖ΔA‖_F ≤ n·√(out·n)·2⁻¹⁰⁷⁴ = ``tiny``). Near 1 nothing is scaled (a tap that never meets the input
    # could otherwise push the ones that do into the subnormal range).
    exponent = 0 if 2.0**-60 <= largest <= 2.0**40 else math.frexp(largest)[1]
    operator = LinearMap("conv2d", times_power_of_two(w64, -exponent) if exponent else w64, in_shape, out_shape, g)
    n = operator.accumulation_length()
    tiny = _mul(_mul(float(n), _sqrt(float(operator.out_features * n))), 2.0**-1074) if exponent else 0.0
    entries = math.prod(in_shape) * math.prod(out_shape)
    bound = math.inf
    with _cudnn_off(weight.device):
        if entries <= DENSE_LIMIT[device]:
            dense, errors = _dense_chains([operator], entries)
            if (0, 0) in dense:
                bound = _add(dense[(0, 0)], *[delta for _, _, delta in errors[(0, 0)]])  # ‖Â − A‖ ≤ δ
        elif probed:
            side = "in" if operator.in_features <= operator.out_features else "out"
            stored, flops = gram_costs([operator], side)
            size = max(operator.in_features, operator.out_features)
            if size <= GRAM_SIZE and stored <= GRAM_LIMIT[device] and flops <= GRAM_FLOPS[device]:
                gram = gram_chains([operator], {(0, 0): side}, {0: abs_norm_upper(operator)})[(0, 0)]
                # the error pairs name empty chains only (U = 1): e₁, e₂ are the sums of the φ
                bound = gram.norm_bound(_add(0.0, *[phi for _, _, phi in gram.first]),
                                        _add(0.0, *[phi for _, _, phi in gram.second]))
    if not math.isfinite(bound):
        return None
    if exponent:
        try:
            bound = math.nextafter(math.ldexp(_add(bound, tiny), exponent), math.inf)  # ldexp may round (subnormal)
        except OverflowError:
            return None
    return torch.tensor(bound, dtype=torch.float64, device=weight.device) if math.isfinite(bound) else None


def _reaching_taps(g: ConvGeometry, device) -> torch.Tensor:
    """(kh, kw) float64 mask of the kernel taps that multiply some input pixel for some output (zero padding:
    a tap that only ever meets padding adds nothing to the operator; circular padding: all of them)."""
    masks = []
    for axis in range(2):
        n, k, s, d = g.input_size[axis], g.kernel_size[axis], g.stride[axis], g.dilation[axis]
        before, out = g.padding[2 * axis], g.output_size[axis]
        masks.append(torch.tensor([g.padding_mode == "circular" or
                                   any(0 <= o * s - before + a * d < n for o in range(out)) for a in range(k)],
                                  dtype=torch.float64, device=device))
    return masks[0][:, None] * masks[1][None, :]


def _certified_upper(weight, e: "_Embedding", g: ConvGeometry, rtol: float, lower: float = 0.0):
    """The tightest guaranteed bound available: the explicit matrix's or the probed Gram's for operators
    within the limits, else the circular embedding's."""
    explicit = _explicit_upper(weight, g, probed=not e.exact)  # an exact embedding is within rtol already
    return explicit if explicit is not None else _circular_upper(weight, e, g, rtol, lower)


def _circular_upper(weight, e: _Embedding, g: ConvGeometry, rtol: float, lower: float = 0.0):
    """Guaranteed upper bound of ‖A‖ through the circular operator ``e``: the Cholesky certificate of
    :mod:`lipkern.bounds.certificate` for all frequencies at once, Gram iteration for those it cannot certify.

    Work on the weight scaled by a power of two (largest tap in [0.5, 1)), so that no frequency entry
    underflows or overflows; exact, except taps 2^1022 times smaller than the largest, which become subnormal
    (≤ 2^-1074 each; ``tiny`` below covers them)."""
    w64 = weight.detach().to(torch.float64)
    largest = w64.abs().amax()
    exponent = torch.where(largest > 0, torch.frexp(largest).exponent, 0)
    scaled = times_power_of_two(w64, -exponent)
    freq = FrequencyBlocks(scaled, e.size, g.dilation, g.groups, e.stride)
    kh, kw = weight.shape[-2:]
    tiny = kh * kw * math.sqrt(freq.rows * freq.cols) * 2.0 ** -1074
    scaled_lower = times_power_of_two(torch.tensor(lower, dtype=torch.float64, device=weight.device), -exponent) / (
        e.factor * freq.scale)
    result = certify_max_norm(freq, rtol=rtol, lower=scaled_lower)
    bound = result.bound + freq.error + tiny
    return torch.where(largest > 0, times_power_of_two(bound * (freq.scale * e.factor) * (1 + 8 * _U), exponent),
                       0.0)


# ----------------------------------------------------------------------------------------------------------
# Estimates.
# ----------------------------------------------------------------------------------------------------------
_LANCZOS_BASIS = 32


def _lanczos_top(apply, adjoint, u0: torch.Tensor, n_iter: int, rtol: float):
    """Top singular pair of the operator x ↦ apply(x) (adjoint: its transpose) on flat vectors, by Golub–Kahan–
    Lanczos bidiagonalization with full reorthogonalization, restarted from the top Ritz vector every
    ``_LANCZOS_BASIS`` steps; ``n_iter`` bounds the operator applications (each step applies A and Aᵀ once).

    Stopping rule: for the Ritz pair (θ, y) of AᵀA the residual is r = θ·β_k·|p_k| (exact in exact arithmetic),
    so some eigenvalue of AᵀA lies within r of θ² (Weinstein), and within r²/(θ² − θ₂²) when the top is
    separated (Kato–Temple with the second Ritz value). It stops when min(r, r²/gap) ≤ (rtol/2)·θ² (σ to
    within ≈ rtol/4), or at the precision floor of the dtype, *and* θ moved by ≤ rtol/4 since the previous
    cycle (so at least two cycles: a start vector nearly orthogonal to the top singular vector makes the first
    cycle converge to the second one, with a small residual; measured at c = 6, n = 8, where the top two
    singular values are 2.4e-4 apart and the start vector's top component is 0.002). Unlike a rule on the
    change of σ between power iterations, this does not stall when the top singular values are close. Still an
    estimate: a start vector orthogonal to the top singular vector converges to another one.
    Returns (u, v): unit right and left vectors (v = A u/‖A u‖), or (u0, 0) for a zero operator."""
    dtype = u0.dtype
    floor = 16 * torch.finfo(dtype).eps
    start_norm = torch.linalg.vector_norm(u0)
    if not 0 < start_norm.item() < math.inf:  # a zero (or non-finite) start vector: the Krylov space would be {0}
        u0, start_norm = torch.ones_like(u0), torch.linalg.vector_norm(torch.ones_like(u0))
    u = u0 / start_norm.clamp_min(torch.finfo(dtype).tiny)
    done, previous = 0, None
    u_basis = v_basis = None  # (basis + 1, n) / (basis, n) row stores: views, no stacking per step
    while True:
        if u_basis is None:
            u_basis = u.new_empty(_LANCZOS_BASIS + 1, u.numel())
        u_basis[0] = u
        us, vs, alphas, betas = [u_basis[0]], [], [], []
        v_prev, beta = None, 0.0
        for _ in range(min(_LANCZOS_BASIS, max(1, n_iter - done))):
            v = apply(us[-1])
            if v_basis is None:
                v_basis = v.new_empty(_LANCZOS_BASIS, v.numel())
            if v_prev is not None:
                v = v - beta * v_prev
            for _ in range(2):  # full reorthogonalization, twice is enough
                if vs:
                    basis = v_basis[:len(vs)]
                    v = v - basis.T @ (basis @ v)
            alpha = torch.linalg.vector_norm(v).item()
            done += 1
            if alpha <= floor * (max(alphas) if alphas else 0.0) or alpha == 0.0:
                if alphas:  # A u_{k+1} ∈ span(v_1..v_k): the pair of spans is invariant, B̃ = [B_k | β_k e_k] exact
                    return _invariant_top(apply, us, alphas, betas, dtype)
                break
            v_basis[len(vs)] = v / alpha
            v = v_basis[len(vs)]
            vs.append(v)
            alphas.append(alpha)
            w = adjoint(v) - alpha * us[-1]
            for _ in range(2):
                basis = u_basis[:len(us)]
                w = w - basis.T @ (basis @ w)
            beta = torch.linalg.vector_norm(w).item()
            betas.append(beta)
            v_prev = v
            if beta <= floor * max(alphas):
                break
            u_basis[len(us)] = w / beta
            us.append(u_basis[len(us)])
        if not alphas:
            return u, torch.zeros_like(apply(u))
        k = len(alphas)
        b = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if k > 1:
            b += torch.diag(torch.tensor(betas[:k - 1], dtype=torch.float64), 1)
        p, theta, qh = torch.linalg.svd(b)
        top = theta[0].item()
        residual = top * betas[k - 1] * abs(p[k - 1, 0].item())
        gap = top**2 - theta[1].item() ** 2 if k > 1 else 0.0
        error = min(residual, residual**2 / gap) if gap > 0 else residual
        q1 = qh[0].to(dtype)
        u = u_basis[:k].T @ q1  # a new tensor: the next cycle overwrites the rows
        u = u / torch.linalg.vector_norm(u)
        stable = previous is not None and abs(top - previous) <= max(rtol / 4, floor) * top
        previous = top
        if (error <= max(rtol / 2, floor) * top**2 and stable) or done >= n_iter or betas[k - 1] <= floor * max(alphas):
            v = apply(u)
            return u, v / torch.linalg.vector_norm(v).clamp_min(torch.finfo(dtype).tiny)


def _invariant_top(apply, us, alphas, betas, dtype):
    """The top singular pair when the left Krylov space stopped growing after k steps (rank ≤ k, e.g. a
    rank-1 operator after one step): A U_{k+1} = V_k B̃ with B̃ the k × (k+1) upper bidiagonal matrix of the
    alphas and the k betas, so B̃'s top singular value is ‖A‖ on these spans, which A and Aᵀ map into each
    other. Restarting from the top Ritz vector of the square B_k instead (which ignores u_{k+1}) would loop on
    the start vector (rank-1: an estimate of ‖A u_1‖, 20× low for ones(1, 512))."""
    k = len(alphas)
    b = torch.zeros(k, k + 1, dtype=torch.float64)
    b[range(k), range(k)] = torch.tensor(alphas, dtype=torch.float64)
    b[range(k), range(1, k + 1)] = torch.tensor(betas[:k], dtype=torch.float64)
    _, _, qh = torch.linalg.svd(b)
    u = torch.stack(us[:k + 1]).T @ qh[0].to(dtype)
    u = u / torch.linalg.vector_norm(u)
    v = apply(u)
    return u, v / torch.linalg.vector_norm(v).clamp_min(torch.finfo(dtype).tiny)


def _power_estimate(weight, g: ConvGeometry, u, n_iter: int, rtol: float):
    """Estimate of ‖A‖ on the true operator: Lanczos bidiagonalization (:func:`_lanczos_top`) from ``u`` (or
    the deterministic start vector), then vᵀ A u with the vectors fixed (differentiable in the weight)."""
    c_in = weight.shape[1] * g.groups
    work_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    w = power_of_two_scale(weight.detach().to(work_dtype))[0]  # direction only: no overflow
    if u is None:
        u0 = initial_conv_vectors(1, c_in, g.input_size, work_dtype, weight.device)
    else:
        u0 = u.detach().to(work_dtype).reshape(1, c_in, *g.input_size).clone()
    shape_in = u0.shape
    shape_out = (1, weight.shape[0], *g.output_size)
    with torch.no_grad():
        u_flat, v_flat = _lanczos_top(lambda x: conv_operator(x.reshape(shape_in), w, g).reshape(-1),
                                      lambda y: conv_adjoint(y.reshape(shape_out), w, g).reshape(-1),
                                      u0.reshape(-1), n_iter, rtol)
    u_work, v_work = u_flat.reshape(shape_in), v_flat.reshape(shape_out)
    if u is not None:
        with torch.no_grad():
            u.copy_(u_work.reshape(u.shape))
    return conv_bilinear(weight[None].to(work_dtype), u_work, v_work, g)[0]


_EIGENSOLVER_MAX_SIDE = 64  # CPU: LAPACK's Hermitian eigensolver on the Grams beats 100 power steps up to here


def _eigensolver_fits(matrices: torch.Tensor) -> bool:
    return matrices.device.type == "cpu" and min(matrices.shape[-2:]) <= _EIGENSOLVER_MAX_SIDE


def largest_singular_value(matrices: torch.Tensor, n_iter: int = 100) -> torch.Tensor:
    """max over the batch of σ_max(M_k), for (batch, rows, cols) real or complex matrices (e.g. the frequency
    matrices of a circular conv): on the CPU, for sides ≤ ``_EIGENSOLVER_MAX_SIDE``, exact to rounding by
    LAPACK's Hermitian eigensolver on the smaller Gram (σ_max² = λ_max: backward stable, relative error of
    σ_max ~ the dtype's eps; 1.3–2.5× faster than ``n_iter`` = 100 power steps and than a batched SVD at
    8–64 channels on the CPU, benchmarks/NOTES.md); elsewhere ``n_iter`` steps of
    :func:`lipkern.ops.batched_power_iteration` (an estimate from below). An estimate, not a bound."""
    if _eigensolver_fits(matrices):
        rows, cols = matrices.shape[-2:]
        gram = matrices.mH @ matrices if cols <= rows else matrices @ matrices.mH
        return torch.linalg.eigvalsh(gram)[..., -1].max().clamp_min(0).sqrt()
    return batched_power_iteration(matrices, None, None, n_iter)[0].max()


def _fft_estimate(weight, e: _Embedding, g: ConvGeometry, n_iter: int, rtol: float, upper: torch.Tensor):
    """Batched power iteration over all frequency matrices until within rtol of the certified upper bound
    (on the CPU at small sizes: :func:`largest_singular_value`'s eigensolver, exact at once)."""
    scaled_weight, exponent = power_of_two_scale(weight.detach())
    matrices, _, scale = frequency_matrices(scaled_weight, e.size, g.dilation, g.groups, e.stride)
    matrices = matrices * scale
    if weight.dtype != torch.float64:
        matrices = matrices.to(torch.complex64)
    if _eigensolver_fits(matrices):
        return times_power_of_two(largest_singular_value(matrices).double(), exponent).to(weight.dtype)
    u, done = None, 0
    while done < n_iter:
        chunk = min(25, n_iter - done)
        sigma, u, _ = batched_power_iteration(matrices, u, None, chunk)
        done += chunk
        if math.ldexp(sigma.max().item(), exponent.item()) * (1 + rtol) >= upper.item():
            break
    return times_power_of_two(sigma.max().double(), exponent).to(weight.dtype)


# ----------------------------------------------------------------------------------------------------------
# Public functions.
# ----------------------------------------------------------------------------------------------------------
def _check_weight(weight: torch.Tensor, dims: int, name: str) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D weight, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight)}")
    if not weight.is_floating_point():
        raise TypeError(f"{name}: weight must be floating point, got {weight.dtype}")
    if weight.is_meta:
        raise ValueError(f"{name}: weight is on the meta device (shapes only): a norm needs values")
    if weight.numel() == 0:
        raise ValueError(f"{name}: weight is empty, shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name}: weight contains NaN or Inf")


def _check_iteration(name: str, n_iter, rtol) -> tuple[int, float]:
    return as_int(n_iter, f"{name}: n_iter", minimum=1), as_positive_float(rtol, f"{name}: rtol")


def conv2d_spectral_norm(weight: torch.Tensor, input_size, stride=1, padding=0, dilation=1, groups: int = 1,
                         padding_mode: str = "zeros", method: str = "auto", *, n_iter: int = 1000,
                         rtol: float = 1e-4, u: torch.Tensor | None = None) -> SpectralNorm:
    """Spectral norm of the conv layer x (in, H, W) -> conv2d(x) with these nn.Conv2d arguments.

    input_size: (H, W) or int. method: 'auto' | 'power' | 'fft' | 'upper' (see the module docstring).
    n_iter: the most operator applications (A and Aᵀ) of the estimate; rtol: the relative accuracy aimed for
    (power: the Lanczos residual test of :func:`_lanczos_top`; fft: distance to the certified bound; upper:
    the certificate's λ = ((1 + rtol/2)·σ̂)², or Gram iteration's distance between its bounds).
    u: optional (in, H, W) start vector for method 'power' (and 'auto' when it uses 'power'), updated in
    place so the next call warm-starts.

    The 'power' estimate is differentiable with respect to the weight (vᵀ A u with the vectors fixed), the
    'fft' estimate and the upper bound are not. The upper bound is float64; the estimate has the weight's dtype.
    """
    _check_weight(weight, 4, "conv2d_spectral_norm")
    n_iter, rtol = _check_iteration("conv2d_spectral_norm", n_iter, rtol)
    if method not in METHODS:
        raise ValueError(f"conv2d_spectral_norm: method must be one of {METHODS}, got {method!r}")
    g = ConvGeometry.create(input_size, tuple(weight.shape[-2:]), stride, padding, dilation, groups, padding_mode)
    g.check_weight(weight, stacked=False)
    embedding = _circular_embedding(g)
    if method == "fft" and not embedding.exact:
        raise ValueError("conv2d_spectral_norm: method='fft' is exact only for padding_mode='circular' with a "
                         f"stride that divides the input and an output of size input/stride (got {g}); use "
                         "'power', 'upper' or 'auto'")
    if method == "power":
        return SpectralNorm(_power_estimate(weight, g, u, n_iter, rtol), None)
    with torch.no_grad():
        if method == "upper":
            return SpectralNorm(None, _certified_upper(weight, embedding, g, rtol))
        if method == "fft" or (method == "auto" and embedding.exact):
            upper = _circular_upper(weight, embedding, g, rtol)
            return SpectralNorm(_fft_estimate(weight, embedding, g, n_iter, rtol, upper), upper)
    estimate = _power_estimate(weight, g, u, n_iter, rtol)
    with torch.no_grad():
        upper = _certified_upper(weight, embedding, g, rtol, lower=estimate.item())
    return SpectralNorm(estimate, upper)


def linear_spectral_norm(weight: torch.Tensor, method: str = "auto", *, n_iter: int = 1000,
                         rtol: float = 1e-4, u: torch.Tensor | None = None) -> SpectralNorm:
    """Spectral norm of a (out, in) matrix: 'power' estimate (differentiable, vᵀ W u), 'upper' (Gram
    iteration in float64 with its rounding term), or both ('auto'). ``u`` (in,) warm-starts and is updated."""
    _check_weight(weight, 2, "linear_spectral_norm")
    n_iter, rtol = _check_iteration("linear_spectral_norm", n_iter, rtol)
    if u is not None and (not isinstance(u, torch.Tensor) or u.numel() != weight.shape[1]):
        raise ValueError(f"linear_spectral_norm: u must be a tensor of {weight.shape[1]} entries (the weight's "
                         f"input size), got {getattr(u, 'shape', type(u).__name__)}")
    if method not in ("auto", "power", "upper"):
        raise ValueError(f"linear_spectral_norm: method must be 'auto', 'power' or 'upper', got {method!r}")
    estimate = upper = None
    if method in ("auto", "power"):
        work_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        w = power_of_two_scale(weight.detach().to(work_dtype))[0]  # direction only: no overflow
        u0 = (initial_vectors((1, weight.shape[1]), work_dtype, weight.device)[0] if u is None
              else u.detach().to(work_dtype).reshape(-1).clone())
        with torch.no_grad():
            u_work, v_work = _lanczos_top(lambda x: w @ x, lambda y: w.T @ y, u0, n_iter, rtol)
        if u is not None:
            with torch.no_grad():
                u.copy_(u_work.reshape(u.shape))
        u_work, v_work = u_work[None], v_work[None]
        estimate = v_work[0] @ weight.to(work_dtype) @ u_work[0]
    if method in ("auto", "upper"):
        lower = estimate.item() if estimate is not None else 0.0
        with torch.no_grad():
            upper = gram_upper_bound(weight.detach()[None], rtol=rtol, lower=lower)[0]
    return SpectralNorm(estimate, upper)
