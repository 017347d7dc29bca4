"""chain_power_iteration: the layer-batched sweep equals one power-iteration loop per chain (the reference), its
converged values are the exact norms of the explicit chain products, and a step costs 2K operator calls."""

import pytest
import torch

from lipkern.bounds.operators import LinearMap
from lipkern.bounds.chain_power_iteration import (
    chain_adjoint_sweep,
    chain_forward_sweep,
    chain_norm_estimates,
    chain_power_iteration,
    chain_power_iteration_ref,
    initial_chain_vectors,
)
from tests.helpers import assert_close, spectral_norm

D = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny operators: OpenMP threads on a busy machine cost 50x here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _maps(dtype=D):
    g = torch.Generator().manual_seed(7)  # largest σ₂/σ₁ over the chains 0.965: 400 steps converge

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return [LinearMap.conv2d(r(4, 3, 3, 3), (3, 6, 6), padding=1),
            LinearMap.conv2d(r(4, 2, 3, 3), (4, 6, 6), stride=2, padding=1, groups=2),
            LinearMap.conv2d(r(4, 4, 2, 2), (4, 3, 3), padding=(1, 0, 0, 1), padding_mode="circular"),
            LinearMap.dense(r(7, 36), (4, 3, 3)),
            LinearMap.diag(r(7), (7,)),
            LinearMap.dense(r(5, 7))]


def _dense_chain(maps, j, k):
    m = maps[j].dense_matrix()
    for op in maps[j + 1:k + 1]:
        m = op.dense_matrix() @ m
    return m


@pytest.mark.parametrize("n_iter", [1, 4])
def test_batched_sweep_equals_per_chain_reference(n_iter):
    maps = _maps()
    u = initial_chain_vectors(maps, D, "cpu")
    sigma_ref, u_ref = chain_power_iteration_ref(maps, u, n_iter)
    sigma = chain_power_iteration(maps, u, n_iter)
    assert_close(sigma, sigma_ref)
    for a, b in zip(u, u_ref):
        assert_close(a, b)
    assert torch.equal(sigma.tril(-1), torch.zeros_like(sigma))


def test_sweeps_are_the_chain_products_and_their_adjoints():
    maps = _maps()
    count = len(maps)
    u = [torch.randn(count - j, *op.in_shape, dtype=D) for j, op in enumerate(maps)]
    v = [torch.randn(k + 1, *op.out_shape, dtype=D) for k, op in enumerate(maps)]
    w, z = chain_forward_sweep(maps, u), chain_adjoint_sweep(maps, v)
    for j in range(count):
        for k in range(j, count):
            m = _dense_chain(maps, j, k)
            assert_close(w[k][j].flatten(), m @ u[j][k - j].flatten())
            assert_close(z[j][k - j].flatten(), m.T @ v[k][j].flatten())


def test_converges_to_the_exact_chain_norms_and_estimates_are_differentiable():
    maps = _maps()
    u = initial_chain_vectors(maps, D, "cpu")
    sigma = chain_power_iteration(maps, u, 400)
    weights = [op.weight.clone().requires_grad_() for op in maps]
    live = [op.with_weight(w) for op, w in zip(maps, weights)]
    estimate = chain_norm_estimates(live, u)
    for j in range(len(maps)):
        for k in range(j, len(maps)):
            exact = spectral_norm(_dense_chain(maps, j, k))
            assert sigma[j, k].item() <= exact * (1 + 1e-12)
            assert abs(sigma[j, k].item() - exact) <= 1e-6 * exact
            assert abs(estimate[j, k].item() - exact) <= 1e-6 * exact
    # gradient of the whole-chain norm: the spectral-norm gradient of the dense product (autograd oracle)
    estimate[0, -1].backward()
    ws = [w.detach().clone().requires_grad_() for w in weights]
    dense = [op.with_weight(w) for op, w in zip(maps, ws)]
    m = dense[0].forward(torch.eye(dense[0].in_features, dtype=D)).flatten(1)
    for op in dense[1:]:
        m = op.forward(m).flatten(1)
    torch.linalg.matrix_norm(m.T, 2).backward()
    for w, ref in zip(weights, ws):
        torch.testing.assert_close(w.grad, ref.grad, atol=1e-5, rtol=1e-4)


def test_several_chains_in_one_call_and_operator_count():
    chains = [_maps(), _maps()[3:]]
    u = [initial_chain_vectors(maps, D, "cpu", key=str(i)) for i, maps in enumerate(chains)]
    calls = {"forward": 0, "adjoint": 0}

    class Counting(LinearMap):
        def forward(self, x, weight=None):
            calls["forward"] += 1
            return super().forward(x, weight)

        def adjoint(self, y, weight=None):
            calls["adjoint"] += 1
            return super().adjoint(y, weight)

    counted = [[Counting(op.kind, op.weight, op.in_shape, op.out_shape, op.geometry) for op in maps]
               for maps in chains]
    sigmas = chain_power_iteration(counted, u, 3)
    assert calls == {"forward": 3 * 9, "adjoint": 3 * 9}  # 2K calls per step and chain, K = 6 and 3
    ref = chain_power_iteration_ref(chains[1], initial_chain_vectors(chains[1], D, "cpu", key="1"), 3)[0]
    assert_close(sigmas[1], ref)


