"""AOL rescaling (Prach & Lampert 2022): W -> W · diag(d), d_i = (Σ_j |WᵀW|_ij)^(-1/2).

For a conv weight (out, in/groups, kh, kw) the sum runs over all output channels of the group and over the
(2kh-1)(2kw-1) spatial shifts of the kernel's self-correlation, so ‖conv(W·d)‖₂ ≤ 1 for zero, 'same' and
circular padding, any input size, any dilation; a strided conv is that conv followed by subsampling, so it
is 1-Lipschitz too. A zero input column gets d_i = 0 (it stays zero, no NaN).

Notation used below, per group g: M_s[i, j] = Σ_o Σ_x W[o, i, x + s] W[o, j, x] for a shift s of the kernel
(M_{-s} = M_sᵀ), r_i = Σ_s Σ_j |M_s[i, j]|, d_i = r_i^(-1/2). The backward, with a_i = ∂L/∂r_i =
-½ d_i³ (Σ_{o,x} G[o, i, x] W[o, i, x] + ∂L/∂d_i) and G = ∂L/∂W', is
    ∂L/∂W[o, c, x] = G[o, c, x] d_c + Σ_s Σ_j (a_c + a_j) sign(M_s[c, j]) W[o, j, x - s],
one conv of W with the kernel T_s[c, j] = (a_c + a_j) sign(M_s[c, j]). The forward saves sign(M_s) for the
half of the shifts with s ≥ 0 (int8) so the backward need not recompute the Gram correlation.

Layout of this file: reference, Triton kernels, launchers, custom ops, public function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lipkern import _cuda
from lipkern._dispatch import check_finite, device_context, select_backend, triton_importable

__all__ = ["aol_rescale", "aol_rescale_ref"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------
# 1. Reference: the specification, the CPU path and the test oracle.
# ----------------------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _safe_rsqrt(r: torch.Tensor) -> torch.Tensor:
    """r^(-1/2), 0 where r == 0 (differentiable: no inf*0 in the backward), NaN stays NaN."""
    zero = r == 0
    return torch.where(zero, torch.zeros_like(r), torch.rsqrt(torch.where(zero, torch.ones_like(r), r)))


def _self_correlation(w: torch.Tensor) -> torch.Tensor:
    """(out, in, kh, kw) -> (in, in, 2kh-1, 2kw-1), entry [i, j, s + k - 1] = M_s[i, j]."""
    kh, kw = w.shape[-2:]
    wt = w.transpose(0, 1)
    return F.conv2d(wt, wt, padding=(kh - 1, kw - 1))


def aol_rescale_ref(weight: torch.Tensor, groups: int = 1, return_scale: bool = False):
    """Plain PyTorch AOL rescaling (differentiable through autograd). See :func:`aol_rescale`."""
    w4 = weight if weight.dim() == 4 else weight[:, :, None, None]
    w4 = w4.to(_acc_dtype(weight.dtype))
    out_g = w4.shape[0] // groups
    scales, scaled = [], []
    for g in range(groups):
        wg = w4[g * out_g:(g + 1) * out_g]
        r = _self_correlation(wg).abs().sum(dim=(1, 2, 3))
        d = _safe_rsqrt(r)
        scales.append(d)
        scaled.append(wg * d[None, :, None, None])
    out = torch.cat(scaled).reshape(weight.shape).to(weight.dtype)
    return (out, torch.stack(scales)) if return_scale else out


# ----------------------------------------------------------------------------------------------------------
# 2. Triton kernels (only defined when triton imports).
# ----------------------------------------------------------------------------------------------------------
if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _tile_product_tn(a, b, USE_DOT: tl.constexpr):
        """aᵀ @ b for tiles a (R, M), b (R, N); fp64 avoids tl.dot (not supported on every target)."""
        if USE_DOT:
            return tl.dot(tl.trans(a), b, input_precision="ieee")
        else:
            return tl.sum(a[:, :, None] * b[:, None, :], axis=0)

    @triton.jit
    def _tile_product_nt(a, b, USE_DOT: tl.constexpr):
        """a @ bᵀ for tiles a (M, R), b (N, R)."""
        if USE_DOT:
            return tl.dot(a, tl.trans(b), input_precision="ieee")
        else:
            return tl.sum(a[:, None, :] * b[None, :, :], axis=2)

    @triton.jit
    def _aol_fwd_kernel(wp_ptr, partial_ptr, sign_ptr, OUT_G, IN_G, GROUPS,
                        KH: tl.constexpr, KW: tl.constexpr, N_BLOCKS,
                        BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, USE_DOT: tl.constexpr):
        """One (i-block, j-block, group × shift) tile of |M_s|: its row sums and column sums, and sign(M_s).

        wp: weight permuted to (groups, kh, kw, out_g, in_g). Only shifts s ≥ 0 are computed: the row sums of
        |M_s| count for channel i, the column sums count for channel j as the row sums of |M_{-s}|.
        partial: (N_HALF * 2 * N_BLOCKS, groups, in_g), each slot written exactly once.
        """
        NW: tl.constexpr = 2 * KW - 1
        CENTER: tl.constexpr = ((2 * KH - 1) * NW - 1) // 2
        N_HALF: tl.constexpr = CENTER + 1
        ib = tl.program_id(0)
        jb = tl.program_id(1)
        pid2 = tl.program_id(2)
        g = pid2 // N_HALF
        h = pid2 % N_HALF
        f = h + CENTER
        p = f // NW - (KH - 1)
        q = f % NW - (KW - 1)
        ACC = tl.float64 if wp_ptr.dtype.element_ty == tl.float64 else tl.float32

        offs_i = ib * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_j = jb * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_i = offs_i < IN_G
        mask_j = offs_j < IN_G
        plane = OUT_G * IN_G
        acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=ACC)
        for a in range(tl.maximum(0, -p), tl.minimum(KH, KH - p)):
            for b in range(tl.maximum(0, -q), tl.minimum(KW, KW - q)):
                base_i = wp_ptr + ((g * KH + a + p) * KW + b + q) * plane
                base_j = wp_ptr + ((g * KH + a) * KW + b) * plane
                for o0 in range(0, OUT_G, BLOCK_O):
                    offs_o = o0 + tl.arange(0, BLOCK_O)
                    mask_o = offs_o < OUT_G
                    wi = tl.load(base_i + offs_o[:, None] * IN_G + offs_i[None, :],
                                 mask=mask_o[:, None] & mask_i[None, :], other=0.0).to(ACC)
                    wj = tl.load(base_j + offs_o[:, None] * IN_G + offs_j[None, :],
                                 mask=mask_o[:, None] & mask_j[None, :], other=0.0).to(ACC)
                    acc += _tile_product_tn(wi, wj, USE_DOT)

        magnitude = tl.abs(acc)
        row_slot = (h * 2) * N_BLOCKS + jb
        col_slot = (h * 2 + 1) * N_BLOCKS + ib
        tl.store(partial_ptr + (row_slot * GROUPS + g) * IN_G + offs_i, tl.sum(magnitude, axis=1), mask=mask_i)
        col_sums = tl.sum(magnitude, axis=0) * (h != 0).to(ACC)  # s = 0: M_0 is symmetric, rows cover it
        tl.store(partial_ptr + (col_slot * GROUPS + g) * IN_G + offs_j, col_sums, mask=mask_j)
        sign = (acc > 0).to(tl.int8) - (acc < 0).to(tl.int8)
        sign_tile = sign_ptr + (g * N_HALF + h) * IN_G * IN_G + offs_i[:, None] * IN_G + offs_j[None, :]
        tl.store(sign_tile, sign, mask=mask_i[:, None] & mask_j[None, :])

    @triton.jit
    def _aol_scale_kernel(w_ptr, partial_ptr, out_ptr, scale_ptr, N_SLOTS, OUT_G, IN_G, GROUPS,
                          KK: tl.constexpr, ROWS_PER_PROGRAM, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
        """d = (Σ partial)^(-1/2) (0 for a zero column), out = W · d for a chunk of output rows."""
        n_cblocks = tl.cdiv(IN_G, BLOCK_C)
        g = tl.program_id(0) // n_cblocks
        cb = tl.program_id(0) % n_cblocks
        chunk = tl.program_id(1)
        ACC = tl.float64 if partial_ptr.dtype.element_ty == tl.float64 else tl.float32
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < IN_G
        r = tl.zeros((BLOCK_C,), dtype=ACC)
        for s in range(0, N_SLOTS):
            r += tl.load(partial_ptr + (s * GROUPS + g) * IN_G + offs_c, mask=mask_c, other=0.0)
        safe_r = tl.where(r == 0, 1.0, r)
        if ACC == tl.float64:
            d = 1.0 / tl.sqrt(safe_r)  # fp64 sqrt and division are IEEE-rounded
        else:
            d = tl.div_rn(tl.full(safe_r.shape, 1.0, ACC), tl.sqrt_rn(safe_r))
        d = tl.where(r == 0, 0.0, d)
        if chunk == 0:
            tl.store(scale_ptr + g * IN_G + offs_c, d, mask=mask_c)

        offs_k = tl.arange(0, BLOCK_K)
        mask = mask_c[:, None] & (offs_k[None, :] < KK)
        first = chunk * ROWS_PER_PROGRAM
        for o in range(first, tl.minimum(first + ROWS_PER_PROGRAM, OUT_G)):
            offs = ((g * OUT_G + o) * IN_G + offs_c[:, None]) * KK + offs_k[None, :]
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC)
            tl.store(out_ptr + offs, (w * d[:, None]).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _aol_bwd_kernel(wp_ptr, grad_out_ptr, scale_ptr, a_ptr, sign_ptr, grad_in_ptr, OUT_G, IN_G,
                        KH: tl.constexpr, KW: tl.constexpr,
                        BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, USE_DOT: tl.constexpr):
        """grad_in[o, c, x] = G[o, c, x] d_c + Σ_y Σ_j W[o, j, y] (a_c + a_j) sign(M_{x-y}[c, j])."""
        NW: tl.constexpr = 2 * KW - 1
        N_FULL: tl.constexpr = (2 * KH - 1) * NW
        CENTER: tl.constexpr = (N_FULL - 1) // 2
        N_HALF: tl.constexpr = CENTER + 1
        KK: tl.constexpr = KH * KW
        ob = tl.program_id(0)
        cb = tl.program_id(1)
        g = tl.program_id(2) // KK
        x = tl.program_id(2) % KK
        xa = x // KW
        xb = x % KW
        ACC = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32

        offs_o = ob * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_o = offs_o < OUT_G
        mask_c = offs_c < IN_G
        a_c = tl.load(a_ptr + g * IN_G + offs_c, mask=mask_c, other=0.0)
        acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=ACC)
        for ya in tl.static_range(KH):
            for yb in tl.static_range(KW):
                f = (xa - ya + KH - 1) * NW + (xb - yb + KW - 1)
                upper = f >= CENTER  # s = x - y ≥ 0 is stored; otherwise read M_{-s}ᵀ
                h = tl.where(upper, f - CENTER, (N_FULL - 1 - f) - CENTER)
                stride_c = tl.where(upper, IN_G, 1)
                stride_j = tl.where(upper, 1, IN_G)
                sign_base = sign_ptr + (g * N_HALF + h) * IN_G * IN_G
                w_base = wp_ptr + ((g * KH + ya) * KW + yb) * OUT_G * IN_G
                for j0 in range(0, IN_G, BLOCK_C):
                    offs_j = j0 + tl.arange(0, BLOCK_C)
                    mask_j = offs_j < IN_G
                    a_j = tl.load(a_ptr + g * IN_G + offs_j, mask=mask_j, other=0.0)
                    sign = tl.load(sign_base + offs_c[:, None] * stride_c + offs_j[None, :] * stride_j,
                                   mask=mask_c[:, None] & mask_j[None, :], other=0).to(ACC)
                    t = sign * (a_c[:, None] + a_j[None, :])
                    wy = tl.load(w_base + offs_o[:, None] * IN_G + offs_j[None, :],
                                 mask=mask_o[:, None] & mask_j[None, :], other=0.0).to(ACC)
                    acc += _tile_product_nt(wy, t, USE_DOT)

        d_c = tl.load(scale_ptr + g * IN_G + offs_c, mask=mask_c, other=0.0)
        offs = ((g * OUT_G + offs_o[:, None]) * IN_G + offs_c[None, :]) * KK + x
        mask = mask_o[:, None] & mask_c[None, :]
        grad = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(grad_in_ptr + offs, (grad * d_c[None, :] + acc).to(grad_in_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# 3. Launchers: own layout, dtype, block sizes, grid and output allocation.
# ----------------------------------------------------------------------------------------------------------
def _geometry(w4: torch.Tensor, groups: int):
    out_ch, in_g, kh, kw = w4.shape
    n_half = ((2 * kh - 1) * (2 * kw - 1) + 1) // 2
    return out_ch // groups, in_g, kh, kw, n_half


def _pow2(n: int, lo: int, hi: int) -> int:
    """The power of two ≥ n, clamped to [lo, hi]."""
    return max(lo, min(hi, 1 << max(0, n - 1).bit_length()))


def _gram_blocks(w4: torch.Tensor, out_g: int, in_g: int):
    """(BLOCK_C, BLOCK_O, USE_DOT, num_warps). tl.dot needs every tile dimension ≥ 16."""
    if w4.dtype == torch.float64:
        return _pow2(in_g, 16, 32), 16, False, 4
    if w4.device.type == "cuda":
        return _pow2(in_g, 16, 64), _pow2(out_g, 16, 32), True, 4
    return _pow2(in_g, 16, 64), _pow2(out_g, 16, 64), True, 4  # interpreter: few, large programs


def _permuted(w4: torch.Tensor, groups: int) -> torch.Tensor:
    """(out, in_g, kh, kw) -> contiguous (groups, kh, kw, out_g, in_g): tiles load coalesced along in_g."""
    out_ch, in_g, kh, kw = w4.shape
    return w4.view(groups, out_ch // groups, in_g, kh, kw).permute(0, 3, 4, 1, 2).contiguous()


def _gram_partials_triton(w4: torch.Tensor, groups: int):
    """Partial abs row sums (n_slots, groups, in_g) and half-shift signs (groups, n_half, in_g, in_g)."""
    out_g, in_g, kh, kw, n_half = _geometry(w4, groups)
    block_c, block_o, use_dot, num_warps = _gram_blocks(w4, out_g, in_g)
    n_blocks = triton.cdiv(in_g, block_c)
    partial = torch.empty((n_half * 2 * n_blocks, groups, in_g), device=w4.device, dtype=_acc_dtype(w4.dtype))
    signs = torch.empty((groups, n_half, in_g, in_g), device=w4.device, dtype=torch.int8)
    grid = (n_blocks, n_blocks, groups * n_half)
    with device_context(w4):
        _aol_fwd_kernel[grid](_permuted(w4, groups), partial, signs, out_g, in_g, groups, KH=kh, KW=kw,
                              N_BLOCKS=n_blocks, BLOCK_C=block_c, BLOCK_O=block_o, USE_DOT=use_dot,
                              num_warps=num_warps)
    return partial, signs


def _scale_triton(w4: torch.Tensor, partial: torch.Tensor, groups: int):
    out_g, in_g, kh, kw, _ = _geometry(w4, groups)
    block_c = _pow2(in_g, 16, 64)
    rows = out_g if w4.device.type != "cuda" else 16
    out = torch.empty_like(w4)
    scale = torch.empty((groups, in_g), device=w4.device, dtype=partial.dtype)
    grid = (groups * triton.cdiv(in_g, block_c), triton.cdiv(out_g, rows))
    with device_context(w4):
        _aol_scale_kernel[grid](w4, partial, out, scale, partial.shape[0], out_g, in_g, groups, KK=kh * kw,
                                ROWS_PER_PROGRAM=rows, BLOCK_C=block_c, BLOCK_K=triton.next_power_of_2(kh * kw))
    return out, scale


def _scale_cuda(w4: torch.Tensor, partial: torch.Tensor, groups: int):
    out = torch.empty_like(w4)
    scale = torch.empty((groups, w4.shape[1]), device=w4.device, dtype=partial.dtype)
    _cuda.aol_scale_epilogue(partial, w4, out, scale, groups)
    return out, scale


def _gram_torch(w4: torch.Tensor, groups: int):
    """Reference Gram pass: abs row sums r (groups, in_g) and half-shift signs (groups, n_half, in_g, in_g)."""
    out_g, in_g, kh, kw, n_half = _geometry(w4, groups)
    wa = w4.to(_acc_dtype(w4.dtype)).view(groups, out_g, in_g, kh, kw)
    corr = torch.stack([_self_correlation(wa[g]) for g in range(groups)]).flatten(-2)  # (g, in, in, n_full)
    signs = torch.sign(corr[..., n_half - 1:]).permute(0, 3, 1, 2).to(torch.int8).contiguous()
    return corr.abs().sum(dim=(2, 3)), signs


def _scale_torch(w4: torch.Tensor, r: torch.Tensor, groups: int):
    scale = _safe_rsqrt(r)
    out_g, in_g, kh, kw, _ = _geometry(w4, groups)
    wa = w4.to(scale.dtype).view(groups, out_g, in_g, kh, kw)
    return (wa * scale[:, None, :, None, None]).reshape(w4.shape).to(w4.dtype), scale


def _aol_fwd(w4: torch.Tensor, groups: int):
    w4 = w4.contiguous()  # the kernels index raw memory; the op may be called directly with any strides
    check_finite(w4, "aol_rescale")
    backend = select_backend(w4, has_cuda_kernel=True)
    if backend == "torch" or (backend == "cuda" and not triton_importable()):
        r, signs = _gram_torch(w4, groups)
        partial = r[None]  # a single slot
    else:
        partial, signs = _gram_partials_triton(w4, groups)
    if backend == "cuda":
        out, scale = _scale_cuda(w4, partial.contiguous(), groups)
    elif backend == "triton":
        out, scale = _scale_triton(w4, partial, groups)
    else:
        out, scale = _scale_torch(w4, r, groups)
    return out, scale, signs


def _rescale_grad(grad_out, grad_scale, w4, scale, groups):
    """a_i = ∂L/∂r_i = -½ d_i³ (Σ_{o,x} G W + ∂L/∂d_i), 0 for zero columns. Shape (groups, in_g)."""
    out_g, in_g = w4.shape[0] // groups, w4.shape[1]
    acc = scale.dtype
    gw = (grad_out.to(acc) * w4.to(acc)).view(groups, out_g, in_g, -1).sum(dim=(1, 3))
    if grad_scale is not None:
        gw = gw + grad_scale.to(acc)
    return torch.where(scale == 0, torch.zeros_like(scale), -0.5 * scale**3 * gw)


def _full_signs(signs: torch.Tensor) -> torch.Tensor:
    """Half-shift signs (g, n_half, in, in) -> all shifts (g, in, in, n_full), using M_{-s} = M_sᵀ."""
    upper = signs.permute(0, 2, 3, 1)  # [g, c, j, h] = sign M_{h}[c, j]
    mirrored = signs.permute(0, 3, 2, 1)  # [g, c, j, h] = sign M_{h}[j, c] = sign M_{-h}[c, j]
    return torch.cat([mirrored[..., 1:].flip(-1), upper], dim=-1)


def _aol_bwd_torch(grad_out, w4, scale, a, signs, groups):
    out_g, in_g, kh, kw, _ = _geometry(w4, groups)
    acc = scale.dtype
    t = _full_signs(signs).to(acc) * (a[:, :, None, None] + a[:, None, :, None])
    t = t.view(groups, in_g, in_g, 2 * kh - 1, 2 * kw - 1).flip(-2, -1)
    wa = w4.to(acc).view(groups, out_g, in_g, kh, kw)
    through_r = torch.cat([F.conv2d(wa[g], t[g], padding=(kh - 1, kw - 1)) for g in range(groups)])
    direct = grad_out.to(acc).view(groups, out_g, in_g, kh, kw) * scale[:, None, :, None, None]
    return (direct.reshape(w4.shape) + through_r).to(w4.dtype)


def _aol_bwd_triton(grad_out, w4, scale, a, signs, groups):
    out_g, in_g, kh, kw, _ = _geometry(w4, groups)
    block_c, block_o, use_dot, num_warps = _gram_blocks(w4, out_g, in_g)
    if w4.device.type == "cuda" and use_dot:
        block_o = _pow2(out_g, 16, 64)
    grad_in = torch.empty_like(w4)
    grid = (triton.cdiv(out_g, block_o), triton.cdiv(in_g, block_c), groups * kh * kw)
    with device_context(w4):
        _aol_bwd_kernel[grid](_permuted(w4, groups), grad_out, scale, a, signs, grad_in, out_g, in_g, KH=kh, KW=kw,
                              BLOCK_O=block_o, BLOCK_C=block_c, USE_DOT=use_dot, num_warps=num_warps)
    return grad_in


def _aol_bwd(grad_out, grad_scale, w4, scale, signs, groups):
    w4 = w4.contiguous()
    grad_out = grad_out.contiguous()  # stride-0 gradients from .sum().backward() included
    a = _rescale_grad(grad_out, grad_scale, w4, scale, groups).contiguous()
    backend = select_backend(w4, has_cuda_kernel=True)
    if backend == "torch" or not triton_importable():
        return _aol_bwd_torch(grad_out, w4, scale, a, signs, groups)
    return _aol_bwd_triton(grad_out, w4, scale, a, signs, groups)


# ----------------------------------------------------------------------------------------------------------
# 4. Custom ops: the boundary torch.compile and torch.export see.
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("lipkern::aol_rescale", mutates_args=())
def _aol_rescale_op(weight: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight (out, in_g, kh, kw) contiguous -> (rescaled weight, scale (groups, in_g), signs)."""
    return _aol_fwd(weight, groups)


