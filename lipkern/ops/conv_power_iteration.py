"""Power iteration on the true operator of 2-D convolutions, for many layers in one call.

The operator A of a conv layer is the map x (c_in, H, W) -> conv2d(pad(x), K, stride, dilation, groups) at
the real input size, with its padding (zeros or circular, possibly asymmetric as for 'same'). Its exact
adjoint Aᵀ is conv_transpose2d with the output_padding that restores the padded size, followed by the
adjoint of the padding (a crop for zeros, a wrap-around sum for circular).

One iteration per layer l (u_l persistent, unit norm):
    w = A u,  z = Aᵀ w,  σ = ‖z‖ / ‖w‖,  v = w / ‖w‖,  u ← z / ‖z‖   (u kept when z = 0)
σ is an **estimate** of ‖A‖₂, never above it up to rounding, converging from below.

Layers of equal geometry are stacked as one grouped convolution (L layers × g groups = L·g groups), so an
iteration for all L layers is one conv2d and one conv_transpose2d launch, however many layers there are; on
CUDA, several groups=1 layers use batched GEMMs on unfolded vectors instead (``_StackedOperator``).
Symmetric zero padding goes to the convolution (no padded copy); asymmetric or circular padding pads first.

On the Triton backend an iteration is four launches: w = A u; one kernel writes v = w/‖w‖; z = Aᵀ v; one
kernel writes u = z/‖z‖ and σ = ‖z‖ = ‖Aᵀ v‖. The norms are computed as m·‖x/m‖ with m = max|x| (no overflow
or underflow of the squares, so the weights are not rescaled), and v is unit before Aᵀ is applied (‖z‖ ≤ ‖A‖:
no overflow of AᵀA u). The PyTorch path runs in the same order on each layer's weight divided by its largest
|entry| instead (it runs on CPU tensors, and under the Triton interpreter for runs of more than 8 iterations,
where each launch is slow).
No host synchronization and no value check: a NaN/Inf weight gives NaN σ and vectors (visible downstream).

Layout: geometry, reference (one layer at a time), Triton kernel, stacked launchers, custom op, public
function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lipkern import _cpu_kernels
from lipkern._checks import as_shape, is_int
from lipkern._dispatch import device_context, record_implementation, select_backend, tracing, triton_importable
from lipkern.ops._registration import define_op
from lipkern.ops.power_iteration import initial_vectors

__all__ = ["ConvGeometry", "advance_conv_power_iteration", "conv_adjoint", "conv_bilinear",
           "conv_bilinear_gradient", "conv_operator", "conv_power_iteration", "conv_power_iteration_ref",
           "initial_conv_vectors"]

PADDING_MODES = ("zeros", "circular")


def _pair(value, name: str) -> tuple[int, int]:
    if is_int(value):
        return (int(value), int(value))
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(is_int(v) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


# ----------------------------------------------------------------------------------------------------------
# Geometry: everything that, with the kernel, defines the linear operator.
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvGeometry:
    """input_size (H, W); padding (top, bottom, left, right) after resolving 'same'/'valid'."""

    input_size: tuple[int, int]
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"

    @classmethod
    def create(cls, input_size, kernel_size, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
        input_size, kernel_size = _pair(input_size, "input_size"), _pair(kernel_size, "kernel_size")
        stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        if min(input_size) < 1 or min(kernel_size) < 1 or min(stride) < 1 or min(dilation) < 1:
            raise ValueError("input_size, kernel_size, stride and dilation must be positive, got "
                             f"{input_size}, {kernel_size}, {stride}, {dilation}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if not is_int(groups) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        span = tuple(d * (k - 1) for d, k in zip(dilation, kernel_size))
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' needs stride 1 (as in nn.Conv2d)")
            pads = (span[0] // 2, span[0] - span[0] // 2, span[1] // 2, span[1] - span[1] // 2)
        elif isinstance(padding, (tuple, list)) and len(padding) == 4:
            pads = as_shape(padding, "padding", minimum=0)
        else:
            ph, pw = _pair(padding, "padding")
            pads = (ph, ph, pw, pw)
        if min(pads) < 0:
            raise ValueError(f"padding must be non-negative, got {pads}")
        geometry = cls(input_size, kernel_size, stride, pads, dilation, groups, padding_mode)
        if min(geometry.output_size) < 1:
            raise ValueError(f"the conv's output is empty for input size {input_size} ({geometry})")
        if padding_mode == "circular" and (max(pads[:2]) > input_size[0] or max(pads[2:]) > input_size[1]):
            raise ValueError(f"circular padding {pads} is larger than the input {input_size}")
        return geometry

    def __post_init__(self):  # the sizes are read several times per layer and training step: computed once
        self._sizes()

    def _sizes(self) -> tuple:
        """(padded size, output size, conv_padding, the adjoint's output_padding), kept in the instance (frozen;
        not a field: equality and hash ignore it; computed again for an instance unpickled from a version
        without it)."""
        sizes = self.__dict__.get("_derived_sizes")
        if sizes is None:
            (h, w), (t, b, le, r) = self.input_size, self.padding
            padded = (h + t + b, w + le + r)
            output = tuple((p - d * (k - 1) - 1) // s + 1 for p, d, k, s in
                           zip(padded, self.dilation, self.kernel_size, self.stride))
            symmetric = (t, le) if self.padding_mode == "zeros" and t == b and le == r else None
            out_pad = tuple(p - ((o - 1) * s + d * (k - 1) + 1) for p, o, s, d, k in
                            zip(padded, output, self.stride, self.dilation, self.kernel_size))
            sizes = (padded, output, symmetric, out_pad)
            object.__setattr__(self, "_derived_sizes", sizes)
        return sizes

    @property
    def padded_size(self) -> tuple[int, int]:
        return self._sizes()[0]

    @property
    def output_size(self) -> tuple[int, int]:
        return self._sizes()[1]

    def check_weight(self, weight: torch.Tensor, stacked: bool) -> None:
        expected_dim = 5 if stacked else 4
        if weight.dim() != expected_dim:
            raise ValueError(f"expected a {'stacked (L, out, in/groups, kh, kw)' if stacked else '(out, in/groups, kh, kw)'}"
                             f" conv weight, got shape {tuple(weight.shape)}")
        if tuple(weight.shape[-2:]) != self.kernel_size:
            raise ValueError(f"weight kernel {tuple(weight.shape[-2:])} does not match {self.kernel_size}")
        if weight.shape[-4] == 0 or weight.shape[-3] == 0:
            raise ValueError(f"the conv weight has no channels, shape {tuple(weight.shape)}")
        if weight.shape[-4] % self.groups:
            raise ValueError(f"out_channels {weight.shape[-4]} is not divisible by groups={self.groups}")


# ----------------------------------------------------------------------------------------------------------
# The operator and its exact adjoint (work on batched inputs (N, c_in·L, H, W) with `groups` groups).
# ----------------------------------------------------------------------------------------------------------
def _torch_pad(g: ConvGeometry) -> tuple[int, int, int, int]:
    t, b, le, r = g.padding
    return (le, r, t, b)


def _unpad_adjoint(y: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    (h, w), (t, b, le, r) = g.input_size, g.padding
    if g.padding_mode == "zeros":
        return y[..., t:t + h, le:le + w]
    rows = (torch.arange(h + t + b, device=y.device) - t) % h
    cols = (torch.arange(w + le + r, device=y.device) - le) % w
    y = y.new_zeros(y.shape[:-2] + (h, y.shape[-1])).index_add_(-2, rows, y)
    return y.new_zeros(y.shape[:-1] + (w,)).index_add_(-1, cols, y)


def conv_padding(g: ConvGeometry) -> tuple[int, int] | None:
    """The (pad_h, pad_w) argument of F.conv2d / conv_transpose2d that realizes ``g``'s padding, or None when
    it needs an explicit pad (asymmetric or circular padding)."""
    return g._sizes()[2]


def _apply(x: torch.Tensor, weight: torch.Tensor, g: ConvGeometry, groups: int) -> torch.Tensor:
    padding = conv_padding(g)
    if padding is None:
        x = F.pad(x, _torch_pad(g), mode="constant" if g.padding_mode == "zeros" else "circular")
        padding = (0, 0)
    return F.conv2d(x, weight, stride=g.stride, padding=padding, dilation=g.dilation, groups=groups)


def _apply_adjoint(y: torch.Tensor, weight: torch.Tensor, g: ConvGeometry, groups: int) -> torch.Tensor:
    _, _, padding, out_pad = g._sizes()
    x = F.conv_transpose2d(y, weight, stride=g.stride, padding=padding or (0, 0), output_padding=out_pad,
                           dilation=g.dilation, groups=groups)  # padding crops: the adjoint of zero padding
    return _unpad_adjoint(x, g) if padding is None and any(g.padding) else x


# Above this many bytes of unfolded vectors the stacked operator stays a grouped convolution (memory).
_GEMM_MAX_BYTES = 256 << 20
# Devices where the GEMM form is used: on the CPU the grouped convolution is faster (20 layers, c = 64, 32²,
# one thread: 31 ms grouped conv vs 114 ms unfold + bmm + fold); on CUDA it is predicted to win (NOTES.md).
_GEMM_DEVICES = ("cuda",)


def _gemm_form(weight_shape, geometry: ConvGeometry, like: torch.Tensor) -> bool:
    """Whether L stacked layers (weight_shape (L, out, in/groups, kh, kw)) use the GEMM form (see below);
    ``like``: a tensor of the operands' dtype and device."""
    layers, _, in_per_group, kh, kw = weight_shape
    unfolded = layers * in_per_group * kh * kw * math.prod(geometry.output_size) * like.element_size()
    return (like.device.type in _GEMM_DEVICES and geometry.groups == 1 and layers > 1
            and unfolded <= _GEMM_MAX_BYTES)


