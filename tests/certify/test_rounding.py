"""The certificate covers the network as it runs (issue 16, item 2): the bound of lipkern.certify.rounding on
the floating-point evaluation error of the logits holds against float32 evaluations in several summation
orders (PyTorch's kernels and a sequential sum in a random order per layer), TF32-rounded operands, inputs in a
ball around the analyzed point and badly conditioned inputs; a constructed network where dropping the term
certifies a point that float32 evaluation flips; certified points keep their prediction in float32; the
frozen weights are the applied ones. Oracle of the exact logits: the float64 evaluation (its own error on these
networks is below 1e-12, far under the float32 bounds checked; FLOAT64_SLACK below)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipkern.nn as L
from lipkern.certify import certified_accuracy, certified_radius
from lipkern.certify.rounding import PRECISIONS, RoundingAnalysis, gamma
from lipkern.models import Normalize, Residual, build_model, to_vanilla
from tests.helpers import ChannelScale

FLOAT64_SLACK = 1e-9  # the oracle's own error (float64 evaluation of these small networks), far above it


@pytest.fixture(autouse=True)
def _torch_backend(knobs):
    knobs(backend="torch")


def _conv_net():
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 4, stride=2, padding=1),
                         nn.LeakyReLU(0.1), nn.Conv2d(8, 6, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 10))


def _bn_net():
    net = nn.Sequential(Normalize([0.4, 0.6], [0.3, 0.2]), nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(8 * 2 * 2, 5))
    net[2].running_mean.uniform_(-0.5, 0.5)
    net[2].running_var.uniform_(0.2, 3.0)
    net[2].weight.data.uniform_(0.5, 2.0)
    net[2].bias.data.uniform_(-1, 1)
    return net.eval()


def _residual_cpl_net():
    cpl = L.CPLConv2d(2, 6, input_size=8, certified=True)
    cpl(torch.rand(2, 2, 8, 8))  # a few power-iteration steps
    cpl.eval()
    branch = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))
    head = L.CPLLinear(2 * 8 * 8, 32, certified=True)
    head(torch.rand(2, 2 * 8 * 8))
    return nn.Sequential(cpl, L.MaxMin(), Residual(branch), nn.Flatten(), head.eval(),
                         nn.Linear(2 * 8 * 8, 4)).eval()


def _aol_net():
    torch.manual_seed(3)
    return build_model("convnet-xs-aol", num_classes=10, in_channels=2, input_size=8, width=8).eval()


NETWORKS = {"conv": _conv_net, "batchnorm-pool": _bn_net, "residual-cpl": _residual_cpl_net, "aol": _aol_net}


def _inputs(count: int, generator) -> torch.Tensor:
    """Images in [0, 1], and badly conditioned ones: large entries of alternating sign (cancellation)."""
    x = torch.rand(count, 2, 8, 8, generator=generator)
    signs = torch.where(torch.rand(count // 4, 2, 8, 8, generator=generator) < 0.5, -1.0, 1.0)
    x[: count // 4] = 300.0 * signs * torch.rand(count // 4, 2, 8, 8, generator=generator)
    return x


def _round_tf32(t: torch.Tensor) -> torch.Tensor:
    """t rounded to 10 mantissa bits (to nearest, ties away): what a TF32 tensor core multiplies."""
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _sequential_sum(products: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Σ over the last dim of float32 ``products`` one term at a time in ``order``: another summation order."""
    total = torch.zeros(products.shape[:-1], dtype=torch.float32)
    for k in order.tolist():
        total = total + products[..., k]
    return total


