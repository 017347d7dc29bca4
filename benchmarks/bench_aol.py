"""AOL: the fused rescale op and AOL layer train steps against the eager reference, torch.compile of it and
orthogonium (when installed), in one process. Groups: aol-fwd, aol-fwdbwd, model-train-step."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipkern
from benchmarks.conftest import DEVICE, QUICK
from lipkern.ops import aol_rescale, aol_rescale_ref

ON_GPU = DEVICE.type == "cuda"
CHANNELS = [64, 256, 512] if ON_GPU else [16, 32]
TRAIN = dict(batch=256, size=32, channels=64) if ON_GPU else dict(batch=8, size=8, channels=16)
PROVIDERS = ["lipkern", "eager", "compile", "orthogonium"]


def _orthogonium_rescale(c_out: int, c_in: int, groups: int = 1):
    aol = pytest.importorskip("orthogonium.layers.conv.AOL.aol")
    return aol.MultiStepAOLReparametrizer(min(c_out, c_in), groups=groups, niter=1).to(DEVICE)


@functools.lru_cache(maxsize=None)
def _compiled_ref():
    return torch.compile(aol_rescale_ref)


def _rescale_fn(provider: str, shape):
    if provider == "lipkern":
        return aol_rescale
    if provider == "eager":
        return aol_rescale_ref
    if provider == "compile":
        if not ON_GPU and QUICK:
            pytest.skip("torch.compile on CPU is skipped in quick mode (compilation dominates)")
        return _compiled_ref()
    return _orthogonium_rescale(shape[0], shape[1])


@pytest.mark.benchmark(group="aol-fwd")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("channels", CHANNELS, ids=lambda c: f"c{c}-k3-fp32")
def test_aol_rescale_forward(run_timed, provider, channels):
    shape = (channels, channels, 3, 3)
    fn = _rescale_fn(provider, shape)
    w = torch.randn(shape, device=DEVICE)
    with torch.no_grad():
        run_timed(lambda: fn(w), provider, shape=list(shape))


@pytest.mark.benchmark(group="aol-fwdbwd")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("channels", CHANNELS, ids=lambda c: f"c{c}-k3-fp32")
def test_aol_rescale_forward_backward(run_timed, provider, channels):
    shape = (channels, channels, 3, 3)
    fn = _rescale_fn(provider, shape)
    w = torch.randn(shape, device=DEVICE, requires_grad=True)
    grad = torch.randn(shape, device=DEVICE)

    def step():
        w.grad = None
        fn(w).backward(grad)

    run_timed(step, provider, shape=list(shape))


def _conv_layer(provider: str, c: int) -> nn.Module:
    if provider == "lipkern":
        return lipkern.nn.AOLConv2d(c, c, 3, padding=1, device=DEVICE)
    if provider == "plain":
        return nn.Conv2d(c, c, 3, padding=1, device=DEVICE)
    if provider == "eager":
        return _EagerAOLConv2d(c).to(DEVICE)
    aol = pytest.importorskip("orthogonium.layers.conv.AOL.aol")
    return aol.AOLConv2D(c, c, 3, padding=1, niter=1).to(DEVICE)


class _EagerAOLConv2d(nn.Conv2d):
    """The common public formulation: rescale with the conv trick inside forward, in eager PyTorch."""

    def __init__(self, c: int):
        super().__init__(c, c, 3, padding=1)

    def forward(self, x):
        return F.conv2d(x, aol_rescale_ref(self.weight), self.bias, padding=1)


@pytest.mark.benchmark(group="model-train-step")
@pytest.mark.parametrize("provider", ["lipkern", "plain", "eager", "orthogonium"])
def test_aolconv2d_train_step(run_timed, provider):
    c, b, n = TRAIN["channels"], TRAIN["batch"], TRAIN["size"]
    layer = _conv_layer(provider, c)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    x = torch.randn(b, c, n, n, device=DEVICE)

    def step():
        opt.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()
        opt.step()

    run_timed(step, provider, batch=b, size=n, channels=c)


@pytest.mark.benchmark(group="model-train-step")
@pytest.mark.parametrize("provider", ["lipkern", "plain", "eager"])
def test_aollinear_train_step(run_timed, provider):
    features, b = (1024, 1024) if ON_GPU else (64, 32)
    if provider == "lipkern":
        layer = lipkern.nn.AOLLinear(features, features, device=DEVICE)
        forward = layer
    else:
        layer = nn.Linear(features, features, device=DEVICE)
        rescale = aol_rescale_ref if provider == "eager" else (lambda w: w)

        def forward(x):
            return F.linear(x, rescale(layer.weight), layer.bias)

    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    x = torch.randn(b, features, device=DEVICE)

    def step():
        opt.zero_grad(set_to_none=True)
        forward(x).square().mean().backward()
        opt.step()

    run_timed(step, provider, batch=b, features=features, layer="linear")
