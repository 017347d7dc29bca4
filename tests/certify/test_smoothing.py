"""Randomized smoothing: Clopper–Pearson closed forms (papers.md §10 checks 19-20), abstention, tightness on a
binary linear classifier (check 21), determinism, counts against a slow per-sample loop with the same noise,
PREDICT's binomial test, one host read per call, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from lipkern.certify import ABSTAIN, RandomizedSmoothing, clopper_pearson_lower, smoothing_radius


class Constant(nn.Module):
    """Always predicts ``label`` among ``classes``."""

    def __init__(self, label: int, classes: int = 3):
        super().__init__()
        self.label, self.classes = label, classes

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.classes, dtype=x.dtype, device=x.device)
        logits[:, self.label] = 1.0
        return logits


class BinaryLinear(nn.Module):
    """Class 1 iff w·x + b > 0 (x flattened): P_δ[class 1 at x] = Φ((w·x + b)/(σ‖w‖)) exactly."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.register_buffer("w", w.reshape(-1))
        self.b = b

    def forward(self, x):
        score = x.flatten(1) @ self.w.to(x.dtype) + self.b
        return torch.stack([-score, score], dim=1)


# --- Clopper–Pearson ---------------------------------------------------------------------------------------
def test_clopper_pearson_closed_forms():
    """Checks 19-20: n_A = n = 10⁵, α = 1e-3 → α^(1/n) = 0.99993092, radius 3.8115σ; n_A = 99,000 →
    0.988989, radius 2.2900σ."""
    p = clopper_pearson_lower(100_000, 100_000, 1e-3)
    assert p == pytest.approx(1e-3 ** (1 / 100_000), rel=1e-12)
    assert p == pytest.approx(0.99993092, abs=5e-9)
    assert smoothing_radius(p, 1.0) == pytest.approx(3.8115, abs=5e-5)
    assert smoothing_radius(p, 0.25) == pytest.approx(0.25 * 3.8115, abs=5e-5)
    p = clopper_pearson_lower(99_000, 100_000, 1e-3)
    assert p == pytest.approx(0.988989, abs=5e-7)
    assert smoothing_radius(p, 1.0) == pytest.approx(2.2900, abs=5e-5)