def _conv_in_order(module: nn.Conv2d, x: torch.Tensor, order_seed: int, tf32: bool = False) -> torch.Tensor:
    mode = "circular" if module.padding_mode == "circular" else "constant"
    pad = module._reversed_padding_repeated_twice
    cols = F.unfold(F.pad(x, pad, mode=mode), module.kernel_size, stride=module.stride)  # (B, n, P), copies
    weight = module.weight.reshape(module.out_channels, -1)
    if tf32:
        cols, weight = _round_tf32(cols), _round_tf32(weight)
    products = weight[None, :, None, :] * cols.transpose(1, 2)[:, None, :, :]  # (B, out, P, n): exact products
    if module.bias is not None:
        products = torch.cat([products, module.bias.reshape(1, -1, 1, 1).expand(*products.shape[:3], 1)], dim=-1)
    order = torch.randperm(products.shape[-1], generator=torch.Generator().manual_seed(order_seed))
    out = _sequential_sum(products, order)
    side = int(math.isqrt(out.shape[-1]))
    return out.reshape(x.shape[0], module.out_channels, side, side)


def _linear_in_order(module: nn.Linear, x: torch.Tensor, order_seed: int, tf32: bool = False) -> torch.Tensor:
    weight = module.weight
    if tf32:
        x, weight = _round_tf32(x), _round_tf32(weight)
    products = weight[None] * x[:, None, :]
    if module.bias is not None:
        products = torch.cat([products, module.bias.reshape(1, -1, 1).expand(x.shape[0], -1, 1)], dim=-1)
    order = torch.randperm(products.shape[-1], generator=torch.Generator().manual_seed(order_seed))
    return _sequential_sum(products, order)


def _evaluate_in_order(model: nn.Module, x: torch.Tensor, seed: int, tf32: bool = False) -> torch.Tensor:
    """The frozen float32 network with every conv / linear summed term by term in a random order (and with
    TF32-rounded operands if asked); other layers as PyTorch computes them in float32."""
    def leaves(module):
        children = module.layers if hasattr(module, "layers") else module
        if isinstance(children, nn.Sequential):
            return [leaf for child in children for leaf in leaves(child)]
        return [module]

    h = x
    for i, module in enumerate(leaves(to_vanilla(model))):
        if type(module) is nn.Conv2d:
            h = _conv_in_order(module, h, seed + i, tf32)
        elif type(module) is nn.Linear:
            h = _linear_in_order(module, h, seed + i, tf32)
        else:
            h = module(h)
    return h


@pytest.mark.parametrize("name", list(NETWORKS))
def test_error_bound_covers_float32_logits_in_a_ball(name):
    """‖f̂(z) − f(z)‖ ≤ center(x) + slope·‖z − x‖ for z around 1,200 points (a quarter badly conditioned), f̂
    the float32 evaluation by PyTorch's kernels (the lipkern model itself and its frozen export)."""
    torch.manual_seed(0)
    model = NETWORKS[name]()
    generator = torch.Generator().manual_seed(1)
    x = _inputs(400, generator)
    analysis = RoundingAnalysis(model, (2, 8, 8), "float32")
    bound = analysis(x)
    assert torch.isfinite(bound.center).all() and bound.slope < 1e-2
    exported = to_vanilla(model)
    reference = to_vanilla(model).double()
    for radius in (0.0, 0.05, 1.0):
        direction = torch.randn(x.shape, generator=generator)
        direction = direction / direction.flatten(1).norm(dim=1)[:, None, None, None]
        z = (x + radius * direction).float()
        distance = (z.double() - x.double()).flatten(1).norm(dim=1)
        with torch.no_grad():
            exact = reference(z.double())
            for deployed in (model(z), exported(z)):
                error = (deployed.double() - exact).norm(dim=1)
                allowed = bound.center + bound.slope * distance + FLOAT64_SLACK
                assert (error <= allowed).all(), (name, radius, (error / allowed).max().item())
    with torch.no_grad():
        assert (bound.logits - reference(x.double())).abs().max() == 0  # the float64 evaluation itself


