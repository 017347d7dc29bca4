"""Margin certificates: closed forms on linear classifiers (papers.md §10 checks 16, 18), the LLN pitfall,
soundness against an ℓ₂ PGD attack (check 17), certified_accuracy's two input paths, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import pgd_flips

from lipkern.certify import CertifiedAccuracy, certified_accuracy, certified_radius, lln_pairwise_lipschitz
from lipkern.models import LinearNormalized


def _exact_linear_distance(weight: np.ndarray, bias: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Exact ℓ₂ distance of each row of x to the decision boundary of argmax(W x + b) around its prediction
    (numpy float64, independent of the code under test)."""
    logits = x @ weight.T + bias
    top = logits.argmax(1)
    out = np.empty(len(x))
    for i, c in enumerate(top):
        out[i] = min((logits[i, c] - logits[i, j]) / np.linalg.norm(weight[c] - weight[j])
                     for j in range(weight.shape[0]) if j != c)
    return out


# --- closed forms on linear classifiers --------------------------------------------------------------------
def test_global_radius_below_exact_boundary_distance_linear():
    """Check 16: M/(√2‖W‖₂) ≤ min_j (f_y − f_j)/‖w_y − w_j‖ for f = W x + b; pairwise L_ab = ‖w_a − w_b‖ gives
    the exact distance."""
    rng = np.random.default_rng(0)
    for scale in (0.01, 1.0, 10.0):
        weight, bias = rng.normal(size=(5, 7)) * scale, rng.normal(size=5)
        x = rng.normal(size=(64, 7))
        exact = _exact_linear_distance(weight, bias, x)
        logits = torch.from_numpy(x @ weight.T + bias)
        global_r = certified_radius(logits, float(np.linalg.norm(weight, 2))).numpy()
        assert (global_r <= exact * (1 + 1e-12)).all()
        assert (global_r > 0).all()
        pairwise = np.linalg.norm(weight[:, None] - weight[None], axis=2)
        pair_r = certified_radius(logits, torch.from_numpy(pairwise)).numpy()
        np.testing.assert_allclose(pair_r, exact, rtol=1e-12)
        assert (pair_r <= exact).all(), "rounded down: never above the exact quotient"
        assert (global_r <= pair_r).all()


def test_radius_zero_for_ties_and_inf_for_zero_bound():
    logits = torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    r = certified_radius(logits, 1.0)
    assert r[0] == 0.0  # tie
    assert r[1] <= 1 / math.sqrt(2) and r[1] == pytest.approx(1 / math.sqrt(2), rel=1e-14)
    assert certified_radius(logits, 0.0)[0] == 0.0 and certified_radius(logits, 0.0)[1] == math.inf
    pairwise = torch.ones(3, 3)
    pairwise[0, 2] = pairwise[2, 0] = 0.0  # f_0 − f_2 is constant
    r = certified_radius(logits, pairwise)
    assert r[0] == 0.0  # still a tie between classes 0 and 1
    assert r[1] <= 2.0 and r[1] == pytest.approx(2.0, rel=1e-14)  # min(2/1 for j = 1, +inf for j = 2)
    pairwise[0, 1] = 0.0  # one-sided: L_10 = 1 still bounds f_0 − f_1 (the same function up to sign)
    assert certified_radius(logits, pairwise)[1] == pytest.approx(2.0, rel=1e-14)
    pairwise[1, 0] = 0.0
    assert certified_radius(logits, pairwise)[1] == math.inf


def test_lln_pairwise_certificate_and_pitfall():
    """Check 18: with unit rows, min_j (f_y − f_j)/‖ŵ_y − ŵ_j‖ ≥ M/(√2‖Ŵ‖₂) and equals the exact distance of a
    linear LLN classifier; the √2-form with L = 1 overstates the radius (‖Ŵ‖₂ > 1)."""
    torch.manual_seed(1)
    head = LinearNormalized(6, 4).double()
    weight = torch.randn(4, 6, dtype=torch.float64)
    weight[1] = -weight[0] + 0.1 * torch.randn(6, dtype=torch.float64)  # ‖ŵ_0 − ŵ_1‖ ≈ 2
    with torch.no_grad():
        head.weight.copy_(weight)
    unit = (head.weight / head.weight.norm(dim=1, keepdim=True)).detach().numpy()
    spectral = np.linalg.norm(unit, 2)
    assert spectral > 1.4
    x = torch.randn(256, 6, dtype=torch.float64)
    with torch.no_grad():
        logits = head(x)
    exact = _exact_linear_distance(unit, head.bias.detach().numpy(), x.numpy())
    pairwise = lln_pairwise_lipschitz(head.weight, 1.0)
    assert pairwise.shape == (4, 4) and (pairwise.diagonal() == 0).all()
    lln_r = certified_radius(logits, pairwise).numpy()
    assert (lln_r <= exact).all()
    np.testing.assert_allclose(lln_r, exact, rtol=1e-12)
    assert (lln_r >= certified_radius(logits, spectral).numpy()).all()
    invalid = certified_radius(logits, 1.0).numpy()  # the pitfall: unit rows treated as 1-Lipschitz
    assert (invalid > exact).any()
    scaled = lln_pairwise_lipschitz(head.weight, torch.tensor(3.0))
    torch.testing.assert_close(scaled, 3 * pairwise, rtol=1e-12, atol=0)