@_aol_rescale_op.register_fake
def _(weight, groups):
    out_g, in_g, kh, kw, n_half = _geometry(weight, groups)
    return (torch.empty_like(weight, memory_format=torch.contiguous_format), weight.new_empty((groups, in_g), dtype=_acc_dtype(weight.dtype)),
            weight.new_empty((groups, n_half, in_g, in_g), dtype=torch.int8))


@torch.library.custom_op("lipkern::aol_rescale_backward", mutates_args=())
def _aol_rescale_backward_op(grad_out: torch.Tensor, grad_scale: torch.Tensor | None, weight: torch.Tensor,
                             scale: torch.Tensor, signs: torch.Tensor, groups: int) -> torch.Tensor:
    return _aol_bwd(grad_out, grad_scale, weight, scale, signs, groups)


@_aol_rescale_backward_op.register_fake
def _(grad_out, grad_scale, weight, scale, signs, groups):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    weight, groups = inputs
    _, scale, signs = output
    ctx.save_for_backward(weight, scale, signs)
    ctx.groups = groups


def _backward(ctx, grad_out, grad_scale, grad_signs):
    weight, scale, signs = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(weight)
    grad_weight = _aol_rescale_backward_op(grad_out, grad_scale, weight, scale, signs, ctx.groups)
    return grad_weight, None


