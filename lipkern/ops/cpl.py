"""Convex potential layer (Meunier et al. 2022): z = x − h·Aᵀσ(A x + b), σ = ReLU.

A is a linear map (x Wᵀ for ``cpl_linear``; a conv with its padding, stride, dilation and groups for
``cpl_conv2d``) and Aᵀ its exact adjoint. The map is 1-Lipschitz when 0 ≤ h ≤ 2/‖A‖₂²: its Jacobian
I − h·AᵀDA (D = diag(σ′) ∈ [0, 1]) has eigenvalues in [1 − h‖A‖², 1] ⊂ [−1, 1].

Memory: eager autograd keeps x, σ(A x + b) and Aᵀσ(·) (the last for ∂h) for the backward. This op keeps x and
σ(A x + b) (the hidden activation: the buffer the forward wrote anyway), never Aᵀσ:
    t = A g,  m = (σ(p) > 0),  s = t ⊙ m
    ∂x = g − h·Aᵀ s,  ∂W = −h·(∂⟨s, A_W x⟩/∂W + ∂⟨A_W g, σ(p)⟩/∂W),  ∂b = −h·Σ s,  ∂h = −⟨t, σ(p)⟩
(the last one by adjointness: ⟨g, Aᵀσ(p)⟩ = ⟨A g, σ(p)⟩; −h scales the small results, never an activation).
Keeping σ(p) instead of recomputing A x costs hidden/channels of an activation (1/9 in CPL-S's convs) and saves a
convolution per step: the op runs as many convolutions as eager autograd. Work per call, A applications counted
as convolutions (GEMMs for the linear):
  forward   A x (bias + ReLU in place: one pass), Aᵀσ (x − h·r written in place over r: one pass);
  backward  A g, one pass (s = t ⊙ m in place, per-channel Σ s and the partials of ⟨t, σ(p)⟩), the two
            weight-gradient terms (only when W needs a gradient; the linear's accumulated in one buffer by addmm),
            Aᵀ s (only when x needs a gradient), g − h·Aᵀs written in place (one pass). For the conv, A g and
            the second weight term come from one transposed-conv backward, Aᵀ s and the first from one conv
            backward: the convolution calls of eager autograd (2 forward, 2 backward).
Backward temporaries: t (hidden-sized), then Aᵀs (input-sized). Circular padding pads x once in the forward and
x and g once each in the backward; symmetric zero padding is passed to the convolution (no copy).
The elementwise steps are Triton kernels on the GPU and under the interpreter, in-place PyTorch ops on the CPU;
the matrix products and convolutions are cuBLAS/cuDNN (the linear's bias + ReLU is cuBLASLt's epilogue).

Paths (built by ``lipkern/ops/_registration.py``): eager calls run one ``autograd.Function`` (lowest overhead);
``torch.func`` transforms a functional PyTorch formulation of the same forward and backward; ``torch.compile``,
``export`` and Python dispatch modes (FakeTensorMode, make_fx) see the custom ops ``lipkern::cpl_linear`` /
``lipkern::cpl_conv2d``. Double backward (``create_graph=True``, gradient
penalties): the backward then runs the same formulas as differentiable PyTorch ops, so second derivatives are
exact (ReLU's second derivative is 0, as in autograd).

Precision: the op computes in x's dtype (float64, float32, bfloat16, float16; weight, bias and h must have it
too). Under ``torch.autocast`` the op runs in the dtype of x with autocast disabled inside: weight, bias and h
are cast to x's dtype (a float32 residual stream stays float32; a bf16 stream runs the convs in bf16). In
float32 the GEMMs and convolutions follow PyTorch's TF32 settings (``torch.backends.cuda.matmul.allow_tf32``,
``torch.backends.cudnn.allow_tf32``; cuDNN convs use TF32 by default) like the eager layer: training only.
Certification never rests on these products: it uses the eval-mode step size, a float64 guaranteed bound.
No value is read on the host: a NaN/Inf weight, input or h gives a non-finite output (the ReLU propagates
NaN as torch.relu does); the layers check the weight where they cache their eval-mode step size.

Layout: reference, Triton kernels, operators, forward/backward, custom ops and autograd, public functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lipkern._checks import as_positive_float
from lipkern._rounding import cast_down
from lipkern._dispatch import config, device_context, record_implementation, select_backend, triton_importable
from lipkern.ops._registration import _autocast_device, define_op
from lipkern.ops.conv_power_iteration import ConvGeometry, _unpad_adjoint, conv_adjoint, conv_operator, conv_padding

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
# 2. Triton kernels: the elementwise passes.
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
    def _residual_kernel(x_ptr, r_ptr, h_ptr, N, BLOCK: tl.constexpr):
        """In place: r = x − h·r, h a one-element tensor."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        h = tl.load(h_ptr)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0)
        tl.store(r_ptr + offs, x - h * r, mask=mask)

    @triton.jit
    def _backward_elementwise_kernel(act_ptr, t_ptr, bsum_ptr, dot_ptr, ROWS, COLS, CHANNELS,
                                     CHANNEL_IN_ROWS: tl.constexpr, IS_F64: tl.constexpr, BR: tl.constexpr,
                                     BC: tl.constexpr):
        """On a (ROWS, COLS) view: t ← t where act > 0 else 0 (in place; act = σ(p) is read only); per-channel
        partial sums of the new t into bsum and the float64 partial of ⟨t, act⟩ into dot[program].
        The channel of an element is row % CHANNELS (conv: rows are (n, c), columns pixels) or its column
        (linear: rows are samples)."""
        pid_r, pid_c = tl.program_id(0), tl.program_id(1)
        rows = pid_r * BR + tl.arange(0, BR)
        cols = pid_c * BC + tl.arange(0, BC)
        mask = (rows < ROWS)[:, None] & (cols < COLS)[None, :]
        offs = rows.to(tl.int64)[:, None] * COLS + cols[None, :]
        act = tl.load(act_ptr + offs, mask=mask, other=0.0)
        t = tl.load(t_ptr + offs, mask=mask, other=0.0)
        s = tl.where(act > 0.0, t, 0.0)
        tl.store(t_ptr + offs, s, mask=mask)
        # ⟨t, act⟩ in float64 (h's gradient: one scalar summed over the whole batch; exact products, float64
        # sums, then one rounding: within an ulp of the dtype, whatever order the blocks sum in)
        prod = t.to(tl.float64) * act.to(tl.float64)
        s_acc = s if IS_F64 else s.to(tl.float32)
        tl.store(dot_ptr + pid_r * tl.num_programs(1) + pid_c, tl.sum(tl.sum(prod, axis=1), axis=0))
        if CHANNEL_IN_ROWS:  # bsum (column blocks, ROWS)
            tl.store(bsum_ptr + pid_c * ROWS + rows, tl.sum(s_acc, axis=1), mask=rows < ROWS)
        else:  # bsum (row blocks, COLS)
            tl.store(bsum_ptr + pid_r * COLS + cols, tl.sum(s_acc, axis=0), mask=cols < COLS)


