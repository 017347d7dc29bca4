"""Batched power iteration over a stack of dense (real or complex) matrices.

One iteration, for every matrix M_b of the stack independently (u_b is the persistent right vector):
    w = M u,  z = Mᴴ w,  σ = ‖z‖ / ‖w‖ = ‖Mᴴ v‖,  v = w / ‖w‖,  u ← z / ‖z‖   (u kept when z = 0).
σ is an **estimate** of ‖M‖₂ that converges from below: for a unit v, ‖Mᴴ v‖ ≤ ‖M‖₂. It is exact only in the
limit; `lipkern.bounds` pairs it with a guaranteed upper bound.

The Triton kernel runs one program per matrix and reads each matrix once per iteration: every row tile
gives its part of w = M u and, in the same sweep, its contribution Mᴴ w to z. The CUDA kernel in
`csrc/power_iteration.cu` does the same with one thread block per matrix.

Layout of this file: reference, Triton kernel, launchers, custom op, public function.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import torch

from lipkern import _cuda
from lipkern._dispatch import device_context, select_backend, triton_importable

__all__ = ["PowerIteration", "batched_power_iteration", "batched_power_iteration_ref", "initial_vectors"]

_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


class PowerIteration(NamedTuple):
    """sigma: (B,) real estimates of ‖M_b‖₂ (from below); u: (B, n) right vectors; v: (B, m) left vectors."""

    sigma: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# 1. Reference: the specification, the CPU path and the test oracle.
# ----------------------------------------------------------------------------------------------------------
def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.empty((), dtype=dtype).real.dtype


def batched_power_iteration_ref(matrices: torch.Tensor, u: torch.Tensor, n_iter: int) -> PowerIteration:
    """Plain PyTorch power iteration; returns new tensors and leaves ``u`` untouched."""
    u = u.clone()
    w = torch.zeros(matrices.shape[:-1], dtype=matrices.dtype, device=matrices.device)
    sigma = torch.zeros(matrices.shape[0], dtype=_real_dtype(matrices.dtype), device=matrices.device)
    for _ in range(n_iter):
        w = torch.einsum("bmn,bn->bm", matrices, u)
        z = torch.einsum("bmn,bm->bn", matrices.conj(), w)
        w_norm = torch.linalg.vector_norm(w, dim=1)
        z_norm = torch.linalg.vector_norm(z, dim=1)
        # "!= 0", not "> 0": a NaN norm (NaN/Inf in the matrix) gives NaN results, visibly
        tiny = torch.finfo(w_norm.dtype).tiny
        sigma = torch.where(w_norm != 0, z_norm / w_norm.clamp_min(tiny), 0.0)
        w = torch.where(w_norm[:, None] != 0, w / w_norm.clamp_min(tiny)[:, None], w)
        u = torch.where(z_norm[:, None] != 0, z / z_norm.clamp_min(tiny)[:, None], u)
    return PowerIteration(sigma, u, w)


def initial_vectors(shape: tuple[int, ...], dtype: torch.dtype, device, key: str = "") -> torch.Tensor:
    """Unit vectors along the last dimension, pseudo-random but a function of ``shape`` and ``key`` only,
    so every process (every DDP rank) starts from the same vectors."""
    seed = zlib.crc32(f"lipkern:{tuple(shape)}:{key}".encode())
    generator = torch.Generator().manual_seed(seed)
    real = _real_dtype(dtype)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    if dtype.is_complex:
        x = torch.complex(x, torch.randn(shape, generator=generator, dtype=torch.float64))
    x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x.to(dtype=dtype if dtype.is_complex else real, device=device)


def power_of_two_scale(t: torch.Tensor, batch_dims: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(t·2^-e, e) with e per leading batch index such that the largest |entry| is in [0.5, 1): an exact
    rescaling (entries 2^1022 times smaller than the largest may round to subnormals) that keeps power and
    Gram iterations away from overflow and underflow. e is 0 where t is all zero."""
    flat = t.detach().abs().reshape(*t.shape[:batch_dims], -1) if not t.is_complex() else \
        torch.view_as_real(t.detach().resolve_conj()).abs().reshape(*t.shape[:batch_dims], -1)
    largest = flat.amax(-1)
    exponent = torch.where(largest > 0, torch.frexp(largest.double()).exponent, 0)
    scale = torch.ldexp(torch.ones_like(exponent, dtype=torch.float64), -exponent.double())
    shape = (*scale.shape, *([1] * (t.dim() - batch_dims)))
    return t * scale.to(t.real.dtype if t.is_complex() else t.dtype).reshape(shape), exponent


