"""Deployment: to_vanilla() of every layer and of whole models equals the eval-mode model; state_dicts round-trip
through torch.load(weights_only=True); eval models trace (torch.jit.trace) and export (torch.export).

Oracles: the eval-mode lipkern model (the thing exported), and for the plain CPL forms an explicit dense
Jacobian of the padded convolution (x − h·Jᵀ relu(Jx + b)), independent of the conv_transpose adjoint."""

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipkern import nn as LN
from lipkern.models import build_model, to_vanilla
from lipkern.nn.cpl import plain_cpl_conv2d
from tests.helpers import assert_close, dense_jacobian

LIPKERN_LAYERS = (LN.AOLConv2d, LN.AOLLinear, LN.CPLConv2d, LN.CPLLinear, LN.SpectralConv2d, LN.SpectralLinear)


@pytest.fixture(autouse=True)
def torch_backend(knobs):
    knobs(backend="torch")  # whole networks: the kernels are tested in tests/ops


def _randomize(model, seed=0):
    """Move every parameter off its (identity-like) init so that an export that dropped a weight would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _layers():
    f64 = {"dtype": torch.float64}
    return [
        ("aol-conv", LN.AOLConv2d(4, 6, 3, padding=1, **f64), (2, 4, 7, 7)),
        ("aol-conv-circular", LN.AOLConv2d(4, 4, 3, padding=1, padding_mode="circular", **f64), (2, 4, 6, 6)),
        ("aol-linear", LN.AOLLinear(5, 3, **f64), (2, 5)),
        ("spectral-conv", LN.SpectralConv2d(3, 4, 3, stride=2, padding=1, input_size=8, **f64), (2, 3, 8, 8)),
        ("spectral-linear", LN.SpectralLinear(5, 4, **f64), (2, 5)),
        ("cpl-conv", LN.CPLConv2d(3, 5, 3, input_size=(6, 7), **f64), (2, 3, 6, 7)),
        ("cpl-conv-circular", LN.CPLConv2d(3, 2, 3, padding_mode="circular", input_size=6, **f64), (2, 3, 6, 6)),
        ("cpl-conv-certified", LN.CPLConv2d(2, 2, 3, input_size=5, certified=True, **f64), (2, 2, 5, 5)),
        ("cpl-linear", LN.CPLLinear(5, 7, certified=True, **f64), (2, 5)),
    ]


@pytest.mark.parametrize("name,layer,shape", _layers(), ids=[c[0] for c in _layers()])
def test_layer_to_vanilla_equals_the_eval_layer(name, layer, shape):
    _randomize(layer).eval()
    x = torch.randn(shape, dtype=torch.float64)
    plain = layer.to_vanilla()
    assert not isinstance(plain, LIPKERN_LAYERS)
    assert_close(plain(x), layer(x), msg=name)


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_plain_cpl_conv_against_the_dense_jacobian(padding_mode):
    """x − h·Jᵀ relu(Jx + b) with J the explicit matrix of the padded conv (autograd of F.conv2d)."""
    torch.manual_seed(1)
    w, b = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    conv = nn.Conv2d(2, 4, 3, padding=1, padding_mode=padding_mode, bias=False, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(w)
    jac = dense_jacobian(conv, x)  # (4·5·6, 2·5·6)
    pre = (jac @ x.reshape(-1)).reshape(4, 5, 6) + b[:, None, None]
    expected = x.reshape(-1) - 0.3 * (jac.T @ F.relu(pre).reshape(-1))
    out = plain_cpl_conv2d(x, w, b, torch.tensor(0.3, dtype=torch.float64), (1, 1, 1, 1), padding_mode)
    assert_close(out.reshape(-1), expected)


MODELS = [  # small variants of every family: (name, build_model options, in_channels, input size)
    ("convnet-xs-cpl", {"width": 4, "certified": True}, 1, 4),
    ("convnet-xs-aol", {"width": 4}, 1, 4),
    ("convnet-xs-spectral", {"width": 4}, 2, (4, 2)),
    ("cpl-s", {"dense_hidden": 8, "n_conv": 2, "n_dense": 2}, 1, 8),
    ("aol-s", {"n_conv": 2, "n_dense": 2, "conv_channels": 8, "width": 4}, 1, 8),
    ("liplt-4c3f", {}, 1, 8),
    ("lmt", {}, 1, 16),
]


def _model(name, options, channels, size, dtype=torch.float64):
    model = build_model(name, in_channels=channels, input_size=size, dtype=dtype, **options)
    return _randomize(model).eval()


def _input(channels, size, batch=3, dtype=torch.float64):
    h, w = (size, size) if isinstance(size, int) else size
    return torch.rand(batch, channels, h, w, dtype=dtype, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name,options,channels,size", MODELS, ids=[m[0] for m in MODELS])
def test_model_to_vanilla_equals_the_eval_model(name, options, channels, size):
    model = _model(name, options, channels, size)
    x = _input(channels, size)
    plain = to_vanilla(model)
    assert not any(isinstance(m, LIPKERN_LAYERS) for m in plain.modules())
    assert any(isinstance(m, LIPKERN_LAYERS) for m in model.modules()) or name in ("liplt-4c3f", "lmt")
    assert not plain.training
    assert_close(plain(x), model(x), msg=name)
    assert_close(plain(x[:0]), model(x[:0]), msg=f"{name} empty batch")


@pytest.mark.parametrize("name,options,channels,size", MODELS[:4:3], ids=[m[0] for m in MODELS[:4:3]])
def test_state_dict_round_trip_with_weights_only(name, options, channels, size):
    model = _model(name, options, channels, size, dtype=torch.float32)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)  # PyTorch's default: weights_only=True
    fresh = build_model(name, in_channels=channels, input_size=size, **options).eval()
    fresh.load_state_dict(state)
    x = _input(channels, size, dtype=torch.float32)
    assert torch.equal(fresh(x), model(x))
    buffer = io.BytesIO()
    torch.save(to_vanilla(model).state_dict(), buffer)
    buffer.seek(0)
    assert set(torch.load(buffer, weights_only=True)) == set(to_vanilla(model).state_dict())


@pytest.mark.parametrize("name,options,channels,size", MODELS[:2], ids=[m[0] for m in MODELS[:2]])
def test_eval_models_trace_and_export(name, options, channels, size):
    """The lipkern eval model after one eager forward (it caches the eval norms), and its to_vanilla copy."""
    model = _model(name, options, channels, size, dtype=torch.float32)
    x = _input(channels, size, dtype=torch.float32)
    expected = model(x)  # the eager eval forward that fills the caches
    other = _input(channels, size, batch=5, dtype=torch.float32) * 0.5
    for label, candidate in (("lipkern", model), ("vanilla", to_vanilla(model))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(candidate, x, check_trace=False)
        exported = torch.export.export(candidate, (x,)).module()
        for fn in (traced, exported):
            torch.testing.assert_close(fn(x), expected, atol=1e-5, rtol=1e-5, msg=f"{name} {label}")
        torch.testing.assert_close(traced(other), model(other), atol=1e-5, rtol=1e-5,
                                   msg=f"{name} {label} traced on another batch")
