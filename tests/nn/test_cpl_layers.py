"""CPLLinear / CPLConv2d: in eval mode with certified=True the layer's Jacobian (dense, float64, at random points)
has spectral norm ≤ 1 after adversarial weight updates; state and input-size behaviour."""

import pytest
import torch

from lipkern.nn import CPLConv2d, CPLLinear
from tests.helpers import spectral_norm


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    """Dense Jacobians need one backward per output; the kernels are compared with the reference in tests/ops."""
    monkeypatch.setenv("LIPKERN_BACKEND", "torch")


def _adversarial(layer, shape, steps=10):
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(steps):
        x = torch.randn(shape, dtype=torch.float64)
        loss = -(layer(x) - x).square().sum()  # grow the residual branch: push h·‖W‖² towards its limit
        opt.zero_grad()
        loss.backward()
        opt.step()
    return layer.eval()


def _jacobian_norm(layer, x):
    jac = torch.autograd.functional.jacobian(layer, x)
    return spectral_norm(jac.reshape(x.numel(), x.numel()))


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_certified_cpl_conv_is_one_lipschitz(padding_mode):
    layer = CPLConv2d(3, 5, padding_mode=padding_mode, dtype=torch.float64, input_size=4, certified=True)
    _adversarial(layer.train(), (4, 3, 4, 4))
    for _ in range(3):
        x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
        assert _jacobian_norm(layer, x) <= 1 + 1e-12


def test_certified_cpl_linear_is_one_lipschitz():
    layer = CPLLinear(6, 9, dtype=torch.float64, certified=True)
    _adversarial(layer.train(), (8, 6))
    for _ in range(5):
        assert _jacobian_norm(layer, torch.randn(6, dtype=torch.float64)) <= 1 + 1e-12


def test_eval_step_size_is_two_over_the_norm_squared():
    layer = CPLLinear(5, 4, dtype=torch.float64).eval()
    exact = spectral_norm(layer.weight.detach())
    assert layer.step_size().item() == pytest.approx(2 / exact**2, rel=1e-6)
    layer.certified = True
    assert layer.step_size().item() <= 2 / exact**2


def test_training_step_size_is_differentiable_and_input_size_is_fixed():
    layer = CPLConv2d(2, input_size=5, dtype=torch.float64)
    out = layer(torch.randn(2, 2, 5, 5, dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.sum(), layer.weight)
    assert torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="normalized for inputs of size"):
        layer(torch.randn(2, 2, 6, 6, dtype=torch.float64))


def test_state_dict_round_trip_and_repr():
    a = CPLConv2d(3, 4, input_size=6)
    a(torch.randn(2, 3, 6, 6))
    b = CPLConv2d(3, 4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(a.eval()(x), b.eval()(x))
    assert "hidden_channels=4" in repr(a) and "hidden_features=7" in repr(CPLLinear(3, 7))


def test_compile_fullgraph_eval_after_an_eager_call():
    layer = CPLConv2d(3, 4, input_size=5, dtype=torch.float64, certified=True).eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    eager = layer(x)
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    assert torch.allclose(got, eager, rtol=0, atol=1e-12)
