"""lipkern._C.batched_power_iteration (csrc/power_iteration.cu), called directly through lipkern._cuda.

Compared with an independent float64 re-implementation of the semantics on CPU (below), for every dtype,
odd shapes, batch 1 and a batch above 65535, zero matrices and zero start vectors; plus convergence to
torch.linalg.matrix_norm(ord=2) on well-separated spectra.
"""

import pytest
import torch

from lipkern import _cuda

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda.available(), reason="lipkern._C is not built"),
]

DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]
DTYPE_IDS = ["f32", "f64", "c64", "c128"]
# (batch, rows, cols): 1x1, thin and wide, a square power of two, rows/cols around the warp (32) and block
# (256) sizes, and a big batch of small matrices (more blocks than 65535).
SHAPES = [
    (1, 1, 1),
    (3, 1, 1),
    (2, 3, 127),
    (2, 127, 3),
    (4, 64, 64),
    (1, 33, 31),
    (2, 31, 257),
    (2, 257, 33),
    (1, 5, 1000),
    (1, 1000, 5),
    (70000, 3, 5),
]
# Per-element tolerance (atol, rtol) of the kernel's result against the float64 reference.
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-12, 1e-10)}


def _real(dtype: torch.dtype) -> torch.dtype:
    return torch.empty((), dtype=dtype).real.dtype


def reference(matrices: torch.Tensor, u: torch.Tensor, n_iter: int, work: torch.dtype | None = None):
    """The semantics on CPU, in float64 (complex128) unless `work` says otherwise: (u, v, sigma) after n_iter
    iterations, sigma real."""
    work = work or (torch.complex128 if matrices.is_complex() else torch.float64)
    m = matrices.detach().cpu().to(work)
    u = u.detach().cpu().to(work)
    v = torch.zeros(m.shape[:2], dtype=work)
    sigma = torch.zeros(m.shape[0], dtype=_real(work))
    for _ in range(n_iter):
        w = (m @ u[:, :, None])[:, :, 0]
        ss = (w.real**2 + w.imag**2).sum(1) if w.is_complex() else (w * w).sum(1)
        z = (m.mH @ w[:, :, None])[:, :, 0]
        nz = ((z.real**2 + z.imag**2).sum(1) if z.is_complex() else (z * z).sum(1)).sqrt()
        positive = ss > 0
        norm_w = torch.where(positive, ss, torch.ones_like(ss)).sqrt()
        sigma = torch.where(positive, nz / norm_w, torch.zeros_like(nz))
        v = torch.where(positive[:, None], w / norm_w[:, None], w)
        u = torch.where((nz > 0)[:, None], z / torch.where(nz > 0, nz, torch.ones_like(nz))[:, None], u)
    return u, v, sigma


def run_kernel(matrices: torch.Tensor, u0: torch.Tensor, n_iter: int):
    """Launch on CUDA copies; returns (u, v, sigma) on the GPU. v and sigma start as NaN."""
    m = matrices.cuda()
    u = u0.cuda().clone()
    v = torch.full(m.shape[:2], float("nan"), dtype=m.dtype, device="cuda")
    sigma = torch.full(m.shape[:1], float("nan"), dtype=_real(m.dtype), device="cuda")
    _cuda.batched_power_iteration(m, u, v, sigma, n_iter)
    torch.cuda.synchronize()
    return u, v, sigma


def _as_real64(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return (torch.view_as_real(t) if t.is_complex() else t).double()


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                   same_dtype: torch.Tensor | None = None) -> None:
    """|actual - expected| <= atol + rtol |expected| elementwise, expected from the float64 reference.

    Power iteration started near a lower singular vector escapes from it exponentially, and so do rounding
    errors: any float32 implementation is then far from float64. `same_dtype` (the reference run in the
    storage dtype) measures that conditioning; each matrix may also be off by 10x its largest error."""
    a, e = _as_real64(actual), _as_real64(expected)
    assert not a.isnan().any(), f"{what} ({dtype}): NaN in the result"
    atol, rtol = TOLERANCES[_real(dtype)]
    allowed = atol + rtol * e.abs()
    if same_dtype is not None:
        slack = (_as_real64(same_dtype) - e).abs().reshape(e.shape[0], -1).amax(1)
        allowed = allowed + 10 * slack.reshape(-1, *[1] * (e.dim() - 1))
    excess = (a - e).abs() - allowed
    worst = excess.argmax()
    assert excess.max() <= 0, (
        f"{what} ({dtype}): {(excess > 0).sum().item()} elements off; worst at flat index {worst.item()}: "
        f"{a.flatten()[worst].item()!r} vs reference {e.flatten()[worst].item()!r}, "
        f"allowed difference {allowed.flatten()[worst].item():.3g}")


