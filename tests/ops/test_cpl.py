"""lipkern.ops.cpl_linear / cpl_conv2d: forward and backward against the autograd reference, the 1-Lipschitz
property with the exact norm (dense operator, SVD) and its failure with an under-estimate (papers.md §10,
checks 5-7), the saved tensors of the backward, op boundary."""

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from lipkern._dispatch import implementations
from lipkern.ops import cpl as cpl_module
from lipkern.ops import cpl_conv2d, cpl_linear
from lipkern.ops.conv_power_iteration import ConvGeometry
from lipkern.ops.cpl import cpl_conv2d_ref, cpl_linear_ref
from tests.helpers import assert_close, dense_conv2d, spectral_norm

CONV_CASES = [dict(padding=1), dict(padding=1, padding_mode="circular"), dict(stride=2, padding=1),
              dict(padding="same", dilation=2), dict(padding=1, groups=2)]
CONV_IDS = ["zeros", "circular", "stride2", "dilation", "groups"]


def _params(hidden, features, dtype=torch.float64, kernel=None, groups=1):
    shape = (hidden, features // groups, *kernel) if kernel else (hidden, features)
    w = torch.randn(shape, dtype=dtype)
    return w, torch.randn(hidden, dtype=dtype), torch.tensor(0.3, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("batch, features, hidden", [(1, 1, 1), (5, 7, 3), (3, 127, 17)])
def test_linear_matches_reference(dtype, batch, features, hidden):
    w, b, h = _params(hidden, features, dtype)
    x = torch.randn(batch, features, dtype=dtype, requires_grad=True)
    params = [t.requires_grad_() for t in (w, b, h)]
    grad = torch.randn(batch, features, dtype=dtype)
    out = cpl_linear(x, *params)
    grads = torch.autograd.grad(out, [x, *params], grad)
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, *params)]
    ref = cpl_linear_ref(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.double())
    assert_close(out, ref, dtype=dtype)
    if dtype == torch.float64:
        for got, want, name in zip(grads, ref_grads, "xwbh"):
            assert_close(got, want, msg=name)
        return
    # float32 gradients sum over the batch: no worse than twice PyTorch's own float32 autograd (+ 1 ulp)
    torch_inputs = [t.detach().requires_grad_() for t in (x, *params)]
    torch_grads = torch.autograd.grad(cpl_linear_ref(*torch_inputs), torch_inputs, grad)
    for got, theirs, want, name in zip(grads, torch_grads, ref_grads, "xwbh"):
        ours_err = (got.double() - want).abs().max().item()
        their_err = (theirs.double() - want).abs().max().item()
        assert ours_err <= 2 * their_err + torch.finfo(dtype).eps * want.abs().max().item(), name


@pytest.mark.parametrize("kwargs", CONV_CASES, ids=CONV_IDS)
def test_conv_gradcheck_and_reference(kwargs):
    groups = kwargs.get("groups", 1)
    w, b, h = _params(2, 2, kernel=(3, 3), groups=groups)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, w, b, h)]
    assert torch.autograd.gradcheck(lambda *a: cpl_conv2d(*a, **kwargs), inputs)
    g = ConvGeometry.create(4, (3, 3), **kwargs)
    assert_close(cpl_conv2d(*inputs, **kwargs), cpl_conv2d_ref(*inputs, g))


def test_linear_gradcheck_without_bias_and_stride_zero_grad():
    w, _, h = _params(3, 4)
    x = torch.randn(5, 4, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, w, h)]
    assert torch.autograd.gradcheck(lambda x, w, h: cpl_linear(x, w, None, h), inputs)
    out = cpl_linear(x, w, None, h)
    grad = torch.randn(1, 4, dtype=torch.float64).expand(5, 4)  # stride-0 grad_output
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(cpl_linear_ref(x, w, None, h), inputs, grad.contiguous())
    for a, b in zip(got, want):
        assert_close(a, b)


def _exact_h(w, **kwargs):
    norm = spectral_norm(dense_conv2d(w, 4, **kwargs)) if w.dim() == 4 else spectral_norm(w)
    return 2.0 / norm**2, norm


def _jacobian_norm(fn, x):
    jac = torch.autograd.functional.jacobian(fn, x)
    return spectral_norm(jac.reshape(x.numel(), x.numel()))


