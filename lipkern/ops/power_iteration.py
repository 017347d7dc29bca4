"""Batched power iteration over a stack of dense (real or complex) matrices.

One iteration, for every matrix M_b of the stack independently (u_b is the persistent right vector):
    w = M u,  z = Mᴴ w,  σ = ‖z‖ / ‖w‖ = ‖Mᴴ v‖,  v = w / ‖w‖,  u ← z / ‖z‖   (u kept when z = 0).
σ is an **estimate** of ‖M‖₂ that converges from below: for a unit v, ‖Mᴴ v‖ ≤ ‖M‖₂. It is exact only in the
limit; `lipkern.bounds` pairs it with a guaranteed upper bound.

The Triton kernel runs one program per matrix and reads each matrix once per iteration: every row tile
gives its part of w = M u and, in the same sweep, its contribution Mᴴ w to z. Large real matrices (≥ 2²⁰
entries, e.g. CPLLinear 4096²) split their rows over many programs instead (`_power_split_rows_kernel`: each
program its rows' block of w and a partial Mᵀw), and a second small launch per iteration sums the partials in
a fixed order (`_power_split_reduce_kernel`: deterministic, no atomics) and normalizes. The CUDA kernel in
`csrc/power_iteration.cu` runs one thread block per matrix at every size (the split is Triton's only).

Layout of this file: reference, Triton kernel, launchers, custom op, public function.
"""

from __future__ import annotations

import functools
import zlib
from typing import NamedTuple

import torch

from lipkern import _cpu_kernels, _cuda
from lipkern._dispatch import device_context, record_implementation, select_backend, tracing, triton_importable
from lipkern.ops._registration import define_op

__all__ = ["PowerIteration", "advance_power_iteration", "batched_power_iteration",
           "batched_power_iteration_ref", "initial_vectors"]

_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


class PowerIteration(NamedTuple):
    """sigma: (B,) real estimates of ‖M_b‖₂ (from below); u: (B, n) right vectors; v: (B, m) left vectors."""

    sigma: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# 1. Reference: the specification and the test oracle (the CPU path is `_launch_torch`, section 3).
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
    if not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"initial_vectors: dtype must be floating point or complex, got {dtype}")
    seed = zlib.crc32(f"lipkern:{tuple(shape)}:{key}".encode())
    generator = torch.Generator().manual_seed(seed)
    real = _real_dtype(dtype)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    if dtype.is_complex:
        x = torch.complex(x, torch.randn(shape, generator=generator, dtype=torch.float64))
    x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x.to(dtype=dtype if dtype.is_complex else real, device=device)


def times_power_of_two(x: torch.Tensor, exponent) -> torch.Tensor:
    """x·2^e in two halves (torch.ldexp forms 2^e, which overflows for e > 1023 and gives inf·0 = NaN): exact
    while the result is normal; scaling down into the subnormal range errs by ≤ 2⁻¹⁰⁷⁴ per entry (the
    intermediate is never smaller than the result)."""
    exponent = torch.as_tensor(exponent, device=x.device).to(torch.int64)
    first = torch.div(exponent, 2, rounding_mode="floor")
    real = x.real.dtype if x.is_complex() else x.dtype
    return x * torch.pow(2.0, first.to(real)) * torch.pow(2.0, (exponent - first).to(real))


