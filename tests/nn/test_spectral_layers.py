"""SpectralConv2d / SpectralLinear: exact operator norms (dense matrix of the layer's weight, SVD, float64) in
eval mode, certified and not, after adversarial training; state handling; drop-in behaviour."""

import copy
import importlib

import pytest
import torch
from torch import nn

from lipkern.nn import SpectralConv2d, SpectralLinear
from tests.helpers import assert_close, dense_conv2d, spectral_norm

GEOMETRIES = [
    dict(padding=1),
    dict(padding="same", padding_mode="circular"),
    dict(stride=2, padding=1),
    dict(padding=2, dilation=2, groups=2),
    dict(padding=1, stride=2, padding_mode="circular"),
]
IDS = ["zeros", "circular-same", "stride2", "dilation-groups", "circular-stride2"]
N = 6


def _adversarially_trained(layer: nn.Module, shape, steps: int = 15) -> nn.Module:
    """Push the weights towards a large operator norm (maximize the output energy), as a worst case."""
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()
    for _ in range(steps):
        x = torch.randn(shape, dtype=layer.weight.dtype)
        loss = -layer(x).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return layer.eval()


def _applied_weight(layer) -> torch.Tensor:
    return layer.normalized_weight().detach()


def _operator_norm(layer: SpectralConv2d) -> float:
    kwargs = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                  padding_mode=layer.padding_mode)
    return spectral_norm(dense_conv2d(_applied_weight(layer), layer.input_size, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kwargs", GEOMETRIES, ids=IDS)
def test_certified_conv_is_one_lipschitz_after_adversarial_training(kwargs, dtype):
    layer = SpectralConv2d(4, 6, 3, dtype=dtype, input_size=N, certified=True, **kwargs)
    _adversarially_trained(layer, (8, 4, N, N))
    # the exact operator of the weight the layer applies, rounding of W/σ in `dtype` included
    assert _operator_norm(layer) <= 1 + 1e-12


@pytest.mark.parametrize("kwargs", GEOMETRIES, ids=IDS)
def test_eval_conv_is_normalized_by_the_converged_norm(kwargs):
    layer = SpectralConv2d(4, 6, 3, dtype=torch.float64, input_size=N, **kwargs)
    _adversarially_trained(layer, (8, 4, N, N))
    assert abs(_operator_norm(layer) - 1) <= 1e-5


def test_layer_jacobian_matches_the_weight_operator():
    """The layer really applies the normalized weight: its input Jacobian is that operator."""
    layer = SpectralConv2d(3, 4, 3, padding=1, dtype=torch.float64, input_size=5, certified=True).eval()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(layer, x).reshape(4 * 25, 3 * 25)
    assert_close(jac, dense_conv2d(_applied_weight(layer), 5, padding=1))


def test_training_step_uses_an_estimate_from_below_and_updates_the_vectors():
    layer = SpectralConv2d(3, 4, 3, padding=1, dtype=torch.float64, input_size=5)
    u0 = layer.u.clone()
    exact = spectral_norm(dense_conv2d(layer.weight.detach(), 5, padding=1))
    sigma = layer.sigma()
    assert not torch.equal(layer.u, u0)
    assert sigma.item() <= exact * (1 + 1e-12)
    assert sigma.requires_grad, "training-mode sigma is differentiable in the weight"
    layer.eval()
    u_eval = layer.u.clone()
    layer(torch.randn(1, 3, 5, 5, dtype=torch.float64))
    assert torch.equal(layer.u, u_eval), "eval does not touch the buffers"


def test_eval_cache_invalidated_by_optimizer_step_and_train():
    layer = SpectralConv2d(3, 3, 3, padding=1, dtype=torch.float64, input_size=5).eval()
    first = layer.sigma()
    assert layer.sigma() is first
    with torch.no_grad():
        layer.weight.mul_(2)
    assert_close(layer.sigma(), 2 * first)
    layer.train().eval()
    assert layer._cached_sigma is None


def test_initial_vectors_are_deterministic_and_state_dict_round_trips():
    torch.manual_seed(1)
    a = SpectralConv2d(3, 4, 3, padding=1, input_size=7)
    torch.manual_seed(2)
    b = SpectralConv2d(3, 4, 3, padding=1, input_size=7)
    assert torch.equal(a.u, b.u), "vectors depend on the shape only (identical on every DDP rank)"
    a.train()(torch.randn(2, 3, 7, 7))
    lazy = SpectralConv2d(3, 4, 3, padding=1)
    assert lazy.input_size is None and "u" not in lazy.state_dict()
    lazy.load_state_dict(a.state_dict())
    assert lazy.input_size == (7, 7)
    for key, value in a.state_dict().items():
        assert torch.equal(lazy.state_dict()[key], value), key
    x = torch.randn(2, 3, 7, 7)
    assert torch.equal(lazy.eval()(x), a.eval()(x))


def test_lazy_input_size_and_size_change_error():
    layer = SpectralConv2d(3, 4, 3, padding=1)
    layer(torch.randn(2, 3, 6, 6))
    assert layer.input_size == (6, 6) and layer.u.shape == (3, 6, 6)
    with pytest.raises(ValueError, match="normalized for inputs of size"):
        layer(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("certified", [False, True])
def test_to_vanilla_has_identical_eval_outputs(certified):
    layer = SpectralConv2d(3, 4, 3, stride=2, padding=1, bias=True, input_size=8, certified=certified)
    layer.train()(torch.randn(2, 3, 8, 8))
    layer.eval()
    plain = layer.to_vanilla()
    assert type(plain) is nn.Conv2d
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(plain(x), layer(x))


def test_compile_fullgraph_train_step():
    layer = SpectralConv2d(3, 4, 3, padding=1, dtype=torch.float64, input_size=5)
    twin = SpectralConv2d(3, 4, 3, padding=1, dtype=torch.float64, input_size=5)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert_close(out, twin(x))
    assert_close(layer.u, twin.u)


def test_compile_fullgraph_eval_serves_the_cached_norm():
    layer = SpectralConv2d(3, 4, 3, padding=1, dtype=torch.float64, input_size=5, certified=True).eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="run one eager forward in eval mode"):
        compiled(x)
    torch._dynamo.reset()
    eager = layer(x)
    assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), eager)


