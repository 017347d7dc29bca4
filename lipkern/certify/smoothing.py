"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): CERTIFY and PREDICT with fast Monte Carlo.

The smoothed classifier g(x) = argmax_c P_{δ∼N(0, σ²I)}[base(x + δ) = c] is robust within ℓ₂ radius
σ·Φ⁻¹(p̲_A), where p̲_A is a lower confidence bound of the top class's probability (Cohen et al., Theorem 1
with p_B = 1 − p_A). Both procedures hold with probability ≥ 1 − α over the Monte Carlo noise, which is the
only sense in which these radii are guarantees (the base model's rounding does not matter: the count is of
what the model outputs).

Sampling (one code path for certify and predict): noise is drawn on x's device in batches of ``batch_size``
(``Tensor.normal_(0, σ, generator=g)`` on a (b, *x.shape) buffer, then ``add_(x)``: x broadcast, never
copied), with a ``torch.Generator`` on that device seeded by ``seed`` (None: the device's default generator).
The base model runs under inference_mode (optionally autocast), argmax per row, and the counts are accumulated
on the device with ``index_add_``; one host read per certify/predict call, at the end. A draw whose logits are
not all finite counts for no class (a vote against the top class: the guarantee holds for any base model);
when every draw is such a draw the call raises a ValueError.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from lipkern._checks import as_positive_float, is_int

__all__ = ["ABSTAIN", "RandomizedSmoothing", "adaptive_decision", "adaptive_looks", "clopper_pearson_lower",
           "smoothing_radius"]

ABSTAIN = -1


def _check_alpha(alpha, where: str) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"{where}: alpha must be a float in (0, 1), got {alpha!r}")
    return float(alpha)


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 − alpha) Clopper–Pearson lower confidence bound of a binomial proportion.

    Beta⁻¹(alpha; k, n − k + 1) (0 when k = 0), computed with ``scipy.stats.beta.ppf``: the lower end of
    statsmodels' ``proportion_confint(k, n, alpha=2·alpha, method="beta")`` that Cohen et al. use, and of
    ``scipy.stats.binomtest(k, n, alternative="greater").proportion_ci(1 − alpha, method="exact")``. The Beta
    quantile is used because binomtest's root finder is less accurate far in the tail (k = 1, n = 10⁵: 2.5e-5
    relative, above the exact 1 − (1 − α)^(1/n)); for p ≥ 0.01 the two agree to ~1e-12."""
    from scipy.stats import beta

    if not is_int(trials) or trials <= 0:
        raise ValueError(f"clopper_pearson_lower: trials must be a positive int, got {trials!r}")
    if not is_int(successes) or not 0 <= successes <= trials:
        raise ValueError(f"clopper_pearson_lower: successes must be an int in [0, {trials}], "
                         f"got {successes!r}")
    alpha = _check_alpha(alpha, "clopper_pearson_lower")
    if successes == 0:
        return 0.0
    # rounded down by ~1e-15 relative: scipy's quantile is accurate to a few ulps, not directed
    return float(beta.ppf(alpha, int(successes), int(trials) - int(successes) + 1)) * _DOWN


_DOWN = 1 - 2.0**-48  # a few ulps of float64 below: the quantile functions round to nearest, not down


def smoothing_radius(p_lower: float, sigma: float) -> float:
    """σ·Φ⁻¹(p̲_A): the certified ℓ₂ radius for a lower bound p̲_A ≥ ½ of the top-class probability."""
    from scipy.stats import norm

    if not 0.5 <= p_lower <= 1.0:
        raise ValueError(f"smoothing_radius: p_lower must lie in [0.5, 1], got {p_lower!r}")
    sigma = as_positive_float(sigma, "smoothing_radius: sigma")
    return float(sigma * norm.ppf(p_lower)) * _DOWN  # rounded down, as p_lower


def adaptive_looks(n_max: int, first: int = 1000) -> list[int]:
    """The cumulative draw counts at which the adaptive CERTIFY looks: first, 2·first, 4·first, … and n_max
    (the last look; ``first`` is capped at n_max)."""
    looks, t = [], min(first, n_max)
    while t < n_max:
        looks.append(t)
        t *= 2
    return looks + [n_max]


def adaptive_alphas(alpha: float, looks: int) -> list[float]:
    """The levels of the adaptive CERTIFY's looks, summing to alpha: half of it for the last look (where the
    points near a threshold end, so their radius is close to fixed n's), the other half shared by the earlier
    looks (where the points far from every threshold stop); alpha itself for a single look."""
    if looks <= 1:
        return [alpha]
    return [alpha / (2 * (looks - 1))] * (looks - 1) + [alpha / 2]


def adaptive_decision(successes, trials, look_alpha: float, thresholds, n_max: int | None = None,
                      final_alpha: float | None = None) -> tuple:
    """One look of the adaptive CERTIFY, vectorized over points (numpy arrays or scalars): the one-sided
    Clopper–Pearson lower and upper bounds of n_A/t at level ``look_alpha`` each, the number of ``thresholds``
    (increasing probabilities Φ(ε_k/σ)) the lower bound exceeds, and whether the outcome is settled: every
    threshold exceeded; or the upper bound at or below the next one (that radius is out of reach); or, given
    ``n_max`` and ``final_alpha``, the next radius out of reach at n_max too: with p at its 95 % upper estimate
    the last look's lower bound would stay at or below the next threshold. (A stopping rule: the guarantee
    holds whichever it is; this one trades rarely a radius that fixed n would reach for fewer draws.)"""
    import numpy as np
    from scipy.stats import beta

    k, t = np.asarray(successes), np.asarray(trials)
    lower = np.where(k > 0, beta.ppf(look_alpha, np.maximum(k, 1), t - k + 1), 0.0) * _DOWN
    upper = np.where(k < t, beta.ppf(1 - look_alpha, k + 1, np.maximum(t - k, 1)), 1.0)
    levels = np.asarray(thresholds, dtype=float)
    reached = (lower[..., None] > levels).sum(-1)
    following = np.append(levels, 2.0)[reached]  # the next threshold (2: none left)
    settled = (reached == len(levels)) | (upper <= following)
    if n_max is not None and final_alpha is not None:
        hopeful = np.where(k < t, beta.ppf(0.95, k + 1, np.maximum(t - k, 1)), 1.0)
        best = np.clip(np.ceil(hopeful * n_max), 1, n_max)
        best_lower = beta.ppf(final_alpha, best, n_max - best + 1)
        settled = settled | ((best_lower <= following) & (t < n_max))
    return lower, upper, reached, settled


class RandomizedSmoothing:
    """The smoothed classifier of ``base`` (maps (B, *x.shape) to (B, num_classes) logits) with noise level σ.

    ``autocast_dtype``: run the base model under torch.autocast in this dtype (e.g. torch.bfloat16 on a GPU);
    the certificate is then about that low-precision model, which is what is sampled."""

    ABSTAIN = ABSTAIN

    def __init__(self, base: nn.Module, sigma: float, num_classes: int, *,
                 autocast_dtype: torch.dtype | None = None):
        if not callable(base):
            raise TypeError(f"RandomizedSmoothing: base must be a module or callable, got "
                            f"{type(base).__name__}")
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not (0 < sigma < math.inf):
            raise ValueError(f"RandomizedSmoothing: sigma must be a finite float > 0, got {sigma!r}")
        if not is_int(num_classes) or num_classes < 2:
            raise ValueError(f"RandomizedSmoothing: num_classes must be an int >= 2, got {num_classes!r}")
        self.base = base
        self.sigma = float(sigma)
        self.num_classes = int(num_classes)
        self.autocast_dtype = autocast_dtype

    # -- sampling -----------------------------------------------------------------------------------------
    def _check_input(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"RandomizedSmoothing: x must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.numel() == 0 or not x.is_floating_point():
            raise ValueError("RandomizedSmoothing: x must be ONE floating-point input without the batch "
                             f"dimension (e.g. (3, 32, 32)), got {tuple(x.shape)} {x.dtype}")
        if x.device.type == "cpu" and not torch.isfinite(x).all():  # on a GPU: checked with the counts' read
            raise ValueError("RandomizedSmoothing: x contains NaN or Inf")
        return x.detach()

    def _generator(self, x: torch.Tensor, seed) -> torch.Generator | None:
        if seed is None:
            return None
        if not is_int(seed):
            raise TypeError(f"RandomizedSmoothing: seed must be an int or None, got {seed!r}")
        return torch.Generator(device=x.device).manual_seed(int(seed))

    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int, generator=None,
                      progress=None) -> torch.Tensor:
        """Counts (num_classes,) int64 ON x's DEVICE of argmax base(x + δ) over ``num`` noise draws (draws with
        a NaN or Inf logit count for no class, so the counts may sum to less than ``num``); no host read.
        ``progress``: a tqdm bar to update, or None. Call within inference_mode with base in eval mode (certify
        and predict do)."""
        return self._counts(x, num, batch_size, generator, progress)[:self.num_classes]

    def largest_batch(self, x: torch.Tensor, cap: int, start: int = 256) -> int:
        """The largest batch start·2^k ≤ ``cap`` (at least min(start, cap)) whose noisy forward pass of ``base``
        at ``x`` fits in memory by itself: doubling until the allocator raises ``torch.OutOfMemoryError``
        (the cache is emptied after it) or ``cap`` is reached. Meant for a GPU; on the CPU memory is rarely
        the limit and the doubling only stops at ``cap``."""
        for name, value in (("cap", cap), ("start", start)):
            if not is_int(value) or value <= 0:
                raise ValueError(f"RandomizedSmoothing.largest_batch: {name} must be a positive int, got {value!r}")
        x = self._check_input(x)
        fits = min(start, cap)
        base, was_training = self.base, getattr(self.base, "training", None)
        try:
            if isinstance(base, nn.Module):
                base.eval()
            while fits * 2 <= cap:
                try:
                    with torch.inference_mode():
                        self._counts(x, fits * 2, fits * 2, None, None)
                        if x.device.type == "cuda":
                            torch.cuda.synchronize(x.device)
                except torch.OutOfMemoryError:
                    break
                fits *= 2
        finally:
            if x.device.type == "cuda":
                torch.cuda.empty_cache()
            if isinstance(base, nn.Module):
                base.train(was_training)
        return fits

    def _counts(self, x, num, batch_size, generator, progress) -> torch.Tensor:
        """:meth:`sample_counts` and, last, the number of draws without a class."""
        counts = torch.zeros(self.num_classes + 1, dtype=torch.int64, device=x.device)
        ones = torch.ones(min(batch_size, num), dtype=torch.int64, device=x.device)
        buffer = torch.empty((min(batch_size, num), *x.shape), dtype=x.dtype, device=x.device)
        remaining = num
        while remaining > 0:
            size = min(batch_size, remaining)
            noisy = buffer[:size].normal_(0.0, self.sigma, generator=generator).add_(x)
            with torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                logits = self.base(noisy)
            if logits.dim() != 2 or logits.shape[0] != size or logits.shape[1] != self.num_classes:
                raise ValueError(f"RandomizedSmoothing: base must return ({size}, {self.num_classes}) logits "
                                 f"for a batch of {size}, got {tuple(logits.shape)}")
            # a draw whose logits are not all finite has no class (argmax of NaN is an index, not a
            # prediction): it goes to the extra bin, a vote against every class (sound for any base model)
            labels = torch.where(torch.isfinite(logits).all(dim=1), logits.argmax(dim=1), self.num_classes)
            counts.index_add_(0, labels, ones[:size])
            remaining -= size
            if progress is not None:
                progress.update(size)
        return counts

    def _run(self, x, draws: list[int], batch_size: int, seed, progress: bool) -> list[list[int]]:
        """Counts of consecutive groups of draws (same generator stream), read from the device at once."""
        from tqdm.auto import tqdm

        x = self._check_input(x)
        if not is_int(batch_size) or batch_size <= 0:
            raise ValueError(f"RandomizedSmoothing: batch_size must be a positive int, got {batch_size!r}")
        generator = self._generator(x, seed)
        base = self.base
        was_training = getattr(base, "training", None)
        bar = tqdm(total=sum(draws), unit="sample", desc="smoothing", disable=not progress)
        try:
            if isinstance(base, nn.Module):
                base.eval()
            with torch.inference_mode():
                counts = [self._counts(x, num, batch_size, generator, bar) for num in draws]
                finite = torch.isfinite(x).all().to(torch.int64)[None].expand(self.num_classes + 1)
                *values, x_finite = torch.stack([*counts, finite]).tolist()  # the one host read
        finally:
            bar.close()
            if isinstance(base, nn.Module):
                base.train(was_training)
        if not x_finite[0]:
            raise ValueError("RandomizedSmoothing: x contains NaN or Inf")
        for num, group in zip(draws, values):
            if group[-1] == num:
                raise ValueError(f"RandomizedSmoothing: the base model returned NaN or Inf logits for all {num} "
                                 "noise draws (a diverged or broken model); nothing to certify")
        return [group[:-1] for group in values]

    # -- Cohen et al.'s procedures --------------------------------------------------------------------------
    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                seed: int | None = None, progress: bool = False) -> tuple[int, float]:
        """CERTIFY: (class, radius), or (ABSTAIN = −1, 0.0).

        n0 draws select ĉ_A (the most frequent class), n fresh draws count n_A; p̲_A is the one-sided
        (1 − alpha) Clopper–Pearson bound of n_A/n; abstain if p̲_A < ½, else the radius is σ·Φ⁻¹(p̲_A).
        With probability ≥ 1 − alpha over the noise, a returned class is g(x) and g is constant on the open
        ℓ₂ ball of that radius. x: one input without the batch dimension. Requires 0 < n0 ≤ n."""
        for name, value in (("n0", n0), ("n", n)):
            if not is_int(value) or value <= 0:
                raise ValueError(f"RandomizedSmoothing.certify: {name} must be a positive int, got {value!r}")
        if n0 > n:
            raise ValueError(f"RandomizedSmoothing.certify: n0 = {n0} > n = {n} (n0 selects the class with a "
                             f"few draws, n estimates its probability with many)")
        alpha = _check_alpha(alpha, "RandomizedSmoothing.certify")
        selection, estimation = self._run(x, [n0, n], batch_size, seed, progress)
        top = max(range(self.num_classes), key=lambda c: (selection[c], -c))  # argmax, lowest index on ties
        p_lower = clopper_pearson_lower(estimation[top], n, alpha)
        if p_lower < 0.5:
            return ABSTAIN, 0.0
        return top, smoothing_radius(p_lower, self.sigma)

    def certify_adaptive(self, x: torch.Tensor, n0: int, n_max: int, alpha: float, batch_size: int, radii,
                         seed: int | None = None, first: int = 1000) -> tuple[int, float, int]:
        """CERTIFY that stops sampling once the outcome at ``radii`` (the ε's of a certified-accuracy table) is
        settled: (class, radius, noise draws used, selection included), or (ABSTAIN, 0.0, draws).

        n0 draws select ĉ_A as in :meth:`certify`; then draws continue in one stream and the counts are looked at
        after t_1 < … < t_J = n_max draws (:func:`adaptive_looks`). At look j the one-sided Clopper–Pearson
        lower bound L_j of p_A is taken at level α_j (:func:`adaptive_alphas`: alpha/2 at the last look, alpha/2
        shared by the others). Why any stopping rule keeps the guarantee: the event "L_j ≤ p_A at every look j"
        fails with probability ≤ Σ_j α_j = alpha (a union bound over the J looks, each bound exact for the
        binomial count at its fixed t_j, whatever happened before); on that event the radius σ·Φ⁻¹(L_j) reported
        at the look where it stops is certified, whichever look that is. The stopping rule
        (:func:`adaptive_decision`): every requested radius certified; or the upper bound (same level) at or below
        Φ(ε/σ) for the next radius, which then needs p_A above where it lies; or that radius out of reach even at
        n_max for p at its 95 % upper estimate; else the next look. The price: the last look's bound is at
        alpha/2 instead of alpha."""
        for name, value in (("n0", n0), ("n_max", n_max), ("first", first)):
            if not is_int(value) or value <= 0:
                raise ValueError(f"RandomizedSmoothing.certify_adaptive: {name} must be a positive int, got "
                                 f"{value!r}")
        alpha = _check_alpha(alpha, "RandomizedSmoothing.certify_adaptive")
        radii = sorted(float(r) for r in radii)
        if not radii or radii[0] < 0:
            raise ValueError(f"RandomizedSmoothing.certify_adaptive: radii must be non-empty and >= 0, got {radii}")
        from scipy.stats import norm

        thresholds = [float(norm.cdf(r / self.sigma)) for r in radii]
        looks = adaptive_looks(n_max, first)
        alphas = adaptive_alphas(alpha, len(looks))
        x = self._check_input(x)
        (selection,) = self._run(x, [n0], batch_size, seed, False)
        top = max(range(self.num_classes), key=lambda c: (selection[c], -c))
        generator = self._generator(x, None if seed is None else seed + 2**31)  # the estimation's own stream
        base, was_training = self.base, getattr(self.base, "training", None)
        successes, done = 0, 0
        try:
            if isinstance(base, nn.Module):
                base.eval()
            with torch.inference_mode():
                for t, look_alpha in zip(looks, alphas):
                    successes += int(self._counts(x, t - done, batch_size, generator, None)[top])
                    done = t
                    lower, _, _, settled = adaptive_decision(successes, t, look_alpha, thresholds, n_max,
                                                             alphas[-1])
                    if bool(settled):
                        break
        finally:
            if isinstance(base, nn.Module):
                base.train(was_training)
        if float(lower) < 0.5:
            return ABSTAIN, 0.0, n0 + done
        return top, smoothing_radius(float(lower), self.sigma), n0 + done

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int, seed: int | None = None) -> int:
        """PREDICT: the top class of n draws, or ABSTAIN when the two-sided binomial test of the top-two
        counts (n_1 of n_1 + n_2 at p = ½) has a p-value > alpha. With probability ≥ 1 − alpha a returned
        class is g(x)."""
        from scipy.stats import binomtest

        if not is_int(n) or n <= 0:
            raise ValueError(f"RandomizedSmoothing.predict: n must be a positive int, got {n!r}")
        alpha = _check_alpha(alpha, "RandomizedSmoothing.predict")
        (counts,) = self._run(x, [n], batch_size, seed, False)
        order = sorted(range(self.num_classes), key=lambda c: (-counts[c], c))
        first, second = counts[order[0]], counts[order[1]]
        if binomtest(first, first + second, p=0.5).pvalue > alpha:
            return ABSTAIN
        return order[0]