def _pad_for_conv(x: torch.Tensor, g: ConvGeometry) -> tuple[torch.Tensor, tuple[int, int]]:
    """x padded explicitly where the convolution cannot pad it, and the padding left to the convolution."""
    padding = conv_padding(g)
    if padding is None:
        return F.pad(x, _torch_pad(g), mode="constant" if g.padding_mode == "zeros" else "circular"), (0, 0)
    return x, padding


def _unfold(u: torch.Tensor, g: ConvGeometry) -> torch.Tensor:
    """(L, in, H, W) → (L, in·kh·kw, Ho·Wo): the conv's input patches, channel-major as W.reshape(out, -1)."""
    x, padding = _pad_for_conv(u, g)
    return F.unfold(x, g.kernel_size, g.dilation, padding, g.stride)


class _StackedOperator:
    """A_l and A_lᵀ for L layers of equal geometry, on (L, c, H, W) tensors, in one of two forms:

    - GEMM form (CUDA, several layers, groups = 1, unfolded vectors ≤ _GEMM_MAX_BYTES):
      A u = bmm(W_mat, unfold(u)), Aᵀ v = fold(bmm(W_matᵀ, v)) with W_mat (L, out, in·kh·kw): batched GEMMs
      instead of a grouped convolution with L groups at batch 1 (slow in cuDNN: 0.4 ms per conv at L = 20,
      c = 64, 32², on an H200);
    - grouped-convolution form otherwise (one layer; grouped or depthwise convs; very large vectors).
    fold is the exact adjoint of unfold (copies vs sums), so Aᵀ is exact in both forms."""

    def __init__(self, weights: torch.Tensor, geometry: ConvGeometry):
        self.geometry, self.layers = geometry, weights.shape[0]
        self.out_channels, self.in_channels = weights.shape[1], weights.shape[2] * geometry.groups
        self.gemm = _gemm_form(weights.shape, geometry, weights)
        self.matrices = (weights.reshape(self.layers, self.out_channels, -1) if self.gemm
                         else _stack_weight(weights))

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """(L, in, H, W) → (L, out, Ho, Wo)."""
        if self.gemm:
            return torch.bmm(self.matrices, _unfold(u, self.geometry)).reshape(self.layers, self.out_channels,
                                                                               *self.geometry.output_size)
        g = self.geometry
        if self.layers == 1:  # (1, in, H, W) is the convolution's batch of one already: no reshapes
            return _apply(u, self.matrices, g, g.groups)
        y = _apply(u.reshape(1, -1, *u.shape[-2:]), self.matrices, g, g.groups * self.layers)
        return y.reshape(self.layers, self.out_channels, *y.shape[-2:])

    def adjoint(self, v: torch.Tensor) -> torch.Tensor:
        """(L, out, Ho, Wo) → (L, in, H, W)."""
        g = self.geometry
        if not self.gemm and self.layers == 1:
            return _apply_adjoint(v, self.matrices, g, g.groups)
        if not self.gemm:
            x = _apply_adjoint(v.reshape(1, -1, *v.shape[-2:]), self.matrices, g, g.groups * self.layers)
            return x.reshape(self.layers, self.in_channels, *x.shape[-2:])
        cols = torch.bmm(self.matrices.mT, v.reshape(self.layers, self.out_channels, -1))
        padding = conv_padding(g)
        if padding is not None:  # fold crops the padding: the adjoint of zero padding
            return F.fold(cols, g.input_size, g.kernel_size, g.dilation, padding, g.stride)
        return _unpad_adjoint(F.fold(cols, g.padded_size, g.kernel_size, g.dilation, 0, g.stride), g)


