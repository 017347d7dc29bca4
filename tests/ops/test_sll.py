"""lipkern.ops.sll: the SLL residual ops against the paper's formula in float64 with T from the explicit operator,
gradients by finite differences (x, W, b and log_q), double backward, torch.compile / torch.func on the op path,
the guaranteed scale below the exact one, and clear errors for bad input."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from lipkern.ops import sll_conv2d, sll_conv2d_ref, sll_guaranteed_scale, sll_linear, sll_linear_ref, sll_scale
from tests.helpers import assert_close
from tests.nn.test_sll_layers import _reference_scale

CASES = [  # (weight shape, x shape, padding_mode)
    ((5, 4), (3, 4), "zeros"),
    ((3, 2, 3, 3), (2, 2, 5, 5), "zeros"),
    ((4, 3, 2, 2), (2, 3, 4, 5), "circular"),
    ((2, 3, 3, 1), (1, 3, 6, 3), "zeros"),
]
IDS = ["linear", "conv3x3", "conv2x2-circular", "conv3x1"]


@pytest.fixture(params=["op", "composite"])
def path(request, monkeypatch):
    """The CPL op (fused forward, input-only backward) or, as small CPU steps run, the formula directly."""
    cpl = importlib.import_module("lipkern.ops.cpl")
    monkeypatch.setattr(cpl, "_COMPOSITE_MAX_MACS", -1 if request.param == "op" else 1 << 40)
    return request.param


def _inputs(case, seed=0, dtype=torch.float64):
    weight_shape, x_shape, mode = case
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(weight_shape, generator=g, dtype=dtype) / weight_shape[1] ** 0.5
    bias = torch.randn(weight_shape[0], generator=g, dtype=dtype)
    log_q = torch.rand(weight_shape[0], generator=g, dtype=dtype) * 4 - 2
    x = torch.randn(x_shape, generator=g, dtype=dtype)
    return x, weight, bias, log_q, mode


def _op(x, weight, bias, log_q, mode):
    return sll_linear(x, weight, bias, log_q) if weight.dim() == 2 else sll_conv2d(x, weight, bias, log_q, mode)


def _reference(x, weight, bias, log_q, mode):
    scale = _reference_scale(SimpleNamespace(weight=weight, log_q=log_q), None)
    if weight.dim() == 2:
        return x - (torch.relu(x @ weight.T + bias) * scale) @ weight
    # the conv and its adjoint as explicit dense matrices (circular: the dense operator of the padded conv)
    from tests.helpers import dense_conv2d

    kh, kw = weight.shape[-2:]
    n, m = x.shape[-2:]
    if mode == "circular":
        rows = (torch.arange(n + kh - 1) - (kh - 1) // 2) % n
        cols = (torch.arange(m + kw - 1) - (kw - 1) // 2) % m
        full = dense_conv2d(weight, (n + kh - 1, m + kw - 1))
        embed = torch.zeros((weight.shape[1], n + kh - 1, m + kw - 1, weight.shape[1], n, m), dtype=weight.dtype)
        for c in range(weight.shape[1]):
            for i, r in enumerate(rows):
                for j, s in enumerate(cols):
                    embed[c, i, j, c, r, s] = 1
        a = full @ embed.reshape(full.shape[1], -1)
    else:
        a = dense_conv2d(weight, (n, m), padding="same")
    pre = x.reshape(x.shape[0], -1) @ a.T + bias.repeat_interleave(n * m)
    hidden = torch.relu(pre) * scale.repeat_interleave(n * m)
    return x - (hidden @ a).reshape(x.shape)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_ops_equal_the_papers_formula_with_the_explicit_operator(case, path):
    x, weight, bias, log_q, mode = _inputs(case)
    assert_close(_op(x, weight, bias, log_q, mode), _reference(x, weight, bias, log_q, mode))
    scale = _reference_scale(SimpleNamespace(weight=weight, log_q=log_q), None)
    assert_close(sll_scale(weight, log_q), scale)
    ref = sll_linear_ref(x, weight, bias, scale) if weight.dim() == 2 else sll_conv2d_ref(x, weight, bias, scale,
                                                                                         padding_mode=mode)
    assert_close(ref, _reference(x, weight, bias, log_q, mode))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_and_second_derivatives_by_finite_differences(case, path):
    """∂ with respect to x, W, b and log_q (q's gradient is non-zero: it is effective), and the double backward."""
    x, weight, bias, log_q, mode = _inputs(case)
    args = [t.clone().requires_grad_(True) for t in (x, weight, bias, log_q)]
    fn = lambda *a: _op(*a, mode)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
    (grad_q,) = torch.autograd.grad(fn(*args).square().sum(), args[3])
    assert grad_q.abs().max() > 1e-6


def test_torch_compile_and_torch_func_on_the_op_path(monkeypatch):
    cpl = importlib.import_module("lipkern.ops.cpl")
    monkeypatch.setattr(cpl, "_COMPOSITE_MAX_MACS", -1)
    x, weight, bias, log_q, mode = _inputs(CASES[1], dtype=torch.float32)
    compiled = torch.compile(lambda *a: sll_conv2d(*a, mode), fullgraph=True)
    assert_close(compiled(x, weight, bias, log_q), sll_conv2d(x, weight, bias, log_q, mode))
    xl, wl, bl, ql, _ = _inputs(CASES[0])

    def paper(w):  # the paper's formula, differentiable in W through T
        q = ql.exp()
        scale = 2 / (((w @ w.T).abs() @ q) / q)
        return xl - (torch.relu(xl @ w.T + bl) * scale) @ w

    jac = torch.func.jacrev(lambda w: sll_linear(xl, w, bl, ql))(wl)
    assert_close(jac, torch.autograd.functional.jacobian(paper, wl))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_guaranteed_scale_is_below_the_exact_one_and_close(case, dtype):
    _, weight, _, log_q, _ = _inputs(case, dtype=dtype)
    exact = _reference_scale(SimpleNamespace(weight=weight.double(), log_q=log_q.double()), None)
    guaranteed = sll_guaranteed_scale(weight, log_q)
    assert guaranteed.dtype == dtype
    assert (guaranteed.double() <= exact).all()
    # the float64 margin (≈ 2γ_n·Σ|W||W|ᵀ plus the sums' γ: ≤ 1e-12 here), then one rounding down to the dtype
    slack = 1e-12 + (2 * torch.finfo(dtype).eps if dtype == torch.float32 else 0)
    assert (guaranteed.double() >= exact * (1 - slack)).all()
    weight[0] = 0
    assert sll_guaranteed_scale(weight, log_q)[0] == 0 and sll_scale(weight, log_q)[0] == 0


def test_a_scale_beyond_float64_switches_the_unit_off():
    """Rows whose Gram sums underflow (float64 weights ~1e-157): 2/t overflows; s = 0 (the identity, safe), not
    Inf (which would break s ≤ 2/t and make the layer's output NaN)."""
    from lipkern.nn import SLLLinear

    layer = SLLLinear(4, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.mul_(1e-157)
    scale = sll_guaranteed_scale(layer.weight, layer.log_q)
    assert torch.isfinite(scale).all() and (scale == 0).all()
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.isfinite(layer.eval()(x)).all() and torch.isfinite(layer.to_vanilla().scale).all()


@pytest.mark.parametrize("call, error, message", [
    (lambda: sll_linear(torch.randn(2, 4), torch.randn(5, 3), None, torch.zeros(5)), ValueError, "x"),
    (lambda: sll_linear(torch.randn(2, 4), torch.randn(5, 4), None, torch.zeros(4)), ValueError, "log_q"),
    (lambda: sll_linear(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(4), torch.zeros(5)), ValueError, "bias"),
    (lambda: sll_conv2d(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3), None, torch.zeros(3), "reflect"),
     ValueError, "padding_mode"),
    (lambda: sll_conv2d(torch.randn(1, 3, 4, 4), torch.randn(3, 2, 3, 3), None, torch.zeros(3)), ValueError, "x"),
    (lambda: sll_scale(torch.randn(3, 2, 3), torch.zeros(3)), ValueError, "weight"),
    (lambda: sll_scale(torch.randn(3, 2), torch.zeros(3, dtype=torch.float64)), ValueError, "log_q"),
    (lambda: sll_guaranteed_scale(torch.ones(3, 2, dtype=torch.int64), torch.zeros(3)), TypeError, "floating"),
])
def test_bad_input_raises_clearly(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("shape", [(3, 2, 3, 3), (5, 4, 1, 1), (2, 6, 2, 3), (4, 3, 3, 1), (6, 3, 5, 5)], ids=str)
def test_cpu_abs_gram_sums_equal_the_kernels_self_convolution(shape):
    """The CPU's Σ_s |ktk_s| by GEMMs (pairs of taps, then a 0/1 matrix per shift) equals the convolution of the
    kernel with itself (the definition), values and gradients, in float64."""
    from lipkern.ops.sll import abs_gram_sums

    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    probe = torch.rand(shape[0], shape[0], dtype=torch.float64)
    kh, kw = shape[2:]
    want = torch.nn.functional.conv2d(weight, weight, padding=(kh - 1, kw - 1)).abs().sum(dim=(2, 3))
    got = abs_gram_sums(weight)
    assert_close(got, want)
    (grad_got,) = torch.autograd.grad((got * probe).sum(), weight)
    (grad_want,) = torch.autograd.grad((want * probe).sum(), weight)
    assert_close(grad_got, grad_want)
