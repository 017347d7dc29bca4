"""SPLITZ: identity left half = Cohen exactly, left = a·x scales the radius by 1/a (papers.md §10 check 22),
the γ search against closed forms, the local Lipschitz bound against exact Jacobians and secants sampled in
the ball (hypothesis), the regularizer and noise module, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lipkern.certify import (ABSTAIN, GaussianNoise, LocalReluLipschitz, RandomizedSmoothing, SplitzCertifier,
                             splitz_regularizer)


def _right(seed: int = 0, features: int = 6, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


def _certifiable_input(right: nn.Module, features: int = 6) -> torch.Tensor:
    """An input far from right's decision boundaries (so that Cohen certifies a positive radius)."""
    torch.manual_seed(1)
    candidates = torch.randn(256, features) * 2
    with torch.no_grad():
        top2 = right(candidates).topk(2, dim=1).values
    return candidates[(top2[:, 0] - top2[:, 1]).argmax()]


ARGS = dict(n0=50, n=2000, alpha=1e-3, batch_size=500, seed=7)


# --- closed forms ------------------------------------------------------------------------------------------
def test_identity_left_reproduces_cohen_exactly():
    right = _right()
    x = _certifiable_input(right)
    label, radius = RandomizedSmoothing(right, 0.5, 3).certify(x, **ARGS)
    assert label != ABSTAIN and radius > 0
    for left in (nn.Identity(), nn.Sequential(nn.Identity(), nn.Flatten())):
        assert SplitzCertifier(left, right, 0.5, 3, evaluation=None).certify(x, **ARGS) == (label, radius, radius)
        # the default covers the left half's float32 evaluation: an identity's rounding bound is a few tiny
        # absolute terms (below float32's normal range), so the radius is Cohen's less an ulp or two
        got_label, covered, _ = SplitzCertifier(left, right, 0.5, 3).certify(x, **ARGS)
        assert got_label == label and radius * (1 - 1e-15) <= covered <= radius


def test_scaled_left_scales_radius():
    """left = a·x (an nn.Linear with weight a·I): the radius is Cohen's radius of right at a·x divided by a
    (the local bound of a·I is a up to the Gram bound's 1e-7)."""
    right = _right()
    z = _certifiable_input(right)
    for a in (0.5, 3.0):
        left = nn.Linear(6, 6, bias=False)
        with torch.no_grad():
            left.weight.copy_(a * torch.eye(6))
        x = z / a
        label, cohen = RandomizedSmoothing(right, 0.5, 3).certify(left(x[None])[0].detach(), **ARGS)
        got_label, radius, gamma = SplitzCertifier(left, right, 0.5, 3, evaluation=None).certify(x, **ARGS)
        assert got_label == label != ABSTAIN
        assert cohen / a * (1 - 1e-6) <= radius <= cohen / a
        assert gamma == pytest.approx(radius, rel=1e-6)
        # covering left's float32 evaluation costs its rounding: 2P off R_right, Q onto L (≈ 1e-6 relative)
        _, covered, _ = SplitzCertifier(left, right, 0.5, 3).certify(x, **ARGS)
        assert cohen / a * (1 - 2e-5) <= covered < radius


def test_bounds_follow_the_current_weights():
    """Weights changed between two certify calls (training) are seen: the radius halves when left doubles."""
    right = _right()
    z = _certifiable_input(right)
    left = nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        left.weight.copy_(torch.eye(6))
    certifier = SplitzCertifier(left, right, 0.5, 3)
    _, first, _ = certifier.certify(z, **ARGS)
    with torch.no_grad():
        left.weight.mul_(2.0)
    _, second, _ = certifier.certify(z / 2, **ARGS)
    assert second == pytest.approx(first / 2, rel=1e-6) and second <= first / 2 * (1 + 1e-12)


