"""AOL rescaling (Prach & Lampert 2022): W -> W · diag(d), d_i = (Σ_j |WᵀW|_ij)^(-1/2), with a proven margin.

For a conv weight (out, in/groups, kh, kw) the sum runs over all output channels of the group and over the
(2kh-1)(2kw-1) spatial shifts of the kernel's self-correlation, so ‖conv(W·d)‖₂ ≤ 1 for zero, 'same' and
circular padding, any input size, any dilation; a strided conv is that conv followed by subsampling, so it
is 1-Lipschitz too. A zero input column gets d_i = 0 (it stays zero, no NaN).

Notation, per group: M_s[i, j] = Σ_o Σ_x W[o, i, x + s] W[o, j, x] for a shift s of the kernel (M_{-s} = M_sᵀ),
r_i = Σ_s Σ_j |M_s[i, j]|; P_s = the same correlation of |W|, S_i = Σ_s Σ_j P_s[i, j] = Σ_o C_oi R_o with
C_oi = Σ_x |W[o, i, x]|, R_o = Σ_i C_oi (one GEMV).

**The margin (why the stored weight is 1-Lipschitz, rounding included).** For any positive d and any weight
W' with |W'ᵀW'|-correlations bounded entrywise by d_i d_j (|M_s| + c P_s)_ij, the weighted Schur test on the
circular operator (which contains every zero-padded one as a block) gives ‖conv(W')‖² ≤ max_i d_i² (r_i + c S_i).
The op computes, in float64,  r̂_i = (Σ|M̂_s[i, j]| + (ε_gram + c_out) S_i + ε_abs T_i)·(1 + n·2⁻⁵²)  and
d_i = RD((r̂_i)^(-1/2)), so d_i² (r_i + c_out S_i) ≤ 1, where
- ε_gram bounds the error of each computed M̂_s[i, j] relative to P_s[i, j] (K = out_g·kh·kw products):
  * ``fp64`` (default; float64 tensor-core MMA, or float64 FMA/BLAS): weights of ≤ 24-bit significand have
    exact products in float64; each accumulation step errs by ≤ 2⁻⁵³ of the running |sum| (2⁻⁵² assumed):
    ε = (K + 2)·2⁻⁵².
  * ``tf32x3`` (3 TF32 MMAs, fresh accumulator per chunk of B = 32 output channels, chunks summed in float64):
    a = a_big + a_small + δ with |a − a_big| ≤ 2⁻¹⁰|a| and |δ| ≤ 2⁻²⁰|a| (round-to-nearest or truncation),
    so the dropped terms a_small·b_small, δ·b, a·δ' cost ≤ 3.01·2⁻²⁰|a||b|; TF32 products are exact in the
    FP32 accumulator, whose chain of 3B terms errs by ≤ 2⁻²² per term of Σ|terms| (a hardware model 1.6×
    looser than the alignment-and-truncation behaviour measured by Fasi et al. 2021, "Numerical behavior of
    NVIDIA tensor cores"); flushed subnormals cost ≤ 2⁻¹²⁵ per operand and operation: ε_abs = 2⁻¹²⁴ with
    T_i = in_g·kk·Σ_o C_oi + kk·Σ_o R_o + in_g·out_g·kk². ε = 3.01·2⁻²⁰ + 3.03·B·2⁻²² + (K + 2)·2⁻⁵².
- c_out = 2u + u² with u = unit roundoff of the stored weight's dtype plus that of the W·d product: the stored
  W'_oi = W_oi d_i (1 + δ_oi), |δ_oi| ≤ u, is covered (its correlations obey the bound above with c = c_out).
  * ``fp32`` (the CPU path's float32 GEMMs, IEEE products): an entry of P[i, a, b, j] = Σ_o W[o, i, a] W[o, j, b]
    is a dot product of out_g terms, M_s sums ≤ kk entries of P: ε = γ_{out_g+kk} (any summation order);
    underflow costs ≤ 2⁻¹²⁶ per flushed operand, product or sum: ε_abs = 2⁻¹²⁴ with T_i as in
    ``_torch_path_constants``. The CPU's ``auto`` keeps it where ε·S_i + ε_abs·T_i ≤ 2⁻¹²·r̂_i for every i (a
    host read, free on the CPU), else redoes the sums in float64. With ``torch.set_flush_denormal(True)``
    (denormals-are-zero) the float32 → float64 conversion reads a subnormal weight as 0: the torch path's fp64
    scheme adds the operand terms of T_i with ε_abs = 2⁻¹²⁴ too (tested with flushed denormals).
Costs (r̂/r − 1 = (ε + c_out) S/r): see ``benchmarks/NOTES.md``; ``LIPKERN_AOL_GRAM`` picks the scheme.

Backward, with a_i = ∂L/∂r_i = −½ d_i³ (Σ_{o,x} G[o, i, x] W[o, i, x] + ∂L/∂d_i) and G = ∂L/∂W' (the margin
terms are treated as constants, gradients are not certified and use TF32 tensor cores):
    ∂L/∂W[o, c, x] = G[o, c, x] d_c + Σ_s Σ_j T_s[c, j] W[o, j, x − s],  T_s[c, j] = (a_c + a_j) sign(M_s[c, j]).
The forward saves sign(M_s) for the shifts s ≥ 0 (int8); the backward builds T once (all shifts, one launch),
then one GEMM-like kernel per (tap, output tile).

Non-finite weights are not checked here (that would synchronize the device in every training step): a NaN or
±Inf weight makes r̂ non-finite, and d is then NaN, so the rescaled weight, the layer's output and the loss are
NaN, never a plausible wrong value. Eval caches and exports check (see ``lipkern.nn.aol``).

Layout of this file: error bounds, reference, Triton kernels, launchers, torch path, registration, public
function.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy
import torch
import torch.nn.functional as F

from lipkern import _cpu_kernels
from lipkern._rounding import cast_up
from lipkern._dispatch import (AOL_GRAM_SCHEMES, config, device_context, record_implementation, select_backend,
                               tracing, triton_importable)
from lipkern.ops._registration import _autocast_device, define_op
from lipkern.ops.power_iteration import times_power_of_two

__all__ = ["aol_rescale", "aol_rescale_ref", "gram_error_bound", "output_rounding_margin"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GRAM_PRECISIONS = AOL_GRAM_SCHEMES
_TF32X3_CHUNK = 32  # output channels per fresh TF32 accumulator (B in the error bound)
_MIN_PROGRAMS = 264  # two waves of a 132-SM GPU


# ----------------------------------------------------------------------------------------------------------
# 1. Error bounds (see the module docstring for the derivation).
# ----------------------------------------------------------------------------------------------------------
def _requested_gram() -> str:
    return config().aol_gram


def gram_precision(weight_dtype: torch.dtype) -> str:
    """The Gram scheme of the Triton path: tf32x3 when ``LIPKERN_AOL_GRAM=tf32x3`` (not for float64 weights),
    else fp64. (The torch path's scheme: ``_torch_scheme``.)"""
    return "tf32x3" if _requested_gram() == "tf32x3" and weight_dtype != torch.float64 else "fp64"


def gram_error_bound(precision: str, out_g: int, kk: int, weight_dtype: torch.dtype) -> tuple[float, float]:
    """(ε_gram, ε_abs): each computed M̂_s[i, j] is within ε_gram·P_s[i, j] + ε_abs·(its share of T_i).

    fp32 (the torch path's GEMM form, IEEE float32 products): an entry of P is a dot product of out_g terms
    (γ_{out_g}), M_s sums ≤ kk of them (γ_{kk−1}), so ε = γ_{out_g+kk} = n·2⁻²⁴/(1 − n·2⁻²⁴); flushed or
    gradual underflow costs ≤ 2⁻¹²⁶ per operand and operation, covered by ε_abs = 2⁻¹²⁴ (T_i in the docstring
    of ``_torch_path_constants``)."""
    k_terms = out_g * kk
    chain = (k_terms + 2) * 2.0**-52
    if precision == "fp64":
        return chain, (2.0**-1020 if weight_dtype == torch.float64 else 0.0)
    if precision == "fp32":
        n = (out_g + kk) * 2.0**-24
        return n / (1 - n), 2.0**-124
    if precision == "tf32x3":
        return 3.01 * 2.0**-20 + 3.03 * _TF32X3_CHUNK * 2.0**-22 + chain, 2.0**-124
    raise ValueError(f"unknown Gram precision {precision!r}")


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_rounding_margin(dtype: torch.dtype) -> float:
    """c_out = 2u + u²: the stored weight fl(W·d) (product in the accumulation dtype, then cast) is covered."""
    acc = _acc_dtype(dtype)
    u = _unit_roundoff(acc) if dtype == acc else _unit_roundoff(dtype) + _unit_roundoff(acc)
    return 2 * u + u * u


def _slack_coefficients(precision: str, out_g: int, kk: int, dtype: torch.dtype) -> tuple[float, float]:
    """(c, ε_abs) of the slack c·S_i + ε_abs·T_i. c = (ε_gram + c_out)(1 + 2⁻²⁰): the factor covers the float64
    rounding of S_i and of the product (relative ≤ (in_g + out_g + kk + 3)·2⁻⁵³); ε_abs carries a factor 2 of
    headroom over the modelled 2⁻¹²⁵ for T_i's rounding."""
    eps, eps_abs = gram_error_bound(precision, out_g, kk, dtype)
    return (eps + output_rounding_margin(dtype)) * (1 + 2.0**-20), eps_abs


def _scale_margin(dtype: torch.dtype, out_g: int, in_g: int, kk: int) -> float:
    """m of d = (1 − m)·r̂^(-1/2) (float64, then cast toward zero): 2⁻⁴⁹ / 2⁻²² covers the float64 sqrt and
    division; the rest covers stored entries that are subnormal, where rounding errs by an absolute
    η ≤ half the subnormal spacing (of the product's and the stored dtype) instead of u relative: such an error
    matrix E has ‖conv(E)‖ ≤ Σ_taps ‖E_tap‖₂ ≤ kk·η·√(out_g·in_g), so ‖conv(W')‖ ≤ (1 − m) + kk·η·√(out_g·in_g)
    ≤ 1 once m exceeds that term (fp16: 2⁻²⁵·kk·√(out_g·in_g), 1.4e-4 at 512×512×3×3; fp32/bf16 ≈ 1e-37)."""
    acc = _acc_dtype(dtype)
    eta = sum(torch.finfo(t).tiny * torch.finfo(t).eps / 2 for t in {dtype, acc})
    base = 2.0**-49 if dtype == torch.float64 else 2.0**-22
    return _float32_up((base + kk * eta * math.sqrt(out_g * in_g)) * (1 + 2.0**-20))


# ----------------------------------------------------------------------------------------------------------
# 2. Reference: the specification, the CPU path of last resort and the test oracle.
# ----------------------------------------------------------------------------------------------------------
def _safe_rsqrt(r: torch.Tensor) -> torch.Tensor:
    """r^(-1/2), 0 where r == 0 (differentiable: no inf*0 in the backward), NaN stays NaN."""
    zero = r == 0
    return torch.where(zero, torch.zeros_like(r), torch.rsqrt(torch.where(zero, torch.ones_like(r), r)))


def _self_correlation(w: torch.Tensor) -> torch.Tensor:
    """(out, in, kh, kw) -> (in, in, 2kh-1, 2kw-1), entry [i, j, s + k - 1] = M_s[i, j]."""
    kh, kw = w.shape[-2:]
    wt = w.transpose(0, 1)
    return F.conv2d(wt, wt, padding=(kh - 1, kw - 1))


def _abs_mass(w: torch.Tensor) -> torch.Tensor:
    """S_i = Σ_o C_oi R_o for one group's weight (out_g, in_g, kh, kw)."""
    c = w.abs().sum((2, 3))
    return c.T @ c.sum(1)


def aol_rescale_ref(weight: torch.Tensor, groups: int = 1, return_scale: bool = False, margin: float = 0.0):
    """Plain PyTorch AOL rescaling (differentiable through autograd). See :func:`aol_rescale`.

    ``margin`` = c adds c·S_i to r_i (S_i as in the module docstring, treated as a constant): the exact
    counterpart of the op's rounding margin, for tests. ``margin=0`` is the paper's formula."""
    _validate(weight, groups)
    w4 = weight if weight.dim() == 4 else weight[:, :, None, None]
    w4 = w4.to(_acc_dtype(weight.dtype))
    out_g = w4.shape[0] // groups
    scales, scaled = [], []
    for g in range(groups):
        wg = w4[g * out_g:(g + 1) * out_g]
        r = _self_correlation(wg).abs().sum(dim=(1, 2, 3))
        if margin:
            r = r + margin * _abs_mass(wg.detach())
        d = _safe_rsqrt(r)
        scales.append(d)
        scaled.append(wg * d[None, :, None, None])
    out = torch.cat(scaled).reshape(weight.shape).to(weight.dtype)
    return (out, torch.stack(scales)) if return_scale else out


# ----------------------------------------------------------------------------------------------------------
# 3. Triton kernels (only defined when triton imports).
# ----------------------------------------------------------------------------------------------------------
if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _aol_prep_kernel(w_ptr, wp_ptr, col_abs_ptr, row_abs_ptr, N_OUT, OUT_G, IN_G,
                         KK: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
        """One pass over W (out, in_g, kk): wp = W as (groups, kk, in_g, out_g) (output channels contiguous: the
        reduction axis of the Gram products), C[o, i] = Σ_x |W[o, i, x]| and R[o] = Σ_i C[o, i] in float64."""
        offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        mask_o = offs_o < N_OUT
        g = offs_o // OUT_G
        o_in_group = offs_o % OUT_G
        offs_k = tl.arange(0, BLOCK_K)
        row_sum = tl.zeros((BLOCK_O,), dtype=tl.float64)
        for c0 in range(0, IN_G, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = mask_o[:, None, None] & (offs_c < IN_G)[None, :, None] & (offs_k < KK)[None, None, :]
            src = (offs_o[:, None, None] * IN_G + offs_c[None, :, None]) * KK + offs_k[None, None, :]
            w = tl.load(w_ptr + src, mask=mask, other=0.0)
            dst = ((g[:, None, None] * KK + offs_k[None, None, :]) * IN_G + offs_c[None, :, None]) * OUT_G \
                + o_in_group[:, None, None]
            tl.store(wp_ptr + dst, w, mask=mask)
            col = tl.sum(tl.abs(w.to(tl.float64)), axis=2)
            tl.store(col_abs_ptr + offs_o[:, None] * IN_G + offs_c[None, :], col,
                     mask=mask_o[:, None] & (offs_c < IN_G)[None, :])
            row_sum += tl.sum(col, axis=1)
        tl.store(row_abs_ptr + offs_o, row_sum, mask=mask_o)

    @triton.jit
    def _aol_gram_kernel(wp_ptr, col_abs_ptr, row_abs_ptr, partial_ptr, sign_ptr, slack_ptr, OUT_G, IN_G, GROUPS,
                         EPS_REL, EPS_ABS_BASE, KH: tl.constexpr, KW: tl.constexpr, N_BLOCKS,
                         BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, TF32X3: tl.constexpr,
                         EPS_ABS_POWER: tl.constexpr):
        """One (group × shift s ≥ 0, i-block, j-block) tile of M̂_s: row and column sums of |M̂_s| into partial
        slots (float64, each written once), sign(M̂_s) (int8). M_0 is symmetric: only j-blocks ≥ i-blocks are
        computed, the others write zeros. The diagonal tiles of s = 0 also write the margin ε·S_i + ε_abs·T_i
        (ε_abs = EPS_ABS_BASE^EPS_ABS_POWER, formed in float64: scalar arguments are float32; slack −1 marks a
        zero column).

        Products: float64 MMA on float64 operands (exact products), or TF32x3 MMAs on chunks of BLOCK_O output
        channels, each chunk's float32 result added to a float64 accumulator."""
        NW: tl.constexpr = 2 * KW - 1
        CENTER: tl.constexpr = ((2 * KH - 1) * NW - 1) // 2
        N_HALF: tl.constexpr = CENTER + 1
        KK: tl.constexpr = KH * KW
        g = tl.program_id(0) // N_HALF
        h = tl.program_id(0) % N_HALF
        ib = tl.program_id(1)
        jb = tl.program_id(2)
        f = h + CENTER
        p = f // NW - (KH - 1)
        q = f % NW - (KW - 1)
        offs_i = ib * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_j = jb * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_i = offs_i < IN_G
        mask_j = offs_j < IN_G
        row_slot = (h * 2) * N_BLOCKS + jb
        col_slot = (h * 2 + 1) * N_BLOCKS + ib
        lower = (h == 0) & (jb < ib)  # mirrored by the (jb, ib) tile
        plane = IN_G * OUT_G
        acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float64)
        if not lower:
            for a in range(tl.maximum(0, -p), tl.minimum(KH, KH - p)):
                for b in range(tl.maximum(0, -q), tl.minimum(KW, KW - q)):
                    base_i = wp_ptr + ((g * KH + a + p) * KW + b + q) * plane
                    base_j = wp_ptr + ((g * KH + a) * KW + b) * plane
                    for o0 in range(0, OUT_G, BLOCK_O):
                        offs_o = o0 + tl.arange(0, BLOCK_O)
                        mask_o = offs_o < OUT_G
                        wi = tl.load(base_i + offs_i[:, None] * OUT_G + offs_o[None, :],
                                     mask=mask_i[:, None] & mask_o[None, :], other=0.0)
                        wj = tl.load(base_j + offs_j[:, None] * OUT_G + offs_o[None, :],
                                     mask=mask_j[:, None] & mask_o[None, :], other=0.0)
                        if TF32X3:
                            acc += tl.dot(wi.to(tl.float32), tl.trans(wj.to(tl.float32)),
                                          input_precision="tf32x3").to(tl.float64)
                        else:
                            acc = tl.dot(wi.to(tl.float64), tl.trans(wj.to(tl.float64)), acc,
                                         out_dtype=tl.float64)
        magnitude = tl.abs(acc)
        tl.store(partial_ptr + (row_slot * GROUPS + g) * IN_G + offs_i, tl.sum(magnitude, axis=1), mask=mask_i)
        col_sums = tl.sum(magnitude, axis=0) * ((h != 0) | (jb != ib)).to(tl.float64)
        tl.store(partial_ptr + (col_slot * GROUPS + g) * IN_G + offs_j, col_sums, mask=mask_j)
        if not lower:
            sign = (acc > 0).to(tl.int8) - (acc < 0).to(tl.int8)
            sign_base = sign_ptr + (g * N_HALF + h).to(tl.int64) * IN_G * IN_G
            both = mask_i[:, None] & mask_j[None, :]
            tl.store(sign_base + offs_i[:, None] * IN_G + offs_j[None, :], sign, mask=both)
            if (h == 0) & (jb != ib):
                tl.store(sign_base + offs_j[None, :] * IN_G + offs_i[:, None], sign, mask=both)
        if (h == 0) & (jb == ib):  # S_i = Σ_o C_oi R_o and T_i, once per channel
            mass = tl.zeros((BLOCK_C,), dtype=tl.float64)
            col_total = tl.zeros((BLOCK_C,), dtype=tl.float64)
            row_total = tl.zeros((BLOCK_O,), dtype=tl.float64)
            for o0 in range(0, OUT_G, BLOCK_O):
                offs_o = o0 + tl.arange(0, BLOCK_O)
                mask_o = offs_o < OUT_G
                rows = g * OUT_G + offs_o
                col = tl.load(col_abs_ptr + rows[:, None] * IN_G + offs_i[None, :],
                              mask=mask_o[:, None] & mask_i[None, :], other=0.0)
                row = tl.load(row_abs_ptr + rows, mask=mask_o, other=0.0)
                mass += tl.sum(col * row[:, None], axis=0)
                col_total += tl.sum(col, axis=0)
                row_total += row
            zero64 = tl.zeros((BLOCK_C,), dtype=tl.float64)
            slack = (zero64 + EPS_REL) * mass
            if EPS_ABS_POWER > 0:
                eps_abs = zero64 + 1.0
                for _ in tl.static_range(EPS_ABS_POWER):
                    eps_abs = eps_abs * EPS_ABS_BASE  # powers of two: exact
                n_products = (zero64 + IN_G) * OUT_G * (KK * KK)
                terms = (zero64 + IN_G * KK) * col_total + KK * tl.sum(row_total, axis=0) + n_products
                slack += eps_abs * terms
            slack = tl.where(mass == 0, -1.0, slack)
            tl.store(slack_ptr + g * IN_G + offs_i, slack, mask=mask_i)

    @triton.jit
    def _aol_scale_kernel(w_ptr, partial_ptr, slack_ptr, out_ptr, scale_ptr, N_SLOTS, OUT_G, IN_G, GROUPS,
                          SUM_TERMS, D_MARGIN, KK: tl.constexpr, ROWS_PER_PROGRAM, BLOCK_C: tl.constexpr,
                          BLOCK_K: tl.constexpr):
        """r̂ = (Σ partial + slack)(1 + SUM_TERMS·2⁻⁵²), d = (1 − D_MARGIN) r̂^(-1/2) in float64 (scalar arguments
        are float32: both factors are formed in float64 here), then the scale dtype; 0 for a zero column, NaN
        when r̂ is not finite. out = W·d for a chunk of output rows."""
        n_cblocks = tl.cdiv(IN_G, BLOCK_C)
        g = tl.program_id(0) // n_cblocks
        cb = tl.program_id(0) % n_cblocks
        chunk = tl.program_id(1)
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < IN_G
        r = tl.zeros((BLOCK_C,), dtype=tl.float64)
        for s in range(0, N_SLOTS):
            r += tl.load(partial_ptr + (s * GROUPS + g) * IN_G + offs_c, mask=mask_c, other=0.0)
        slack = tl.load(slack_ptr + g * IN_G + offs_c, mask=mask_c, other=0.0)
        zero = slack < 0
        zero64 = tl.zeros((BLOCK_C,), dtype=tl.float64)
        sum_factor = 1.0 + (zero64 + SUM_TERMS) * 2.220446049250313e-16  # 2^-52, exact
        d_factor = (zero64 + 1.0) - (zero64 + D_MARGIN)
        r_hat = (r + tl.where(zero, 0.0, slack)) * sum_factor
        safe = tl.where(zero | (r_hat == 0), 1.0, r_hat)
        d64 = d_factor / tl.sqrt(safe)  # float64 sqrt and division are IEEE round-to-nearest
        d64 = tl.where(r_hat < float("inf"), d64, float("nan"))  # Inf or NaN weights -> NaN, never a value
        d64 = tl.where(zero, 0.0, d64)
        if scale_ptr.dtype.element_ty == tl.float32:
            # toward zero, so d stays ≤ its float64 value also where it overflows (weights ≈ 1e-40: FLT_MAX, a
            # finite, smaller scale) or lands subnormal (weights ≈ 1e38); NaN stays NaN
            d64 = tl.where(d64 > 3.4028234663852886e38, 3.4028234663852886e38, d64)
            d = d64.to(tl.float32)
            rose = d.to(tl.float64) > d64
            d = tl.where(rose, (d.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True), d)
        else:
            d = d64
        if chunk == 0:
            tl.store(scale_ptr + g * IN_G + offs_c, d, mask=mask_c)
        offs_k = tl.arange(0, BLOCK_K)
        mask = mask_c[:, None] & (offs_k[None, :] < KK)
        first = chunk * ROWS_PER_PROGRAM
        for o in range(first, tl.minimum(first + ROWS_PER_PROGRAM, OUT_G)):
            offs = ((g * OUT_G + o) * IN_G + offs_c[:, None]) * KK + offs_k[None, :]
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(scale_ptr.dtype.element_ty)
            tl.store(out_ptr + offs, (w * d[:, None]).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _aol_grad_dot_kernel(grad_ptr, w_ptr, gw_partial_ptr, OUT_G, IN_G, GROUPS, KK: tl.constexpr,
                             BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
        """partial[ob, g, c] = Σ_{o in block ob} Σ_x G[o, c, x] W[o, c, x] (the ∂L/∂d part of a)."""
        n_cblocks = tl.cdiv(IN_G, BLOCK_C)
        g = tl.program_id(0) // n_cblocks
        cb = tl.program_id(0) % n_cblocks
        ob = tl.program_id(1)
        ACC = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
        offs_o = ob * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_k = tl.arange(0, BLOCK_K)
        mask = (offs_o < OUT_G)[:, None, None] & (offs_c < IN_G)[None, :, None] & (offs_k < KK)[None, None, :]
        offs = ((g * OUT_G + offs_o[:, None, None]) * IN_G + offs_c[None, :, None]) * KK + offs_k[None, None, :]
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC)
        total = tl.sum(tl.sum(grad * w, axis=2), axis=0)
        tl.store(gw_partial_ptr + (ob * GROUPS + g) * IN_G + offs_c, total, mask=offs_c < IN_G)

    @triton.jit
    def _rescale_grad_block(gw_partial_ptr, grad_scale_ptr, scale_ptr, g, offs, mask, N_PARTIAL, GROUPS, IN_G,
                            HAS_GRAD_SCALE: tl.constexpr):
        """a = ∂L/∂r = −½ d³ (Σ partial + ∂L/∂d), 0 for a zero column."""
        d = tl.load(scale_ptr + g * IN_G + offs, mask=mask, other=0.0)
        gw = tl.zeros(d.shape, dtype=d.dtype)
        for s in range(0, N_PARTIAL):
            gw += tl.load(gw_partial_ptr + (s * GROUPS + g) * IN_G + offs, mask=mask, other=0.0).to(d.dtype)
        if HAS_GRAD_SCALE:
            gw += tl.load(grad_scale_ptr + g * IN_G + offs, mask=mask, other=0.0).to(d.dtype)
        return tl.where(d == 0, 0.0, -0.5 * d * d * d * gw)

    @triton.jit
    def _aol_coefficient_kernel(sign_ptr, gw_partial_ptr, grad_scale_ptr, scale_ptr, t_ptr, N_PARTIAL, IN_G, GROUPS,
                                KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr,
                                HAS_GRAD_SCALE: tl.constexpr):
        """T_f[c, j] = (a_c + a_j)·sign(M_f[c, j]) for every shift f (s < 0 read as M_{−s}ᵀ), layout
        (groups, n_full, in_g, in_g) with j contiguous: the K-major operand of the backward product."""
        NW: tl.constexpr = 2 * KW - 1
        N_FULL: tl.constexpr = (2 * KH - 1) * NW
        CENTER: tl.constexpr = (N_FULL - 1) // 2
        N_HALF: tl.constexpr = CENTER + 1
        g = tl.program_id(0) // N_FULL
        f = tl.program_id(0) % N_FULL
        offs_c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        offs_j = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
        mask_c = offs_c < IN_G
        mask_j = offs_j < IN_G
        a_c = _rescale_grad_block(gw_partial_ptr, grad_scale_ptr, scale_ptr, g, offs_c, mask_c, N_PARTIAL, GROUPS,
                                  IN_G, HAS_GRAD_SCALE)
        a_j = _rescale_grad_block(gw_partial_ptr, grad_scale_ptr, scale_ptr, g, offs_j, mask_j, N_PARTIAL, GROUPS,
                                  IN_G, HAS_GRAD_SCALE)
        upper = f >= CENTER
        h = tl.where(upper, f - CENTER, CENTER - f)
        stride_c = tl.where(upper, IN_G, 1)
        stride_j = tl.where(upper, 1, IN_G)
        both = mask_c[:, None] & mask_j[None, :]
        sign_base = sign_ptr + (g * N_HALF + h).to(tl.int64) * IN_G * IN_G
        sign = tl.load(sign_base + offs_c[:, None] * stride_c + offs_j[None, :] * stride_j, mask=both, other=0)
        t = sign.to(a_c.dtype) * (a_c[:, None] + a_j[None, :])
        t_base = t_ptr + (g * N_FULL + f).to(tl.int64) * IN_G * IN_G
        tl.store(t_base + offs_c[:, None] * IN_G + offs_j[None, :], t.to(t_ptr.dtype.element_ty), mask=both)

    @triton.jit
    def _aol_bwd_kernel(wp_ptr, t_ptr, grad_out_ptr, scale_ptr, grad_in_ptr, OUT_G, IN_G,
                        KH: tl.constexpr, KW: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_J: tl.constexpr, USE_TF32: tl.constexpr):
        """grad_in[o, c, x] = G[o, c, x] d_c + Σ_y Σ_j W[o, j, y] T_{x−y}[c, j] for one (tap x, o-tile, c-tile).
        wp is the forward's (groups, kk, in_g, out_g) copy of W."""
        NW: tl.constexpr = 2 * KW - 1
        KK: tl.constexpr = KH * KW
        N_FULL: tl.constexpr = (2 * KH - 1) * NW
        g = tl.program_id(0) // KK
        x = tl.program_id(0) % KK
        xa = x // KW
        xb = x % KW
        ACC = tl.float64 if wp_ptr.dtype.element_ty == tl.float64 else tl.float32
        offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_o = offs_o < OUT_G
        mask_c = offs_c < IN_G
        acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=ACC)
        for ya in tl.static_range(KH):
            for yb in tl.static_range(KW):
                f = (xa - ya + KH - 1) * NW + (xb - yb + KW - 1)
                w_base = wp_ptr + ((g * KH + ya) * KW + yb) * IN_G * OUT_G
                t_base = t_ptr + (g * N_FULL + f).to(tl.int64) * IN_G * IN_G
                for j0 in range(0, IN_G, BLOCK_J):
                    offs_j = j0 + tl.arange(0, BLOCK_J)
                    mask_j = offs_j < IN_G
                    w = tl.load(w_base + offs_j[:, None] * OUT_G + offs_o[None, :],
                                mask=mask_j[:, None] & mask_o[None, :], other=0.0).to(ACC)
                    t = tl.load(t_base + offs_c[:, None] * IN_G + offs_j[None, :],
                                mask=mask_c[:, None] & mask_j[None, :], other=0.0).to(ACC)
                    if USE_TF32:
                        acc = tl.dot(tl.trans(w), tl.trans(t), acc, input_precision="tf32")
                    else:
                        acc = tl.dot(tl.trans(w), tl.trans(t), acc, out_dtype=ACC)
        d_c = tl.load(scale_ptr + g * IN_G + offs_c, mask=mask_c, other=0.0).to(ACC)
        offs = ((g * OUT_G + offs_o[:, None]) * IN_G + offs_c[None, :]) * KK + x
        mask = mask_o[:, None] & mask_c[None, :]
        grad = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(grad_in_ptr + offs, (grad * d_c[None, :] + acc).to(grad_in_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# 4. Launchers: own layout, dtype, block sizes, grid and output allocation.
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _float32_up(x: float) -> float:
    """The smallest float32 value ≥ x (kernel scalar arguments are float32); no tensor, no host read."""
    return cast_up(x, torch.float32)


def _power_of_two_factors(value: float) -> tuple[float, int]:
    """value = base^power with base a power of two representable in float32 (value 0: power 0)."""
    if value == 0:
        return 1.0, 0
    exponent = math.frexp(value)[1] - 1
    assert value == 2.0**exponent, "absolute error terms are powers of two"
    power = next(p for p in range(max(1, math.ceil(-exponent / 120)), 1100) if exponent % p == 0)
    return 2.0 ** (exponent // power), power


def _as_conv(weight: torch.Tensor) -> torch.Tensor:
    """A linear weight (out, in) as the 1×1 conv weight (out, in, 1, 1) (a view); a conv weight as it is."""
    return weight if weight.dim() == 4 else weight.view(*weight.shape, 1, 1)


def _geometry(w4: torch.Tensor, groups: int):
    out_ch, in_g, kh, kw = w4.shape if w4.dim() == 4 else (*w4.shape, 1, 1)
    n_half = ((2 * kh - 1) * (2 * kw - 1) + 1) // 2
    return out_ch // groups, in_g, kh, kw, n_half


def _tile(rows: int, cols: int, programs_per_tile_pair: int, on_gpu: bool) -> int:
    """The largest square tile (64, 32, 16: tl.dot needs ≥ 16) that still gives two waves of programs on a
    132-SM GPU; under the interpreter, few large programs."""
    if not on_gpu:
        return 64 if min(rows, cols) > 32 else 32 if min(rows, cols) > 16 else 16
    for tile in (64, 32):
        if programs_per_tile_pair * triton.cdiv(rows, tile) * triton.cdiv(cols, tile) >= _MIN_PROGRAMS:
            return tile
    return 16


def _num_warps(tile: int) -> int:
    """64-wide tiles need 8 warps to hold their accumulators without spilling on sm_90."""
    return 8 if tile >= 64 else 4


def _gram_triton(w4: torch.Tensor, groups: int):
    """Prep and Gram passes: (partial abs row sums, margin slack, half-shift signs, backward layout, tile)."""
    out_g, in_g, kh, kw, n_half = _geometry(w4, groups)
    kk, dev, on_gpu = kh * kw, w4.device, w4.is_cuda
    precision = gram_precision(w4.dtype)
    eps_rel, eps_abs = _slack_coefficients(precision, out_g, kk, w4.dtype)
    abs_base, abs_power = _power_of_two_factors(eps_abs)
    f64 = torch.float64
    # 16-bit weights: the copy is float32 (exact), which the float64 MMA path needs on sm_90 (Triton cannot
    # lower a 16-bit -> float64 dot operand there)
    wp_dtype = torch.float32 if w4.dtype in (torch.float16, torch.bfloat16) else w4.dtype
    wp = torch.empty((groups, kk, in_g, out_g), device=dev, dtype=wp_dtype)
    col_abs = torch.empty((w4.shape[0], in_g), device=dev, dtype=f64)
    row_abs = torch.empty((w4.shape[0],), device=dev, dtype=f64)
    block_c = _tile(in_g, in_g, groups * n_half, on_gpu)
    n_blocks = triton.cdiv(in_g, block_c)
    partial = torch.empty((n_half * 2 * n_blocks, groups, in_g), device=dev, dtype=f64)
    slack = torch.empty((groups, in_g), device=dev, dtype=f64)
    signs = torch.empty((groups, n_half, in_g, in_g), device=dev, dtype=torch.int8)
    prep_rows, block_k = (4 if on_gpu else 16), triton.next_power_of_2(kk)
    prep_c = max(2, 1024 // block_k)  # ≤ 4096 elements per tile on the GPU: no spills up to 11×11 kernels
    with device_context(w4):
        _aol_prep_kernel[(triton.cdiv(w4.shape[0], prep_rows),)](
            w4, wp, col_abs, row_abs, w4.shape[0], out_g, in_g, KK=kk, BLOCK_O=prep_rows, BLOCK_C=prep_c,
            BLOCK_K=block_k)
        _aol_gram_kernel[(groups * n_half, n_blocks, n_blocks)](
            wp, col_abs, row_abs, partial, signs, slack, out_g, in_g, groups, _float32_up(eps_rel), abs_base,
            KH=kh, KW=kw, N_BLOCKS=n_blocks, BLOCK_C=block_c,
            BLOCK_O=_TF32X3_CHUNK if precision == "tf32x3" else 16, TF32X3=precision == "tf32x3",
            EPS_ABS_POWER=abs_power, num_warps=_num_warps(block_c))
    return partial, slack, signs, wp, block_c


def _forward_triton(w4: torch.Tensor, groups: int):
    out_g, in_g, kh, kw, _ = _geometry(w4, groups)
    partial, slack, signs, wp, block_c = _gram_triton(w4, groups)
    out = torch.empty_like(w4)
    scale = torch.empty((groups, in_g), device=w4.device, dtype=_acc_dtype(w4.dtype))
    rows = 16 if w4.is_cuda else out_g
    sum_terms = partial.shape[0] + block_c + 8
    with device_context(w4):
        _aol_scale_kernel[(groups * triton.cdiv(in_g, block_c), triton.cdiv(out_g, rows))](
            w4, partial, slack, out, scale, partial.shape[0], out_g, in_g, groups, sum_terms,
            _scale_margin(w4.dtype, out_g, in_g, kh * kw), KK=kh * kw, ROWS_PER_PROGRAM=rows, BLOCK_C=block_c,
            BLOCK_K=triton.next_power_of_2(kh * kw))
    return out, scale, signs


def _backward_triton(grad_out, grad_scale, w4, scale, signs, groups):
    out_g, in_g, kh, kw, _ = _geometry(w4, groups)
    kk, dev, on_gpu = kh * kw, w4.device, w4.is_cuda
    n_full = (2 * kh - 1) * (2 * kw - 1)
    # W in the layout the kernel reads: a copy of W (the forward's Gram copy is not kept: one more read and
    # write of W, against a residual whose shape would depend on the backend)
    wp = _backward_layout(w4, groups)
    block_k = triton.next_power_of_2(kk)
    block_c = 64 if not on_gpu else max(2, 512 // block_k)  # 16 × 32 × 16 at 3×3: no spills up to 11×11
    rows = 16 if on_gpu else triton.next_power_of_2(min(out_g, 64))
    n_partial = triton.cdiv(out_g, rows)
    partial = torch.empty((n_partial, groups, in_g), device=dev, dtype=scale.dtype)
    t_dtype = scale.dtype
    coefficients = torch.empty((groups, n_full, in_g, in_g), device=dev, dtype=t_dtype)
    grad_in = torch.empty_like(w4)
    block_t = _tile(in_g, in_g, groups * n_full, on_gpu)
    tile = _tile(out_g, in_g, groups * kk, on_gpu)
    with device_context(w4):
        _aol_grad_dot_kernel[(groups * triton.cdiv(in_g, block_c), n_partial)](
            grad_out, w4, partial, out_g, in_g, groups, KK=kk, BLOCK_O=rows, BLOCK_C=block_c, BLOCK_K=block_k)
        _aol_coefficient_kernel[(groups * n_full, triton.cdiv(in_g, block_t), triton.cdiv(in_g, block_t))](
            signs, partial, grad_scale if grad_scale is not None else scale, scale, coefficients, n_partial, in_g,
            groups, KH=kh, KW=kw, BLOCK=block_t, HAS_GRAD_SCALE=grad_scale is not None)
        _aol_bwd_kernel[(groups * kk, triton.cdiv(out_g, tile), triton.cdiv(in_g, tile))](
            wp, coefficients, grad_out, scale, grad_in, out_g, in_g, KH=kh, KW=kw, BLOCK_O=tile, BLOCK_C=tile,
            BLOCK_J=32, USE_TF32=w4.dtype != torch.float64, num_warps=_num_warps(tile))
    return grad_in


# ----------------------------------------------------------------------------------------------------------
# 5. Torch path (CPU, and any device without Triton): the Gram sums as GEMMs with the same kind of margin.
#    P[i, a, b, j] = Σ_o W[o, i, a] W[o, j, b] (one GEMM per group), then M_s = Σ_{a − b = s} P[·, a, b, ·] by a
#    0/1 matrix over the contiguous (a, b) axis (no copy of P).
# ----------------------------------------------------------------------------------------------------------
_FP32_GRAM_MAX_COST = 2.0**-12  # auto: fp32 products while their margin costs ≤ 2.4e-4 of r (1.2e-4 of d)
_NUMPY = {torch.float32: numpy.float32, torch.float64: numpy.float64}
_FP32_GRAM_MAX_TERMS = 320  # auto: fp64 at once when γ_{out_g+kk} > 1.9e-5 (typical S/r ≥ 13 would fail)


def _constant_cache(build):
    """``functools.lru_cache`` for functions that build constant tensors, bypassed while a dispatch mode is on (a
    FakeTensorMode or make_fx would leave a fake or traced tensor in the cache for every later eager call)."""
    cached = functools.lru_cache(maxsize=None)(build)

    @functools.wraps(build)
    def call(*args):
        return build(*args) if torch._C._len_torch_dispatch_stack() else cached(*args)
    return call


@_constant_cache
def _shift_index(kh: int, kw: int) -> torch.Tensor:
    """(kk, kk) int64: entry [y, x] = index in the (2kh−1)(2kw−1) shift grid of the shift x − y."""
    ya, yb = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
    y = torch.stack([ya.flatten(), yb.flatten()], 1)
    diff = y[None, :, :] - y[:, None, :] + torch.tensor([kh - 1, kw - 1])
    return diff[..., 0] * (2 * kw - 1) + diff[..., 1]


@_constant_cache
def _shift_sum(kh: int, kw: int, dtype: torch.dtype, device: torch.device, half: bool) -> torch.Tensor:
    """(kk·kk, n) 0/1: row a·kk + b has its one at the shift a − b; all n_full shifts, or (``half``) the
    n_half shifts ≥ 0 (in the order of the half-shift signs; rows of negative shifts are zero)."""
    n_full = (2 * kh - 1) * (2 * kw - 1)
    index = _shift_index(kh, kw).T.flatten()  # pair (a, b) -> shift a − b
    return F.one_hot(index, n_full)[:, (n_full - 1) // 2 if half else 0:].to(dtype=dtype, device=device)


@_constant_cache
def _positive_shift_mask(n_half: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return (torch.arange(n_half) > 0).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _torch_path_constants(out_g: int, in_g: int, kh: int, kw: int, dtype: torch.dtype, scheme: str) -> dict:
    """The numbers of the torch path's margin for one geometry and scheme: c and ε_abs of the slack, T_i's
    coefficients, the factor of r̂ (float64 sums of ≤ in_g·n_full terms), 1 − m, ε_gram alone (the auto
    check), and the cast's constants. Underflow (gradual: ≤ 2⁻¹⁵⁰ per product; flush-to-zero and
    denormals-are-zero: ≤ 2⁻¹²⁶ per operand, product or sum) in row i's sum of |M̂_s[i, j]| over all s and j:
    T_i = in_g·kk·Σ_o C_oi + kk·Σ_o R_o (each operand of the P[i, a, b, j] entries, weighted by the other
    operand) + in_g·kk²·(out_g + n_full) (counts: 2·out_g operations per P entry, in_g·kk² of them; 2·kk²
    per entry of the 0/1 shift GEMM, in_g·n_full of them, halved); ε_abs = 2⁻¹²⁴ = 4·2⁻¹²⁶ leaves a factor
    ≥ 2 for the later roundings. Σ_o C_oi ≤ Σ_o R_o bounds the first term by in_g·kk·Σ_o R_o."""
    kk = kh * kw
    eps_rel, eps_abs = _slack_coefficients(scheme, out_g, kk, dtype)
    n_full = (2 * kh - 1) * (2 * kw - 1)
    acc = torch.finfo(_acc_dtype(dtype))
    count = in_g * kk * kk * (out_g + n_full)
    if scheme == "fp64" and dtype != torch.float64:
        # float64 products of float32 values never underflow, but with denormals-are-zero set
        # (torch.set_flush_denormal) a subnormal weight is read as 0 by the conversion: ≤ 2⁻¹²⁶·|other operand|
        eps_abs, count = 2.0**-124, 0
    k = dict(eps_rel=eps_rel, t_mass=eps_abs * (in_g * kk + kk),
             t_count=eps_abs * count, sum_factor=1 + (in_g * n_full + 8) * 2.0**-52,
             keep=1 - _scale_margin(dtype, out_g, in_g, kk), eps_gram=gram_error_bound(scheme, out_g, kk, dtype)[0],
             tiny=acc.tiny * acc.eps, largest=acc.max)
    # the C++ kernel's AolConstants, in its order
    k["cpu_args"] = (*(k[name] for name in ("eps_rel", "eps_gram", "t_mass", "t_count", "sum_factor", "keep", "tiny",
                                            "largest")), _FP32_GRAM_MAX_COST)
    return k


def _gram_pairs(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (groups, out_g, in_g, kk) -> (w viewed (g, out_g, in_g·kk), its (g, out_g, kk·in_g) copy): the two
    factors of P (rows (i, a), columns (b, j))."""
    groups, out_g, in_g, kk = w.shape
    return w.view(groups, out_g, in_g * kk), w.transpose(2, 3).reshape(groups, out_g, kk * in_g)


def _correlations(w: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """M_s for all shifts, (groups, in_g, n_full, in_g) with entry [g, i, s, j] = M_s[i, j] (s in the order of
    the flattened (2kh−1)×(2kw−1) grid; the shifts ≥ 0 are the last n_half)."""
    groups, _, in_g, kk = w.shape
    left, right = _gram_pairs(w)
    pairs = torch.bmm(left.transpose(1, 2), right)  # (g, in_g·kk, kk·in_g)
    if kk == 1:
        return pairs.view(groups, in_g, 1, in_g)
    shifts = _shift_sum(kh, kw, w.dtype, w.device, False).T
    return torch.bmm(shifts.expand(groups * in_g, -1, -1), pairs.view(groups * in_g, kk * kk, in_g)).view(
        groups, in_g, -1, in_g)


def _row_sums(correlations: torch.Tensor) -> torch.Tensor:
    """r_i = Σ_s Σ_j |M_s[i, j]|, summed in float64 (vector_norm(·, 1, dtype=float64) is 10× slower on the CPU)."""
    return correlations.abs().sum((2, 3), dtype=torch.float64)


def _scale_from_sums(r: torch.Tensor, col_abs: torch.Tensor, k: dict, check: bool):
    """d (float64, before the cast) from r_i and C_oi (float64, (groups, out_g, in_g)): the margin of the module
    docstring, vectorized (any device, differentiable). With ``check``, None when the Gram margin alone
    (ε_gram·S_i + ε_abs·T_i) would exceed ``_FP32_GRAM_MAX_COST``·r̂_i for some i or r̂ is not finite: the
    caller redoes it in fp64."""
    row_abs = col_abs.sum(2)  # R_o
    mass = (row_abs[:, None, :] @ col_abs)[:, 0]  # S_i = Σ_o C_oi R_o
    # ε_abs·T_i ≤ ε_abs·((in_g·kk + kk)·Σ_o R_o + count), as Σ_o C_oi ≤ Σ_o R_o
    extra = row_abs.sum(1, keepdim=True) * k["t_mass"] + k["t_count"] if k["t_mass"] else 0.0
    r_hat = (r + mass * k["eps_rel"] + extra) * k["sum_factor"]
    if check and not bool(((mass * k["eps_gram"] + extra <= _FP32_GRAM_MAX_COST * r_hat)
                           & (r_hat < math.inf)).all()):
        return None
    d = torch.where(r_hat < math.inf, r_hat.rsqrt(), math.nan) * k["keep"]
    # The cast to the scale dtype must not round d up: d carries the relative margin 2⁻²² ≥ the cast's 2⁻²⁴
    # for normal results; subtracting the smallest subnormal covers subnormal results (the float64 subtraction
    # errs by ≤ 2⁻⁵³·d ≤ 2⁻¹⁵⁰ there); the clip keeps overflow at the largest finite value; NaN stays NaN.
    return (torch.where(mass == 0, 0.0, d) - k["tiny"]).clip(0, k["largest"])


def _scale_from_sums_cpu(r: torch.Tensor, col_abs: torch.Tensor, k: dict, check: bool):
    """:func:`_scale_from_sums` on the CPU in NumPy (float64, IEEE: correctly rounded √ and division; about
    20 operations of ~1 µs on vectors of in_g entries, where each torch op costs 5–15 µs), d cast to the
    scale dtype (round to nearest, covered by the margin)."""
    r, col_abs = r.numpy(), col_abs.numpy()  # C_oi: float64, or |W| itself (float32, exact) for 1×1 kernels
    row_abs = col_abs.sum(2, dtype=numpy.float64)  # R_o
    mass = numpy.matmul(row_abs[:, None, :], col_abs.astype(numpy.float64, copy=False))[:, 0]  # S_i
    extra = (row_abs.sum(1, keepdims=True) * k["t_mass"] + k["t_count"]) if k["t_mass"] else 0.0
    with numpy.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r_hat = (r + mass * k["eps_rel"] + extra) * k["sum_factor"]
        if check and not (bool(numpy.all(mass * k["eps_gram"] + extra <= _FP32_GRAM_MAX_COST * r_hat))
                          and float(r_hat.max()) < math.inf):
            return None
        d = k["keep"] / numpy.sqrt(r_hat)
        # NaN for r̂ = NaN or +inf (d = 0 there is not a bound of anything), 0 for a zero column
        d = numpy.where(mass == 0, 0.0, numpy.where(d > 0, d, math.nan))
        return numpy.clip(d - k["tiny"], 0.0, k["largest"])


def _forward_torch(w4: torch.Tensor, groups: int, scheme: str = "fp64", signs: bool = True):
    """The torch path's forward. ``scheme``: 'fp64' (float64 products), 'fp32' (float32 products, margin
    γ_{out_g+kk}), or 'auto': fp32, redone in fp64 when the fp32 margin would cost more than
    ``_FP32_GRAM_MAX_COST`` of some r_i or r̂ is not finite (one host read: CPU). Returns (rescaled weight, d,
    half-shift signs or None, the scheme that ran), the rescaled weight in w4's shape (a contiguous (out, in) or
    (out, in/groups, kh, kw) weight). Differentiable by autograd (the path torch.func transforms differentiate)."""
    on_host = (w4.device.type == "cpu" and not (torch.is_grad_enabled() and w4.requires_grad)
               and not torch._C._are_functorch_transforms_active()
               and not torch.jit.is_tracing())  # (a jit trace records torch ops only; its sizes are tensors)
    if on_host and _cpu_kernels.available() and _cpu_kernels.plain(w4):
        return _forward_cpu_kernel(w4, groups, scheme, signs)
    out_g, in_g, kh, kw, n_half = _geometry(w4, groups)
    kk, acc = kh * kw, _acc_dtype(w4.dtype)
    ran = "fp32" if scheme == "auto" else scheme
    k = _torch_path_constants(out_g, in_g, kh, kw, w4.dtype, ran)
    w = w4.to(torch.float64 if ran == "fp64" else acc).view(groups, out_g, in_g, kk)
    correlations = _correlations(w, kh, kw)
    r = _row_sums(correlations)
    col_abs = w4.abs().view(groups, out_g, in_g, kk)
    if on_host:
        col_abs = col_abs[..., 0] if kk == 1 and w4.dtype == torch.float32 else col_abs.sum(3, dtype=torch.float64)
        d = _scale_from_sums_cpu(r, col_abs, k, scheme == "auto")
        # numpy rounds float64 to float32 to nearest, as .to() does: the margin in d covers it
        scale = None if d is None else torch.from_numpy(d.astype(_NUMPY[acc]))
    else:
        d = _scale_from_sums(r, col_abs.sum(3, dtype=torch.float64), k, scheme == "auto")  # C_oi
        scale = None if d is None else d.to(acc)
    if scale is None:
        return _forward_torch(w4, groups, "fp64", signs)
    out = (w4.to(acc).view(groups, out_g, in_g, kk) * scale[:, None, :, None]).view(w4.shape).to(w4.dtype)
    sign_out = None
    if signs:  # the backward's (g, n_half, in_g, in_g) int8
        sign_out = torch.empty((groups, n_half, in_g, in_g), dtype=torch.int8, device=w4.device)
        sign_out.copy_(correlations.detach()[:, :, correlations.shape[2] - n_half:].permute(0, 2, 1, 3).sign())
    return out, scale, sign_out, ran


def _forward_cpu_kernel(weight: torch.Tensor, groups: int, scheme: str, signs: bool):
    """:func:`_forward_torch` on the CPU with the C++ kernel: one GEMM P = W_leftᵀW_right (rows (i, a), columns
    (b, j)), then one call forms the shift sums M_s in float64 from P, r_i, C_oi, S_i, the margin and d (the
    float64 operations of :func:`_scale_from_sums_cpu`, in its order: the same proof), W·d and the signs.
    ``weight``: (out, in) or (out, in/groups, kh, kw), kept in its shape (views cost more than a small GEMM)."""
    out_g, in_g, kh, kw, _ = _geometry(weight, groups)
    kk, acc = kh * kw, _acc_dtype(weight.dtype)
    ran = "fp32" if scheme == "auto" else scheme
    k = _torch_path_constants(out_g, in_g, kh, kw, weight.dtype, ran)
    weight = weight.contiguous()  # (called without a graph: grad mode off or no gradient asked for)
    w = weight if weight.dtype == acc else weight.to(acc)  # 16-bit weights: exact in float32
    gram_dtype = torch.float64 if ran == "fp64" else acc
    m = w if gram_dtype == acc else w.to(gram_dtype)
    if w.dim() == 2:  # a linear weight: P = WᵀW, one GEMM of the weight with itself
        pairs = torch.mm(m.T, m)
    elif kk == 1:
        m = m.view(groups, out_g, in_g)
        pairs = torch.bmm(m.transpose(1, 2), m)
    else:
        left, right = _gram_pairs(m.view(groups, out_g, in_g, kk))
        pairs = torch.bmm(left.transpose(1, 2), right)  # columns (b, j): the kernel's shift sums read rows in order
    result = _cpu_kernels.aol_forward(pairs, w, (groups, out_g, in_g, kh, kw), k["cpu_args"], scheme == "auto",
                                      signs)
    if result is None:
        return _forward_cpu_kernel(weight, groups, "fp64", signs)
    scale, out, sign_out = result
    return (out if out.dtype == weight.dtype else out.to(weight.dtype)), scale, sign_out, ran


def _backward_cpu_kernel(grad_out, grad_scale, weight, scale, signs, groups):
    """:func:`_backward_torch` on the CPU with the C++ kernel: ∂L/∂r, then Γ placed at its (i, a), (b, j)
    entries and symmetrized in one call, then ONE GEMM ∂L/∂W_left = W_right(∂P + ∂Pᵀ)ᵀ and G·d. ``weight`` and
    ``grad_out`` contiguous, in the weight's shape."""
    out_g, in_g, kh, kw, _ = _geometry(weight, groups)
    kk, acc = kh * kw, scale.dtype
    w = weight if weight.dtype == acc else weight.to(acc)
    grad = grad_out if grad_out.dtype == acc else grad_out.to(acc)
    if grad_scale is not None and grad_scale.dtype != acc:
        grad_scale = grad_scale.to(acc)
    # gsym: rows (i, a), cols (b, j)
    gsym, base = _cpu_kernels.aol_backward(grad, grad_scale, w, scale, signs, (groups, out_g, in_g, kh, kw))
    if w.dim() == 2:  # gsym is a symmetric matrix here: no transposed read
        grad_w = torch.addmm(base, w, gsym)
    elif kk == 1:
        grad_w = torch.baddbmm(base.view(groups, out_g, in_g), w.view(groups, out_g, in_g),
                               gsym.view(groups, in_g, in_g))
    else:
        grad_w = torch.baddbmm(base.view(groups, out_g, in_g * kk), _gram_pairs(w.view(groups, out_g, in_g, kk))[1],
                               gsym.view(groups, in_g * kk, in_g * kk).transpose(1, 2))
    grad_w = grad_w.view(weight.shape)
    return grad_w if grad_w.dtype == weight.dtype else grad_w.to(weight.dtype)


def _backward_layout(w4: torch.Tensor, groups: int) -> torch.Tensor:
    """(out, in_g, kh, kw) -> contiguous (groups, kh·kw, in_g, out_g), the layout the Triton backward reads (16-bit
    weights as float32, exact, as the forward's Gram copy)."""
    out_ch, in_g, kh, kw = w4.shape
    wp = w4.view(groups, out_ch // groups, in_g, kh * kw).permute(0, 3, 2, 1)
    return wp.to(torch.float32 if w4.dtype in (torch.float16, torch.bfloat16) else w4.dtype).contiguous()


def _backward_torch(grad_out, grad_scale, w4, scale, signs, groups):
    """∂L/∂W = G·d + ∂r/∂W·a by the GEMM form: Γ[i, s, j] = ∂L/∂M_s[i, j] = sign(M_s[i, j])·(a_i + a_j·[s > 0])
    for s ≥ 0, ∂L/∂P = the 0/1 shift matrix times Γ, then both factors of P = W_leftᵀ W_right (two GEMMs: one
    GEMM on ∂L/∂P + its transpose in W_left's order would need a copy of ∂L/∂P, dearer than the second GEMM at
    c = 64, k = 3). 1×1 kernels: P = WᵀW, ∂L/∂W = W(Γ + Γᵀ), one GEMM."""
    out_g, in_g, kh, kw, n_half = _geometry(w4, groups)
    kk, acc = kh * kw, scale.dtype
    w = w4.to(acc).view(groups, out_g, in_g, kk)
    grad = grad_out.to(acc).view(groups, out_g, in_g, kk)
    gw = (grad * w).sum((1, 3))
    if grad_scale is not None:
        gw = gw + grad_scale
    a = scale.pow(3).mul_(gw).mul_(-0.5)  # ∂L/∂r; 0 for a zero column (d = 0)
    if kk == 1:
        gamma = signs[:, 0] * a[:, :, None]
        grad_w = torch.bmm(w.view(groups, out_g, in_g), gamma + gamma.transpose(1, 2)).view(grad.shape)
        return grad_w.addcmul_(grad, scale[:, None, :, None]).view(w4.shape).to(w4.dtype)
    coefficient = a[:, :, None, None] + a[:, None, None, :] * _positive_shift_mask(n_half, acc, w.device)[:, None]
    gamma = coefficient.mul_(signs.permute(0, 2, 1, 3))  # (g, i, s, j)
    d_pairs = torch.matmul(_shift_sum(kh, kw, acc, w.device, True), gamma.view(groups * in_g, n_half, in_g))
    d_pairs = d_pairs.view(groups, in_g * kk, kk * in_g)
    left, right = _gram_pairs(w)
    grad_w = torch.bmm(right, d_pairs.transpose(1, 2)).view(groups, out_g, in_g, kk)
    grad_w += torch.bmm(left, d_pairs).view(groups, out_g, kk, in_g).transpose(2, 3)
    return grad_w.addcmul_(grad, scale[:, None, :, None]).view(w4.shape).to(w4.dtype)


def _torch_scheme(w4: torch.Tensor, groups: int = 1) -> str:
    """The torch path's Gram scheme: 'fp64' for float64 weights, off the CPU (no host read there), when
    ``LIPKERN_AOL_GRAM=fp64``, or when float32 products may not be IEEE float32 (PyTorch's matmul precision
    below 'highest', oneDNN set to bf16/tf32 math): the fp32 margin assumes IEEE products; or when
    out_g + kk > ``_FP32_GRAM_MAX_TERMS`` (the fp32 margin would exceed the auto limit for typical weights).
    Else 'auto', or 'fp32' when asked for."""
    choice = _requested_gram()
    if (w4.dtype == torch.float64 or not w4.is_cpu or choice == "fp64" or torch.jit.is_tracing()
            or not _ieee_float32_math()):  # a trace cannot hold the auto check's host read
        return "fp64"
    if choice == "fp32":
        return "fp32"
    out_g, _, kh, kw, _ = _geometry(w4, groups)
    return "auto" if out_g + kh * kw <= _FP32_GRAM_MAX_TERMS else "fp64"


_FP32_PRECISION = getattr(torch._C, "_get_fp32_precision_getter", None)  # (the C getter: 0.2 against 2 µs)


def _ieee_float32_math() -> bool:
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the legacy and the per-backend APIs were mixed: PyTorch refuses to say; assume not
        return False
    if legacy != "highest" or config().onednn_fpmath != "strict":
        return False
    if _FP32_PRECISION is not None:
        modes = (_FP32_PRECISION("mkldnn", "all"), _FP32_PRECISION("mkldnn", "matmul"))
    else:
        mkldnn = torch.backends.mkldnn
        modes = (getattr(mkldnn, "fp32_precision", "none"), getattr(mkldnn.matmul, "fp32_precision", "none"))
    return all(m in ("none", "ieee") for m in modes)


def _aol_fwd(weight: torch.Tensor, groups: int, save: bool = True):
    """(rescaled weight, d, half-shift signs: the backward's, None when ``save`` is False on the torch path).
    ``weight``: (out, in) or (out, in/groups, kh, kw); the rescaled weight has its shape."""
    contiguous = weight.contiguous()  # the kernels index raw memory; the op may be called with any strides
    if select_backend(contiguous) == "triton":
        w4 = _as_conv(contiguous)
        record_implementation("aol_rescale", f"triton/{gram_precision(w4.dtype)}")
        out, scale, sign_out = _forward_triton(w4, groups)
        return out.view(weight.shape), scale, sign_out
    scheme = _torch_scheme(contiguous, groups)
    out, scale, sign_out, ran = _forward_torch(contiguous, groups, scheme, save)  # (in the weight's shape)
    _record_torch_path(contiguous.is_cpu and _cpu_kernels.available(), scheme, ran)
    return out, scale, sign_out


def _record_torch_path(cpp: bool, scheme: str, ran: str) -> None:
    form = "cpp/" if cpp else "torch-gemm/"
    record_implementation("aol_rescale", form + ran + (" (auto)" if scheme == "auto" else ""))


def _aol_bwd(grads, inputs, saved, needs):
    (grad_out, grad_scale), (weight, groups), (scale, signs) = grads, inputs, saved
    w = weight.contiguous()
    grad_out = torch.zeros_like(w) if grad_out is None else grad_out.contiguous()  # stride-0 ones too
    if grad_scale is not None:
        grad_scale = grad_scale.contiguous()
    if select_backend(w) == "triton":
        grad = _backward_triton(_as_conv(grad_out), grad_scale, _as_conv(w), scale, signs, groups)
    elif (w.is_cpu and _cpu_kernels.available() and not torch.is_grad_enabled()
            and _cpu_kernels.plain(grad_out, w, *([] if grad_scale is None else [grad_scale]))):
        grad = _backward_cpu_kernel(grad_out, grad_scale, w, scale, signs, groups)  # (in the weight's shape)
    else:
        grad = _backward_torch(_as_conv(grad_out), grad_scale, _as_conv(w), scale, signs, groups)
    return (grad if grad.shape == weight.shape else grad.view(weight.shape),)


def _aol_functional(weight, groups):
    """The torch path as plain autograd ops (torch.func transforms differentiate and vmap it; same margin)."""
    out, scale = _forward_torch(_as_conv(weight.contiguous()), groups, signs=False)[:2]  # (views below)
    return out.view(weight.shape), scale


def _aol_functional_backward(grads, inputs, saved, needs):
    """The torch path's backward in differentiable ops (create_graph: exact second derivatives on every
    backend; the signs are locally constant)."""
    (grad_out, grad_scale), (weight, groups), (scale, signs) = grads, inputs, saved
    w4 = _as_conv(weight.contiguous())
    grad_out = torch.zeros_like(w4) if grad_out is None else _as_conv(grad_out.contiguous())
    return (_backward_torch(grad_out, grad_scale, w4, scale, signs, groups).view(weight.shape),)


def _aol_fake(weight, groups):
    out_g, in_g, kh, kw, n_half = _geometry(weight, groups)
    return (torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty((groups, in_g), dtype=_acc_dtype(weight.dtype)),
            weight.new_empty((groups, n_half, in_g, in_g), dtype=torch.int8))


# ----------------------------------------------------------------------------------------------------------
# 6. Registration (lipkern/ops/_registration.py): the custom op lipkern::aol_rescale (+ its backward op) for
#    torch.compile / export, the eager autograd path, the torch.func and double-backward fallbacks.
#    Outputs: the rescaled weight and d (differentiable), the half-shift signs (kept for the backward).
# ----------------------------------------------------------------------------------------------------------
_AOL_OP = define_op("aol_rescale", "(Tensor weight, int groups) -> (Tensor, Tensor, Tensor)", _aol_fwd, _aol_fake,
                    visible=2, saved_outputs=(1,), backward=_aol_bwd, functional=_aol_functional,
                    functional_backward=_aol_functional_backward)


# ----------------------------------------------------------------------------------------------------------
# 7. Public function.
# ----------------------------------------------------------------------------------------------------------
def _validate(weight: torch.Tensor, groups: int) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"aol_rescale: weight must be a Tensor, got {type(weight).__name__}")
    if weight.dim() not in (2, 4):
        raise ValueError("aol_rescale: weight must be a linear weight (out, in) or a conv weight "
                         f"(out, in/groups, kh, kw), got shape {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"aol_rescale: weight must be float16, bfloat16, float32 or float64, got {weight.dtype}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"aol_rescale: groups must be a positive int, got {groups!r}")
    if weight.dim() == 2 and groups != 1:
        raise ValueError("aol_rescale: groups apply to conv weights only")
    if weight.numel() == 0:
        raise ValueError(f"aol_rescale: weight is empty, shape {tuple(weight.shape)}")
    if weight.shape[0] % groups:
        raise ValueError(f"aol_rescale: groups={groups} does not divide the {weight.shape[0]} output channels")


def aol_layer_rescale(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """:func:`aol_rescale` (the rescaled weight) for a layer's training step. On the CPU, for a contiguous
    float32 / 16-bit weight that needs a gradient, with the kernels on and no autocast, torch.func transform or
    tracing, the op's C++ kernels run in one lean autograd.Function (:class:`_CpuLayerRescale`: the same
    forward, backward and double backward as the op's eager path, bit for bit, without its generic
    registration layers, which cost a small layer's step more than its arithmetic). Anything else takes
    :func:`aol_rescale`."""
    if (weight.is_cpu and weight.dtype != torch.float64 and weight.requires_grad and torch.is_grad_enabled()
            and not torch._C._is_any_autocast_enabled() and weight.is_contiguous() and _cpu_kernels.available()
            and _cpu_kernels.plain(weight) and not torch._C._are_functorch_transforms_active() and not tracing()
            and select_backend(weight) == "torch"):
        _validate(weight, groups)
        return _CpuLayerRescale.apply(weight, groups)[0]
    return aol_rescale(weight, groups)


class _CpuLayerRescale(torch.autograd.Function):
    """The eager path of ``lipkern::aol_rescale`` on the CPU kernels: :func:`_aol_fwd`'s forward and
    :func:`_aol_bwd`'s backward without the op's generic layers. Its outputs are the op's, (W·d, d): d, saved
    as an output, carries its own gradient into a backward whose graph is recorded (create_graph), which takes
    the op's functional backward (as under autocast or with wrapped gradients): exact second derivatives."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, groups: int):
        scheme = _torch_scheme(weight, groups)
        out, scale, signs, ran = _forward_cpu_kernel(weight, groups, scheme, True)
        _record_torch_path(True, scheme, ran)
        ctx.groups = groups
        ctx.save_for_backward(weight, scale, signs)
        ctx.set_materialize_grads(False)
        return out, scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_scale: torch.Tensor | None):
        weight, scale, signs = ctx.saved_tensors
        if grad_out is None and grad_scale is None:
            return None, None
        grads = (torch.zeros_like(weight) if grad_out is None else grad_out, grad_scale)
        device = _autocast_device(weight)  # (the op's choices, lipkern.ops._registration: Op._gradients)
        if (torch.is_grad_enabled() or device is not None or not _cpu_kernels.available()
                or not _cpu_kernels.plain(*(g for g in grads if g is not None))):
            with torch.autocast(device, enabled=False) if device is not None else contextlib.nullcontext():
                grad = _aol_functional_backward(grads, (weight, ctx.groups), (scale, signs), (True,))[0]
        else:
            grad = _backward_cpu_kernel(grads[0].contiguous(), None if grad_scale is None else grad_scale.contiguous(),
                                        weight, scale, signs, ctx.groups)
        return grad, None


def _extreme_range_scale(w4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 weights beyond 2^±256: (W·2⁻ᵉ, e) with the largest |entry| in [0.5, 1), else (W, 0); device ops
    only. The Gram sums are squares: |W| ≈ 1e155 overflows them (NaN scale), |W| ≈ 1e-160 underflows them."""
    largest = w4.detach().abs().amax()
    exponent = torch.frexp(largest).exponent
    exponent = torch.where((largest > 0) & (exponent.abs() > 256), exponent, 0)
    return times_power_of_two(w4, -exponent), exponent


def aol_rescale(weight: torch.Tensor, groups: int = 1, return_scale: bool = False):
    """AOL-rescaled weight ``W · diag(d)`` with ``d_i ≤ (Σ_j |WᵀW|_ij)^(-1/2)`` (a proven rounding margin).

    Args:
        weight: linear weight ``(out, in)`` or conv weight ``(out, in/groups, kh, kw)``; float16, bfloat16,
            float32 or float64. Any strides.
        groups: conv groups; each group of output channels is rescaled on its own (its operator is a block
            of the block-diagonal conv operator, so the norm bound holds per group and overall).
        return_scale: also return ``d`` with shape ``(groups, in/groups)`` (``(1, in)`` for linear), in
            float32 (float64 for float64 weights).

    Returns:
        The rescaled weight, same shape and dtype (and ``d`` if asked). The operator of the **stored** weight,
        linear or conv with any padding ('zeros', 'same', circular), stride, dilation and input size, has
        spectral norm ≤ 1 in exact arithmetic: d includes a proven margin for the rounding of the Gram sums
        (float64 tensor-core products by default, ``LIPKERN_AOL_GRAM=tf32x3`` for TF32x3), of the square root
        and of the stored product W·d (module docstring). Zero columns stay zero. A NaN/Inf weight gives a NaN
        result (no device synchronization to check it). Differentiable (TF32 tensor cores in the backward);
        runs the fused Triton kernels on CUDA (or under ``TRITON_INTERPRET=1``) and the PyTorch path elsewhere
        (see ``LIPKERN_BACKEND``).
    """
    _validate(weight, groups)
    if weight.dtype == torch.float64 and not weight.is_meta:
        scaled, exponent = _extreme_range_scale(weight)
        out, scale = _AOL_OP(scaled, groups)  # W·d = (W·2⁻ᵉ)·(d·2ᵉ): the same rescaled weight
        scale = times_power_of_two(scale, -exponent)
    else:
        out, scale = _AOL_OP(weight, groups)  # (out, in) or (out, in/groups, kh, kw), any strides
    return (out, scale) if return_scale else out
