"""The Cholesky certificate of the conv upper bound (lipkern.bounds.certificate) and the Lanczos estimate.

The certificate must accept only what it can prove: whenever fl-Cholesky of fl(λ₀I − fl(AᴴA)) succeeds, the
certified bound is ≥ ‖A‖₂² (exact rational oracles where possible), and it must reject λ₀ clearly below σ²
(so it can fail). Conv bounds must stay ≥ the dense-operator norm whether the certificate, its retries or
the Gram fallback produce them."""

import contextlib
import os
from unittest import mock

import pytest
import torch

from lipkern._dispatch import configure
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import lipkern.bounds.certificate as certificate
from lipkern.bounds import conv2d_spectral_norm, frequency_matrices
from lipkern.bounds.certificate import (
    FrequencyBlocks,
    certified_square_bound,
    certify_max_norm,
    cholesky_certificate,
    refined_estimate,
)
from tests.bounds.test_spectral import conv_cases
from tests.helpers import dense_conv2d, spectral_norm

TORCH = {"backend": "torch"}


def _random(shape, rank, complex_, generator):
    dtype = torch.complex128 if complex_ else torch.float64
    b, m, n = shape
    rank = max(1, min(rank, m, n))
    return torch.randn(b, m, rank, generator=generator, dtype=dtype) @ torch.randn(b, rank, n, generator=generator,
                                                                                  dtype=dtype)


# --- the certificate on single matrices -----------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), rank=st.integers(1, 12), complex_=st.booleans(),
       log2_scale=st.integers(-40, 40), seed=st.integers(0, 2**16))
def test_certificate_accepts_above_and_rejects_below_sigma_squared(m, n, rank, complex_, log2_scale, seed):
    """λ₀ = σ²(1 + 1e-6) is accepted (a relative gap far above the rounding), λ₀ = σ²(1 − 1e-6) is rejected;
    acceptance there would contradict the theorem, since its bound is then below σ²."""
    g = torch.Generator().manual_seed(seed)
    a = _random((3, m, n), rank, complex_, g) * 2.0**log2_scale
    sigma2 = torch.linalg.matrix_norm(a, ord=2) ** 2
    assert cholesky_certificate(a, sigma2 * (1 + 1e-6)).all()
    below = sigma2 * (1 - 1e-6)
    assert (certified_square_bound(below, m, n) < sigma2).all()
    assert not cholesky_certificate(a, below).any()


@pytest.mark.parametrize("complex_", [False, True])
def test_certificate_is_sound_at_the_boundary_of_rank_one_integer_matrices(complex_):
    """A = x yᴴ with small integers: σ² = ‖x‖²‖y‖² exactly. Sweep λ₀ across σ² in steps of a few ulps (K is
    then singular or nearly so): whenever the Cholesky succeeds, the certified bound is ≥ σ² (exactly)."""
    g = torch.Generator().manual_seed(0)
    for m, n in [(1, 1), (3, 2), (7, 7), (16, 5), (40, 40)]:
        x = torch.randint(-5, 6, (m,), generator=g).double()
        y = torch.randint(-5, 6, (n,), generator=g).double()
        x[0] = y[0] = 3.0  # not zero
        if complex_:
            x = torch.complex(x, torch.randint(-5, 6, (m,), generator=g).double())
            y = torch.complex(y, torch.randint(-5, 6, (n,), generator=g).double())
        a = (x[:, None] * y.conj()[None, :])[None]
        sigma2 = float((x.abs() ** 2).sum() * (y.abs() ** 2).sum())  # integers: exact
        accepted = 0
        for k in range(-64, 65, 4):
            lam = torch.tensor(sigma2 * (1 + k * 2.0**-50), dtype=torch.float64)
            if cholesky_certificate(a, lam).item():
                accepted += 1
                assert certified_square_bound(lam, m, n).item() >= sigma2, (m, n, k)
        assert accepted > 0  # the sweep reaches the accepting side


@pytest.mark.parametrize("complex_", [False, True])
def test_certificate_on_near_singular_and_rank_deficient_stacks(complex_):
    """Zero matrices, rank one, a top singular value repeated (λ₀ − σ² at the rounding level), and entries
    spanning 2^±40: accepted ⇒ bound ≥ σ² (float64 SVD oracle, error ≪ the 1e-10 margin)."""
    g = torch.Generator().manual_seed(1)
    dtype = torch.complex128 if complex_ else torch.float64
    q, _ = torch.linalg.qr(torch.randn(2, 9, 9, generator=g, dtype=dtype))
    stacks = [torch.zeros(2, 4, 3, dtype=dtype), _random((2, 8, 6), 1, complex_, g), q,
              q @ torch.diag_embed(torch.tensor([1.0] * 3 + [2.0**-40] * 6, dtype=dtype)),
              _random((2, 5, 9), 3, complex_, g) * 2.0**40]
    for a in stacks:
        sigma2 = torch.linalg.matrix_norm(a, ord=2) ** 2
        for rel in (-1e-9, -1e-13, 0.0, 1e-13, 1e-9, 1e-6):
            lam = sigma2 * (1 + rel)
            ok = cholesky_certificate(a, lam)
            bound = certified_square_bound(lam.clamp_min(2.0**-1000), *a.shape[-2:])
            assert (bound[ok] >= sigma2[ok]).all()
            if rel >= 1e-6:
                assert ok.all()


