"""The adaptive CERTIFY (lipkern.certify.smoothing): its false-certification rate by simulation with exact
binomial draws at adversarial p (just below a radius's threshold), its draws against fixed n, and the method on a
model against the fixed-n CERTIFY."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from lipkern.certify import RandomizedSmoothing
from lipkern.certify.smoothing import (ABSTAIN, adaptive_alphas, adaptive_decision, adaptive_looks,
                                       clopper_pearson_lower)

SIGMA, ALPHA, N_MAX = 0.5, 0.001, 100_000
EPS = [0.0, 0.25, 0.5, 0.75, 1.0]
THRESHOLDS = [float(norm.cdf(e / SIGMA)) for e in EPS]


def _simulate(p: float, points: int, seed: int):
    """The adaptive procedure on ``points`` simulated points whose top class has probability p (exact binomial
    increments between looks): (final lower bound, draws) per point."""
    rng = np.random.default_rng(seed)
    looks = adaptive_looks(N_MAX)
    alphas = adaptive_alphas(ALPHA, len(looks))
    assert sum(alphas) <= ALPHA * (1 + 1e-12)
    successes = np.zeros(points, dtype=np.int64)
    lower = np.zeros(points)
    draws = np.zeros(points, dtype=np.int64)
    active = np.ones(points, dtype=bool)
    previous = 0
    for t, look_alpha in zip(looks, alphas):
        successes[active] += rng.binomial(t - previous, p, size=int(active.sum()))
        previous = t
        low, _, _, settled = adaptive_decision(successes[active], t, look_alpha, THRESHOLDS, N_MAX, alphas[-1])
        index = np.flatnonzero(active)
        lower[index], draws[index] = low, t
        active[index[settled]] = False
        if not active.any():
            break
    return lower, draws


@pytest.mark.parametrize("threshold", [0, 2, 4], ids=["eps0", "eps0.5", "eps1"])
def test_false_certifications_stay_below_alpha(threshold):
    """p just below Φ(ε/σ): any certificate of a radius ≥ ε is false (L > p). Over 10⁵ simulated points the
    rate of such certificates is at most alpha."""
    p = THRESHOLDS[threshold] - 1e-6
    lower, _ = _simulate(p, 100_000, seed=threshold)
    assert (lower > p).mean() <= ALPHA


def test_the_stopping_rule_settles_early_away_from_the_thresholds():
    """Far from every threshold the procedure stops at the first looks; at the end it certifies the same
    radii as fixed n = 100,000 would at level alpha, or one fewer (its last bound is at alpha/2)."""
    for p, most in [(0.2, 1000), (0.999, 1000), (0.6, 4000)]:
        lower, draws = _simulate(p, 2000, seed=1)
        assert np.median(draws) <= most, (p, np.median(draws))
    for p in (0.6, 0.75, 0.9, 0.97):
        lower, _ = _simulate(p, 400, seed=2)
        fixed = [clopper_pearson_lower(int(k), N_MAX, ALPHA)
                 for k in np.random.default_rng(3).binomial(N_MAX, p, size=400)]
        reached = (lower[:, None] > np.array(THRESHOLDS)).sum(1)
        fixed_reached = (np.array(fixed)[:, None] > np.array(THRESHOLDS)).sum(1)
        assert abs(np.median(reached) - np.median(fixed_reached)) <= 1, p


def test_looks_double_up_to_the_budget():
    assert adaptive_looks(100_000) == [1000, 2000, 4000, 8000, 16000, 32000, 64000, 100_000]
    assert adaptive_looks(500) == [500]


def test_certify_adaptive_on_a_model_agrees_with_certify():
    """A model that is right for most noise draws: the adaptive radius is certified at the requested radii as
    CERTIFY's is (same class, radius bucket at most one below), with far fewer draws; a model that cannot be
    certified stops at the first look and abstains."""
    torch.manual_seed(0)
    confident = nn.Linear(4, 3)
    with torch.no_grad():
        confident.weight.zero_()
        confident.weight[1, 0] = 10.0
        confident.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
    x = torch.tensor([2.0, 0.0, 0.0, 0.0])  # p_A = Φ(4): every requested radius, early
    smoother = RandomizedSmoothing(confident, SIGMA, 3)
    top, radius, draws = smoother.certify_adaptive(x, 100, 20_000, ALPHA, 5000, EPS, seed=4)
    fixed_top, fixed_radius = smoother.certify(x, 100, 20_000, ALPHA, 5000, seed=4)
    assert top == fixed_top == 1
    bucket = lambda r: sum(r > e for e in EPS)  # noqa: E731
    assert bucket(fixed_radius) - 1 <= bucket(radius) <= bucket(fixed_radius)
    assert draws <= 100 + 2000
    dice = nn.Linear(4, 3)  # at x = 0 each class has probability 1/3: abstain, at the first look
    with torch.no_grad():
        dice.weight.copy_(torch.eye(3, 4))
        dice.bias.zero_()
    top, radius, draws = RandomizedSmoothing(dice, SIGMA, 3).certify_adaptive(
        torch.zeros(4), 100, 20_000, ALPHA, 1000, EPS, seed=1)
    assert (top, radius) == (ABSTAIN, 0.0) and draws == 100 + 1000
