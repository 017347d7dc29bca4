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
    for name in ("batched_power_iteration", "cuda_device_count", "error_string"):
        assert callable(getattr(lib, name))
    assert set(lib.DTYPE_CODES) == {"float32", "float64", "float16", "bfloat16"}


@needs_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_launcher_without_gpu_returns_cuda_error_and_wrapper_raises():
    lib = _cuda.require()
    code, count = lib.cuda_device_count()
    assert code != 0 or count == 0
    # Raw launcher, fake pointers: it must refuse before touching memory and name the CUDA error.
    code = lib.batched_power_iteration(16, 16, 16, 16, 1, 2, 2, 1, 0, 0, 0)
    assert code != 0
    assert "CUDA" in lib.error_string(code), lib.error_string(code)
    assert lib.batched_power_iteration(0, 16, 16, 16, 1, 2, 2, 1, 0, 0, 0) == 10001
    assert "null" in lib.error_string(10001)
    with pytest.raises(RuntimeError, match="batched_power_iteration failed"):
        _cuda._check(code, "batched_power_iteration")


def test_cpu_dispatch_prefers_triton_under_interpreter_else_torch(monkeypatch, knobs):
    t = torch.zeros(2)
    knobs(backend=None, triton_interpret=True)
    assert select_backend(t, has_cuda_kernel=True) == "triton"
    knobs(triton_interpret=False)
    assert select_backend(t, has_cuda_kernel=True) == "torch"