def test_refined_estimate_matches_the_svd():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(6, 40, 30, generator=g, dtype=torch.complex128)
    exact = torch.linalg.matrix_norm(a, ord=2)
    torch.testing.assert_close(refined_estimate(a), exact, rtol=1e-10, atol=0)


# --- frequency blocks, chunks and host reads ------------------------------------------------------------------
@pytest.mark.parametrize("size, kwargs", [((6, 6), {}), ((5, 7), dict(groups=2)), ((6, 9), dict(stride=(2, 3))),
                                          ((8, 8), dict(dilation=(2, 1), stride=(2, 2), groups=2))])
def test_frequency_blocks_are_the_frequency_matrices(size, kwargs):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 2 if kwargs.get("groups") == 2 else 4, 3, 2, generator=g, dtype=torch.float64)
    freq = FrequencyBlocks(w, size, kwargs.get("dilation", (1, 1)), kwargs.get("groups", 1), kwargs.get("stride", (1, 1)))
    matrices, error, scale = frequency_matrices(w, size, kwargs.get("dilation", (1, 1)), kwargs.get("groups", 1),
                                                kwargs.get("stride", (1, 1)))
    blocks = freq.build_rows(0, freq.row_count)
    assert blocks.shape == matrices.shape and freq.count == blocks.shape[0] and scale == freq.scale
    torch.testing.assert_close(torch.linalg.svdvals(blocks).sort(0).values,
                               torch.linalg.svdvals(matrices).sort(0).values, rtol=1e-12, atol=1e-12)
    assert freq.error.item() == pytest.approx(float(error), rel=1e-6)
    index = torch.tensor([0, freq.count - 1, freq.count // 2, 1 % freq.count])
    torch.testing.assert_close(freq.build(index), blocks[index], rtol=0, atol=1e-13)


def test_chunked_certificate_equals_one_chunk():
    g = torch.Generator().manual_seed(4)
    freq = FrequencyBlocks(torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64), (9, 8))
    with configure(**TORCH):
        whole = certify_max_norm(freq, rtol=1e-4)
        chunked = certify_max_norm(freq, rtol=1e-4, chunk_bytes=freq.matrix_bytes)  # one grid row per chunk
    assert whole.failed == chunked.failed == 0
    assert whole.bound.item() == chunked.bound.item()


class _HostReads(TorchDispatchMode):
    NAMES = {"_local_scalar_dense", "is_nonzero", "nonzero", "item", "equal"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0] in self.NAMES
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["circular", "zeros"])
def test_upper_bound_reads_the_device_a_constant_number_of_times(mode):
    """The circular embedding's certificate: input validation (one read) plus the certificate (one read, one
    more per retry), not one per step. (The probed Gram of lipkern.bounds.probing, which takes this operator
    by default, reads per Lanczos step and per sweep: a certification-time cost, not a training one.)"""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 8, 3, 3, generator=g) / 8
    with configure(**TORCH), _HostReads() as reads, _circular_only():
        conv2d_spectral_norm(w, 12, padding=1, padding_mode=mode, method="upper")
    assert reads.count <= 2 + certificate.RETRIES


# --- conv bounds through the certificate, its retries and the fallback -----------------------------------------
def _exact(unit, n, kwargs):
    return spectral_norm(dense_conv2d(unit, n, **kwargs))


@contextlib.contextmanager
def _circular_only():
    """The circular-embedding certificate alone (small operators otherwise take the explicit matrix's or the
    probed Gram's)."""
    with mock.patch.dict("lipkern.bounds.spectral.DENSE_LIMIT", {"cpu": 0, "cuda": 0}), \
            mock.patch.dict("lipkern.bounds.spectral.GRAM_LIMIT", {"cpu": 0, "cuda": 0}):
        yield


def _spy():
    results = []
    real = certificate.certify_max_norm

    def spy(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]
    return results, mock.patch("lipkern.bounds.spectral.certify_max_norm", spy)


@settings(max_examples=30, deadline=None)
@given(case=conv_cases(), seed=st.integers(0, 2**16), path=st.sampled_from(["certificate", "fallback"]),
       log_scale=st.sampled_from([-150, 0, 150]))