def _use_triton(t: torch.Tensor) -> bool:
    if t.numel() == 0:  # an empty batch: nothing to launch (the torch path's in-place ops take it)
        return False
    no_bf16 = t.dtype == torch.bfloat16 and t.device.type != "cuda"
    return select_backend(t, triton_reason="the Triton interpreter has no bfloat16 arithmetic" if no_bf16 else None
                          ) == "triton"


def _h_for(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return h.to(like.dtype).reshape(1)


def _bias_relu_(pre: torch.Tensor, bias: torch.Tensor | None, triton_path: bool) -> torch.Tensor:
    """σ(pre + b) in place; pre is (N, C) or (N, C, H, W), contiguous."""
    if not triton_path:
        if bias is not None:
            pre.add_(bias.reshape(-1, *([1] * (pre.dim() - 2))))
        return pre.relu_()
    inner = pre[0, 0].numel()
    grid = (triton.cdiv(pre.numel(), _BLOCK),)
    with device_context(pre):
        _bias_relu_kernel[grid](pre, bias if bias is not None else pre, pre.numel(), pre.shape[1], inner,
                                HAS_BIAS=bias is not None, BLOCK=_BLOCK)
    return pre


def _residual_(x: torch.Tensor, r: torch.Tensor, h: torch.Tensor, triton_path: bool) -> torch.Tensor:
    """x − h·r written over r (both contiguous, same shape)."""
    if not triton_path:
        return torch.sub(x, r.mul_(h), out=r)
    with device_context(x):
        _residual_kernel[(triton.cdiv(x.numel(), _BLOCK),)](x, r, _h_for(h, x), x.numel(), BLOCK=_BLOCK)
    return r


def _backward_elementwise_(act: torch.Tensor, t: torch.Tensor, triton_path: bool):
    """In place: t ← t ⊙ (act > 0); act = σ(p) is only read. Returns (Σ of the new t per channel, ⟨t, act⟩)."""
    conv = act.dim() == 4
    if not triton_path:
        torch.ops.aten.threshold_backward.grad_input(t, act, 0, grad_input=t)  # ReLU's backward, in place
        dot = torch.dot(t.view(-1), act.view(-1))  # ⟨t ⊙ m, σ(p)⟩ = ⟨t, σ(p)⟩
        return (t.sum((0, 2, 3)) if conv else t.sum(0)), dot
    channels = act.shape[1]
    rows, cols = (act.shape[0] * channels, act[0, 0].numel()) if conv else (act.shape[0], channels)
    bc = min(triton.next_power_of_2(cols), 1024 if conv else 128)
    br = max(1, min(triton.next_power_of_2(rows), 2048 // bc))
    grid = (triton.cdiv(rows, br), triton.cdiv(cols, bc))
    acc = torch.float64 if act.dtype == torch.float64 else torch.float32
    bsum = torch.empty((grid[1], rows) if conv else (grid[0], cols), dtype=acc, device=act.device)
    dot = torch.empty(grid[0] * grid[1], dtype=torch.float64, device=act.device)
    with device_context(act):
        _backward_elementwise_kernel[grid](act, t, bsum, dot, rows, cols, channels, CHANNEL_IN_ROWS=conv,
                                           IS_F64=act.dtype == torch.float64, BR=br, BC=bc)
    channel_sum = bsum.view(-1, channels).sum(0) if conv else bsum.sum(0)
    return channel_sum.to(act.dtype), dot.sum().to(act.dtype)


# ----------------------------------------------------------------------------------------------------------
# 3. The operator A, its adjoint and its weight gradient, for both layer kinds.
# ----------------------------------------------------------------------------------------------------------
class _Linear:
    def __init__(self, weight):
        self.weight = weight

    def prepare(self, x):
        """What ``apply`` and ``weight_grad`` take (the conv pads here; the linear needs nothing)."""
        return x

    def apply(self, x, bias=None):
        return F.linear(x, self.weight, bias)

    def apply_relu(self, x, bias):
        """σ(x Wᵀ + b) with bias and ReLU in the GEMM's epilogue (cuBLASLt on CUDA)."""
        return torch._addmm_activation(bias, x, self.weight.T) if bias is not None else (x @ self.weight.T).relu_()

    def adjoint(self, y):
        return y @ self.weight

    def adjoint_of(self, y, xp):
        return y @ self.weight

    def apply_and_weight_grad(self, g, act, need_w):
        """(A g, None): the linear accumulates both weight terms in ``adjoint_and_weight_grads``."""
        return F.linear(g, self.weight), None

    def adjoint_and_weight_grads(self, s, xp, g, act, partial, need_x, need_w):
        """(Aᵀs, ∂⟨s, A_W x⟩/∂W + ∂⟨act, A_W g⟩/∂W): the two weight terms accumulated in one buffer."""
        return (s @ self.weight if need_x else None), (torch.mm(s.T, xp).addmm_(act.T, g) if need_w else None)

    def weight_grads(self, x, s, g, act):
        """∂⟨s, A_W x⟩/∂W + ∂⟨act, A_W g⟩/∂W, accumulated in one buffer."""
        return torch.addmm(s.T @ x, act.T, g) if torch.is_grad_enabled() else torch.mm(s.T, x).addmm_(act.T, g)


class _Conv:
    def __init__(self, weight, geometry: ConvGeometry):
        self.weight, self.geometry = weight, geometry
        self.padding = conv_padding(geometry)

    def prepare(self, x):
        if self.padding is not None:  # symmetric zero padding: the convolution pads
            return x
        t, b, le, r = self.geometry.padding
        return F.pad(x, (le, r, t, b), mode="constant" if self.geometry.padding_mode == "zeros" else "circular")

    def _conv_padding(self):
        return self.padding if self.padding is not None else (0, 0)

    def apply(self, xp, bias=None):
        g = self.geometry
        return F.conv2d(xp, self.weight, bias, g.stride, self._conv_padding(), g.dilation, g.groups)

    def adjoint(self, y):
        return conv_adjoint(y, self.weight, self.geometry)

    def _conv_backward(self, grad_out, xp, need_input, need_weight):
        """cuDNN/oneDNN's convolution backward: (Aᵀ grad_out on the padded domain, ∂⟨grad_out, A_W xp⟩/∂W)."""
        g = self.geometry
        return torch.ops.aten.convolution_backward(grad_out, xp, self.weight, None, list(g.stride),
                                                  list(self._conv_padding()), list(g.dilation), False, [0, 0],
                                                  g.groups, [need_input, need_weight, False])[:2]

    def _output_padding(self, xp) -> list[int]:
        """The output_padding under which the transposed convolution returns xp's (padded) spatial size."""
        g, pad = self.geometry, self._conv_padding()
        out = g.output_size
        return [size - ((o - 1) * s - 2 * p + d * (k - 1) + 1) for size, o, s, p, d, k in
                zip(xp.shape[-2:], out, g.stride, pad, g.dilation, g.kernel_size)]

    def _unpad(self, y):
        return y if self.padding is not None else _unpad_adjoint(y, self.geometry).contiguous()

    def _weight_grad(self, xp, grad_out):
        return self._conv_backward(grad_out, xp, False, True)[1]

    def adjoint_of(self, y, xp):
        """Aᵀ y: one transposed convolution to xp's (padded) size, then the padding's adjoint."""
        g = self.geometry
        return self._unpad(F.conv_transpose2d(y, self.weight, None, g.stride, self._conv_padding(),
                                              self._output_padding(xp), g.groups, g.dilation))

    def apply_and_weight_grad(self, gp, act, need_w):
        """(A g, ∂⟨act, A_W g⟩/∂W or None) from ONE call: the backward of the transposed convolution
        y ↦ Aᵀy at act (its data gradient is A g, its weight gradient ∂⟨A_W g, act⟩/∂W), as eager autograd
        computes the backward of conv_transpose2d."""
        g = self.geometry
        t, w_act = torch.ops.aten.convolution_backward(
            gp, act, self.weight, None, list(g.stride), list(self._conv_padding()), list(g.dilation), True,
            self._output_padding(gp), g.groups, [True, need_w, False])[:2]
        return t, w_act

    def adjoint_and_weight_grads(self, s, xp, gp, act, partial, need_x, need_w):
        """(Aᵀs, ∂⟨s, A_W x⟩/∂W + partial): Aᵀs and the first weight term from one convolution backward
        (as eager autograd computes them); ``partial`` = ∂⟨act, A_W g⟩/∂W from ``apply_and_weight_grad``."""
        gi, gw = self._conv_backward(s, xp, need_x, need_w)
        if need_w:
            gw = gw.add_(partial)
        return (self._unpad(gi) if need_x else None), gw

    def weight_grads(self, xp, s, gp, act):
        """∂⟨s, A_W x⟩/∂W + ∂⟨act, A_W g⟩/∂W: two weight-gradient convolutions, their small results summed."""
        first, second = self._weight_grad(xp, s), self._weight_grad(gp, act)
        return first + second if torch.is_grad_enabled() else first.add_(second)


def _make_op(kind: str, weight, geometry):
    return _Linear(weight) if kind == "linear" else _Conv(weight, geometry)


# ----------------------------------------------------------------------------------------------------------
# 4. Forward and backward: the fast path (in place, Triton) and the functional one (torch.func, create_graph).
# ----------------------------------------------------------------------------------------------------------
def _forward(op, x, bias, h, triton_path: bool):
    """(z, σ(A x + b)): the activation is kept for the backward."""
    x = x.contiguous()
    xp = op.prepare(x)
    if isinstance(op, _Linear):
        act = op.apply_relu(x, bias)
    else:
        act = _bias_relu_(op.apply(xp).contiguous(), bias, triton_path)
    r = op.adjoint_of(act, xp).contiguous()
    return _residual_(x, r, h, triton_path), act


def _backward(op, grad, x, act, h, needs, triton_path: bool):
    """(∂x, ∂W, ∂b, ∂h), None where ``needs`` is False; act = σ(A x + b) from the forward (read only)."""
    need_x, need_w, need_b, need_h = needs
    grad = grad.contiguous()
    gp = op.prepare(grad)
    t, partial = op.apply_and_weight_grad(gp, act, need_w)
    t = t.contiguous()
    bias_sum, dot = _backward_elementwise_(act, t, triton_path)  # t ← s = t ⊙ m
    neg_h = -h
    gx = gw = None
    if need_x or need_w:
        r, gw = op.adjoint_and_weight_grads(t, op.prepare(x.contiguous()), gp, act, partial, need_x, need_w)
        del t, gp
        if need_w:
            gw.mul_(neg_h)
        if need_x:
            gx = _residual_(grad, r.contiguous(), h, triton_path)  # g − h·Aᵀs, over Aᵀs
    gb = bias_sum.mul_(neg_h) if need_b else None
    gh = dot.neg_().reshape(h.shape) if need_h else None
    return gx, gw, gb, gh


def _forward_functional(op, x, bias, h):
    return x - h * op.adjoint(F.relu(op.apply(op.prepare(x), bias)))


def _backward_functional(op, grad, x, bias, h, needs):
    """The same formulas as ``_backward`` in differentiable, out-of-place PyTorch ops (no Triton)."""
    gp, xp = op.prepare(grad), op.prepare(x)
    t, p = op.apply(gp), op.apply(xp, bias)
    act = F.relu(p)
    s = torch.where(p > 0, t, torch.zeros_like(t))
    need_x, need_w, need_b, need_h = needs
    gx = grad - h * op.adjoint(s) if need_x else None
    gw = -h * op.weight_grads(xp, s, gp, act) if need_w else None
    gb = -h * (s.sum((0, 2, 3)) if s.dim() == 4 else s.sum(0)) if need_b and bias is not None else None
    gh = -(t * act).sum().reshape(h.shape) if need_h else None
    return gx, gw, gb, gh


def _op_forward(kind):
    name = f"cpl_{'linear' if kind == 'linear' else 'conv2d'}"

    def forward(x, weight, bias, h, geometry=None, *, save: bool):
        triton_path = _use_triton(x)
        record_implementation(name, "triton" if triton_path else "torch")
        return _forward(_make_op(kind, weight, geometry), x, bias, h, triton_path)
    return forward


# Below this many multiply-adds in A x, a CPU train step runs the functional form under PyTorch's autograd: its
# C++ backward beats this op's Python one there (b32, 64 features: 228 against 419 µs fwd+bwd; b8, 16 ch, 8²:
# 0.98 against 1.26 ms); above it they tie until the op's fewer passes win (b64, 64 ch, 32²: 348 against 383 ms,
# and the op keeps less memory). benchmarks/NOTES.md, "CPU paths".
_COMPOSITE_MAX_MACS = 1 << 24


def _composite_pays(x, weight, bias, h, geometry=None) -> bool:
    """Auto mode on the CPU's PyTorch path (a forced backend or Triton's kernels run the op itself) at small
    sizes."""
    if not x.is_cpu:
        return False
    settings = config()
    if settings.backend is not None or (settings.triton_interpret and _use_triton(x)):
        return False
    return x.numel() // max(1, x.shape[1]) * weight.numel() <= _COMPOSITE_MAX_MACS


def _op_backward(kind):
    def backward(grads, inputs, saved, needs):
        x, weight, bias, h, *geometry = inputs
        op = _make_op(kind, weight, geometry[0] if geometry else None)
        return _backward(op, grads[0], x, saved[0], h, needs, _use_triton(x))
    return backward


def _op_functional(kind):
    def functional(x, weight, bias, h, geometry=None):
        return _forward_functional(_make_op(kind, weight, geometry), x, bias, h)
    return functional


def _op_functional_backward(kind):
    def functional_backward(grads, inputs, saved, needs):
        x, weight, bias, h, *geometry = inputs
        return _backward_functional(_make_op(kind, weight, geometry[0] if geometry else None), grads[0], x, bias,
                                    h, needs)
    return functional_backward


# ----------------------------------------------------------------------------------------------------------
# 5. Registration (lipkern/ops/_registration.py): the custom ops lipkern::cpl_linear / lipkern::cpl_conv2d
#    (+ backward ops) for torch.compile / export, the eager autograd path, the torch.func and double-backward
#    fallbacks. Outputs: z (differentiable) and σ(A x + b), kept for the backward (with x and the parameters).
# ----------------------------------------------------------------------------------------------------------
def _geometry(x, weight, stride, padding, dilation, groups, padding_mode) -> ConvGeometry:
    return ConvGeometry(tuple(x.shape[-2:]), tuple(weight.shape[-2:]), tuple(stride), tuple(padding),
                        tuple(dilation), groups, padding_mode)


def _fake_linear(x, weight, bias, h):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[0], weight.shape[0])


def _fake_conv(x, weight, bias, h, stride, padding, dilation, groups, padding_mode):
    g = _geometry(x, weight, stride, padding, dilation, groups, padding_mode)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[0], weight.shape[0], *g.output_size))


