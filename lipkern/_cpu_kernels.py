"""Guarded access to the C++ CPU kernels ``lipkern._cpu`` (csrc/cpu/) and the checks their raw pointers need.

The kernels take host pointers, so every shape, dtype, device and contiguity is checked here before a call (a
mismatch raises instead of reading out of bounds). Without the extension (no C++ compiler at install time,
``LIPKERN_BUILD_CPU=0``) ``available()`` is False and the ops run their PyTorch paths; so does
``lipkern.configure(cpu_kernels=False)`` (``LIPKERN_CPU_KERNELS=0``), which tests use to compare both.
"""

from __future__ import annotations

import torch

from lipkern._dispatch import config

try:
    from lipkern import _cpu
except ImportError:  # not built: the PyTorch paths run
    _cpu = None

_REAL = (torch.float32, torch.float64)


def available() -> bool:
    return _cpu is not None and config().cpu_kernels


def plain(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can read these tensors' memory: plain CPU tensors (no FakeTensor or other subclass,
    no torch.func wrapper, not under torch.compile's tracing)."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:  # (a loop: generators cost a small layer's step more than these checks)
        if ((type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter) or _functorch_wrapped(t)
                or t.is_neg() or t.is_conj()):
            return False
    return True


_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _cpu_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An output of a kernel: on the CPU whatever the default device (``with torch.device("meta")``)."""
    return torch.empty(shape, dtype=dtype, device="cpu")


def _expect(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype) -> int:
    if (type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter) or t.is_meta:  # (FakeTensor: is_cpu)
        raise ValueError(f"lipkern._cpu: {name} must be a plain CPU tensor with memory, got {type(t).__name__}")
    if (not t.is_cpu or t.dtype != dtype or t.shape != shape or not t.is_contiguous()
            or t.is_neg() or t.is_conj()):  # (a lazy negation or conjugation is not in the memory read)
        raise ValueError(f"lipkern._cpu: {name} must be a contiguous {dtype} CPU tensor of shape {tuple(shape)} "
                         f"(no lazy negation / conjugation), got {t.dtype} on {t.device}, shape {tuple(t.shape)}, "
                         f"contiguous={t.is_contiguous()}, neg={t.is_neg()}, conj={t.is_conj()}")
    return t.data_ptr()


def power_iteration(matrices: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor,
                    n_iter: int) -> None:
    """The PyTorch path's power iteration (``_launch_torch``) on real float32/float64 CPU matrices, in place."""
    batch, rows, cols = matrices.shape
    dtype = matrices.dtype
    if dtype not in _REAL:
        raise ValueError(f"lipkern._cpu.power_iteration: real float32/float64 matrices only, got {dtype}")
    _cpu.power_iteration(_expect("matrices", matrices, (batch, rows, cols), dtype),
                         _expect("u", u, (batch, cols), dtype), _expect("v", v, (batch, rows), dtype),
                         _expect("sigma", sigma, (batch,), dtype), batch, rows, cols, int(n_iter),
                         int(dtype == torch.float64))


