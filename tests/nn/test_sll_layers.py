"""SLL layers (issue 19): 1-Lipschitz by construction (dense Jacobian, train and eval, zeros and circular,
random q), the paper's formula in float64 with T from the explicit operator, q learnable and effective,
to_vanilla equal to the eval layer, whole-network bounds and the certificate of the network as it runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lipkern.nn as L
from lipkern.bounds import lipschitz_bound
from lipkern.certify import certified_accuracy
from lipkern.certify.rounding import RoundingAnalysis
from lipkern.models import to_vanilla
from tests.helpers import dense_conv2d, dense_jacobian, spectral_norm


def _randomize(layer, seed: int, weight_scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * weight_scale / layer.weight[0].numel() ** 0.5)
        layer.log_q.copy_(torch.rand(layer.log_q.shape, generator=g) * 4 - 2)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return layer


def _layers():
    return [(L.SLLLinear(6, 9), (6,)), (L.SLLLinear(8, 3, bias=False), (8,)),
            (L.SLLConv2d(3, 5), (3, 5, 5)), (L.SLLConv2d(2, 4, kernel_size=2, padding_mode="circular"), (2, 4, 4)),
            (L.SLLConv2d(2, 3, kernel_size=(3, 1)), (2, 6, 3))]


def _reference_scale(layer, shape) -> torch.Tensor:
    """2/t_i with t_i = Σ_j |W Wᵀ|_ij q_j/q_i from the EXPLICIT operator (float64): for a conv, the rows of the
    dense A Aᵀ at an interior pixel of a zero-padded input large enough to have one."""
    w = layer.weight.detach().double()
    q = layer.log_q.detach().double().exp()
    if w.dim() == 2:
        gram = (w @ w.T).abs()
        return 2 / ((gram * q[None, :]).sum(1) / q)
    kh, kw = w.shape[2:]
    n = 2 * max(kh, kw) + 3
    top, left = (kh - 1) // 2, (kw - 1) // 2
    a = dense_conv2d(w, (n, n), padding=(top, left)) if (kh - 1) % 2 == 0 and (kw - 1) % 2 == 0 else None
    if a is None:  # even kernels: 'same' padding is asymmetric; pad by hand
        full = dense_conv2d(w, (n + kh - 1, n + kw - 1))
        keep = torch.zeros(w.shape[1], n + kh - 1, n + kw - 1, dtype=torch.bool)
        keep[:, top:top + n, left:left + n] = True
        a = full[:, keep.flatten()]
    hidden = w.shape[0]
    rows = (a @ a.T).abs().reshape(hidden, n * n, hidden, n * n)
    centre = (n // 2) * n + n // 2
    weighted = rows[:, centre].sum(dim=2) * q[None, :]  # (i, j): Σ over the pixels of unit j
    return 2 / (weighted.sum(1) / q)


@pytest.mark.parametrize("index", range(5))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_dense_jacobian_norm_at_most_one(index, mode):
    """At inputs where every / no / some hidden unit is active; and a scale 1.5× too large breaks it where
    all units are active (the check can fail)."""
    layer, shape = _layers()[index]
    _randomize(layer, index)
    layer.train(mode == "train").double()
    g = torch.Generator().manual_seed(10 + index)
    worst = 0.0
    for trial in range(6):
        x = torch.randn((1, *shape), generator=g, dtype=torch.float64) * (0.1 if trial % 2 else 3.0)
        worst = max(worst, spectral_norm(dense_jacobian(lambda t: layer(t), x)))
    assert worst <= 1 + 1e-12, worst
    if mode == "eval" and layer.bias is not None:  # every unit active: J = I − WᵀSW
        with torch.no_grad():
            layer.bias.fill_(50.0)
        x = torch.zeros((1, *shape), dtype=torch.float64)
        jacobian = dense_jacobian(lambda t: layer(t), x)
        largest = torch.linalg.eigvalsh(torch.eye(len(jacobian), dtype=torch.float64) - jacobian)[-1].item()
        assert largest <= 2 + 1e-12  # ‖S^{1/2}W‖² ≤ 2: the proof's inequality itself
        big = layer.to_vanilla()
        with torch.no_grad():
            big.scale.mul_(3 / largest)  # a scale that does not respect T ⪰ WWᵀ: the check catches it
        assert spectral_norm(dense_jacobian(lambda t: big(t), x)) > 1.9


@pytest.mark.parametrize("index", range(5))
def test_paper_formula_in_float64(index):
    """The eval scale is the float64 reference 2/t (explicit operator) rounded down by at most 1e-6 relative; the
    training scale equals it to float32 rounding; the output is x − Wᵀ(s ⊙ relu(Wx + b)) (explicit matrices)."""
    layer, shape = _layers()[index]
    _randomize(layer, 20 + index)
    reference = _reference_scale(layer, shape)
    eval_scale = layer.eval().scale().double()
    assert (eval_scale <= reference).all() and (eval_scale >= reference * (1 - 1e-6)).all()
    train_scale = layer.train().scale().detach().double()
    torch.testing.assert_close(train_scale, reference, rtol=1e-5, atol=0)
    layer.eval()
    if getattr(layer, "padding_mode", "zeros") == "circular":
        return  # the explicit circular operator's output: covered by the Jacobian test
    x = torch.randn((4, *shape), dtype=torch.float64)
    w = layer.weight.detach().double()
    if w.dim() == 2:
        a, bias_rows = w, (layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0]))
    else:
        n_h, n_w = shape[1:]
        kh, kw = w.shape[2:]
        top, left = (kh - 1) // 2, (kw - 1) // 2
        full = dense_conv2d(w, (n_h + kh - 1, n_w + kw - 1))
        keep = torch.zeros(w.shape[1], n_h + kh - 1, n_w + kw - 1, dtype=torch.bool)
        keep[:, top:top + n_h, left:left + n_w] = True
        a = full[:, keep.flatten()]
        bias_rows = layer.bias.detach().double().repeat_interleave(n_h * n_w)
        eval_scale = eval_scale.repeat_interleave(n_h * n_w)
    flat = x.flatten(1)
    expected = flat - (torch.relu(flat @ a.T + bias_rows) * eval_scale) @ a
    with torch.no_grad():  # the eval layer's own (float32) scale, evaluated in float64
        got = layer.to_vanilla().double()(x).flatten(1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("index", range(5))
@pytest.mark.parametrize("backend", ["torch", None])
def test_training_runs_the_cpl_op_and_matches_the_eager_formula(index, backend, knobs):
    """Training: the CPL op (a forced backend: the op itself) with W̃ = diag(√s)W, b̃ = √s ⊙ b, h = 1, and the
    auto mode (small CPU steps: the formula directly) equal x − Wᵀ(s ⊙ relu(Wx + b)) in plain autograd
    (float64), values and gradients in x, W, b and q."""
    from lipkern import _dispatch
    from lipkern.nn.sll import plain_sll_conv2d, plain_sll_linear

    knobs(backend=backend)
    _dispatch.implementations(clear=True)
    layer, shape = _layers()[index]
    _randomize(layer, 40 + index)
    layer.double().train()
    x = torch.randn((3, *shape), dtype=torch.float64, requires_grad=True)
    out = layer(x)
    grad_out = torch.randn_like(out)
    params = [x, layer.weight, layer.log_q] + ([layer.bias] if layer.bias is not None else [])
    got = torch.autograd.grad(out, params, grad_out)
    s = layer.scale()
    if layer.weight.dim() == 2:
        ref = plain_sll_linear(x, layer.weight, layer.bias, s)
    else:
        ref = plain_sll_conv2d(x, layer.weight, layer.bias, s, layer.padding, layer.padding_mode)
    expected = torch.autograd.grad(ref, params, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    if backend is not None:
        assert "cpl" in str(_dispatch.implementations())  # the CPL op ran


def test_q_is_learnable_and_effective():
    """log_q has a non-zero gradient, and changing q changes the scale (the q_j/q_i factors do not cancel)."""
    layer = _randomize(L.SLLConv2d(3, 4), 1).train()
    x = torch.randn(2, 3, 6, 6)
    (layer(x) ** 2).sum().backward()
    assert layer.log_q.grad is not None and layer.log_q.grad.abs().max() > 0
    before = layer.eval().scale().clone()
    with torch.no_grad():
        layer.log_q[0] += 1.0
    after = layer.scale()
    assert not torch.allclose(before, after), "q had no effect on T"
    assert after.dtype == layer.weight.dtype


def test_to_vanilla_equals_the_eval_layer_and_the_cache_follows_edits():
    for layer, shape in _layers():
        _randomize(layer, 5).eval()
        x = torch.randn((3, *shape))
        assert torch.equal(layer.to_vanilla()(x), layer(x))
        before = layer.scale().clone()
        with torch.no_grad():
            layer.weight.data.mul_(2)  # an edit through .data: the cached scale must not go stale
        assert not torch.equal(before, layer.scale())
        assert torch.equal(layer.to_vanilla()(x), layer(x))


def _network(padding_mode="zeros"):
    torch.manual_seed(0)
    net = nn.Sequential(L.SLLConv2d(2, 4, padding_mode=padding_mode), L.MaxMin(),
                        L.SLLConv2d(2, 6, padding_mode=padding_mode), nn.Flatten(), L.SLLLinear(2 * 6 * 6, 24),
                        nn.Linear(72, 3))
    for i, layer in enumerate(m for m in net if isinstance(m, (L.SLLConv2d, L.SLLLinear))):
        _randomize(layer, 30 + i)
    with torch.no_grad():
        net[-1].weight.div_(torch.linalg.matrix_norm(net[-1].weight, 2))
    return net.eval()


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_network_bound_and_its_export(padding_mode):
    """The SLL layers count as 1 (exact): the sound bound of the network is the head's norm (≤ 1 here), for
    the model and for its to_vanilla export; the dense Jacobian of the network never exceeds it."""
    net = _network(padding_mode)
    bound = lipschitz_bound(net, (2, 6, 6), method="product").item()
    head = spectral_norm(net[-1].weight.detach())
    assert head <= bound <= head * (1 + 1e-6) and bound <= 1 + 1e-6
    exported = lipschitz_bound(to_vanilla(net), (2, 6, 6), method="product").item()
    assert bound <= exported <= 1 + 1e-6 or exported <= 1 + 1e-6
    net64 = _network(padding_mode).double()
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x = torch.randn(1, 2, 6, 6, generator=g, dtype=torch.float64)
        assert spectral_norm(dense_jacobian(lambda t: net64(t), x)) <= bound * (1 + 1e-9)
    with pytest.raises(ValueError, match="eval mode"):
        lipschitz_bound(net.train(), (2, 6, 6))


def test_certificate_of_the_network_as_it_runs():
    """certified_accuracy (default: the float32 evaluation) runs on an SLL network, its rounding bound covers
    the float32 logits, and the radii never exceed the real-arithmetic ones."""
    net = _network()
    x = torch.rand(200, 2, 6, 6, generator=torch.Generator().manual_seed(4))
    bound = RoundingAnalysis(net, (2, 6, 6), "float32")(x)
    with torch.no_grad():
        error = (net(x).double() - to_vanilla(net).double()(x.double())).norm(dim=1)
    assert (error <= bound.center + 1e-9).all()
    y = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(5))
    deployed = certified_accuracy(net, (x, y), [0.0, 0.01], pairwise=True)
    exact = certified_accuracy(net, (x, y), [0.0, 0.01], pairwise=True, evaluation="exact")
    assert deployed.evaluation == "float32" and (deployed.radii <= exact.radii).all()
    assert (deployed.radii > 0).any()


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive ints"):
        L.SLLLinear(0)
    with pytest.raises(ValueError, match="padding_mode"):
        L.SLLConv2d(3, padding_mode="reflect")
    with pytest.raises(ValueError, match="kernel_size"):
        L.SLLConv2d(3, kernel_size=0)
    layer = L.SLLLinear(4).eval()
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer(torch.randn(2, 4))


# --- found by an independent review: each case broke the proof (or the rounding bound) before its fix --------
def test_extreme_log_q_keeps_the_layer_one_lipschitz():
    """exp(−745) is the smallest float64 subnormal: q_j·|G_ij| underflowed and s reached 2.0 against 2/t =
    1.379 (Jacobian 1.9). q is now shifted by max(log_q) (exact: t depends on ratios) and underflow charged."""
    import math

    two = L.SLLLinear(2, 2)
    with torch.no_grad():
        two.weight.copy_(torch.tensor([[1.0, 0.0], [0.45, math.sqrt(1 - 0.45**2)]]))
        two.bias.fill_(10.0)  # both units active at 0
        two.log_q.fill_(-745.0)
    one = L.SLLConv2d(1, 1, kernel_size=1, bias=False)
    with torch.no_grad():
        one.weight.fill_(1.2)
        one.log_q.fill_(-745.0)
    for layer, x in ((two, torch.zeros(1, 2)), (one, torch.ones(1, 1, 2, 2))):
        layer.eval()
        exported = layer.to_vanilla().double()
        assert spectral_norm(dense_jacobian(lambda t: exported(t), x.double())) <= 1 + 1e-12
    spread = L.SLLLinear(3, 4)
    with torch.no_grad():
        spread.log_q.copy_(torch.tensor([-800.0, 0.0, 5.0, -3.0]))  # q_0 underflows after the shift: unit off
    scale = spread.eval().scale()
    assert torch.isfinite(scale).all() and scale[0] == 0


def test_float64_gram_underflow_is_charged():
    """A float64 layer whose Gram products fall below 2⁻¹⁰²² (the review's construction: a² just above a
    subnormal grid point, so each square rounds DOWN by about half a unit, and a·b rounds to 0): exact
    rationals show s_i·t_i ≤ 2 (it was 2 + 3.2e-13, a Jacobian above 1)."""
    import math
    from fractions import Fraction

    n, tiny = 1000, Fraction(1, 2**1074)
    target = Fraction(11, 10) * Fraction(1, 2**1023) / n  # n·a² just above 2⁻¹⁰²³, below 2⁻¹⁰²²
    a = math.sqrt(float(target * 2**1074)) * 2.0**-537
    while not Fraction(45, 100) <= (Fraction(a) ** 2 / tiny) % 1 < Fraction(1, 2):
        a = math.nextafter(a, 0)
    b = float(Fraction(1, 2**1075) / Fraction(a))
    while Fraction(a) * Fraction(b) >= Fraction(1, 2**1075):
        b = math.nextafter(b, 0)
    first = torch.cat([torch.full((n,), a, dtype=torch.float64), torch.full((n,), b, dtype=torch.float64)])
    layer = L.SLLLinear(2 * n, 2, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.stack([first, first.flip(0)]))
    scale = layer.eval().scale()
    diagonal = n * (Fraction(a) ** 2 + Fraction(b) ** 2)
    off = 2 * n * Fraction(a) * Fraction(b)
    for i in range(2):  # q equal: t_i = |G_ii| + |G_ij|
        assert Fraction(float(scale[i])) * (diagonal + off) <= 2


def test_a_plain_sll_layer_with_a_negative_scale_is_refused():
    layer = L.PlainSLLLinear(torch.randn(3, 2), None, torch.tensor([1.0, -10.0, 0.5]))
    with pytest.raises(ValueError, match="negative or non-finite scale"):
        RoundingAnalysis(nn.Sequential(layer), (2,), "float32")
    with pytest.raises(ValueError, match="non-finite or negative scale"):
        lipschitz_bound(nn.Sequential(layer), (2,))


def test_flushed_hidden_values_are_charged():
    """With flush-to-zero, s ⊙ relu(p) just below 2⁻¹²⁶ is flushed; the loss reaches the output through
    |Wᵀ|'s column sums (1,000 aligned units): the bound covers it."""
    layer = L.SLLLinear(2, 1000)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(100 * (0.5 + torch.rand(1000, 2, generator=g)))
        layer.bias.zero_()
    layer.eval()
    s = layer.scale().double()
    with torch.no_grad():
        layer.bias.copy_((0.9 * 2.0 ** -126 / s).float())
    net = nn.Sequential(layer).eval()
    x = torch.zeros(1, 2)
    bound = RoundingAnalysis(net, (2,), "float32")(x)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        with torch.no_grad():
            deployed = to_vanilla(net)(x).double()
    finally:
        torch.set_flush_denormal(False)
    with torch.no_grad():
        exact = to_vanilla(net).double()(x.double())
    assert (deployed - exact).norm() <= bound.center + bound.exact


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_export_and_torch_func(training, knobs):
    """The training path (the CPL op: a forced backend runs the op itself) and the eval path compile with
    fullgraph=True (aot_eager); the eval layer exports (torch.export) and runs as the layer; torch.func.jacrev
    equals the autograd Jacobian."""
    knobs(backend="torch")
    layer = _randomize(L.SLLConv2d(3, 4, dtype=torch.float64), 7).train(training)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    if not training:
        exported = torch.export.export(layer, (x,)).module()
        torch.testing.assert_close(exported(x), eager, rtol=0, atol=0)
    if not training:
        fresh = _randomize(L.SLLConv2d(3, 4, dtype=torch.float64), 8).eval()
        with pytest.raises(Exception, match="run one eager forward in eval mode"):
            torch.compile(fresh, fullgraph=True, backend="aot_eager")(x)
    single = x[:1]
    jac = torch.func.jacrev(layer)(single)
    want = torch.autograd.functional.jacobian(layer, single)
    torch.testing.assert_close(jac, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tracer", ["fake-mode", "make_fx"])
def test_a_traced_training_step_leaves_later_eager_steps_real(tracer):
    """Tracing an SLL conv's training step (FakeTensorMode, make_fx in fake mode) keeps the convolution form and
    leaves no fake constant behind: a later eager step returns real, finite values."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from lipkern.ops import sll_scale

    if tracer == "fake-mode":
        with FakeTensorMode(allow_non_fake_inputs=True):
            L.SLLConv2d(4, kernel_size=(2, 3)).train()(torch.empty(2, 4, 5, 5)).sum().backward()
    else:
        make_fx(sll_scale, tracing_mode="fake")(torch.randn(4, 4, 2, 3), torch.zeros(4))
    y = L.SLLConv2d(4, kernel_size=(2, 3)).train()(torch.randn(2, 4, 5, 5))
    assert type(y) is torch.Tensor and torch.isfinite(y).all()
    assert type(sll_scale(torch.randn(4, 4, 2, 3), torch.zeros(4))) is torch.Tensor
