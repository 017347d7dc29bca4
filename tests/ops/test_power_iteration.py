"""lipkern.ops.batched_power_iteration: Triton kernel (interpreter) vs the float64 reference, convergence to the
SVD norm, in-place vector updates, op boundary, bad input."""

import importlib

import pytest
import torch

from lipkern.ops import batched_power_iteration
from lipkern.ops.power_iteration import batched_power_iteration_ref, initial_vectors
from lipkern._dispatch import implementations
from tests.helpers import CPU_KERNELS, assert_close

DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]
SHAPES = [(3, 1, 1), (2, 3, 127), (2, 127, 3), (5, 17, 33), (1, 64, 64)]


def _wide(dtype):
    return torch.complex128 if dtype.is_complex else torch.float64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_float64_reference(dtype, shape):
    batch, rows, cols = shape
    m = torch.randn(shape, dtype=dtype)
    u0 = initial_vectors((batch, cols), dtype, "cpu")
    u, v = u0.clone(), torch.empty(batch, rows, dtype=dtype)
    sigma, u_out, v_out = batched_power_iteration(m, u, v, n_iter=5)
    assert u_out is u and v_out is v, "the given vectors are updated in place"
    ref = batched_power_iteration_ref(m.to(_wide(dtype)), u0.to(_wide(dtype)), 5)
    tol_dtype = torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32
    assert_close(sigma, ref.sigma, dtype=tol_dtype, msg="sigma")
    assert_close(_as_real(u), _as_real(ref.u), dtype=tol_dtype, msg="u")
    assert_close(_as_real(v), _as_real(ref.v), dtype=tol_dtype, msg="v")


def _as_real(x):
    return torch.view_as_real(x.to(torch.complex128)) if x.is_complex() else x


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=str)
def test_converges_to_svd_norm_from_below(dtype):
    m = torch.randn(6, 12, 9, dtype=dtype)
    exact = torch.linalg.matrix_norm(m, ord=2)
    sigma, u, v = batched_power_iteration(m, n_iter=400)
    assert (sigma <= exact * (1 + 1e-12)).all(), "an estimate from below"
    torch.testing.assert_close(sigma, exact, rtol=1e-7, atol=0)
    # consistency of the returned pair: sigma = ‖Mᴴ v‖ with ‖v‖ = ‖u‖ = 1
    torch.testing.assert_close(torch.linalg.vector_norm(v, dim=1), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.vector_norm(u, dim=1), torch.ones(6, dtype=torch.float64))


