"""Certified spectral norms of many matrices at once: a Cholesky certificate of λI − AᴴA ⪰ 0.

The largest ‖A_f‖₂ over a stack of frequency matrices is certified in three device-side passes and one host
read (no per-step synchronization, memory bounded by chunks):

1. screening: a few complex64 power iterations on every A_f (chunked) rank the frequencies;
2. estimate: the top candidates get an accurate σ̂ (Gram matrix squared 16 times, a few power steps, and the
   Rayleigh quotient ‖A x‖/‖x‖ on A itself), σ̂ = max over the candidates (and the caller's lower bound);
3. certificate: λ₀ = ((1 + rtol/2)·σ̂)², and for every frequency (chunked) the float64 Cholesky of
   K = fl(λ₀I − fl(A_fᴴA_f)) by ``torch.linalg.cholesky_ex`` (batched, no exception, no synchronization).

Where every factorization succeeds, max_f ‖A_f‖₂² ≤ λ₀·ρ(p, q) + τ (the theorem below). The frequencies
whose factorization fails (σ̂ too low, or a frequency the screening missed) go to Gram iteration
(:func:`lipkern.bounds.gram.gram_upper_bound`), so the bound is always guaranteed; the certificate only
makes it fast.

**Theorem (shift margin).** Let A ∈ ℂ^{p×q} (p ≥ q; otherwise use Aᴴ) be floating-point numbers, u = 2⁻⁵³,
Ĝ = fl(AᴴA) computed by a classical matrix product, K the Hermitian matrix that the Cholesky reads (one
triangle of fl(λ₀I − Ĝ), the real part of its diagonal), and suppose the floating-point Cholesky of K runs
to completion. With γ_dot = 4√2(p+2)u/(1 − 4√2(p+2)u) and γ_C = 8(q+3)u/(1 − 8(q+3)u),

    ‖A‖₂² ≤ (λ₀·(1 + u + q·γ_C/(1 − γ_C)) + τ) / (1 − 2u − q·γ_dot),   τ = 2⁻⁹⁰⁰.

Proof. (a) Formation: every entry of Ĝ (either triangle) satisfies |Ĝ_ij − (AᴴA)_ij| ≤ γ_dot(|A|ᴴ|A|)_ij + μ,
the classical bound for a complex dot product of length p in any summation order (γ_{p+2} suffices for
complex arithmetic, Higham 2002 §3.6; 4√2 is generous and covers FMA), μ ≤ 8(p+2)·2⁻¹⁰⁷⁴ for underflow.
The Hermitian matrix E₁ = Ĝ_herm − AᴴA has ‖E₁‖₂ ≤ ‖|E₁|‖₂ ≤ γ_dot‖|A|‖₂² + qμ ≤ γ_dot‖A‖_F² + qμ
≤ q·γ_dot‖A‖₂² + qμ (‖A‖_F² ≤ rank·‖A‖₂²).
(b) Shift: K = λ₀I − Ĝ_herm + D with D real diagonal, |D_ii| ≤ u|λ₀ − Re Ĝ_ii| ≤ u(λ₀ + Re Ĝ_ii) (one
rounded subtraction, exact in the subnormal range), and Re Ĝ_ii ≤ (1 + γ_dot)‖A‖₂² + μ.
(c) Cholesky (Demmel 1989; Higham 2002, Thm 10.3, whose proof only uses that the algorithm runs to
completion, so it applies to an indefinite K as well; any ordering of the inner products): the computed
factor satisfies R̂ᴴR̂ = K + ΔK with |ΔK| ≤ γ_C|R̂|ᴴ|R̂| + (underflow). γ_{q+1} is the real-arithmetic constant;
γ_C = γ_{8(q+3)} is generous for complex arithmetic (products err by ≤ √2γ₂ < 3u, Higham Lemma 3.5; a
complex dot product by γ_{n+2}; complex-by-real division and the square root by u each). From the diagonal,
(1 − γ_C)(R̂ᴴR̂)_jj ≤ K_jj ≤ λ₀ (Re Ĝ_jj ≥ 0: a sum of squares), so ‖ΔK‖₂ ≤ γ_C‖R̂‖_F² ≤ q·λ₀·γ_C/(1 − γ_C).
This is the argument of Rump's criterion (S. M. Rump, "Verification of positive definiteness", BIT Numer.
Math. 46:433–452, 2006), who shifts K by this amount before factoring; here the shift is added to the bound
afterwards instead, which is equivalent: K ⪰ −‖ΔK‖₂·I because R̂ᴴR̂ ⪰ 0.
(d) Hence λ₀I − AᴴA = K − D + E₁ ⪰ −(‖ΔK‖₂ + ‖D‖₂ + ‖E₁‖₂)I, i.e.
‖A‖₂² ≤ λ₀ + qλ₀γ_C/(1−γ_C) + u(λ₀ + (1+γ_dot)‖A‖₂²) + q·γ_dot‖A‖₂² + (underflow terms);
solving for ‖A‖₂² gives the theorem. The underflow terms (from μ, and from the Cholesky: ≤ q(8q + 2√(2λ₀))·
2⁻¹⁰⁷⁴ in norm) are below τ = 2⁻⁹⁰⁰ for q, p < 2³⁰ and λ₀ < 2¹⁰⁰, which the callers ensure (the weight is
scaled so that its largest tap is in [0.5, 1); λ₀ is clamped to [2⁻¹⁰⁰⁰, 2¹⁰⁰], above which nothing is
certified). The final floating-point operations (λ₀·ρ, + τ, √) are covered by a factor (1 + 64u).

Assumptions (as for Gram iteration): classical arithmetic in the matrix product and in the Cholesky (inner
products by multiply-add in any order, triangular solves by substitution; not Strassen-like, 3M complex, or
emulated FP64 products, and not a triangular solve through an explicitly inverted block). LAPACK's potrf,
cuSOLVER's potrf/potrfBatched and cuBLAS zgemm/dgemm are of this kind.
For c = 256 this costs one Gram product per frequency plus one Cholesky (a third of a product), instead of
up to 15 Gram steps, and ρ − 1 ≈ 1e-10 (the bound is (1 + rtol/2)·σ̂ to within 1e-10).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lipkern.bounds.gram import gram_upper_bound
from lipkern.ops.power_iteration import batched_power_iteration, initial_vectors

__all__ = ["CertifiedMax", "FrequencyBlocks", "certify_max_norm", "cholesky_certificate", "certified_square_bound",
           "refined_estimate"]

_U = 2.0 ** -53
_TAU = 2.0 ** -900
_LAMBDA_MIN = 2.0 ** -1000
_LAMBDA_MAX = 2.0 ** 100
SCREENING_ITERATIONS = 8
CANDIDATES = 8
SQUARINGS = 16
POWER_STEPS = 4
RETRIES = 2
CHUNK_BYTES = 128 * 2**20  # complex128 frequency matrices per chunk (peak ≈ 4 chunks)


# ----------------------------------------------------------------------------------------------------------
# The certificate for one stack.
# ----------------------------------------------------------------------------------------------------------
def _gamma_dot(p: int) -> float:
    g = 4 * math.sqrt(2) * (p + 2) * _U
    return g / (1 - g)


def _gamma_cholesky(q: int) -> float:
    g = 8 * (q + 3) * _U
    return g / (1 - g)


def certified_square_bound(lam0: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """The theorem's bound on ‖A‖₂² (A ∈ ℂ^{p×q}, p ≥ q) where the Cholesky of fl(λ₀I − fl(AᴴA)) succeeded."""
    if p < q:
        p, q = q, p
    gc, gd = _gamma_cholesky(q), _gamma_dot(p)
    denominator = 1 - 2 * _U - q * gd
    if not denominator > 0.5:
        raise ValueError(f"certificate: matrices {p}×{q} are too large for the float64 rounding bounds")
    rho = (1 + _U + q * gc / (1 - gc)) / denominator * (1 + 64 * _U)
    return lam0 * rho + _TAU


