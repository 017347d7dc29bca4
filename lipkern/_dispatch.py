"""The one place that decides which implementation of an op runs.

Backends, in order of preference:
- ``cuda``: the compiled ``lipkern._C`` kernel, when it is built and the tensor is on a CUDA device;
- ``triton``: when the tensor is on a CUDA device, or when ``TRITON_INTERPRET=1`` (CPU tests run the real kernels);
- ``torch``: the plain PyTorch reference, everywhere else.
``LIPKERN_BACKEND=cuda|triton|torch`` forces one; forcing one that cannot run raises ``BackendUnavailableError``.

Settings: the environment is read once, at import, into a :class:`Config` (``config()``). Ops read the config
where they run (inside the custom op under ``torch.compile``, so a compiled graph follows a later change).
``configure(**changes)`` changes it for the process (a context manager restores it), ``reload_config()`` reads
the environment again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings

import torch
from torch.utils import _python_dispatch

BACKENDS = ("cuda", "triton", "torch")
AOL_GRAM_SCHEMES = ("auto", "fp64", "fp32", "tf32x3")


class BackendUnavailableError(RuntimeError):
    """LIPKERN_BACKEND asked for a backend that cannot run this call."""


@dataclasses.dataclass(frozen=True)
class Config:
    """The settings lipkern reads from the environment (README, "Environment variables").

    backend: ``LIPKERN_BACKEND`` (None = auto); aol_gram: ``LIPKERN_AOL_GRAM``; check_finite:
    ``LIPKERN_CHECK_FINITE`` != 0; cpu_kernels: ``LIPKERN_CPU_KERNELS`` != 0 (the C++ CPU kernels of
    ``lipkern._cpu`` where built; off: the PyTorch paths); triton_interpret: ``TRITON_INTERPRET`` == 1 (Triton reads it when the
    kernels are defined, at import, too); onednn_fpmath: ``ONEDNN_DEFAULT_FPMATH_MODE`` (or ``DNNL_…``), which
    oneDNN reads once at start-up."""

    backend: str | None = None
    aol_gram: str = "auto"
    check_finite: bool = True
    cpu_kernels: bool = True
    triton_interpret: bool = False
    onednn_fpmath: str = "strict"

    def __post_init__(self):
        if self.backend is not None and self.backend not in BACKENDS:
            raise BackendUnavailableError(f"LIPKERN_BACKEND must be one of {BACKENDS} or auto, "
                                          f"got {self.backend!r}")
        if self.aol_gram not in AOL_GRAM_SCHEMES:
            raise ValueError(f"LIPKERN_AOL_GRAM must be one of {AOL_GRAM_SCHEMES}, got {self.aol_gram!r}")

    @classmethod
    def from_env(cls, environ=None) -> Config:
        env = os.environ if environ is None else environ
        backend = env.get("LIPKERN_BACKEND", "").strip().lower()
        fpmath = env.get("ONEDNN_DEFAULT_FPMATH_MODE", env.get("DNNL_DEFAULT_FPMATH_MODE", "strict"))
        return cls(backend=None if backend in ("", "auto") else backend,
                   aol_gram=env.get("LIPKERN_AOL_GRAM", "auto").strip().lower() or "auto",
                   check_finite=env.get("LIPKERN_CHECK_FINITE", "1").strip() != "0",
                   cpu_kernels=env.get("LIPKERN_CPU_KERNELS", "1").strip() != "0",
                   triton_interpret=env.get("TRITON_INTERPRET", "0").strip() == "1",
                   onednn_fpmath=fpmath.strip().lower() or "strict")


def _initial_config() -> Config | Exception:
    try:
        return Config.from_env()
    except (ValueError, BackendUnavailableError) as error:  # a bad setting: raised where it is used, not at import
        return error


_CONFIG: Config | Exception = _initial_config()


def config() -> Config:
    """The settings in force (raises the error of a bad environment value here, not at import)."""
    if isinstance(_CONFIG, Exception):
        raise _CONFIG
    return _CONFIG


class configure:
    """Change settings (``Config`` fields) for the process: ``configure(backend="torch")``; as a context
    manager (``with configure(...):``) the previous settings come back at the end."""

    def __init__(self, **changes):
        global _CONFIG
        self._previous = _CONFIG
        base = _CONFIG if isinstance(_CONFIG, Config) else Config()
        _CONFIG = dataclasses.replace(base, **changes)

    def __enter__(self):
        return _CONFIG

    def __exit__(self, *exc):
        global _CONFIG
        _CONFIG = self._previous
        return False


def reload_config() -> Config:
    """Read the environment again (after changing ``os.environ`` in a running process). A bad value raises
    here and leaves the settings as they were."""
    global _CONFIG
    _CONFIG = Config.from_env()
    return _CONFIG


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    return config().triton_interpret


def _unavailable_reason(backend: str, tensor: torch.Tensor, has_cuda_kernel: bool,
                        triton_reason: str | None) -> str | None:
    if backend == "torch":
        return None
    if backend == "triton":
        if not triton_importable():
            return "triton is not installed (pip install triton)"
        if tensor.device.type != "cuda" and not triton_interpreting():
            return f"tensor is on {tensor.device} and TRITON_INTERPRET is not 1"
        if tensor.is_meta:
            return "tensor is on the meta device (shapes only: the reference runs)"
        return triton_reason
    if not has_cuda_kernel:
        return "this op has no lipkern._C kernel for this call"
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
    return config().backend


def select_backend(tensor: torch.Tensor, *, has_cuda_kernel: bool = False, triton_reason: str | None = None,
                   prefer_triton: bool = False) -> str:
    """Return the backend that runs an op whose main input is ``tensor``.

    The op says what it has for this call: ``has_cuda_kernel`` (a ``lipkern._C`` kernel that fits it),
    ``triton_reason`` (why its Triton kernels cannot take it, None when they can) and ``prefer_triton`` (its
    size model says its Triton kernels beat the CUDA kernel here; auto mode only)."""
    settings = config()
    forced = settings.backend
    if forced is None and tensor.device.type == "cpu" and not settings.triton_interpret:
        return "torch"  # what the loop below finds: no CUDA kernel and no Triton without the interpreter
    if forced is not None:
        reason = _unavailable_reason(forced, tensor, has_cuda_kernel, triton_reason)
        if reason is not None:
            raise BackendUnavailableError(f"LIPKERN_BACKEND={forced} cannot run here: {reason}")
        return forced
    if prefer_triton and _unavailable_reason("triton", tensor, False, triton_reason) is None:
        return "triton"
    for backend in BACKENDS:
        reason = _unavailable_reason(backend, tensor, has_cuda_kernel, triton_reason)
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
    read anyway: in eval mode (when a spectral/CPL norm or an AOL rescaled weight is cached, once per weight;
    an uncached AOL eval forward too) and in ``to_vanilla``. LIPKERN_CHECK_FINITE=0 skips it."""
    if config().check_finite and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{op_name}: the weight contains NaN or Inf (a diverged training run? lower the "
                         "learning rate or resume from an earlier checkpoint)")


def device_context(tensor: torch.Tensor):
    """Triton launches go to the current CUDA device: make it the tensor's (multi-GPU safe)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def tracing() -> bool:
    """True under ``torch.compile`` tracing, a FakeTensorMode or make_fx's proxy mode (export, shape
    propagation): the ops must then be their ``torch.library`` custom ops (kernels cannot run on fake or proxy
    tensors). Other dispatch modes (FlopCounterMode, op counters) see the implementation's aten ops."""
    if torch.compiler.is_compiling():
        return True
    if not torch._C._len_torch_dispatch_stack():  # (one C call: the common case, no mode active)
        return False
    modes = _python_dispatch._get_current_dispatch_mode_stack()
    if not modes:
        return False
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode

    return any(isinstance(mode, (FakeTensorMode, ProxyTorchDispatchMode)) for mode in modes)


def autocast_off(tensor: torch.Tensor):
    """A context with autocast disabled on ``tensor``'s device where it is enabled (custom ops see autocast
    too), else a no-op context."""
    device = tensor.device.type
    if device != "meta" and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()