@pytest.mark.parametrize("n", [1, 7, 100, 100_000])
@pytest.mark.parametrize("alpha", [1e-3, 0.05, 0.4])
def test_clopper_pearson_closed_forms_and_binomtest(n, alpha):
    """Closed forms at the ends (k = n: α^(1/n); k = 1: 1 − (1 − α)^(1/n); k = 0: 0) and scipy's binomtest
    interval (one-sided, exact) wherever its root finder is accurate (p ≥ 0.01)."""
    assert clopper_pearson_lower(0, n, alpha) == 0.0
    assert clopper_pearson_lower(n, n, alpha) == pytest.approx(alpha ** (1 / n), rel=1e-13)
    assert clopper_pearson_lower(1, n, alpha) == pytest.approx(-math.expm1(math.log1p(-alpha) / n), rel=1e-12)
    for k in sorted({1, n // 3, n // 2, n - 1, n}):
        value = clopper_pearson_lower(k, n, alpha)
        assert 0.0 <= value <= k / n
        test = binomtest(k, n, alternative="greater")
        interval = test.proportion_ci(confidence_level=1 - alpha, method="exact")
        assert interval.high == 1.0
        if interval.low >= 0.01:
            assert value == pytest.approx(interval.low, rel=1e-9)


def test_clopper_pearson_bad_input():
    for args in [(5, 0, 0.1), (6, 5, 0.1), (-1, 5, 0.1), (2, 5, 0.0), (2, 5, 1.0), (2.5, 5, 0.1)]:
        with pytest.raises(ValueError):
            clopper_pearson_lower(*args)
    with pytest.raises(ValueError, match="p_lower"):
        smoothing_radius(0.4, 1.0)


# --- certify -----------------------------------------------------------------------------------------------
def test_certify_constant_base_gives_the_closed_form_radius():
    smooth = RandomizedSmoothing(Constant(2), sigma=0.5, num_classes=3)
    label, radius = smooth.certify(torch.zeros(4), n0=10, n=5000, alpha=1e-3, batch_size=512, seed=0)
    assert label == 2
    assert radius == pytest.approx(0.5 * norm.ppf(1e-3 ** (1 / 5000)), rel=1e-12)


def test_certify_tightness_binary_linear():
    """Check 21: for a binary linear classifier σΦ⁻¹(p_A) is the exact boundary distance; the Monte Carlo
    radius stays below it and close to it."""
    torch.manual_seed(0)
    w = torch.randn(3, 4, 4)
    x = torch.randn(3, 4, 4)
    sigma = 0.3
    for distance in (0.1, 0.3, 0.6):  # place x at this distance from the boundary, on the class-1 side
        b = distance * w.norm().item() - (w * x).sum().item()
        base = BinaryLinear(w, b)
        exact = (base(x[None])[0, 1] / w.norm()).item()
        assert exact == pytest.approx(distance, rel=1e-5)
        assert sigma * norm.ppf(norm.cdf(exact / sigma)) == pytest.approx(exact, rel=1e-9)
        n = 20_000
        label, radius = RandomizedSmoothing(base, sigma, 2).certify(x, 50, n, 1e-3, 4096, seed=1)
        assert label == 1
        assert radius < exact
        p_a = norm.cdf(exact / sigma)  # close: p̲_A within 7 standard errors of p_A (3.1 from α)
        assert norm.cdf(radius / sigma) > p_a - 7 * math.sqrt(p_a * (1 - p_a) / n)


def test_abstain_iff_lower_bound_below_half():
    """x on the boundary: p_A ≈ ½, so p̲_A < ½ and CERTIFY abstains, exactly when the Clopper–Pearson bound of
    the reference count is below ½; slightly off the boundary it may certify a tiny radius."""
    torch.manual_seed(0)
    w = torch.randn(6)
    x = torch.randn(6)
    for offset in (0.0, 0.02, 0.2):
        base = BinaryLinear(w, offset * w.norm().item() - (w @ x).item())
        smooth = RandomizedSmoothing(base, 0.5, 2)
        label, radius = smooth.certify(x, 20, 2000, 0.01, 500, seed=3)
        with torch.inference_mode():
            generator = torch.Generator().manual_seed(3)
            selection = smooth.sample_counts(x, 20, 500, generator).tolist()
            counts = smooth.sample_counts(x, 2000, 500, generator).tolist()
        top = max(range(2), key=lambda c: (selection[c], -c))
        p_lower = beta.ppf(0.01, counts[top], 2000 - counts[top] + 1) if counts[top] else 0.0
        if p_lower < 0.5:
            assert (label, radius) == (ABSTAIN, 0.0)
        else:
            assert label == top and radius == pytest.approx(0.5 * norm.ppf(p_lower), rel=1e-9)
        if offset == 0.0:
            assert label == ABSTAIN
        if offset == 0.2:
            assert label == 1 and radius > 0


def _reference_counts(base, x, sigma, num, batch_size, generator, classes):
    """A slow loop: the same noise protocol (normal_(0, σ) on a (b, *x.shape) buffer per batch), then each
    noisy sample through the model alone and counted in Python."""
    counts = [0] * classes
    remaining = num
    while remaining > 0:
        size = min(batch_size, remaining)
        noise = torch.empty((size, *x.shape)).normal_(0.0, sigma, generator=generator)
        for i in range(size):
            with torch.no_grad():
                counts[int(base((x + noise[i])[None]).argmax(1))] += 1
        remaining -= size
    return counts


def test_counts_match_per_sample_reference_and_seed_determinism():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 2, 2)
    smooth = RandomizedSmoothing(base, 0.8, 4)
    with torch.inference_mode():
        fast = smooth.sample_counts(x, 333, 100, torch.Generator().manual_seed(5))
    assert fast.dtype == torch.int64 and int(fast.sum()) == 333
    reference = _reference_counts(base, x, 0.8, 333, 100, torch.Generator().manual_seed(5), 4)
    assert fast.tolist() == reference
    assert sum(c > 0 for c in reference) >= 2, "noise large enough that several classes occur"
    # certify = argmax of the first n0 draws, count of the next n draws, same stream
    generator = torch.Generator().manual_seed(9)
    selection = _reference_counts(base, x, 0.8, 50, 64, generator, 4)
    estimation = _reference_counts(base, x, 0.8, 400, 64, generator, 4)
    top = max(range(4), key=lambda c: (selection[c], -c))
    p_lower = clopper_pearson_lower(estimation[top], 400, 0.01)
    result = smooth.certify(x, 50, 400, 0.01, 64, seed=9)
    assert result == ((top, 0.8 * norm.ppf(p_lower)) if p_lower >= 0.5 else (ABSTAIN, 0.0))
    assert smooth.certify(x, 50, 400, 0.01, 64, seed=9) == result
    with torch.inference_mode():
        other = smooth.sample_counts(x, 333, 100, torch.Generator().manual_seed(6))
    assert other.tolist() != fast.tolist()
    torch.manual_seed(123)  # seed=None: the device's default generator
    first = smooth.predict(x, 200, 0.5, 64)
    torch.manual_seed(123)
    assert smooth.predict(x, 200, 0.5, 64) == first


def test_predict_binomial_test():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5)
    smooth = RandomizedSmoothing(base, 1.0, 3)
    for alpha in (1e-3, 0.05, 0.5):
        counts = _reference_counts(base, x, 1.0, 300, 128, torch.Generator().manual_seed(4), 3)
        order = sorted(range(3), key=lambda c: (-counts[c], c))
        p_value = binomtest(counts[order[0]], counts[order[0]] + counts[order[1]], 0.5).pvalue
        expected = ABSTAIN if p_value > alpha else order[0]
        assert smooth.predict(x, 300, alpha, 128, seed=4) == expected
    assert RandomizedSmoothing(Constant(1), 1.0, 3).predict(x, 50, 1e-3, 16, seed=0) == 1
    boundary = BinaryLinear(torch.ones(5), -x.sum().item())  # p = ½ exactly
    assert RandomizedSmoothing(boundary, 1.0, 2).predict(x, 400, 1e-3, 100, seed=0) == ABSTAIN