def cholesky_certificate(a: torch.Tensor, lam0: torch.Tensor) -> torch.Tensor:
    """ok (B,) bool: the float64 Cholesky of fl(λ₀I − fl(AᴴA)) ran to completion for each matrix of the
    (B, m, n) stack ``a`` (real or complex; the smaller Gram side is used). Where ok, ‖A_b‖₂² ≤
    :func:`certified_square_bound`(λ₀, m, n). ``lam0``: a scalar or (B,) float64 tensor. No host read."""
    work = a.to(torch.complex128 if a.is_complex() else torch.float64)
    if work.shape[-2] < work.shape[-1]:
        work = work.mH
    k = work.mH @ work  # Ĝ, (B, q, q)
    lam0 = torch.as_tensor(lam0, dtype=torch.float64, device=k.device).clamp(_LAMBDA_MIN, _LAMBDA_MAX)
    parts = torch.view_as_real(k) if k.is_complex() else k.unsqueeze(-1)
    diagonal = parts.diagonal(0, -3, -2)  # (B, 1|2, q): real (and imaginary) part of the diagonal
    shifted = lam0.reshape(-1, 1) - diagonal[:, 0]  # fl(λ₀ − Re Ĝ_ii)
    k.neg_()
    diagonal[:, 0].copy_(shifted)
    if k.is_complex():
        diagonal[:, 1].zero_()
    _, info = torch.linalg.cholesky_ex(k)
    return info == 0


