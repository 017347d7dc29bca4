"""Whole-network Lipschitz bounds (lipkern.bounds.network): papers.md §10 checks 11-15 and 30.

Oracles, independent of the code under test: explicit dense matrices of each layer built by PyTorch's own
modules (tests.helpers.dense_conv2d / Jacobians), their SVD norms combined by a plain-Python LipLT recursion
(`_dense_liplt`), closed forms (one hidden layer, identity activations), and sampled exact Jacobians ‖J(x)‖₂
of the network (float64) as lower bounds of every Lipschitz constant.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lipkern.nn as L
from lipkern.bounds import LipschitzEstimate, lipschitz_bound, lipschitz_estimate
from lipkern.models import CPLNet, FirstChannels, LipLTNet, Normalize, Residual, ZeroChannelPad
from tests.helpers import dense_conv2d, dense_jacobian, spectral_norm

D = torch.float64


@pytest.fixture(autouse=True)
def setup(monkeypatch, knobs):
    knobs(backend="torch")  # whole networks; the kernels are tested in tests/ops
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny operators: OpenMP threads on a busy machine cost 50x here
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------
# Oracles.
# ----------------------------------------------------------------------------------------------------------
def _layer_matrix(module, shape) -> torch.Tensor:
    """Dense matrix of a linear layer (bias excluded) on inputs of ``shape``, from PyTorch's own module."""
    if isinstance(module, nn.Conv2d):
        return dense_conv2d(module.weight.detach(), shape[1:], stride=module.stride, padding=module.padding,
                            dilation=module.dilation, groups=module.groups, padding_mode=module.padding_mode)
    if isinstance(module, nn.Linear):
        return module.weight.detach().double()
    raise TypeError(module)


def _liplt_recursion(mats, slopes, norm):
    """LipLT with [α, β] slopes (slopes[i] after mats[i]) on explicit matrices with the operator norm ``norm``:
    (the recursion's value m_K, the memoized chain norm ‖A_k⋯A_j‖)."""
    norms = {}

    def chain(j, k):
        if (j, k) not in norms:
            m = mats[j]
            for t in range(j + 1, k + 1):
                m = mats[t] @ m
            norms[(j, k)] = norm(m)
        return norms[(j, k)]

    a = [abs(al + be) / 2 for al, be in slopes]
    b = [(be - al) / 2 for al, be in slopes]
    m = [chain(0, 0)]
    for k in range(1, len(mats)):
        m.append(math.prod(a[:k]) * chain(0, k)
                 + sum(b[j] * math.prod(a[j + 1:k]) * chain(j + 1, k) * m[j] for j in range(k)))
    return m[-1], chain


def _dense_liplt(mats, slopes) -> float:
    """Plain-Python LipLT on explicit matrices, min with the product of the same norms."""
    value, chain = _liplt_recursion(mats, slopes, spectral_norm)
    product = math.prod(chain(i, i) for i in range(len(mats))) * math.prod(max(abs(x), abs(y)) for x, y in slopes)
    return min(value, product)


def _max_jacobian_norm(model, shape, samples=30, row=None) -> float:
    """max over random x of ‖J(x)‖₂ (or of ‖∇ (row · f)(x)‖ for a row vector), float64, exact Jacobians."""
    best = 0.0
    for _ in range(samples):
        x = torch.randn(1, *shape, dtype=D)
        jac = dense_jacobian(model, x)
        best = max(best, spectral_norm(jac if row is None else row[None] @ jac))
    return best


def _mlp(widths, activation=nn.ReLU):
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers).double()


def _small_convnet():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                         nn.LeakyReLU(0.2), nn.Conv2d(4, 2, 2, padding=1, padding_mode="circular"), nn.Tanh(),
                         nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()


def _dense_value(model, shape, slopes):
    mats, x = [], torch.zeros(1, *shape, dtype=D)
    for module in model:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            mats.append(_layer_matrix(module, tuple(x.shape[1:])))
        x = module(x)
    return _dense_liplt(mats, slopes)


CONV_SLOPES = [(0, 1), (0.2, 1), (0, 1)]
# chain_upper_bounds certifies an explicit matrix's norm with a Cholesky certificate whose slack is ~1e-7
# relative (observed 7.4e-8 on the 4×4 average pooling); sound values are compared with this slack on top.
SLACK = 1e-6