def _conv_op_args(x, weight, bias, h, g: ConvGeometry):
    return x, weight, bias, h, list(g.stride), list(g.padding), list(g.dilation), g.groups, g.padding_mode


def _conv_call_args(x, weight, bias, h, *geometry):
    return x, weight, bias, h, _geometry(x, weight, *geometry)


def _define(kind: str, schema: str, fake, **conversions):
    return define_op(f"cpl_{kind if kind == 'linear' else 'conv2d'}", schema, _op_forward(kind), fake,
                     backward=_op_backward(kind), functional=_op_functional(kind),
                     functional_backward=_op_functional_backward(kind), composite_when=_composite_pays,
                     **conversions)


_CPL_LINEAR = _define("linear", "(Tensor x, Tensor weight, Tensor? bias, Tensor h) -> (Tensor, Tensor)",
                      _fake_linear)
_CPL_CONV2D = _define("conv", "(Tensor x, Tensor weight, Tensor? bias, Tensor h, int[] stride, int[] padding, "
                      "int[] dilation, int groups, str padding_mode) -> (Tensor, Tensor)", _fake_conv,
                      to_op_args=_conv_op_args, from_op_args=_conv_call_args)


# ----------------------------------------------------------------------------------------------------------
# 6. Public functions.
# ----------------------------------------------------------------------------------------------------------
def _as_h(h, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(h, torch.Tensor):  # a Python number: filled on the device (no host-to-device copy)
        if not x.is_floating_point():
            raise TypeError(f"cpl: x must be floating point, got {x.dtype}")
        value = as_positive_float(h, "cpl: h", allow_zero=True)
        if x.is_floating_point() and value > torch.finfo(x.dtype).max:
            raise ValueError(f"cpl: h = {value:.3g} does not fit in x's dtype {x.dtype}")
        h = torch.full((), value, dtype=x.dtype, device=x.device)
    if h.dim() == 0:
        return h
    if h.numel() != 1:
        raise ValueError(f"cpl: h must be a scalar, got shape {tuple(h.shape)}")
    return h.reshape(())


_round_down = cast_down  # the largest value of a dtype ≤ a float64 tensor (lipkern._rounding)


def _adjoint_of_padding(y: torch.Tensor, padding, padding_mode: str) -> torch.Tensor:
    """The adjoint of zero / circular padding by (left, right, top, bottom): crop; for circular, first add the
    wrapped borders back (padded row i < top came from row height − top + i, etc.)."""
    left, right, top, bottom = padding
    height, width = y.shape[-2] - top - bottom, y.shape[-1] - left - right
    if padding_mode == "circular":
        y = y.clone()
        y[..., height:top + height, :] += y[..., :top, :]
        y[..., top:top + bottom, :] += y[..., top + height:, :]
        y[..., width:left + width] += y[..., :left]
        y[..., left:left + right] += y[..., left + width:]
    return y[..., top:top + height, left:left + width]


def _validate(name: str, x, weight, bias, h, x_dims: tuple[int, ...], w_dims: int) -> None:
    for label, t in (("x", x), ("weight", weight), ("bias", bias), ("h", h)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"{name}: {label} must be floating point, got {t.dtype}")
        if not _same_place(t, x):
            raise ValueError(f"{name}: {label} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")
    if x.dim() not in x_dims or weight.dim() != w_dims:
        raise ValueError(f"{name}: expected x with {x_dims} dims and a {w_dims}-D weight, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"{name}: weight is empty (no features or hidden channels), shape {tuple(weight.shape)}")


def _autocast_cast(x, weight, bias, h):
    """Under autocast: weight, bias and h in x's dtype (the op then runs with autocast disabled)."""
    if not x.is_floating_point():
        return weight, bias, h
    cast = (lambda t: t.to(x.dtype) if t is not None and t.is_floating_point() and t.dtype != x.dtype else t)
    return cast(weight), cast(bias), cast(h)


def _autocast_on(x: torch.Tensor) -> bool:
    return _autocast_device(x) is not None  # (never on the meta device: shapes only)


def cpl_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h) -> torch.Tensor:
    """z = x − h·σ(x Wᵀ + b) W for x (..., features), W (hidden, features), b (hidden,), h a scalar (tensor
    or float; differentiable). 1-Lipschitz when 0 ≤ h ≤ 2/‖W‖₂². The backward saves only x. Under autocast
    it runs in x's dtype (see the module docstring)."""
    h = _as_h(h, x)
    if _autocast_on(x):
        weight, bias, h = _autocast_cast(x, weight, bias, h)
    _validate("cpl_linear", x, weight, bias, h, (1, 2, 3, 4, 5), 2)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"cpl_linear: x has {x.shape[-1]} features, weight expects {weight.shape[1]}")
    if x.dim() == 2:  # (no view nodes in the graph: each costs a backward step)
        return _CPL_LINEAR(x, weight, bias, h)
    return _CPL_LINEAR(x.reshape(-1, x.shape[-1]), weight, bias, h).reshape(x.shape)