def conv_operator(x: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """A x for x (N, c_in, H, W) and a (out, in/groups, kh, kw) weight."""
    return _apply(x, weight, geometry, geometry.groups)


def conv_adjoint(y: torch.Tensor, weight: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """Aᵀ y for y (N, c_out, Ho, Wo): the exact transpose of :func:`conv_operator`."""
    return _apply_adjoint(y, weight, geometry, geometry.groups)


def conv_bilinear(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """⟨v, A u⟩ per layer for stacked weights (L, ...), u (L, c_in, H, W), v (L, c_out, Ho, Wo).

    With the vectors of a converged power iteration this is the differentiable estimate of ‖A‖₂
    (its gradient with respect to the weight is the usual spectral-norm gradient)."""
    layers = weight.shape[0]
    stacked = _stack_weight(weight)
    au = _apply(u.reshape(1, -1, *u.shape[-2:]), stacked, geometry, geometry.groups * layers)
    return (au.reshape(v.shape) * v).flatten(1).sum(1)


def conv_bilinear_gradient(u: torch.Tensor, v: torch.Tensor, weight_shape, geometry: ConvGeometry) -> torch.Tensor:
    """G_l = ∂⟨v_l, A_l u_l⟩/∂W_l for L layers at once, shape (L, *weight_shape): one batched GEMM of v with
    the unfolded u (the GEMM form of :class:`_StackedOperator`) or one grouped weight-gradient convolution.
    ⟨W_l, G_l⟩ = ⟨v_l, A(W_l) u_l⟩ (the bilinear form is linear in W), so σ_l = ⟨W_l, G_l⟩ is the
    differentiable estimate with one dot product per layer. Not differentiable itself."""
    layers = u.shape[0]
    if (_cpp_pays(u, (layers, *weight_shape), geometry) and _cpu_kernels.plain(u, v) and u.is_contiguous()
            and v.is_contiguous()):
        return _cpu_kernels.conv_bilinear_gradient(u, v, weight_shape, geometry)
    if _gemm_form((layers, *weight_shape), geometry, u):
        cols = _unfold(u, geometry)
        return torch.bmm(v.reshape(layers, weight_shape[0], -1), cols.mT).reshape(layers, *weight_shape)
    x, padding = _pad_for_conv(u.reshape(1, -1, *u.shape[-2:]), geometry)
    stacked_shape = (layers * weight_shape[0], *weight_shape[1:])
    # the weight gradient of the stacked convolution (torch.nn.grad.conv2d_weight's call, without its wrapper)
    grad = torch.ops.aten.convolution_backward(v.reshape(1, -1, *v.shape[-2:]), x, x.new_empty(stacked_shape),
                                               None, list(geometry.stride), list(padding), list(geometry.dilation),
                                               False, [0, 0], geometry.groups * layers, [False, True, False])[1]
    return grad.reshape(layers, *weight_shape)


# ----------------------------------------------------------------------------------------------------------
# Reference: one layer at a time, the loop public CPL / LiResNet code runs (the oracle of the stacked path).
# ----------------------------------------------------------------------------------------------------------
def _unit(x: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / ‖x‖, ‖x‖); ``keep`` (or x) instead of the unit vector when x is zero."""
    norm = torch.linalg.vector_norm(x)
    if norm != 0:  # NaN too: NaN/Inf weights give NaN results
        return x / norm, norm
    return (x if keep is None else keep), norm


def conv_power_iteration_ref(weights: torch.Tensor, u: torch.Tensor, n_iter: int,
                             geometry: ConvGeometry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma (L,), u, v), one layer at a time; ``u`` is not modified."""
    sigmas, us, vs = [], [], []
    for weight, u_l in zip(weights, u):
        u_l = u_l[None]
        for _ in range(n_iter):
            w = conv_operator(u_l, weight, geometry)
            z = conv_adjoint(w, weight, geometry)
            w_unit, w_norm = _unit(w)
            u_l, z_norm = _unit(z, keep=u_l)
            sigma = z_norm / w_norm if w_norm != 0 else torch.zeros_like(w_norm)
        sigmas.append(sigma)
        us.append(u_l[0])
        vs.append(w_unit[0])
    return torch.stack(sigmas), torch.stack(us), torch.stack(vs)


# ----------------------------------------------------------------------------------------------------------
# Triton kernel: normalize each layer's vector, one program per layer.
# ----------------------------------------------------------------------------------------------------------
# Each launch under the Triton interpreter costs ~25 ms: on CPU tensors, longer runs (the convergence loops of
# lipkern.bounds, thousands of iterations) take the PyTorch path; training steps (1-8 iterations) the kernel.
_INTERPRETER_MAX_ITER = 8

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _unit_kernel(x_ptr, out_ptr, norm_ptr, N, KEEP_WHEN_ZERO: tl.constexpr, STORE_NORM: tl.constexpr,
                     BLOCK: tl.constexpr):
        """Row b of x (B, N): out_b = x_b / ‖x_b‖ and norm_b = ‖x_b‖, in two sweeps (one for the norm, one to
        write). The norm is m·√s with m = max|x| and s = Σ (x/m)², kept per lane and rescaled when m grows (no
        overflow or underflow of the squares). A zero row writes x_b (zeros), or nothing when KEEP_WHEN_ZERO
        (out_b keeps its vector). NaN/Inf in the row make s, the norm and the row NaN."""
        b = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + b * N
        offs = tl.arange(0, BLOCK)
        big = tl.zeros([BLOCK], dtype=x_ptr.dtype.element_ty)
        acc = tl.zeros([BLOCK], dtype=x_ptr.dtype.element_ty)
        for start in range(0, N, BLOCK):
            x = tl.load(x_row + start + offs, mask=start + offs < N, other=0.0)
            grown = tl.maximum(big, tl.abs(x))  # NaN x: skipped here, but x / safe below is NaN
            safe = tl.where(grown > 0.0, grown, 1.0)
            ratio = big / safe
            y = x / safe
            acc = acc * ratio * ratio + y * y
            big = grown
        m = tl.max(big, axis=0)
        scale = tl.where(m > 0.0, m, 1.0)
        ratio = big / scale
        root = tl.sqrt(tl.sum(acc * ratio * ratio, axis=0))
        norm = m * root
        if STORE_NORM:
            tl.store(norm_ptr + b, norm)
        zero = norm == 0.0  # False for NaN: the NaN row is written
        inv_root = 1.0 / tl.where(zero, 1.0, root)
        end = N
        if KEEP_WHEN_ZERO:
            end = tl.where(zero, 0, N)  # a zero row stores nothing
        for start in range(0, N, BLOCK):
            x = tl.load(x_row + start + offs, mask=start + offs < N, other=0.0)
            y = tl.where(zero, x, (x / scale) * inv_root)
            tl.store(out_ptr + b * N + start + offs, y, mask=start + offs < end)


# ----------------------------------------------------------------------------------------------------------
# Stacked launchers: all layers as one grouped convolution.
# ----------------------------------------------------------------------------------------------------------
def _stack_weight(weights: torch.Tensor) -> torch.Tensor:
    return weights.reshape(-1, *weights.shape[2:])


def _stacked_iterations(weights, u, v, n_iter: int, geometry: ConvGeometry) -> torch.Tensor:
    """The PyTorch path, in the Triton path's order (v unit before Aᵀ is applied), on each layer's weight
    divided by its largest |entry| (σ is multiplied back): the squares in the norms cannot overflow (an entry
    of A u is at most ‖A‖ ≤ Σ|W|) and do not underflow while ‖A‖ is not ~1e-19 of that entry."""
    layers = weights.shape[0]
    tiny = torch.finfo(weights.dtype).tiny
    scale = weights.abs().amax(dim=(1, 2, 3, 4), keepdim=True).clamp_min(tiny)  # NaN propagates
    operator = _StackedOperator(weights / scale, geometry)
    per_layer = (1, 2, 3)  # the (c, H, W) of one layer's vector
    x = u
    for _ in range(n_iter):
        w = operator.apply(x)
        v_unit = w / torch.linalg.vector_norm(w, dim=per_layer, keepdim=True).clamp_min(tiny)  # zero stays zero
        z = operator.adjoint(v_unit)
        z_norm = torch.linalg.vector_norm(z, dim=per_layer, keepdim=True)  # σ = ‖Aᵀ v‖
        x = torch.where(z_norm != 0, z / z_norm.clamp_min(tiny), x)
    u.copy_(x)
    v.copy_(v_unit)
    return (z_norm * scale[:, 0]).view(layers)


def _launch_unit(x: torch.Tensor, out: torch.Tensor, norm: torch.Tensor, keep_when_zero: bool,
                 store_norm: bool) -> None:
    """One program per layer, up to 16 warps (a training step's vectors are at most a few 10⁵ elements: two
    sweeps of ≤ 16 steps of 8192 float32 elements)."""
    layers, n = out.shape[0], out[0].numel()
    per_thread = 16 if out.element_size() <= 4 else 8  # float64 at 16 per thread spills registers (sm_90)
    block = min(per_thread * 512, max(128, triton.next_power_of_2(n)))
    _unit_kernel[(layers,)](x, out, norm, n, KEEP_WHEN_ZERO=keep_when_zero, STORE_NORM=store_norm,
                            BLOCK=block, num_warps=max(4, min(16, block // (32 * per_thread))))


def _stacked_iterations_triton(weights, u, v, n_iter: int, geometry: ConvGeometry) -> torch.Tensor:
    """Four launches per iteration (GEMM form: six, with unfold and fold), the vectors written in place (u and
    v must be contiguous)."""
    operator = _StackedOperator(weights, geometry)
    sigma = torch.empty(weights.shape[0], dtype=weights.dtype, device=weights.device)
    with device_context(weights):
        for _ in range(n_iter):
            _launch_unit(operator.apply(u).contiguous(), v, sigma, keep_when_zero=False, store_norm=False)
            _launch_unit(operator.adjoint(v).contiguous(), u, sigma, keep_when_zero=True, store_norm=True)
    return sigma


# Below this many multiply-adds per operator application (all layers of a call) the C++ CPU kernel (direct
# loops, float64 accumulation, one call for the whole iteration) beats the PyTorch path's ~15 ops per step around
# two oneDNN convolutions; measured on this project's 2-core VM, 1 thread (benchmarks/NOTES.md, "Conv power step").
_CPP_MAX_MACS = 1 << 18


def _macs(weight_shape, geometry: ConvGeometry) -> int:
    """Multiply-adds of one application of A for stacked weights (L, out, in/groups, kh, kw)."""
    return math.prod(weight_shape) * math.prod(geometry.output_size)


def _cpp_pays(like: torch.Tensor, weight_shape, geometry: ConvGeometry) -> bool:
    """Whether the C++ kernel takes stacked weights of ``weight_shape`` with ``like``'s dtype and device."""
    return (like.device.type == "cpu" and like.dtype in (torch.float32, torch.float64)
            and _cpu_kernels.available() and _macs(weight_shape, geometry) <= _CPP_MAX_MACS)


def _conv_power_iteration(weights, u, v, n_iter, geometry: ConvGeometry, *, save: bool = False):
    if weights.shape[0] == 0:  # no layers
        return weights.new_empty(0)
    interpreted_long_run = not weights.is_cuda and n_iter > _INTERPRETER_MAX_ITER
    reason = f"the interpreter runs ≤ {_INTERPRETER_MAX_ITER} iterations per call" if interpreted_long_run else None
    if select_backend(weights, triton_reason=reason) == "triton":
        record_implementation("conv_power_iteration", "triton")
        return _stacked_iterations_triton(weights.contiguous(), u, v, n_iter, geometry)
    if _cpp_pays(weights, weights.shape, geometry) and _cpu_kernels.plain(weights, u, v):
        record_implementation("conv_power_iteration", "cpp")
        sigma = torch.empty(weights.shape[0], dtype=weights.dtype)
        _cpu_kernels.conv_power_iteration(weights.contiguous(), u, v, sigma, n_iter, geometry)
        return sigma
    record_implementation("conv_power_iteration", "torch")
    return _stacked_iterations(weights, u, v, n_iter, geometry)


def cpu_conv_power_rows(weight: torch.Tensor, u: torch.Tensor, n_iter: int, geometry: ConvGeometry,
                        gradient: bool = True) -> tuple | None:
    """A conv layer's power step by the C++ CPU kernels, without the op's layers (at the sizes these kernels
    take, a training step costs more in dispatch than in arithmetic): (u', v', G) as new tensors,
    G = ∂⟨v', A u'⟩/∂W flattened (σ = ⟨W, G⟩; None unless ``gradient``), u read and not written; the numbers of
    :func:`conv_power_iteration` and :func:`conv_bilinear_gradient` for ``weight[None]`` (which run these kernels
    at such sizes). None where they would not run: another device or dtype, the kernels off or not built, a
    backend other than torch chosen (Triton's interpreter included), a wrapped tensor, a torch.func
    transform or tracing (FakeTensorMode, make_fx, torch.compile), more than ``_CPP_MAX_MACS`` multiply-adds.
    (CPL-S (small), 45 → 5 channels at 8², 130k multiply-adds: its four layers' stacked PyTorch round cost
    1.7 ms a step, their own C++ steps 4 × 0.3 ms.)"""
    if not weight.is_cpu or not _cpu_kernels.available():
        return None
    shapes = geometry.__dict__.setdefault("_one_layer_shapes", {})  # (kept in the instance: no hash per call)
    weight_shape = tuple(weight.shape)
    shape = shapes.get(weight_shape, False)
    if shape is False:
        shape = shapes[weight_shape] = _one_layer_shape(weight_shape, geometry)
    if (shape is None or weight.dtype not in (torch.float32, torch.float64) or u.dtype != weight.dtype
            or not _cpu_kernels.plain(weight, u) or torch._C._are_functorch_transforms_active() or tracing()):
        return None
    long_run = n_iter > _INTERPRETER_MAX_ITER
    reason = f"the interpreter runs ≤ {_INTERPRETER_MAX_ITER} iterations per call" if long_run else None
    if select_backend(weight, triton_reason=reason) != "torch":
        return None
    record_implementation("conv_power_iteration", "cpp")
    return _cpu_kernels.conv_power_rows(weight.detach().contiguous(), u, n_iter, shape, gradient)


def _one_layer_shape(weight_shape: tuple, geometry: ConvGeometry) -> tuple | None:
    """The C++ kernels' shape arguments for one layer of this weight, None past ``_CPP_MAX_MACS``."""
    if len(weight_shape) != 4 or _macs((1, *weight_shape), geometry) > _CPP_MAX_MACS:
        return None
    return _cpu_kernels._conv_shape(geometry, 1, weight_shape[0], weight_shape[1] * geometry.groups)


# ----------------------------------------------------------------------------------------------------------
# Registration (lipkern/ops/_registration.py): the custom op lipkern::conv_power_iteration, u and v declared
# mutations (persistent buffers), sigma the output; eager calls run the implementation directly.
# ----------------------------------------------------------------------------------------------------------
def _op_args(weights, u, v, n_iter, g: ConvGeometry):
    return weights, u, v, n_iter, list(g.stride), list(g.padding), list(g.dilation), g.groups, g.padding_mode


def _call_args(weights, u, v, n_iter, stride, padding, dilation, groups, padding_mode):
    geometry = ConvGeometry(tuple(u.shape[-2:]), tuple(weights.shape[-2:]), tuple(stride), tuple(padding),
                            tuple(dilation), groups, padding_mode)
    return weights, u, v, n_iter, geometry


_CONV_POWER_OP = define_op(
    "conv_power_iteration", "(Tensor weights, Tensor(a!) u, Tensor(b!) v, int n_iter, int[] stride, int[] padding, "
    "int[] dilation, int groups, str padding_mode) -> Tensor", _conv_power_iteration,
    lambda weights, u, v, *args: weights.new_empty(weights.shape[0]), to_op_args=_op_args, from_op_args=_call_args)


def advance_conv_power_iteration(weights: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_iter: int,
                                 geometry: ConvGeometry) -> torch.Tensor:
    """:func:`conv_power_iteration` without its argument checks, for callers whose arguments are valid by
    construction (the layers): advances u and v in place, returns sigma."""
    return _CONV_POWER_OP(weights.detach(), u, v, n_iter, geometry)


# ----------------------------------------------------------------------------------------------------------
# Public function.
# ----------------------------------------------------------------------------------------------------------
def _validate(weights, u, v, n_iter, geometry: ConvGeometry) -> None:
    geometry.check_weight(weights, stacked=True)
    if weights.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"conv_power_iteration: weights must be float32 or float64, got {weights.dtype}")
    layers, c_out = weights.shape[:2]
    c_in = weights.shape[2] * geometry.groups
    expected_u = (layers, c_in, *geometry.input_size)
    if tuple(u.shape) != expected_u:
        raise ValueError(f"conv_power_iteration: u must have shape {expected_u}, got {tuple(u.shape)}")
    expected_v = (layers, c_out, *geometry.output_size)
    if v is not None and tuple(v.shape) != expected_v:
        raise ValueError(f"conv_power_iteration: v must have shape {expected_v}, got {tuple(v.shape)}")
    for name, t in (("u", u), ("v", v)):
        if t is not None and (t.dtype != weights.dtype or t.device != weights.device):
            raise ValueError(f"conv_power_iteration: {name} must be {weights.dtype} on {weights.device}")
    if not isinstance(n_iter, int) or isinstance(n_iter, bool) or n_iter < 1:
        raise ValueError(f"conv_power_iteration: n_iter must be an int >= 1, got {n_iter!r}")


def initial_conv_vectors(layers: int, channels: int, input_size, dtype, device, key: str = "") -> torch.Tensor:
    """Deterministic unit right vectors (layers, channels, H, W): identical on every process."""
    h, w = _pair(input_size, "input_size")
    flat = initial_vectors((layers, channels * h * w), dtype, device, key=key)
    return flat.reshape(layers, channels, h, w)


def conv_power_iteration(weights: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None, n_iter: int = 1,
                         *, stride=1, padding=0, dilation=1, groups: int = 1,
                         padding_mode: str = "zeros") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advance the power iteration of L conv layers of equal geometry by ``n_iter`` steps, in one call.

    weights: (L, out, in/groups, kh, kw); u: (L, in, H, W), the right vectors at the layers' real input size
    (see :func:`initial_conv_vectors`); v: (L, out, Ho, Wo) or None. u and v are **updated in place**
    (declared mutations of persistent buffers). stride, padding (int, pair, 'same', 'valid' or
    (top, bottom, left, right)), dilation, groups and padding_mode ('zeros' | 'circular') are nn.Conv2d's.

    Returns (sigma, u, v); sigma (L,) estimates each ‖A_l‖₂ from below. Not differentiable: use
    :func:`conv_bilinear` with the returned vectors for a differentiable estimate. No value is checked (that
    would synchronize with the device): NaN/Inf weights give their layer a NaN sigma and NaN vectors.
    """
    if not isinstance(weights, torch.Tensor) or not isinstance(u, torch.Tensor) or u.dim() != 4:
        raise ValueError("conv_power_iteration: weights must be a tensor and u a (L, in, H, W) tensor")
    geometry = ConvGeometry.create(tuple(u.shape[-2:]), tuple(weights.shape[-2:]), stride, padding, dilation,
                                   groups, padding_mode)
    _validate(weights, u, v, n_iter, geometry)
    if v is None:
        v = torch.zeros((weights.shape[0], weights.shape[1], *geometry.output_size), dtype=weights.dtype,
                        device=weights.device)
    return advance_conv_power_iteration(weights, u, v, n_iter, geometry), u, v
