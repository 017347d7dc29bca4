"""AOLLinear / AOLConv2d / MaxMin: exact operator norms, drop-in behaviour, caching, export."""

import copy
import importlib.util

import pytest
import torch
from torch import nn

import lipkern
from lipkern.nn import AOLConv2d, AOLLinear, MaxMin
from tests.helpers import assert_close, dense_jacobian, spectral_norm

# (constructor kwargs, input spatial size): zero and circular padding, stride 1 and 2, dilation, groups.
CONV_CASES = [
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), 5),
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="circular"), 5),
    (dict(in_channels=2, out_channels=3, kernel_size=3, padding="same", padding_mode="circular"), 6),
    (dict(in_channels=4, out_channels=2, kernel_size=3, stride=2, padding=1), 6),
    (dict(in_channels=2, out_channels=4, kernel_size=2, stride=2), 6),
    (dict(in_channels=2, out_channels=2, kernel_size=3, dilation=2, padding=2), 6),
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2), 4),
    (dict(in_channels=3, out_channels=3, kernel_size=(1, 3), padding="valid"), 5),
    (dict(in_channels=2, out_channels=5, kernel_size=3, padding=0, stride=(2, 1), dilation=(1, 2)), 7),
]
CONV_IDS = [f"case{i}" for i in range(len(CONV_CASES))]


def _layer_norm(layer: nn.Module, example_shape) -> float:
    """Exact spectral norm of the layer's affine map: its dense matrix from the impulse responses (the layer
    applied to every basis vector, bias removed) in float64, then the SVD."""
    layer = layer.double().eval()
    numel = torch.Size(example_shape).numel()
    basis = torch.eye(numel, dtype=torch.float64, device=layer.weight.device).reshape(numel, *example_shape)
    with torch.no_grad():
        columns = layer(basis)
        if layer.bias is not None:
            columns = columns - layer(torch.zeros_like(basis[:1]))
    return spectral_norm(columns.reshape(numel, -1).T)


def _randomize(layer: nn.Module, scale: float = 2.0) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight) * scale)


def _adversarial_steps(layer: nn.Module, example_shape, steps: int = 5) -> None:
    """Push the weight towards a larger operator norm: maximize ‖layer(x)‖ / ‖x‖ over weights and inputs."""
    layer.train()
    x = torch.randn((4, *example_shape), dtype=layer.weight.dtype, device=layer.weight.device, requires_grad=True)
    opt = torch.optim.Adam([layer.weight, x], lr=0.1)
    for _ in range(steps):
        gain = layer(x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)  # bias-free layers: linear maps
        opt.zero_grad()
        (-gain.sum()).backward()
        opt.step()


@pytest.mark.parametrize("kwargs,n", CONV_CASES, ids=CONV_IDS)
def test_conv_operator_norm_at_most_one(device, kwargs, n):
    layer = AOLConv2d(**kwargs, bias=False, dtype=torch.float64, device=device)
    shape = (kwargs["in_channels"], n, n)
    assert _layer_norm(layer, shape) <= 1 + 1e-6  # initialization
    _randomize(layer)
    assert _layer_norm(layer, shape) <= 1 + 1e-6
    _adversarial_steps(layer, shape)
    norm = _layer_norm(layer, shape)
    assert norm <= 1 + 1e-6, norm


@pytest.mark.parametrize("features", [(5, 5), (3, 7), (8, 2)])
def test_linear_operator_norm_at_most_one(device, features):
    layer = AOLLinear(*features, bias=False, dtype=torch.float64, device=device)
    _randomize(layer, 5.0)
    _adversarial_steps(layer, (features[0],))
    assert _layer_norm(layer, (features[0],)) <= 1 + 1e-6


def test_norm_check_can_fail():
    """The oracle sees a non-1-Lipschitz layer: the same conv without the rescaling."""
    layer = nn.Conv2d(3, 4, 3, padding=1, bias=False, dtype=torch.float64)
    _randomize(layer)
    assert _layer_norm(layer, (3, 5, 5)) > 1.5


def test_identity_and_orthogonal_initialization():
    x = torch.randn(2, 4, 6, 6)
    conv = AOLConv2d(4, 4, 3, padding=1)
    assert_close(conv(x), x, dtype=torch.float32)  # Dirac kernel: identity Jacobian
    lin = AOLLinear(6, 6)
    v = torch.randn(3, 6)
    assert_close(lin(v), v, dtype=torch.float32)
    wide = AOLLinear(3, 7, dtype=torch.float64)  # orthonormal columns: an isometry
    u = torch.randn(5, 3, dtype=torch.float64)
    assert_close(wide(u).norm(dim=1), u.norm(dim=1))