def test_gamma_search_with_user_bounds():
    """A constant user bound gives R/L exactly; L(γ) = 1 + γ gives the crossing γ* = (√(1 + 4R) − 1)/2."""
    right = _right()
    x = _certifiable_input(right)
    _, cohen = RandomizedSmoothing(right, 0.5, 3).certify(x, **ARGS)
    constant = SplitzCertifier(nn.Identity(), right, 0.5, 3, local_lipschitz=lambda x, g: 2.0, evaluation=None)
    label, radius, _ = constant.certify(x, **ARGS)
    assert radius == cohen / 2
    growing = SplitzCertifier(nn.Identity(), right, 0.5, 3, local_lipschitz=lambda x, g: 1.0 + min(g, 1e9),
                              evaluation=None)
    label, radius, gamma = growing.certify(x, **ARGS)
    best = (math.sqrt(1 + 4 * cohen) - 1) / 2
    assert radius <= best * (1 + 1e-12)
    assert radius == pytest.approx(best, rel=2e-3)  # 14 bisection steps
    assert radius == pytest.approx(min(cohen / (1 + gamma), gamma), rel=1e-12)


def test_splitz_with_relu_left_is_sound_against_sampled_secants():
    """A ReLU left half: the returned (radius, γ) satisfy radius ≤ γ and, for points x' sampled in the ball of
    that radius, ‖left(x') − left(x)‖ < R_right (the property the certificate rests on)."""
    torch.manual_seed(2)
    left = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 6), nn.ReLU())
    right = _right()
    x = torch.randn(5)
    certifier = SplitzCertifier(left, right, 0.5, 3)
    label, radius, gamma = certifier.certify(x, **ARGS)
    _, cohen = RandomizedSmoothing(right, 0.5, 3).certify(left(x[None])[0].detach(), **ARGS)
    if label == ABSTAIN:
        pytest.skip("right half abstains at this input")
    assert 0 < radius <= gamma
    directions = torch.randn(2000, 5, dtype=torch.float64)
    points = x.double() + directions / directions.norm(dim=1, keepdim=True) * radius
    left64 = left.double()
    with torch.no_grad():
        moved = (left64(points) - left64(x.double()[None])).norm(dim=1)
    assert (moved < cohen).all()
    assert radius >= cohen / LocalReluLipschitz(left, (5,)).global_bound() * (1 - 1e-12)


# --- the local bound ---------------------------------------------------------------------------------------
def _jacobian_norms(module: nn.Module, points: torch.Tensor) -> torch.Tensor:
    """Exact spectral norms of the Jacobian at each point (float64 autograd + SVD)."""
    jacobians = torch.func.vmap(torch.func.jacrev(lambda p: module(p[None]).reshape(-1)))(points)
    return torch.linalg.matrix_norm(jacobians.reshape(len(points), -1, points[0].numel()), 2)


def _exact_product(module: nn.Module, input_shape) -> float:
    from tests.helpers import dense_conv2d

    value, shape = 1.0, tuple(input_shape)
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            value *= torch.linalg.matrix_norm(layer.weight.detach().double(), 2).item()
        elif isinstance(layer, nn.Conv2d):
            matrix = dense_conv2d(layer.weight.detach(), shape[1:], padding=layer.padding,
                                  stride=layer.stride)
            value *= torch.linalg.matrix_norm(matrix, 2).item()
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.Flatten)):
            with torch.no_grad():
                dtype = layer.weight.dtype if hasattr(layer, "weight") else torch.float32
                shape = tuple(layer(torch.zeros(1, *shape, dtype=dtype)).shape[1:])
    return value


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), log_gamma=st.floats(-3.0, 1.0), conv=st.booleans())
def test_local_bound_is_above_sampled_jacobians_and_below_global(seed, log_gamma, conv):
    torch.manual_seed(seed)
    if conv:
        module = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
                               nn.Conv2d(3, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                               nn.Linear(8, 5), nn.ReLU())
        shape = (1, 4, 4)
    else:
        module = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4))
        shape = (6,)
    module = module.double()
    with torch.no_grad():
        for m in module.modules():
            if hasattr(m, "bias") and m.bias is not None:
                m.bias.normal_(0, 0.5)
    x = torch.randn(shape, dtype=torch.float64)
    gamma = 10.0 ** log_gamma
    local = LocalReluLipschitz(module, shape)
    bound = local(x, gamma)
    global_exact = _exact_product(module, shape)
    assert bound <= global_exact * (1 + 1e-6)
    assert local(x, math.inf) >= global_exact and local(x, math.inf) <= global_exact * (1 + 1e-6)
    directions = torch.randn(40, *shape, dtype=torch.float64)
    radii = gamma * torch.rand(40, dtype=torch.float64) ** (1 / x.numel())
    points = x + directions / directions.flatten(1).norm(dim=1).reshape(-1, *[1] * len(shape)) \
        * radii.reshape(-1, *[1] * len(shape))
    assert (_jacobian_norms(module, points) <= bound * (1 + 1e-9)).all()
    with torch.no_grad():
        moved = (module(points) - module(x[None])).flatten(1).norm(dim=1)
        secants = moved / (points - x).flatten(1).norm(dim=1)
    assert (secants <= bound * (1 + 1e-9)).all()
    assert local(x, gamma * 2) >= bound * (1 - 1e-6), "non-decreasing in γ (up to the Gram slack)"


