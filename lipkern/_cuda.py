"""Guarded access to the compiled extension ``lipkern._C`` and Python-side validation of its launchers.

The launchers take raw device pointers, so every shape, dtype, device and contiguity check happens here,
before the call; a non-zero return code becomes a ``RuntimeError`` naming the CUDA error.
"""

from __future__ import annotations

import functools

import torch

try:
    from lipkern import _C
except ImportError as _error:  # built without nvcc, or LIPKERN_BUILD_CUDA=0
    _C = None
    _IMPORT_ERROR: ImportError | None = _error
else:
    _IMPORT_ERROR = None

_REINSTALL = 'LIPKERN_BUILD_CUDA=1 pip install --no-build-isolation -e "."'


def available() -> bool:
    return _C is not None


def missing_message() -> str:
    return (f"lipkern._C is not built ({_IMPORT_ERROR}); lipkern uses its Triton and PyTorch paths instead. "
            f"To build the CUDA kernels, install the CUDA toolkit (nvcc) and reinstall: {_REINSTALL}")


_MIN_CAPABILITY = (8, 0)  # the build carries sm_80 and sm_90 code (and compute_90 PTX for newer GPUs)


@functools.lru_cache(maxsize=None)
def unusable_reason(device_index: int) -> str | None:
    """Why the built kernels cannot run on this CUDA device (None when they can): the CUDA runtime linked
    into lipkern._C sees no device (a driver older than the nvcc that built it), or the GPU predates sm_80.
    Dispatch then falls back to Triton with one warning instead of failing in the kernel launch."""
    if _C is None:
        return missing_message()
    code, count = _C.cuda_device_count()
    if code != 0 or count <= device_index:
        return (f"lipkern._C's CUDA runtime cannot use device {device_index} ({_C.error_string(code)}); the "
                "driver may be older than the CUDA toolkit lipkern._C was built with")
    capability = torch.cuda.get_device_capability(device_index)
    if capability < _MIN_CAPABILITY:
        return f"lipkern._C is built for sm_80 and newer, device {device_index} is sm_{capability[0]}{capability[1]}"
    return None


def require():
    if _C is None:
        raise RuntimeError(missing_message())
    return _C


def _check(code: int, name: str) -> None:
    if code != 0:
        raise RuntimeError(f"lipkern._C.{name} failed with code {code}: {_C.error_string(code)}")


def _dtype_code(dtype: torch.dtype) -> int:
    codes = require().DTYPE_CODES
    name = str(dtype).removeprefix("torch.")
    if name not in codes:
        raise TypeError(f"lipkern._C supports {sorted(codes)}, got {dtype}")
    return codes[name]