def test_every_iteration_is_below_the_norm():
    m = torch.randn(4, 10, 10, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(m, ord=2)
    u = None
    for _ in range(5):
        sigma, u, _ = batched_power_iteration(m, u, n_iter=1)
        assert (sigma <= exact * (1 + 1e-12)).all()


def test_zero_matrix_gives_zero_and_no_nan():
    m = torch.zeros(2, 4, 3, dtype=torch.float64)
    m[1, 0, 0] = 2.0
    sigma, u, v = batched_power_iteration(m, n_iter=3)
    assert torch.equal(sigma, torch.tensor([0.0, 2.0], dtype=torch.float64))
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    torch.testing.assert_close(torch.linalg.vector_norm(u[0]), torch.tensor(1.0, dtype=torch.float64))


def test_warm_start_continues_the_iteration():
    m = torch.randn(3, 8, 5, dtype=torch.float64)
    u0 = initial_vectors((3, 5), torch.float64, "cpu")
    u = u0.clone()
    batched_power_iteration(m, u, n_iter=3)
    sigma_two_calls, _, _ = batched_power_iteration(m, u, n_iter=4)
    sigma_one_call, _, _ = batched_power_iteration(m, u0.clone(), n_iter=7)
    assert_close(sigma_two_calls, sigma_one_call)


def test_initial_vectors_depend_only_on_shape():
    a = initial_vectors((2, 7), torch.float32, "cpu")
    torch.manual_seed(123)
    b = initial_vectors((2, 7), torch.float32, "cpu")
    assert torch.equal(a, b)
    assert not torch.equal(a, initial_vectors((2, 7), torch.float32, "cpu", key="other"))


def test_non_contiguous_vectors_are_updated():
    m = torch.randn(3, 6, 4, dtype=torch.float64)
    u_store = initial_vectors((4, 3), torch.float64, "cpu")
    u = u_store.T  # (3, 4), non-contiguous view
    ref = batched_power_iteration_ref(m, u.contiguous(), 2)
    batched_power_iteration(m, u, n_iter=2)
    assert_close(u_store.T, ref.u)


def test_opcheck():
    m = torch.randn(3, 5, 4, dtype=torch.float64)
    u = initial_vectors((3, 4), torch.float64, "cpu")
    v = torch.zeros(3, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.lipkern.batched_power_iteration.default, (m, u, v, 2))


def test_compile_fullgraph_mutates_buffers():
    m = torch.randn(2, 5, 4, dtype=torch.float64)
    u = initial_vectors((2, 4), torch.float64, "cpu")
    v = torch.zeros(2, 5, dtype=torch.float64)
    u_eager, v_eager = u.clone(), v.clone()

    def step(m, u, v):
        return batched_power_iteration(m, u, v, n_iter=2).sigma

    sigma = torch.compile(step, fullgraph=True, backend="aot_eager")(m, u, v)
    sigma_eager = step(m, u_eager, v_eager)
    assert_close(sigma, sigma_eager)
    assert_close(u, u_eager)
    assert_close(v, v_eager)


@pytest.mark.parametrize("bad, error", [
    (lambda: batched_power_iteration(torch.randn(3, 4)), ValueError),
    (lambda: batched_power_iteration(torch.randn(2, 3, 4, dtype=torch.float16)), TypeError),
    (lambda: batched_power_iteration(torch.ones(2, 3, 4, dtype=torch.int64)), TypeError),
    (lambda: batched_power_iteration(torch.randn(2, 3, 4), torch.randn(2, 3)), ValueError),
    (lambda: batched_power_iteration(torch.randn(2, 3, 4), torch.randn(2, 4, dtype=torch.float64)), ValueError),
    (lambda: batched_power_iteration(torch.randn(2, 3, 4), n_iter=0), ValueError),
    (lambda: batched_power_iteration(torch.randn(2, 0, 4)), ValueError),
])
def test_bad_input_raises(bad, error):
    with pytest.raises(error):
        bad()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_matrices_give_nan_not_an_error(value):
    """No value check (it would synchronize a training step): NaN/Inf give a NaN sigma, visibly."""
    m = torch.randn(2, 3, 4)
    m[1, 2, 0] = value
    sigma, u, v = batched_power_iteration(m)
    assert torch.isfinite(sigma[0]) and torch.isnan(sigma[1])
    assert torch.isnan(u[1]).all() and torch.isnan(v[1]).any()
    ref = batched_power_iteration_ref(m, initial_vectors((2, 4), torch.float32, "cpu"), 1)
    assert torch.isnan(ref.sigma[1]) and torch.isnan(ref.u[1]).all()


def test_autocast_does_not_reach_inside_the_op():
    m = torch.randn(2, 9, 7)
    u0 = initial_vectors((2, 7), torch.float32, "cpu")
    u = u0.clone()
    with torch.autocast("cpu", torch.bfloat16):
        sigma, _, _ = batched_power_iteration(m, u, n_iter=3)
    ref = batched_power_iteration_ref(m.double(), u0.double(), 3)
    assert_close(sigma, ref.sigma, dtype=torch.float32)
    assert_close(u, ref.u, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 37, 20), (3, 64, 16), (2, 5, 130)], ids=lambda s: "x".join(map(str, s)))
def test_split_rows_kernel_matches_float64_reference(dtype, shape, monkeypatch):
    """Large matrices run on many programs per matrix (split rows + a reduce launch); small ones forced here."""
    from lipkern.ops import power_iteration as pi

    monkeypatch.setattr(pi, "_SPLIT_MIN_ELEMENTS", 0)
    monkeypatch.setattr(pi, "_SPLIT_TARGET_PROGRAMS", 8)
    monkeypatch.setattr(pi, "_TILE", 64)
    batch, rows, cols = shape
    assert pi._split_rows(batch, rows, cols, pi._blocks(rows, cols)[0], False) > 0, "not on the split path"
    m = torch.randn(shape, dtype=dtype)
    m[0, 3] = 0.0
    u0 = initial_vectors((batch, cols), dtype, "cpu")
    u, v = u0.clone(), torch.empty(batch, rows, dtype=dtype)
    sigma, _, _ = batched_power_iteration(m, u, v, n_iter=3)
    ref = batched_power_iteration_ref(m.double(), u0.double(), 3)
    assert_close(sigma, ref.sigma, dtype=dtype, msg="sigma")
    assert_close(u, ref.u, dtype=dtype, msg="u")
    assert_close(v, ref.v, dtype=dtype, msg="v")