@pytest.mark.parametrize("seed", range(5))
def test_linear_is_one_lipschitz_with_the_exact_norm(seed, knobs):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    b = torch.randn(6, generator=g, dtype=torch.float64)
    h, _ = _exact_h(w)
    for _ in range(10):
        x = torch.randn(5, generator=g, dtype=torch.float64)
        assert _jacobian_norm(lambda x: cpl_linear(x, w, b, h), x) <= 1 + 1e-6


@pytest.fixture
def torch_backend(knobs):
    """Jacobians need one backward per output; the math is under test here, the kernels elsewhere."""
    knobs(backend="torch")


@pytest.mark.parametrize("kwargs", CONV_CASES, ids=CONV_IDS)
def test_conv_is_one_lipschitz_with_the_exact_norm(torch_backend, kwargs):
    groups = kwargs.get("groups", 1)
    w, b, _ = _params(4, 4, kernel=(3, 3), groups=groups)
    h, _ = _exact_h(w, **kwargs)
    for _ in range(3):
        x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
        assert _jacobian_norm(lambda x: cpl_conv2d(x, w, b, h, **kwargs), x) <= 1 + 1e-6


def test_an_underestimated_norm_breaks_the_guarantee(torch_backend):
    """With 0.85·‖W‖ (what a short power iteration can return), the all-active region has ‖J‖ = 2/0.85² − 1."""
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    _, norm = _exact_h(w, padding=1)
    h = 2.0 / (0.85 * norm) ** 2
    b = torch.full((4,), 1e6, dtype=torch.float64)  # every unit active: J = I − h AᵀA
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    got = _jacobian_norm(lambda x: cpl_conv2d(x, w, b, h, padding=1), x)
    assert got == pytest.approx(2 / 0.85**2 - 1, rel=1e-9)
    assert got > 1.7


@pytest.fixture
def fused_op(monkeypatch):
    """The op itself at every size (on the CPU's PyTorch path small train steps run the composite form)."""
    monkeypatch.setattr(cpl_module, "_COMPOSITE_MAX_MACS", -1)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_small_cpu_train_steps_run_the_composite_form(kind, monkeypatch, knobs):
    """Auto mode on the CPU's PyTorch path: below _COMPOSITE_MAX_MACS a differentiable call runs the functional
    form under PyTorch's autograd (recorded), above it and with a forced backend the op; both give the float64
    reference's values and gradients."""
    knobs(triton_interpret=False)
    x, w, b, h, op, reference = _small_case(kind)
    inputs = [t.detach().requires_grad_() for t in (x, w, b, h)]
    want = torch.autograd.grad(reference(*inputs).square().sum(), inputs)
    for limit, forced, ran in ((1 << 24, None, "torch-composite"), (-1, None, "torch"), (1 << 24, "torch", "torch")):
        monkeypatch.setattr(cpl_module, "_COMPOSITE_MAX_MACS", limit)
        knobs(backend=forced)
        implementations(clear=True)
        got = torch.autograd.grad(op(*inputs).square().sum(), inputs)
        assert implementations()[f"cpl_{'linear' if kind == 'linear' else 'conv2d'}"] == ran
        for g, r in zip(got, want):
            assert_close(g, r)


def test_backward_saves_the_input_and_the_hidden_activation(fused_op):
    """Count what autograd keeps: eager CPL keeps σ(p) and Aᵀσ(p) (h needs a gradient) besides x, lipkern
    x and σ(p)."""
    w, b, h = (t.requires_grad_() for t in _params(8, 4, kernel=(3, 3)))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)

    def saved_activations(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn(x, w, b, h).sum()
        return [t for t in saved if not any(t is p for p in (w, b, h)) and t.numel() >= x.numel()]

    ours = saved_activations(lambda *a: cpl_conv2d(*a, padding=1))
    eager = saved_activations(lambda *a: cpl_conv2d_ref(*a, ConvGeometry.create(6, 3, padding=1)))
    assert len(ours) == 2 and ours[0] is x and ours[1].shape == (2, 8, 6, 6)
    assert sum(t.numel() for t in ours) + x.numel() <= sum(t.numel() for t in eager)


def test_opcheck_and_compile():
    w, b, h = _params(4, 3, kernel=(3, 3))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.lipkern.cpl_conv2d.default,
                          (x, w, b, h, [1, 1], [1, 1, 1, 1], [1, 1], 1, "zeros"))
    wl, bl, hl = _params(4, 3)
    torch.library.opcheck(torch.ops.lipkern.cpl_linear.default, (x.reshape(-1, 3)[:7], wl, bl, hl))
    wr = w.clone().requires_grad_()

    def loss(w):
        return cpl_conv2d(x, w, b, h, padding=1).square().sum()

    (got,) = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(wr), wr)
    (want,) = torch.autograd.grad(loss(wr), wr)
    assert_close(got, want)


