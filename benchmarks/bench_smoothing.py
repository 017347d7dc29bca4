"""Randomized smoothing CERTIFY of one CIFAR-sized input (3×32×32) at n = 100,000 (n0 = 100, α = 1e-3;
on a CPU n = 2,000 so that a case fits its time box): lipkern's RandomizedSmoothing against a faithful
re-implementation of Cohen et al.'s reference loop (locuslab/smoothing ``code/core.py``, written from its
description here) on the same model. Group: smoothing-certify.

Cohen's loop, per batch: ``x.repeat`` the input, ``randn_like`` the noise and scale it (a separate kernel),
add it, run the model, ``argmax``, copy the predictions to the host (one synchronization per batch) and count
them in a Python loop over the batch; the Clopper–Pearson bound from the counts. lipkern: the noise drawn in
place into one reused buffer (``normal_(0, σ)`` then ``add_(x)`` broadcast), inference_mode, counts
accumulated on the device (``index_add_``), one host read per certify call. Both draw their noise on the
model's device.

Models: ``pool-linear`` (global average pool + linear 3→10: almost no model work, so the harness's own cost),
``cnn`` a plain ReLU CNN (conv 3→16→32→64, strides 1/2/2, global average pool, linear 64→10; 5.6 MFLOP per
sample) and, on a GPU only, ``convnet-xs`` lipkern.models.ConvNet("XS") with AOL layers. Providers:
``lipkern`` and ``cohen-loop`` at Cohen's default batch of 1000, ``lipkern-b10k`` at a batch of 10,000,
``lipkern-bf16`` (GPU only) under bf16 autocast. Each case records the model's GFLOP for the n0 + n samples
and the bytes of noise (``model_gflop``, ``noise_bytes``) for the roofline.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, norm
from torch import nn

from benchmarks.conftest import DEVICE, ON_GPU
from lipkern.certify import RandomizedSmoothing

N0, N, ALPHA, SIGMA = 100, (100_000 if ON_GPU else 2_000), 1e-3, 0.25
SHAPE = (3, 32, 32)


def _plain_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "cnn":
        model = _plain_cnn()
    elif name == "pool-linear":  # almost no model work: the harness's own cost
        model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    else:
        from lipkern.models import ConvNet

        model = ConvNet("XS", layer="aol")
    return model.to(DEVICE).eval()


class CohenLoop:
    """Cohen et al.'s Smooth.certify as their core.py does it (re-implemented from its description)."""

    def __init__(self, base: nn.Module, num_classes: int, sigma: float):
        self.base, self.num_classes, self.sigma = base, num_classes, sigma

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        counts = np.zeros(self.num_classes, dtype=int)
        with torch.no_grad():
            for _ in range(math.ceil(num / batch_size)):
                size = min(batch_size, num)
                num -= size
                batch = x.repeat((size, 1, 1, 1))
                noise = torch.randn_like(batch, device=x.device) * self.sigma
                predictions = self.base(batch + noise).argmax(1).cpu().numpy()  # a host sync per batch
                per_batch = np.zeros(self.num_classes, dtype=int)
                for label in predictions:  # the reference counts in a Python loop
                    per_batch[label] += 1
                counts += per_batch
        return counts

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int):
        self.base.eval()
        top = int(self._sample_noise(x, n0, batch_size).argmax())
        n_a = int(self._sample_noise(x, n, batch_size)[top])
        p_lower = beta.ppf(alpha, n_a, n - n_a + 1) if n_a > 0 else 0.0  # proportion_confint(2α, "beta")[0]
        return (-1, 0.0) if p_lower < 0.5 else (top, self.sigma * norm.ppf(p_lower))


def _flops_per_sample(model: nn.Module) -> float:
    """Multiply-adds × 2 of the convs and linears on one 3×32×32 input (from a forward pass with hooks)."""
    total = [0.0]

    def hook(module, inputs, output):
        weight = module.weight
        if weight.dim() == 4:  # a convolution (nn.Conv2d, lipkern's AOL/CPL/Spectral convs)
            total[0] += 2.0 * output[0].numel() * weight[0].numel()
        else:
            total[0] += 2.0 * weight.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() in (2, 4)]
    with torch.no_grad():
        model(torch.zeros(1, *SHAPE, device=DEVICE))
    for h in handles:
        h.remove()
    return total[0]


PROVIDERS = ["lipkern", "lipkern-b10k", "cohen-loop"] + (["lipkern-bf16"] if ON_GPU else [])


@pytest.mark.benchmark(group="smoothing-certify")
@pytest.mark.parametrize("model_name", ["pool-linear", "cnn"] + (["convnet-xs"] if ON_GPU else []))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_certify_one_input(run_timed, provider, model_name):
    model = _model(model_name)
    x = torch.rand(SHAPE, device=DEVICE)
    if provider == "cohen-loop":
        cohen = CohenLoop(model, 10, SIGMA)
        fn = lambda: cohen.certify(x, N0, N, ALPHA, 1000)  # noqa: E731
    else:
        autocast = torch.bfloat16 if provider == "lipkern-bf16" else None
        smooth = RandomizedSmoothing(model, SIGMA, 10, autocast_dtype=autocast)
        batch = 10_000 if provider == "lipkern-b10k" else 1000
        fn = lambda: smooth.certify(x, N0, N, ALPHA, batch, seed=0)  # noqa: E731
    flops = _flops_per_sample(model) * (N0 + N)
    run_timed(fn, provider, model=model_name, n=N, n0=N0, model_gflop=flops / 1e9,
              noise_bytes=4 * math.prod(SHAPE) * (N0 + N))
