"""SDP-based Lipschitz residual (SLL, Araujo et al. ICLR 2023) as ops: z = x − Wᵀ(s ⊙ σ(W x + b)) with
s_i = 2/t_i, t_i = Σ_j |W Wᵀ|_ij · q_j / q_i, q = exp(log_q) > 0, σ = ReLU (for a conv: A and Aᵀ, the
stride-1 'same'-padded conv, zeros or circular, and W Wᵀ the kernel's self-correlations ktk, see
``lipkern.nn.sll`` for why this is 1-Lipschitz at every input size).

The op's parts (the anatomy of ../shared/DESIGN.md, on kernels lipkern already has):

1. Reference: :func:`sll_linear_ref` / :func:`sll_conv2d_ref`, the formula in plain torch ops with a given s
   (also the eval layers' form: ``PlainSLLLinear`` / ``PlainSLLConv2d``).
2. The scale: :func:`sll_scale` (the training form, differentiable in W and log_q) and
   :func:`sll_guaranteed_scale` (a proven lower bound of 2/t for the stored weight: float64 Gram with a
   rounding margin, every later operation rounded the safe way, then rounded down to the weight's dtype).
   The Gram is one GEMM (W Wᵀ) or one convolution (conv2d(K, K, padding=k − 1); for the training form on the
   CPU two GEMMs, :func:`abs_gram_sums`): the q-weighted sums need the whole |W Wᵀ| on the hidden side, which
   AOL's Gram kernels do not form (they reduce |WᵀW| with unit weights on the input side as they go); a kernel
   returning the Gram itself would be the GEMM / convolution.
3. The residual: CPL's op (``lipkern.ops.cpl``) with W̃ = diag(√s)·W, b̃ = √s ⊙ b and h = 1, because
   relu(√s·u) = √s·relu(u) for s ≥ 0. So SLL gets CPL's fused forward, its backward that keeps only x, its
   custom op for torch.compile / torch.export, its torch.func and double-backward paths and its autocast
   handling; the gradient reaches W and log_q through √s. Small CPU steps, where the CPL op would run its eager
   form anyway, run the reference formula directly (fewer ops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lipkern._dispatch import tracing
from lipkern._rounding import smallest_normal
from lipkern.ops.aol import _shift_sum
from lipkern.ops.cpl import _adjoint_of_padding, _composite_pays, _round_down, cpl_conv2d, cpl_linear

__all__ = ["sll_conv2d", "sll_conv2d_ref", "sll_guaranteed_scale", "sll_linear", "sll_linear_ref", "sll_scale"]

_U = 2.0 ** -53
_TINY = 2.0 ** -1074  # the absolute error of a float64 operation whose result underflows


def _gamma(n: int) -> float:
    """γ_n = n·u/(1 − n·u) of float64, rounded up generously (× (1 + 2⁻⁴⁰))."""
    return n * _U / (1 - n * _U) * (1 + 2.0 ** -40)


# ----------------------------------------------------------------------------------------------------------
# 1. Reference formulas (with a given scale s).
# ----------------------------------------------------------------------------------------------------------
def sll_linear_ref(x, weight, bias, scale):
    """x − Wᵀ(s ⊙ relu(W x + b)) in plain torch ops."""
    return x - (F.relu(F.linear(x, weight, bias)) * scale) @ weight


def same_padding(kernel_size) -> tuple[int, int, int, int]:
    """'same' padding of a stride-1 conv in F.pad order (left, right, top, bottom); the extra row / column of
    an even kernel on the bottom / right, as nn.Conv2d's padding='same'."""
    kh, kw = kernel_size
    top, left = (kh - 1) // 2, (kw - 1) // 2
    return left, kw - 1 - left, top, kh - 1 - top


def sll_conv2d_ref(x, weight, bias, scale, padding=None, padding_mode: str = "zeros"):
    """x − Aᵀ(s ⊙ relu(A x + b)), A the stride-1 conv after zero / circular ``padding`` (left, right, top,
    bottom; default 'same'), Aᵀ its exact adjoint (transposed conv, then the padding's adjoint)."""
    left, right, top, bottom = same_padding(weight.shape[-2:]) if padding is None else padding
    if padding_mode == "zeros" and left == right and top == bottom:  # the convolutions pad (no copies)
        hidden = F.relu(F.conv2d(x, weight, bias, padding=(top, left))) * scale[:, None, None]
        return x - F.conv_transpose2d(hidden, weight, padding=(top, left))
    pads = (left, right, top, bottom)
    pre = F.conv2d(F.pad(x, pads, mode="constant" if padding_mode == "zeros" else "circular"), weight, bias)
    hidden = F.relu(pre) * scale[:, None, None]
    return x - _adjoint_of_padding(F.conv_transpose2d(hidden, weight), pads, padding_mode)


