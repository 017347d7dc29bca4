"""The one place that decides which implementation of an op runs.

Backends, in order of preference:
- ``cuda``: the compiled ``lipkern._C`` kernel, when it is built and the tensor is on a CUDA device;
- ``triton``: when the tensor is on a CUDA device, or when ``TRITON_INTERPRET=1`` (CPU tests run the real kernels);
- ``torch``: the plain PyTorch reference, everywhere else.
``LIPKERN_BACKEND=cuda|triton|torch`` forces one; forcing one that cannot run raises ``BackendUnavailableError``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
from torch.utils import _python_dispatch

BACKENDS = ("cuda", "triton", "torch")


class BackendUnavailableError(RuntimeError):
    """LIPKERN_BACKEND asked for a backend that cannot run this call."""


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unavailable_reason(backend: str, tensor: torch.Tensor, has_cuda_kernel: bool) -> str | None:
    if backend == "torch":
        return None
    if backend == "triton":
        if not triton_importable():
            return "triton is not installed (pip install triton)"
        if tensor.device.type != "cuda" and not triton_interpreting():
            return f"tensor is on {tensor.device} and TRITON_INTERPRET is not 1"
        if tensor.is_meta:
            return "tensor is on the meta device (shapes only: the reference runs)"
        return None
    if not has_cuda_kernel:
        return "this op has no lipkern._C kernel"
    if tensor.device.type != "cuda":
        return f"tensor is on {tensor.device}, not a CUDA device"
    from lipkern import _cuda

    if not _cuda.available():
        return _cuda.missing_message()
    return _cuda.unusable_reason(tensor.device.index if tensor.device.index is not None else
                                 torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(f"lipkern: {message}; using the Triton kernels instead", RuntimeWarning, stacklevel=3)


def requested_backend() -> str | None:
    value = os.environ.get("LIPKERN_BACKEND", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise BackendUnavailableError(f"LIPKERN_BACKEND must be one of {BACKENDS} or auto, got {value!r}")
    return value


def select_backend(tensor: torch.Tensor, *, has_cuda_kernel: bool) -> str:
    """Return the backend that runs an op whose main input is ``tensor``."""
    forced = requested_backend()
    if forced is not None:
        reason = _unavailable_reason(forced, tensor, has_cuda_kernel)
        if reason is not None:
            raise BackendUnavailableError(f"LIPKERN_BACKEND={forced} cannot run here: {reason}")
        return forced
    for backend in BACKENDS:
        reason = _unavailable_reason(backend, tensor, has_cuda_kernel)
        if reason is None:
            return backend
        if backend == "cuda" and has_cuda_kernel and tensor.is_cuda and cuda_built():
            _warn_once(reason)  # built but unusable on this device: say so once, then use Triton
    return "torch"


_IMPLEMENTATIONS: dict[str, str] = {}


def record_implementation(op: str, implementation: str) -> None:
    """Note which implementation (and precision scheme) an op ran last, for benchmarks and reports."""
    _IMPLEMENTATIONS[op] = implementation


def implementations(clear: bool = False) -> dict[str, str]:
    """The implementations recorded since the last ``clear``: {op: implementation}."""
    recorded = dict(_IMPLEMENTATIONS)
    if clear:
        _IMPLEMENTATIONS.clear()
    return recorded


def knobs() -> dict[str, str]:
    """The environment settings lipkern reads (LIPKERN_*, TRITON_INTERPRET) that are set, for the record."""
    return {k: v for k, v in os.environ.items() if k.startswith("LIPKERN_") or k == "TRITON_INTERPRET"}


def cuda_built() -> bool:
    from lipkern import _cuda

    return _cuda.available()


def check_finite(tensor: torch.Tensor, op_name: str) -> None:
    """Reject NaN/Inf with a clear ValueError, unless LIPKERN_CHECK_FINITE=0.

    It reads a value on the host (a device synchronization), so it is never called in a training step (no
    op calls it: a NaN/Inf weight there gives a NaN/Inf output, visibly). The layers call it where values are
    read anyway: when an eval-mode cache (a spectral/CPL norm, an AOL rescaled weight) is recomputed, once
    per weight version, which ``to_vanilla`` goes through too."""
    if os.environ.get("LIPKERN_CHECK_FINITE", "1") != "0" and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{op_name}: input contains NaN or Inf (LIPKERN_CHECK_FINITE=0 skips this check "
                         "and the device synchronization it costs)")


def device_context(tensor: torch.Tensor):
    """Triton launches go to the current CUDA device: make it the tensor's (multi-GPU safe)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def tracing() -> bool:
    """True under ``torch.compile`` tracing, a FakeTensorMode or make_fx's proxy mode (export, shape
    propagation): the ops must then be their ``torch.library`` custom ops (kernels cannot run on fake or proxy
    tensors). Other dispatch modes (FlopCounterMode, op counters) see the implementation's aten ops."""
    if torch.compiler.is_compiling():
        return True
    modes = _python_dispatch._get_current_dispatch_mode_stack()
    if not modes:
        return False
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode

    return any(isinstance(mode, (FakeTensorMode, ProxyTorchDispatchMode)) for mode in modes)


def direct_call() -> bool:
    """True where an op may run its implementation directly instead of through its custom op: eager calls,
    outside tracing (above) and functorch transforms. The custom op is the compile/export boundary; in eager
    mode it only adds Python dispatch (≈ 0.2 ms per call on a CPU)."""
    return not tracing() and torch._C._functorch.peek_interpreter_stack() is None


def call_op(direct, custom_op, like: torch.Tensor):
    """``direct()`` (the implementation, autocast off on ``like``'s device) where :func:`direct_call` allows,
    else ``custom_op()``; both under no_grad (the power iterations' mutating ops are not differentiable)."""
    with torch.no_grad():
        if direct_call():
            with autocast_off(like):
                return direct()
        return custom_op()


def autocast_off(tensor: torch.Tensor):
    """A context with autocast disabled on ``tensor``'s device where it is enabled (custom ops see autocast
    too), else a no-op context."""
    device = tensor.device.type
    if device != "meta" and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()
