"""lipkern.ops.conv_power_iteration: the operator and its adjoint against PyTorch's dense conv matrix, the stacked
(one grouped conv for all layers) path against one layer at a time, convergence to the SVD norm, op boundary."""

import importlib

import pytest
import torch

from lipkern.ops import conv_power_iteration
from lipkern.ops.conv_power_iteration import (
    ConvGeometry,
    conv_adjoint,
    conv_bilinear,
    conv_operator,
    conv_power_iteration_ref,
    initial_conv_vectors,
)
from lipkern._dispatch import implementations
from tests.helpers import CPU_KERNELS, assert_close, dense_conv2d

# (in, out, kernel, input size, nn.Conv2d kwargs): zero and circular padding, 'same' with even kernels
# (asymmetric), stride 1-3, dilation, groups, padding wider than the kernel, rectangular inputs.
GEOMETRIES = [
    (3, 4, 3, 5, dict(padding=1)),
    (4, 6, 3, 6, dict(stride=2, padding=1, groups=2)),
    (2, 2, 2, 5, dict(padding="same", padding_mode="circular")),
    (2, 3, 4, 6, dict(padding="same")),
    (3, 5, 3, 7, dict(stride=2, padding=2, dilation=2, padding_mode="circular")),
    (4, 4, 3, 5, dict(stride=3, groups=4)),
    (2, 3, (1, 3), (4, 6), dict(stride=(1, 2), padding=(0, 1), padding_mode="circular")),
    (1, 1, 3, 4, dict(padding=3)),
    (3, 2, 3, 3, dict(padding=2, padding_mode="circular")),
]
IDS = [f"g{i}" for i in range(len(GEOMETRIES))]