def test_bad_input():
    maps = _maps()
    u = initial_chain_vectors(maps, D, "cpu")
    with pytest.raises(ValueError, match="shape"):
        chain_power_iteration(maps, [t[:1] for t in u], 1)
    with pytest.raises(ValueError, match="n_iter"):
        chain_power_iteration(maps, u, 0)
    with pytest.raises(ValueError, match="followed"):
        chain_power_iteration([maps[0], maps[3]], [u[0][:2], u[3][:1]], 1)


@pytest.mark.parametrize("n_iter", [1, 3])
def test_one_map_chains_equal_the_reference(n_iter):
    """One-map chains (the product bound's segments) take a direct path: the same σ and vectors as the
    per-chain reference, a zero map keeps its vector (σ = 0), NaN propagates, and the estimate ‖A u‖ has the
    reference's value and gradient."""
    maps = _maps()
    zero = LinearMap.dense(torch.zeros(3, 4, dtype=D))
    nan = LinearMap.dense(torch.full((3, 4), float("nan"), dtype=D))
    chains = [[op] for op in maps] + [[zero], [nan]]
    u = [initial_chain_vectors(chain, D, "cpu", key=str(i)) for i, chain in enumerate(chains)]
    refs = [chain_power_iteration_ref(chain, vectors, n_iter) for chain, vectors in zip(chains, u)]
    sigmas = chain_power_iteration(chains, u, n_iter)
    for sigma, vectors, (sigma_ref, u_ref) in zip(sigmas[:-1], u[:-1], refs[:-1]):
        assert sigma.shape == (1, 1)
        assert_close(sigma, sigma_ref)
        assert_close(vectors[0], u_ref[0])
    assert sigmas[-2].item() == 0 and torch.equal(u[-2][0], initial_chain_vectors([zero], D, "cpu", key="6")[0])
    assert torch.isnan(sigmas[-1]).all() and torch.isnan(u[-1][0]).all()
    for op, vectors in zip(maps, u):
        weight = op.weight.clone().requires_grad_()
        estimate = chain_norm_estimates([op.with_weight(weight)], vectors)
        ref_weight = op.weight.clone().requires_grad_()
        ref = torch.linalg.vector_norm(op.with_weight(ref_weight).forward(vectors[0].clone()))
        assert estimate.shape == (1, 1)
        assert_close(estimate[0, 0], ref)
        estimate[0, 0].backward()
        ref.backward()
        assert_close(weight.grad, ref_weight.grad)


def test_advance_chains_moves_the_vectors_as_chain_power_iteration_does():
    """The training path (LipschitzEstimate.forward) advances the vectors without forming σ: the same vectors."""
    from lipkern.bounds.chain_power_iteration import advance_chains

    chains = [_maps(), _maps()[3:4]]
    u = [initial_chain_vectors(maps, D, "cpu", key=str(i)) for i, maps in enumerate(chains)]
    u_ref = [[t.clone() for t in vectors] for vectors in u]
    assert advance_chains(chains, u, 2) is None
    chain_power_iteration(chains, u_ref, 2)
    for a, b in zip(u, u_ref):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match="n_iter"):
        advance_chains(chains, u, 0)


def test_the_old_ops_names_still_import_with_a_warning():
    import lipkern.ops
    from lipkern.bounds import chain_power_iteration as module

    with pytest.warns(DeprecationWarning, match="lipkern.bounds.chain_power_iteration"):
        assert lipkern.ops.chain_power_iteration is module.chain_power_iteration
    with pytest.raises(AttributeError):
        lipkern.ops.no_such_op  # noqa: B018


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n_iter", [1, 3])
def test_one_conv_map_advanced_by_the_cpu_kernels_equals_the_reference(n_iter, dtype, knobs):
    """Training estimates (advance_chains, no σ) move a one-conv chain's vector by the C++ kernels' power step on
    the CPU (recorded 'cpp'): the reference's vectors to rounding, a zero kernel keeps its vector, NaN
    propagates."""
    import importlib

    from lipkern._dispatch import implementations
    from lipkern.bounds.chain_power_iteration import advance_chains

    if importlib.import_module("lipkern._cpu_kernels")._cpu is None:
        pytest.skip("lipkern._cpu is not built")
    knobs(backend=None, triton_interpret=False, cpu_kernels=True)
    convs = [op.with_weight(op.weight.to(dtype)) for op in _maps()[:3]]
    zero = convs[0].with_weight(torch.zeros_like(convs[0].weight))
    nan = convs[1].with_weight(torch.full_like(convs[1].weight, float("nan")))
    chains = [[op] for op in (*convs, zero, nan)]
    u = [initial_chain_vectors(chain, dtype, "cpu", key=str(i)) for i, chain in enumerate(chains)]
    start = [vectors[0].clone() for vectors in u]
    refs = [chain_power_iteration_ref([op.to(D) for op in chain], [t.to(D) for t in vectors], n_iter)
            for chain, vectors in zip(chains, u)]
    implementations(clear=True)
    advance_chains(chains, u, n_iter)
    assert implementations().get("conv_power_iteration") == "cpp"
    for vectors, (_, u_ref), first in zip(u[:3], refs[:3], start):
        assert_close(vectors[0], u_ref[0], dtype=dtype)
        assert not torch.equal(vectors[0], first)
    assert torch.equal(u[3][0], start[3])
    assert torch.isnan(u[4][0]).all()