def test_extra_repr_and_bad_arguments():
    assert "input_size=(5, 5)" in repr(SpectralConv2d(3, 4, 3, input_size=5))
    assert "certified=True" in repr(SpectralLinear(3, 4, certified=True))
    with pytest.raises(ValueError, match="padding_mode"):
        SpectralConv2d(3, 4, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="n_power_iterations"):
        SpectralLinear(3, 4, n_power_iterations=0)
    with pytest.raises(ValueError):
        SpectralConv2d(3, 4, 3, input_size=2)  # empty output


# --- SpectralLinear -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(5, 7), (7, 5), (1, 1)])
def test_linear_norms(shape, dtype):
    layer = SpectralLinear(*shape, dtype=dtype)
    _adversarially_trained(layer, (16, shape[0]))
    assert abs(spectral_norm(_applied_weight(layer)) - 1) <= (1e-5 if dtype == torch.float64 else 1e-4)
    layer.certified = True
    assert spectral_norm(_applied_weight(layer)) <= 1 + 1e-12
    x = torch.randn(3, shape[0], dtype=dtype)
    assert torch.equal(layer.to_vanilla()(x), layer(x))


# --- certified layers where the bound is exactly tight: the rounding slack is what keeps the norm ≤ 1 -------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c_in, c_out, value", [(37, 3, 1.6149300336837769), (15, 29, 1.0972177982330322),
                                                (7, 3, 9.933605194091797)])