@pytest.mark.parametrize("bad, error", [
    (lambda: cpl_linear(torch.randn(2, 3), torch.randn(4, 5), None, 0.1), ValueError),
    (lambda: cpl_linear(torch.randn(2, 3), torch.randn(4, 3, dtype=torch.float64), None, 0.1), ValueError),
    (lambda: cpl_linear(torch.randn(2, 3), torch.randn(4, 3), torch.randn(3), 0.1), ValueError),
    (lambda: cpl_linear(torch.randn(2, 3), torch.randn(4, 3), None, torch.ones(2)), ValueError),
    (lambda: cpl_linear(torch.ones(2, 3, dtype=torch.int64), torch.ones(4, 3, dtype=torch.int64), None, 1),
     TypeError),
    (lambda: cpl_conv2d(torch.randn(2, 3, 5, 5), torch.randn(4, 2, 3, 3), None, 0.1), ValueError),
    (lambda: cpl_conv2d(torch.randn(3, 5, 5), torch.randn(4, 3, 3, 3), None, 0.1), ValueError),
    (lambda: cpl_conv2d(torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), None, 0.1, padding_mode="reflect"),
     ValueError),
])
def test_bad_input_raises(bad, error):
    with pytest.raises(error):
        bad()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_give_non_finite_outputs_not_an_error(value):
    """No value check (it would synchronize a training step): like the reference, a NaN/Inf weight gives a
    non-finite output (the ReLU kernels propagate NaN as torch.relu does)."""
    x = torch.randn(2, 3, 5, 5)
    w, b, h = _params(4, 3, dtype=torch.float32, kernel=(3, 3))
    w[1, 0, 1, 1] = value
    out = cpl_conv2d(x, w, b, h, padding=1)
    ref = cpl_conv2d_ref(x, w, b, h, ConvGeometry.create((5, 5), 3, padding=1))
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref)) and not torch.isfinite(out).all()
    wl, bl, hl = _params(4, 3, dtype=torch.float32)
    wl[1, 0] = value
    assert not torch.isfinite(cpl_linear(x.reshape(-1, 3)[:7], wl, bl, hl)).all()


# ----------------------------------------------------------------------------------------------------------
# Passes, convolutions and saved bytes per train step (forward + backward), against the eager layer.
# ----------------------------------------------------------------------------------------------------------
class _Ops(TorchDispatchMode):
    """aten ops below autograd: convolutions (a convolution_backward counts its computed outputs), GEMMs, and
    the other ops that write an activation-sized tensor (passes over the data)."""

    def __init__(self, activation_numel):
        super().__init__()
        self.size, self.convs, self.gemms, self.passes = activation_numel, 0, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "convolution":
            self.convs += 1
        elif name == "convolution_backward":
            self.convs += sum(args[-1])
        elif name in ("mm", "addmm", "_addmm_activation", "bmm", "addmm_"):
            self.gemms += 1
        elif not func.is_view and name not in ("empty", "empty_like", "new_empty", "empty_strided", "detach") \
                and isinstance(out, torch.Tensor) and out.numel() >= self.size:
            self.passes.append(name)
        return out


def _launches():
    from triton.runtime import interpreter, jit

    counts = []
    originals = [(cls, cls.run) for cls in (jit.JITFunction, interpreter.InterpretedFunction)]

    def patch(cls, original):
        def run(self, *args, **kwargs):
            counts.append(self.fn.__name__)
            with _disable_current_modes():  # the interpreter's own copies are not the kernel's passes
                return original(self, *args, **kwargs)
        cls.run = run

    for cls, original in originals:
        patch(cls, original)
    return counts, lambda: [setattr(cls, "run", original) for cls, original in originals]


def _step_counts(fn, inputs, size):
    counts, restore = _launches()
    grad = torch.ones_like(inputs[0])
    try:
        with _Ops(size) as ops:
            out = fn(*inputs)
            grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad)
    finally:
        restore()
    assert all(torch.isfinite(g).all() for g in grads)
    return ops, counts