def _expect_cuda_contiguous(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"lipkern._C: {name} must be on a CUDA device, got {t.device}")
    if t.device != device:
        raise ValueError(f"lipkern._C: {name} is on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"lipkern._C: {name} must be contiguous")


_POWER_ITERATION_REAL = {torch.float32: torch.float32, torch.float64: torch.float64,
                         torch.complex64: torch.float32, torch.complex128: torch.float64}


def batched_power_iteration_fits(rows: int, cols: int, dtype: torch.dtype) -> bool:
    """Whether :func:`batched_power_iteration` takes (·, rows, cols) matrices of ``dtype``: one thread block
    holds u, w and z in shared memory, ``(2 * cols + rows) * element_size`` bytes, at most
    ``lipkern._C.BATCHED_POWER_ITERATION_MAX_SHARED_BYTES`` (48 KiB less 256). False for other dtypes and
    negative sizes; True for empty matrices (handled without a launch)."""
    lib = require()
    if dtype not in _POWER_ITERATION_REAL or rows < 0 or cols < 0:
        return False
    if rows == 0 or cols == 0:
        return True
    return bool(lib.batched_power_iteration_fits(rows, cols, _dtype_code(_POWER_ITERATION_REAL[dtype]),
                                                 int(dtype.is_complex)))


def batched_power_iteration(matrices: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor,
                            n_iter: int) -> None:
    """Run ``n_iter`` power iterations on every matrix of a (B, m, n) stack, in place.

    For each b, n_iter times: ``w = M u``, ``ss = ‖w‖²``, ``z = Mᴴ w``, ``nz = ‖z‖``,
    ``sigma = nz / sqrt(ss)`` (0 if ss == 0), ``v = w / sqrt(ss)`` (w if ss == 0), ``u = z / nz`` (the old u
    if nz == 0). matrices: (B, m, n) float32, float64, complex64 or complex128; u: (B, n), read then
    overwritten; v: (B, m), written; sigma: (B,), the matching real dtype, written. All contiguous, on one
    CUDA device. Accumulates in the storage precision.
    """
    name = "lipkern._C.batched_power_iteration"
    if isinstance(n_iter, bool) or not isinstance(n_iter, int):
        raise TypeError(f"{name}: n_iter must be an int, got {type(n_iter).__name__}")
    if n_iter < 1:
        raise ValueError(f"{name}: n_iter must be >= 1, got {n_iter}")
    if matrices.dim() != 3:
        raise ValueError(f"{name}: matrices must be (B, m, n), got shape {tuple(matrices.shape)}")
    batch, rows, cols = matrices.shape
    for arg, t, shape in (("u", u, (batch, cols)), ("v", v, (batch, rows)), ("sigma", sigma, (batch,))):
        if t.shape != shape:
            raise ValueError(f"{name}: {arg} must have shape {shape}, got {tuple(t.shape)}")
    if matrices.dtype not in _POWER_ITERATION_REAL:
        raise TypeError(f"{name}: matrices must be float32, float64, complex64 or complex128, "
                        f"got {matrices.dtype}")
    if u.dtype != matrices.dtype or v.dtype != matrices.dtype:
        raise TypeError(f"{name}: u and v must have the dtype of matrices ({matrices.dtype}), "
                        f"got {u.dtype} and {v.dtype}")
    real = _POWER_ITERATION_REAL[matrices.dtype]
    if sigma.dtype != real:
        raise TypeError(f"{name}: sigma must be {real} for {matrices.dtype} matrices, got {sigma.dtype}")
    for arg, t in (("matrices", matrices), ("u", u), ("v", v), ("sigma", sigma)):
        if not t.is_contiguous():
            raise ValueError(f"{name}: {arg} must be contiguous")
        if t.is_conj() or t.is_neg():
            raise ValueError(f"{name}: {arg} has a lazy conjugate/negative bit; call .resolve_conj() and "
                             f".resolve_neg() first")
    lib = require()
    if not batched_power_iteration_fits(rows, cols, matrices.dtype):
        raise ValueError(f"{name}: a {rows}x{cols} {matrices.dtype} matrix does not fit in one thread "
                         f"block's shared memory ((2 * n + m) * element size = "
                         f"{(2 * cols + rows) * matrices.element_size()} bytes > "
                         f"{lib.BATCHED_POWER_ITERATION_MAX_SHARED_BYTES}); use the Triton or PyTorch path")
    device = matrices.device
    for arg, t in (("matrices", matrices), ("u", u), ("v", v), ("sigma", sigma)):
        _expect_cuda_contiguous(arg, t, device)
    if batch == 0:
        return
    if rows == 0 or cols == 0:  # w = 0 and z = 0: sigma = 0, v = w = 0, u kept
        sigma.zero_()
        v.zero_()
        return
    stream = torch.cuda.current_stream(device).cuda_stream
    with torch.cuda.device(device):
        code = lib.batched_power_iteration(matrices.data_ptr(), u.data_ptr(), v.data_ptr(), sigma.data_ptr(),
                                           batch, rows, cols, n_iter, _dtype_code(real),
                                           int(matrices.is_complex()), stream)
    _check(code, "batched_power_iteration")