# --- one host read per call, eval mode, progress bar -------------------------------------------------------
_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def test_one_host_read_per_call_and_training_flag_restored(monkeypatch):
    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    base.train()
    x = torch.randn(4)
    smooth = RandomizedSmoothing(base, 0.5, 3)
    smooth.certify(x, 10, 20, 0.1, 7, seed=0)  # warm up imports (scipy, tqdm) outside the count
    reads: list[str] = []
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    # the __bool__ is the finite check of a CPU x (free there); for a GPU x it rides along with the one read
    first = smooth.certify(x, 100, 1000, 1e-3, 64, seed=0)
    assert reads == ["__bool__", "tolist"], reads
    reads.clear()
    smooth.predict(x, 1000, 1e-3, 64, seed=0)
    assert reads == ["__bool__", "tolist"], reads
    monkeypatch.undo()
    assert base.training, "the base model's training flag is restored"
    # eval mode during sampling: dropout off, so the result is reproducible and equals an eval-mode run
    base.eval()
    assert smooth.certify(x, 100, 1000, 1e-3, 64, seed=0) == first
    assert smooth.certify(x, 100, 1000, 1e-3, 64, seed=0, progress=True) == first


def test_autocast_knob_runs():
    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    smooth = RandomizedSmoothing(base, 0.25, 3, autocast_dtype=torch.bfloat16)
    label, radius = smooth.certify(torch.ones(4), 10, 200, 0.01, 64, seed=0)
    assert label in (ABSTAIN, 0, 1, 2) and radius >= 0.0


# --- bad input ---------------------------------------------------------------------------------------------
def test_bad_input():
    base = Constant(0)
    with pytest.raises(ValueError, match="sigma"):
        RandomizedSmoothing(base, 0.0, 3)
    with pytest.raises(ValueError, match="sigma"):
        RandomizedSmoothing(base, math.inf, 3)
    with pytest.raises(ValueError, match="num_classes"):
        RandomizedSmoothing(base, 1.0, 1)
    with pytest.raises(TypeError, match="base"):
        RandomizedSmoothing("model", 1.0, 3)
    smooth = RandomizedSmoothing(base, 1.0, 3)
    x = torch.zeros(4)
    for kwargs, match in [(dict(n0=0), "n0"), (dict(n=0), "n must"), (dict(n0=11, n=10), "n0 = 11 > n = 10"),
                          (dict(alpha=0.0), "alpha"), (dict(alpha=1.0), "alpha"),
                          (dict(batch_size=0), "batch_size"),
                          (dict(n=2.5), "n must")]:
        args = dict(n0=5, n=10, alpha=0.01, batch_size=4) | kwargs
        with pytest.raises(ValueError, match=match):
            smooth.certify(x, **args)
    with pytest.raises(ValueError, match="ONE"):
        smooth.certify(torch.tensor(1.0), 5, 10, 0.01, 4)
    with pytest.raises(ValueError, match="NaN"):
        smooth.certify(torch.tensor([0.0, math.nan]), 5, 10, 0.01, 4)
    with pytest.raises(TypeError, match="seed"):
        smooth.certify(x, 5, 10, 0.01, 4, seed=1.5)
    with pytest.raises(ValueError, match="logits"):
        RandomizedSmoothing(Constant(0, classes=4), 1.0, 3).certify(x, 5, 10, 0.01, 4)
    with pytest.raises(ValueError, match="n must"):
        smooth.predict(x, 0, 0.01, 4)
    with pytest.raises(ValueError, match="alpha"):
        smooth.predict(x, 10, 2.0, 4)