# ----------------------------------------------------------------------------------------------------------
# §10 checks 11-15.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_liplt_is_below_product_and_above_sampled_jacobians(kind):
    torch.manual_seed(1)
    model, shape = (_mlp([6, 10, 10, 8, 3]), (6,)) if kind == "mlp" else (_small_convnet(), (2, 6, 6))
    liplt = lipschitz_bound(model, shape, "liplt").item()
    product = lipschitz_bound(model, shape, "product").item()
    estimate = lipschitz_estimate(model, shape, "liplt", n_iter=200).item()
    sampled = _max_jacobian_norm(model, shape)
    assert sampled <= liplt <= product
    assert sampled <= estimate <= liplt * (1 + 1e-9)
    assert liplt < 0.95 * product  # LipLT is tighter on these nets (observed 0.2-0.9 in papers.md §10)


def test_identity_activations_give_the_exact_product_norm():
    class Linearish(nn.Module):  # declared slopes (1, 1): the identity
        def forward(self, x):
            return x

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 7), Linearish(), nn.Linear(7, 6), nn.Identity(), nn.Linear(6, 4)).double()
    exact = spectral_norm(model[4].weight @ model[2].weight @ model[0].weight)
    slopes = {Linearish: (1.0, 1.0)}
    sound = lipschitz_bound(model, (5,), activation_slopes=slopes).item()
    estimate = lipschitz_estimate(model, (5,), n_iter=300, activation_slopes=slopes).item()
    assert exact <= sound <= exact * (1 + 1e-9)
    assert abs(estimate - exact) <= 1e-7 * exact


@pytest.mark.parametrize("activation, a, b", [(nn.ReLU, 0.5, 0.5), (lambda: nn.LeakyReLU(0.1), 0.55, 0.45),
                                              (nn.Sigmoid, 0.125, 0.125)])
def test_one_hidden_layer_closed_form(activation, a, b):
    torch.manual_seed(3)
    model = _mlp([6, 9, 4], activation)
    w1, w2 = model[0].weight.detach(), model[2].weight.detach()
    expected = a * spectral_norm(w2 @ w1) + b * spectral_norm(w2) * spectral_norm(w1)
    sound = lipschitz_bound(model, (6,)).item()
    assert expected <= sound <= expected * (1 + 1e-9)
    assert abs(lipschitz_estimate(model, (6,), n_iter=300).item() - expected) <= 1e-7 * expected


@pytest.mark.parametrize("sound", [True, False])
def test_pairwise_bounds(sound):
    torch.manual_seed(4)
    model = _mlp([5, 8, 8, 4])
    kwargs = {} if sound else {"n_iter": 300}
    bound = lipschitz_bound if sound else lipschitz_estimate
    pair = bound(model, (5,), pairwise=True, **kwargs).detach()
    total = bound(model, (5,), **kwargs).item()
    assert pair.shape == (4, 4) and torch.equal(pair.diagonal(), torch.zeros(4, dtype=pair.dtype))
    assert torch.equal(pair, pair.T)
    per_class = []
    for c in range(4):  # L_a: the network whose last layer is row a alone
        single = _mlp([5, 8, 8, 1])
        single.load_state_dict({k: (v[c:c + 1] if k.startswith("4.") else v) for k, v in model.state_dict().items()})
        per_class.append(bound(single, (5,), **kwargs).item())
    for a in range(4):
        for b in range(4):
            if a == b:
                continue
            assert pair[a, b] <= math.sqrt(2) * total * (1 + 1e-12)
            assert pair[a, b] <= (per_class[a] + per_class[b]) * (1 + 1e-9)
            row = torch.zeros(4, dtype=D)
            row[a], row[b] = 1, -1
            assert _max_jacobian_norm(model, (5,), samples=10, row=row) <= pair[a, b]