# ----------------------------------------------------------------------------------------------------------
# 2. The scale s = 2/t.
# ----------------------------------------------------------------------------------------------------------
def sll_gram(weight: torch.Tensor) -> torch.Tensor:
    """W Wᵀ (hidden, hidden) of a linear weight, or ktk (hidden, hidden, 2kh − 1, 2kw − 1), the
    cross-correlations of a conv kernel with itself (the rows of A Aᵀ for a stride-1 conv)."""
    if weight.dim() == 2:
        return weight @ weight.T
    kh, kw = weight.shape[-2:]
    return F.conv2d(weight, weight, padding=(kh - 1, kw - 1))


def abs_gram_sums(weight: torch.Tensor) -> torch.Tensor:
    """Σ over the taps of |W Wᵀ| (hidden, hidden), differentiable: |W Wᵀ| of a linear weight, Σ_s |ktk_s| of a
    conv kernel. On the CPU the conv kernel's by two GEMMs: P[(a, i), (b, j)] = Σ_c W[i, c, a]·W[j, c, b], then
    each shift s = a − b summed by a 0/1 matrix (oneDNN's convolution of the kernel with itself, forward and
    backward, costs 1.2–1.5× that at 8–64 channels; benchmarks/NOTES.md); elsewhere, and under tracing
    (FakeTensorMode, make_fx, torch.compile: the graph keeps the convolution), :func:`sll_gram`'s."""
    if weight.dim() == 2:
        return (weight @ weight.T).abs()
    if not weight.is_cpu or tracing():
        return sll_gram(weight).abs().sum(dim=(2, 3))
    hidden, channels, kh, kw = weight.shape
    kk = kh * kw
    rows = weight.reshape(hidden, channels, kk).permute(2, 0, 1).reshape(kk * hidden, channels)
    pairs = (rows @ rows.T).view(kk, hidden, kk, hidden).permute(0, 2, 1, 3).reshape(kk * kk, hidden * hidden)
    shifts = _shift_sum(kh, kw, weight.dtype, weight.device, False).T  # (shifts, kk²): row s sums the pairs a − b = s
    return (shifts @ pairs).abs().sum(0).view(hidden, hidden)


def _check(name: str, weight: torch.Tensor, log_q: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4) or weight.numel() == 0:
        raise ValueError(f"{name}: weight must be a non-empty (hidden, features) or (hidden, channels, kh, kw) "
                         f"tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if not weight.is_floating_point():
        raise TypeError(f"{name}: weight must be floating point, got {weight.dtype}")
    if not isinstance(log_q, torch.Tensor) or log_q.shape != (weight.shape[0],):
        raise ValueError(f"{name}: log_q must have shape ({weight.shape[0]},) (one per hidden unit), got "
                         f"{getattr(log_q, 'shape', type(log_q).__name__)}")
    if log_q.dtype != weight.dtype or log_q.device != weight.device:
        raise ValueError(f"{name}: log_q is {log_q.dtype} on {log_q.device}, weight is {weight.dtype} on "
                         f"{weight.device}")


def _scale_and_mask(weight: torch.Tensor, log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2/t, t > 0), differentiable; q shifted by its largest log (t depends on ratios only: exp cannot
    overflow), t clamped away from 0 (a zero row is switched off by the mask with finite gradients)."""
    q = (log_q - log_q.max().detach()).exp()
    t = (abs_gram_sums(weight) @ q) / q  # t_i = Σ_j |G_ij| q_j / q_i
    return t.clamp_min(smallest_normal(t.dtype)).reciprocal() * 2.0, t > 0  # (2/t as Tensor.__rdiv__ computes it)


def sll_scale(weight: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """s (hidden,) = 2/t in the weight's dtype, differentiable in W and log_q (the training form: no rounding
    margin; 0 for a zero row of W)."""
    _check("sll_scale", weight, log_q)
    inverse, on = _scale_and_mask(weight, log_q)
    return inverse * on


def guaranteed_scale(gram: torch.Tensor, abs_gram: torch.Tensor, q: torch.Tensor, dot_terms: int) -> torch.Tensor:
    """A GUARANTEED lower bound of s_i = 2/t_i, t_i = Σ_j |G_ij| q_j / q_i, for the exact Gram G of the stored
    weight (0 where the unit is off): ``gram`` (hidden, hidden, ...taps) is G's float64 evaluation, each entry a
    dot product of ``dot_terms`` products, ``abs_gram`` that of |W|; every later sum and quotient is rounded in
    the safe direction."""
    hidden = gram.shape[0]
    per_row = gram.reshape(hidden, hidden, -1)
    # |G| ≤ |Ĝ| + γ·S + n·η and S ≤ (Ŝ + n·η)/(1 − γ) (Ŝ the computed Gram of |W|; η: an underflowing operation's
    # absolute error): 2γ·Ŝ + (2n + 4)·η covers both and the product's rounding
    bound = per_row.abs() + 2 * _gamma(dot_terms) * abs_gram.reshape(hidden, hidden, -1) + (2 * dot_terms + 4) * _TINY
    terms = per_row.shape[1] * per_row.shape[2]
    # two nested sums of non-negative terms, a product by q each, then this product: ≤ γ_{2·terms + 8} relative,
    # plus an absolute η per operation for products and sums that underflow (tiny q or tiny weights)
    r = (bound.sum(dim=2) * q[None, :]).sum(dim=1) * (1 + _gamma(2 * terms + 8)) + (4 * terms + 8) * _TINY
    t = r / q * (1 + 4 * _U)  # ≥ the exact weighted row sum
    s = torch.where(t > 0, 2.0 / t * (1 - 4 * _U), torch.zeros_like(t))
    zero_row = abs_gram.reshape(hidden, -1).sum(dim=1) == 0  # W_i = 0 exactly: the unit does nothing; s = 0
    # 2/t overflows for rows whose sums underflow (|W| ~ 1e-160 in float64): switched off too (s = 0 is safe)
    return torch.where(torch.isfinite(s) & ~zero_row, s, torch.zeros_like(s))


def sll_guaranteed_scale(weight: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """s (hidden,) in the weight's dtype with s_i ≤ 2/t_i for the exact t of the STORED weight and log_q
    (module docstring): the eval layers' scale. Not differentiable. A unit whose s is not a finite number (NaN /
    Inf weights or log_q, or 2/t beyond float64) gets s = 0, switched off, which is safe; the layers reject
    NaN / Inf parameters before calling. Classical float64 convolutions (cuDNN off: no TF32)."""
    _check("sll_guaranteed_scale", weight, log_q)
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=False):
        w = weight.detach().to(torch.float64)
        # any positive q: the theorem holds for these values; shifted so that the largest is 1 (t depends on
        # q_j/q_i only), far from overflow; the q that underflow switch their units off (t = inf, s = 0)
        log_q64 = log_q.detach().to(torch.float64)
        q = (log_q64 - log_q64.max()).exp()
        s = guaranteed_scale(sll_gram(w), sll_gram(w.abs()), q, weight[0].numel())
        return _round_down(s, weight.dtype)


# ----------------------------------------------------------------------------------------------------------
# 3. The residual through CPL's op.
# ----------------------------------------------------------------------------------------------------------
def _cpl_parts(weight, bias, log_q):
    """(W̃, b̃) = (diag(√s)·W, √s ⊙ b): the CPL op's weight and bias for h = 1."""
    inverse, on = _scale_and_mask(weight, log_q)
    root = inverse.sqrt() * on
    scaled = root.reshape(-1, *([1] * (weight.dim() - 1))) * weight
    return scaled, None if bias is None else root * bias