def power_of_two_scale(t: torch.Tensor, batch_dims: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(t·2^-e, e) with e per leading batch index such that the largest |entry| is in [0.5, 1): an exact
    rescaling (entries 2^1022 times smaller than the largest may round to subnormals) that keeps power and
    Gram iterations away from overflow and underflow. e is 0 where t is all zero."""
    flat = t.detach().abs().reshape(*t.shape[:batch_dims], -1) if not t.is_complex() else \
        torch.view_as_real(t.detach().resolve_conj()).abs().reshape(*t.shape[:batch_dims], -1)
    largest = flat.amax(-1)
    exponent = torch.where(largest > 0, torch.frexp(largest.double()).exponent, 0)
    shape = (*exponent.shape, *([1] * (t.dim() - batch_dims)))
    return times_power_of_two(t, -exponent.reshape(shape)), exponent


# ----------------------------------------------------------------------------------------------------------
# 2. Triton kernel: one program per matrix, one sweep over the matrix per iteration.
# ----------------------------------------------------------------------------------------------------------
if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _vector_norm(xr, xi):
        """‖x‖ of a register vector (real and imaginary parts), scaled by its largest |part| first: the squares
        cannot overflow or underflow while ‖x‖ is representable (x here is MᴴM u, of size ‖M‖²)."""
        big = tl.maximum(tl.max(tl.abs(xr), axis=0), tl.max(tl.abs(xi), axis=0))
        inv = 1.0 / tl.where(big > 0.0, big, 1.0)  # NaN/Inf: the sum below is NaN
        sr = xr * inv
        si = xi * inv
        return big * tl.sqrt(tl.sum(sr * sr + si * si, axis=0))

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
            z_norm = _vector_norm(zr, zi)
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


    @triton.jit
    def _power_split_rows_kernel(m_ptr, u_ptr, v_ptr, z_part_ptr, w_sq_ptr, ROWS, COLS, ROWS_PER_PROGRAM,
                                 BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        """Large real matrices, many programs per matrix: program (b, p) takes rows [p·R, (p+1)·R) of M_b, writes
        its block of w = M u (unscaled) into v, its partial Mᵀw into partial[b, p] and its Σw² into w_sq[b, p]."""
        b = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1)
        programs = tl.num_programs(1)
        cols = tl.arange(0, BLOCK_COLS)
        col_mask = cols < COLS
        u = tl.load(u_ptr + b * COLS + cols, mask=col_mask, other=0.0)
        m_base = m_ptr + b * ROWS * COLS
        z = tl.zeros_like(u)
        w_sq = tl.sum(tl.zeros_like(u), axis=0)
        row_start = p * ROWS_PER_PROGRAM
        for r0 in range(row_start, row_start + ROWS_PER_PROGRAM, BLOCK_ROWS):
            rows = r0 + tl.arange(0, BLOCK_ROWS)
            row_mask = rows < ROWS
            mask = row_mask[:, None] & col_mask[None, :]
            m = tl.load(m_base + rows.to(tl.int64)[:, None] * COLS + cols[None, :], mask=mask, other=0.0)
            w = tl.sum(m * u[None, :], axis=1)
            w_sq += tl.sum(w * w, axis=0)
            z += tl.sum(m * w[:, None], axis=0)
            tl.store(v_ptr + b * ROWS + rows, w, mask=row_mask)
        tl.store(z_part_ptr + (b * programs + p) * COLS + cols, z, mask=col_mask)
        tl.store(w_sq_ptr + b * programs + p, w_sq)

    @triton.jit
    def _power_split_reduce_kernel(u_ptr, v_ptr, sigma_ptr, z_part_ptr, w_sq_ptr, ROWS, COLS, PROGRAMS,
                                   SCALE_V: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_COLS: tl.constexpr,
                                   BLOCK_V: tl.constexpr):
        """One program per matrix, after _power_split_rows_kernel: z = Σ_p partial (fixed order: deterministic,
        no atomics), u ← z/‖z‖ (kept when z = 0), σ = ‖z‖/‖w‖; with SCALE_V (last iteration) v ← w/‖w‖."""
        b = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_COLS)
        col_mask = cols < COLS
        z = tl.zeros([BLOCK_COLS], dtype=u_ptr.dtype.element_ty)
        for p in range(0, PROGRAMS):
            z += tl.load(z_part_ptr + (b * PROGRAMS + p) * COLS + cols, mask=col_mask, other=0.0)
        ps = tl.arange(0, BLOCK_P)
        w_sq = tl.sum(tl.load(w_sq_ptr + b * PROGRAMS + ps, mask=ps < PROGRAMS, other=0.0), axis=0)
        z_norm = _vector_norm(z, tl.zeros_like(z))
        keep = z_norm == 0.0
        u_old = tl.load(u_ptr + b * COLS + cols, mask=col_mask, other=0.0)
        u = tl.where(keep, u_old, z * (1.0 / tl.where(keep, 1.0, z_norm)))
        tl.store(u_ptr + b * COLS + cols, u, mask=col_mask)
        w_norm = tl.sqrt(w_sq)
        nonzero = w_norm != 0.0  # True for NaN: NaN/Inf in the matrix give NaN results
        tl.store(sigma_ptr + b, tl.where(nonzero, z_norm / tl.where(nonzero, w_norm, 1.0), 0.0))
        if SCALE_V:
            w_scale = 1.0 / tl.where(nonzero, w_norm, 1.0)
            for r0 in range(0, ROWS, BLOCK_V):
                idx = r0 + tl.arange(0, BLOCK_V)
                v = tl.load(v_ptr + b * ROWS + idx, mask=idx < ROWS)
                tl.store(v_ptr + b * ROWS + idx, v * w_scale, mask=idx < ROWS)


# ----------------------------------------------------------------------------------------------------------
# 3. Launchers (outputs are u, v, sigma, written in place).
# ----------------------------------------------------------------------------------------------------------
_TRITON_MAX_COLS = 4096
_TILE = 4096  # entries of a row tile (registers per program); tests lower it to split small matrices
# Real matrices of at least this many elements run on many programs per matrix (split rows, two launches per
# iteration): one program streaming a 4096² matrix uses one SM of 132. Tests lower it to reach the path.
_SPLIT_MIN_ELEMENTS = 1 << 20
_SPLIT_TARGET_PROGRAMS = 256  # programs over the whole stack (about 2 per SM on an H100 / H200)
_SPLIT_MAX_PROGRAMS = 64  # per matrix: the reduce program reads programs × cols partials


def _split_rows(batch: int, rows: int, cols: int, block_rows: int, is_complex: bool) -> int:
    """Rows per program of the split path, or 0 for one program per matrix."""
    if is_complex or rows * cols < _SPLIT_MIN_ELEMENTS or rows <= block_rows:
        return 0
    programs = max(1, min(_SPLIT_MAX_PROGRAMS, -(-_SPLIT_TARGET_PROGRAMS // batch), -(-rows // block_rows)))
    if programs < 2:
        return 0
    per_program = -(-rows // programs)
    return -(-per_program // block_rows) * block_rows


def _launch_triton_split(matrices, u, v, sigma, n_iter: int, block_rows: int, block_cols: int,
                         rows_per_program: int) -> None:
    batch, rows, cols = matrices.shape
    programs = -(-rows // rows_per_program)
    partial = torch.empty((batch, programs, cols), dtype=matrices.dtype, device=matrices.device)
    w_sq = torch.empty((batch, programs), dtype=matrices.dtype, device=matrices.device)
    block_p = max(16, triton.next_power_of_2(programs))
    with device_context(matrices):
        for i in range(n_iter):
            _power_split_rows_kernel[(batch, programs)](matrices, u, v, partial, w_sq, rows, cols,
                                                        rows_per_program, BLOCK_ROWS=block_rows,
                                                        BLOCK_COLS=block_cols, num_warps=4)
            _power_split_reduce_kernel[(batch,)](u, v, sigma, partial, w_sq, rows, cols, programs,
                                                 SCALE_V=i == n_iter - 1, BLOCK_P=block_p, BLOCK_COLS=block_cols,
                                                 BLOCK_V=1024, num_warps=8)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _blocks(rows: int, cols: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS): a row tile of at most _TILE entries spanning all columns."""
    block_cols = max(16, _next_power_of_2(cols))
    return max(1, min(_next_power_of_2(rows), _TILE // block_cols)), block_cols


def _launch_triton(matrices, u, v, sigma, n_iter: int) -> None:
    batch, rows, cols = matrices.shape
    block_rows, block_cols = _blocks(rows, cols)
    rows_per_program = _split_rows(batch, rows, cols, block_rows, matrices.is_complex())
    if rows_per_program:
        _launch_triton_split(matrices, u, v, sigma, n_iter, block_rows, block_cols, rows_per_program)
        return
    as_real = (lambda t: torch.view_as_real(t)) if matrices.is_complex() else (lambda t: t)
    with device_context(matrices):
        _power_iteration_kernel[(batch,)](as_real(matrices), as_real(u), as_real(v), sigma, rows, cols, n_iter,
                                          IS_COMPLEX=matrices.is_complex(), BLOCK_ROWS=block_rows,
                                          BLOCK_COLS=block_cols, num_warps=4)


_OP_SECONDS, _FLOP_SECONDS = 1e-5, 5e-11  # CPU cost model of the PyTorch path: per op, per flop
_CPP_ENTRY_SECONDS = 2.2e-9  # the C++ CPU kernel per matrix entry and step (its two passes; this VM, 1 thread)


def _cpu_step_costs(shape, n_iter: int) -> tuple[float, float]:
    """Modelled CPU seconds of (n_iter steps, the first n_iter − 1 by repeated squaring then one step) on the
    PyTorch path: ≈ 13 ops and 4mn flops per step against ≈ 4 ops and 2n³ flops per squaring (plus the Gram
    matrix, 2mn²)."""
    batch, rows, cols = shape
    by_steps = n_iter * (13 * _OP_SECONDS + 4 * batch * rows * cols * _FLOP_SECONDS)
    squarings = (n_iter - 1).bit_length()
    by_squaring = ((6 + 4 * squarings) * _OP_SECONDS + batch * (2 * rows * cols**2 + squarings * 2 * cols**3
                                                                 + 2 * cols**2) * _FLOP_SECONDS
                   + 13 * _OP_SECONDS + 4 * batch * rows * cols * _FLOP_SECONDS)
    return by_steps, by_squaring


def _squaring_pays(matrices: torch.Tensor, n_iter: int) -> bool:
    """Whether (MᴴM)^(n_iter−1) by repeated squaring beats n_iter − 1 steps on the CPU's PyTorch path."""
    if matrices.device.type != "cpu" or n_iter < 4:
        return False
    by_steps, by_squaring = _cpu_step_costs(matrices.shape, n_iter)
    return by_squaring < by_steps


def _cpp_pays(matrices: torch.Tensor, n_iter: int) -> bool:
    """Whether the C++ CPU kernel (lipkern._cpu, real float32/64 matrices: n_iter·b·m·n entry visits) beats the
    PyTorch path's cheaper form here."""
    if (matrices.device.type != "cpu" or matrices.dtype not in (torch.float32, torch.float64)
            or not _cpu_kernels.available() or not _cpu_kernels.plain(matrices)):
        return False
    return _cpp_cheaper(tuple(matrices.shape), n_iter)


@functools.lru_cache(maxsize=256)  # (the layers ask every training step)
def _cpp_cheaper(shape: tuple, n_iter: int) -> bool:
    batch, rows, cols = shape
    by_steps, by_squaring = _cpu_step_costs(shape, n_iter)
    torch_path = min(by_steps, by_squaring) if n_iter >= 4 else by_steps
    return n_iter * batch * rows * cols * _CPP_ENTRY_SECONDS < torch_path


def cpu_power_rows(weight: torch.Tensor, u: torch.Tensor, n_iter: int) -> tuple | None:
    """A layer's power step by the C++ CPU kernel, without the op's layers (the training step of a small layer
    costs more in dispatch than in arithmetic): (u', v') as new tensors, u read and not written, the same
    numbers as :func:`batched_power_iteration` of ``weight[None]`` (which runs this kernel at such sizes). None
    where that kernel would not run: another device or dtype, the kernels off or not built, a backend other
    than torch chosen (Triton's interpreter included), a wrapped tensor, a torch.func transform or tracing (a
    FakeTensorMode, make_fx, torch.compile: they record the op), or a size where the PyTorch path is cheaper."""
    if (not weight.is_cpu or weight.dtype not in (torch.float32, torch.float64) or u.dtype != weight.dtype
            or not _cpu_kernels.available() or not _cpu_kernels.plain(weight, u)
            or torch._C._are_functorch_transforms_active() or tracing()):  # (these see the custom op)
        return None
    rows, cols = weight.shape
    too_wide = f"matrices wider than {_TRITON_MAX_COLS} columns" if cols > _TRITON_MAX_COLS else None
    # (a stacked round of such layers costs more per layer: torch.bmm of stacked matrix-vector products is slow
    # on the CPU, 2 × 256 × 180: 397 µs against 147 µs for one)
    if not _cpp_cheaper((1, rows, cols), n_iter) or select_backend(weight, triton_reason=too_wide) != "torch":
        return None
    record_implementation("batched_power_iteration", "cpp")
    return _cpu_kernels.power_iteration_one(weight.detach().contiguous(), u, n_iter)


def _gram_power_direction(matrices, scale, x, steps: int):
    """x ← (MᴴM)^steps x normalized (x kept where that is zero), the direction ``steps`` power steps reach, by
    repeated squaring of G = (M/s)ᴴ(M/s): log2(steps) matrix products instead of 2·steps matrix-vector
    products. Each square is divided by its largest |real or imaginary part| (kept ≥ tiny): entries stay
    ≤ √2·n, nothing overflows; the components that underflow are the ones the iteration discards."""
    tiny = torch.finfo(scale.dtype).tiny
    scaled = matrices * scale.reciprocal()[:, :, None]  # (a real factor: cheaper than a complex division)
    gram = scaled.mH @ scaled
    while steps:
        if steps & 1:
            y = torch.bmm(gram, x.unsqueeze(-1)).squeeze(-1)
            norm = torch.linalg.vector_norm(y, dim=1, keepdim=True)
            x = torch.where(norm != 0, y / norm.clamp_min(tiny), x)
        steps >>= 1
        if steps:
            gram = gram @ gram
            parts = (torch.view_as_real(gram) if gram.is_complex() else gram).flatten(1)
            largest = torch.maximum(parts.amax(1), parts.amin(1).neg()).clamp_min(tiny)  # NaN propagates
            gram = gram.mul_(largest.reciprocal()[:, None, None])
    return x


def _launch_torch(matrices, u, v, sigma, n_iter: int) -> str:
    """The PyTorch path (returns which form ran), in place, with v unit before Mᴴ is applied (σ = ‖Mᴴ v‖). M u and Mᴴ v are divided by
    s, the largest |real or imaginary part| of M (two reductions, no scaled copy of M; σ multiplied back): an
    entry of M u is at most ‖M‖ ≤ √(mn)·√2·s, and ‖M‖ ≥ s, so the squares in the norms neither overflow nor
    underflow at any scale. A zero w leaves v zero and σ 0, a zero z keeps u; NaN/Inf give NaN results."""
    tiny = torch.finfo(sigma.dtype).tiny
    parts = torch.view_as_real(matrices) if matrices.is_complex() else matrices
    dims = tuple(range(1, parts.dim()))
    scale = torch.maximum(parts.amax(dims), parts.amin(dims).neg()).clamp_min(tiny)[:, None]  # NaN propagates
    adjoint = matrices.mH
    x, form = u, "torch/steps"
    if _squaring_pays(matrices, n_iter):  # the first n_iter − 1 steps' direction, then the last step below
        x, n_iter, form = _gram_power_direction(matrices, scale, x, n_iter - 1), 1, "torch/gram-squaring"
    for _ in range(n_iter):
        w = torch.bmm(matrices, x.unsqueeze(-1)).squeeze(-1) / scale
        w = w / torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(tiny)
        z = torch.bmm(adjoint, w.unsqueeze(-1)).squeeze(-1) / scale
        z_norm = torch.linalg.vector_norm(z, dim=1, keepdim=True)
        x = torch.where(z_norm != 0, z / z_norm.clamp_min(tiny), x)
    sigma.copy_((z_norm * scale).squeeze(1))
    u.copy_(x)
    v.copy_(w)
    return form


def _backend(matrices: torch.Tensor) -> str:
    rows, cols = matrices.shape[1:]
    too_wide = f"matrices wider than {_TRITON_MAX_COLS} columns" if cols > _TRITON_MAX_COLS else None
    if not matrices.is_cuda:  # no CUDA kernel, no split: the layers' power step calls this every training step
        return select_backend(matrices, triton_reason=too_wide)
    cuda_fits = _cuda.available() and _cuda.batched_power_iteration_fits(rows, cols, matrices.dtype)
    # large matrices: many programs per matrix beat one thread block per matrix
    split = _split_rows(matrices.shape[0], rows, cols, _blocks(rows, cols)[0], matrices.is_complex())
    return select_backend(matrices, has_cuda_kernel=cuda_fits, triton_reason=too_wide,
                          prefer_triton=cuda_fits and split)


def _batched_power_iteration(matrices, u, v, n_iter: int, *, save: bool = False) -> torch.Tensor:
    sigma = torch.empty(matrices.shape[0], dtype=_real_dtype(matrices.dtype), device=matrices.device)
    if matrices.shape[0] == 0:
        return sigma
    matrices = matrices.contiguous()
    backend = _backend(matrices)
    if backend == "cuda":
        _cuda.batched_power_iteration(matrices, u, v, sigma, n_iter)
    elif backend == "triton":
        _launch_triton(matrices, u, v, sigma, n_iter)
    elif _cpp_pays(matrices, n_iter):
        _cpu_kernels.power_iteration(matrices, u, v, sigma, n_iter)
        backend = "cpp"
    else:
        backend = _launch_torch(matrices, u, v, sigma, n_iter)
    record_implementation("batched_power_iteration", backend)
    return sigma


# ----------------------------------------------------------------------------------------------------------
# 4. Registration (lipkern/ops/_registration.py): the custom op lipkern::batched_power_iteration, u and v
#    declared mutations (persistent buffers), sigma the output; eager calls run the implementation directly.
# ----------------------------------------------------------------------------------------------------------
_POWER_OP = define_op("batched_power_iteration",
                      "(Tensor matrices, Tensor(a!) u, Tensor(b!) v, int n_iter) -> Tensor", _batched_power_iteration,
                      lambda matrices, u, v, n_iter: matrices.new_empty(matrices.shape[0],
                                                                       dtype=_real_dtype(matrices.dtype)))


def advance_power_iteration(matrices: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                            n_iter: int) -> torch.Tensor:
    """:func:`batched_power_iteration` without its argument checks, for callers whose arguments are valid by
    construction (the layers): advances u and v in place, returns sigma."""
    return _POWER_OP(matrices.detach(), u, v, n_iter)


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
    form MᴴM u and take its norm by a scaled sum of squares, so ‖M_b‖⁴ need not be); :func:`power_of_two_scale` rescales a stack exactly when it is not. Not differentiable: the vectors are constants of the
    computation (for a differentiable σ use vᴴ M u with the returned vectors).
    No value is checked (that would synchronize with the device): NaN/Inf in a matrix give it a NaN sigma.
    """
    _validate(matrices, u, v, n_iter)
    batch, rows, cols = matrices.shape
    if u is None:
        u = initial_vectors((batch, cols), matrices.dtype, matrices.device)
    if v is None:
        v = torch.zeros((batch, rows), dtype=matrices.dtype, device=matrices.device)
    return PowerIteration(advance_power_iteration(matrices, u, v, n_iter), u, v)