def test_certified_rank_one_conv_with_repeating_circular_padding(dtype, c_in, c_out, value):
    """A 1×1 all-equal kernel with circular padding 2 on a 2×2 input (each pixel read 3×3 = 9 times) has
    ‖A‖² = 9·c_in·c_out·w², exactly; checked in rational arithmetic on the weight the layer applies."""
    from fractions import Fraction

    layer = SpectralConv2d(c_in, c_out, 1, padding=2, padding_mode="circular", input_size=(2, 2), certified=True,
                           bias=False, dtype=dtype).eval()
    with torch.no_grad():
        layer.weight.fill_(value)
    applied = _applied_weight(layer)
    assert (applied == applied.flatten()[0]).all()
    w = Fraction(applied.flatten()[0].item())
    assert 9 * c_in * c_out * w * w <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_certified_rank_one_linear_is_at_most_one_exactly(dtype):
    from fractions import Fraction

    for value in (0.1, 1.0, 3.7, 1234.5):
        layer = SpectralLinear(13, 7, bias=False, dtype=dtype, certified=True).eval()
        with torch.no_grad():
            layer.weight.fill_(value)
        applied = _applied_weight(layer)
        w = Fraction(applied.flatten()[0].item())
        assert (applied == applied.flatten()[0]).all() and 13 * 7 * w * w <= 1


@pytest.mark.parametrize("scale", [1e-170, 1e170])
def test_extreme_weight_scales(scale, knobs):
    """Power and Gram iterations are rescaled by powers of two: no overflow to inf/NaN, no underflow to 0."""
    layer = SpectralConv2d(2, 3, 3, padding=1, dtype=torch.float64, input_size=4)
    with torch.no_grad():
        layer.weight.mul_(scale)
    layer.train()(torch.randn(1, 2, 4, 4, dtype=torch.float64))
    assert torch.isfinite(layer.u).all()
    layer.eval()
    unit = layer.weight.detach() / scale
    exact = spectral_norm(dense_conv2d(unit, 4, padding=1))
    assert abs(layer.sigma().item() / scale / exact - 1) <= 1e-5
    layer.certified = True
    assert layer.sigma().item() / scale >= exact


# --- model-level power iteration: one stacked call per group of equal geometry (lipkern.nn.power) -----------
from lipkern.nn import CPLConv2d, CPLLinear, MaxMin  # noqa: E402
from lipkern.nn import power as power_groups  # noqa: E402