def test_forced_backend(monkeypatch, knobs):
    t = torch.zeros(2)
    knobs(backend="torch")
    assert select_backend(t, has_cuda_kernel=True) == "torch"
    knobs(backend="cuda")
    with pytest.raises(BackendUnavailableError, match="not a CUDA device"):
        select_backend(t, has_cuda_kernel=True)
    with pytest.raises(BackendUnavailableError, match="no lipkern._C kernel"):
        select_backend(t, has_cuda_kernel=False)
    with pytest.raises(BackendUnavailableError, match="must be one of"):
        knobs(backend="fast")
    knobs(backend="triton", triton_interpret=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        lipkern.ops.aol_rescale(torch.randn(3, 3))


def test_pure_torch_path_without_interpreter(monkeypatch, knobs):
    knobs(backend=None, triton_interpret=False)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(lipkern.ops.aol_rescale(w), lipkern.ops.aol_rescale_ref(w))


@pytest.mark.gpu
def test_gpu_dispatch_uses_compiled_extension_when_built():
    t = torch.zeros(2, device="cuda")
    expected = "cuda" if _cuda.available() else "triton"
    assert select_backend(t, has_cuda_kernel=True) == expected


# --- batched power iteration launcher (csrc/power_iteration.cu) ------------------------------------------
@needs_extension
def test_power_iteration_launcher_and_fits_rule():
    lib = _cuda.require()
    assert callable(lib.batched_power_iteration) and callable(lib.batched_power_iteration_fits)
    limit = lib.BATCHED_POWER_ITERATION_MAX_SHARED_BYTES
    assert limit == 48 * 1024 - 256
    # Shared memory of one block: (2 * cols + rows) * (2 if complex) * sizeof(scalar) bytes <= limit.
    for dtype_code, size in ((0, 4), (1, 8)):
        for is_complex in (0, 1):
            elem = size * (2 if is_complex else 1)
            rows = limit // elem - 2  # with cols = 1: exactly at the limit
            assert lib.batched_power_iteration_fits(rows, 1, dtype_code, is_complex)
            assert not lib.batched_power_iteration_fits(rows + 1, 1, dtype_code, is_complex)
            cols = (limit // elem - 1) // 2  # with rows = 1: the largest that fits
            assert lib.batched_power_iteration_fits(1, cols, dtype_code, is_complex)
            assert not lib.batched_power_iteration_fits(1, cols + 1, dtype_code, is_complex)
    assert lib.batched_power_iteration_fits(64, 64, 1, 1)
    assert not lib.batched_power_iteration_fits(2**62, 2**62, 0, 0)  # no overflow
    assert not lib.batched_power_iteration_fits(0, 4, 0, 0)
    assert not lib.batched_power_iteration_fits(4, 0, 0, 0)
    assert not lib.batched_power_iteration_fits(4, 4, 2, 0)  # float16: not supported
    assert _cuda.batched_power_iteration_fits(64, 64, torch.complex128)
    assert not _cuda.batched_power_iteration_fits(1, 10000, torch.float32)
    assert not _cuda.batched_power_iteration_fits(4, 4, torch.float16)
    assert _cuda.batched_power_iteration_fits(0, 10**9, torch.float32)  # empty: no launch needed


@needs_extension
def test_power_iteration_launcher_checks_arguments_before_the_device():
    lib = _cuda.require()
    # Fake but non-null pointers: every call below must return before launching anything.
    good = {"matrices": 16, "u": 16, "v": 16, "sigma": 16, "batch": 2, "rows": 3, "cols": 4, "n_iter": 5,
            "dtype": 0, "is_complex": 0, "stream": 0}

    def call(**changes):
        return lib.batched_power_iteration(**{**good, **changes})

    for pointer in ("matrices", "u", "v", "sigma"):
        assert call(**{pointer: 0}) == 10001, pointer
    for dtype in (2, 3, -1, 7):
        assert call(dtype=dtype) == 10003, dtype
        assert call(dtype=dtype, is_complex=1) == 10003, dtype
    for changes in ({"batch": -1}, {"batch": 2**31}, {"rows": 0}, {"cols": 0}, {"rows": -3},
                    {"n_iter": 0}, {"n_iter": -1}, {"rows": 1, "cols": 10000}, {"rows": 20000, "cols": 1}):
        assert call(**changes) == 10002, changes
    assert lib.batched_power_iteration_fits(1, 3000, 0, 0)  # fits as float32 (no call: fake pointers) ...
    assert call(rows=1, cols=3000, dtype=1, is_complex=1) == 10002  # ... not as complex128
    assert call(batch=0) == 0  # nothing to do: no launch, no device needed
    assert "null" in lib.error_string(10001)
    assert "dtype" in lib.error_string(10003)


@needs_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_power_iteration_launcher_without_gpu_returns_cuda_error():
    lib = _cuda.require()
    code = lib.batched_power_iteration(16, 16, 16, 16, 2, 3, 4, 5, 0, 0, 0)
    assert code not in (0, 10001, 10002, 10003)
    assert "CUDA" in lib.error_string(code), lib.error_string(code)
    m = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="CUDA device"):
        _cuda.batched_power_iteration(m, torch.randn(2, 4), torch.empty(2, 3), torch.empty(2), 3)


def _power_iteration_args(batch=2, rows=3, cols=4, dtype=torch.float32):
    real = torch.empty((), dtype=dtype).real.dtype
    return {"matrices": torch.randn(batch, rows, cols, dtype=dtype),
            "u": torch.randn(batch, cols, dtype=dtype), "v": torch.zeros(batch, rows, dtype=dtype),
            "sigma": torch.zeros(batch, dtype=real), "n_iter": 3}


@pytest.mark.parametrize("changes, error, match", [
    ({"n_iter": 0}, ValueError, "n_iter must be >= 1"),
    ({"n_iter": -2}, ValueError, "n_iter must be >= 1"),
    ({"n_iter": 2.0}, TypeError, "n_iter must be an int"),
    ({"n_iter": True}, TypeError, "n_iter must be an int"),
    ({"matrices": torch.randn(3, 4)}, ValueError, r"matrices must be \(B, m, n\)"),
    ({"u": torch.randn(2, 3)}, ValueError, r"u must have shape \(2, 4\)"),
    ({"u": torch.randn(4)}, ValueError, r"u must have shape \(2, 4\)"),
    ({"v": torch.zeros(2, 4)}, ValueError, r"v must have shape \(2, 3\)"),
    ({"sigma": torch.zeros(2, 1)}, ValueError, r"sigma must have shape \(2,\)"),
    ({"u": torch.randn(2, 4, dtype=torch.float64)}, TypeError, "u and v must have the dtype of matrices"),
    ({"v": torch.zeros(2, 3, dtype=torch.complex64)}, TypeError, "u and v must have the dtype of matrices"),
    ({"sigma": torch.zeros(2, dtype=torch.float64)}, TypeError, "sigma must be torch.float32"),
    ({"sigma": torch.zeros(2, dtype=torch.complex64)}, TypeError, "sigma must be torch.float32"),
    ({"matrices": torch.randn(2, 4, 3).transpose(1, 2)}, ValueError, "matrices must be contiguous"),
    ({"u": torch.randn(4, 2).T}, ValueError, "u must be contiguous"),
    ({"v": torch.zeros(2, 6)[:, ::2]}, ValueError, "v must be contiguous"),
    ({"sigma": torch.zeros(4)[::2]}, ValueError, "sigma must be contiguous"),
])
def test_power_iteration_wrapper_validates_before_the_device(changes, error, match):
    with pytest.raises(error, match=match):
        _cuda.batched_power_iteration(**{**_power_iteration_args(), **changes})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int32])
def test_power_iteration_wrapper_rejects_unsupported_dtypes(dtype):
    m = torch.ones(2, 3, 4, dtype=dtype)
    with pytest.raises(TypeError, match="matrices must be float32, float64, complex64 or complex128"):
        _cuda.batched_power_iteration(m, torch.ones(2, 4, dtype=dtype), torch.ones(2, 3, dtype=dtype),
                                      torch.ones(2, dtype=dtype), 1)