@pytest.mark.parametrize("name", ["conv", "batchnorm-pool", "aol"])
def test_error_bound_covers_other_summation_orders_and_tf32(name):
    """Every conv and linear layer summed one term at a time in a random order (three orders), and with
    TF32-rounded operands against the 'tf32' bound (which the float32 bound does not cover)."""
    torch.manual_seed(0)
    model = NETWORKS[name]()
    x = _inputs(160, torch.Generator().manual_seed(2))
    exact = to_vanilla(model).double()(x.double()).detach()
    bound32 = RoundingAnalysis(model, (2, 8, 8), "float32")(x)
    bound_tf32 = RoundingAnalysis(model, (2, 8, 8), "tf32")(x)
    assert (bound_tf32.center > bound32.center).all()
    with torch.no_grad():
        for seed in range(3):
            error = (_evaluate_in_order(model, x, 100 * seed).double() - exact).norm(dim=1)
            assert (error <= bound32.center + FLOAT64_SLACK).all(), (error / bound32.center).max().item()
        error = (_evaluate_in_order(model, x, 7, tf32=True).double() - exact).norm(dim=1)
    assert (error <= bound_tf32.center + FLOAT64_SLACK).all(), (error / bound_tf32.center).max().item()
    assert (error > bound32.center).any(), "TF32 rounding exceeds the float32 bound somewhere: the test can fail"


def test_dropping_the_rounding_term_certifies_a_point_that_float32_flips():
    """f_0 = x_0 + x_1 + x_2, f_1 = 0.5 at x = (2²⁴, 1, −2²⁴): the real network predicts class 0 with margin
    0.5 (radius 0.5/√3 > 0 for the real-arithmetic network), but float32 summed left to right gives f_0 = 0:
    the deployed network predicts class 1 at x itself. With the rounding term the point is not certified."""
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
        model.bias.copy_(torch.tensor([0.0, 0.5]))
    x = torch.tensor([[2.0 ** 24, 1.0, -(2.0 ** 24)]])
    y = torch.tensor([0])
    exact_only = certified_accuracy(model, (x, y), [0.0], pairwise=True, evaluation="exact")
    assert exact_only.radii[0] > 0.28 and exact_only.accuracy[0] == 1.0
    products = (model.weight[None] * x[:, None, :]).detach()
    f0 = (products[0, 0, 0] + products[0, 0, 1]) + products[0, 0, 2]  # float32, left to right
    assert f0.item() == 0.0 and f0 < model.bias[1]  # the deployed prediction is class 1
    deployed = certified_accuracy(model, (x, y), [0.0], pairwise=True, evaluation="float32")
    assert deployed.radii[0] == 0.0 and deployed.accuracy[0] == 0.0
    assert deployed.rounding[0] > 0.5


