"""AOL: the fused rescale op, AOL layer train steps and whole-network train steps (ConvNet with AOL layers)
against the eager formulation, torch.compile of it, plain nn.Conv2d / nn.Linear (the limit: zero Lipschitz
overhead) and orthogonium (when installed), in one process with the same TF32 settings.
Groups: aol-fwd, aol-fwdbwd, model-train-step."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipkern
from benchmarks.conftest import DEVICE, ON_GPU, QUICK
from lipkern.models import ConvNet
from lipkern.ops import aol_rescale

CHANNELS = [64, 256, 512] if ON_GPU else [16, 32]
# CPU: the tiny size of a quick smoke run and a realistic one (b64, 32², 64 channels).
TRAIN = [dict(batch=256, size=32, channels=64)] if ON_GPU else [dict(batch=8, size=8, channels=16),
                                                                 dict(batch=64, size=32, channels=64)]
LINEAR = dict(batch=1024, features=1024) if ON_GPU else dict(batch=32, features=64)
CONVNET = dict(sizes=["S", "M"], batch=[256]) if ON_GPU else dict(sizes=["XS"], batch=[8, 64])
COMPILE_QUICK_CHANNELS = CHANNELS[len(CHANNELS) // 2]
PROVIDERS = ["lipkern", "eager", "compile", "orthogonium"]
# compile: torch.compile of the eager layer / network; *-bf16: the step under bf16 autocast (GPU cases)
TRAIN_PROVIDERS = ["lipkern", "plain", "eager", "compile", "lipkern-bf16", "eager-bf16", "orthogonium"]


# --- the eager formulation (what public AOL code does, in plain PyTorch) ------------------------------------
def eager_aol_rescale(weight: torch.Tensor) -> torch.Tensor:
    """W·diag(d), d_i = (Σ_j |WᵀW|_ij)^(-1/2): for a k×k kernel (k > 1) WᵀW is the self-correlation
    conv2d(Wᵀ, Wᵀ) over all shifts; for a matrix or a 1×1 kernel it is the matmul ``W.T @ W``."""
    if weight.dim() == 2 or weight.shape[-2:] == (1, 1):
        m = weight.reshape(weight.shape[0], -1)
        r = (m.T @ m).abs().sum(dim=1)
        return weight * r.clamp_min(1e-30).rsqrt().reshape((1, -1) + (1,) * (weight.dim() - 2))
    kh, kw = weight.shape[-2:]
    wt = weight.transpose(0, 1)
    r = F.conv2d(wt, wt, padding=(kh - 1, kw - 1)).abs().sum(dim=(1, 2, 3))
    return weight * r.clamp_min(1e-30).rsqrt()[None, :, None, None]


class EagerAOLConv2d(nn.Conv2d):
    """nn.Conv2d whose forward applies :func:`eager_aol_rescale` to its weight."""

    def forward(self, x):
        return self._conv_forward(x, eager_aol_rescale(self.weight), self.bias)


class EagerAOLLinear(nn.Linear):
    """nn.Linear whose forward applies :func:`eager_aol_rescale` (``W.T @ W``) to its weight."""

    def forward(self, x):
        return F.linear(x, eager_aol_rescale(self.weight), self.bias)


@functools.lru_cache(maxsize=None)
def _compiled_eager():
    return torch.compile(eager_aol_rescale)


# --- orthogonium (optional) ---------------------------------------------------------------------------------
def _orthogonium_aol():
    return pytest.importorskip("orthogonium.layers.conv.AOL.aol")


def _orthogonium_rescale(c_out: int, c_in: int):
    aol = _orthogonium_aol()
    if hasattr(aol, "MultiStepAOLReparametrizer"):
        return aol.MultiStepAOLReparametrizer(min(c_out, c_in), groups=1, niter=1).to(DEVICE)
    return aol.AOLReparametrizer(c_out, groups=1).to(DEVICE)


def _orthogonium_conv(**geometry) -> nn.Module:
    aol = _orthogonium_aol()
    try:
        return aol.AOLConv2D(**geometry, niter=1)
    except TypeError:  # releases without the niter argument
        return aol.AOLConv2D(**geometry)


# --- swapping the AOL layers of a lipkern network -----------------------------------------------------------
def _conv_geometry(layer) -> dict:
    return dict(in_channels=layer.in_channels, out_channels=layer.out_channels, kernel_size=layer.kernel_size,
                stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                bias=layer.bias is not None, padding_mode=layer.padding_mode, device=layer.weight.device,
                dtype=layer.weight.dtype)


def _replacement(layer, provider: str) -> nn.Module:
    if isinstance(layer, lipkern.nn.AOLConv2d):
        geometry = _conv_geometry(layer)
        if provider == "orthogonium":
            new = _orthogonium_conv(**geometry)
            with torch.no_grad():  # orthogonium parametrizes the weight: leave it its own initialization
                if new.bias is not None:
                    new.bias.copy_(layer.bias)
            return new
        new = (nn.Conv2d if provider == "plain" else EagerAOLConv2d)(**geometry)
    else:  # AOLLinear; orthogonium has no AOL dense layer: its networks get the eager one
        cls = nn.Linear if provider == "plain" else EagerAOLLinear
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None,
                  device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new


def swap_aol_layers(module: nn.Module, provider: str) -> nn.Module:
    """Replace every lipkern AOL layer of ``module`` (in place) by the same geometry as plain nn.Conv2d /
    nn.Linear ('plain'), the eager formulation ('eager') or orthogonium's AOLConv2D ('orthogonium')."""
    if provider == "lipkern":
        return module
    for name, child in module.named_children():
        if isinstance(child, (lipkern.nn.AOLConv2d, lipkern.nn.AOLLinear)):
            setattr(module, name, _replacement(child, provider))
        else:
            swap_aol_layers(child, provider)
    return module