@pytest.mark.parametrize("kwargs,n", CONV_CASES, ids=CONV_IDS)
def test_conv_matches_nn_conv2d_with_rescaled_weight(kwargs, n):
    layer = AOLConv2d(**kwargs)
    _randomize(layer)
    vanilla = layer.to_vanilla()
    assert type(vanilla) is nn.Conv2d and vanilla.padding_mode == layer.padding_mode
    x = torch.randn(2, kwargs["in_channels"], n, n)
    layer.eval()
    assert torch.equal(layer(x), vanilla.eval()(x))
    manual = nn.Conv2d(**kwargs)
    manual.load_state_dict({"weight": lipkern.ops.aol_rescale(layer.weight.detach(), layer.groups),
                            "bias": layer.bias.detach()})
    assert torch.equal(manual(x), layer(x))


def test_linear_to_vanilla_and_shapes():
    layer = AOLLinear(5, 3, bias=False)
    _randomize(layer)
    x = torch.randn(2, 4, 5)
    vanilla = layer.to_vanilla()
    assert vanilla.bias is None and type(vanilla) is nn.Linear
    assert torch.equal(layer.eval()(x), vanilla(x))


def test_state_dict_round_trip():
    a = AOLConv2d(3, 4, 3, padding=1, groups=1)
    _randomize(a)
    assert set(a.state_dict()) == {"weight", "bias"}
    b = AOLConv2d(3, 4, 3, padding=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(a(x), b(x))


def test_eval_cache_reused_and_invalidated_by_optimizer_step_and_train():
    layer = AOLConv2d(3, 4, 3, padding=1).eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        first = layer(x)
        cached = layer._cached_weight
        assert cached is not None
        layer(x)
        assert layer._cached_weight is cached  # reused
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.weight.grad = torch.randn_like(layer.weight)
    opt.step()
    with torch.no_grad():
        after = layer(x)
    assert layer._cached_weight is not cached
    assert_close(after, layer.to_vanilla()(x), dtype=torch.float32)
    assert not torch.equal(first, after)
    layer.train()
    assert layer._cached_weight is None


def test_eval_with_weight_gradients_still_trains():
    layer = AOLLinear(4, 3).eval()
    layer(torch.randn(2, 4)).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_inference_mode_cache_then_autograd_on_input():
    layer = AOLConv2d(2, 2, 3, padding=1).eval().requires_grad_(False)
    with torch.inference_mode():
        layer(torch.randn(1, 2, 4, 4))
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    layer(x).sum().backward()  # the cached weight is a normal tensor, usable in autograd
    assert x.grad is not None


def test_device_dtype_and_deepcopy():
    layer = AOLConv2d(2, 4, 3, device="cpu", dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.bias.dtype == torch.float64
    clone = copy.deepcopy(layer)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    assert torch.equal(clone(x), layer(x))


def test_extra_repr_mirrors_conv2d():
    layer = AOLConv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False, padding_mode="circular")
    assert repr(layer) == ("AOLConv2d(4, 8, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), groups=2, "
                           "bias=False, padding_mode=circular)")
    assert "in_features=3, out_features=2" in repr(AOLLinear(3, 2))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(in_channels=3, out_channels=4, kernel_size=3, padding_mode="reflect"), ValueError, "not 1-Lipschitz"),
    (dict(in_channels=3, out_channels=4, kernel_size=3, groups=2), ValueError, "divisible"),
    (dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding="same"), ValueError, "strided"),
    (dict(in_channels=1, out_channels=1, kernel_size=1, padding=1, padding_mode="circular"), ValueError,
     "exceeds"),
    (dict(in_channels=2, out_channels=2, kernel_size=3, padding=(1, 2), padding_mode="circular"), ValueError,
     "exceeds"),
])
def test_bad_conv_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        AOLConv2d(**kwargs)


def test_wide_circular_padding_is_not_one_lipschitz():
    """Why AOLConv2d refuses circular padding wider than 'same': the same kernel in nn.Conv2d has norm 2."""
    conv = nn.Conv2d(1, 1, 1, padding=1, padding_mode="circular", bias=False, dtype=torch.float64)
    nn.init.ones_(conv.weight)
    assert _layer_norm(conv, (1, 3, 3)) > 1.5