def cpl_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h, stride=1, padding=0,
               dilation=1, groups: int = 1, padding_mode: str = "zeros") -> torch.Tensor:
    """z = x − h·Aᵀσ(A x + b) for the conv A with these nn.Conv2d arguments (W (hidden, channels/groups, kh, kw),
    its exact adjoint Aᵀ, so z has x's shape) and x (N, channels, H, W). 1-Lipschitz when 0 ≤ h ≤ 2/‖A‖₂²
    (‖A‖ at x's size: see lipkern.bounds.conv2d_spectral_norm). The backward saves only x. Under autocast it
    runs in x's dtype (see the module docstring)."""
    h = _as_h(h, x)
    if _autocast_on(x):
        weight, bias, h = _autocast_cast(x, weight, bias, h)
    _validate("cpl_conv2d", x, weight, bias, h, (4,), 4)  # before the geometry reads their shapes
    g = ConvGeometry.create(tuple(x.shape[-2:]), tuple(weight.shape[-2:]), stride, padding, dilation, groups,
                            padding_mode)
    g.check_weight(weight, stacked=False)
    return _cpl_conv2d_validated(x, weight, bias, h, g)


def cpl_conv2d_with_geometry(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             h: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """:func:`cpl_conv2d` for a ``ConvGeometry`` built by the caller (the layer keeps its own) that fits the
    weight; h a 0-dim tensor. x, weight, bias and h: one dtype and device; x's channels and size: the geometry's
    (checked)."""
    if _autocast_on(x):
        weight, bias, h = _autocast_cast(x, weight, bias, h)
    _validate("cpl_conv2d", x, weight, bias, h, (4,), 4)
    return _cpl_conv2d_validated(x, weight, bias, h, g)


def cpl_layer_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor,
                      g: ConvGeometry | None = None) -> torch.Tensor:
    """:func:`cpl_linear` (``g`` None) or :func:`cpl_conv2d_with_geometry` for a layer (which checks x's size
    itself): when x, the weight, the bias and h share a dtype and device, the ranks and channels fit and no
    autocast is on, the op runs without the public functions' checks (they cost a small training step more than
    its arithmetic); anything else takes the public function, with its casts and its clear errors."""
    linear = g is None
    fits = (weight.dim() == (2 if linear else 4) and x.dim() == weight.dim() and _same_place(x, weight)
            and _same_place(h, weight) and (bias is None or _same_place(bias, weight)) and not _autocast_on(x)
            and x.shape[1] == weight.shape[1] * (1 if linear else g.groups))
    if linear:
        return _CPL_LINEAR(x, weight, bias, h) if fits else cpl_linear(x, weight, bias, h)
    return _CPL_CONV2D(x, weight, bias, h, g) if fits else cpl_conv2d_with_geometry(x, weight, bias, h, g)


def _same_place(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype and device (two CPU tensors without building device objects)."""
    return a.dtype == b.dtype and (a.is_cpu and b.is_cpu or a.device == b.device)


def _cpl_conv2d_validated(x, weight, bias, h, g: ConvGeometry) -> torch.Tensor:
    """Dtypes, devices and dims checked: x's channels and size against the geometry, then the op."""
    if x.shape[1] != weight.shape[1] * g.groups:
        raise ValueError(f"cpl_conv2d: x has {x.shape[1]} channels, weight expects {weight.shape[1] * g.groups}")
    if tuple(x.shape[-2:]) != g.input_size:
        raise ValueError(f"cpl_conv2d: x has size {tuple(x.shape[-2:])}, the geometry is for {g.input_size}")
    return _CPL_CONV2D(x, weight, bias, h, g)
