"""lipkern.ops.aol_rescale: properties (papers.md §10 checks 1-4), kernels vs reference, autograd, op boundary."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lipkern.ops import aol_rescale, aol_rescale_ref
from tests.helpers import assert_close, spectral_norm

# (weight shape, groups): linear, odd sizes, non-square kernels, groups, channel counts around tile edges.
SHAPES = [
    ((1, 1), 1),
    ((3, 5), 1),
    ((5, 3), 1),
    ((127, 17), 1),
    ((7, 3, 3, 3), 1),
    ((3, 7, 3, 3), 1),
    ((16, 17, 3, 3), 1),
    ((8, 3, 3, 2), 2),
    ((6, 2, 1, 3), 3),
    ((33, 20, 1, 1), 1),
]
IDS = [f"{'x'.join(map(str, s))}-g{g}" for s, g in SHAPES]


def _gram_scale_float64(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """d from the explicit formula of the paper's code: conv2d(Wᵀ, Wᵀ, padding=k-1).abs().sum(), per group."""
    w = weight.double() if weight.dim() == 4 else weight.double()[:, :, None, None]
    out_g = w.shape[0] // groups
    scales = []
    for g in range(groups):
        wt = w[g * out_g:(g + 1) * out_g].transpose(0, 1)
        r = F.conv2d(wt, wt, padding=(w.shape[2] - 1, w.shape[3] - 1)).abs().sum((1, 2, 3))
        scales.append(torch.where(r > 0, r.rsqrt(), torch.zeros_like(r)))
    return torch.stack(scales)


def _conv_matrix(weight: torch.Tensor, n: int, padding_mode: str, groups: int = 1) -> torch.Tensor:
    """Explicit matrix of the stride-1 'same'-size conv on n×n inputs, zero or circular padding."""
    c_in = weight.shape[1] * groups
    kh, kw = weight.shape[-2:]
    eye = torch.eye(c_in * n * n, dtype=torch.float64).reshape(-1, c_in, n, n)
    pad = (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2)
    if padding_mode == "circular":
        out = F.conv2d(F.pad(eye, pad, mode="circular"), weight.double(), groups=groups)
    else:
        out = F.conv2d(F.pad(eye, pad), weight.double(), groups=groups)
    return out.reshape(c_in * n * n, -1).T


# --- papers.md §10, AOL checks 1-4 -------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 12), inp=st.integers(1, 12), log_scale=st.floats(-2, 1), seed=st.integers(0, 2**16))
def test_rescaled_matrix_has_norm_at_most_one(out, inp, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=torch.float64) * 10**log_scale
    assert spectral_norm(aol_rescale(w)) <= 1 + 1e-9


def test_orthonormal_columns_are_left_unchanged():
    q, _ = torch.linalg.qr(torch.randn(9, 5, dtype=torch.float64))
    assert_close(aol_rescale(q), q)


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
@pytest.mark.parametrize("n", [3, 5, 8])
def test_rescaled_conv_operator_has_norm_at_most_one(padding_mode, n):
    for kernel in ((4, 3, 3, 3), (3, 2, 2, 2), (2, 2, 3, 1)):
        w = torch.randn(kernel, dtype=torch.float64) * 3
        norm = spectral_norm(_conv_matrix(aol_rescale(w), n, padding_mode))
        assert norm <= 1 + 1e-9, (kernel, norm)


@pytest.mark.parametrize("shape,groups", SHAPES, ids=IDS)
def test_scale_matches_explicit_gram_formula_float64(shape, groups):
    w = torch.randn(shape, dtype=torch.float64)
    out, scale = aol_rescale(w, groups, return_scale=True)
    expected = _gram_scale_float64(w, groups)
    assert_close(scale, expected)
    per_channel = expected.repeat_interleave(w.shape[0] // groups, 0)
    assert_close(out, w * (per_channel if w.dim() == 2 else per_channel[:, :, None, None]))


# --- kernels (Triton interpreter) vs reference -------------------------------------------------------------
@pytest.mark.parametrize("shape,groups", SHAPES, ids=IDS)
def test_forward_backward_match_reference_float32(shape, groups):
    w64 = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(shape, dtype=torch.float64)
    ref = aol_rescale_ref(w64, groups)
    (ref_grad,) = torch.autograd.grad(ref, w64, grad)

    w32 = w64.detach().float().requires_grad_()
    out = aol_rescale(w32, groups)
    (out_grad,) = torch.autograd.grad(out, w32, grad.float())
    assert out.dtype == torch.float32
    assert_close(out, ref, msg="forward")
    assert_close(out_grad, ref_grad, dtype=torch.float32, msg="backward")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape,groups", [((5, 3, 3, 3), 1), ((4, 2, 2, 3), 2), ((4, 6), 1)])
def test_both_backends_match_autograd_of_reference_float64(monkeypatch, backend, shape, groups):
    monkeypatch.setenv("LIPKERN_BACKEND", backend)
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out, scale = aol_rescale(w, groups, return_scale=True)
    ref, ref_scale = aol_rescale_ref(w, groups, return_scale=True)
    g_out, g_scale = torch.randn_like(out), torch.randn_like(scale)
    got = torch.autograd.grad((out * g_out).sum() + (scale * g_scale).sum(), w)[0]
    want = torch.autograd.grad((ref * g_out).sum() + (ref_scale * g_scale).sum(), w)[0]
    assert_close(out, ref)
    assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_twice_pytorch(dtype):
    w64 = torch.randn(12, 5, 3, 3, dtype=torch.float64)
    ref = aol_rescale_ref(w64)
    ours = aol_rescale(w64.to(dtype))
    assert ours.dtype == dtype
    # PyTorch on the same low-precision weights: the paper's formula in float32, rounded once to `dtype`.
    w = w64.to(dtype).float()
    wt = w.transpose(0, 1)
    r = F.conv2d(wt, wt, padding=2).abs().sum((1, 2, 3))
    theirs = (w * r.rsqrt()[None, :, None, None]).to(dtype)
    assert_close(ours, ref, dtype=dtype, same_dtype_torch=theirs)


def test_zero_columns_stay_zero_without_nan():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        w[:, 1] = 0
    out, scale = aol_rescale(w, return_scale=True)
    assert torch.all(out[:, 1] == 0) and scale[0, 1] == 0
    (grad,) = torch.autograd.grad(out.square().sum(), w)
    assert torch.isfinite(grad).all()
    (ref_grad,) = torch.autograd.grad(aol_rescale_ref(w).square().sum(), w)
    assert_close(grad, ref_grad)


def test_all_zero_weight():
    w = torch.zeros(3, 2, 3, 3)
    assert torch.equal(aol_rescale(w), w)


def test_non_contiguous_weight():
    base = torch.randn(10, 8, 3, 3, dtype=torch.float64)
    w = base[::2, 1:6]
    assert not w.is_contiguous()
    assert_close(aol_rescale(w), aol_rescale_ref(w.contiguous()))


def test_stride_zero_grad_output():
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(aol_rescale(w).sum(), w)  # sum() hands backward an expanded (stride-0) grad
    (ref_grad,) = torch.autograd.grad(aol_rescale_ref(w).sum(), w)
    assert_close(grad, ref_grad)


# --- autograd and op boundary ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,groups", [((3, 2, 2, 2), 1), ((4, 1, 3, 2), 2), ((3, 4), 1)])
def test_gradcheck_float64(shape, groups):
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: aol_rescale(x, groups), (w,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: aol_rescale(x, groups, return_scale=True)[1], (w,),
                                    fast_mode=True)


@pytest.mark.parametrize("groups", [1, 2])
def test_opcheck(groups):
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.lipkern.aol_rescale.default, (w, groups))


