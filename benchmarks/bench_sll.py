"""SLL: SLLConv2d / SLLLinear train steps and an SLL-S (small) network train step against the eager formula of
the reference code (conv → ReLU → scale by 2/t → conv_transpose in plain autograd, t from the q-weighted Gram
|KKᵀ| recomputed every step, as the layer does), and orthogonium's ``SDPBasedLipschitzResBlock`` where that
package is installed (skipped otherwise). TF32 as the session's, recorded per case. Group: model-train-step."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipkern
from benchmarks.bench_cpl import _train_step
from benchmarks.conftest import DEVICE
from lipkern.models import build_model
from lipkern.ops.sll import sll_gram

ON_GPU = DEVICE.type == "cuda"
CONV = [dict(batch=256, size=32, channels=64)] if ON_GPU else [dict(batch=8, size=8, channels=8),
                                                                dict(batch=64, size=32, channels=64)]
LINEAR = dict(batch=1024, features=4096) if ON_GPU else dict(batch=32, features=256)


def _scale(gram: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """2/t, t_i = Σ_j |G_ij| q_j / q_i (the paper's T, the eager way)."""
    q = log_q.exp()
    hidden = gram.shape[0]
    t = (gram.abs().reshape(hidden, hidden, -1).sum(-1) * q[None]).sum(1) / q
    return 2 / t


class _EagerSLLConv2d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_q = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        scale = _scale(F.conv2d(self.weight, self.weight, padding=2), self.log_q)
        hidden = F.relu(F.conv2d(x, self.weight, self.bias, padding=1)) * scale[:, None, None]
        return x - F.conv_transpose2d(hidden, self.weight, padding=1)


class _EagerSLLLinear(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.linear = nn.Linear(features, features)
        self.log_q = nn.Parameter(torch.zeros(features))

    def forward(self, x):
        w = self.linear.weight
        return x - (F.relu(self.linear(x)) * _scale(w @ w.T, self.log_q)) @ w


def _orthogonium_block(channels: int):
    if importlib.util.find_spec("orthogonium") is None:
        pytest.skip("orthogonium is not installed (pip install orthogonium to compare with its SLL block)")
    from orthogonium.layers.conv.SLL import SDPBasedLipschitzResBlock

    return SDPBasedLipschitzResBlock(channels, channels, 3)


@pytest.mark.benchmark(group="model-train-step")
@pytest.mark.parametrize("provider", ["lipkern", "eager", "orthogonium"])
@pytest.mark.parametrize("size", CONV, ids=lambda s: f"b{s['batch']}-{s['size']}px-c{s['channels']}")
def test_sllconv2d_train_step(run_timed, provider, size):
    c, b, n = size["channels"], size["batch"], size["size"]
    if provider == "orthogonium":
        layer = _orthogonium_block(c).to(DEVICE)
    else:
        layer = (lipkern.nn.SLLConv2d(c, device=DEVICE) if provider == "lipkern" else _EagerSLLConv2d(c).to(DEVICE))
    x = torch.randn(b, c, n, n, device=DEVICE)
    run_timed(_train_step(layer, x), provider, layer="sll-conv", **size)


@pytest.mark.benchmark(group="model-train-step")
@pytest.mark.parametrize("provider", ["lipkern", "eager"])
def test_slllinear_train_step(run_timed, provider):
    f, b = LINEAR["features"], LINEAR["batch"]
    layer = lipkern.nn.SLLLinear(f, device=DEVICE) if provider == "lipkern" else _EagerSLLLinear(f).to(DEVICE)
    x = torch.randn(b, f, device=DEVICE)
    run_timed(_train_step(layer, x), provider, layer="sll-linear", **LINEAR)


@pytest.mark.benchmark(group="model-train-step")
@pytest.mark.parametrize("provider", ["lipkern", "eager"])
def test_sll_network_train_step(run_timed, provider):
    """SLL-S (GPU: the full network at 32×32, batch 256; CPU: 4 convs and 2 dense layers at 16×16, batch 32),
    the eager provider the same network with every SLL layer replaced by the eager formula (same weights)."""
    options = {} if ON_GPU else dict(n_conv=4, n_dense=2, dense_hidden=256)
    size, batch = (32, 256) if ON_GPU else (16, 32)
    model = build_model("sll-s", num_classes=10, in_channels=3, input_size=size, **options).to(DEVICE)
    if provider == "eager":
        for module in model.modules():
            if isinstance(module, (lipkern.nn.SLLConv2d, lipkern.nn.SLLLinear)):
                module.forward = _eager_forward.__get__(module)
    x = torch.randn(batch, 3, size, size, device=DEVICE)
    run_timed(_train_step(model, x), provider, model="SLL-S" if ON_GPU else "SLL-S (small)", batch=batch)


def _eager_forward(self, x):
    """The eager formula with the layer's own parameters (the ``eager`` provider of the network case)."""
    scale = _scale(sll_gram(self.weight), self.log_q)
    if self.weight.dim() == 2:
        return x - (F.relu(F.linear(x, self.weight, self.bias)) * scale) @ self.weight
    mode = "constant" if self.padding_mode == "zeros" else "circular"
    pre = F.conv2d(F.pad(x, self.padding, mode=mode), self.weight, self.bias)
    from lipkern.ops.cpl import _adjoint_of_padding

    back = F.conv_transpose2d(F.relu(pre) * scale[:, None, None], self.weight)
    return x - _adjoint_of_padding(back, self.padding, self.padding_mode)