# ----------------------------------------------------------------------------------------------------------
# A good lower estimate of the largest singular value of a few matrices, on the device.
# ----------------------------------------------------------------------------------------------------------
def refined_estimate(a: torch.Tensor, squarings: int = SQUARINGS, steps: int = POWER_STEPS) -> torch.Tensor:
    """(B,) estimates of ‖A_b‖₂ from below (up to rounding): G = AᴴA squared ``squarings`` times (normalized by
    its Frobenius norm each time), ``steps`` power steps with it, then ‖A x‖/‖x‖. After T squarings and s
    steps the relative deficit in σ² is at most δ + r·(1 − δ)^(s·2^(T+1)) for any δ (r: the rank), e.g.
    3e-5 at T = 16, s = 4, r = 256 (for a start vector not nearly orthogonal to the top singular space)."""
    work = a.to(torch.complex128 if a.is_complex() else torch.float64)
    if work.shape[-2] < work.shape[-1]:
        work = work.mH
    g = work.mH @ work
    tiny = torch.finfo(torch.float64).tiny
    for _ in range(squarings):
        g = g / torch.linalg.matrix_norm(g).clamp_min(tiny)[:, None, None]
        g = g @ g
    x = initial_vectors(tuple(g.shape[:2]), g.dtype, g.device, key="certificate")
    for _ in range(steps):
        x = (g @ x[..., None])[..., 0]
        x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(tiny)
    x_norm = torch.linalg.vector_norm(x, dim=1)
    ax_norm = torch.linalg.vector_norm((work @ x[..., None])[..., 0], dim=1)
    return torch.where(x_norm > 0, ax_norm / x_norm.clamp_min(tiny), 0.0)


# ----------------------------------------------------------------------------------------------------------
# Frequency matrices of a circular convolution, built in chunks.
# ----------------------------------------------------------------------------------------------------------
def _twiddles(size: int, taps: int, dilation: int, frequencies: int, device) -> torch.Tensor:
    """T[f, a] = exp(-2πi f a d / N), the phase reduced mod N in integers first (accurate angles)."""
    f = torch.arange(frequencies, device=device)[:, None]
    a = torch.arange(taps, device=device)[None, :] * dilation
    angle = (2 * math.pi / size) * ((f * a) % size).to(torch.float64)
    return torch.polar(torch.ones_like(angle), -angle)


