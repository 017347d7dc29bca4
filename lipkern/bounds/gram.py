"""Gram iteration (Delattre et al. 2023) with a rigorous floating-point error term.

For a matrix G₀, G_{t+1} = G_tᴴ G_t gives σ₁(G₀) ≤ ‖G_T‖_F^(2^-T), tight to a factor r^(2^-(T+1)) (r = rank).
Here every step is computed in float64 on a copy scaled by a power of two (exact), A_t = G_t·2^(-e_t) with
‖A_t‖_F < 1, and the computed product Ĝ_{t+1} = fl(A_tᴴ A_t) differs from the exact one by E_t with
‖E_t‖₂ ≤ ‖E_t‖_F ≤ γ ‖A_t‖_F² ≤ γ (the classical bound for any summation order of a dot product of length m,
γ = 4√2 (m+2) u / (1 - 4√2 (m+2) u), generous for complex arithmetic and FMA). Hence
    σ₁(Ĝ_t)² = 4^(e_t) σ₁(A_tᴴA_t) ≤ 4^(e_t) (σ₁(Ĝ_{t+1}) + γ),
and unrolling from β_T = ‖Ĝ_T‖_F (1 + ε_F) gives β_0 ≥ σ₁(G₀) with β_t = 2^(e_t) √(β_{t+1} + γ_t). The result is
multiplied by 1 + 64·T·u for the rounding of this recursion itself. Assumes a classical (not Strassen-like or
3M) matrix multiply, which is what torch's float64/complex128 matmul uses on CPU and through cuBLAS.
"""

from __future__ import annotations

import math

import torch

from lipkern._checks import as_int, as_positive_float
from lipkern.ops.power_iteration import times_power_of_two

__all__ = ["gram_iterations_for", "gram_upper_bound"]

_U = 2.0 ** -53
_UNDERFLOW = 1e-290  # absolute slack for products that underflow (entries below ~1e-154)


def _gamma(length: int) -> float:
    g = 4 * math.sqrt(2) * (length + 2) * _U
    return g / (1 - g) * 1.0001 + _UNDERFLOW  # 1.0001: ‖A‖_F² ≤ 1.0001 for the computed scaling


def gram_iterations_for(rank: int, rtol: float) -> int:
    """Steps T after which ‖G_T‖_F^(2^-T) ≤ (1 + rtol)·σ₁ for every matrix of rank ≤ ``rank`` (a priori)."""
    if rank <= 1:
        return 0
    return max(0, math.ceil(math.log2(math.log(rank) / math.log1p(rtol))) - 1)


def _unroll(last: torch.Tensor, exponents: list[torch.Tensor], gammas: list[float], upper: bool) -> torch.Tensor:
    value = last
    for e, gamma in zip(reversed(exponents), reversed(gammas)):
        inner = value + gamma if upper else (value - gamma).clamp_min(0.0)
        value = torch.ldexp(inner.sqrt(), e)
    return value