def test_local_bound_is_tighter_than_global_for_small_balls():
    """Not only sound: with a small ball the stably inactive neurons are dropped (bound < ∏‖A_k‖)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    local = LocalReluLipschitz(module, (6,))
    x = torch.randn(6)
    assert local(x, 1e-3) < 0.8 * local.global_bound()
    assert local(x, 0.0) <= local(x, 1e-3) <= local(x, 1.0) <= local(x, 1e3) * (1 + 1e-6)


def test_local_bound_rejects_unsupported_layers():
    with pytest.raises(ValueError, match="nn.Linear"):
        LocalReluLipschitz(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), (3,))
    with pytest.raises(ValueError, match="flatten"):
        LocalReluLipschitz(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Linear(1, 2)), (1, 3, 3))
    with pytest.raises(ValueError, match="max_entries"):
        LocalReluLipschitz(nn.Conv2d(3, 16, 3, padding=1), (3, 32, 32))
    with pytest.raises(ValueError, match="gamma"):
        LocalReluLipschitz(nn.Linear(3, 3), (3,))(torch.zeros(3), -1.0)
    with pytest.raises(ValueError, match="shape"):
        LocalReluLipschitz(nn.Linear(3, 3), (3,))(torch.zeros(4), 1.0)


def test_unsupported_left_uses_the_global_bound_or_says_why():
    """A left half the local bound does not know (Tanh) falls back to the constant global bound
    lipkern.bounds.lipschitz_bound(left, shape): radius = R_right / L exactly (rounded down)."""
    bounds = pytest.importorskip("lipkern.bounds")
    right = _right()
    torch.manual_seed(4)
    left = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    x = _certifiable_input(right)
    with pytest.raises(ValueError, match="evaluation=None"):  # Tanh's rounding is not analyzed: said so
        SplitzCertifier(left, right, 0.5, 3).certify(x, **ARGS)
    certifier = SplitzCertifier(left, right, 0.5, 3, evaluation=None)
    if not hasattr(bounds, "lipschitz_bound"):
        with pytest.raises(ValueError, match="local_lipschitz"):
            certifier.certify(x, **ARGS)
        return
    with torch.no_grad():
        z = left(x[None])[0]
    label, cohen = RandomizedSmoothing(right, 0.5, 3).certify(z, **ARGS)
    if label == ABSTAIN:
        pytest.skip("right half abstains at left(x)")
    bound = float(bounds.lipschitz_bound(left, (6,)))
    assert bound >= torch.linalg.matrix_norm(left[0].weight.detach().double(), 2).item()
    got_label, radius, gamma = certifier.certify(x, **ARGS)
    assert got_label == label
    assert radius <= cohen / bound and radius == pytest.approx(cohen / bound, rel=1e-15) and gamma == radius

    class Custom(nn.Module):  # neither bound knows it: a clear error
        def forward(self, x):
            return x

    with pytest.raises((TypeError, ValueError), match="unsupported|local_lipschitz"):
        SplitzCertifier(Custom(), right, 0.5, 3, evaluation=None).certify(x, **ARGS)


def test_local_bound_is_capped_by_the_global_bound():
    bounds = pytest.importorskip("lipkern.bounds")
    if not hasattr(bounds, "lipschitz_bound"):
        pytest.skip("lipkern.bounds.lipschitz_bound not there yet")
    torch.manual_seed(5)
    left = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 6))
    certifier = SplitzCertifier(left, _right(), 0.5, 3)
    x = torch.randn(6)
    global_value = float(bounds.lipschitz_bound(left, (6,)))
    local = LocalReluLipschitz(left, (6,))
    for gamma in (1e-2, 1.0, math.inf):
        assert certifier.lipschitz_at(x, gamma) == min(local(x, gamma), global_value)


# --- training helpers and bad input ------------------------------------------------------------------------
def test_regularizer_and_noise():
    estimate = torch.tensor([0.3, 0.5, 1.25], requires_grad=True)
    penalty = splitz_regularizer(estimate, lam=0.8, theta=0.5)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, 0.6]))
    penalty.sum().backward()
    torch.testing.assert_close(estimate.grad, torch.tensor([0.0, 0.0, 0.8]))
    with pytest.raises(ValueError, match="lam"):
        splitz_regularizer(estimate, lam=-1.0)
    noise = GaussianNoise(0.5)
    z = torch.zeros(20000)
    assert noise(z).std().item() == pytest.approx(0.5, rel=0.05)
    noise.eval()
    assert torch.equal(noise(z), z)
    with pytest.raises(ValueError, match="sigma"):
        GaussianNoise(-1.0)


def test_splitz_bad_input():
    right = _right()
    with pytest.raises(TypeError, match="local_lipschitz"):
        SplitzCertifier(nn.Identity(), right, 0.5, 3, local_lipschitz=3.0)
    with pytest.raises(ValueError, match="sigma"):
        SplitzCertifier(nn.Identity(), right, -0.5, 3)
    bad = SplitzCertifier(nn.Identity(), right, 0.5, 3, local_lipschitz=lambda x, g: float("nan"))
    x = _certifiable_input(right)
    with pytest.raises(ValueError, match="local_lipschitz returned"):
        bad.certify(x, **ARGS)
    with pytest.raises(ValueError, match="n0"):
        SplitzCertifier(nn.Identity(), right, 0.5, 3).certify(x, **(ARGS | dict(n0=3000)))


# --- BatchNorm, average pooling, MaxMin and lipkern layers in the left half ----------------------------------
def _mixed_left(seed: int, kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """Left halves with the layers beyond Linear / Conv2d / ReLU (float64, eval-mode BatchNorm with non-trivial
    running statistics)."""
    from lipkern.nn import AOLConv2d, MaxMin

    torch.manual_seed(seed)
    if kind == "bn-pool":
        module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2),
                               nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5),
                               nn.BatchNorm1d(5), nn.ReLU())
    elif kind == "maxmin":
        module = nn.Sequential(AOLConv2d(1, 4, 3, padding=1), MaxMin(), AOLConv2d(4, 4, 3, padding=1),
                               MaxMin(), nn.AvgPool2d(2, stride=1), nn.Flatten(), nn.Linear(36, 6), nn.ReLU())
    elif kind == "conv-pool":  # pooling right after a linear map: composed by pooling its columns
        module = nn.Sequential(AOLConv2d(1, 4, 3, padding=1), nn.AvgPool2d(2), MaxMin(),
                               nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
                               nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False), nn.ReLU(),
                               nn.Flatten(), nn.Linear(36, 5))
    else:  # pooling first, then a lone BatchNorm between two activations
        module = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
                               nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU(),
                               nn.Flatten(), nn.Linear(64, 5))
    module = module.double()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.2, 3.0)
                m.weight.normal_(1, 0.5)
                m.bias.normal_(0, 0.5)
            elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.normal_(0, 0.5)
    return module.eval(), (1, 4, 4)


def _dense_jacobian_product(module: nn.Module, shape) -> float:
    """∏ over the activation-separated blocks of the exact norm of each block's linear part, from the dense
    Jacobian of the block (float64 autograd + SVD): the oracle of the global bound."""
    from lipkern.nn import MaxMin

    value, block, current = 1.0, [], tuple(shape)
    layers = [m for m in module.modules() if not isinstance(m, nn.Sequential)]
    for layer in layers + [None]:
        if layer is None or isinstance(layer, (nn.ReLU, MaxMin)):
            if block:
                seq = nn.Sequential(*block).eval()
                jac = torch.autograd.functional.jacobian(lambda p: seq(p[None]).reshape(-1),
                                                         torch.zeros(current, dtype=torch.float64))
                value *= torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), 2).item()
                with torch.no_grad():
                    current = tuple(seq(torch.zeros(1, *current, dtype=torch.float64)).shape[1:])
                block = []
            continue
        block.append(layer)
    return value


@pytest.mark.parametrize("kind", ["bn-pool", "maxmin", "conv-pool", "lone-bn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_local_bound_with_batchnorm_pooling_maxmin_is_sound_and_tight(kind, seed):
    """The global form equals the product of the exact norms of the composed linear blocks (dense Jacobian
    SVD) within the Gram slack; the local form lies above the Jacobian norm and the secants at points sampled
    in the ball, and below the global form."""
    module, shape = _mixed_left(seed, kind)
    local = LocalReluLipschitz(module, shape)
    exact = _dense_jacobian_product(module, shape)
    assert exact <= local.global_bound() <= exact * (1 + 1e-6)
    x = torch.randn(shape, dtype=torch.float64)
    for gamma in (1e-3, 0.1, 1.0):
        bound = local(x, gamma)
        assert bound <= local.global_bound() * (1 + 1e-6)
        directions = torch.randn(60, *shape, dtype=torch.float64)
        radii = gamma * torch.rand(60, 1, 1, 1, dtype=torch.float64) ** (1 / x.numel())
        points = x + directions / directions.flatten(1).norm(dim=1)[:, None, None, None] * radii
        assert (_jacobian_norms(module, points) <= bound * (1 + 1e-9)).all()
        with torch.no_grad():
            secants = (module(points) - module(x[None])).flatten(1).norm(dim=1) / radii.flatten()
        assert (secants <= bound * (1 + 1e-9)).all()


def test_local_bound_drops_stable_units_through_batchnorm_and_pooling():
    """Not only sound: a small ball around a point drops the inactive units of a BatchNorm / pooling left half
    (bound well below the global one)."""
    module, shape = _mixed_left(0, "bn-pool")
    local = LocalReluLipschitz(module, shape)
    x = torch.randn(shape, dtype=torch.float64)
    assert local(x, 1e-4) < 0.9 * local.global_bound()


def test_local_bound_of_lipkern_layers_uses_the_applied_weight():
    """An AOL conv left half: the bound is that of the rescaled (applied) kernel, ≤ 1 up to the slack, and a
    perturbation of the raw weight that AOL's rescaling undoes leaves it unchanged."""
    from lipkern.nn import AOLConv2d

    torch.manual_seed(0)
    layer = AOLConv2d(2, 4, 3, padding=1).double().eval()
    local = LocalReluLipschitz(nn.Sequential(layer, nn.ReLU()), (2, 5, 5))
    before = local.global_bound()
    assert before <= 1 + 1e-6
    from tests.helpers import dense_conv2d

    applied = layer.to_vanilla().weight.detach()
    exact = torch.linalg.matrix_norm(dense_conv2d(applied, (5, 5), padding=1), 2).item()
    assert exact <= before <= exact * (1 + 1e-6)


