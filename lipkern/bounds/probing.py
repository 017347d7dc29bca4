"""Guaranteed norms of chains too large to write out: the Gram matrix of the smaller side, formed by probing.

For a chain B = A_k ⋯ A_j of :class:`~lipkern.bounds.operators.LinearMap` whose explicit matrix (in·out entries)
is too large, ‖B‖₂² = λ_max(G) with G = BᵀB (s = in features) or BBᵀ (s = out features), the smaller. G is
formed without B: Ẑ = fl(Bᵀ fl(B P)) (or fl(B fl(Bᵀ P))) for a probe matrix P (s × p), assembled into Ĝ,
symmetrized, and certified by a Cholesky factorization of λ₀I − Ŝ (no eigenvalue solver is trusted).

**Probes.** P = I (p = s) in general. For a chain of zero-padded convolutions (and channel scales) G is local:
G[x, x'] = 0 unless pixels x and x' are within r of each other on both axes, r = R − 1 on the input side and
⌊(R − 1)/J⌋ on the output side, R the chain's receptive field and J the product of its strides (R = 1 +
Σ_t d_t(k_t − 1)·J_{<t}). Pixels congruent modulo m = 2r + 1 on both axes have disjoint windows, so one probe
per (channel, h mod m, w mod m) carries all of them at once: column x of G is the probe's column restricted to
the window of x (the other pixels of its probe contribute exact zeros there). p = C·m_h·m_w, e.g. 288 probes
for a 4×4 stride-2 conv with 32 output channels at 14×14 instead of 6,272.

**Errors (float64, round to nearest; :mod:`lipkern.bounds.chain`'s model).** A step X̂_{t+1} = fl(A_t X̂_t)
errs by |Δ_t| ≤ γ_{n_t}|A_t||X̂_t| + μ_t entrywise, so ‖Δ_t‖_F ≤ φ_t = γ_{n_t}·‖|A_t|‖₂·‖X̂_t‖_F +
μ_t·√(entries), with ‖|A_t|‖₂ from :func:`~lipkern.bounds.operators.abs_norm_upper` and ‖X̂_t‖_F measured. For the
input side, Ŷ = fl(B P) = BP + E₁ with ‖E₁‖_F ≤ e₁ = Σ_t U[t+1, k]·φ_t, and Ẑ = fl(Bᵀ Ŷ) = BᵀŶ + E₂ with
‖E₂‖_F ≤ e₂ = Σ_t U[j, t−1]·φ'_t (U: guaranteed bounds of the shorter chains, 1 for an empty one); so
‖Ẑ − GP‖_F ≤ β·e₁ + e₂ with β = ‖B‖₂ (the output side mirrors this). Assembly copies entries of Ẑ into disjoint
windows, so ‖Ĝ − G‖_F ≤ ‖Ẑ − GP‖_F; Ŝ = fl((Ĝ + Ĝᵀ)/2) adds ≤ u‖Ŝ‖_F + s·2⁻¹⁰⁷⁴ (G is symmetric). With
λ_max(Ŝ) ≤ Λ from the certificate below, Weyl gives β² ≤ Λ + ε_S + β·e₁ + e₂, and
β ≤ (e₁ + √(e₁² + 4(Λ + ε_S + e₂)))/2.

**Certificate.** K = fl(λ₀I − Ŝ) (off-diagonal entries negated exactly; |K_ii − (λ₀ − Ŝ_ii)| ≤ u/(1−u)·K_ii);
if its float64 Cholesky runs to completion, R̂ᵀR̂ = K + ΔK with |ΔK| ≤ γ_C|R̂ᵀ||R̂| (Demmel 1989; Higham 2002,
Thm 10.3; any order of the inner products), so ‖ΔK‖₂ ≤ γ_C‖R̂‖_F² ≤ γ_C/(1 − γ_C)·tr K (from the diagonal),
K ⪰ −‖ΔK‖₂I, and λ_max(Ŝ) ≤ λ₀ + γ_C/(1 − γ_C)·tr K + u/(1 − u)·max K_ii + 2⁻⁹⁰⁰ (underflow in the
factorization, as in :mod:`lipkern.bounds.certificate`, whose assumptions on the Cholesky this shares). λ₀ is
(1 + ρ)·σ̂², σ̂ from Lanczos on the chain (an estimate: the certificate decides), ρ = 1e-8, retried larger
(the bound is then within ≈ ρ/2 of ‖B‖₂), then a few bisection steps between the last shift that failed and
the one that succeeded; where factoring is cheaper than a long Lanczos run, the estimate is short (2 cycles)
and the bisection longer. Every successful factorization is a bound; the smallest is kept.

**Band.** In pixel-row order a local Gram is block-banded (blocks of the W·C entries of one row, zero beyond r
rows of the diagonal). Where that is cheaper (:func:`_use_band`), the blocks are built straight from z
(:class:`BandedGram`, memory: the band) and factored by a block Cholesky (GEMM updates, triangular solves,
potrf on the diagonal blocks: the building blocks of LAPACK's own potrf, so the same assumptions), e.g. the
12,544-side Gram of LipLTNet("4C3F")'s conv2·conv3: 14 rows of 896, bandwidth 3, a quarter of the dense flops.

Cost: p probes through the chain twice (no |W| sweeps); a dense Gram stores s² floats twice (Ĝ/K and the
factor), a band its blocks and the probe results (p·s; chains that share a sweep keep theirs until certified);
Cholesky s³/3 flops dense (1 s at s = 6,272 on this project's 2-core CPU). The band is used on the CPU only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lipkern._rounding import add_up as _add
from lipkern._rounding import div_up as _div
from lipkern._rounding import gamma_up as _gamma
from lipkern._rounding import mul_up as _mul
from lipkern._rounding import one_minus_gamma_down as _one_minus_gamma
from lipkern._rounding import sqrt_up as _sqrt
from lipkern._rounding import up as _up
from lipkern.bounds.certificate import _gamma_cholesky
from lipkern.bounds.operators import LinearMap
from lipkern.ops.power_iteration import times_power_of_two

__all__ = ["DEFAULT_GRAM_LIMIT", "BandedGram", "GramChain", "certified_top_eigenvalue", "certified_top_eigenvalue_banded",
           "gram_chain", "gram_chains", "gram_costs", "probe_layout"]

DEFAULT_GRAM_LIMIT = 2**29  # float64 entries a Gram certificate stores (4 GiB): :func:`gram_costs`
_U = 2.0**-53
_ETA = 2.0**-1074
_TAU = 2.0**-900
_LAMBDA_RANGE = (2.0**-1000, 2.0**100)
_SHIFTS = (1e-8, 1e-6, 1e-4, 1e-2)  # Lanczos is accurate to ~1e-10 unless the top is clustered
_BATCH_ELEMENTS = 2**22  # probes per batch × the widest feature count of the chain
_APPLY_OVERHEAD = 5e7  # one batch-1 application of a chain in the Lanczos estimate, in flops of GEMM time (~1 ms)


class ProbeLayout(NamedTuple):
    """Probes of the Gram side (C, H, W): one per (channel, h mod period[0], w mod period[1]); radius: the
    window half-widths. ``None`` layouts mean identity probes."""

    shape: tuple[int, int, int]
    period: tuple[int, int]
    radius: tuple[int, int]

    @property
    def count(self) -> int:
        return self.shape[0] * self.period[0] * self.period[1]


def probe_layout(maps: list[LinearMap], side: str) -> ProbeLayout | None:
    """The colored probes of the chain ``maps`` (application order) on ``side`` ("in" or "out"), or None (identity
    probes) unless every map is a zero-padded conv or a channel scale on (C, H, W) tensors."""
    receptive, jump = [1, 1], [1, 1]
    for m in maps:
        if m.kind == "diag" and len(m.in_shape) == 3:
            continue
        if m.kind != "conv2d" or m.geometry.padding_mode != "zeros":
            return None
        g = m.geometry
        for axis in range(2):
            receptive[axis] += g.dilation[axis] * (g.kernel_size[axis] - 1) * jump[axis]
            jump[axis] *= g.stride[axis]
    shape = tuple(maps[0].in_shape if side == "in" else maps[-1].out_shape)
    if len(shape) != 3:
        return None
    if side == "in":
        radius = (receptive[0] - 1, receptive[1] - 1)
    else:
        radius = ((receptive[0] - 1) // jump[0], (receptive[1] - 1) // jump[1])
    period = tuple(min(2 * r + 1, n) for r, n in zip(radius, shape[1:]))
    return ProbeLayout(shape, period, radius)


def _probes(layout: ProbeLayout | None, size: int, lo: int, hi: int, dtype, device) -> torch.Tensor:
    """Probes lo..hi−1 as rows (hi − lo, size)."""
    rows = torch.arange(lo, hi, device=device)
    out = torch.zeros(hi - lo, size, dtype=dtype, device=device)
    if layout is None:
        out[torch.arange(hi - lo, device=device), rows] = 1.0
        return out
    c, h, w = layout.shape
    ph, pw = layout.period
    channel, phase = rows // (ph * pw), rows % (ph * pw)
    on_h = (torch.arange(h, device=device)[None, :] % ph) == (phase // pw)[:, None]  # (b, H)
    on_w = (torch.arange(w, device=device)[None, :] % pw) == (phase % pw)[:, None]  # (b, W)
    pixels = (on_h[:, :, None] & on_w[:, None, :]).to(dtype)  # (b, H, W)
    view = out.view(hi - lo, c, h, w)
    view[torch.arange(hi - lo, device=device), channel] = pixels
    return out


def _assemble(z: torch.Tensor, layout: ProbeLayout | None) -> torch.Tensor:
    """Ĝᵀ (s, s) from the probe results z (p, s): row x is the row of x's probe, kept on x's window."""
    if layout is None:
        return z
    c, h, w = layout.shape
    ph, pw = layout.period
    device = z.device
    hh = torch.arange(h, device=device)
    ww = torch.arange(w, device=device)
    phase = ((hh % ph)[:, None] * pw + (ww % pw)[None, :]).reshape(-1)  # (H·W,)
    index = (torch.arange(c, device=device)[:, None] * (ph * pw) + phase[None, :]).reshape(-1)
    g = z.index_select(0, index)  # (s, s)
    near_h = (hh[:, None] - hh[None, :]).abs() <= layout.radius[0]
    near_w = (ww[:, None] - ww[None, :]).abs() <= layout.radius[1]
    window = (near_h[:, None, :, None] & near_w[None, :, None, :]).to(z.dtype)  # (H, W, H, W)
    g.view(c, h, w, c, h, w).mul_(window[None, :, :, None])
    return g


def _sum_squares_upper(x: torch.Tensor) -> float:
    """An upper bound of Σ x² (computed products and sum, any order)."""
    flat = x.flatten()
    n = flat.numel()
    computed = float(flat @ flat)
    divisor = _one_minus_gamma(n + 1)
    return _div(_add(computed, _mul(n, _ETA)), divisor) if divisor > 0 else math.inf


class GramChain(NamedTuple):
    """A chain's certified Gram: λ_max(G) ≤ ``eigenvalue`` + β·e₁ + e₂ (β = ‖B‖₂), where ``eigenvalue`` bounds
    λ_max(Ŝ) plus the symmetrization's rounding (inf where the certificate failed) and e₁ = Σ U[a, b]·φ over the
    pairs (a, b, φ) of ``first``, e₂ over ``second``."""

    eigenvalue: float
    first: list
    second: list

    def norm_bound(self, e1: float, e2: float) -> float:
        """The bound on β = ‖B‖₂ given e₁, e₂ (the module docstring's quadratic)."""
        if not math.isfinite(self.eigenvalue):
            return math.inf
        c = _add(self.eigenvalue, e2)
        return _div(_add(e1, _sqrt(_add(_mul(e1, e1), _mul(4.0, c)))), 2.0)


def _steps(first: int, last: int, side: str) -> list[tuple[int, bool]]:
    forward = [(t, True) for t in range(first, last + 1)]
    adjoint = [(t, False) for t in range(last, first - 1, -1)]
    return forward + adjoint if side == "in" else adjoint + forward


def _phi(m: LinearMap, forward: bool, squares: float, count: int, abs_norm: float) -> float:
    """φ of one step: γ_n·‖|A|‖₂·‖X̂‖_F + μ·√(entries) (module docstring), ``squares`` ≥ ‖X̂‖_F²."""
    n = m.accumulation_length() if forward else m.adjoint_accumulation_length()
    entries = count * (m.out_features if forward else m.in_features)
    return _add(_mul(_mul(_gamma(n), abs_norm), _sqrt(squares)), _mul(_mul(n, _ETA), _sqrt(float(entries))))


def _group_sweep(maps, side: str, anchor: int, ends: list[int], layout, abs_norms: dict) -> dict:
    """The probes of one side of maps[anchor] pushed through the chains that share it, the shared part once:
    side "in": chains (anchor, k) for k in ``ends`` (forward from the anchor, then back from each k); side "out":
    chains (j, anchor) for j in ``ends`` (adjoint from the anchor, then forward from each j). Returns {end: (z
    (p, s), φ of every step in :func:`_steps` order)}."""
    forward_first = side == "in"
    far = max(ends) if forward_first else min(ends)
    shared = range(anchor, far + 1) if forward_first else range(anchor, far - 1, -1)
    size = maps[anchor].in_features if forward_first else maps[anchor].out_features
    count = size if layout is None else layout.count
    device = maps[anchor].weight.device
    span = range(min(anchor, far), max(anchor, far) + 1)
    weights = {t: maps[t].weight.detach().to(torch.float64) for t in span}
    widest = max(max(maps[t].in_features, maps[t].out_features) for t in span)
    batch = max(1, min(count, _BATCH_ELEMENTS // widest))
    shared_squares = dict.fromkeys(shared, 0.0)
    branch_squares = {e: {} for e in ends}
    parts = {e: [] for e in ends}

    def step(t, forward, x):  # (B, *shape) kept as the maps return it (channels-last convs stay so)
        return (maps[t].forward if forward else maps[t].adjoint)(x, weights[t])

    side_shape = maps[anchor].in_shape if forward_first else maps[anchor].out_shape
    for lo in range(0, count, batch):
        hi = min(count, lo + batch)
        x = _probes(layout, size, lo, hi, torch.float64, device).view(hi - lo, *side_shape)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)  # faster float64 transposed convs on the CPU
        for t in shared:
            shared_squares[t] = _add(shared_squares[t], _sum_squares_upper(x))
            x = step(t, forward_first, x)
            if t in parts:
                y = x
                back = range(t, anchor - 1, -1) if forward_first else range(t, anchor + 1)
                for t2 in back:
                    branch_squares[t][t2] = _add(branch_squares[t].get(t2, 0.0), _sum_squares_upper(y))
                    y = step(t2, not forward_first, y)
                parts[t].append(y.reshape(hi - lo, -1))
    out = {}
    for e in ends:
        first, last = (anchor, e) if forward_first else (e, anchor)
        phis = []
        for t, forward in _steps(first, last, side):
            squares = shared_squares[t] if forward == forward_first else branch_squares[e][t]
            phis.append(_phi(maps[t], forward, squares, count, abs_norms[t]))
        out[e] = (torch.cat(parts.pop(e)), phis)
    return out


def _probe_sweep(maps, first: int, last: int, side: str, layout, abs_norms: dict) -> tuple[torch.Tensor, list]:
    """One chain's z (p, s) and φ of every step (in ``_steps`` order)."""
    anchor, end = (first, last) if side == "in" else (last, first)
    return _group_sweep(maps, side, anchor, [end], layout, abs_norms)[end]


def _estimate(maps, first: int, last: int, n_iter: int = 400) -> float:
    """σ̂ ≈ ‖A_last ⋯ A_first‖₂ by Lanczos on the chain (an estimate; NaN for a zero or non-finite map, inf past
    the float range: the certificate then refuses)."""
    from lipkern.bounds.spectral import _lanczos_top

    weights, exponent = {}, 0  # each weight scaled by a power of two to a largest entry in [0.5, 1): no overflow
    for t in range(first, last + 1):
        w = maps[t].weight.detach().to(torch.float64)
        largest = float(w.abs().max()) if w.numel() else 0.0
        if not 0.0 < largest < math.inf:
            return math.nan  # a zero or non-finite map: nothing to certify here
        e = math.frexp(largest)[1]
        weights[t], exponent = times_power_of_two(w, -e), exponent + e

    def apply(x):
        for t in range(first, last + 1):
            x = maps[t].forward(x[None], weights[t]).reshape(-1)
        return x

    def adjoint(y):
        for t in range(last, first - 1, -1):
            y = maps[t].adjoint(y[None], weights[t]).reshape(-1)
        return y

    size = maps[first].in_features
    device = maps[first].weight.device
    u0 = 1.0 + torch.arange(size, dtype=torch.float64, device=device).sin()  # generic start
    u, _ = _lanczos_top(apply, adjoint, u0, n_iter, 1e-10)
    scaled = float(torch.linalg.vector_norm(apply(u)) / torch.linalg.vector_norm(u))
    try:
        return math.ldexp(scaled, exponent)
    except OverflowError:
        return math.inf


class BandedGram:
    """Ŝ = (Ĝ + Ĝᵀ)/2 of a local Gram on (C, H, W), block-banded by pixel rows: block (i, j) holds the W·C
    entries of pixel rows i and j ((w, c) order) and is zero unless |i − j| ≤ ``bandwidth``. Blocks are built
    from the probe results z (p, s) on demand, never the dense s × s matrix (memory: the band)."""

    def __init__(self, z: torch.Tensor, layout: ProbeLayout):
        self.layout, self.shape = layout, layout.shape
        c, h, w = layout.shape
        self.bandwidth = min(layout.radius[0], h - 1)
        ph, pw = layout.period
        device = z.device
        self.rows = z.view(-1, c, h, w).permute(2, 0, 3, 1).reshape(h, -1, w * c)  # rows[j]: (p, W·C) of row j
        ww = torch.arange(w, device=device)
        cc = torch.arange(c, device=device)
        self.probe_of = [(cc[None, :] * (ph * pw) + (i % ph) * pw + (ww % pw)[:, None]).reshape(-1) for i in range(h)]
        near = ((ww[:, None] - ww[None, :]).abs() <= layout.radius[1]).to(z.dtype)
        self.window = near[:, None, :, None].expand(w, c, w, c).reshape(w * c, w * c)

    def _t(self, i: int, j: int) -> torch.Tensor:  # Ĝᵀ[i, j]
        return self.rows[j].index_select(0, self.probe_of[i]) * self.window

    def block(self, i: int, j: int) -> torch.Tensor:
        """Ŝ[i, j] for |i − j| ≤ bandwidth (a new tensor; Ŝ[j, i] is its exact transpose)."""
        out = self._t(i, j).add_(self._t(j, i).mT)
        return out.mul_(0.5)

    def blocks(self) -> list[list[torch.Tensor]]:
        """blocks[i][d] = Ŝ[i, i − d] for d = 0..min(i, bandwidth)."""
        return [[self.block(i, i - d) for d in range(min(self.bandwidth, i) + 1)] for i in range(self.shape[1])]



def _band_costs(layout: ProbeLayout) -> tuple[float, int]:
    """(Cholesky flops, stored entries) of the pixel-row band of a local Gram."""
    c, h, w = layout.shape
    b, bw = w * c, min(layout.radius[0], h - 1)
    return h * (bw * (bw + 1) + bw + 1 / 3) * float(b) ** 3, h * (bw + 1) * b * b


def _use_band(layout: ProbeLayout | None, device: torch.device) -> bool:
    """A local Gram is factored on its band where that costs less than half the dense Cholesky, on the CPU (its
    triangular solves are LAPACK's dtrsm, the kernel dpotrf itself uses; on a GPU, whose trsm may invert
    diagonal blocks, the dense cuSOLVER potrf of :mod:`lipkern.bounds.certificate`'s assumptions is kept)."""
    return (device.type == "cpu" and layout is not None
            and _band_costs(layout)[0] < math.prod(layout.shape) ** 3 / 6)


def _multiply_adds(m: LinearMap) -> int:
    """Multiply-adds of one application of the map to one vector."""
    if m.kind == "conv2d":
        return m.out_features * m.accumulation_length()
    return m.in_features * m.out_features if m.kind == "dense" else m.in_features


def gram_costs(maps: list[LinearMap], side: str) -> tuple[int, float]:
    """(stored float64 entries, flops) of the certificate of the chain ``maps`` on ``side``: the probe sweeps
    (2 flops per multiply-add, there and back) and the Cholesky (band or dense)."""
    layout = probe_layout(maps, side)
    size = maps[0].in_features if side == "in" else maps[-1].out_features
    probes = size if layout is None else layout.count
    sweeps = 4.0 * probes * sum(_multiply_adds(m) for m in maps)
    if _use_band(layout, maps[0].weight.device):
        flops, entries = _band_costs(layout)
        return entries + probes * size, sweeps + flops  # the band and the probe results
    return 2 * size * size, sweeps + float(size) ** 3 / 3  # the Gram and its factor


def _dense_cholesky_ok(k: torch.Tensor) -> bool:
    _, info = torch.linalg.cholesky_ex(k)
    return int(info) == 0


def _banded_cholesky_ok(blocks: list[list[torch.Tensor]], bandwidth: int) -> bool:
    """Block Cholesky of the block-banded K given as blocks[i][d] = K[i, i − d] (d = 0..min(i, bandwidth)),
    in place: the dense algorithm in one order of its inner products (GEMM updates, a triangular solve by
    substitution, potrf on the diagonal blocks: the kernels LAPACK's own blocked potrf is made of); the
    entries outside the band stay exact zeros."""
    for i in range(len(blocks)):
        for d in range(min(bandwidth, i), -1, -1):
            j = i - d
            a = blocks[i][d]
            for kk in range(max(0, i - bandwidth), j):
                a.sub_(blocks[i][i - kk] @ blocks[j][j - kk].mT)
            if d:
                blocks[i][d] = torch.linalg.solve_triangular(blocks[j][0].mT, a, upper=True, left=False)
            else:
                factor, info = torch.linalg.cholesky_ex(a)
                if int(info) != 0:
                    return False
                blocks[i][0] = factor
    return True


def _shift_certificate(diagonal: torch.Tensor, estimate: float, factor_ok, refine: int = 0) -> float:
    """The certificate's loop: for ρ in the shifts, λ₀ = (1 + ρ)·estimate and K's diagonal fl(λ₀ − Ŝ_ii);
    ``factor_ok(k_diagonal)`` runs the Cholesky. The bound on λ_max(Ŝ) of the first success, or inf; with
    ``refine`` > 0, up to that many more Cholesky factorizations bisect between the last shift that failed and
    the one that succeeded (for a rough estimate where factoring is cheap), each success a bound."""
    gc = _gamma_cholesky(diagonal.numel())

    def bound(lam0, k_diagonal):
        k_diag = k_diagonal.tolist()
        trace = math.nextafter(math.fsum(k_diag), math.inf)
        slack = _add(_mul(_div(gc, 1 - gc), trace), _mul(_div(_U, 1 - _U), max(k_diag)))
        return _add(lam0, slack, _TAU)

    failed = None
    if 0.0 <= estimate < _LAMBDA_RANGE[0]:  # a (near-)zero chain, e.g. one that only ever reads padding
        estimate = _LAMBDA_RANGE[0]  # certified at the range's floor: a bound of ~2⁻⁵⁰⁰
    for rho in _SHIFTS:
        lam0 = _up((1 + rho) * estimate)
        if not _LAMBDA_RANGE[0] <= lam0 <= _LAMBDA_RANGE[1]:
            return math.inf
        k_diagonal = lam0 - diagonal  # fl(λ₀ − Ŝ_ii)
        if factor_ok(k_diagonal):
            best = bound(lam0, k_diagonal)
            for _ in range(refine if failed is not None else 0):
                if lam0 - failed <= _SHIFTS[0] * lam0:
                    break
                middle = _up((failed + lam0) / 2)
                k_diagonal = middle - diagonal
                if factor_ok(k_diagonal):
                    lam0, best = middle, min(best, bound(middle, k_diagonal))
                else:
                    failed = middle
            return best
        failed = lam0
    return math.inf


def certified_top_eigenvalue(s: torch.Tensor, estimate: float, refine: int = 0) -> float:
    """A guaranteed upper bound of λ_max(S) for an exactly symmetric float64 (n, n) S (consumed: overwritten by
    K), by the module docstring's certificate at λ₀ = (1 + ρ)·``estimate`` for the shifts ρ in turn (then
    ``refine`` bisection steps); inf if none succeeds."""
    diagonal = s.diagonal().clone()
    s.neg_()

    def factor_ok(k_diagonal):
        s.diagonal().copy_(k_diagonal)
        return _dense_cholesky_ok(s)

    return _shift_certificate(diagonal, estimate, factor_ok, refine)


def certified_top_eigenvalue_banded(gram: BandedGram, estimate: float, refine: int = 0) -> float:
    """:func:`certified_top_eigenvalue` of a :class:`BandedGram`, factored on its band."""
    diagonal = torch.cat([gram.block(i, i).diagonal() for i in range(gram.shape[1])])

    def factor_ok(k_diagonal):
        blocks = gram.blocks()
        size = blocks[0][0].shape[0]
        for i, row in enumerate(blocks):
            for block in row:
                block.neg_()
            row[0].diagonal().copy_(k_diagonal[i * size:(i + 1) * size])
        return _banded_cholesky_ok(blocks, gram.bandwidth)

    return _shift_certificate(diagonal, estimate, factor_ok, refine)


def _frobenius_squares_upper(gram: BandedGram) -> float:
    """‖Ŝ‖_F² from above (off-diagonal blocks count twice)."""
    total = 0.0
    for i in range(gram.shape[1]):
        for d in range(min(gram.bandwidth, i) + 1):
            total = _add(total, _mul(1.0 if d == 0 else 2.0, _sum_squares_upper(gram.block(i, i - d))))
    return total


def _cholesky_flops(layout, size: int, device) -> float:
    return _band_costs(layout)[0] if _use_band(layout, device) else float(size) ** 3 / 3


def _certify(maps, first: int, last: int, side: str, layout, swept: dict, end: int) -> GramChain:
    z, phis = swept.pop(end)  # the only reference from here on: freed before the factorization
    size = z.shape[1]
    # where factoring is cheap, a rough estimate (2 Lanczos cycles) and ≤ 24 bisection steps by factorizations
    # cost less than the ~400 steps (800 operator applications) of an estimate accurate to ~1e-10
    lanczos = 800.0 * (2 * sum(_multiply_adds(maps[t]) for t in range(first, last + 1)) + _APPLY_OVERHEAD)
    cheap = 24 * _cholesky_flops(layout, size, z.device) <= lanczos
    sigma = _estimate(maps, first, last, 64 if cheap else 400)
    refine = 24 if cheap else 6  # 6 halvings: a shift of 1e-4 that succeeded after 1e-6 failed, to ~1.5e-6
    if not bool(torch.isfinite(z).all()):  # an overflowed sweep: no certificate (the splits remain)
        sigma = math.nan
    if _use_band(layout, z.device):
        banded = BandedGram(z, layout)
        squares = _frobenius_squares_upper(banded)
        eigenvalue = certified_top_eigenvalue_banded(banded, sigma * sigma, refine)
    else:
        g = _assemble(z, layout)
        del z
        s = g + g.mT  # exactly symmetric; Ŝ = s/2 (exact halving up to subnormals)
        del g
        s.mul_(0.5)
        squares = _sum_squares_upper(s)
        eigenvalue = certified_top_eigenvalue(s, sigma * sigma, refine)
        del s
    symmetrize = _add(_mul(_U, _sqrt(squares)), _mul(size, _ETA))
    steps = _steps(first, last, side)
    half = last - first + 1
    pairs = [(t + 1, last, phi) if forward else (first, t - 1, phi) for (t, forward), phi in zip(steps, phis)]
    return GramChain(_add(eigenvalue, symmetrize), pairs[:half], pairs[half:])


def _probe_key(layout: ProbeLayout | None):
    """Layouts with one pixel per probe are the identity probes (same order): they share sweeps."""
    return None if layout is None or layout.period == layout.shape[1:] else layout


def gram_chains(maps: list[LinearMap], chains: dict, abs_norms: dict) -> dict:
    """{(j, k): GramChain} for ``chains`` {(j, k): side} ("in" or "out"), float64 maps; abs_norms[t] ≥ ‖|A_t|‖₂.
    Chains with the same side, anchor map and probes share the first half of their sweeps. Error pairs index the
    full ``maps`` list (U[a, b] with a > b: the empty chain, 1)."""
    groups: dict = {}
    layouts = {}
    for (j, k), side in chains.items():
        layouts[(j, k)] = probe_layout(maps[j:k + 1], side)
        anchor, end = (j, k) if side == "in" else (k, j)
        groups.setdefault((side, anchor, _probe_key(layouts[(j, k)])), []).append(end)
    out = {}
    for (side, anchor, key), ends in groups.items():
        swept = _group_sweep(maps, side, anchor, sorted(ends), key, abs_norms)
        for end in sorted(ends):
            j, k = (anchor, end) if side == "in" else (end, anchor)
            out[(j, k)] = _certify(maps, j, k, side, layouts[(j, k)], swept, end)
    return out


def gram_chain(maps: list[LinearMap], first: int, last: int, side: str, abs_norms: dict) -> GramChain:
    """The certified Gram of the chain maps[first..last] on ``side``: :func:`gram_chains` for one chain."""
    return gram_chains(maps, {(first, last): side}, abs_norms)[(first, last)]