class FrequencyBlocks:
    """The frequency matrices of :func:`lipkern.bounds.spectral.frequency_matrices` (same matrices, same
    ``error`` and ``scale``), built on demand: by rows of the frequency grid (chunks) or by flat index.

    Flat index f = (r·V + v)·groups + group, r < ``row_count`` (μ_h), v < V (μ_w, or the rfft half-plane for
    stride 1). Matrices are (rows, cols) = (out/g, s_h·s_w·in/g), unscaled (multiply norms by ``scale``)."""

    def __init__(self, weight: torch.Tensor, size, dilation=(1, 1), groups: int = 1, stride=(1, 1)):
        out_c, in_g, kh, kw = weight.shape
        (nh, nw), (dh, dw), (sh, sw) = size, dilation, stride
        if nh % sh or nw % sw:
            raise ValueError(f"frequency_matrices: stride {stride} must divide the size {size}")
        half = (sh, sw) == (1, 1)
        w64 = weight.detach().to(torch.float64)
        device = weight.device
        self.groups, self.og, self.in_g, self.stride = groups, out_c // groups, in_g, (sh, sw)
        self.row_count = nh // sh
        self.per_row_pairs = nw // 2 + 1 if half else nw // sw
        self.count = self.row_count * self.per_row_pairs * groups
        self.rows, self.cols = self.og, sh * sw * in_g
        self.scale = 1.0 / math.sqrt(sh * sw)
        self._th = _twiddles(nh, kh, dh, nh, device).reshape(sh, self.row_count, kh)
        self._tw = _twiddles(nw, kw, dw, self.per_row_pairs if half else nw, device).reshape(
            sw, self.per_row_pairs, kw)
        self._w = w64.reshape(groups, self.og, in_g, kh, kw)
        tap_sums = w64.abs().sum((2, 3)).reshape(groups, self.og, in_g)
        c = 256 + 8 * (kh * kw + kh + kw)
        # each entry errs by ≤ c·u·Σ_x|K_oi(x)| (accurate twiddles, kh·kw products); spectral ≤ Frobenius norm,
        # √(s_h s_w) times that of one K̂ for the stacked block row. The Frobenius norm is computed on taps whose
        # largest sum is ≥ 0.5 (the callers scale the weight): squares below 2^-1074 add ≤ √numel·2^-537.
        fro = torch.linalg.matrix_norm(tap_sums).amax() * (1 + (tap_sums[0].numel() + 2) * _U) \
            + math.sqrt(tap_sums[0].numel()) * 2.0 ** -537
        self.error = c * _U * fro * math.sqrt(sh * sw) * 1.01

    @property
    def matrix_bytes(self) -> int:
        return self.rows * self.cols * 16

    def _combine(self, x: torch.Tensor, tw: torch.Tensor, pattern: str) -> torch.Tensor:
        return torch.einsum(pattern, x, tw)

    def build_rows(self, start: int, stop: int, dtype=torch.complex128) -> torch.Tensor:
        """Matrices of grid rows [start, stop): (count, rows, cols), flat indices start·per_row … stop·per_row."""
        w = self._w.to(dtype)
        th, tw = self._th[:, start:stop].to(dtype), self._tw.to(dtype)
        x = torch.einsum("goiab,jra->rjgoib", w, th)
        y = torch.einsum("rjgoib,kvb->rvgojki", x, tw)
        return y.reshape(-1, self.rows, self.cols)

    def build(self, index: torch.Tensor, dtype=torch.complex128) -> torch.Tensor:
        """Matrices of the flat indices ``index`` (F,): (F, rows, cols)."""
        pair, group = index // self.groups, index % self.groups
        r, v = pair // self.per_row_pairs, pair % self.per_row_pairs
        w = self._w.to(dtype)
        x = torch.einsum("goiab,jfa->fjgoib", w, self._th[:, r].to(dtype))
        y = torch.einsum("fjgoib,kfb->fgojki", x, self._tw[:, v].to(dtype))
        y = y[torch.arange(index.numel(), device=index.device), group]
        return y.reshape(-1, self.rows, self.cols)

    def row_chunks(self, budget: int = CHUNK_BYTES):
        per_row = self.per_row_pairs * self.groups * self.matrix_bytes
        step = max(1, budget // max(per_row, 1))
        for start in range(0, self.row_count, step):
            stop = min(self.row_count, start + step)
            yield start, stop, start * self.per_row_pairs * self.groups, stop * self.per_row_pairs * self.groups


# ----------------------------------------------------------------------------------------------------------
# The largest norm over all frequencies.
# ----------------------------------------------------------------------------------------------------------
class CertifiedMax(NamedTuple):
    """bound: float64 scalar ≥ max_f ‖A_f‖₂ (the computed, unscaled matrices); estimate: σ̂ (from below, up
    to rounding); failed: frequencies the certificate did not cover (bounded by Gram iteration instead);
    retries: certificate rounds after the first (each one host read)."""

    bound: torch.Tensor
    estimate: torch.Tensor
    failed: int
    retries: int


def certify_max_norm(freq: FrequencyBlocks, rtol: float = 1e-4, lower: torch.Tensor | float = 0.0,
                     chunk_bytes: int = CHUNK_BYTES) -> CertifiedMax:
    """A guaranteed upper bound of max_f ‖A_f‖₂ over the matrices of ``freq``, within about rtol/2 of the
    estimate σ̂ when the certificate covers every frequency (see the module docstring). One host read."""
    device = freq._w.device
    chunks = list(freq.row_chunks(chunk_bytes))
    # 1. screening (complex64 power iterations), chunked
    screen = torch.empty(freq.count, dtype=torch.float32, device=device)
    for start, stop, lo, hi in chunks:
        screen[lo:hi] = batched_power_iteration(freq.build_rows(start, stop, torch.complex64),
                                                n_iter=SCREENING_ITERATIONS).sigma
    # 2. an accurate estimate of the best candidates
    candidates = torch.topk(screen, min(CANDIDATES, freq.count)).indices
    estimate = refined_estimate(freq.build(candidates)).amax()
    estimate = torch.maximum(estimate, torch.as_tensor(lower, dtype=torch.float64, device=device))
    lam0 = ((1 + rtol / 2) * estimate) ** 2
    # 3. the certificate, chunked
    ok = torch.empty(freq.count, dtype=torch.bool, device=device)
    for start, stop, lo, hi in chunks:
        ok[lo:hi] = cholesky_certificate(freq.build_rows(start, stop), lam0)
    failed = (~ok).nonzero().squeeze(1)  # host read 1
    per_chunk = max(1, chunk_bytes // freq.matrix_bytes)
    # 4. a frequency above (1 + rtol/2)·σ̂ that the screening ranked low: refine the estimate with the best
    # failed candidates and certify the failed ones again (λ only grows: earlier certificates stay valid)
    retries = 0
    while failed.numel() and retries < RETRIES:
        best = failed[torch.topk(screen[failed], min(CANDIDATES, failed.numel())).indices]
        estimate = torch.maximum(estimate, refined_estimate(freq.build(best)).amax())
        lam0 = ((1 + rtol / 2) * estimate) ** 2
        still = torch.cat([cholesky_certificate(freq.build(failed[i:i + per_chunk]), lam0).logical_not()
                           for i in range(0, failed.numel(), per_chunk)])
        failed = failed[still]  # host read 2, 3
        retries += 1
    bound = certified_square_bound(lam0.clamp(_LAMBDA_MIN, _LAMBDA_MAX), freq.rows, freq.cols).sqrt() * (1 + 4 * _U)
    # 5. what the certificate could not cover: Gram iteration (a guaranteed bound in any case)
    for i in range(0, failed.numel(), per_chunk):
        a = freq.build(failed[i:i + per_chunk])
        bound = torch.maximum(bound, gram_upper_bound(a, rtol=rtol, lower=estimate.item()).amax())
    return CertifiedMax(bound, estimate, failed.numel(), retries)