def test_local_bound_refuses_what_it_cannot_bound():
    from lipkern.nn import MaxMin

    with pytest.raises(ValueError, match="even"):
        LocalReluLipschitz(nn.Sequential(nn.Conv2d(1, 3, 1), MaxMin()), (1, 2, 2))
    with pytest.raises(ValueError, match="dim"):
        LocalReluLipschitz(nn.Sequential(nn.Conv2d(1, 2, 1), MaxMin(dim=2)), (1, 2, 2))
    with pytest.raises(ValueError, match="max_entries"):
        LocalReluLipschitz(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(5000), nn.ReLU()), (5000,))
    untracked = nn.BatchNorm2d(2, track_running_stats=False)
    with pytest.raises(ValueError, match="nn.Sequential"):
        LocalReluLipschitz(nn.Sequential(nn.Conv2d(1, 2, 1), untracked), (1, 2, 2))


# --- an independent review's counterexamples (each gave a bound below the true constant, or a stale one) -----
def test_composed_bias_rounding_is_charged_at_the_dot_products_length():
    """BatchNorm1d(4096) → Linear → ReLU → Linear with biases that cancel at 2⁶⁰: the float64 pre-activation
    errs by ~1e-14·2⁶⁰; a bound of one rounding per entry made the active unit look inactive (L = 0 < 64)."""
    from fractions import Fraction

    n, k = 4096, 60
    bn = nn.BatchNorm1d(n, eps=0.0).eval()
    lin, out = nn.Linear(n, 1), nn.Linear(1, 1)
    with torch.no_grad():
        bn.running_mean.zero_(), bn.running_var.fill_(1.0), bn.weight.fill_(1.0)
        beta = torch.full((n,), 2.0 ** (k - 54))
        beta[0], beta[-1] = 2.0 ** k, 0.0
        bn.bias.copy_(beta)
        lin.weight.fill_(1.0), lin.bias.fill_(-(2.0 ** k)), out.weight.fill_(1.0), out.bias.zero_()
        computed = (lin.weight.double() @ bn.bias.double() + lin.bias.double()).item()
        exact = sum(Fraction(v) for v in bn.bias.tolist()) + Fraction(lin.bias.item())
        bn.bias[-1] = -float((Fraction(computed) + exact) / 2)  # the exact value now lies past the float64 one
    exact = sum(Fraction(v) for v in bn.bias.double().tolist()) + Fraction(lin.bias.item())
    assert exact - 64 * 50 > 0  # the unit is active on every ball below: the local constant is 64
    local = LocalReluLipschitz(nn.Sequential(bn, lin, nn.ReLU(), out), (n,))
    assert all(local(torch.zeros(n), gamma) >= 64 for gamma in (1.0, 50.0))


