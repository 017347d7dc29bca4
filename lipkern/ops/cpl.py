"""Convex potential layer (Meunier et al. 2022): z = x − h·Aᵀσ(A x + b), σ = ReLU.

A is a linear map (x Wᵀ for ``cpl_linear``; a conv with its padding, stride, dilation and groups for
``cpl_conv2d``) and Aᵀ its exact adjoint. The map is 1-Lipschitz when 0 ≤ h ≤ 2/‖A‖₂²: its Jacobian
I − h·AᵀDA (D = diag(σ′) ∈ [0, 1]) has eigenvalues in [1 − h‖A‖², 1] ⊂ [−1, 1].

Memory: eager autograd keeps x, the pre-activation (or its mask), σ(Ax + b) and Aᵀσ(·) for the backward.
This op saves only x (plus the parameters) and recomputes p = Ax + b in the backward:
    t = A g,  m = (p > 0),  g_p = −h·(t ⊙ m)
    ∂x = g + Aᵀ g_p,  ∂W = ∂⟨g_p, A_W x⟩/∂W + ∂⟨A_W(−h g), σ(p)⟩/∂W,  ∂b = Σ g_p,  ∂h = −⟨t, σ(p)⟩
(the last one by adjointness: ⟨g, Aᵀσ(p)⟩ = ⟨A g, σ(p)⟩, so Aᵀσ(p) is never recomputed). Cost: one extra
application of A against eager autograd.
The elementwise steps are Triton kernels on the GPU and under the interpreter (forward: bias + ReLU in place,
then x − h·r; backward: one pass for bias, mask, −h·t, −h·σ(p) and the partial sums of −⟨t, σ(p)⟩); the
matrix products and convolutions are cuBLAS/cuDNN, with symmetric zero padding passed to the convolution.
No value is read on the host: a NaN/Inf weight, input or h gives a non-finite output (the ReLU propagates
NaN as torch.relu does); the layers check the weight where they cache their eval-mode step size.

Layout: reference, Triton kernels, operators, forward/backward, custom ops, public functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lipkern._dispatch import device_context, select_backend, triton_importable
from lipkern.ops.conv_power_iteration import ConvGeometry, conv_adjoint, conv_operator, conv_padding

__all__ = ["cpl_conv2d", "cpl_conv2d_ref", "cpl_linear", "cpl_linear_ref"]


# ----------------------------------------------------------------------------------------------------------
# 1. Reference: the specification and test oracle (plain autograd).
# ----------------------------------------------------------------------------------------------------------
def cpl_linear_ref(x, weight, bias, h):
    return x - h * (F.relu(F.linear(x, weight, bias)) @ weight)


def cpl_conv2d_ref(x, weight, bias, h, geometry: ConvGeometry):
    pre = conv_operator(x, weight, geometry)
    if bias is not None:
        pre = pre + bias[:, None, None]
    return x - h * conv_adjoint(F.relu(pre), weight, geometry)


# ----------------------------------------------------------------------------------------------------------
# 2. Triton kernels: the elementwise steps of the forward.
# ----------------------------------------------------------------------------------------------------------
_BLOCK = 1024

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _bias_relu_kernel(pre_ptr, bias_ptr, N, CHANNELS, INNER, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """In place: pre = max(pre + bias[channel], 0), channel = (i // INNER) % CHANNELS."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        p = tl.load(pre_ptr + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            p += tl.load(bias_ptr + (offs // INNER) % CHANNELS, mask=mask, other=0.0)
        tl.store(pre_ptr + offs, tl.maximum(p, 0.0, propagate_nan=tl.PropagateNan.ALL), mask=mask)

    @triton.jit
    def _residual_kernel(x_ptr, r_ptr, h_ptr, out_ptr, N, BLOCK: tl.constexpr):
        """out = x − h·r, h a one-element tensor."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        h = tl.load(h_ptr)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, x - h * r, mask=mask)


    @triton.jit
    def _backward_elementwise_kernel(pre_ptr, t_ptr, bias_ptr, h_ptr, g_pre_ptr, partial_ptr, N, CHANNELS, INNER,
                                     HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """p = pre + bias; g_pre = −h·t where p > 0 else 0; pre ← −h·σ(p) in place; partial = −Σ t·σ(p)."""
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        p = tl.load(pre_ptr + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            p += tl.load(bias_ptr + (offs // INNER) % CHANNELS, mask=mask, other=0.0)
        t = tl.load(t_ptr + offs, mask=mask, other=0.0)
        h = tl.load(h_ptr)
        act = tl.maximum(p, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(g_pre_ptr + offs, tl.where(p > 0.0, -h * t, 0.0), mask=mask)
        tl.store(pre_ptr + offs, -h * act, mask=mask)
        tl.store(partial_ptr + pid, -tl.sum(t * act, axis=0))


def _use_triton(t: torch.Tensor) -> bool:
    return select_backend(t, has_cuda_kernel=False) == "triton"


def _bias_relu_(pre: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """σ(pre + b) in place; pre is (N, C) or (N, C, H, W), contiguous."""
    if not _use_triton(pre):
        if bias is not None:
            pre.add_(bias.reshape(-1, *([1] * (pre.dim() - 2))))
        return pre.relu_()
    inner = pre[0, 0].numel()
    grid = (triton.cdiv(pre.numel(), _BLOCK),)
    with device_context(pre):
        _bias_relu_kernel[grid](pre, bias if bias is not None else pre, pre.numel(), pre.shape[1], inner,
                                HAS_BIAS=bias is not None, BLOCK=_BLOCK)
    return pre


def _residual(x: torch.Tensor, r: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if not _use_triton(x):
        return x - h * r
    out = torch.empty_like(x)
    with device_context(x):
        _residual_kernel[(triton.cdiv(x.numel(), _BLOCK),)](x, r, h.to(x.dtype).reshape(1), out, x.numel(),
                                                              BLOCK=_BLOCK)
    return out


# ----------------------------------------------------------------------------------------------------------
# 3. The operator A, its adjoint and its weight gradient, for both layer kinds.
# ----------------------------------------------------------------------------------------------------------
class _Linear:
    def __init__(self, weight):
        self.weight = weight

    def apply(self, x):
        return x @ self.weight.T

    def adjoint(self, y):
        return y @ self.weight

    def weight_grad(self, x, grad_out):
        """∂⟨grad_out, A_W x⟩/∂W."""
        return grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])


class _Conv:
    def __init__(self, weight, geometry: ConvGeometry):
        self.weight, self.geometry = weight, geometry

    def apply(self, x):
        return conv_operator(x, self.weight, self.geometry)

    def adjoint(self, y):
        return conv_adjoint(y, self.weight, self.geometry)

    def weight_grad(self, x, grad_out):
        g = self.geometry
        padding = conv_padding(g)
        if padding is None:
            t, b, le, r = g.padding
            x = F.pad(x, (le, r, t, b), mode="constant" if g.padding_mode == "zeros" else "circular")
            padding = (0, 0)
        return torch.nn.grad.conv2d_weight(x, self.weight.shape, grad_out, g.stride, padding, g.dilation,
                                           g.groups)


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(0) if t.dim() == 2 else t.sum((0, 2, 3))


def _forward(op, x, bias, h):
    a = _bias_relu_(op.apply(x).contiguous(), bias)
    return _residual(x.contiguous(), op.adjoint(a).contiguous(), h)


def _backward_elementwise(pre, t, bias, h):
    """(g_pre, −h·σ(pre + b), −Σ t·σ(pre + b)); the Triton path overwrites ``pre`` with −h·σ(pre + b)."""
    if not _use_triton(pre):
        if bias is not None:
            pre = pre + bias.reshape(-1, *([1] * (pre.dim() - 2)))
        act = pre.clamp_min(0)
        return (-h) * torch.where(pre > 0, t, torch.zeros_like(t)), (-h) * act, -(t * act).sum()
    n_blocks = triton.cdiv(pre.numel(), _BLOCK)
    g_pre = torch.empty_like(t)
    acc = torch.float64 if pre.dtype == torch.float64 else torch.float32
    partial = torch.empty(n_blocks, dtype=acc, device=pre.device)
    with device_context(pre):
        _backward_elementwise_kernel[(n_blocks,)](pre, t, bias if bias is not None else pre,
                                                  h.to(pre.dtype).reshape(1), g_pre, partial, pre.numel(),
                                                  pre.shape[1], pre[0, 0].numel(), HAS_BIAS=bias is not None,
                                                  BLOCK=_BLOCK)
    return g_pre, pre, partial.sum().to(pre.dtype)


def _backward(op, grad, x, bias, h):
    grad = grad.contiguous()
    t = op.apply(grad).contiguous()
    g_pre, act_scaled, grad_h = _backward_elementwise(op.apply(x).contiguous(), t, bias, h)
    grad_x = grad + op.adjoint(g_pre)
    grad_w = op.weight_grad(x, g_pre) + op.weight_grad(grad, act_scaled)  # ⟨A_W(−h g), σ⟩ = ⟨A_W g, −h σ⟩
    grad_b = _channel_sum(g_pre) if bias is not None else None
    return grad_x, grad_w, grad_b, grad_h.reshape(h.shape)


# ----------------------------------------------------------------------------------------------------------
# 4. Custom ops: forward and backward, the autograd formula saves x and the parameters only.
# ----------------------------------------------------------------------------------------------------------
def _geometry(x, weight, stride, padding, dilation, groups, padding_mode) -> ConvGeometry:
    return ConvGeometry(tuple(x.shape[-2:]), tuple(weight.shape[-2:]), tuple(stride), tuple(padding),
                        tuple(dilation), groups, padding_mode)


@torch.library.custom_op("lipkern::cpl_linear", mutates_args=())
def _cpl_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   h: torch.Tensor) -> torch.Tensor:
    return _forward(_Linear(weight), x, bias, h)


@_cpl_linear_op.register_fake
def _(x, weight, bias, h):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("lipkern::cpl_linear_backward", mutates_args=())
def _cpl_linear_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gx, gw, gb, gh = _backward(_Linear(weight), grad, x, bias, h)
    return gx, gw, gb if gb is not None else weight.new_zeros(0), gh


@_cpl_linear_backward_op.register_fake
def _(grad, x, weight, bias, h):
    gb = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weight), gb, torch.empty_like(h)


@torch.library.custom_op("lipkern::cpl_conv2d", mutates_args=())
def _cpl_conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor,
                   stride: list[int], padding: list[int], dilation: list[int], groups: int,
                   padding_mode: str) -> torch.Tensor:
    g = _geometry(x, weight, stride, padding, dilation, groups, padding_mode)
    return _forward(_Conv(weight, g), x, bias, h)


@_cpl_conv2d_op.register_fake
def _(x, weight, bias, h, stride, padding, dilation, groups, padding_mode):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("lipkern::cpl_conv2d_backward", mutates_args=())
def _cpl_conv2d_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            h: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int],
                            groups: int, padding_mode: str
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _geometry(x, weight, stride, padding, dilation, groups, padding_mode)
    gx, gw, gb, gh = _backward(_Conv(weight, g), grad, x, bias, h)
    return gx, gw, gb if gb is not None else weight.new_zeros(0), gh


@_cpl_conv2d_backward_op.register_fake
def _(grad, x, weight, bias, h, stride, padding, dilation, groups, padding_mode):
    gb = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weight), gb, torch.empty_like(h)


def _setup_linear(ctx, inputs, output):
    x, weight, bias, h = inputs
    ctx.save_for_backward(x, weight, bias, h)


def _backward_linear(ctx, grad):
    x, weight, bias, h = ctx.saved_tensors
    gx, gw, gb, gh = _cpl_linear_backward_op(grad, x, weight, bias, h)
    return gx, gw, (gb if bias is not None else None), gh


def _setup_conv(ctx, inputs, output):
    x, weight, bias, h, *geometry = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(x, weight, bias, h)


def _backward_conv(ctx, grad):
    x, weight, bias, h = ctx.saved_tensors
    gx, gw, gb, gh = _cpl_conv2d_backward_op(grad, x, weight, bias, h, *ctx.geometry)
    return gx, gw, (gb if bias is not None else None), gh, None, None, None, None, None


_cpl_linear_op.register_autograd(_backward_linear, setup_context=_setup_linear)
_cpl_conv2d_op.register_autograd(_backward_conv, setup_context=_setup_conv)


# ----------------------------------------------------------------------------------------------------------
# 5. Public functions.
# ----------------------------------------------------------------------------------------------------------
def _as_h(h, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(h, torch.Tensor):  # a Python number: filled on the device (no host-to-device copy)
        h = torch.full((), float(h), dtype=x.dtype, device=x.device)
    if h.numel() != 1:
        raise ValueError(f"cpl: h must be a scalar, got shape {tuple(h.shape)}")
    return h.reshape(())


def _validate(name: str, x, weight, bias, h, x_dims: tuple[int, ...], w_dims: int) -> None:
    for label, t in (("x", x), ("weight", weight), ("bias", bias), ("h", h)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"{name}: {label} must be floating point, got {t.dtype}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name}: {label} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")
    if x.dim() not in x_dims or weight.dim() != w_dims:
        raise ValueError(f"{name}: expected x with {x_dims} dims and a {w_dims}-D weight, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def cpl_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h) -> torch.Tensor:
    """z = x − h·σ(x Wᵀ + b) W for x (..., features), W (hidden, features), b (hidden,), h a scalar (tensor
    or float; differentiable). 1-Lipschitz when 0 ≤ h ≤ 2/‖W‖₂². The backward saves only x."""
    h = _as_h(h, x)
    _validate("cpl_linear", x, weight, bias, h, (1, 2, 3, 4, 5), 2)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"cpl_linear: x has {x.shape[-1]} features, weight expects {weight.shape[1]}")
    flat = x.reshape(-1, x.shape[-1])
    return _cpl_linear_op(flat, weight, bias, h).reshape(x.shape)


def cpl_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h, stride=1, padding=0,
               dilation=1, groups: int = 1, padding_mode: str = "zeros") -> torch.Tensor:
    """z = x − h·Aᵀσ(A x + b) for the conv A with these nn.Conv2d arguments (W (hidden, channels/groups, kh, kw),
    its exact adjoint Aᵀ, so z has x's shape) and x (N, channels, H, W). 1-Lipschitz when 0 ≤ h ≤ 2/‖A‖₂²
    (‖A‖ at x's size: see lipkern.bounds.conv2d_spectral_norm). The backward saves only x."""
    h = _as_h(h, x)
    _validate("cpl_conv2d", x, weight, bias, h, (4,), 4)
    g = ConvGeometry.create(tuple(x.shape[-2:]), tuple(weight.shape[-2:]), stride, padding, dilation, groups,
                            padding_mode)
    g.check_weight(weight, stacked=False)
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"cpl_conv2d: x has {x.shape[1]} channels, weight expects {weight.shape[1] * groups}")
    return _cpl_conv2d_op(x, weight, bias, h, list(g.stride), list(g.padding), list(g.dilation), g.groups,
                          g.padding_mode)