@pytest.mark.parametrize("name", ["conv", "residual-cpl", "aol"])
def test_certified_points_keep_their_prediction_in_float32(name):
    """Radius > 0 under the float32 certificate implies the float32 model predicts the certified class (the
    radius-0 case of the theorem), and the float32 radii never exceed the real-arithmetic ones."""
    torch.manual_seed(0)
    model = NETWORKS[name]()
    x = torch.rand(600, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        predicted = model(x).argmax(1)
    y = predicted.clone()
    y[::3] = (y[::3] + 1) % 4
    deployed = certified_accuracy(model, (x, y), [0.0], pairwise=True)
    exact = certified_accuracy(model, (x, y), [0.0], pairwise=True, evaluation="exact")
    assert deployed.evaluation == "float32" and exact.evaluation == "exact"
    assert (deployed.radii <= exact.radii).all() and (deployed.radii > 0).sum() > 100
    certified = deployed.correct & (deployed.radii > 0)
    assert (predicted[certified] == y[certified]).all()


def test_frozen_weights_are_the_applied_ones():
    """The analysis certifies the AOL weight the model applies (float32, upcast exactly), not a float64
    recomputation, which differs."""
    model = _aol_net()
    analysis = RoundingAnalysis(model, (2, 8, 8), "float32")
    layer = next(m for m in model.modules() if isinstance(m, L.AOLConv2d))
    frozen = next(m for m in analysis.model.modules() if isinstance(m, nn.Conv2d))
    applied = layer.rescaled_weight().detach()
    assert frozen.weight.dtype == torch.float64 and torch.equal(frozen.weight, applied.double())
    import copy

    recomputed = copy.deepcopy(layer).double().rescaled_weight().detach()
    assert not torch.equal(recomputed, applied.double())


def test_unsupported_layers_are_named_and_none_keeps_the_logits():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(TypeError, match="Tanh.*evaluation=None"):
        certified_accuracy(model, (x, y), [0.0], lipschitz=10.0)
    result = certified_accuracy(model, (x, y), [0.0], lipschitz=10.0, evaluation=None)
    assert result.evaluation is None and result.rounding is None
    with torch.no_grad():
        assert torch.equal(result.radii, certified_radius(model(x), 10.0))
    with pytest.raises(ValueError, match="evaluation must be one of"):
        certified_accuracy(model, (x, y), [0.0], lipschitz=10.0, evaluation="bf16")
    with pytest.warns(DeprecationWarning, match="dtype"):
        certified_accuracy(model, (x, y), [0.0], lipschitz=10.0, evaluation=None, dtype=torch.float64)


def test_radius_with_an_error_term_against_exact_rationals():
    """certified_radius(error=, error_slope=) ≤ min_j ((f_y − f_j) − √2·e) / (L_yj + √2·s) (global L:
    L_yj = √2·L) in exact rationals, and within 1e-14 of it. The quotient decreases in √2, so the rational
    ROOT2_ABOVE > √2 gives a value below the real one."""
    root2 = Fraction(14142135623730951, 10**16)  # > √2
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, generator=generator, dtype=torch.float64)
    error = torch.rand(50, generator=generator, dtype=torch.float64) * 0.05
    pair = torch.rand(4, 4, generator=generator, dtype=torch.float64) + 0.5
    pair = (pair + pair.T) / 2
    slope = Fraction(0.01)
    for lipschitz in (1.3, pair):
        radii = certified_radius(logits, lipschitz, error=error, error_slope=0.01)
        for i in range(50):
            top = int(logits[i].argmax())
            quotients = []
            for j in (j for j in range(4) if j != top):
                l_yj = root2 * Fraction(lipschitz) if isinstance(lipschitz, float) else Fraction(float(pair[top, j]))
                margin = Fraction(float(logits[i, top])) - Fraction(float(logits[i, j]))
                quotients.append(max(margin - root2 * Fraction(float(error[i])), 0) / (l_yj + root2 * slope))
            exact = min(quotients)
            assert Fraction(float(radii[i])) <= exact
            assert float(radii[i]) == pytest.approx(float(exact), rel=1e-14, abs=1e-300)
    with pytest.raises(ValueError, match="error must be 50 numbers >= 0"):
        certified_radius(logits, 1.0, error=-error)
    with pytest.raises(ValueError, match="error_slope"):
        certified_radius(logits, 1.0, error=error, error_slope=float("nan"))
    unbounded = error.clone()
    unbounded[::2] = math.inf  # a bound that overflowed: no radius there, the others unchanged
    radii = certified_radius(logits, 1.3, error=unbounded)
    assert (radii[::2] == 0).all() and torch.equal(radii[1::2], certified_radius(logits, 1.3, error=error)[1::2])
    assert (certified_radius(logits, 1.3, error=error, error_slope=math.inf) == 0).all()


def test_gamma_is_the_rounded_up_rational():
    for n in (1, 9, 577, 10**6):
        for name, precision in PRECISIONS.items():
            u, op = Fraction(precision.unit), Fraction(precision.operand_unit)
            exact = (1 + op) ** 2 * (1 + n * u / (1 - n * u)) - 1
            value = gamma(n, precision)
            assert Fraction(value) >= exact and Fraction(math.nextafter(value, 0)) < exact, (n, name)
    with pytest.raises(ValueError, match="exceed"):
        gamma(2**24, PRECISIONS["float32"])


