"""Full training steps of the reference networks (issue 11 item 7): forward, the family's loss, backward and
an optimizer step, with lipkern layers against the same network from the eager formulations and from plain
nn.Conv2d / nn.Linear layers (the floor: no Lipschitz machinery at all), in one process with the same TF32
settings. Group: models-train-step. Providers: lipkern, eager, plain.

- convnet-{xs,s}-cpl: eager = every CPL layer as the reference code writes it (``EagerCPLConv2d`` /
  ``EagerCPLLinear``: one eager power-iteration step per layer and forward, h = 2/σ², then x − h·Aᵀσ(Ax + b) in
  plain autograd; nothing of lipkern's, so that the CPU's paired rounds do not share lipkern's grouped power
  step between the two networks); plain = every CPL layer replaced by an nn.Conv2d / nn.Linear of its shape
  (one conv instead of CPL's two).
- convnet-{xs,s}-spectral: eager = each conv normalized by σ = vᵀAu from its own power-iteration step through
  conv2d / conv_transpose2d (the CPL / LMT reference codes' loop, one layer at a time); plain = nn.Conv2d.
- aol-s: eager / plain = ``benchmarks.bench_aol.swap_aol_layers`` (the eager rescale in every layer).
- cpl-s: as the ConvNet CPL case (bench_cpl.py times lipkern against eager for CPL-S; plain is added here).
- liplt-6c2f (CRM step): the LipLT bound by ``LipschitzEstimate(n_iter=5)`` vs ``bench_liplt.EagerLipLT`` (one
  loop per sub-chain), CRMLoss on top; plain = cross-entropy alone (no bound).
- lmt (LMT step): the product-of-norms bound by ``LipschitzEstimate(method="product", n_iter=1)`` vs one eager
  power-iteration step per layer; LMTLoss on top; plain = cross-entropy alone.
- spectral peers (test_spectral_network_peers_train_step): the Spectral ConvNet with lipkern's layers against
  torch.nn.utils.parametrizations.spectral_norm and deel-torchlip (when installed).
The ConvNet with AOL layers is benchmarked in bench_aol.py (test_convnet_aol_train_step: lipkern, plain,
eager, orthogonium), not repeated here. Sizes: CIFAR-like 32×32 batch 256 on a GPU; 8×8 inputs, batch 8 and
the XS / reduced networks on a CPU (a smoke run, not a measurement users compare).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipkern
from benchmarks.bench_aol import swap_aol_layers
from benchmarks.conftest import DEVICE, ON_GPU
from lipkern.bounds import LipschitzEstimate
from lipkern.bounds.liplt import build_plan
from lipkern.losses import CRMLoss, LMTLoss, OffsetCrossEntropy
from lipkern.models import build_model

BATCH, SIZE = (256, 32) if ON_GPU else (8, 8)
PROVIDERS = ["lipkern", "eager", "plain"]
SMALL = {} if ON_GPU else {"convnet": {"width": 8}, "aol-s": {"n_conv": 2, "n_dense": 2},
                            "cpl-s": {"n_conv": 4, "n_dense": 2, "dense_hidden": 256}}


# --- eager and plain replacements ---------------------------------------------------------------------------
def _eager_conv_sigma(u: torch.Tensor, weight: torch.Tensor, padding) -> torch.Tensor:
    """The reference codes' per-layer step: u advanced in place (conv2d, conv_transpose2d, normalize), then
    σ = vᵀAu differentiable in the weight."""
    with torch.no_grad():
        v = F.conv2d(u, weight, padding=padding)
        v = v / v.norm()
        w = F.conv_transpose2d(v, weight, padding=padding)
        u.copy_(w / w.norm())
    return (v * F.conv2d(u, weight, padding=padding)).sum()


def _eager_linear_sigma(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        v = F.normalize(weight @ u, dim=0)
        u.copy_(F.normalize(weight.T @ v, dim=0))
    return v @ weight @ u


class EagerSpectralConv2d(nn.Module):
    """A conv normalized by σ = vᵀAu after one power-iteration step on persistent u (conv2d, conv_transpose2d,
    normalize; the reference codes' per-layer loop), differentiable through σ."""

    def __init__(self, layer: lipkern.nn.SpectralConv2d):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.padding = layer.padding
        self.register_buffer("u", torch.randn(1, layer.in_channels, *layer.input_size,
                                              device=layer.weight.device))

    def forward(self, x):
        sigma = _eager_conv_sigma(self.u, self.weight, self.padding)
        return F.conv2d(x, self.weight / sigma, self.bias, padding=self.padding)


class EagerSpectralLinear(nn.Module):
    def __init__(self, layer: lipkern.nn.SpectralLinear):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        u = torch.randn(layer.in_features, device=layer.weight.device)
        self.register_buffer("u", F.normalize(u, dim=0))

    def forward(self, x):
        return F.linear(x, self.weight / _eager_linear_sigma(self.u, self.weight), self.bias)


class EagerCPLConv2d(nn.Module):
    """A lipkern CPLConv2d ('same' zero padding) as the CPL reference code writes it: one power-iteration step
    per forward on a persistent u, σ = vᵀAu differentiable, h = 2/σ², x − h·Aᵀσ(Ax + b)."""

    def __init__(self, layer: lipkern.nn.CPLConv2d):
        super().__init__()
        if layer.padding_mode != "zeros":
            raise ValueError("EagerCPLConv2d: zero padding only")
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.padding = tuple(k // 2 for k in layer.kernel_size)
        self.register_buffer("u", torch.randn(1, layer.channels, *layer.input_size, device=layer.weight.device))

    def forward(self, x):
        sigma = _eager_conv_sigma(self.u, self.weight, self.padding)
        hidden = F.relu(F.conv2d(x, self.weight, self.bias, padding=self.padding))
        return x - 2 / sigma**2 * F.conv_transpose2d(hidden, self.weight, padding=self.padding)


class EagerCPLLinear(nn.Module):
    """A lipkern CPLLinear as the reference code writes it (see EagerCPLConv2d)."""

    def __init__(self, layer: lipkern.nn.CPLLinear):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.register_buffer("u", F.normalize(torch.randn(layer.features, device=layer.weight.device), dim=0))

    def forward(self, x):
        sigma = _eager_linear_sigma(self.u, self.weight)
        return x - 2 / sigma**2 * (F.relu(F.linear(x, self.weight, self.bias)) @ self.weight)


def _plain_of(layer: nn.Module) -> nn.Module | None:
    if not isinstance(layer, (lipkern.nn.CPLConv2d, lipkern.nn.SpectralConv2d, lipkern.nn.CPLLinear,
                              lipkern.nn.SpectralLinear)):
        return None
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    if isinstance(layer, (lipkern.nn.CPLConv2d, lipkern.nn.SpectralConv2d)):
        c_in = layer.in_channels
        c_out = c_in if isinstance(layer, lipkern.nn.CPLConv2d) else layer.out_channels
        k = layer.kernel_size
        return nn.Conv2d(c_in, c_out, k, layer.stride, (k[0] // 2, k[1] // 2), **factory)
    if isinstance(layer, lipkern.nn.CPLLinear):
        return nn.Linear(layer.features, layer.features, **factory)
    return nn.Linear(layer.in_features, layer.out_features, **factory)


def _swap(module: nn.Module, provider: str) -> nn.Module:
    """Replace the CPL / Spectral layers of ``module`` in place by their eager or plain counterparts."""
    for name, child in module.named_children():
        if provider == "plain":
            new = _plain_of(child)
        elif isinstance(child, lipkern.nn.CPLConv2d):
            new = EagerCPLConv2d(child)
        elif isinstance(child, lipkern.nn.CPLLinear):
            new = EagerCPLLinear(child)
        elif isinstance(child, lipkern.nn.SpectralConv2d):
            new = EagerSpectralConv2d(child)
        elif isinstance(child, lipkern.nn.SpectralLinear):
            new = EagerSpectralLinear(child)
        else:
            new = None
        if new is None:
            _swap(child, provider)
        else:
            setattr(module, name, new)
    return module


def _network(name: str, provider: str) -> nn.Module:
    torch.manual_seed(0)
    options = SMALL.get("convnet" if name.startswith("convnet") else name, {})
    model = build_model(name, in_channels=3, input_size=SIZE, device=DEVICE, **options)
    if name.startswith("aol"):
        return swap_aol_layers(model, provider)
    return model if provider == "lipkern" else _swap(model, provider)


def _data(classes: int = 10):
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.rand(BATCH, 3, SIZE, SIZE, generator=g).to(DEVICE)
    y = torch.randint(0, classes, (BATCH,), generator=g).to(DEVICE)
    return x, y


def _step(model: nn.Module, loss_fn, bound=None, data=None):
    """One SGD step on loss_fn(logits, y[, L]) with L from ``bound()`` (None: no bound) on ``data`` (x, y)
    (default: :func:`_data`)."""
    x, y = _data() if data is None else data
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = loss_fn(logits, y) if bound is None else loss_fn(logits, y, bound())
        loss.backward()
        opt.step()

    return step


# --- 1-Lipschitz networks -----------------------------------------------------------------------------------
NETWORKS = ["convnet-xs-cpl", "convnet-xs-spectral", "aol-s", "cpl-s"] if not ON_GPU else \
    ["convnet-xs-cpl", "convnet-s-cpl", "convnet-xs-spectral", "convnet-s-spectral", "aol-s", "cpl-s"]


@pytest.mark.benchmark(group="models-train-step")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", NETWORKS)
def test_lipschitz_network_train_step(run_timed, name, provider):
    """Offset cross-entropy (AOL's u = √2, t = 1/4) and SGD momentum: the 1-Lipschitz families' step."""
    model = _network(name, provider)
    loss = OffsetCrossEntropy(math.sqrt(2), 0.25)
    run_timed(_step(model, loss), provider, model=name, batch=BATCH, size=SIZE)


# --- the Spectral ConvNet against the peers' spectral normalization ------------------------------------------
def _peer_spectral(model: nn.Module, provider: str) -> nn.Module:
    """Every lipkern Spectral layer of ``model`` replaced, in place, by the peer's layer of the same shape:
    'torch-spectral-norm': nn.Conv2d / nn.Linear under torch.nn.utils.parametrizations.spectral_norm (the norm
    of the weight reshaped to a matrix: not the conv operator's norm, so not a Lipschitz bound of the conv);
    'deel-torchlip': deel.torchlip's SpectralConv2d / SpectralLinear (when installed)."""
    if provider == "deel-torchlip":
        torchlip = pytest.importorskip("deel.torchlip")
    for name, child in list(model.named_children()):
        if isinstance(child, lipkern.nn.SpectralConv2d):
            k, factory = child.kernel_size, {"bias": child.bias is not None}
            if provider == "torch-spectral-norm":
                new = torch.nn.utils.parametrizations.spectral_norm(
                    nn.Conv2d(child.in_channels, child.out_channels, k, child.stride, child.padding, **factory))
            else:
                new = torchlip.SpectralConv2d(child.in_channels, child.out_channels, k, child.stride,
                                              child.padding, **factory)
        elif isinstance(child, lipkern.nn.SpectralLinear):
            cls = (lambda *a, **kw: torch.nn.utils.parametrizations.spectral_norm(nn.Linear(*a, **kw))) \
                if provider == "torch-spectral-norm" else torchlip.SpectralLinear
            new = cls(child.in_features, child.out_features, bias=child.bias is not None)
        else:
            _peer_spectral(child, provider)
            continue
        setattr(model, name, new.to(DEVICE))
    return model


@pytest.mark.benchmark(group="models-train-step")
@pytest.mark.parametrize("provider", ["lipkern", "torch-spectral-norm", "deel-torchlip"])
@pytest.mark.parametrize("name", [n for n in NETWORKS if n.endswith("-spectral")])
def test_spectral_network_peers_train_step(run_timed, name, provider):
    """The Spectral ConvNet with lipkern's layers (the conv operator's norm at the input size, one stacked
    power step) against the peers' spectral normalization, same step as above."""
    model = _network(name, "lipkern")
    if provider != "lipkern":
        model = _peer_spectral(model, provider)
    loss = OffsetCrossEntropy(math.sqrt(2), 0.25)
    run_timed(_step(model, loss), provider, model=name, batch=BATCH, size=SIZE)


# --- certified training of plain networks: the bound is the Lipschitz cost ----------------------------------
class EagerProductBound:
    """∏ σ_l over the linear maps: one power-iteration step per layer on persistent vectors, the σ's
    differentiable (the LMT reference's per-layer hook, one layer at a time)."""

    def __init__(self, model: nn.Module, input_shape):
        self.maps = [m for segment in build_plan(model, input_shape).segments for m in segment.maps]
        maps = [m.current() for m in self.maps]
        g = torch.Generator(device="cpu").manual_seed(2)
        self.u = [F.normalize(torch.randn(op.in_shape, generator=g).to(DEVICE).flatten(), dim=0)
                  .reshape(1, *op.in_shape) for op in maps]

    def __call__(self):
        maps = [m.current() for m in self.maps]
        total = None
        for i, op in enumerate(maps):
            with torch.no_grad():
                detached = op.with_weight(op.weight.detach())
                v = detached.forward(self.u[i])
                v = v / v.norm()
                u = detached.adjoint(v)
                self.u[i] = u / u.norm()
            sigma = (v * op.forward(self.u[i])).sum()
            total = sigma if total is None else total * sigma
        return total


def _certified_step(name: str, provider: str):
    from benchmarks.bench_liplt import EagerLipLT

    torch.manual_seed(0)
    size = max(SIZE, 16) if name == "lmt" else SIZE
    channels = 1 if name == "lmt" else 3
    model = build_model(name, in_channels=channels, input_size=size, device=DEVICE)
    shape = (channels, size, size)
    if provider == "plain":
        return model, nn.CrossEntropyLoss(), None, shape
    if name == "lmt":
        loss = LMTLoss(0.1)
        bound = (LipschitzEstimate(model, shape, method="product", n_iter=1).to(DEVICE) if provider == "lipkern"
                 else EagerProductBound(model, shape))
        return model, loss, bound, shape
    crm = CRMLoss(5.0, 15.0, 0.2, 0)

    def loss(logits, y, lipschitz):
        return crm(logits, y, lipschitz, 1)

    if provider == "lipkern":
        bound = LipschitzEstimate(model, shape, n_iter=5).to(DEVICE)
    else:
        import benchmarks.bench_liplt as bl

        original = bl.INPUT
        bl.INPUT = shape  # EagerLipLT plans the network at bench_liplt.INPUT
        try:
            bound = EagerLipLT(model, 5)
        finally:
            bl.INPUT = original
    return model, loss, bound, shape


@pytest.mark.benchmark(group="models-train-step")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", ["liplt-6c2f", "lmt"])
def test_certified_training_step(run_timed, name, provider):
    """liplt-6c2f: CRM with the LipLT bound (5 power steps); lmt: LMT loss with the product bound (1 step);
    plain: cross-entropy without a bound."""
    model, loss, bound, shape = _certified_step(name, provider)
    x, y = _data()
    x = x[:, :shape[0]]
    if shape[1] != SIZE:
        x = F.interpolate(x, size=shape[1:])
    run_timed(_step(model, loss, bound, (x, y)), provider, model=name, batch=BATCH, size=shape[1])