# --- soundness by attack -----------------------------------------------------------------------------------
def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)]
    return nn.Sequential(*layers).double()


def _exact_product_bounds(model: nn.Sequential) -> tuple[float, torch.Tensor]:
    """Global L = ∏‖W_k‖₂ and pairwise L_ab = ‖(e_a − e_b)ᵀW_K‖·∏_{k<K}‖W_k‖ (exact SVDs, valid for ReLU)."""
    weights = [m.weight.detach() for m in model if isinstance(m, nn.Linear)]
    body = math.prod(torch.linalg.matrix_norm(w, 2).item() for w in weights[:-1])
    last = weights[-1]
    pairwise = (last[:, None] - last[None]).norm(dim=2) * body
    return body * torch.linalg.matrix_norm(last, 2).item() * (1 + 1e-12), pairwise * (1 + 1e-12)


def test_pgd_never_flips_inside_certified_radius():
    """Check 17: a random-weight ReLU net; ℓ₂ PGD with restarts inside the certified radius never changes the
    prediction (global and pairwise), while at 3× the exact-linear-model distance it usually does."""
    model = _mlp(0)
    global_l, pairwise = _exact_product_bounds(model)
    x = torch.randn(24, 10, dtype=torch.float64) * 3
    with torch.no_grad():
        logits = model(x)
    for bound in (global_l, pairwise):
        radius = certified_radius(logits, bound)
        assert (radius > 0).all()
        assert not pgd_flips(model, x, radius * (1 - 1e-9)).any()
    # the attack is not toothless: far outside the certificate it finds flips
    assert pgd_flips(model, x, certified_radius(logits, pairwise) * 50).float().mean() > 0.5


# --- certified accuracy ------------------------------------------------------------------------------------
def _linear_data(n: int = 50):
    torch.manual_seed(3)
    model = nn.Linear(4, 3)
    x = torch.randn(n, 4)
    y = torch.randint(0, 3, (n,))
    with torch.no_grad():
        y[: n // 2] = model(x[: n // 2]).argmax(1)  # half correct by construction
    return model, x, y


def test_certified_accuracy_definition_and_dataloader():
    model, x, y = _linear_data()
    w = model.weight.detach().double()
    lip = torch.linalg.matrix_norm(w, 2)
    eps = [0.0, 0.05, 0.2, 1.0]
    result = certified_accuracy(model, (x, y), eps, lip, batch_size=7, evaluation="exact")
    assert isinstance(result, CertifiedAccuracy)
    with torch.no_grad():
        logits = (x.double() @ w.T + model.bias.double())
    pred = logits.argmax(1)
    top2 = logits.topk(2, dim=1).values
    radius = (top2[:, 0] - top2[:, 1]) / (math.sqrt(2) * lip)
    correct = pred == y
    expected = torch.tensor([(correct & (radius > e)).double().mean().item() for e in eps],
                            dtype=torch.float64)
    torch.testing.assert_close(result.accuracy, expected, atol=0, rtol=0)
    assert result.clean_accuracy == correct.double().mean().item()
    # the real-arithmetic radii, less the float64 evaluation's bounded rounding (recorded; ≤ 1e-14 here)
    assert result.evaluation == "exact" and result.rounding.max() < 1e-14 and result.rounding_slope == 0
    shrunk = ((top2[:, 0] - top2[:, 1]) - math.sqrt(2) * result.rounding).clamp_min(0) / (math.sqrt(2) * lip)
    torch.testing.assert_close(result.radii, shrunk, rtol=1e-13, atol=0)
    assert (result.radii <= radius).all()
    deployed = certified_accuracy(model, (x, y), eps, lip, batch_size=7)  # the float32 model as it runs
    assert deployed.evaluation == "float32" and (deployed.radii <= result.radii).all()
    assert torch.equal(result.correct, correct)
    assert torch.equal(result.eps, torch.tensor(eps, dtype=torch.float64))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=9)
    from_loader = certified_accuracy(model, loader, eps, lip, evaluation="exact")
    for a, b in zip(from_loader, result):
        assert a == b if isinstance(a, (float, str)) else torch.equal(a, b)
    single = certified_accuracy(model, (x, y), 0.05, lip, evaluation="exact")
    assert single.accuracy.shape == (1,) and single.accuracy[0] == result.accuracy[1]


