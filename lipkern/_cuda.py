"""Guarded access to the compiled extension ``lipkern._C`` and Python-side validation of its launchers.

The launchers take raw device pointers, so every shape, dtype, device and contiguity check happens here,
before the call; a non-zero return code becomes a ``RuntimeError`` naming the CUDA error.
"""

from __future__ import annotations

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


def aol_scale_epilogue(partial: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, scale: torch.Tensor,
                       groups: int) -> None:
    """Write ``scale = sum(partial, 0) ** -0.5`` (0 where the sum is 0) and ``out = weight * scale``.

    partial: (n_slots, groups, in_per_group), float64 for float64 weights, else float32.
    weight, out: (out_channels, in_per_group, *kernel) contiguous, same dtype. scale: (groups, in_per_group).
    """
    lib = require()
    device = weight.device
    for name, t in (("partial", partial), ("weight", weight), ("out", out), ("scale", scale)):
        _expect_cuda_contiguous(name, t, device)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if partial.dtype != acc or scale.dtype != acc:
        raise TypeError(f"lipkern._C.aol_scale_epilogue: partial and scale must be {acc}")
    if out.shape != weight.shape or out.dtype != weight.dtype:
        raise ValueError("lipkern._C.aol_scale_epilogue: out must match weight in shape and dtype")
    if weight.dim() < 2 or weight.shape[0] % groups:
        raise ValueError(f"lipkern._C.aol_scale_epilogue: bad weight shape {tuple(weight.shape)} for {groups=}")
    in_per_group = weight.shape[1]
    kernel_numel = weight[0, 0].numel()
    if partial.dim() != 3 or partial.shape[1:] != (groups, in_per_group):
        raise ValueError(f"lipkern._C.aol_scale_epilogue: partial must be (n_slots, {groups}, {in_per_group})")
    if scale.shape != (groups, in_per_group):
        raise ValueError(f"lipkern._C.aol_scale_epilogue: scale must be ({groups}, {in_per_group})")
    stream = torch.cuda.current_stream(device).cuda_stream
    with torch.cuda.device(device):
        code = lib.aol_scale_epilogue(partial.data_ptr(), partial.shape[0], weight.data_ptr(), out.data_ptr(),
                                      scale.data_ptr(), groups, weight.shape[0] // groups, in_per_group,
                                      kernel_numel, _dtype_code(weight.dtype), stream)
    _check(code, "aol_scale_epilogue")
