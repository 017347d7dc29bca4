"""CPL: CPLConv2d / CPLLinear train steps and peak memory against the eager formulation of the reference code
(conv → ReLU → conv_transpose, h = 2/σ² from one power-iteration step per training step), and a CPL-S train
step against the same network with the eager formula in every CPL layer (``lipkern.models.use_eager_cpl``: same
weights, same power iteration and h, so the difference is the CPL op: its saved activations, passes and
launches). TF32: every provider runs under the session's settings, recorded per case in the JSON
(``tf32_matmul``, ``tf32_cudnn``). Group: model-train-step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipkern
from benchmarks.conftest import DEVICE
from lipkern.models import CPLNet, use_eager_cpl

ON_GPU = DEVICE.type == "cuda"
# CPU: the tiny size of a quick smoke run and a realistic one (b64, 32², 64 channels).
CONV = [dict(batch=256, size=32, channels=64)] if ON_GPU else [dict(batch=8, size=8, channels=8),
                                                                dict(batch=64, size=32, channels=64)]
LINEAR = dict(batch=1024, features=4096) if ON_GPU else dict(batch=32, features=64)


class _EagerCPLConv2d(nn.Module):
    """The reference code's layer: eager ops, a persistent power-iteration vector, 1 iteration per step."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("u", torch.randn(1, channels, size, size))

    def forward(self, x):
        with torch.no_grad():
            v = F.conv2d(self.u, self.weight, padding=1)
            v = v / v.norm()
            u = F.conv_transpose2d(v, self.weight, padding=1)
            self.u.copy_(u / u.norm())
        sigma = (v * F.conv2d(self.u, self.weight, padding=1)).sum()
        h = 2 / (sigma**2 + 1e-4)
        res = F.conv_transpose2d(F.relu(F.conv2d(x, self.weight, self.bias, padding=1)), self.weight, padding=1)
        return x - h * res


class _EagerCPLLinear(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.linear = nn.Linear(features, features)
        self.register_buffer("u", torch.randn(features))

    def forward(self, x):
        w = self.linear.weight
        with torch.no_grad():
            v = F.normalize(w @ self.u, dim=0)
            self.u.copy_(F.normalize(w.T @ v, dim=0))
        sigma = v @ w @ self.u
        return x - 2 / sigma**2 * (F.relu(self.linear(x)) @ w)


def _train_step(layer, x):
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()
        opt.step()

    return step


@pytest.mark.benchmark(group="model-train-step")
@pytest.mark.parametrize("provider", ["lipkern", "eager", "plain"])
@pytest.mark.parametrize("size", CONV, ids=lambda s: f"b{s['batch']}-{s['size']}px-c{s['channels']}")
def test_cplconv2d_train_step(run_timed, provider, size):
    """plain: one nn.Conv2d of the same width (a CPL layer is two convolutions, x − h·Aᵀσ(Ax + b), so its
    step costs about twice a plain conv's: 6 convolutions against 3)."""
    c, b, n = size["channels"], size["batch"], size["size"]
    if provider == "plain":
        layer = torch.nn.Conv2d(c, c, 3, padding=1, device=DEVICE)
    else:
        layer = (lipkern.nn.CPLConv2d(c, input_size=n, device=DEVICE) if provider == "lipkern"
                 else _EagerCPLConv2d(c, n).to(DEVICE))
    x = torch.randn(b, c, n, n, device=DEVICE)
    run_timed(_train_step(layer, x), provider, layer="cpl-conv", **size)


@pytest.mark.benchmark(group="model-train-step")
@pytest.mark.parametrize("provider", ["lipkern", "eager"])
def test_cpllinear_train_step(run_timed, provider):
    f, b = LINEAR["features"], LINEAR["batch"]
    layer = lipkern.nn.CPLLinear(f, device=DEVICE) if provider == "lipkern" else _EagerCPLLinear(f).to(DEVICE)
    x = torch.randn(b, f, device=DEVICE)
    run_timed(_train_step(layer, x), provider, layer="cpl-linear", **LINEAR)


@pytest.mark.benchmark(group="model-train-step")
@pytest.mark.parametrize("provider", ["lipkern", "eager"])
def test_cpl_s_train_step(run_timed, provider):
    """CPL-S, batch 256 (peak memory recorded): a GPU benchmark."""
    if not ON_GPU:
        pytest.skip("CPL-S (41M parameters) is a GPU benchmark")
    batch = 256
    model = CPLNet("S", device=DEVICE)
    if provider == "eager":
        use_eager_cpl(model)
    x = torch.randn(batch, 3, 32, 32, device=DEVICE)
    run_timed(_train_step(model, x), provider, model="CPL-S", batch=batch)