def test_certified_accuracy_pairwise_float64_and_training_flag():
    model, x, y = _linear_data()
    w = model.weight.detach().double()
    pairwise = (w[:, None] - w[None]).norm(dim=2)
    model.train()
    result = certified_accuracy(model, (x, y), [0.1], pairwise, evaluation="exact")
    assert model.training and model.weight.dtype == torch.float32, "the user's model is left as it was"
    exact = _exact_linear_distance(w.numpy(), model.bias.detach().double().numpy(), x.double().numpy())
    np.testing.assert_allclose(result.radii.numpy(), exact, rtol=1e-12)
    with pytest.raises(ValueError, match="pairwise=True but a scalar"):
        certified_accuracy(model, (x, y), [0.1], 1.0, pairwise=True)


def test_certified_accuracy_warns_on_lln_head_with_global_bound():
    model = nn.Sequential(nn.Linear(4, 4), LinearNormalized(4, 3))
    x, y = torch.randn(5, 4), torch.zeros(5, dtype=torch.long)
    with pytest.warns(UserWarning, match="row-normalized"):
        certified_accuracy(model, (x, y), 0.1, 1.0)


def test_certified_accuracy_default_bound_uses_lipschitz_bound():
    bounds = pytest.importorskip("lipkern.bounds")
    if not hasattr(bounds, "lipschitz_bound"):
        pytest.skip("lipkern.bounds.lipschitz_bound not there yet")
    model, x, y = _linear_data()
    result = certified_accuracy(model, (x, y), [0.1], input_shape=(4,))
    lip = bounds.lipschitz_bound(model, (4,), method="liplt", pairwise=False)
    assert float(lip) >= torch.linalg.matrix_norm(model.weight.detach().double(), 2).item()
    reference = certified_accuracy(model, (x, y), [0.1], lip)
    assert torch.equal(result.radii, reference.radii)


# --- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("logits, lipschitz, error, match", [
    (torch.zeros(3), 1.0, ValueError, r"\(B, C\)"),
    (torch.zeros(3, 1), 1.0, ValueError, "C >= 2"),
    (torch.zeros(3, 2, dtype=torch.long), 1.0, TypeError, "floating"),
    (torch.tensor([[0.0, float("nan")]]), 1.0, ValueError, "NaN"),
    (torch.zeros(3, 2), -1.0, ValueError, "non-negative"),
    (torch.zeros(3, 2), float("nan"), ValueError, "NaN"),
    (torch.zeros(3, 2), torch.ones(3, 3), ValueError, r"\(2, 2\)"),
    (torch.zeros(3, 2), "1", TypeError, "float or a tensor"),
])
def test_certified_radius_bad_input(logits, lipschitz, error, match):
    with pytest.raises(error, match=match):
        certified_radius(logits, lipschitz)


def test_certified_accuracy_bad_input():
    model, x, y = _linear_data(8)
    with pytest.raises(ValueError, match="eps"):
        certified_accuracy(model, (x, y), [-0.1], 1.0)
    with pytest.raises(ValueError, match="eps"):
        certified_accuracy(model, (x, y), [], 1.0)
    with pytest.raises(ValueError, match="batch_size"):
        certified_accuracy(model, (x, y), 0.1, 1.0, batch_size=0)
    with pytest.raises(ValueError, match="labels"):
        certified_accuracy(model, (x, y[:4]), 0.1, 1.0)
    with pytest.raises(TypeError, match="integers"):
        certified_accuracy(model, (x, y.float()), 0.1, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        certified_accuracy(model, (x, y + 5), 0.1, 1.0)
    with pytest.raises(TypeError, match="iterable"):
        certified_accuracy(model, x, 0.1, 1.0)
    with pytest.raises(TypeError, match="nn.Module"):
        certified_accuracy(lambda t: t, (x, y), 0.1, 1.0)
    with pytest.raises(ValueError, match="no inputs"):
        certified_accuracy(model, (x[:0], y[:0]), 0.1, 1.0)
    with pytest.raises(ValueError, match="head_weight"):
        lln_pairwise_lipschitz(torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="body_lipschitz"):
        lln_pairwise_lipschitz(torch.ones(3, 2), torch.ones(2))