def _setup(case, layers=1):
    c_in, c_out, k, n, kwargs = case
    k = (k, k) if isinstance(k, int) else k
    groups = kwargs.get("groups", 1)
    weights = torch.randn(layers, c_out, c_in // groups, *k, dtype=torch.float64)
    geometry = ConvGeometry.create(n, k, **{key: kwargs[key] for key in kwargs})
    return weights, geometry, kwargs


@pytest.mark.parametrize("case", GEOMETRIES, ids=IDS)
def test_operator_and_adjoint_are_the_dense_conv_matrix_and_its_transpose(case):
    weights, g, kwargs = _setup(case)
    w = weights[0]
    a = dense_conv2d(w, g.input_size, **kwargs)
    c_in = w.shape[1] * g.groups
    basis_in = torch.eye(a.shape[1], dtype=torch.float64).reshape(-1, c_in, *g.input_size)
    basis_out = torch.eye(a.shape[0], dtype=torch.float64).reshape(-1, w.shape[0], *g.output_size)
    assert_close(conv_operator(basis_in, w, g).reshape(a.shape[1], -1).T, a)
    assert_close(conv_adjoint(basis_out, w, g).reshape(a.shape[0], -1).T, a.T)


@pytest.mark.parametrize("gemm_on_cpu", [False, True], ids=["default-forms", "gemm-form-on-cpu"])
@pytest.mark.parametrize("case", GEOMETRIES, ids=IDS)
def test_stacked_layers_equal_one_layer_at_a_time(case, device, gemm_on_cpu, monkeypatch):
    """On CUDA the stacked operator of groups=1 layers is the GEMM form, on the CPU the grouped conv (forced to
    the GEMM form too: under the interpreter, the Triton path with the GEMM form)."""
    if gemm_on_cpu:
        monkeypatch.setattr(importlib.import_module("lipkern.ops.conv_power_iteration"), "_GEMM_DEVICES",
                            ("cpu", "cuda"))
    weights, g, kwargs = _setup(case, layers=4)
    u0 = initial_conv_vectors(4, weights.shape[2] * g.groups, g.input_size, torch.float64, "cpu")
    ref_sigma, ref_u, ref_v = conv_power_iteration_ref(weights, u0, 3, g)
    u = u0.to(device)
    sigma, _, v = conv_power_iteration(weights.to(device), u, None, 3, **kwargs)
    assert_close(sigma.cpu(), ref_sigma)
    assert_close(u.cpu(), ref_u)
    assert_close(v.cpu(), ref_v)


def _converged(weights, u, kwargs, chunk=50, max_iter=5000):
    """Iterate until sigma stops changing (1e-10 relative per chunk); the test then checks it against the SVD."""
    sigma_old, v = None, None
    for _ in range(max_iter // chunk):
        sigma, u, v = conv_power_iteration(weights, u, v, chunk, **kwargs)
        if sigma_old is not None and ((sigma - sigma_old).abs() <= 1e-10 * sigma).all():
            break
        sigma_old = sigma
    return sigma, u, v


@pytest.mark.parametrize("case", GEOMETRIES, ids=IDS)
def test_converges_to_the_svd_norm_from_below(case):
    weights, g, kwargs = _setup(case, layers=2)
    exact = torch.stack([torch.linalg.matrix_norm(dense_conv2d(w, g.input_size, **kwargs), ord=2) for w in weights])
    u = initial_conv_vectors(2, weights.shape[2] * g.groups, g.input_size, torch.float64, "cpu")
    sigma, u, v = _converged(weights, u, kwargs)
    assert (sigma <= exact * (1 + 1e-12)).all()
    torch.testing.assert_close(sigma, exact, rtol=1e-5, atol=0)
    # the differentiable estimate vᵀAu agrees with sigma at convergence
    torch.testing.assert_close(conv_bilinear(weights, u, v, g), exact, rtol=1e-5, atol=0)


def test_bilinear_gradient_is_the_spectral_norm_gradient():
    """At convergence ∂σ/∂W = ∂(vᵀA(W)u)/∂W: compare with autograd through the SVD of the dense operator."""
    weights, g, kwargs = _setup((2, 3, 3, 4, dict(padding=1)))
    u = initial_conv_vectors(1, 2, g.input_size, torch.float64, "cpu")
    _, u, v = _converged(weights, u, kwargs)
    w = weights.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(conv_bilinear(w, u, v, g).sum(), w)
    w_dense = weights[0].clone().requires_grad_(True)
    (grad_svd,) = torch.autograd.grad(torch.linalg.matrix_norm(dense_conv2d_differentiable(w_dense, g), ord=2),
                                      w_dense)
    torch.testing.assert_close(grad[0], grad_svd, rtol=1e-4, atol=1e-6)


def dense_conv2d_differentiable(w, g):
    basis = torch.eye(w.shape[1] * g.input_size[0] * g.input_size[1], dtype=torch.float64)
    out = torch.nn.functional.conv2d(basis.reshape(-1, w.shape[1], *g.input_size), w, padding=1)
    return out.reshape(basis.shape[0], -1).T


def test_vectors_are_updated_in_place_and_warm_start():
    weights, g, kwargs = _setup(GEOMETRIES[0], layers=2)
    u0 = initial_conv_vectors(2, 3, g.input_size, torch.float64, "cpu")
    u = u0.clone()
    v = torch.zeros(2, 4, *g.output_size, dtype=torch.float64)
    conv_power_iteration(weights, u, v, 2, **kwargs)
    assert not torch.equal(u, u0) and v.abs().sum() > 0
    sigma_warm, _, _ = conv_power_iteration(weights, u, v, 3, **kwargs)
    sigma_cold, _, _ = conv_power_iteration(weights, u0.clone(), None, 5, **kwargs)
    assert_close(sigma_warm, sigma_cold)


def test_opcheck():
    weights, g, _ = _setup(GEOMETRIES[1], layers=2)
    u = initial_conv_vectors(2, 4, g.input_size, torch.float64, "cpu")
    v = torch.zeros(2, 6, *g.output_size, dtype=torch.float64)
    torch.library.opcheck(torch.ops.lipkern.conv_power_iteration.default,
                          (weights, u, v, 2, [2, 2], [1, 1, 1, 1], [1, 1], 2, "zeros"))


def test_compile_fullgraph():
    weights, g, kwargs = _setup(GEOMETRIES[0], layers=2)
    u = initial_conv_vectors(2, 3, g.input_size, torch.float64, "cpu")
    v = torch.zeros(2, 4, *g.output_size, dtype=torch.float64)
    u_eager, v_eager = u.clone(), v.clone()

    def step(w, u, v):
        return conv_power_iteration(w, u, v, 2, padding=1)[0]

    sigma = torch.compile(step, fullgraph=True, backend="aot_eager")(weights, u, v)
    assert_close(sigma, step(weights, u_eager, v_eager))
    assert_close(u, u_eager)
    assert_close(v, v_eager)


def _u(shape=(1, 3, 5, 5), dtype=torch.float64):
    return torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("bad, error", [
    (lambda: conv_power_iteration(torch.randn(4, 3, 3, 3, dtype=torch.float64), _u()), ValueError),
    (lambda: conv_power_iteration(torch.randn(1, 4, 3, 3, 3, dtype=torch.float64), _u((1, 2, 5, 5))), ValueError),
    (lambda: conv_power_iteration(torch.randn(1, 4, 3, 3, 3), _u()), ValueError),
    (lambda: conv_power_iteration(torch.randn(1, 4, 3, 3, 3, dtype=torch.float16), _u(dtype=torch.float16)),
     TypeError),
    (lambda: conv_power_iteration(torch.randn(1, 4, 3, 3, 3, dtype=torch.float64), _u(), n_iter=0), ValueError),
    (lambda: conv_power_iteration(torch.randn(1, 4, 3, 3, 3, dtype=torch.float64), _u(), groups=2), ValueError),
    (lambda: conv_power_iteration(torch.randn(1, 4, 3, 3, 3, dtype=torch.float64), _u(),
                                  padding_mode="reflect"), ValueError),
    (lambda: conv_power_iteration(torch.randn(1, 4, 3, 7, 7, dtype=torch.float64), _u()), ValueError),
    (lambda: conv_power_iteration(torch.randn(1, 4, 3, 3, 3, dtype=torch.float64), _u(), stride=2,
                                  padding="same"), ValueError),
])
def test_bad_input_raises(bad, error):
    with pytest.raises(error):
        bad()


@pytest.mark.parametrize("n_iter", [1, 20], ids=["kernel", "long-run"])  # under the interpreter: both paths
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_give_nan_not_an_error(value, n_iter):
    """No value check (it would synchronize a training step): NaN/Inf weights give a NaN sigma and NaN
    vectors, visibly, instead of a plausible estimate."""
    weights = torch.randn(2, 4, 3, 3, 3, dtype=torch.float64)
    weights[1, 2, 0, 1, 1] = value
    u = _u((2, 3, 5, 5))
    sigma, u, v = conv_power_iteration(weights, u, None, n_iter, padding=1)
    assert torch.isfinite(sigma[0]) and torch.isnan(sigma[1])
    assert torch.isnan(u[1]).all() and torch.isnan(v[1]).all() and torch.isfinite(u[0]).all()


def test_autocast_does_not_reach_inside_the_op():
    """Under torch.autocast the iteration still runs in the weights' dtype (autocast enters custom ops)."""
    weights, g, kwargs = _setup(GEOMETRIES[0], layers=2)
    weights = weights.float()
    u0 = initial_conv_vectors(2, 3, g.input_size, torch.float32, "cpu")
    u = u0.clone()
    with torch.autocast("cpu", torch.bfloat16):
        sigma, _, v = conv_power_iteration(weights, u, None, 2, **kwargs)
    ref_sigma, ref_u, ref_v = conv_power_iteration_ref(weights.double(), u0.double(), 2, g)
    assert_close(sigma, ref_sigma, dtype=torch.float32)
    assert_close(u, ref_u, dtype=torch.float32)


@pytest.mark.parametrize("case", GEOMETRIES, ids=IDS)
def test_bilinear_gradient_of_stacked_layers(case):
    """G = ∂⟨v, A u⟩/∂W for all layers in one grouped weight-gradient conv; ⟨W, G⟩ = ⟨v, A u⟩."""
    from lipkern.ops.conv_power_iteration import conv_bilinear_gradient

    weights, g, _ = _setup(case, layers=3)
    u = torch.randn(3, weights.shape[2] * g.groups, *g.input_size, dtype=torch.float64)
    v = torch.randn(3, weights.shape[1], *g.output_size, dtype=torch.float64)
    grad = conv_bilinear_gradient(u, v, tuple(weights.shape[1:]), g)
    w = weights.clone().requires_grad_(True)
    bilinear = conv_bilinear(w, u, v, g)
    (expected,) = torch.autograd.grad(bilinear.sum(), w)
    assert_close(grad, expected)
    assert_close((weights * grad).flatten(1).sum(1), bilinear.detach())


@pytest.mark.parametrize("gemm", [True, False], ids=["gemm-form", "grouped-conv-form"])
@pytest.mark.parametrize("case", GEOMETRIES, ids=IDS)
def test_stacked_operator_forms_are_the_dense_matrices(case, gemm, device, monkeypatch):
    """Both forms of the stacked operator (batched GEMMs on unfolded vectors; one grouped conv) apply each
    layer's dense conv matrix and its transpose, and give each layer's bilinear gradient (autograd oracle)."""
    cpi = importlib.import_module("lipkern.ops.conv_power_iteration")
    monkeypatch.setattr(cpi, "_GEMM_MAX_BYTES", (1 << 40) if gemm else 0)
    monkeypatch.setattr(cpi, "_GEMM_DEVICES", ("cpu", "cuda"))
    weights, g, kwargs = _setup(case, layers=3)
    operator = cpi._StackedOperator(weights.to(device), g)
    assert operator.gemm == (gemm and g.groups == 1)
    u = torch.randn(3, weights.shape[2] * g.groups, *g.input_size, dtype=torch.float64)
    v = torch.randn(3, weights.shape[1], *g.output_size, dtype=torch.float64)
    au, atv = operator.apply(u.to(device)).cpu(), operator.adjoint(v.to(device)).cpu()
    grad = cpi.conv_bilinear_gradient(u.to(device), v.to(device), tuple(weights.shape[1:]), g).cpu()
    for layer in range(3):
        a = dense_conv2d(weights[layer], g.input_size, **kwargs)
        assert_close(au[layer].flatten(), a @ u[layer].flatten())
        assert_close(atv[layer].flatten(), a.T @ v[layer].flatten())
        w = weights[layer].clone().requires_grad_(True)
        (expected,) = torch.autograd.grad((conv_operator(u[layer][None], w, g) * v[layer]).sum(), w)
        assert_close(grad[layer], expected)


# --- the CPU paths: the C++ kernel (small calls) and the PyTorch path ----------------------------------------
@pytest.mark.parametrize("cpu_kernels", CPU_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", GEOMETRIES, ids=IDS)
def test_cpu_paths_match_the_float64_reference(case, dtype, cpu_kernels, knobs):
    """Both CPU paths (the C++ kernel where it is built and the call is small, else PyTorch's convolutions)
    against one layer at a time in float64, and the implementation each recorded."""
    knobs(backend="torch", cpu_kernels=cpu_kernels)
    weights, g, kwargs = _setup(case, layers=3)
    u0 = torch.randn(3, weights.shape[2] * g.groups, *g.input_size, dtype=torch.float64)
    ref_sigma, ref_u, ref_v = conv_power_iteration_ref(weights, u0, 3, g)
    implementations(clear=True)
    u = u0.to(dtype)
    sigma, _, v = conv_power_iteration(weights.to(dtype), u, None, 3, **kwargs)
    assert implementations()["conv_power_iteration"] == ("cpp" if cpu_kernels else "torch")
    for got, want in ((sigma, ref_sigma), (u, ref_u), (v, ref_v)):
        assert_close(got, want, dtype=dtype)


@pytest.mark.parametrize("cpu_kernels", CPU_KERNELS)
def test_cpu_paths_zero_and_extreme_weights(cpu_kernels, knobs):
    """A zero layer: σ = 0, v = 0, u kept; weights of 1e-300 and 1e300: σ scales exactly (the largest entry
    is divided out), no overflow; NaN: that layer's σ, u, v NaN, the others finite."""
    knobs(backend="torch", cpu_kernels=cpu_kernels)
    weights, g, kwargs = _setup(GEOMETRIES[0], layers=4)
    weights[0] = 0
    weights[3, 1, 0, 1, 1] = float("nan")
    base = weights[1].clone()
    weights[2] = base * 1e300
    weights[1] = base * 1e-300
    u0 = torch.randn(4, 3, *g.input_size, dtype=torch.float64)
    u0[2] = u0[1]
    u = u0.clone()
    sigma, _, v = conv_power_iteration(weights, u, None, 2, **kwargs)
    assert sigma[0] == 0 and (v[0] == 0).all() and torch.equal(u[0], u0[0])
    ref_sigma, _, _ = conv_power_iteration_ref(base[None], u0[1:2], 2, g)
    assert_close(sigma[1] / 1e-300, ref_sigma[0])
    assert_close(sigma[2] / 1e300, ref_sigma[0])
    assert torch.isnan(sigma[3]) and torch.isnan(u[3]).all() and torch.isnan(v[3]).all()
    assert torch.isfinite(sigma[:3]).all()


@pytest.mark.parametrize("cpu_kernels", CPU_KERNELS)
@pytest.mark.parametrize("case", GEOMETRIES, ids=IDS)
def test_cpu_bilinear_gradient_paths(case, cpu_kernels, knobs):
    """G = ∂⟨v, A u⟩/∂W on both CPU paths, float32 and float64, against autograd of the float64 bilinear form."""
    from lipkern.ops.conv_power_iteration import conv_bilinear_gradient

    knobs(cpu_kernels=cpu_kernels)
    weights, g, _ = _setup(case, layers=2)
    u = torch.randn(2, weights.shape[2] * g.groups, *g.input_size, dtype=torch.float64)
    v = torch.randn(2, weights.shape[1], *g.output_size, dtype=torch.float64)
    w = weights.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(conv_bilinear(w, u, v, g).sum(), w)
    for dtype in (torch.float32, torch.float64):
        grad = conv_bilinear_gradient(u.to(dtype), v.to(dtype), tuple(weights.shape[1:]), g)
        assert grad.dtype == dtype
        assert_close(grad, expected, dtype=dtype)


@pytest.mark.parametrize("cpu_kernels", CPU_KERNELS)
def test_vectors_written_in_place_are_seen_by_autograd_and_the_layers(cpu_kernels, knobs):
    """Kernels write u and v through raw pointers: their version counters still move, so a graph that saved
    them refuses to run backward, and a layer's pending power-step credit (lipkern.nn.power) is dropped."""
    from lipkern.nn import SpectralConv2d

    knobs(backend="torch", cpu_kernels=cpu_kernels)
    weights, g, kwargs = _setup(GEOMETRIES[0], layers=1)
    u = torch.randn(1, 3, *g.input_size, dtype=torch.float64)
    v = torch.randn(1, 4, *g.output_size, dtype=torch.float64)
    w = weights.clone().requires_grad_(True)
    saved = conv_bilinear(w, u, v, g)
    conv_power_iteration(weights, u, v, 1, **kwargs)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()
    layers = [SpectralConv2d(3, 3, 3, padding=1, input_size=5, dtype=torch.float64) for _ in range(2)]
    for _ in range(2):  # the second step makes layer 1 a member of layer 0's round: it holds a credit
        for layer in layers:
            layer.sigma()
    layers[0].sigma()
    b = layers[1]
    conv_power_iteration(b.weight.detach()[None], b.u[None], b.v[None], 5, padding=1)  # the user advances it
    expected = b.u.clone()
    conv_power_iteration(b.weight.detach()[None], expected[None], None, 1, padding=1)
    b.sigma()
    assert_close(b.u, expected)


@pytest.mark.parametrize("cpu_kernels", CPU_KERNELS)
def test_weights_near_the_largest_float_give_an_infinite_sigma_and_finite_vectors(cpu_kernels, knobs):
    knobs(backend="torch", cpu_kernels=cpu_kernels)
    weights = torch.full((1, 3, 3, 3, 3), 1e308, dtype=torch.float64)
    u = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    sigma, u, v = conv_power_iteration(weights, u, None, 2, padding=1)
    assert sigma[0] == float("inf") and torch.isfinite(u).all() and torch.isfinite(v).all()


def test_the_cpu_kernels_never_read_a_lazy_negation():
    """A negative view (negation not in memory) is refused by the raw-pointer checks and sent to PyTorch by the
    dispatch: conv_bilinear_gradient of −u is −G."""
    from lipkern import _cpu_kernels
    from lipkern.ops.conv_power_iteration import conv_bilinear_gradient

    weights, g, _ = _setup(GEOMETRIES[0], layers=2)
    u = torch.randn(2, 3, *g.input_size, dtype=torch.float64)
    v = torch.randn(2, 4, *g.output_size, dtype=torch.float64)
    negative = torch._neg_view(u)
    assert negative.is_neg() and not _cpu_kernels.plain(negative)
    assert_close(conv_bilinear_gradient(negative, v, tuple(weights.shape[1:]), g),
                 -conv_bilinear_gradient(u, v, tuple(weights.shape[1:]), g))
    if _cpu_kernels._cpu is not None:
        with pytest.raises(ValueError, match="lazy negation"):
            _cpu_kernels.conv_bilinear_gradient(negative, v, tuple(weights.shape[1:]), g)


# --- the layers' direct CPU step: one layer, no op layers ------------------------------------------------------
@pytest.mark.skipif(importlib.import_module("lipkern._cpu_kernels")._cpu is None, reason="lipkern._cpu is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", GEOMETRIES, ids=IDS)
def test_direct_cpu_step_is_the_ops_step_bit_for_bit(case, dtype, knobs):
    """cpu_conv_power_rows (a training layer's step on the CPU) gives the very numbers of the op on the stacked
    weight and of conv_bilinear_gradient, in new tensors, and leaves u alone."""
    from lipkern.ops.conv_power_iteration import conv_bilinear_gradient, cpu_conv_power_rows

    knobs(backend=None, triton_interpret=False, cpu_kernels=True)
    weights, g, kwargs = _setup(case)
    weight = weights[0].to(dtype)
    u0 = torch.randn(weight.shape[1] * g.groups, *g.input_size, dtype=dtype)
    u = u0.clone()
    implementations(clear=True)
    u_next, v_next, grad = cpu_conv_power_rows(weight, u, 2, g)
    assert implementations()["conv_power_iteration"] == "cpp"
    assert torch.equal(u, u0)
    op_u = u0[None].clone()
    _, _, op_v = conv_power_iteration(weight[None], op_u, None, 2, **kwargs)
    assert torch.equal(u_next, op_u[0]) and torch.equal(v_next, op_v[0])
    op_grad = conv_bilinear_gradient(op_u, op_v, tuple(weight.shape), g)
    assert torch.equal(grad, op_grad.reshape(-1))


@pytest.mark.skipif(importlib.import_module("lipkern._cpu_kernels")._cpu is None, reason="lipkern._cpu is not built")
def test_direct_cpu_step_declines_what_its_kernels_do_not_take(knobs):
    """None (the layer then takes the op) for: the kernels off, a forced Triton backend or the interpreter, a
    dtype the kernels do not have, a vector of another dtype, a layer past the size limit, a torch.func
    transform."""
    module = importlib.import_module("lipkern.ops.conv_power_iteration")
    weights, g, _ = _setup(GEOMETRIES[0])
    weight, u = weights[0], torch.randn(3, *g.input_size, dtype=torch.float64)
    knobs(backend=None, triton_interpret=False, cpu_kernels=True)
    assert module.cpu_conv_power_rows(weight, u, 1, g) is not None
    assert module.cpu_conv_power_rows(weight.float(), u, 1, g) is None
    assert module.cpu_conv_power_rows(weight.half(), u.half(), 1, g) is None
    big = ConvGeometry.create(64, 3, padding=1)
    assert module.cpu_conv_power_rows(torch.randn(64, 64, 3, 3), torch.randn(64, 64, 64), 1, big) is None
    seen = []
    torch.func.grad(lambda w: seen.append(module.cpu_conv_power_rows(weight, u, 1, g)) or w.sum())(weight)
    assert seen == [None]
    knobs(triton_interpret=True)
    assert module.cpu_conv_power_rows(weight, u, 1, g) is None
    knobs(triton_interpret=False, cpu_kernels=False)
    assert module.cpu_conv_power_rows(weight, u, 1, g) is None