def power_iteration_one(matrix: torch.Tensor, u: torch.Tensor, n_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`power_iteration` of one (rows, cols) matrix on new vectors: (u', v'), u (cols,) read, not written.
    The outputs are allocated here (only the inputs are checked)."""
    rows, cols = matrix.shape
    dtype = matrix.dtype
    if dtype not in _REAL:
        raise ValueError(f"lipkern._cpu.power_iteration: real float32/float64 matrices only, got {dtype}")
    m_ptr = _expect("matrix", matrix, (rows, cols), dtype)
    u_next = u.clone(memory_format=torch.contiguous_format)
    v_next, sigma = _cpu_empty(rows, dtype), _cpu_empty(1, dtype)  # (alive during the call)
    _cpu.power_iteration(m_ptr, _expect("u", u_next, (cols,), dtype), v_next.data_ptr(), sigma.data_ptr(), 1, rows,
                         cols, int(n_iter), int(dtype == torch.float64))
    return u_next, v_next


def _expect_numel(name: str, t: torch.Tensor, numel: int, dtype: torch.dtype) -> int:
    """``_expect`` for a tensor read as ``numel`` contiguous entries, whatever its shape (no view needed)."""
    if t.numel() != numel:
        raise ValueError(f"lipkern._cpu: {name} must have {numel} entries, got shape {tuple(t.shape)}")
    return _expect(name, t, t.shape, dtype)


def aol_forward(pairs: torch.Tensor, w: torch.Tensor, shape: tuple, constants: tuple, check: bool,
                with_signs: bool):
    """(scale d, W·d, half-shift signs or None) from the Gram pairs (see csrc/cpu/kernels.h), or None when
    ``check`` fails. ``shape`` = (groups, out_g, in_g, kh, kw); w holds groups·out_g·in_g·kh·kw entries in that
    order (a linear weight (out, in) as it is), W·d has w's shape. ``constants``: the AolConstants fields in
    order (eps_rel, eps_gram, t_mass, t_count, sum_factor, keep, tiny, largest, max_cost). The outputs are
    allocated here (only the inputs are checked)."""
    groups, out_g, in_g, kh, kw = shape
    kk = kh * kw
    n, n_half = in_g * kk, ((2 * kh - 1) * (2 * kw - 1) + 1) // 2
    if w.dtype not in _REAL or pairs.dtype not in _REAL:
        raise ValueError(f"lipkern._cpu.aol_forward: bad dtypes {pairs.dtype}, {w.dtype}")
    p_ptr = _expect_numel("pairs", pairs, groups * n * n, pairs.dtype)
    w_ptr = _expect_numel("w", w, groups * out_g * n, w.dtype)
    scale = _cpu_empty((groups, in_g), w.dtype)
    out = _cpu_empty(w.shape, w.dtype)
    signs = _cpu_empty((groups, n_half, in_g, in_g), torch.int8) if with_signs else None
    status = _cpu.aol_forward(p_ptr, int(pairs.dtype == torch.float64), w_ptr, int(w.dtype == torch.float64), groups,
                              out_g, in_g, kh, kw, *constants, int(check), scale.data_ptr(), out.data_ptr(),
                              0 if signs is None else signs.data_ptr())
    return None if status else (scale, out, signs)


def aol_backward(grad: torch.Tensor, grad_scale: torch.Tensor | None, w: torch.Tensor, scale: torch.Tensor,
                 signs: torch.Tensor, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric ∂L/∂P + ∂L/∂Pᵀ, (groups, in_g·kk, in_g·kk) ((n, n) for one group), of the AOL backward,
    and G·d in w's shape (csrc/cpu/kernels.h). ``shape`` and the layout of w and grad as for aol_forward."""
    groups, out_g, in_g, kh, kw = shape
    n, n_half = in_g * kh * kw, ((2 * kh - 1) * (2 * kw - 1) + 1) // 2
    if w.dtype not in _REAL:
        raise ValueError(f"lipkern._cpu.aol_backward: bad dtype {w.dtype}")
    pointers = (_expect_numel("grad", grad, w.numel(), w.dtype),
                0 if grad_scale is None else _expect_numel("grad_scale", grad_scale, groups * in_g, w.dtype),
                _expect_numel("w", w, groups * out_g * n, w.dtype),
                _expect_numel("scale", scale, groups * in_g, w.dtype),
                _expect_numel("signs", signs, groups * n_half * in_g * in_g, torch.int8))
    gsym = _cpu_empty((n, n) if groups == 1 else (groups, n, n), w.dtype)
    base = _cpu_empty(w.shape, w.dtype)
    _cpu.aol_backward(*pointers, int(w.dtype == torch.float64), groups, out_g, in_g, kh, kw, gsym.data_ptr(),
                      base.data_ptr())
    return gsym, base


def _conv_shape(geometry, layers: int, c_out: int, c_in: int) -> tuple:
    """The ConvShape arguments of the conv kernels (csrc/cpu/kernels.h) for a ConvGeometry."""
    g = geometry
    if g.padding_mode not in ("zeros", "circular"):
        raise ValueError(f"lipkern._cpu: padding_mode {g.padding_mode!r} is not a conv kernel's")
    return (layers, c_out, c_in, g.groups, *g.kernel_size, *g.input_size, *g.output_size, *g.stride, *g.dilation,
            *g.padding, int(g.padding_mode == "circular"))


def _conv_tensors(weights: torch.Tensor, u: torch.Tensor, v: torch.Tensor, geometry) -> tuple:
    layers, c_out, c_in_g, kh, kw = weights.shape
    c_in, dtype = c_in_g * geometry.groups, weights.dtype
    if dtype not in _REAL or (kh, kw) != tuple(geometry.kernel_size):
        raise ValueError(f"lipkern._cpu: conv weights must be float32/float64 with the geometry's kernel, got "
                         f"{dtype}, {(kh, kw)}")
    shape = _conv_shape(geometry, layers, c_out, c_in)
    return shape, (_expect("u", u, (layers, c_in, *geometry.input_size), dtype),
                   _expect("v", v, (layers, c_out, *geometry.output_size), dtype))


def conv_power_iteration(weights: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor,
                         n_iter: int, geometry) -> None:
    """The stacked conv power iteration of the PyTorch path (``_stacked_iterations``), float64 accumulation,
    u and v in place, sigma (L,) written."""
    shape, (u_ptr, v_ptr) = _conv_tensors(weights, u, v, geometry)
    _cpu.conv_power_iteration(_expect("weights", weights, weights.shape, weights.dtype), u_ptr, v_ptr,
                              _expect("sigma", sigma, (weights.shape[0],), weights.dtype), *shape, int(n_iter),
                              int(weights.dtype == torch.float64))


def conv_power_rows(weight: torch.Tensor, u: torch.Tensor, n_iter: int, shape: tuple, gradient: bool = True) -> tuple:
    """One layer's :func:`conv_power_iteration` on new vectors, then (``gradient``) :func:`conv_bilinear_gradient`:
    (u', v', G or None) with G flat, u read and not written. ``shape``: the ConvShape arguments of one layer with
    this weight (``_conv_shape``); the outputs are allocated here (only the inputs are checked)."""
    dtype, f64 = weight.dtype, int(weight.dtype == torch.float64)
    _, c_out, c_in, groups, kh, kw, h, w, ho, wo = shape[:10]
    if dtype not in _REAL or shape[0] != 1:
        raise ValueError(f"lipkern._cpu.conv_power_rows: one real float32/float64 layer, got {dtype}, {shape[:2]}")
    w_ptr = _expect("weight", weight, (c_out, c_in // groups, kh, kw), dtype)
    u_next = u.clone(memory_format=torch.contiguous_format)
    u_ptr = _expect("u", u_next, (c_in, h, w), dtype)
    v_next, sigma = _cpu_empty((c_out, ho, wo), dtype), _cpu_empty(1, dtype)
    grad = _cpu_empty(weight.numel(), dtype) if gradient else None
    _cpu.conv_power_rows(w_ptr, u_ptr, v_next.data_ptr(), sigma.data_ptr(), 0 if grad is None else grad.data_ptr(),
                         *shape, int(n_iter), f64)
    return u_next, v_next, grad


def conv_bilinear_gradient(u: torch.Tensor, v: torch.Tensor, weight_shape, geometry) -> torch.Tensor:
    """G_l = ∂⟨v_l, A_l u_l⟩/∂W_l, (L, *weight_shape), float64 accumulation."""
    grad = _cpu_empty((u.shape[0], *weight_shape), u.dtype)
    shape, (u_ptr, v_ptr) = _conv_tensors(grad, u, v, geometry)
    _cpu.conv_bilinear_gradient(u_ptr, v_ptr, grad.data_ptr(), *shape, int(u.dtype == torch.float64))
    return grad