def test_direct_op_call_with_channels_last_weight():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last)
    out = torch.ops.lipkern.aol_rescale(w, 1)[0]
    assert_close(out, lipkern.ops.aol_rescale_ref(w))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("make", [lambda: AOLLinear(3, 3), lambda: AOLConv2d(3, 3, 3, padding=1)],
                         ids=["linear", "conv"])
def test_non_finite_weight_is_never_a_silent_value(make, bad):
    """Training: no host check (no device sync), the output is NaN. Eval (cached or not, as the Spectral and
    CPL layers) and export: a clear error."""
    layer = make()
    with torch.no_grad():
        layer.weight.view(-1)[1] = bad
    x = torch.randn(2, 3) if isinstance(layer, AOLLinear) else torch.randn(2, 3, 4, 4)
    assert torch.isnan(layer(x)).any()
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.eval()(x)  # eval with weight gradients: not cached, checked
    with torch.no_grad(), pytest.raises(ValueError, match="NaN or Inf"):
        layer(x)  # the cached eval weight (what certification uses) is checked
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.to_vanilla()


def test_compile_fullgraph_train_step():
    layer = AOLConv2d(3, 4, 3, padding=1)
    _randomize(layer)
    x = torch.randn(2, 3, 5, 5)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    got = layer.weight.grad.clone()
    layer.weight.grad = None
    nn.functional.conv2d(x, lipkern.ops.aol_rescale_ref(layer.weight), layer.bias, padding=1).square().sum().backward()
    assert_close(got, layer.weight.grad.double(), dtype=torch.float32)


# --- MaxMin ------------------------------------------------------------------------------------------------
def test_maxmin_is_a_pointwise_permutation_and_one_lipschitz():
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    y = MaxMin()(x)
    assert torch.equal(y.sort(dim=1).values, x.sort(dim=1).values)
    a, b = x.chunk(2, 1)
    assert torch.equal(y[:, :3], torch.maximum(a, b)) and torch.equal(y[:, 3:], torch.minimum(a, b))
    jac = dense_jacobian(lambda v: MaxMin()(v[None])[0], x[0])
    assert spectral_norm(jac) <= 1 + 1e-12


def test_maxmin_rejects_odd_channels():
    with pytest.raises(ValueError, match="even"):
        MaxMin()(torch.randn(2, 3))


def test_activation_variance_non_increasing_through_aol_stack():
    """papers.md §10 check 29 on a random AOL + MaxMin stack."""
    torch.manual_seed(1)
    layers = [AOLConv2d(8, 8, 3, padding=1, bias=False) for _ in range(4)]
    for layer in layers:
        _randomize(layer, 1.0)
    x = torch.randn(64, 8, 6, 6)
    with torch.no_grad():
        previous = x.var(dim=0).sum()
        for layer in layers:
            x = MaxMin()(layer(x))
            current = x.var(dim=0).sum()
            assert current <= previous * (1 + 1e-5)
            previous = current


def test_torch_export_contains_the_custom_op():
    layer = AOLConv2d(3, 4, 3, padding=1)
    _randomize(layer)
    x = torch.randn(2, 3, 5, 5)
    program = torch.export.export(layer, (x,))
    assert "lipkern.aol_rescale" in str(program.graph)
    assert_close(program.module()(x), layer(x).double(), dtype=torch.float32)


def _cpu_kernels_built() -> bool:
    import lipkern._cpu_kernels

    return lipkern._cpu_kernels._cpu is not None


_LEAN_LAYERS = [(lambda dtype: AOLLinear(9, 7, dtype=dtype), (4, 9)),
                (lambda dtype: AOLConv2d(4, 6, 3, padding=1, groups=2, dtype=dtype), (2, 4, 5, 5)),
                (lambda dtype: AOLConv2d(3, 5, (1, 2), dtype=dtype), (2, 3, 4, 4))]


