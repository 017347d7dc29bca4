"""lipkern._C builds, links and imports where nvcc exists; dispatch and LIPKERN_BACKEND behave as documented."""

import shutil

import pytest
import torch

import lipkern
from lipkern import _cuda
from lipkern._dispatch import BackendUnavailableError, select_backend

needs_extension = pytest.mark.skipif(
    not _cuda.available() and shutil.which("nvcc") is None, reason="no nvcc here: lipkern._C is not expected")


@needs_extension
def test_extension_imports_and_exposes_launchers():
    assert _cuda.available(), _cuda.missing_message()
    lib = _cuda.require()
    for name in ("aol_scale_epilogue", "cuda_device_count", "error_string"):
        assert callable(getattr(lib, name))
    assert set(lib.DTYPE_CODES) == {"float32", "float64", "float16", "bfloat16"}


@needs_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_launcher_without_gpu_returns_cuda_error_and_wrapper_raises():
    lib = _cuda.require()
    code, count = lib.cuda_device_count()
    assert code != 0 or count == 0
    # Raw launcher, fake pointers: it must refuse before touching memory and name the CUDA error.
    code = lib.aol_scale_epilogue(16, 1, 16, 16, 16, 1, 1, 1, 1, 0, 0)
    assert code != 0
    assert "CUDA" in lib.error_string(code), lib.error_string(code)
    assert lib.aol_scale_epilogue(0, 1, 16, 16, 16, 1, 1, 1, 1, 0, 0) == 10001
    assert "null" in lib.error_string(10001)
    with pytest.raises(RuntimeError, match="aol_scale_epilogue failed"):
        _cuda._check(code, "aol_scale_epilogue")
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="CUDA device"):
        _cuda.aol_scale_epilogue(torch.zeros(1, 1, 3), w, torch.empty_like(w), torch.empty(1, 3), 1)


def test_cpu_dispatch_prefers_triton_under_interpreter_else_torch(monkeypatch):
    t = torch.zeros(2)
    monkeypatch.delenv("LIPKERN_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(t, has_cuda_kernel=True) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert select_backend(t, has_cuda_kernel=True) == "torch"


def test_forced_backend(monkeypatch):
    t = torch.zeros(2)
    monkeypatch.setenv("LIPKERN_BACKEND", "torch")
    assert select_backend(t, has_cuda_kernel=True) == "torch"
    monkeypatch.setenv("LIPKERN_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="not a CUDA device"):
        select_backend(t, has_cuda_kernel=True)
    with pytest.raises(BackendUnavailableError, match="no lipkern._C kernel"):
        select_backend(t, has_cuda_kernel=False)
    monkeypatch.setenv("LIPKERN_BACKEND", "fast")
    with pytest.raises(BackendUnavailableError, match="must be one of"):
        select_backend(t, has_cuda_kernel=True)
    monkeypatch.setenv("LIPKERN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        lipkern.ops.aol_rescale(torch.randn(3, 3))


def test_pure_torch_path_without_interpreter(monkeypatch):
    monkeypatch.delenv("LIPKERN_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(lipkern.ops.aol_rescale(w), lipkern.ops.aol_rescale_ref(w))


@pytest.mark.gpu
def test_gpu_dispatch_uses_compiled_extension_when_built():
    t = torch.zeros(2, device="cuda")
    expected = "cuda" if _cuda.available() else "triton"
    assert select_backend(t, has_cuda_kernel=True) == expected
