"""lipkern.bounds: conv/linear spectral norms against the SVD of the explicit operator (papers.md §10, 23-28).
Upper bounds must hold in every generated case; estimates converge from below."""

import math
import os
from unittest import mock

import pytest
import torch

from lipkern._dispatch import configure
from hypothesis import given, settings
from hypothesis import strategies as st

from lipkern.bounds import conv2d_spectral_norm, frequency_matrices, gram_upper_bound, linear_spectral_norm
from lipkern.bounds import spectral as spectral_module
from lipkern.bounds.gram import gram_iterations_for
from tests.helpers import dense_conv2d, spectral_norm


@pytest.fixture
def torch_backend(knobs):
    """The batched power iteration runs many iterations here; the kernels are compared with the reference in
    tests/ops, so these tests of the mathematics use the PyTorch path (fast on CPU)."""
    knobs(backend="torch")


# --- Gram iteration -----------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), rank=st.integers(1, 9), log_scale=st.sampled_from(
    [-300, -170, -150, -20, 0, 20, 150, 170, 300]), complex_=st.booleans(), seed=st.integers(0, 2**16))
def test_gram_bound_is_above_the_norm(rows, cols, rank, log_scale, complex_, seed):
    """Including scales where squaring entries underflows or overflows (the SVD oracle runs at scale 1)."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.complex128 if complex_ else torch.float64
    rank = min(rank, rows, cols)
    unit = torch.randn(3, rows, rank, generator=g, dtype=dtype) @ torch.randn(3, rank, cols, generator=g, dtype=dtype)
    m = unit * 10.0**log_scale
    exact = torch.linalg.matrix_norm(unit, ord=2) * 10.0**log_scale
    bound = gram_upper_bound(m, rtol=1e-6)
    assert (bound >= exact).all(), (bound / exact - 1)
    assert (bound.max() <= exact.max() * (1 + 1e-6)), bound.max() / exact.max() - 1


@pytest.mark.parametrize("size", [2, 16, 64])
def test_gram_a_priori_iterations_reach_rtol_on_the_worst_spectrum(size):
    """All singular values equal is the slowest case for Gram iteration: the a priori step count still
    reaches the tolerance, and the bound stays above the norm."""
    q, _ = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64))
    rtol = 1e-3
    bound = gram_upper_bound(3.0 * q[None], max_iter=gram_iterations_for(size, rtol), rtol=0.0)
    assert 3.0 <= bound.item() <= 3.0 * (1 + rtol)


def test_gram_bound_of_zero_matrix_is_zero():
    assert gram_upper_bound(torch.zeros(2, 3, 4, dtype=torch.float64)).tolist() == [0.0, 0.0]


# --- Frequency matrices (Sedghi et al.) ---------------------------------------------------------------------
@pytest.mark.parametrize("k, n, dilation, groups", [(3, 5, 1, 1), (2, 4, 1, 1), (3, 6, 2, 1),
                                                     (3, 4, 1, 2)])
def test_frequency_spectrum_is_the_circular_operator_spectrum(k, n, dilation, groups):
    w = torch.randn(4, 4 // groups, k, k, dtype=torch.float64)
    dense = dense_conv2d(w, n, padding="same", padding_mode="circular", dilation=dilation, groups=groups)
    matrices, error, scale = frequency_matrices(w, (n, n), (dilation, dilation), groups)
    assert scale == 1.0
    sv = torch.linalg.svdvals(matrices).reshape(groups, n, n // 2 + 1, -1)
    # rfft half-plane: columns v and n - v are conjugate, so each counts twice except v = 0 and v = n/2
    mult = torch.full((n // 2 + 1,), 2)
    mult[0] = 1
    if n % 2 == 0:
        mult[-1] = 1
    ours = torch.cat([sv[:, :, v].flatten().repeat(int(mult[v])) for v in range(n // 2 + 1)]).sort().values
    exact = torch.linalg.svdvals(dense).sort().values
    exact = exact[-ours.numel():] if ours.numel() <= exact.numel() else exact
    torch.testing.assert_close(ours[-exact.numel():], exact, atol=1e-9, rtol=0)
    assert 0 < error < 1e-10


# --- conv2d_spectral_norm against the dense operator --------------------------------------------------------
@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    stride = draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "circular"]))
    n = draw(st.integers(max(kh, kw) * dilation, 7))
    choice = draw(st.integers(0, 2))
    if stride == 1 and choice == 0:
        padding = "same"
    elif choice == 1:
        padding = (draw(st.integers(0, min(3, n))), draw(st.integers(0, min(3, n))))
    else:  # asymmetric, possibly wider than the kernel span (then circular padding repeats pixels)
        padding = tuple(draw(st.integers(0, min(3, n))) for _ in range(4))
    return dict(c_in=c_in, c_out=c_out, k=(kh, kw), n=n,
                kwargs=dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode))


@settings(max_examples=60, deadline=None)
@given(case=conv_cases(), log_scale=st.sampled_from([-170, -3, 0, 3, 170]), seed=st.integers(0, 2**16))
def test_upper_bound_holds_and_estimate_is_below(case, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    unit = torch.randn(case["c_out"], case["c_in"] // case["kwargs"]["groups"], *case["k"], generator=g,
                       dtype=torch.float64)
    w = unit * 10.0**log_scale
    kwargs = dict(case["kwargs"])
    if isinstance(kwargs["padding"], tuple) and len(kwargs["padding"]) == 4:
        return _check_asymmetric_padding(unit, w, log_scale, case["n"], kwargs)
    try:
        exact = spectral_norm(dense_conv2d(unit, case["n"], **kwargs)) * 10.0**log_scale
    except RuntimeError:
        return  # PyTorch rejects the geometry (e.g. empty output): nothing to bound
    with configure(backend="torch"):
        result = conv2d_spectral_norm(w, case["n"], **kwargs, n_iter=300)
    assert result.upper.item() >= exact, (result.upper.item(), exact)
    assert result.estimate.item() <= exact * (1 + 1e-9)


def _check_asymmetric_padding(unit, w, log_scale, n, kwargs):
    """(top, bottom, left, right) padding, which nn.Conv2d cannot express: the oracle is F.pad (zeros or
    circular) followed by a valid F.conv2d, applied to the identity basis."""
    t, b, le, r = kwargs["padding"]
    c_in = unit.shape[1] * kwargs["groups"]
    basis = torch.eye(c_in * n * n, dtype=torch.float64).reshape(-1, c_in, n, n)
    mode = "constant" if kwargs["padding_mode"] == "zeros" else "circular"
    try:
        out = torch.nn.functional.conv2d(torch.nn.functional.pad(basis, (le, r, t, b), mode=mode), unit,
                                         stride=kwargs["stride"], dilation=kwargs["dilation"],
                                         groups=kwargs["groups"])
    except RuntimeError:
        return  # empty output: nothing to bound
    exact = spectral_norm(out.reshape(basis.shape[0], -1).T) * 10.0**log_scale
    with configure(backend="torch"):
        result = conv2d_spectral_norm(w, n, **kwargs, n_iter=300)
    assert result.upper.item() >= exact, (result.upper.item(), exact)
    assert result.estimate.item() <= exact * (1 + 1e-9)


CIRCULAR_EXACT = [  # circular, stride 1, output as large as the input: 'fft' is exact
    (3, 4, (3, 3), 5, dict(padding=1)),
    (2, 2, (2, 2), 6, dict(padding="same")),
    (4, 4, (3, 3), 6, dict(padding=2, dilation=2, groups=2)),
    (3, 5, (1, 3), (4, 7), dict(padding=(0, 1))),
    (2, 3, (5, 5), 3, dict(padding=2)),  # kernel wraps around the input
    (3, 4, (3, 3), 6, dict(padding=1, stride=2)),  # strided: aliased frequency blocks
    (2, 3, (2, 3), (6, 9), dict(padding=(0, 1), stride=(2, 3), groups=1)),
    (4, 2, (3, 3), 4, dict(padding=2, stride=2, groups=2, dilation=2)),
]


@pytest.mark.parametrize("c_in, c_out, k, n, kwargs", CIRCULAR_EXACT)
def test_fft_is_exact_for_circular_convolutions(torch_backend, c_in, c_out, k, n, kwargs):
    w = torch.randn(c_out, c_in // kwargs.get("groups", 1), *k, dtype=torch.float64)
    exact = spectral_norm(dense_conv2d(w, n, padding_mode="circular", **kwargs))
    result = conv2d_spectral_norm(w, n, padding_mode="circular", method="fft", rtol=1e-9, **kwargs)
    assert abs(result.estimate.item() / exact - 1) <= 1e-6
    assert exact <= result.upper.item() <= exact * (1 + 1e-6)
    auto = conv2d_spectral_norm(w, n, padding_mode="circular", **kwargs)
    assert exact <= auto.upper.item() <= exact * 1.01  # the documented default (rtol=1e-4) is within 1%


def test_fft_path_through_the_triton_kernel():
    w = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    exact = spectral_norm(dense_conv2d(w, 4, padding=1, padding_mode="circular"))
    with mock.patch.object(spectral_module, "_EIGENSOLVER_MAX_SIDE", 0):  # the power iteration, not LAPACK
        result = conv2d_spectral_norm(w, 4, padding=1, padding_mode="circular", method="fft", rtol=1e-8,
                                      n_iter=400)
    assert exact <= result.upper.item() <= exact * (1 + 1e-8)
    assert abs(result.estimate.item() / exact - 1) <= 1e-6


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.complex64, 1e-5),
                                         (torch.complex128, 1e-12)])
@pytest.mark.parametrize("shape", [(5, 7, 4), (3, 4, 9), (2, 6, 6)])
def test_largest_singular_value_matches_a_dense_svd(torch_backend, shape, dtype, rtol):
    """Both routes of largest_singular_value against float64 / complex128 SVDs: the CPU eigensolver (exact to
    rounding) and the batched power iteration (an estimate from below, converged here)."""
    m = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(sum(shape)))
    exact = torch.linalg.matrix_norm(m.to(torch.complex128), ord=2).max().item()
    assert spectral_module._eigensolver_fits(m)
    assert abs(spectral_module.largest_singular_value(m).item() / exact - 1) <= rtol
    with mock.patch.object(spectral_module, "_EIGENSOLVER_MAX_SIDE", 0):
        by_power = spectral_module.largest_singular_value(m, n_iter=3000).item()
    assert exact * (1 - 1e-3) <= by_power <= exact * (1 + 10 * rtol)


@pytest.mark.parametrize("n, kwargs", [(5, dict(padding=1)), (6, dict(padding="same")), (6, dict(padding=2)),
                                       (5, dict(padding=1, stride=2))])
def test_zero_padding_bound_is_the_circular_norm_on_the_enlarged_input(torch_backend, n, kwargs):
    """‖A_zero(n)‖ ≤ ‖A_circ(N)‖ for N = n + max(pad): the bound holds and is at most that circular norm
    (small operators get the explicit matrix's tighter certificate)."""
    k = 4 if kwargs.get("padding") == "same" else 3
    w = torch.randn(3, 2, k, k, dtype=torch.float64)
    zero = spectral_norm(dense_conv2d(w, n, **kwargs))
    big_n = n + (k // 2 if kwargs.get("padding") == "same" else kwargs["padding"])
    circular = spectral_norm(dense_conv2d(w, big_n, padding="same", padding_mode="circular"))
    result = conv2d_spectral_norm(w, n, **kwargs)
    assert zero <= result.upper.item() <= circular * (1 + 1e-4)
    assert abs(result.estimate.item() / zero - 1) <= 1e-4


@settings(max_examples=25, deadline=None)
@given(c_in=st.integers(1, 6), c_out=st.integers(1, 6), k=st.integers(1, 4), n=st.integers(3, 9),
       padding=st.integers(0, 2), stride=st.integers(1, 2), dilation=st.integers(1, 2),
       circular=st.booleans(), seed=st.integers(0, 2**16))
def test_small_operators_are_bounded_within_1e_4(c_in, c_out, k, n, padding, stride, dilation, circular, seed):
    """Where the explicit operator is small (in·out ≤ DENSE_LIMIT): exact ≤ upper ≤ exact·(1 + 1e-4), any
    padding (the circular embedding alone is 2-4% above the zero-padded norm at n = 8)."""
    if (k - 1) * dilation + 1 > n + 2 * padding or (circular and padding > n):
        return
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64)
    kwargs = dict(padding=padding, stride=stride, dilation=dilation,
                  padding_mode="circular" if circular else "zeros")
    exact = spectral_norm(dense_conv2d(w, n, **kwargs))
    upper = conv2d_spectral_norm(w, n, method="upper", **kwargs).upper.item()
    assert exact <= upper <= exact * (1 + 1e-4) + 1e-300, (upper / exact - 1)


def test_the_issues_case_and_certified_layers_are_within_1e_4(torch_backend):
    """One zero-padded 3×3 conv, 16 channels at n = 8 (1,024 columns; the circular embedding's bound was 3.5%
    above): bound, certified SpectralConv2d divisor and certified CPLConv2d step h within 1e-4 of the exact
    ‖A‖ and 2/‖A‖² (dense SVD)."""
    from lipkern.nn import CPLConv2d, SpectralConv2d

    torch.manual_seed(0)
    w = torch.randn(16, 16, 3, 3) / 12
    exact = spectral_norm(dense_conv2d(w.double(), 8, padding=1))
    upper = conv2d_spectral_norm(w, 8, padding=1).upper.item()
    assert exact <= upper <= exact * (1 + 1e-4)
    spectral = SpectralConv2d(16, 16, 3, padding=1, input_size=8, certified=True).eval()
    cpl = CPLConv2d(16, input_size=8, certified=True).eval()
    with torch.no_grad():
        spectral.weight.copy_(w)
        cpl.weight.copy_(w)
    divisor = spectral._eval_sigma().item()
    assert exact <= divisor <= exact * (1 + 1e-4)
    step = cpl._eval_step_size().item()
    assert 2 / exact**2 * (1 - 1e-4) <= step <= 2 / exact**2


@pytest.mark.parametrize("c_in, c_out, n, k, kwargs", [
    (4, 4, 24, 3, dict(padding=1)),                        # 2,304 columns: the band of the input side's Gram
    (16, 16, 16, 4, dict(padding=1, stride=2)),            # 4,096 → 1,024: the output side's Gram
    (3, 5, 20, 3, dict(padding=(2, 0), dilation=2)),       # asymmetric padding, dilation
])
def test_operators_beyond_the_dense_limit_are_bounded_within_1e_6(torch_backend, c_in, c_out, n, k, kwargs):
    """in·out > DENSE_LIMIT: the probed Gram certificate (lipkern.bounds.probing), not the circular embedding
    (≥ 0.5% above at these sizes): exact ≤ upper ≤ exact·(1 + 1e-6); a certified CPLConv2d's step likewise."""
    from lipkern.bounds import spectral as spectral_module
    from lipkern.nn import CPLConv2d

    torch.manual_seed(1)
    w = torch.randn(c_out, c_in, k, k, dtype=torch.float64) / k
    dense = dense_conv2d(w, n, **kwargs)
    assert dense.numel() > spectral_module.DENSE_LIMIT["cpu"]
    exact = spectral_norm(dense)
    upper = conv2d_spectral_norm(w, n, method="upper", **kwargs).upper.item()
    assert exact <= upper <= exact * (1 + 1e-6)
    if c_in == c_out and kwargs == dict(padding=1):
        cpl = CPLConv2d(c_in, input_size=n, certified=True).double().eval()
        with torch.no_grad():
            cpl.weight.copy_(w)
        assert 2 / exact**2 * (1 - 1e-6) <= cpl._eval_step_size().item() <= 2 / exact**2


def test_circular_norm_at_the_same_size_is_not_a_zero_padding_bound():
    """papers.md §10 check 27: there are kernels whose zero-padded norm exceeds the circular one at equal n,
    which is why the zero-padding bound uses the enlarged circular operator."""
    g = torch.Generator().manual_seed(0)
    found = 0
    for _ in range(300):
        w = torch.randn(1, 1, 3, 3, generator=g, dtype=torch.float64)
        zero = spectral_norm(dense_conv2d(w, 4, padding=1))
        circular = spectral_norm(dense_conv2d(w, 4, padding=1, padding_mode="circular"))
        found += zero > circular * (1 + 1e-9)
    assert found > 0


def test_methods_return_what_they_promise(torch_backend):
    w = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    assert conv2d_spectral_norm(w, 5, padding=1, method="power").upper is None
    assert conv2d_spectral_norm(w, 5, padding=1, method="upper").estimate is None
    with pytest.raises(ValueError, match="fft"):
        conv2d_spectral_norm(w, 5, padding=1, method="fft")  # zero padding: not a circular convolution
    with pytest.raises(ValueError, match="fft"):
        conv2d_spectral_norm(w, 5, padding=1, stride=2, padding_mode="circular", method="fft")  # 2 ∤ 5


def test_power_estimate_is_differentiable_and_warm_starts(torch_backend):
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 5, 5, dtype=torch.float64)
    u_start = u.clone()
    est = conv2d_spectral_norm(w, 5, padding=1, method="power", u=u, n_iter=50).estimate
    (grad,) = torch.autograd.grad(est, w)
    assert grad.abs().sum() > 0
    assert not torch.equal(u, u_start)