# ----------------------------------------------------------------------------------------------------------
# Soundness against explicit dense operators (property test), convergence, gradients, host syncs.
# ----------------------------------------------------------------------------------------------------------
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_sound_bound_covers_the_dense_operator_value(data):
    size = data.draw(st.integers(4, 6))
    layers, channels, shape = [], 2, None
    for _ in range(2):
        groups = data.draw(st.sampled_from([1, 2]))
        out = data.draw(st.sampled_from([2, 4]))
        kernel = data.draw(st.integers(1, 3))
        mode = data.draw(st.sampled_from(["zeros", "circular"]))
        padding = data.draw(st.sampled_from(["same", 0, 1, (1, 0)] if mode == "zeros" else ["same", 0, 1]))
        stride = 1 if padding == "same" else data.draw(st.integers(1, 2))
        layers += [nn.Conv2d(channels, out, kernel, stride, padding, groups=groups, padding_mode=mode), nn.ReLU()]
        channels = out
    seed = data.draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    body = nn.Sequential(*layers).double()
    shape = (2, size, size)
    try:
        features = body(torch.zeros(1, *shape, dtype=D)).numel()
    except RuntimeError:
        return  # empty output: not a network
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(features, 3)).double()
    dense = _dense_value(model, shape, [(0, 1), (0, 1)])
    sound = lipschitz_bound(model, shape).item()
    assert dense <= sound <= dense * (1 + SLACK)
    assert dense <= lipschitz_bound(model, shape, dense_limit=0).item() <= dense * (1 + SLACK)  # Gram path
    assert dense <= lipschitz_bound(model, shape, dense_limit=0, gram_limit=0).item()  # splits only: looser


def test_estimate_converges_to_the_dense_value_and_never_exceeds_the_sound_bound():
    torch.manual_seed(26)  # σ₂/σ₁ ≤ 0.952 on every sub-chain: 300 steps converge to 1e-12
    model, shape = _small_convnet(), (2, 6, 6)
    dense = _dense_value(model, shape, CONV_SLOPES)
    bound = LipschitzEstimate(model, shape, n_iter=100)
    values = [bound().item() for _ in range(3)]
    assert abs(values[-1] - dense) <= 1e-6 * dense
    assert values[-1] <= lipschitz_bound(model, shape).item()


def _dense_value_torch(model, shape, slopes):
    """The dense-operator LipLT value as a differentiable torch expression of the weights (autograd oracle)."""
    mats, x = [], torch.zeros(1, *shape, dtype=D)
    for module in model:
        if isinstance(module, nn.Conv2d):
            basis = torch.eye(math.prod(x.shape[1:]), dtype=D).reshape(-1, *x.shape[1:])
            y = torch.nn.functional.conv2d(module._reversed_padding_repeated_twice and
                                           torch.nn.functional.pad(basis, module._reversed_padding_repeated_twice,
                                                                   mode="circular")
                                           if module.padding_mode == "circular" else basis, module.weight, None,
                                           module.stride, 0 if module.padding_mode == "circular" else module.padding,
                                           module.dilation, module.groups)
            mats.append(y.reshape(basis.shape[0], -1).T)
        elif isinstance(module, nn.Linear):
            mats.append(module.weight)
        x = module(x)
    return _liplt_recursion(mats, slopes, lambda m: torch.linalg.matrix_norm(m, 2))[0]


def test_gradient_matches_autograd_of_the_dense_value():
    torch.manual_seed(26)  # σ₂/σ₁ ≤ 0.952 on every sub-chain
    model, shape = _small_convnet(), (2, 6, 6)
    bound = LipschitzEstimate(model, shape, n_iter=200)
    value = bound()
    params = [p for n, p in model.named_parameters() if n.endswith("weight")]
    grads = torch.autograd.grad(value, params)
    dense = _dense_value_torch(model, shape, CONV_SLOPES)
    assert abs(dense.item() - value.item()) <= 1e-6 * dense.item()
    dense_grads = torch.autograd.grad(dense, params)
    for g, ref in zip(grads, dense_grads):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pairwise", [False, True])
def test_no_host_synchronization_in_a_training_step(pairwise):
    from tests.test_host_sync import counting

    model = LipLTNet("4C3F", input_size=8)
    bound = LipschitzEstimate(model, (1, 8, 8), pairwise=pairwise, n_iter=2)
    bound()  # first call (lazy imports)
    with counting() as counts:
        bound().sum().backward()
    assert counts.n_reads == 0, counts.reads