def test_underflow_never_hides_a_slope():
    """Row norms whose squares underflow ([1e-170, 1e-170]) and products of norms that underflow (1e-38 nine
    times, then 1e38 nine times) once gave L = 0: now a bound at or above the exact slope."""
    a, b = nn.Linear(2, 2).double(), nn.Linear(2, 1).double()
    with torch.no_grad():
        a.weight.copy_(1e-170 * torch.eye(2, dtype=torch.float64)), a.bias.fill_(1e-160)
        b.weight.fill_(1e170), b.bias.zero_()
    local = LocalReluLipschitz(nn.Sequential(a, nn.ReLU(), b), (2,))
    assert local(torch.zeros(2, dtype=torch.float64), 1.0) >= math.sqrt(2)
    layers = []
    for k in range(18):
        layer = nn.Linear(1, 1)
        with torch.no_grad():
            layer.weight.fill_(1e-38 if k < 9 else 1e38), layer.bias.fill_(1.0)
        layers += [layer, nn.ReLU()]
    slope = math.prod(layer.weight.item() for layer in layers[::2])
    local = LocalReluLipschitz(nn.Sequential(*layers[:-1]), (1,))
    assert local.global_bound() >= slope and local(torch.zeros(1), 1.0) >= slope


def test_unbounded_or_negative_maps_are_refused():
    """A negative pooling divisor and a float64 composition that overflows (inf − inf) give no bound: a clear
    error instead of a box that NaN comparisons drop."""
    with pytest.raises(ValueError, match="divisor_override"):
        LocalReluLipschitz(nn.Sequential(nn.Conv2d(1, 1, 1), nn.AvgPool2d(2, divisor_override=-1), nn.ReLU()),
                           (1, 2, 2))
    layers = []
    for _ in range(8):
        layer = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([[1e38, 0.0], [0.0, 1.0]]))
        layers.append(layer)
    last = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        last.weight.copy_(torch.tensor([[1e38, 1.0], [1e38, 0.0]]))
    with pytest.raises(ValueError, match="not finite"):
        LocalReluLipschitz(nn.Sequential(*layers, last, nn.Linear(2, 1), nn.ReLU()), (2,))