class _Shared(nn.Module):
    """Three equal-geometry convs (one used twice per forward), a conv of another geometry, CPL layers."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        kw = dict(dtype=dtype, input_size=5)
        self.convs = nn.ModuleList([SpectralConv2d(4, 4, 3, padding=1, **kw) for _ in range(3)])
        self.other = SpectralConv2d(4, 3, 3, padding=1, stride=2, **kw)
        self.cpl = nn.ModuleList([CPLConv2d(4, 5, 3, **kw) for _ in range(2)])
        self.dense = nn.ModuleList([CPLLinear(27, 8, dtype=dtype) for _ in range(2)])
        self.head = SpectralLinear(27, 4, dtype=dtype)

    def forward(self, x, reuse: bool = True):
        for conv in self.convs:
            x = MaxMin()(conv(x))
        if reuse:
            x = self.convs[0](x)
        for layer in self.cpl:
            x = layer(x)
        x = self.other(x).flatten(1)
        for layer in self.dense:
            x = layer(x)
        return self.head(x)


@pytest.fixture
def torch_backend(knobs):
    """The grouping logic under test, at the speed of the PyTorch path (the kernels are tested in tests/ops;
    with the C++ CPU kernels on, small CPU layers make their own call and form no groups)."""
    knobs(backend="torch", cpu_kernels=False)


def _twins(make):
    torch.manual_seed(3)
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    for pa, pb in zip(a.parameters(), b.parameters()):
        pb.data.copy_(pa.data)
    return a, b


def _train(model, steps, reuse=True, seed=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=gen)
        loss = model(x, reuse).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.detach()


def _assert_same_state(a, b):
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert_close(ta, tb, msg=name)


def test_grouped_power_iteration_equals_per_layer(monkeypatch, torch_backend):
    """Stacked (grouped) vs per-layer iteration: the same vectors, weights and losses after several steps,
    with a layer used twice per forward (its second use starts a new step of its group)."""
    grouped, per_layer = _twins(_Shared)
    calls = []
    original = power_groups.stacked_power_step
    monkeypatch.setattr(power_groups, "stacked_power_step",
                        lambda layers, n: calls.append(len(layers)) or original(layers, n))
    loss_grouped = _train(grouped, 4)
    assert max(calls) >= 2, f"no stacked call groups several layers: {calls}"
    monkeypatch.setattr(power_groups, "_groupable", lambda *tensors: False)
    loss_per_layer = _train(per_layer, 4)
    assert_close(loss_grouped, loss_per_layer)
    _assert_same_state(grouped, per_layer)


def test_grouped_steady_state_is_one_call_per_group_and_other_models_are_not_touched(monkeypatch, torch_backend):
    model, reference = _twins(_Shared)
    bystander = SpectralConv2d(4, 4, 3, padding=1, dtype=torch.float64, input_size=5)  # same geometry, never run
    idle = bystander.u.clone()
    evaluated = _Shared().eval()
    evaluated(torch.randn(1, 4, 5, 5, dtype=torch.float64), False)
    frozen = {k: v.clone() for k, v in evaluated.state_dict().items()}
    _train(model, 2, reuse=False)
    calls = []
    original = power_groups.stacked_power_step
    monkeypatch.setattr(power_groups, "stacked_power_step",
                        lambda layers, n: calls.append(len(layers)) or original(layers, n))
    _train(model, 1, reuse=False)
    groups = {m._power_key() for m in model.modules() if hasattr(m, "_power_key")}
    assert len(calls) == len(groups) == 5 and sum(calls) == 9, calls
    assert torch.equal(bystander.u, idle), "a layer that does not run keeps its vectors"
    for key, value in evaluated.state_dict().items():
        assert torch.equal(value, frozen[key]), key
    monkeypatch.setattr(power_groups, "_groupable", lambda *tensors: False)
    _train(reference, 2, reuse=False)
    _train(reference, 1, reuse=False)
    _assert_same_state(model, reference)


def test_two_models_of_equal_geometry_trained_alternately_equal_per_layer(monkeypatch, torch_backend):
    """Results computed for a layer whose weight then changes are discarded (the weight's _version), and a
    load_state_dict of the vectors between steps is seen (the buffer's _version)."""
    a, a_ref = _twins(_Shared)
    b, b_ref = _twins(_Shared)

    def run(x, y):
        _train(x, 1, seed=1)
        _train(y, 1, seed=2)
        x.load_state_dict(y.state_dict())  # vectors and weights replaced in place
        _train(x, 1, seed=3)
        _train(y, 2, seed=4)

    run(a, b)
    monkeypatch.setattr(power_groups, "_groupable", lambda *tensors: False)
    run(a_ref, b_ref)
    _assert_same_state(a, a_ref)
    _assert_same_state(b, b_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_weights_train_with_a_float32_power_iteration(dtype, torch_backend):
    conv = SpectralConv2d(3, 4, 3, padding=1, input_size=5, dtype=dtype)
    linear = SpectralLinear(6, 5, dtype=dtype)
    for layer, x in ((conv, torch.randn(2, 3, 5, 5, dtype=dtype)), (linear, torch.randn(2, 6, dtype=dtype))):
        for _ in range(30):
            out = layer.train()(x)
            assert out.dtype == dtype and layer.u.dtype == dtype
            out.float().square().sum().backward()
        exact = spectral_norm(layer.weight.detach().double()) if layer is linear else \
            spectral_norm(dense_conv2d(layer.weight.detach().double(), 5, padding=1))
        assert abs(layer.sigma().float().item() / exact - 1) < 2e-2  # bf16 rounding of σ and the vectors
        assert torch.isfinite(layer.eval()(x)).all()


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_autocast_bfloat16_train_and_eval(layer):
    if layer == "conv":
        module, x = SpectralConv2d(3, 4, 3, padding=1, input_size=5), torch.randn(2, 3, 5, 5)
    else:
        module, x = SpectralLinear(6, 5), torch.randn(2, 6)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(2):
        with torch.autocast("cpu", torch.bfloat16):
            out = module.train()(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert module.u.dtype == torch.float32 and torch.isfinite(module.u).all()
    with torch.autocast("cpu", torch.bfloat16):
        out = module.eval()(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), module(x), atol=3e-2, rtol=3e-2)  # bf16 rounding of x and W


# ----------------------------------------------------------------------------------------------------------
# Small layers on the CPU: their own C++ step (no round), the numbers of the grouped path.
# ----------------------------------------------------------------------------------------------------------
def _small_layers(dtype):
    from lipkern.nn import CPLConv2d, CPLLinear

    return [(SpectralConv2d(4, 6, 3, stride=2, padding=1, input_size=7, dtype=dtype), (2, 4, 7, 7)),
            (SpectralLinear(9, 5, dtype=dtype), (3, 9)),
            (CPLConv2d(4, 5, 3, input_size=6, dtype=dtype), (2, 4, 6, 6)),
            (CPLLinear(7, 5, dtype=dtype), (3, 7))]


@pytest.mark.skipif(importlib.import_module("lipkern._cpu_kernels")._cpu is None, reason="lipkern._cpu is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_small_cpu_layers_step_alone_with_the_grouped_paths_numbers(dtype, knobs):
    """A small float32/float64 layer on the CPU makes its own C++ power step (recorded 'cpp', no round, no
    credit): its vectors, outputs and gradients equal, bit for bit, a twin on the grouped path (the op, which
    runs the same kernels), over steps with two forwards each (the graph of the first keeps its own u and v)."""
    from lipkern._dispatch import implementations
    from lipkern.nn import power

    knobs(backend=None, triton_interpret=False, cpu_kernels=True)
    for layer, shape in _small_layers(dtype):
        twin = copy.deepcopy(layer)
        twin._direct_power_rows = lambda *args: None  # the grouped path
        for step in range(3):
            x = torch.randn(shape, dtype=dtype)
            implementations(clear=True)
            loss = layer(x).square().sum() + layer(2 * x).sum()
            ran = implementations()
            twin_loss = twin(x).square().sum() + twin(2 * x).sum()
            assert ran["conv_power_iteration" if hasattr(layer, "geometry") else "batched_power_iteration"] == "cpp"
            assert layer not in power._CREDITS
            loss.backward()
            twin_loss.backward()
            assert torch.equal(loss, twin_loss), type(layer).__name__
            for a, b in ((layer.u, twin.u), (layer.v, twin.v), (layer.weight.grad, twin.weight.grad)):
                assert torch.equal(a, b), (type(layer).__name__, step)


@pytest.mark.skipif(importlib.import_module("lipkern._cpu_kernels")._cpu is None, reason="lipkern._cpu is not built")
def test_small_cpu_layers_own_step_is_never_taken_where_it_cannot_run(knobs):
    """The C++ step reads raw memory: under a FakeTensorMode or make_fx (they record the op), a default-device
    context (outputs stay on the CPU) and for a weight whose kernel no longer fits the layer's geometry (a clear
    error, never a read past it), the layers behave as on the op path."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    knobs(backend=None, triton_interpret=False, cpu_kernels=True)
    for layer, shape in _small_layers(torch.float32):
        x = torch.randn(shape)
        with FakeTensorMode(allow_non_fake_inputs=True):
            assert layer(x).shape == layer(x).shape  # (no raw pointer of a fake tensor reached the kernel)
        graph = make_fx(lambda t: layer(t))(x)
        targets = {str(node.target) for node in graph.graph.nodes}
        assert any("power_iteration" in t for t in targets), targets
        u = layer.u.clone()
        with torch.device("meta"):
            out = layer(x)
        assert out.device.type == "cpu" and torch.isfinite(out).all() and not torch.equal(layer.u, u)
    conv = SpectralConv2d(4, 6, 3, padding=1, input_size=5)
    conv.weight = nn.Parameter(torch.randn(6, 4, 1, 1))
    with pytest.raises((ValueError, RuntimeError)):
        conv.sigma()
