"""Issue 20's findings, each reproduced: a right answer or a clear error, never a plausible wrong value.
Oracles: the dense Jacobian of the layer and its SVD (tests.helpers), float64 formulas, exact arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipkern.nn as LN
from tests.helpers import dense_jacobian, spectral_norm


@pytest.fixture(autouse=True)
def torch_backend(knobs):
    knobs(backend="torch")  # the layers' logic is under test; the kernels are compared in tests/ops


# --- 1. eval caches follow every change of the weight ---------------------------------------------------------
def _layers():
    d = dict(dtype=torch.float64)
    return {
        "SpectralLinear": (lambda: LN.SpectralLinear(6, 5, certified=True, **d), (6,)),
        "SpectralConv2d": (lambda: LN.SpectralConv2d(2, 3, 3, padding=1, input_size=5, certified=True, **d),
                           (2, 5, 5)),
        "CPLLinear": (lambda: LN.CPLLinear(6, 4, certified=True, **d), (6,)),
        "CPLConv2d": (lambda: LN.CPLConv2d(2, 3, input_size=5, certified=True, **d), (2, 5, 5)),
        "AOLLinear": (lambda: LN.AOLLinear(6, 5, **d), (6,)),
        "AOLConv2d": (lambda: LN.AOLConv2d(2, 3, 3, padding=1, **d), (2, 5, 5)),
    }


def _edit(layer: nn.Module, how: str) -> None:
    gen = torch.Generator().manual_seed(3)
    new = 3 * torch.randn(layer.weight.shape, generator=gen, dtype=layer.weight.dtype)
    if how == "data-inplace":
        layer.weight.data.mul_(3).add_(new)
    elif how == "data-assign":
        layer.weight.data = new
    elif how == "copy-no-grad":
        with torch.no_grad():
            layer.weight.copy_(new)
    elif how == "load-state-dict":
        state = layer.state_dict()
        state["weight"] = new
        layer.load_state_dict(state)


@pytest.mark.parametrize("how", ["data-inplace", "data-assign", "copy-no-grad", "load-state-dict"])
@pytest.mark.parametrize("name", list(_layers()))
def test_eval_layer_stays_one_lipschitz_after_a_weight_edit(name, how):
    make, shape = _layers()[name]
    layer = make().eval()
    x = torch.randn(1, *shape, dtype=torch.float64)
    layer(x)  # fills the eval cache
    _edit(layer, how)
    fresh = make().eval()
    fresh.load_state_dict(layer.state_dict())  # the same weights, no cache history
    torch.testing.assert_close(layer(x), fresh(x), rtol=1e-12, atol=1e-12)
    jac = dense_jacobian(lambda z: layer(z.reshape(1, *shape)), x[0])
    assert spectral_norm(jac) <= 1 + 1e-9, (name, how, spectral_norm(jac))


# --- 2. the eval estimate of low-rank operators ---------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 512), (1, 7), (2, 300), (300, 1), (3, 3)])
def test_lanczos_estimate_of_low_rank_matrices(shape):
    from lipkern.bounds import linear_spectral_norm

    gen = torch.Generator().manual_seed(sum(shape))
    for w in (torch.ones(shape, dtype=torch.float64), torch.randn(shape, generator=gen, dtype=torch.float64)):
        exact = torch.linalg.matrix_norm(w, 2).item()
        estimate = linear_spectral_norm(w, "power").estimate.item()
        assert exact * (1 - 1e-6) <= estimate <= exact * (1 + 1e-12), (shape, estimate, exact)


def test_rank_one_eval_layers_are_normalized_by_their_norm():
    torch.manual_seed(0)
    cpl = LN.CPLLinear(16, 1, dtype=torch.float64).eval()
    h = cpl.step_size().item()
    assert h * spectral_norm(cpl.weight.detach()) ** 2 <= 2 * (1 + 1e-6)
    linear = LN.SpectralLinear(16, 1, dtype=torch.float64).eval().to_vanilla()
    assert spectral_norm(linear.weight.detach()) <= 1 + 1e-6
    conv = LN.SpectralConv2d(3, 1, 3, input_size=3, dtype=torch.float64).eval()
    x = torch.randn(3, 3, 3, dtype=torch.float64)
    assert spectral_norm(dense_jacobian(lambda z: conv(z[None]), x)) <= 1 + 1e-6


# --- 3. smoothing of a model with non-finite logits -----------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_smoothing_refuses_a_model_without_finite_logits(value):
    from lipkern.certify import RandomizedSmoothing

    smooth = RandomizedSmoothing(lambda z: torch.full((len(z), 3), value), 0.25, 3)
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="NaN or Inf logits for all"):
        smooth.certify(x, 100, 1000, 1e-3, 500, seed=0)
    with pytest.raises(ValueError, match="NaN or Inf logits for all"):
        smooth.predict(x, 100, 1e-3, 500, seed=0)


def test_smoothing_counts_a_non_finite_draw_against_the_top_class():
    """Class 0 wins every finite draw, but 30% of the draws are NaN: p̲_A comes from 70%, not 100%."""
    from scipy.stats import beta, norm

    from lipkern.certify import RandomizedSmoothing

    def base(z):  # NaN exactly where the first noise coordinate is below its 30% quantile
        logits = torch.tensor([[1.0, 0.0]]).repeat(len(z), 1)
        logits[z[:, 0] < 0.25 * norm.ppf(0.3)] = math.nan
        return logits

    smooth = RandomizedSmoothing(base, 0.25, 2)
    label, radius = smooth.certify(torch.zeros(1), 100, 4000, 1e-3, 1000, seed=1)
    with torch.inference_mode():
        generator = torch.Generator().manual_seed(1)
        smooth.sample_counts(torch.zeros(1), 100, 1000, generator)
        n_a = int(smooth.sample_counts(torch.zeros(1), 4000, 1000, generator)[0])
    assert 0.66 * 4000 < n_a < 0.74 * 4000
    p_lower = beta.ppf(1e-3, n_a, 4000 - n_a + 1)
    assert label == 0 and radius == pytest.approx(0.25 * norm.ppf(p_lower), rel=1e-9)


def test_splitz_refuses_a_non_finite_left_half():
    from lipkern.certify import SplitzCertifier

    left = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        left[0].weight.fill_(math.nan)
    certifier = SplitzCertifier(left, nn.Linear(2, 3), 0.25, 3, local_lipschitz=lambda x, g: 1.0)
    with pytest.raises(ValueError, match="left"):
        certifier.certify(torch.zeros(2), 10, 100, 1e-3, 50, seed=0)


# --- 5. losses: L = 0, NaN or negative L, tiny temperatures, empty batches ------------------------------------
@pytest.mark.parametrize("pairwise", [False, True])
def test_crm_loss_with_a_zero_lipschitz_constant_has_finite_gradients(pairwise):
    from lipkern.losses import CRMLoss

    logits = torch.tensor([[2.0, 0.5, 0.5], [0.1, 0.3, 0.2]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1])
    lipschitz = torch.zeros(3, 3, dtype=torch.float64) if pairwise else torch.tensor(0.0, dtype=torch.float64)
    if pairwise:
        lipschitz[0, 1] = lipschitz[1, 0] = 1.0  # one pair with a finite radius, the others constant
    loss = CRMLoss(start_epoch=0, r0=10.0, pairwise=pairwise)(logits, target, lipschitz, epoch=0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all(), (loss, logits.grad)
    _, radii = CRMLoss(pairwise=pairwise).radii(logits.detach(), lipschitz)
    off = ~torch.eye(3, dtype=torch.bool)[[0, 1]]
    expected = torch.full((2, 3), math.inf, dtype=torch.float64)  # constant differences with a positive margin
    if pairwise:
        expected[0, 1] = 1.5  # (2 − 0.5)/1
        expected[1, 0] = 0.3 - 0.1
    assert torch.equal(radii[off], expected[off]), radii


@pytest.mark.parametrize("bad", [math.nan, -1.0])
@pytest.mark.parametrize("name", ["CRMLoss", "LMTLoss"])
@pytest.mark.parametrize("pairwise", [False, True])
def test_losses_with_a_nan_or_negative_lipschitz_constant_are_nan(name, bad, pairwise):
    """No host read in a training step, so no error: the loss is NaN (visible), not a plain cross-entropy."""
    from lipkern import losses

    loss = losses.CRMLoss(start_epoch=0, pairwise=pairwise) if name == "CRMLoss" else losses.LMTLoss(
        0.5, pairwise=pairwise)
    lipschitz = torch.ones(3, 3) if pairwise else torch.tensor(1.0)
    lipschitz[(0, 2) if pairwise else ()] = bad
    args = (torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), lipschitz)
    good = loss(*args[:2], torch.ones(3, 3) if pairwise else torch.tensor(1.0), *((0,) if name == "CRMLoss" else ()))
    assert torch.isfinite(good)
    assert torch.isnan(loss(*args, *((0,) if name == "CRMLoss" else ())))


def test_offset_cross_entropy_with_a_tiny_temperature_is_the_hinge_limit():
    """t·CE(z/t) → max_j (z_j) − z_y as t → 0 (float64 oracle: the same formula at t = 1e-3 and the limit)."""
    from lipkern.losses import OffsetCrossEntropy

    logits = torch.tensor([[1.0, 3.0, 0.0], [2.0, -1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 0])
    loss = OffsetCrossEntropy(offset=1.0, temperature=1e-300, reduction="none")(logits, target)
    shifted = logits.detach() - torch.tensor([[1.0, 0, 0], [1.0, 0, 0]], dtype=torch.float64)
    limit = shifted.amax(1) - shifted[:, 0]
    torch.testing.assert_close(loss.detach(), limit, rtol=0, atol=1e-12)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()
    usual = OffsetCrossEntropy(offset=1.0, temperature=0.25, reduction="none")(logits.detach(), target)
    reference = 0.25 * torch.nn.functional.cross_entropy(shifted / 0.25, target, reduction="none")
    torch.testing.assert_close(usual, reference, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name", ["CRMLoss", "LMTLoss", "OffsetCrossEntropy", "MultiMarginHinge"])
def test_mean_loss_of_an_empty_batch_is_an_error(name):
    from lipkern import losses

    loss = losses.LMTLoss(0.5) if name == "LMTLoss" else getattr(losses, name)()
    logits, target = torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)
    args = (logits, target) if name in ("OffsetCrossEntropy", "MultiMarginHinge") else (logits, target, 1.0)
    with pytest.raises(ValueError, match="empty batch"):
        loss(*args, epoch=20) if name == "CRMLoss" else loss(*args)
    summed = losses.LMTLoss(0.5, reduction="sum") if name == "LMTLoss" else getattr(losses, name)(reduction="sum")
    assert summed(*args, epoch=20).item() == 0.0 if name == "CRMLoss" else summed(*args).item() == 0.0


# --- 6. a Spectral layer's fixed input size -------------------------------------------------------------------
def test_lipschitz_bound_refuses_a_spectral_layer_at_another_size():
    from lipkern.bounds import lipschitz_bound

    model = nn.Sequential(LN.SpectralConv2d(1, 2, 3, padding=1, input_size=8, certified=True)).eval()
    with pytest.raises(ValueError, match="input"):
        model(torch.zeros(1, 1, 5, 5))  # the layer itself refuses
    with pytest.raises(ValueError, match=r"normalized for inputs of size \(8, 8\)"):
        lipschitz_bound(model, (1, 5, 5))
    assert lipschitz_bound(model, (1, 8, 8)) <= 1 + 1e-6


# --- 7. zero power-iteration vectors --------------------------------------------------------------------------
def test_power_estimates_from_a_zero_start_vector():
    from lipkern.bounds import conv2d_spectral_norm, linear_spectral_norm
    from tests.helpers import dense_conv2d

    gen = torch.Generator().manual_seed(7)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    exact = spectral_norm(dense_conv2d(w, 6, padding=1))
    estimate = conv2d_spectral_norm(w, 6, padding=1, method="power", u=torch.zeros(2, 6, 6, dtype=torch.float64))
    assert exact * (1 - 1e-4) <= estimate.estimate.item() <= exact * (1 + 1e-9)
    m = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    result = linear_spectral_norm(m, "power", u=torch.zeros(4, dtype=torch.float64))
    assert result.estimate.item() == pytest.approx(spectral_norm(m), rel=1e-6)


@pytest.mark.parametrize("make,shape", [(lambda: LN.SpectralLinear(6, 4, dtype=torch.float64), (6,)),
                                        (lambda: LN.SpectralConv2d(2, 3, 3, padding=1, input_size=5,
                                                                   dtype=torch.float64), (2, 5, 5))])
def test_a_loaded_zero_vector_restarts_and_training_recovers(make, shape):
    layer = make()
    state = layer.state_dict()
    state["u"] = torch.zeros_like(state["u"])
    with pytest.warns(RuntimeWarning, match="zero or not finite"):
        layer.load_state_dict(state)
    assert layer.u.abs().amax() > 0
    x = torch.randn(2, *shape, dtype=torch.float64)
    for _ in range(30):
        out = layer.train()(x)
    assert torch.isfinite(out).all()
    jac = dense_jacobian(lambda z: layer.eval()(z[None]), x[0])
    exact = spectral_norm(layer.weight.detach() if len(shape) == 1 else jac * layer.sigma().item())
    sigma = layer.train().sigma().item()
    assert 0.9 * exact < sigma <= exact * (1 + 1e-9), (sigma, exact)  # recovered: an estimate from below


# --- 8. the power iteration needs ‖M‖² representable, not ‖M‖⁴ -----------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("scale", [1e10, 1e-12, 1e-18, 1e18])
def test_power_iteration_at_extreme_scales(knobs, backend, scale):
    from lipkern import _dispatch
    from lipkern.ops import batched_power_iteration

    if backend == "triton" and not _dispatch.triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on a CPU")
    knobs(backend=backend)
    m = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = torch.linalg.matrix_norm(m, 2) * scale  # ‖M‖² ≤ 1e38 · ... representable in float32, ‖M‖⁴ not
    sigma = batched_power_iteration((m * scale).float(), n_iter=60).sigma.double()
    torch.testing.assert_close(sigma / exact, torch.ones(3, dtype=torch.float64), rtol=1e-5, atol=0)


# --- 9. smaller: arguments taken at face value, estimates of changed models, AOL eval with NaN ----------------
def test_arguments_are_not_silently_converted():
    from lipkern.bounds import conv2d_spectral_norm, gram_upper_bound, lipschitz_bound, linear_spectral_norm
    from lipkern.certify import smoothing_radius
    from lipkern.ops import cpl_linear, initial_conv_vectors

    w, x = torch.randn(3, 4), torch.randn(2, 4)
    for h in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="h must be a finite number >= 0"):
            cpl_linear(x, w, None, h)
    with pytest.raises(ValueError, match="padding"):
        conv2d_spectral_norm(torch.randn(2, 2, 3, 3), 5, padding=1.9)
    with pytest.raises((ValueError, TypeError), match="padding"):
        conv2d_spectral_norm(torch.randn(2, 2, 3, 3), 5, padding=(1, 1.9, 1, 1))
    with pytest.raises(ValueError, match="groups"):
        conv2d_spectral_norm(torch.randn(2, 2, 3, 3), 5, groups=True)
    with pytest.raises(ValueError, match="input_shape"):
        lipschitz_bound(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), (1, 4.7, 4))
    for n_iter in (0, -3):
        with pytest.raises(ValueError, match="n_iter"):
            linear_spectral_norm(w, "power", n_iter=n_iter)
    for rtol in (0, -1e-3, math.nan):
        with pytest.raises(ValueError, match="rtol"):
            gram_upper_bound(w[None], rtol=rtol)
        with pytest.raises(ValueError, match="rtol"):
            conv2d_spectral_norm(torch.randn(2, 2, 3, 3), 5, rtol=rtol)
    with pytest.raises(TypeError, match="certified must be a bool"):
        LN.SpectralLinear(3, 3, certified="no")
    with pytest.raises(TypeError, match="dtype"):
        initial_conv_vectors(1, 2, 3, torch.int64, "cpu")
    with pytest.raises(ValueError, match="sigma"):
        smoothing_radius(0.9, sigma=-1)
    with pytest.raises(ValueError, match="groups"):
        from lipkern.ops import aol_rescale_ref
        aol_rescale_ref(torch.randn(4, 4, 3, 3), groups=0)


def test_certified_radius_takes_a_python_float_lipschitz_constant_exactly():
    """A Python float L went through a float32 tensor: 1 + 1e-9 became 1 (a radius too large), 5e-324 zero."""
    from fractions import Fraction

    from lipkern.certify import certified_radius

    lipschitz = 1 + 1e-9
    radius = certified_radius(torch.tensor([[1.0, 0.0]], dtype=torch.float64), lipschitz).item()
    # exact: 1/(√2·L); compare squares in rationals: radius² · 2 · L² ≤ 1
    assert Fraction(radius) ** 2 * 2 * Fraction(lipschitz) ** 2 <= 1


def test_certified_radius_of_a_tiny_lipschitz_constant_is_finite():
    """1/(√2·5e-324) overflows float64: the radius is the largest float (below the true quotient), not inf."""
    from lipkern.certify import certified_radius

    radius = certified_radius(torch.tensor([[1.0, 0.0]], dtype=torch.float64), 5e-324).item()
    assert math.isfinite(radius) and radius > 1e307


def test_a_lipschitz_estimate_of_a_changed_model_says_so():
    from lipkern.bounds import LipschitzEstimate

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    estimate = LipschitzEstimate(model, (4,))
    estimate()
    model[3] = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="layers changed"):
        estimate()


def test_aol_eval_with_a_nan_weight_raises_like_the_other_layers():
    layer = LN.AOLLinear(3, 3).eval()
    with torch.no_grad():
        layer.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(torch.randn(2, 3))  # with grad enabled: the uncached eval path
    with torch.no_grad(), pytest.raises(ValueError, match="NaN or Inf"):
        layer(torch.randn(2, 3))


def test_splitz_with_an_infinite_local_bound_certifies_radius_zero():
    from lipkern.certify import SplitzCertifier

    certifier = SplitzCertifier(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 3), 0.5, 3,
                                local_lipschitz=lambda x, g: math.inf)
    label, radius, gamma = certifier.certify(torch.zeros(2), 10, 100, 1e-3, 50, seed=0)
    assert radius == 0.0


# --- crashes and unclear errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: LN.AOLLinear(0, 4), lambda: LN.AOLLinear(3, 0),
                                  lambda: LN.AOLConv2d(0, 2, 3), lambda: LN.SpectralLinear(3, 0),
                                  lambda: LN.SpectralConv2d(2, 0, 3), lambda: LN.CPLLinear(0),
                                  lambda: LN.CPLConv2d(2, 0), lambda: LN.SpectralLinear(True, 3)])
def test_zero_width_layers_are_refused_at_construction(make):
    with pytest.raises((ValueError, TypeError), match="features|channels"):
        make()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_aol_layers_initialize(dtype):
    layer = LN.AOLLinear(3, 4, dtype=dtype)
    w = layer.weight.detach().double()
    assert layer.weight.dtype == dtype
    torch.testing.assert_close(w.T @ w, torch.eye(3, dtype=torch.float64), rtol=0, atol=2e-2)  # orthonormal columns


def test_training_works_after_a_layer_was_first_sized_in_inference_mode():
    layer = LN.SpectralConv2d(2, 3, 3, padding=1, dtype=torch.float64)  # lazy input size
    with torch.inference_mode():
        layer.eval()(torch.randn(1, 2, 5, 5, dtype=torch.float64))
    out = layer.train()(torch.randn(2, 2, 5, 5, dtype=torch.float64))
    out.sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_empty_inputs_and_stacks(knobs):
    from lipkern import _dispatch
    from lipkern.ops import conv_power_iteration, cpl_conv2d

    sigma, _, _ = conv_power_iteration(torch.randn(0, 2, 2, 3, 3), torch.randn(0, 2, 5, 5))
    assert sigma.shape == (0,)
    if _dispatch.triton_interpreting():
        knobs(backend=None)  # the Triton path under the interpreter
    out = cpl_conv2d(torch.randn(0, 2, 5, 5), torch.randn(3, 2, 3, 3), None, 0.1, padding=1)
    assert out.shape == (0, 2, 5, 5)


def test_meta_tensors_get_a_clear_error():
    from lipkern.bounds import conv2d_spectral_norm, lipschitz_bound
    from lipkern.certify import certified_radius

    with pytest.raises(ValueError, match="meta"):
        conv2d_spectral_norm(torch.randn(2, 2, 3, 3, device="meta"), 5, method="upper")
    with pytest.raises(ValueError, match="meta"):
        certified_radius(torch.randn(2, 3, device="meta"), 1.0)
    with pytest.raises(ValueError, match="meta"):
        lipschitz_bound(nn.Sequential(nn.Linear(3, 2, device="meta")), (3,))