# --- found by an independent review: each case certified wrongly (or broke the bound) before its fix ---------
def test_underflow_is_charged():
    """Products near 2⁻¹⁴⁹ round by absolute amounts no relative γ covers: exact logits (4.75, 4.9)·2⁻¹⁴⁹,
    float32 gives (5, 4)·2⁻¹⁴⁹ and predicts class 0; class 1 must not be certified."""
    x = torch.full((1, 2), 2.0 ** -75)
    units = torch.tensor([[2.55, 2.2], [3.45, 1.45]], dtype=torch.float64)
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_((units * 2.0 ** -74).float())
        assert model(x).argmax(1).item() == 0
    result = certified_accuracy(model, (x, torch.tensor([1])), [0.0], lipschitz=1.0, evaluation="float32")
    assert result.radii[0] == 0 and result.accuracy[0] == 0
    tiny = nn.Linear(2, 2)
    with torch.no_grad():
        tiny.weight[0, 0] = 1e-40  # subnormal in float32: a kernel may flush it
    with pytest.raises(ValueError, match="subnormal"):
        RoundingAnalysis(tiny, (2,), "float32")


def test_leaky_relu_charges_its_float32_slope():
    """PyTorch rounds negative_slope = 1/3 to float32 before the product: up to 1.33 u of error where one
    rounding was charged. The 64 worst inputs of 400,000 candidates, through a LeakyReLU alone."""
    slope = 1 / 3
    candidates = -(1.5 + torch.arange(1, 400_000, dtype=torch.float32) * 2.0 ** -23)
    with torch.no_grad():
        relative = (F.leaky_relu(candidates, slope).double() - candidates.double() * slope).abs() / (
            candidates.double().abs() * slope)
    x = candidates[torch.topk(relative, 64).indices][None]
    model = nn.Sequential(nn.LeakyReLU(slope))
    bound = RoundingAnalysis(model, (64,), "float32")(x)
    with torch.no_grad():
        error = (model(x).double() - x.double() * slope).norm()
    assert relative.max() > 1.2 * 2.0 ** -24  # the case the test is about: more than one rounding
    assert error <= bound.exact + bound.center


def test_wide_circular_padding_repeats_rows():
    """Circular padding wider than the kernel's reach repeats output rows: ‖|A|‖ grows by √repeats (a 1×1
    kernel padded by 1 on a 1×1 image: 9 copies of one pixel, ‖|A|‖ = 3|w|)."""
    from lipkern.bounds.operators import LinearMap, abs_norm_upper

    conv = nn.Conv2d(1, 1, 1, padding=1, padding_mode="circular", bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    operator = LinearMap.conv2d(conv.weight.detach().double(), (1, 1, 1), padding=1, padding_mode="circular")
    assert abs_norm_upper(operator) >= spectral_norm_of(operator) >= 3.0 - 1e-12


def spectral_norm_of(operator) -> float:
    return torch.linalg.matrix_norm(operator.abs().dense_matrix(), 2).item()


def test_residual_blocks_must_add_equal_shapes_without_in_place_ops():
    broadcast = nn.Sequential(Residual(nn.Identity(), skip=nn.Conv2d(1, 1, 1, stride=8)), nn.Flatten(),
                              nn.Linear(64, 2))
    with pytest.raises(ValueError, match="broadcasting"):
        RoundingAnalysis(broadcast, (1, 8, 8), "float32")
    in_place = nn.Sequential(Residual(nn.Sequential(nn.LeakyReLU(0.5, inplace=True), nn.Linear(4, 4))),
                             nn.Linear(4, 2))
    with pytest.raises(ValueError, match="in-place"):
        RoundingAnalysis(in_place, (4,), "float32")
    x = torch.randn(3, 4, dtype=torch.float64)
    kept = x.clone()
    RoundingAnalysis(nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 2)), (4,), "float64")(x)
    assert torch.equal(x, kept), "the analysis wrote into the caller's input"