@pytest.mark.skipif(not _cpu_kernels_built(), reason="lipkern._cpu is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("make,shape", _LEAN_LAYERS, ids=["linear", "conv-groups", "conv-1x2"])
def test_cpu_training_rescale_equals_the_op_bit_for_bit(make, shape, dtype, knobs):
    """A training step on the CPU runs the rescale's C++ kernels in one lean autograd.Function (not the op's
    registration layers): outputs, weight gradients and second derivatives (create_graph) equal those of the
    public op bit for bit, and the same implementation is recorded."""
    from lipkern._dispatch import implementations
    from lipkern.ops import aol_rescale

    knobs(backend=None, triton_interpret=False, cpu_kernels=True)
    torch.manual_seed(0)
    layer = make(dtype)
    _randomize(layer, 0.5)
    twin = copy.deepcopy(layer)
    x = torch.randn(shape, dtype=dtype)
    implementations(clear=True)
    lean = layer.rescaled_weight()
    ran = implementations()["aol_rescale"]
    op = aol_rescale(twin.weight, twin.groups)
    assert type(lean.grad_fn).__name__ == "_CpuLayerRescaleBackward" and ran.startswith("cpp/")
    assert type(op.grad_fn).__name__ != type(lean.grad_fn).__name__ and implementations()["aol_rescale"] == ran
    assert torch.equal(lean, op)
    probe = torch.randn_like(lean)
    (grad_lean,) = torch.autograd.grad((lean * probe).sum(), layer.weight, create_graph=True)
    (grad_op,) = torch.autograd.grad((op * probe).sum(), twin.weight, create_graph=True)
    assert torch.equal(grad_lean, grad_op) and grad_lean.grad_fn is not None
    (second_lean,) = torch.autograd.grad(grad_lean.float().square().sum(), layer.weight)
    (second_op,) = torch.autograd.grad(grad_op.float().square().sum(), twin.weight)
    assert torch.equal(second_lean, second_op)
    def loss(module, weight):
        out = (module._conv(x, weight) if isinstance(module, AOLConv2d)
               else nn.functional.linear(x, weight, module.bias))
        return out.float().square().sum()

    (grad_w,) = torch.autograd.grad(loss(layer, layer.rescaled_weight()), layer.weight)
    (twin_w,) = torch.autograd.grad(loss(twin, aol_rescale(twin.weight, twin.groups)), twin.weight)
    assert torch.equal(grad_w, twin_w)
    lean_loss, op_loss = loss(layer, layer.rescaled_weight()), loss(twin, aol_rescale(twin.weight, twin.groups))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a backward under autocast: the op's functional backward
        (grad_w,) = torch.autograd.grad(lean_loss, layer.weight)
        (twin_w,) = torch.autograd.grad(op_loss, twin.weight)
    assert torch.equal(grad_w, twin_w)


@pytest.mark.skipif(not _cpu_kernels_built(), reason="lipkern._cpu is not built")
def test_cpu_training_rescale_is_never_taken_where_the_op_must_run(knobs, monkeypatch):
    """The lean path reads raw memory and is invisible to tracers: torch.func transforms, make_fx, autocast,
    float64 weights (their range scaling), non-contiguous weights, the kernels switched off and a Triton
    choice all take the public op (same values), and make_fx records the custom op."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from lipkern.ops import aol_rescale

    knobs(backend=None, triton_interpret=False, cpu_kernels=True)
    layer = AOLLinear(6, 5)
    _randomize(layer, 0.5)
    lean = type(layer.rescaled_weight().grad_fn).__name__
    assert lean == "_CpuLayerRescaleBackward"
    graph = make_fx(lambda w: lipkern.ops.aol.aol_layer_rescale(w))(layer.weight)
    assert any("aol_rescale" in str(node.target) for node in graph.graph.nodes)
    grad = torch.func.grad(lambda w: lipkern.ops.aol.aol_layer_rescale(w).square().sum())(layer.weight.detach())
    want = torch.func.grad(lambda w: aol_rescale(w).square().sum())(layer.weight.detach())
    assert torch.equal(grad, want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(layer.rescaled_weight().grad_fn).__name__ != lean
    wide = nn.Parameter(torch.randn(5, 12)[:, ::2])
    assert type(lipkern.ops.aol.aol_layer_rescale(wide).grad_fn).__name__ != lean
    assert torch.equal(lipkern.ops.aol.aol_layer_rescale(wide), aol_rescale(wide))
    assert type(AOLLinear(6, 5, dtype=torch.float64).rescaled_weight().grad_fn).__name__ != lean
    knobs(cpu_kernels=False)
    assert type(layer.rescaled_weight().grad_fn).__name__ != lean
    if importlib.util.find_spec("triton") is not None:  # (interpret mode picks Triton only where it imports)
        knobs(cpu_kernels=True, triton_interpret=True)  # (the op's Triton path, not run: the call is the check)
        monkeypatch.setattr(lipkern.ops.aol, "aol_rescale", lambda weight, groups=1: "the public op")
        assert lipkern.ops.aol.aol_layer_rescale(layer.weight) == "the public op"