# ----------------------------------------------------------------------------------------------------------
# 2. Triton kernel: one program per matrix, one sweep over the matrix per iteration.
# ----------------------------------------------------------------------------------------------------------
if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _power_iteration_kernel(m_ptr, u_ptr, v_ptr, sigma_ptr, ROWS, COLS, N_ITER,
                                IS_COMPLEX: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        parts = 2 if IS_COMPLEX else 1
        cols = tl.arange(0, BLOCK_COLS)
        col_mask = cols < COLS
        u_base = u_ptr + b * COLS * parts
        ur = tl.load(u_base + cols * parts, mask=col_mask, other=0.0)
        ui = tl.zeros_like(ur)
        if IS_COMPLEX:
            ui = tl.load(u_base + cols * parts + 1, mask=col_mask, other=0.0)
        m_base = m_ptr + b * ROWS * COLS * parts
        v_base = v_ptr + b * ROWS * parts
        w_sq = tl.sum(tl.zeros_like(ur), axis=0)
        z_norm = w_sq  # loop-carried values must exist before the loop (the interpreter does not check this)
        for _ in range(N_ITER):
            zr = tl.zeros_like(ur)
            zi = tl.zeros_like(ur)
            w_sq = tl.sum(tl.zeros_like(ur), axis=0)
            for r0 in range(0, ROWS, BLOCK_ROWS):
                rows = r0 + tl.arange(0, BLOCK_ROWS)
                row_mask = rows < ROWS
                offs = (rows.to(tl.int64)[:, None] * COLS + cols[None, :]) * parts
                mask = row_mask[:, None] & col_mask[None, :]
                mr = tl.load(m_base + offs, mask=mask, other=0.0)
                # w = M u on this row tile
                wr = tl.sum(mr * ur[None, :], axis=1)
                wi = tl.zeros_like(wr)
                if IS_COMPLEX:
                    mi = tl.load(m_base + offs + 1, mask=mask, other=0.0)
                    wr -= tl.sum(mi * ui[None, :], axis=1)
                    wi = tl.sum(mr * ui[None, :] + mi * ur[None, :], axis=1)
                w_sq += tl.sum(wr * wr + wi * wi, axis=0)
                # z += Mᴴ w, conj(M)ᵀ on the same tile
                zr += tl.sum(mr * wr[:, None], axis=0)
                if IS_COMPLEX:
                    zr += tl.sum(mi * wi[:, None], axis=0)
                    zi += tl.sum(mr * wi[:, None] - mi * wr[:, None], axis=0)
                tl.store(v_base + rows * parts, wr, mask=row_mask)
                if IS_COMPLEX:
                    tl.store(v_base + rows * parts + 1, wi, mask=row_mask)
            z_norm = tl.sqrt(tl.sum(zr * zr + zi * zi, axis=0))
            keep = z_norm == 0.0
            inv = 1.0 / tl.where(keep, 1.0, z_norm)
            ur = tl.where(keep, ur, zr * inv)
            ui = tl.where(keep, ui, zi * inv)
        w_norm = tl.sqrt(w_sq)
        nonzero = w_norm != 0.0  # True for NaN: NaN/Inf in the matrix give NaN results
        sigma = tl.where(nonzero, z_norm / tl.where(nonzero, w_norm, 1.0), 0.0)
        tl.store(sigma_ptr + b, sigma)
        tl.store(u_base + cols * parts, ur, mask=col_mask)
        if IS_COMPLEX:
            tl.store(u_base + cols * parts + 1, ui, mask=col_mask)
        # v = w / ‖w‖ (the unscaled w of the last iteration was stored above by this same program)
        tl.debug_barrier()
        w_scale = 1.0 / tl.where(nonzero, w_norm, 1.0)
        for r0 in range(0, ROWS * parts, BLOCK_ROWS * BLOCK_COLS):
            idx = r0 + tl.arange(0, BLOCK_ROWS * BLOCK_COLS)
            idx_mask = idx < ROWS * parts
            tl.store(v_base + idx, tl.load(v_base + idx, mask=idx_mask) * w_scale, mask=idx_mask)


# ----------------------------------------------------------------------------------------------------------
# 3. Launchers (outputs are u, v, sigma, written in place).
# ----------------------------------------------------------------------------------------------------------
_TRITON_MAX_COLS = 4096


def _launch_triton(matrices, u, v, sigma, n_iter: int) -> None:
    batch, rows, cols = matrices.shape
    block_cols = max(16, triton.next_power_of_2(cols))
    block_rows = max(1, min(triton.next_power_of_2(rows), 4096 // block_cols))
    as_real = (lambda t: torch.view_as_real(t)) if matrices.is_complex() else (lambda t: t)
    with device_context(matrices):
        _power_iteration_kernel[(batch,)](as_real(matrices), as_real(u), as_real(v), sigma, rows, cols, n_iter,
                                          IS_COMPLEX=matrices.is_complex(), BLOCK_ROWS=block_rows,
                                          BLOCK_COLS=block_cols, num_warps=4)


def _launch_torch(matrices, u, v, sigma, n_iter: int) -> None:
    result = batched_power_iteration_ref(matrices, u, n_iter)
    sigma.copy_(result.sigma)
    u.copy_(result.u)
    v.copy_(result.v)


def _backend(matrices: torch.Tensor) -> str:
    rows, cols = matrices.shape[1:]
    cuda_fits = _cuda.available() and matrices.is_cuda and _cuda.batched_power_iteration_fits(
        rows, cols, matrices.dtype)
    backend = select_backend(matrices, has_cuda_kernel=cuda_fits)
    if backend == "triton" and cols > _TRITON_MAX_COLS:
        return "torch"
    return backend


def _run(matrices, u, v, sigma, n_iter: int) -> None:
    if matrices.shape[0] == 0:
        return
    backend = _backend(matrices)
    if backend == "cuda":
        _cuda.batched_power_iteration(matrices, u, v, sigma, n_iter)
    elif backend == "triton":
        _launch_triton(matrices, u, v, sigma, n_iter)
    else:
        _launch_torch(matrices, u, v, sigma, n_iter)


# ----------------------------------------------------------------------------------------------------------
# 4. Custom op: u and v are declared mutations (persistent buffers), sigma is the output.
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("lipkern::batched_power_iteration", mutates_args=("u", "v"))
def _batched_power_iteration_op(matrices: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                                n_iter: int) -> torch.Tensor:
    sigma = torch.empty(matrices.shape[0], dtype=_real_dtype(matrices.dtype), device=matrices.device)
    u_work = u if u.is_contiguous() else u.contiguous()
    v_work = v if v.is_contiguous() else v.contiguous()
    _run(matrices.contiguous(), u_work, v_work, sigma, n_iter)
    if u_work is not u:
        u.copy_(u_work)
    if v_work is not v:
        v.copy_(v_work)
    return sigma


@_batched_power_iteration_op.register_fake
def _(matrices, u, v, n_iter):
    return matrices.new_empty(matrices.shape[0], dtype=_real_dtype(matrices.dtype))


# ----------------------------------------------------------------------------------------------------------
# 5. Public function.
# ----------------------------------------------------------------------------------------------------------
def _validate(matrices: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None, n_iter: int) -> None:
    if not isinstance(matrices, torch.Tensor) or matrices.dim() != 3:
        raise ValueError("batched_power_iteration: matrices must be a (batch, rows, cols) tensor, got "
                         f"{tuple(matrices.shape) if isinstance(matrices, torch.Tensor) else type(matrices)}")
    if matrices.dtype not in _DTYPES:
        raise TypeError(f"batched_power_iteration: matrices must be one of {_DTYPES}, got {matrices.dtype}")
    batch, rows, cols = matrices.shape
    if rows == 0 or cols == 0:
        raise ValueError(f"batched_power_iteration: empty matrices {tuple(matrices.shape)}")
    if not isinstance(n_iter, int) or isinstance(n_iter, bool) or n_iter < 1:
        raise ValueError(f"batched_power_iteration: n_iter must be an int >= 1, got {n_iter!r}")
    for name, vec, size in (("u", u, cols), ("v", v, rows)):
        if vec is None:
            continue
        if vec.shape != (batch, size):
            raise ValueError(f"batched_power_iteration: {name} must have shape {(batch, size)}, "
                             f"got {tuple(vec.shape)}")
        if vec.dtype != matrices.dtype or vec.device != matrices.device:
            raise ValueError(f"batched_power_iteration: {name} must be {matrices.dtype} on {matrices.device}, "
                             f"got {vec.dtype} on {vec.device}")


def batched_power_iteration(matrices: torch.Tensor, u: torch.Tensor | None = None, v: torch.Tensor | None = None,
                            n_iter: int = 1) -> PowerIteration:
    """Advance the power iteration of every matrix in a stack by ``n_iter`` steps.

    matrices: (B, m, n), float32/float64/complex64/complex128. u: (B, n) right vectors, v: (B, m) left vectors,
    same dtype and device; when given they are **updated in place** (declared mutations, so they can be
    module buffers under ``torch.compile``). When u is None it starts from :func:`initial_vectors`.

    Returns ``PowerIteration(sigma, u, v)``: sigma (B,) real, an estimate of each ‖M_b‖₂ that is never above
    it (up to rounding) and converges from below. ‖M_b‖₂² must be representable in the dtype (the kernels
    form MᴴM u); :func:`power_of_two_scale` rescales a stack exactly when it is not. Not differentiable: the vectors are constants of the
    computation (for a differentiable σ use vᴴ M u with the returned vectors).
    No value is checked (that would synchronize with the device): NaN/Inf in a matrix give it a NaN sigma.
    """
    _validate(matrices, u, v, n_iter)
    batch, rows, cols = matrices.shape
    if u is None:
        u = initial_vectors((batch, cols), matrices.dtype, matrices.device)
    if v is None:
        v = torch.zeros((batch, rows), dtype=matrices.dtype, device=matrices.device)
    with torch.no_grad():
        sigma = _batched_power_iteration_op(matrices.detach(), u, v, n_iter)
    return PowerIteration(sigma, u, v)