def gram_upper_bound(matrices: torch.Tensor, max_iter: int | None = None, rtol: float = 1e-4,
                     lower: float = 0.0) -> torch.Tensor:
    """Guaranteed upper bounds (B,) float64 on σ₁ of each matrix of a (B, m, n) stack (real or complex).

    Iterates until the largest bound is within ``rtol`` of the best known lower bound (the Gram lower bound
    ‖G_T‖_F^(2^-T)/r^(2^-(T+1)), or ``lower``), or for at most ``max_iter`` steps (default: enough for rtol
    whatever the spectrum). Matrices whose bound already falls below that lower bound stop iterating (their
    last bound is kept): the maximum over the stack is unaffected, the work shrinks.

    NaN or ±Inf entries raise a ValueError (one host read): no finite number bounds such a matrix.
    """
    if not isinstance(matrices, torch.Tensor) or matrices.dim() != 3:
        raise ValueError("gram_upper_bound: matrices must be a (B, m, n) tensor, got "
                         f"{getattr(matrices, 'shape', type(matrices).__name__)}")
    if max_iter is not None:
        max_iter = as_int(max_iter, "gram_upper_bound: max_iter", minimum=0)
    # rtol = 0 runs exactly max_iter steps; without max_iter it would never stop
    rtol = as_positive_float(rtol, "gram_upper_bound: rtol", allow_zero=max_iter is not None)
    if not bool(torch.isfinite(matrices).all()):
        raise ValueError("gram_upper_bound: the matrices contain NaN or Inf; no finite bound exists")
    if matrices.numel() == 0:  # no matrices, or empty ones (norm 0)
        return torch.zeros(matrices.shape[0], dtype=torch.float64, device=matrices.device)
    work = matrices.to(torch.complex128 if matrices.is_complex() else torch.float64)
    if work.shape[-2] < work.shape[-1]:
        work = work.mH  # same singular values, smaller Gram matrices
    batch, rows, cols = work.shape
    # Scale each matrix by a power of two so that its largest entry is in [0.5, 1): the first norm can then
    # neither underflow (entries below ~1e-154 square to subnormals) nor overflow. Exact, except that entries
    # 2^1022 times smaller than the largest become subnormal: at most 2^-1074 each, sqrt(rows·cols)·2^-1074
    # in spectral norm, added below (after scaling back).
    largest = torch.maximum(work.real.abs().amax((1, 2)), work.imag.abs().amax((1, 2))) if work.is_complex() \
        else work.abs().amax((1, 2))
    pre_exponent = torch.where(largest > 0, torch.frexp(largest).exponent, 0).to(torch.float64)
    work = times_power_of_two(work, -pre_exponent[:, None, None])
    subnormal_slack = math.sqrt(rows * cols) * 2.0 ** -1074
    if max_iter is None:
        max_iter = gram_iterations_for(cols, rtol)
    bounds = torch.zeros(batch, dtype=torch.float64, device=work.device)
    active = torch.arange(batch, device=work.device)
    exponents: list[torch.Tensor] = []  # per step, for the active subset of that step (subsets only shrink)
    gammas: list[float] = []
    positions: list[torch.Tensor] = []  # index of the current active set within each earlier step's set
    norm_slack = 1 + 2 * (rows * cols + 2) * _U
    step = 0
    while True:
        fro = torch.linalg.matrix_norm(work)
        steps = [e[p] for e, p in zip(exponents, positions)]
        # bounds of the original matrices (the pre-scaling undone), comparable across the batch
        upper = times_power_of_two(_unroll(fro * norm_slack, steps, gammas, True), pre_exponent[active])
        bounds[active] = upper
        lower_now = times_power_of_two(_unroll(fro / (norm_slack * math.sqrt(cols)), steps, gammas, False),
                                       pre_exponent[active])
        best_lower = max(lower, lower_now.max().item() if lower_now.numel() else 0.0)
        if step >= max_iter or bounds.max().item() <= (1 + rtol) * best_lower:
            break
        keep = (upper > best_lower) & (fro > 0)
        if not keep.any():
            break
        kept = keep.nonzero().squeeze(1)
        active, work, fro = active[kept], work[kept], fro[kept]
        positions = [p[kept] for p in positions] + [torch.arange(kept.numel(), device=work.device)]
        exponent = torch.frexp(fro).exponent.to(torch.float64)  # fro = mantissa·2^e, mantissa in [0.5, 1)
        scaled = work * torch.ldexp(torch.ones_like(fro), -exponent)[:, None, None]  # exact: a power of two
        exponents.append(exponent)
        gammas.append(_gamma(scaled.shape[-2]))
        work = scaled.mH @ scaled
        step += 1
    slack = times_power_of_two(torch.full_like(bounds, subnormal_slack), pre_exponent)
    return torch.where(largest > 0, (bounds + slack) * (1 + 64 * (step + 1) * _U), 0.0)