def _train_step(model: nn.Module, x: torch.Tensor, autocast_dtype: torch.dtype | None = None):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    cast = (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None
            else contextlib.nullcontext())

    def step():
        opt.zero_grad(set_to_none=True)
        with cast:
            loss = model(x).float().square().mean()
        loss.backward()
        opt.step()

    return step


def train_provider(provider: str) -> tuple[str, bool, torch.dtype | None]:
    """(the layers to build: lipkern / plain / eager / orthogonium, whether to torch.compile the model, the
    autocast dtype) of a train-step provider; skips the cases a CPU quick run cannot time meaningfully."""
    if provider == "compile":
        if not ON_GPU and QUICK:
            pytest.skip("torch.compile on CPU is skipped in quick mode (compilation dominates); --full runs it")
        return "eager", True, None
    if provider.endswith("-bf16"):
        if not ON_GPU:
            pytest.skip("bf16 autocast train steps are GPU cases (CPU autocast runs bf16 convolutions slowly)")
        return provider.removesuffix("-bf16"), False, torch.bfloat16
    return provider, False, None


def _built(model: nn.Module, compiled: bool) -> nn.Module:
    return torch.compile(model) if compiled else model


# --- the rescale op -----------------------------------------------------------------------------------------
def _rescale_fn(provider: str, shape):
    if provider == "lipkern":
        return aol_rescale
    if provider == "eager":
        return eager_aol_rescale
    if provider == "compile":
        if not ON_GPU and QUICK:
            pytest.skip("torch.compile on CPU is skipped in quick mode (compilation dominates)")
        if QUICK and shape[0] != COMPILE_QUICK_CHANNELS:
            pytest.skip(f"torch.compile runs at c={COMPILE_QUICK_CHANNELS} only in quick mode (each shape "
                        "compiles for seconds); --full runs every size")
        return _compiled_eager()
    return _orthogonium_rescale(shape[0], shape[1])


@pytest.mark.benchmark(group="aol-fwd")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("channels", CHANNELS, ids=lambda c: f"c{c}-k3-fp32")
def test_aol_rescale_forward(run_timed, provider, channels):
    shape = (channels, channels, 3, 3)
    fn = _rescale_fn(provider, shape)
    w = torch.randn(shape, device=DEVICE)

    def forward():
        with torch.no_grad():
            fn(w)

    run_timed(forward, provider, shape=list(shape))


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


# --- layer and network train steps --------------------------------------------------------------------------
def _size_id(size: dict) -> str:
    return f"b{size['batch']}-{size['size']}px-c{size['channels']}"


@pytest.mark.benchmark(group="model-train-step")
@pytest.mark.parametrize("provider", TRAIN_PROVIDERS)
@pytest.mark.parametrize("size", TRAIN, ids=_size_id)
def test_aolconv2d_train_step(run_timed, provider, size):
    layers, compiled, autocast_dtype = train_provider(provider)
    c, b, n = size["channels"], size["batch"], size["size"]
    layer = swap_aol_layers(nn.Sequential(lipkern.nn.AOLConv2d(c, c, 3, padding=1, device=DEVICE)), layers)
    x = torch.randn(b, c, n, n, device=DEVICE)
    run_timed(_train_step(_built(layer, compiled), x, autocast_dtype), provider, batch=b, size=n, channels=c)


@pytest.mark.benchmark(group="model-train-step")
@pytest.mark.parametrize("provider", ["lipkern", "plain", "eager"])
def test_aollinear_train_step(run_timed, provider):
    f, b = LINEAR["features"], LINEAR["batch"]
    layer = swap_aol_layers(nn.Sequential(lipkern.nn.AOLLinear(f, f, device=DEVICE)), provider)
    x = torch.randn(b, f, device=DEVICE)
    run_timed(_train_step(layer, x), provider, batch=b, features=f, layer="linear")


@pytest.mark.benchmark(group="model-train-step")
@pytest.mark.parametrize("provider", TRAIN_PROVIDERS)
@pytest.mark.parametrize("batch", CONVNET["batch"], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("size", CONVNET["sizes"], ids=lambda s: f"convnet-{s}")
def test_convnet_aol_train_step(run_timed, provider, size, batch):
    """ConvNet (1-Lipschitz Layers Compared) with AOL layers, 32×32 inputs: SGD step on a squared loss."""
    layers, compiled, autocast_dtype = train_provider(provider)
    torch.manual_seed(0)
    model = swap_aol_layers(ConvNet(size, layer="aol", device=DEVICE), layers)
    x = torch.randn(batch, 3, 32, 32, device=DEVICE)
    linear = "eager" if layers == "orthogonium" else layers
    run_timed(_train_step(_built(model, compiled), x, autocast_dtype), provider, model=f"ConvNet-{size}",
              batch=batch, size=32, linear_layer=linear)