def assert_matches_reference(result, matrices: torch.Tensor, u0: torch.Tensor, n_iter: int) -> None:
    u, v, sigma = result
    expected = reference(matrices, u0, n_iter)
    low_precision = _real(matrices.dtype) != torch.float64
    same = reference(matrices, u0, n_iter, work=matrices.dtype) if low_precision else (None,) * 3
    for name, actual, exp, low in zip(("u", "v", "sigma"), (u, v, sigma), expected, same):
        assert_matches(actual, exp, matrices.dtype, name, same_dtype=low)


def random_stack(batch, rows, cols, dtype, generator):
    m = torch.randn(batch, rows, cols, dtype=torch.float64, generator=generator)
    u = torch.randn(batch, cols, dtype=torch.float64, generator=generator)
    if dtype.is_complex:
        m = torch.complex(m, torch.randn(batch, rows, cols, dtype=torch.float64, generator=generator))
        u = torch.complex(u, torch.randn(batch, cols, dtype=torch.float64, generator=generator))
    return m.to(dtype), u.to(dtype)


@pytest.mark.parametrize("n_iter", [1, 3, 10])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_float64_reference(dtype, shape, n_iter):
    g = torch.Generator().manual_seed(hash((shape, n_iter)) % 2**31)
    matrices, u0 = random_stack(*shape, dtype, g)
    assert_matches_reference(run_kernel(matrices, u0, n_iter), matrices, u0, n_iter)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_zero_matrices_and_zero_vectors_give_zero_sigma_without_nan(dtype):
    g = torch.Generator().manual_seed(1)
    matrices, u0 = random_stack(4, 5, 7, dtype, g)
    matrices[1] = 0  # zero matrix: w = 0, z = 0
    u0[2] = 0  # zero start vector: w = 0, z = 0
    matrices[3, :, 0] = 0  # M u = 0 for u = e_0 ...
    u0[3] = 0
    u0[3, 0] = 1  # ... so matrix 3 behaves like a zero matrix too
    u, v, sigma = run_kernel(matrices, u0, 5)
    for b in (1, 2, 3):
        assert sigma[b].item() == 0
        assert (v[b] == 0).all()
        assert torch.equal(u[b].cpu(), u0[b])  # the old u is kept when z == 0
    assert_matches_reference((u, v, sigma), matrices, u0, 5)


def _with_spectrum(batch, rows, cols, dtype, singular_values, generator):
    """matrices = U diag(s) V^H with random orthonormal U, V: known 2-norm s[0]."""
    k = min(rows, cols)
    complex_ = dtype.is_complex
    work = torch.complex128 if complex_ else torch.float64

    def orthonormal(n):
        a = torch.randn(batch, n, k, dtype=torch.float64, generator=generator)
        if complex_:
            a = torch.complex(a, torch.randn(batch, n, k, dtype=torch.float64, generator=generator))
        return torch.linalg.qr(a)[0]

    s = torch.as_tensor(singular_values[:k], dtype=torch.float64).to(work)
    return (orthonormal(rows) * s) @ orthonormal(cols).mH