_aol_rescale_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# 5. Public function.
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


def aol_rescale(weight: torch.Tensor, groups: int = 1, return_scale: bool = False):
    """AOL-rescaled weight ``W · diag(d)`` with ``d_i = (Σ_j |WᵀW|_ij)^(-1/2)``.

    Args:
        weight: linear weight ``(out, in)`` or conv weight ``(out, in/groups, kh, kw)``; float16, bfloat16,
            float32 or float64. Any strides.
        groups: conv groups; each group of output channels is rescaled on its own (its operator is a block
            of the block-diagonal conv operator, so the norm bound holds per group and overall).
        return_scale: also return ``d`` with shape ``(groups, in/groups)`` (``(1, in)`` for linear), in
            float32 (float64 for float64 weights).

    Returns:
        The rescaled weight, same shape and dtype (and ``d`` if asked). The operator it defines, linear or
        conv with any padding ('zeros', 'same', circular), stride, dilation and input size, has spectral norm
        ≤ 1 in exact arithmetic; the computed rescaling carries relative floating-point error O(n·eps).
        Zero columns stay zero. Differentiable; runs the fused Triton kernels on CUDA (or under
        ``TRITON_INTERPRET=1``) and the PyTorch reference elsewhere (see ``LIPKERN_BACKEND``).
    """
    _validate(weight, groups)
    w4 = (weight if weight.dim() == 4 else weight[:, :, None, None]).contiguous()
    out, scale, _ = _aol_rescale_op(w4, groups)
    out = out.view(weight.shape)
    return (out, scale) if return_scale else out