def test_module_holds_only_vectors_and_model_is_not_a_submodule():
    model = LipLTNet("4C3F", input_size=8)
    bound = LipschitzEstimate(model, (1, 8, 8))
    assert list(bound.parameters()) == [] and list(bound.children()) == []
    assert all(k.startswith("u_") for k in bound.state_dict())
    parent = nn.Module()
    parent.model, parent.bound = model, bound
    assert len(list(parent.parameters())) == len(list(model.parameters()))
    again = LipschitzEstimate(model, (1, 8, 8))
    assert all(torch.equal(a, b) for a, b in zip(bound.state_dict().values(), again.state_dict().values()))


# ----------------------------------------------------------------------------------------------------------
# Layer types: BatchNorm folding, Normalize, pooling, selections, residuals, lipkern layers.
# ----------------------------------------------------------------------------------------------------------
def _linear_model_check(model, shape, rtol=1e-9):
    """For a model that is linear (no activations), every bound is the exact Jacobian norm."""
    exact = spectral_norm(dense_jacobian(model, torch.randn(1, *shape, dtype=D)))
    sound = lipschitz_bound(model, shape).item()
    estimate = lipschitz_estimate(model, shape, n_iter=300).item()
    assert exact <= sound <= exact * (1 + rtol)
    assert abs(estimate - exact) <= 1e-6 * exact
    return exact


def test_batchnorm_folding_matches_the_dense_jacobian():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3), nn.Flatten(),
                          nn.BatchNorm1d(8), nn.Linear(8, 3)).double()
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.data.uniform_(-2, 2)
    _linear_model_check(model.eval(), (2, 4, 4))
    with pytest.raises(ValueError, match="training mode"):
        lipschitz_bound(model.train(), (2, 4, 4))


def test_normalize_is_a_diagonal_map():
    torch.manual_seed(8)
    model = nn.Sequential(Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.5]), nn.Conv2d(3, 4, 3), nn.Flatten(),
                          nn.Linear(16, 3)).double()
    exact = _linear_model_check(model, (3, 4, 4))
    plain = lipschitz_bound(model[1:], (3, 4, 4)).item()
    assert exact <= plain / 0.2 * (1 + 1e-9)  # as tight as (1/min std)·L, usually tighter


def test_average_pooling_is_its_depthwise_conv():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(3, stride=2, padding=1),
                          nn.AvgPool2d(2, divisor_override=2), nn.Flatten(), nn.Linear(12, 2)).double()
    _linear_model_check(model, (2, 8, 8), rtol=SLACK)
    pool = nn.Sequential(nn.AvgPool2d(4, divisor_override=4))  # §10 check 30: norm exactly 1
    assert 1.0 <= lipschitz_bound(pool, (3, 8, 8)).item() <= 1 + SLACK
    assert lipschitz_estimate(pool, (3, 8, 8), n_iter=50).item() == pytest.approx(1.0, rel=1e-6)  # float32
    with pytest.raises(ValueError, match="count_include_pad"):
        lipschitz_bound(nn.Sequential(nn.AvgPool2d(3, padding=1, count_include_pad=False)), (1, 6, 6))


def test_selections_are_exact_maps():
    torch.manual_seed(10)
    model = nn.Sequential(ZeroChannelPad(4), nn.Conv2d(4, 4, 3, padding=1), nn.PixelUnshuffle(2),
                          FirstChannels(6), nn.Conv2d(6, 2, 1), nn.Flatten(), nn.Linear(8, 5),
                          FirstChannels(3)).double()
    _linear_model_check(model, (3, 4, 4), rtol=SLACK)
    for module in (nn.PixelUnshuffle(2), FirstChannels(2), ZeroChannelPad(5)):  # §10 check 30: norm ≤ 1
        assert lipschitz_bound(nn.Sequential(module), (3, 4, 4)).item() <= 1 + SLACK
        assert lipschitz_estimate(nn.Sequential(module), (3, 4, 4), n_iter=20).item() == pytest.approx(1.0)


def test_max_pooling_constant_and_soundness():
    # 3×3 windows at stride 1 on 6×6 (4×4 outputs): ≤ 3 windows cover a pixel per axis → √9 = 3 (LMT)
    pool = nn.Sequential(nn.MaxPool2d(3, stride=1))
    assert 3.0 <= lipschitz_bound(pool, (1, 6, 6)).item() <= 3.0 * (1 + 1e-15)  # rounded upward
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2, stride=1), nn.Flatten(),
                          nn.Linear(2 * 25, 3)).double()
    assert _max_jacobian_norm(model, (1, 6, 6)) <= lipschitz_bound(model, (1, 6, 6)).item()