def test_power_iteration_wrapper_rejects_complex_dtype_mismatch_and_lazy_conjugate():
    args = _power_iteration_args(dtype=torch.complex64)
    with pytest.raises(TypeError, match="sigma must be torch.float32 for torch.complex64"):
        _cuda.batched_power_iteration(**{**args, "sigma": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError, match="u and v must have the dtype"):
        _cuda.batched_power_iteration(**{**args, "u": torch.randn(2, 4, dtype=torch.complex128)})
    with pytest.raises(ValueError, match="matrices has a lazy conjugate"):
        _cuda.batched_power_iteration(**{**args, "matrices": args["matrices"].conj()})


@needs_extension
def test_power_iteration_wrapper_rejects_matrices_too_large_for_shared_memory():
    args = _power_iteration_args(batch=1, rows=2, cols=7000)
    with pytest.raises(ValueError, match="does not fit in one thread block's shared memory"):
        _cuda.batched_power_iteration(**args)
    args = _power_iteration_args(batch=1, rows=2, cols=3000, dtype=torch.complex128)
    with pytest.raises(ValueError, match="shared memory"):
        _cuda.batched_power_iteration(**args)


@needs_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_unusable_device_reason_names_the_cause():
    """Without a usable CUDA runtime the compiled kernels are reported unusable (dispatch then warns once and
    uses Triton) instead of failing inside a launch."""
    _cuda.unusable_reason.cache_clear()
    reason = _cuda.unusable_reason(0)
    assert reason is not None and "cannot use device 0" in reason


@needs_extension
def test_old_gpu_is_reported_unusable(monkeypatch):
    _cuda.unusable_reason.cache_clear()
    monkeypatch.setattr(_cuda._C, "cuda_device_count", lambda: (0, 1), raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    try:
        assert "sm_75" in _cuda.unusable_reason(0)
    finally:
        _cuda.unusable_reason.cache_clear()


# --- lipkern._cpu: the C++ CPU kernels (optional build) ---------------------------------------------------------
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="no C++ compiler here: lipkern._cpu is optional")
def test_cpu_kernels_build_where_a_compiler_exists():
    """The build is optional (a failed compile installs the PyTorch paths), so a compile error would otherwise
    only show as skipped tests."""
    from lipkern import _cpu_kernels

    assert _cpu_kernels._cpu is not None, "lipkern._cpu did not build: see the pip install log"
    assert lipkern.cpu_kernels_available()
    with lipkern.configure(cpu_kernels=False):
        assert not lipkern.cpu_kernels_available()


@pytest.mark.skipif(lipkern._cpu_kernels._cpu is None, reason="lipkern._cpu is not built")
def test_cpu_kernel_wrappers_refuse_what_their_pointers_cannot_take():
    """Raw host pointers: a wrong shape, dtype, device or layout raises before the call."""
    from lipkern import _cpu_kernels

    m, u, v, s = torch.randn(2, 3, 4), torch.randn(2, 4), torch.empty(2, 3), torch.empty(2)
    _cpu_kernels.power_iteration(m, u, v, s, 1)
    for bad, match in (((m.transpose(1, 2).contiguous().transpose(1, 2), u, v, s), "contiguous"),
                       ((m, u[:, :3].contiguous(), v, s), "shape"), ((m, u.double(), v, s), "float32"),
                       ((m.to(torch.complex64), u, v, s), "real")):
        with pytest.raises(ValueError, match=match):
            _cpu_kernels.power_iteration(*bad, 1)
    w = torch.randn(1, 4, 3, 9)
    with pytest.raises(ValueError, match="entries"):
        _cpu_kernels.aol_forward(torch.randn(1, 27, 26), w, (1, 4, 3, 3, 3), (0.0,) * 9, False, False)
    with pytest.raises(ValueError, match="entries"):
        _cpu_kernels.aol_forward(torch.randn(1, 27, 27), w[:, :3], (1, 4, 3, 3, 3), (0.0,) * 9, False, False)
    with pytest.raises(ValueError, match="contiguous"):
        _cpu_kernels.aol_forward(torch.randn(1, 27, 27), w.transpose(1, 2), (1, 4, 3, 3, 3), (0.0,) * 9, False,
                                 False)


def test_sdist_manifest_carries_every_compiled_source():
    """A source distribution must carry csrc/ whole (the .cu files, the headers, the CPU kernels): setuptools
    adds only the listed extension sources by itself. MANIFEST.in's csrc patterns must match every file."""
    import fnmatch
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    patterns = []
    for line in (root / "MANIFEST.in").read_text().splitlines():
        words = line.split()
        if words[:2] == ["recursive-include", "csrc"]:
            patterns += words[2:]
    sources = [p for p in (root / "csrc").rglob("*") if p.is_file() and p.suffix in (".cu", ".cpp", ".h", ".cuh")]
    assert sources
    missing = [str(p.relative_to(root)) for p in sources if not any(fnmatch.fnmatch(p.name, q) for q in patterns)]
    assert not missing, missing
