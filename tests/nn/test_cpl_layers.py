"""CPLLinear / CPLConv2d: in eval mode with certified=True the layer's Jacobian (dense, float64, at random points)
has spectral norm ≤ 1 after adversarial weight updates; state and input-size behaviour."""

import pytest
import torch

from lipkern.nn import CPLConv2d, CPLLinear
from tests.helpers import spectral_norm


@pytest.fixture(autouse=True)
def torch_backend(knobs):
    """Dense Jacobians need one backward per output; the kernels are compared with the reference in tests/ops."""
    knobs(backend="torch")


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


def _layers():
    return [CPLConv2d(3, 4, input_size=5, dtype=torch.float64), CPLLinear(6, 4, dtype=torch.float64)]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("index", [0, 1], ids=["conv", "linear"])
def test_torch_func_vjp_and_jacrev_on_layers(index, training):
    layer = _layers()[index].train(training)
    x = torch.randn((1, 3, 5, 5) if index == 0 else (1, 6), dtype=torch.float64)
    layer(x)  # the power step: below, both calls see the same vectors
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    jac = torch.func.jacrev(layer)(x)
    layer.load_state_dict(state)
    want = torch.autograd.functional.jacobian(layer, x)
    layer.load_state_dict(state)
    out, vjp_fn = torch.func.vjp(layer, x)
    (gx,) = vjp_fn(torch.ones_like(out))
    assert torch.allclose(jac, want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gx, want.reshape(x.numel(), x.numel()).sum(0).reshape(x.shape), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("index", [0, 1], ids=["conv", "linear"])
def test_train_step_under_cpu_autocast(index, dtype):
    """float32 layer, float32 x, autocast on: the layer computes in float32 (σ, h and the op) and trains."""
    layer = _layers()[index].float().train()
    x = torch.randn((2, 3, 5, 5) if index == 0 else (2, 6))
    with torch.autocast("cpu", dtype):
        out = layer(x)
        loss = out.square().sum()
    loss.backward()
    assert out.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("index", [0, 1], ids=["conv", "linear"])
def test_low_precision_layers(index, dtype):
    """Layers built in bf16/fp16 train on inputs of their dtype; the eval step size is rounded down in it."""
    layer = _layers()[index].to(dtype).train()
    x = torch.randn((2, 3, 5, 5) if index == 0 else (2, 6), dtype=dtype)
    layer(x).float().square().sum().backward()
    assert torch.isfinite(layer.weight.grad).all()
    out = layer.eval()(x)
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_gradient_penalty_through_a_layer():
    layer = _layers()[0].train()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    gx.square().sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inputs_that_do_not_fit_the_layer_get_the_public_functions_errors(training):
    """The layers skip the public functions' checks only for inputs that fit them (lipkern.ops.cpl
    cpl_layer_forward): another dtype (of x or of the bias) or feature count still raises clearly; other
    ranks still run."""
    linear, conv = CPLLinear(6).train(training), CPLConv2d(3, input_size=5).train(training)
    with pytest.raises(ValueError, match="x is torch.float64"):
        linear(torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="x has 5 features"):
        linear(torch.randn(2, 5))
    with pytest.raises(ValueError, match="x is torch.float64"):
        conv(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="x has 4 channels"):
        conv(torch.randn(2, 4, 5, 5))
    linear.bias.data = linear.bias.data.double()  # a bias the layer no longer keeps in the weight's dtype
    with pytest.raises(ValueError, match="bias is torch.float64"):
        linear(torch.randn(2, 6))
    linear.bias.data = linear.bias.data.float()
    assert linear(torch.randn(4, 3, 6)).shape == (4, 3, 6)  # (..., features) takes the public function
    assert conv(torch.randn(3, 5, 5)).shape == (3, 5, 5)  # unbatched