def test_residual_is_skip_plus_branch():
    torch.manual_seed(12)
    branch = _mlp([5, 8, 5])
    skip = nn.Linear(5, 5).double()
    for s in (None, skip):
        model = nn.Sequential(nn.Linear(4, 5), Residual(branch, s), nn.ReLU(), nn.Linear(5, 3)).double()
        value = lipschitz_bound(model, (4,)).item()
        assert _max_jacobian_norm(model, (4,)) <= value
        head, first = spectral_norm(model[3].weight), spectral_norm(model[0].weight)
        inner = lipschitz_bound(branch, (5,)).item() + (1 if s is None else spectral_norm(s.weight))
        assert value <= head * inner * first * (1 + 1e-9)


def test_lipkern_layers():
    torch.manual_seed(13)
    model = nn.Sequential(L.AOLConv2d(2, 4, 3, padding=1), L.MaxMin(), L.SpectralConv2d(4, 4, 3, padding=1,
                          input_size=4), nn.ReLU(), nn.Flatten(), L.AOLLinear(64, 8), L.SpectralLinear(8, 3))
    model = model.double().eval()
    sound = lipschitz_bound(model, (2, 4, 4)).item()
    assert _max_jacobian_norm(model, (2, 4, 4)) <= sound <= 1 + 1e-9  # every layer is 1-Lipschitz
    model.train()  # training mode: σ ≈ ‖A u‖ from the layers' current vectors, finite before any forward
    estimate = lipschitz_estimate(model, (2, 4, 4), n_iter=50)
    assert torch.isfinite(estimate) and estimate.item() > 0
    with pytest.raises(ValueError, match="training mode"):
        lipschitz_bound(model, (2, 4, 4))
    cpl = CPLNet("S", conv_hidden=2, dense_hidden=8, image_size=8, dtype=D)
    with pytest.raises(ValueError, match="certified"):
        lipschitz_bound(cpl.eval(), (3, 8, 8))
    cert = CPLNet("S", conv_hidden=2, dense_hidden=8, image_size=8, dtype=D, certified=True).eval()
    value = lipschitz_bound(cert, (3, 8, 8), pairwise=True)
    w = torch.nn.functional.normalize(cert.head.weight.detach(), dim=1)
    exact = torch.cdist(w, w)  # body 1-Lipschitz (CPL, and exact 0/1 and pooling maps), head ‖ŵ_a − ŵ_b‖
    assert torch.all(exact <= value) and torch.all(value <= exact * (1 + SLACK))


def test_liplt_net_bounds_run():
    model = LipLTNet("6C2F", input_size=16)
    value = LipschitzEstimate(model, (3, 16, 16), n_iter=2)()
    assert value.shape == () and value.item() > 0
    value.backward()
    assert model[0].weight.grad is not None


def test_lipschitz_bound_with_no_options_is_an_upper_bound():
    """The issue's case: lipschitz_bound(model, shape) of one zero-padded conv was a power-iteration estimate
    (1.249073 against the exact 1.249157). With no options it is now a bound: ≥ the dense SVD norm, for
    random convs; the estimate has its own name, and the old spellings are refused or warned."""
    for seed in range(6):
        torch.manual_seed(seed)
        conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        exact = spectral_norm(dense_conv2d(conv.weight.detach(), 6, padding=1))
        assert lipschitz_bound(nn.Sequential(conv), (3, 6, 6)).item() >= exact
        assert lipschitz_estimate(nn.Sequential(conv), (3, 6, 6), n_iter=5).item() <= exact * (1 + 1e-6)
    with pytest.raises(ValueError, match="lipschitz_estimate"):
        lipschitz_bound(nn.Sequential(conv), (3, 6, 6), sound=False)
    with pytest.warns(DeprecationWarning, match="always sound"):
        old = lipschitz_bound(nn.Sequential(conv), (3, 6, 6), sound=True)
    assert old.item() == lipschitz_bound(nn.Sequential(conv), (3, 6, 6)).item()
    from lipkern.bounds import LipschitzBound

    with pytest.warns(DeprecationWarning, match="renamed LipschitzEstimate"):
        renamed = LipschitzBound(nn.Sequential(conv), (3, 6, 6), n_iter=3)
    assert isinstance(renamed, LipschitzEstimate)