@pytest.mark.parametrize("bad, error", [
    (lambda: conv2d_spectral_norm(torch.randn(3, 3, 3), 5), ValueError),
    (lambda: conv2d_spectral_norm(torch.ones(3, 3, 3, 3, dtype=torch.int32), 5), TypeError),
    (lambda: conv2d_spectral_norm(torch.full((3, 3, 3, 3), float("nan")), 5), ValueError),
    (lambda: conv2d_spectral_norm(torch.randn(3, 3, 3, 3), 5, method="svd"), ValueError),
    (lambda: conv2d_spectral_norm(torch.randn(3, 3, 3, 3), 5, groups=2), ValueError),
    (lambda: conv2d_spectral_norm(torch.randn(3, 3, 3, 3), 2), ValueError),
    (lambda: conv2d_spectral_norm(torch.randn(3, 3, 3, 3), 5, padding_mode="reflect"), ValueError),
    (lambda: linear_spectral_norm(torch.randn(3, 3, 3)), ValueError),
])
def test_bad_input_raises(bad, error):
    with pytest.raises(error):
        bad()


# --- linear -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (5, 7), (32, 32)])
def test_linear_spectral_norm(shape):
    w = torch.randn(shape, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(w, ord=2).item()
    result = linear_spectral_norm(w, rtol=1e-10, n_iter=5000)
    assert exact <= result.upper.item() <= exact * (1 + 1e-9)
    assert math.isclose(result.estimate.item(), exact, rel_tol=1e-6)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_gram_bound_rejects_non_finite_matrices(value):
    """A NaN matrix used to get the 'guaranteed' bound 0 (issue: nothing silently wrong): a clear error now."""
    m = torch.ones(2, 3, 3)
    m[1, 0, 2] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        gram_upper_bound(m)