@pytest.mark.parametrize("shape", [(3, 1, 1), (4, 8, 8), (2, 64, 64), (2, 40, 130), (2, 130, 40)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_converges_to_the_spectral_norm(dtype, shape):
    g = torch.Generator().manual_seed(7)
    batch, rows, cols = shape
    k = min(rows, cols)
    spectrum = [3.0 * 0.8**i for i in range(k)]  # ratio 0.8 per iteration: 500 iterations are plenty
    matrices = _with_spectrum(batch, rows, cols, dtype, spectrum, g).to(dtype)
    u0 = random_stack(batch, 1, cols, dtype, g)[1]
    u, v, sigma = run_kernel(matrices, u0, 500)
    expected = torch.linalg.matrix_norm(matrices.to(torch.complex128 if dtype.is_complex else torch.float64),
                                        ord=2)
    rtol = 1e-5 if _real(dtype) == torch.float32 else 1e-12
    torch.testing.assert_close(sigma.cpu().double(), expected, rtol=rtol, atol=0)
    # Converged: M u = sigma v, and both vectors are unit.
    m = matrices.cuda()
    mu = (m @ u[:, :, None])[:, :, 0]
    tol = 1e-4 if _real(dtype) == torch.float32 else 1e-10
    torch.testing.assert_close(mu, sigma[:, None].to(mu.dtype) * v, rtol=tol, atol=tol * 3)
    for vec in (u, v):
        torch.testing.assert_close(torch.linalg.vector_norm(vec, dim=1).double().cpu(),
                                   torch.ones(batch, dtype=torch.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_largest_matrix_that_fits(dtype):
    """Shared memory exactly at the limit: u, w and z use all of it (out-of-bounds would show here)."""
    limit = _cuda.require().BATCHED_POWER_ITERATION_MAX_SHARED_BYTES
    elem = torch.empty((), dtype=dtype).element_size()
    rows = limit // elem - 2 * 9  # cols = 9: (2 * 9 + rows) * elem == limit
    assert _cuda.batched_power_iteration_fits(rows, 9, dtype)
    assert not _cuda.batched_power_iteration_fits(rows + 1, 9, dtype)
    g = torch.Generator().manual_seed(3)
    matrices, u0 = random_stack(2, rows, 9, dtype, g)
    assert_matches_reference(run_kernel(matrices, u0, 4), matrices, u0, 4)


def test_runs_on_the_current_stream_and_touches_nothing_else():
    g = torch.Generator().manual_seed(5)
    matrices, u0 = random_stack(8, 17, 23, torch.float32, g)
    m = matrices.cuda()
    guard = torch.full((3, 8 * 23 + 64), 7.0, device="cuda")  # u lives inside guard[1] with margins
    u = guard[1, 32:32 + 8 * 23].view(8, 23)
    u.copy_(u0)
    v = torch.empty(8, 17, device="cuda")
    sigma = torch.empty(8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _cuda.batched_power_iteration(m, u, v, sigma, 6)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert_matches_reference((u, v, sigma), matrices, u0, 6)
    assert (guard[0] == 7).all() and (guard[2] == 7).all()
    assert (guard[1, :32] == 7).all() and (guard[1, 32 + 8 * 23:] == 7).all()
    assert (m.cpu() == matrices).all()  # matrices are read only


def test_empty_inputs_launch_nothing():
    for rows, cols in ((0, 4), (4, 0)):
        m = torch.zeros(3, rows, cols, device="cuda")
        u = torch.ones(3, cols, device="cuda")
        v = torch.full((3, rows), float("nan"), device="cuda")
        sigma = torch.full((3,), float("nan"), device="cuda")
        _cuda.batched_power_iteration(m, u, v, sigma, 2)
        assert (sigma == 0).all() and (u == 1).all() and not v.isnan().any()
    m = torch.zeros(0, 3, 4, device="cuda")
    _cuda.batched_power_iteration(m, torch.zeros(0, 4, device="cuda"), torch.zeros(0, 3, device="cuda"),
                                  torch.zeros(0, device="cuda"), 2)


def test_rejects_mixed_devices_and_oversized_matrices():
    m = torch.randn(2, 3, 4, device="cuda")
    with pytest.raises(ValueError, match="CUDA device"):
        _cuda.batched_power_iteration(m, torch.randn(2, 4), torch.empty(2, 3, device="cuda"),
                                      torch.empty(2, device="cuda"), 1)
    big = torch.randn(1, 2, 7000, device="cuda")
    with pytest.raises(ValueError, match="shared memory"):
        _cuda.batched_power_iteration(big, torch.randn(1, 7000, device="cuda"),
                                      torch.empty(1, 2, device="cuda"), torch.empty(1, device="cuda"), 1)