def test_split_rows_path_is_chosen_for_a_4096_square_matrix():
    from lipkern.ops import power_iteration as pi

    rows_per_program = pi._split_rows(1, 4096, 4096, pi._blocks(4096, 4096)[0], False)
    assert rows_per_program and 4096 // rows_per_program == pi._SPLIT_MAX_PROGRAMS
    assert pi._split_rows(1, 64, 64, pi._blocks(64, 64)[0], False) == 0
    assert pi._split_rows(1, 4096, 4096, 1, True) == 0, "complex stays on one program per matrix"


@pytest.mark.parametrize("cpu_kernels", CPU_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_path_matches_float64_reference(dtype, cpu_kernels, monkeypatch, knobs):
    """The PyTorch path (CPU tensors without the interpreter; columns beyond the Triton kernel's tile), and the
    C++ CPU kernel where its cost model takes the call (real matrices)."""
    knobs(backend="torch", cpu_kernels=cpu_kernels)
    implementations(clear=True)
    m = torch.randn(5, 17, 33, dtype=dtype)
    m[1] = 0  # a zero matrix: sigma 0, v zero, u kept
    u0 = initial_vectors((5, 33), dtype, "cpu")
    u, v = u0.clone(), torch.empty(5, 17, dtype=dtype)
    sigma, _, _ = batched_power_iteration(m, u, v, n_iter=5)
    ref = batched_power_iteration_ref(m.to(_wide(dtype)), u0.to(_wide(dtype)), 5)
    tol_dtype = torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32
    assert_close(sigma, ref.sigma, dtype=tol_dtype, msg="sigma")
    assert_close(_as_real(u), _as_real(ref.u), dtype=tol_dtype, msg="u")
    assert_close(_as_real(v), _as_real(ref.v), dtype=tol_dtype, msg="v")
    assert sigma[1] == 0 and (v[1] == 0).all() and torch.equal(u[1], u0[1])
    ran = implementations()["batched_power_iteration"]
    assert (ran == "cpp") == (cpu_kernels and not dtype.is_complex), ran


@pytest.mark.parametrize("cpu_kernels", CPU_KERNELS)
@pytest.mark.parametrize("scale", [1e-170, 1e170])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=str)
def test_torch_path_at_extreme_scales(dtype, scale, cpu_kernels, monkeypatch, knobs):
    """Matrices whose ‖M‖² under- or overflows: the PyTorch path and the C++ kernel scale each matrix by its
    largest entry."""
    knobs(backend="torch", cpu_kernels=cpu_kernels)
    m = torch.randn(2, 6, 5, dtype=dtype)
    exact = torch.linalg.matrix_norm(m, 2)
    result = batched_power_iteration(m * scale, n_iter=200)
    assert_close(result.sigma / scale, exact, dtype=torch.float32)
    assert_close(torch.linalg.vector_norm(result.v, dim=1), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("cpu_kernels", CPU_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_paths_give_nan_for_non_finite_matrices(dtype, cpu_kernels, knobs):
    """A NaN or Inf entry gives that matrix a NaN sigma (never a finite value), the others are unaffected."""
    knobs(backend="torch", cpu_kernels=cpu_kernels)
    m = torch.randn(3, 7, 6, dtype=dtype)
    m[0, 2, 3], m[1, 0, 0] = float("nan"), float("inf")
    u0 = initial_vectors((3, 6), dtype, "cpu")
    sigma, _, _ = batched_power_iteration(m, u0.clone(), n_iter=3)
    assert torch.isnan(sigma[:2]).all() and torch.isfinite(sigma[2])
    ref = batched_power_iteration_ref(m[2:].double(), u0[2:].double(), 3)
    assert_close(sigma[2:], ref.sigma, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_path_by_gram_squaring_matches_float64_reference(dtype, monkeypatch, knobs):
    """Many steps on small matrices: the CPU path reaches (MᴴM)^(n−1)u by repeated squaring (log2 n matrix
    products) and takes the last step as usual; same sigma, u and v as n steps of the reference; a zero matrix
    keeps u, a NaN matrix gives NaN."""
    from lipkern.ops.power_iteration import _squaring_pays

    knobs(backend="torch", cpu_kernels=False)  # (the C++ kernel takes these real matrices)
    m = torch.randn(6, 12, 10, dtype=dtype)
    m[1] = 0
    m[2, 0, 0] = float("nan")
    n_iter = 37
    assert _squaring_pays(m, n_iter)
    u0 = initial_vectors((6, 10), dtype, "cpu")
    u, v = u0.clone(), torch.empty(6, 12, dtype=dtype)
    sigma, _, _ = batched_power_iteration(m, u, v, n_iter=n_iter)
    ref = batched_power_iteration_ref(m.to(_wide(dtype)), u0.to(_wide(dtype)), n_iter)
    keep = [0, 3, 4, 5]
    tol_dtype = torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32
    assert_close(sigma[keep], ref.sigma[keep], dtype=tol_dtype, msg="sigma")
    assert_close(_as_real(u[keep]), _as_real(ref.u[keep]), dtype=tol_dtype, msg="u")
    assert_close(_as_real(v[keep]), _as_real(ref.v[keep]), dtype=tol_dtype, msg="v")
    assert sigma[1] == 0 and torch.equal(u[1], u0[1])
    assert torch.isnan(sigma[2])


# --- the layers' direct CPU step: one matrix, no op layers -----------------------------------------------------
_BUILT = pytest.mark.skipif(importlib.import_module("lipkern._cpu_kernels")._cpu is None,
                            reason="lipkern._cpu is not built")


@_BUILT
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape, fill", [((17, 33), None), ((1, 1), None), ((5, 3), 0.0), ((4, 6), float("nan"))])
def test_direct_cpu_step_is_the_ops_step_bit_for_bit(shape, fill, dtype, knobs):
    """cpu_power_rows (a training layer's step on the CPU) gives the very numbers of the op on weight[None],
    zero and NaN matrices included, in new tensors, from a transposed (non-contiguous) weight too, and leaves
    u alone."""
    from lipkern.ops.power_iteration import cpu_power_rows

    knobs(backend=None, triton_interpret=False, cpu_kernels=True)
    weight = torch.randn(shape[1], shape[0], dtype=dtype).T  # non-contiguous
    if fill is not None:
        weight = torch.full(shape, fill, dtype=dtype)
    u0 = initial_vectors((1, shape[1]), dtype, "cpu")[0]
    u = u0.clone()
    implementations(clear=True)
    u_next, v_next = cpu_power_rows(weight, u, 3)
    assert implementations()["batched_power_iteration"] == "cpp"
    assert torch.equal(u, u0)
    _, op_u, op_v = batched_power_iteration(weight[None].contiguous(), u0[None].clone(), n_iter=3)
    assert torch.allclose(u_next, op_u[0], rtol=0, atol=0, equal_nan=True)
    assert torch.allclose(v_next, op_v[0], rtol=0, atol=0, equal_nan=True)


@_BUILT
def test_direct_cpu_step_declines_what_its_kernel_does_not_take(knobs):
    """None (the layer then takes the op) for: the kernel off, the interpreter, complex or half matrices, a
    vector of another dtype, a matrix where the PyTorch path is cheaper, a torch.func transform."""
    from lipkern.ops.power_iteration import cpu_power_rows

    weight, u = torch.randn(8, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    knobs(backend=None, triton_interpret=False, cpu_kernels=True)
    assert cpu_power_rows(weight, u, 1) is not None
    assert cpu_power_rows(weight.float(), u, 1) is None
    assert cpu_power_rows(weight.to(torch.complex128), u.to(torch.complex128), 1) is None
    assert cpu_power_rows(weight.half(), u.half(), 1) is None
    assert cpu_power_rows(torch.randn(2048, 2048), torch.randn(2048), 50) is None
    seen = []
    torch.func.grad(lambda w: seen.append(cpu_power_rows(weight, u, 1)) or w.sum())(weight)
    assert seen == [None]
    knobs(triton_interpret=True)
    assert cpu_power_rows(weight, u, 1) is None
    knobs(triton_interpret=False, cpu_kernels=False)
    assert cpu_power_rows(weight, u, 1) is None