def test_a_reused_certifier_follows_the_left_halfs_structure_attributes_and_shape():
    """Bounds are reused while the left half is unchanged, and recomputed when a layer is swapped, a BatchNorm's
    eps changes or the input shape changes: the reused certifier agrees with a fresh one every time."""
    args = dict(n0=10, n=500, alpha=0.01, batch_size=500, seed=0)
    right = nn.Linear(4, 2)
    x = torch.zeros(4)
    left = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        left[0].bias.fill_(-3.0)  # every ReLU inactive near x
    reused = SplitzCertifier(left, right, 0.5, 2)
    reused.certify(x, **args)
    left[1] = nn.Identity()
    assert reused.certify(x, **args) == SplitzCertifier(left, right, 0.5, 2).certify(x, **args)
    bn = nn.BatchNorm1d(4, eps=1.0).eval()
    with torch.no_grad():
        bn.running_var.fill_(1e-6)
    left = nn.Sequential(nn.Linear(4, 4), bn)
    reused = SplitzCertifier(left, nn.Linear(4, 2), 0.5, 2)
    before = reused.certify(x, **args)
    bn.eps = 1e-5
    after = reused.certify(x, **args)
    assert after == SplitzCertifier(left, reused.smoothing.base, 0.5, 2).certify(x, **args) != before
    conv = nn.Conv2d(1, 1, (1, 3), padding=(0, 1), bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    left = nn.Sequential(conv, nn.MaxPool2d(1))  # the global bound only; it grows with the width
    right = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2))
    reused = SplitzCertifier(left, right, 0.5, 2)
    reused.certify(torch.ones(1, 1, 2), **args)
    big = torch.ones(1, 1, 64)
    assert reused.certify(big, **args) == SplitzCertifier(left, right, 0.5, 2).certify(big, **args)