def test_compile_fullgraph():
    w = torch.randn(6, 4, 3, 3, requires_grad=True)

    def loss(x):
        return aol_rescale(x, 2).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    (got,) = torch.autograd.grad(compiled(w), w)
    (want,) = torch.autograd.grad(aol_rescale_ref(w, 2).square().sum(), w)
    assert_close(got, want.double(), dtype=torch.float32)


# --- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight,groups,error,match", [
    (torch.randn(3), 1, ValueError, "linear weight"),
    (torch.randn(2, 3, 3), 1, ValueError, "linear weight"),
    (torch.randn(6, 2, 3, 3), 4, ValueError, "does not divide"),
    (torch.randn(6, 2, 3, 3), 0, ValueError, "positive int"),
    (torch.randn(6, 2), 2, ValueError, "conv weights only"),
    (torch.randint(0, 3, (4, 4)), 1, TypeError, "float16, bfloat16"),
    (torch.randn(0, 4), 1, ValueError, "empty"),
    (torch.tensor([[1.0, float("nan")]]), 1, ValueError, "NaN or Inf"),
    (torch.tensor([[1.0, float("inf")]]), 1, ValueError, "NaN or Inf"),
])
def test_bad_input_raises_clear_error(weight, groups, error, match):
    with pytest.raises(error, match=match):
        aol_rescale(weight, groups)


def test_finite_check_can_be_disabled(monkeypatch):
    monkeypatch.setenv("LIPKERN_CHECK_FINITE", "0")
    out = aol_rescale(torch.tensor([[1.0, float("nan")]]))
    assert torch.isnan(out).any()


# --- GPU: what the interpreter cannot show (TF32, bf16 tl.dot, races, out-of-bounds) ----------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,groups", [((64, 64, 3, 3), 1), ((256, 128, 3, 3), 2), ((127, 33, 1, 5), 1),
                                          ((512, 512), 1)])
def test_gpu_kernels_match_reference(monkeypatch, backend, dtype, shape, groups):
    import lipkern

    if backend == "cuda" and not lipkern.cuda_extension_available():
        pytest.skip("lipkern._C not built")
    monkeypatch.setenv("LIPKERN_BACKEND", backend)
    w64 = torch.randn(shape, dtype=torch.float64, device="cuda", requires_grad=True)
    g64 = torch.randn(shape, dtype=torch.float64, device="cuda")
    ref = aol_rescale_ref(w64, groups)
    (ref_grad,) = torch.autograd.grad(ref, w64, g64)
    w = w64.detach().to(dtype).requires_grad_()
    out = aol_rescale(w, groups)
    (grad,) = torch.autograd.grad(out, w, g64.to(dtype))
    if dtype == torch.float32:
        assert_close(out, ref)
        assert_close(grad, ref_grad, dtype=torch.float32)
    else:
        same = aol_rescale_ref(w64.detach().to(dtype), groups)  # upcasts internally, rounds at the end
        assert_close(out, ref, dtype=dtype, same_dtype_torch=same)
        assert (grad.double() - ref_grad).norm() <= 0.05 * ref_grad.norm()


@pytest.mark.gpu
def test_gpu_operator_norm_at_most_one_float32():
    w = torch.randn(32, 32, 3, 3, device="cuda") * 5
    norm = spectral_norm(_conv_matrix(aol_rescale(w).cpu(), 6, "zeros"))
    assert norm <= 1 + 1e-5
    assert math.isfinite(norm)