def test_conv_upper_bound_holds_on_every_path(case, seed, path, log_scale):
    """upper ≥ the dense-operator norm, with the certificate (σ̂ accurate: no frequency falls back) and with a
    σ̂ four times too low (every frequency fails, retries and Gram iteration take over)."""
    kwargs = dict(case["kwargs"])
    if isinstance(kwargs["padding"], tuple) and len(kwargs["padding"]) == 4:
        kwargs["padding"] = kwargs["padding"][:2]  # nn.Conv2d padding for the oracle
    g = torch.Generator().manual_seed(seed)
    unit = torch.randn(case["c_out"], case["c_in"] // kwargs["groups"], *case["k"], generator=g, dtype=torch.float64)
    try:
        exact = _exact(unit, case["n"], kwargs)
    except RuntimeError:
        return
    results, spy = _spy()
    real_refined = certificate.refined_estimate
    low = mock.patch.object(certificate, "refined_estimate", lambda a: real_refined(a) / 4)
    with configure(**TORCH), spy, _circular_only(), (low if path == "fallback" else mock.MagicMock()):
        upper = conv2d_spectral_norm(unit * 10.0**log_scale, case["n"], **kwargs, method="upper").upper.item()
    assert upper >= exact * 10.0**log_scale, (upper, exact)
    if path == "certificate" and exact > 0:
        assert results[0].failed == 0
    with configure(**TORCH):  # and the explicit matrix's certificate where the operator is small
        dense = conv2d_spectral_norm(unit * 10.0**log_scale, case["n"], **kwargs, method="upper").upper.item()
    assert dense >= exact * 10.0**log_scale, (dense, exact)


@pytest.mark.parametrize("kwargs", [dict(padding=1, padding_mode="circular"), dict(padding=1),
                                    dict(padding=1, stride=2, padding_mode="circular"), dict(padding=0, groups=2)])
@pytest.mark.parametrize("scale", [1e-150, 1.0, 1e150])
def test_conv_upper_bound_rank_deficient_kernels_at_extreme_scales(kwargs, scale):
    """A rank-one kernel (every frequency matrix has rank ≤ 1: K = λI − AᴴA is λI on most of the space) and a
    kernel with zero output channels, at 1e±150."""
    g = torch.Generator().manual_seed(6)
    c_in = 4 // kwargs.get("groups", 1)
    rank_one = torch.einsum("o,i,a,b->oiab", torch.randn(4, generator=g, dtype=torch.float64),
                            torch.randn(c_in, generator=g, dtype=torch.float64),
                            torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64))
    dead = torch.randn(4, c_in, 3, 3, generator=g, dtype=torch.float64)
    dead[1:3] = 0
    for unit in (rank_one, dead):
        exact = _exact(unit, 6, kwargs)
        results, spy = _spy()
        with configure(**TORCH), spy, _circular_only():
            upper = conv2d_spectral_norm(unit * scale, 6, **kwargs, method="upper").upper.item()
        assert upper >= exact * scale
        assert upper <= exact * scale * 1.5  # zero padding: the enlarged circular operator
        assert results[0].failed == 0
        with configure(**TORCH):  # the explicit matrix's certificate (a small operator): tight
            dense = conv2d_spectral_norm(unit * scale, 6, **kwargs, method="upper").upper.item()
        assert exact * scale <= dense <= exact * scale * (1 + 1e-4)


@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(padding="same"), dict(padding=2, dilation=2, groups=2),
                                    dict(padding=1, stride=2)])
def test_circular_upper_bound_is_within_rtol(kwargs):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(4, 4 // kwargs.get("groups", 1), 3, 3, generator=g, dtype=torch.float64)
    n = 6
    exact = _exact(w, n, dict(kwargs, padding_mode="circular"))
    for rtol in (1e-4, 1e-7):
        with configure(**TORCH):
            upper = conv2d_spectral_norm(w, n, padding_mode="circular", **kwargs, method="upper", rtol=rtol).upper
        assert exact <= upper.item() <= exact * (1 + rtol)


# --- the estimate reaches its rtol (issue: stalled at 1.3e-3 with rtol 1e-4 on zero-padded convs) -------------
@pytest.mark.parametrize("c, n", [(2, 5), (4, 5), (16, 5), (2, 8), (4, 8), (6, 8)])
def test_auto_estimate_reaches_rtol_on_zero_padded_convs(c, n):
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(c, c, 3, 3, generator=g, dtype=torch.float64)
        exact = _exact(w, n, dict(padding=1))
        with configure(**TORCH):
            result = conv2d_spectral_norm(w, n, padding=1)
        assert abs(result.estimate.item() / exact - 1) <= 1e-4, (seed, result.estimate.item() / exact - 1)
        assert result.estimate.item() <= exact * (1 + 1e-12) <= result.upper.item()