def test_the_left_halfs_rounding_is_charged_to_the_radius():
    """left = Linear(+1e8 bias) then Linear(−1e8 bias): exactly the identity, but float32 returns 0 at x = 3.
    The right half's class at the computed 0 is not the smoothed class at the exact 3: the certificate must
    not claim a radius there, for the deployed (default) or the exact left half."""
    a, b = nn.Linear(1, 1), nn.Linear(1, 1)
    with torch.no_grad():
        a.weight.fill_(1.0), a.bias.fill_(1e8), b.weight.fill_(1.0), b.bias.fill_(-1e8)
    right = nn.Linear(1, 2)
    with torch.no_grad():
        right.weight.copy_(torch.tensor([[-1.0], [1.0]])), right.bias.copy_(torch.tensor([1.5, -1.5]))
    args = dict(n0=100, n=2000, alpha=0.001, batch_size=1000, seed=0)
    x = torch.tensor([3.0])
    assert nn.Sequential(a, b)(x[None]).item() == 0.0
    for evaluation in ("auto", "exact"):
        label, radius, _ = SplitzCertifier(nn.Sequential(a, b), right, 0.25, 2, evaluation=evaluation).certify(
            x, **args)
        assert radius == 0.0
    label, radius, _ = SplitzCertifier(nn.Sequential(a, b), right, 0.25, 2, evaluation=None).certify(x, **args)
    assert radius > 0  # what it claimed before: the rounding of the left half ignored
