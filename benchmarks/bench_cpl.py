"""CPL: CPLConv2d / CPLLinear train steps and peak memory against the eager formulation of the reference code
(conv → ReLU → conv_transpose, h = 2/σ² from one power-iteration step per training step), and a CPL-S train
step against the same network with the eager formula in every CPL layer (``lipkern.models.use_eager_cpl``: same
weights, same power iteration and h, so the difference is the CPL op: its saved activations, passes and
launches). TF32: every provider runs under the session's settings, recorded per case in the JSON
(``tf32_matmul``, ``tf32_cudnn``). Group: model-train-step."""

from __future__ import annotations

import pytest
import torch

import lipkern
from benchmarks.bench_models import EagerCPLConv2d, EagerCPLLinear
from benchmarks.conftest import DEVICE
from lipkern.models import CPLNet, use_eager_cpl

ON_GPU = DEVICE.type == "cuda"
# CPU: the tiny size of a quick smoke run and a realistic one (b64, 32², 64 channels).
CONV = [dict(batch=256, size=32, channels=64)] if ON_GPU else [dict(batch=8, size=8, channels=8),
                                                                dict(batch=64, size=32, channels=64)]
LINEAR = dict(batch=1024, features=4096) if ON_GPU else dict(batch=32, features=64)


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
        layer = lipkern.nn.CPLConv2d(c, input_size=n, device=DEVICE)
        layer = layer if provider == "lipkern" else EagerCPLConv2d(layer)  # the reference code's form
    x = torch.randn(b, c, n, n, device=DEVICE)
    run_timed(_train_step(layer, x), provider, layer="cpl-conv", **size)


@pytest.mark.benchmark(group="model-train-step")
@pytest.mark.parametrize("provider", ["lipkern", "eager"])
def test_cpllinear_train_step(run_timed, provider):
    f, b = LINEAR["features"], LINEAR["batch"]
    layer = lipkern.nn.CPLLinear(f, device=DEVICE)
    layer = layer if provider == "lipkern" else EagerCPLLinear(layer)
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