@pytest.mark.parametrize("needs", ["all", "no-x", "no-weight"])
def test_conv_train_step_counts(needs, fused_op):
    """Convolutions: forward A x and Aᵀσ; backward A g, the two weight-gradient terms (only when W needs a
    gradient) and Aᵀs (only when x needs one): as many as eager autograd. Passes: 4 Triton kernels, no
    activation-sized aten op (symmetric zero padding goes to the conv; every elementwise step writes in place)."""
    w, b, h = _params(6, 4, dtype=torch.float32, kernel=(3, 3))
    x = torch.randn(2, 4, 8, 8)
    inputs = [x.requires_grad_(needs != "no-x"), w.requires_grad_(needs != "no-weight"), b.requires_grad_(),
              h.requires_grad_()]
    ours, launches = _step_counts(lambda *a: cpl_conv2d(*a, padding=1), inputs, x.numel() // 2)
    geometry = ConvGeometry.create(8, 3, padding=1)
    eager, _ = _step_counts(lambda *a: cpl_conv2d_ref(*a, geometry), inputs, x.numel() // 2)
    expected = {"all": 6, "no-x": 5, "no-weight": 4}[needs]
    assert ours.convs == expected, ours.convs
    assert eager.convs == {"all": 6, "no-x": 5, "no-weight": 4}[needs]
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert sorted(launches) == sorted(["_bias_relu_kernel", "_residual_kernel", "_backward_elementwise_kernel"]
                                          + (["_residual_kernel"] if needs != "no-x" else []))
        assert ours.passes == [], ours.passes
        assert len(eager.passes) >= 6, eager.passes  # add, relu, mul, sub; neg/mul, threshold, add, ...


def test_linear_train_step_counts(fused_op):
    """GEMMs: forward 2 (bias + ReLU in the first one's epilogue), backward 4 (A g, one buffer for both
    weight-gradient terms: mm then addmm_, Aᵀs); activation-sized passes: the backward's Triton kernel and
    the two residual kernels only."""
    w, b, h = (t.requires_grad_() for t in _params(32, 48, dtype=torch.float32))
    x = torch.randn(64, 48, requires_grad=True)
    ours, launches = _step_counts(cpl_linear, [x, w, b, h], 64 * 32)
    eager, _ = _step_counts(cpl_linear_ref, [x, w, b, h], 64 * 32)
    assert ours.gemms == 6 and eager.gemms == 6, (ours.gemms, eager.gemms)
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert sorted(launches) == ["_backward_elementwise_kernel", "_residual_kernel", "_residual_kernel"]
        assert ours.passes == [], ours.passes


def _saved_bytes(fn, inputs):
    """Bytes of the distinct storages autograd saves for the backward."""
    saved = {}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.setdefault(t.untyped_storage().data_ptr(),
                                                                             t.untyped_storage().nbytes()) and t,
                                                  lambda t: t):
        out = fn(*inputs)
    return sum(saved.values()), out


def test_saved_bytes_per_step_against_the_eager_layer(fused_op):
    """lipkern saves x, σ(p) and the parameters; eager also Aᵀσ(p) (hidden = channels: 3 activations)."""
    w, b, h = (t.requires_grad_() for t in _params(8, 8, dtype=torch.float32, kernel=(3, 3)))
    x = torch.randn(4, 8, 8, 8, requires_grad=True)
    params = sum(t.numel() * 4 for t in (w, b, h))
    ours, _ = _saved_bytes(lambda *a: cpl_conv2d(*a, padding=1), (x, w, b, h))
    eager, _ = _saved_bytes(lambda *a: cpl_conv2d_ref(*a, ConvGeometry.create(8, 3, padding=1)), (x, w, b, h))
    assert ours == 2 * x.numel() * 4 + params
    assert eager >= 3 * x.numel() * 4


# ----------------------------------------------------------------------------------------------------------
# PyTorch features combined with the ops: double backward, torch.func, autocast, low-precision dtypes.
# ----------------------------------------------------------------------------------------------------------
def _small_case(kind: str):
    """(x, w, b, h, op, reference) of a small float64 CPL case: 'linear', 'conv' or 'conv-circular'."""
    if kind == "linear":
        w, b, h = _params(5, 4)
        return (torch.randn(3, 4, dtype=torch.float64), w, b, h, cpl_linear, cpl_linear_ref)
    kwargs = dict(padding=1, padding_mode="circular" if kind == "conv-circular" else "zeros")
    w, b, h = _params(3, 2, kernel=(3, 3))
    g = ConvGeometry.create(4, 3, **kwargs)
    return (torch.randn(2, 2, 4, 4, dtype=torch.float64), w, b, h, lambda *a: cpl_conv2d(*a, **kwargs),
            lambda *a: cpl_conv2d_ref(*a, g))


@pytest.mark.parametrize("kind", ["linear", "conv", "conv-circular"])
def test_double_backward_matches_the_reference(kind):
    """A gradient penalty: ∂/∂(x, W, b, h) of ‖∂⟨z, c⟩/∂x‖² + ‖∂⟨z, c⟩/∂W‖²."""
    x, w, b, h, ours_fn, ref_fn = _small_case(kind)
    c = torch.randn_like(x)

    def penalty(fn):
        inputs = [t.detach().clone().requires_grad_() for t in (x, w, b, h)]
        gx, gw = torch.autograd.grad((fn(*inputs) * c).sum(), inputs[:2], create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gw.square().sum(), inputs)

    for got, want in zip(penalty(ours_fn), penalty(ref_fn)):
        assert_close(got, want)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_torch_func_vjp_and_jacrev(kind):
    x, w, b, h, ours_fn, ref_fn = _small_case(kind)
    jac = torch.func.jacrev(ours_fn, argnums=(0, 1, 2, 3))(x, w, b, h)
    want = torch.func.jacrev(ref_fn, argnums=(0, 1, 2, 3))(x, w, b, h)
    for a, r in zip(jac, want):
        assert_close(a, r)
    out, vjp_fn = torch.func.vjp(ours_fn, x, w, b, h)
    ct = torch.randn_like(out)
    for a, r in zip(vjp_fn(ct), torch.autograd.grad(ref_fn(*(t.requires_grad_() for t in (x, w, b, h))),
                                                     (x, w, b, h), ct)):
        assert_close(a, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_runs_the_op_in_the_dtype_of_x(dtype):
    """Under autocast the op casts weight, bias and h to x's dtype and runs with autocast off: a float32 x
    gives exactly the float32 result, a low-precision x the low-precision one."""
    w, b, h = _params(4, 3, dtype=torch.float32, kernel=(3, 3))
    x = torch.randn(2, 3, 5, 5)
    with torch.autocast("cpu", dtype):
        got = cpl_conv2d(x, w, b, h, padding=1)
        low = cpl_conv2d(x.to(dtype), w, b, h, padding=1)
    assert got.dtype == torch.float32 and torch.allclose(got, cpl_conv2d(x, w, b, h, padding=1), rtol=0, atol=0)
    assert low.dtype == dtype
    wl, bl, hl = _params(4, 3, dtype=torch.float32)
    with torch.autocast("cpu", dtype):
        lin = cpl_linear(x.reshape(-1, 3)[:6].to(dtype), wl, bl, hl.double())
    assert lin.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_forward_backward_against_float64(dtype):
    """bf16/fp16 x, weight, bias and h: no worse than twice PyTorch's own autograd in that dtype (+ a few ulp)."""
    w, b, h = _params(4, 3, dtype=torch.float64, kernel=(3, 3))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    g = ConvGeometry.create(6, 3, padding=1)
    grad = torch.randn_like(x)

    def run(fn, dt):
        inputs = [t.to(dt).requires_grad_() for t in (x, w, b, h)]
        out = fn(*inputs)
        return [out, *torch.autograd.grad(out, inputs, grad.to(dt))]

    ours = run(lambda *a: cpl_conv2d(*a, padding=1), dtype)
    theirs = run(lambda *a: cpl_conv2d_ref(*a, g), dtype)
    exact = run(lambda *a: cpl_conv2d_ref(*a, g), torch.float64)
    for got, their, want, name in zip(ours, theirs, exact, ["out", "x", "w", "b", "h"]):
        assert got.dtype == dtype
        err, their_err = ((t.double() - want).abs().max().item() for t in (got, their))
        assert err <= 2 * their_err + 4 * torch.finfo(dtype).eps * want.abs().max().item(), name