def _check_bias(name: str, weight, bias) -> None:
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)):
        raise ValueError(f"{name}: bias must have shape ({weight.shape[0]},), got "
                         f"{getattr(bias, 'shape', type(bias).__name__)}")


def sll_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, log_q: torch.Tensor) -> torch.Tensor:
    """The training-form SLL residual on x (..., features): W (hidden, features), b (hidden,), log_q (hidden,);
    differentiable in x, W, b and log_q (s = :func:`sll_scale`). Through CPL's op (module docstring)."""
    _check("sll_linear", weight, log_q)
    _check_bias("sll_linear", weight, bias)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"sll_linear: x (..., {weight.shape[-1] if weight.dim() == 2 else '?'}) and a 2-D weight "
                         f"expected, got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if _composite_pays(x.reshape(-1, x.shape[-1]), weight, None, None):  # where the op runs the formula anyway
        return sll_linear_ref(x, weight, bias, sll_scale(weight, log_q))
    return cpl_linear(x, *_cpl_parts(weight, bias, log_q), 1.0)


def sll_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, log_q: torch.Tensor,
               padding_mode: str = "zeros") -> torch.Tensor:
    """The training-form SLL residual on x (N, channels, H, W) for the stride-1 'same'-padded conv with kernel
    W (hidden, channels, kh, kw), zero or circular padding; differentiable in x, W, b and log_q. Through CPL's
    op (module docstring)."""
    _check("sll_conv2d", weight, log_q)
    _check_bias("sll_conv2d", weight, bias)
    if padding_mode not in ("zeros", "circular"):
        raise ValueError(f"sll_conv2d: padding_mode must be 'zeros' or 'circular', got {padding_mode!r}")
    if weight.dim() != 4 or x.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"sll_conv2d: x (N, C, H, W) and a (hidden, C, kh, kw) weight expected, got x "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)}")
    if _composite_pays(x, weight, None, None):
        return sll_conv2d_ref(x, weight, bias, sll_scale(weight, log_q), padding_mode=padding_mode)
    return cpl_conv2d(x, *_cpl_parts(weight, bias, log_q), 1.0, padding="same", padding_mode=padding_mode)