def test_inexact_scales_are_charged_their_rounding():
    """BatchNorm / Normalize / average-pooling scales enter as float64 values M_i within a relative r_i of the
    real ones; every chain is charged (∏(1 + r_i) − 1)·∏‖M_i‖. Property (dense operators, SVD): for
    perturbations Δ_i with |Δ_i| ≤ r_i|M_i| entrywise (r_i large here, 0.05), ‖∏(M_i + Δ_i)‖ ≤ ‖∏M_i‖ +
    correction; and the parser marks exactly these maps."""
    from lipkern.bounds.liplt import _inexact_corrections, build_plan
    from lipkern.bounds.operators import LinearMap

    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        sizes = [5, 4, 4, 3]
        dense = [torch.randn(sizes[i + 1], sizes[i], generator=generator, dtype=torch.float64) for i in range(3)]
        scale = torch.randn(4, generator=generator, dtype=torch.float64)
        maps = [LinearMap.dense(dense[0]), LinearMap.diag(scale, (4,)), LinearMap.dense(dense[1]),
                LinearMap.dense(dense[2])]
        items = [type("M", (), {"relative_error": r})() for r in (0.0, 0.05, 0.0, 0.05 * (trial % 2))]
        matrices = [m.dense_matrix() for m in maps]
        norms = torch.zeros(4, 4, dtype=torch.float64)
        for j in range(4):
            for k in range(j, 4):
                chain = matrices[j]
                for i in range(j + 1, k + 1):
                    chain = matrices[i] @ chain
                norms[j, k] = spectral_norm(chain)
        correction = _inexact_corrections(items, norms)
        for _ in range(5):
            perturbed = [m + (2 * torch.rand(m.shape, generator=generator, dtype=torch.float64) - 1)
                         * item.relative_error * m.abs() for m, item in zip(matrices, items)]
            for j in range(4):
                chain = perturbed[j]
                for k in range(j, 4):
                    if k > j:
                        chain = perturbed[k] @ chain
                    assert spectral_norm(chain) <= norms[j, k] + correction[j, k] + 1e-12, (trial, j, k)
    assert _inexact_corrections([type("M", (), {"relative_error": 0.0})()] * 2, norms[:2, :2]) is None
    model = nn.Sequential(Normalize(0.5, 3.0), nn.Flatten(), nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))
    plan = build_plan(model.eval(), (1,), "liplt", False, True, None, None)
    assert [m.relative_error > 0 for m in plan.segments[0].maps] == [True, False, False]


def test_errors():
    with pytest.raises(TypeError, match="unsupported module .*GELU"):
        lipschitz_bound(nn.Sequential(nn.Linear(3, 3), nn.GELU()), (3,))
    gelu = nn.GELU()
    assert lipschitz_bound(nn.Sequential(nn.Linear(3, 3), gelu, nn.Linear(3, 2)), (3,),
                           lipschitz_constants={gelu: 1.13}).item() > 0
    with pytest.raises(ValueError, match="reflect"):
        lipschitz_bound(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")), (1, 4, 4))
    with pytest.raises(ValueError, match="Flatten"):
        lipschitz_bound(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Linear(2, 2)), (1, 4, 4))
    with pytest.raises(ValueError, match="does not accept|input channels|shape"):
        lipschitz_bound(nn.Sequential(nn.Conv2d(3, 1, 3)), (2, 4, 4))
    with pytest.raises(ValueError, match="input_shape"):
        lipschitz_bound(nn.Sequential(nn.Linear(3, 3)), ())
    with pytest.raises(ValueError, match="end with a linear layer"):
        lipschitz_bound(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), (3,), pairwise=True)
    with pytest.raises(ValueError, match="method"):
        lipschitz_bound(nn.Sequential(nn.Linear(3, 3)), (3,), method="lmt")
    with pytest.raises(ValueError, match="alpha <= beta"):
        lipschitz_bound(nn.Sequential(nn.Linear(3, 3), gelu), (3,), activation_slopes={nn.GELU: (1, 0)})