def test_a_certified_conv_is_proven_only_at_its_own_input_size():
    conv = L.SpectralConv2d(2, 2, 3, padding=1, input_size=2, certified=True).eval()
    at_own_size = RoundingAnalysis(nn.Sequential(conv, nn.Flatten()), (2, 2, 2), "float32")
    elsewhere = RoundingAnalysis(nn.Sequential(conv, nn.Flatten()), (2, 16, 16), "float32")
    assert at_own_size.steps[0].lip == 1.0
    frozen = elsewhere.model[0]
    exact = torch.linalg.matrix_norm(dense_operator(frozen, (2, 16, 16)), 2).item()
    assert elsewhere.steps[0].lip >= exact


def dense_operator(conv: nn.Conv2d, shape) -> torch.Tensor:
    eye = torch.eye(math.prod(shape), dtype=torch.float64).reshape(-1, *shape)
    with torch.no_grad():
        return F.conv2d(eye, conv.weight.double(), None, conv.stride, conv.padding).reshape(len(eye), -1).T


def test_reduced_precision_settings_are_not_certified_as_float32():
    """'auto' reads PyTorch's float32 precision settings: bf16 operands are refused with a message, TF32 on
    the CPU (mkldnn) is certified as TF32."""
    from lipkern.certify.margin import deployed_evaluation

    model = nn.Sequential(nn.Linear(4, 2))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with pytest.raises(ValueError, match="bfloat16 operands"):
            deployed_evaluation(model, torch.device("cpu"))
        torch.set_float32_matmul_precision("high")
        assert deployed_evaluation(model, torch.device("cpu")) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    assert deployed_evaluation(model, torch.device("cpu")) == "float32"


def test_a_registered_rounding_rule_covers_a_user_layer():
    """A user layer registers its rule (one rounding per entry, as a diagonal map); the analysis then bounds
    the float32 evaluation of a network containing it (against float64 re-evaluation), and without the rule
    the layer is refused by name."""
    from lipkern.certify.rounding import _RULES, register_rounding_rule

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), ChannelScale(torch.rand(16) * 3 + 0.1, torch.float32), nn.ReLU(),
                          nn.Linear(16, 4)).eval()
    with pytest.raises(TypeError, match="ChannelScale is not analyzed"):
        RoundingAnalysis(model, (16,), "float32")

    @register_rounding_rule(ChannelScale)
    def rule(analysis, module, shape):
        return analysis.diagonal(module, shape, module.scale, torch.zeros_like(module.scale), None, 1)

    try:
        x = torch.randn(2000, 16) * torch.logspace(-3, 3, 2000)[:, None]  # badly conditioned ones included
        bound = RoundingAnalysis(model, (16,), "float32")(x)
        with torch.no_grad():
            error = (model(x).double() - model.double()(x.double())).norm(dim=1)
        model.float()
        assert (error <= bound.center + FLOAT64_SLACK).all()
    finally:
        _RULES.unregister(ChannelScale)


def test_proofs_of_one_lipschitz_layers_follow_the_forward():
    """A layer's proof is registered by type and holds for subclasses that keep its forward only."""
    from lipkern.certify.rounding import _PROOFS

    class Kept(L.AOLLinear):
        pass

    class Doubled(L.AOLLinear):
        def forward(self, x):
            return 2 * super().forward(x)

    assert _PROOFS.rule_for(Kept(3, 3)) is not None
    assert _PROOFS.rule_for(Doubled(3, 3)) is None
    conv = L.SpectralConv2d(2, 2, 3, padding=1, input_size=4, certified=True)
    assert _PROOFS.rule_for(conv)(conv).input_size == (4, 4)
    assert _PROOFS.rule_for(conv)(L.SpectralConv2d(2, 2, 3, padding=1, input_size=4)) is None
