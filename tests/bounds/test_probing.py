"""Chains certified through the Gram matrix of their smaller side, formed by probing (lipkern.bounds.probing).

Oracles: explicit float64 matrices from PyTorch's own nn.Conv2d on the identity basis (tests.helpers.dense_conv2d)
and their products, torch.linalg.matrix_norm(ord=2); exact rationals (fractions.Fraction) for the rounding
errors of the probe sweeps and for matrices whose top eigenvalue is known exactly."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lipkern.bounds.chain import chain_upper_bounds
from lipkern.bounds.operators import LinearMap
from lipkern.bounds.probing import (_assemble, _probe_sweep, _steps, certified_top_eigenvalue, gram_chain,
                                    probe_layout)
from tests.helpers import dense_conv2d

D = torch.float64


@pytest.fixture(autouse=True)
def torch_backend(knobs):
    knobs(backend="torch")


@st.composite
def conv_chains(draw, max_maps=3):
    """A random chain of zero-padded convs (strides, dilations, groups, asymmetric padding) and channel scales,
    with the oracle matrix of every map."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    channels, h, w = draw(st.integers(1, 3)), draw(st.integers(3, 9)), draw(st.integers(3, 9))
    maps, mats = [], []
    for _ in range(draw(st.integers(1, max_maps))):
        if maps and draw(st.booleans()) and draw(st.booleans()):
            scale = torch.randn(channels, generator=gen, dtype=D)
            maps.append(LinearMap.diag(scale, (channels, h, w)))
            mats.append(torch.diag(scale.repeat_interleave(h * w)))
            continue
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0]))
        out = groups * draw(st.integers(1, 2))
        kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 3))
        stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        dilation = (draw(st.integers(1, 2)), 1)
        pads = tuple(draw(st.integers(0, 2)) for _ in range(4))  # top, bottom, left, right
        out_h = (h + pads[0] + pads[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        out_w = (w + pads[2] + pads[3] - (kw - 1) - 1) // stride[1] + 1
        if out_h < 1 or out_w < 1:
            break
        weight = torch.randn(out, channels // groups, kh, kw, generator=gen, dtype=D) / math.sqrt(kh * kw)
        maps.append(LinearMap.conv2d(weight, (channels, h, w), stride, pads, dilation, groups))
        padded = torch.nn.functional.pad(torch.eye(channels * h * w, dtype=D).reshape(-1, channels, h, w),
                                         (pads[2], pads[3], pads[0], pads[1]))
        mats.append(dense_conv2d(weight, (h + pads[0] + pads[1], w + pads[2] + pads[3]), stride=stride,
                                 dilation=dilation, groups=groups) @ padded.reshape(channels * h * w, -1).T)
        channels, h, w = out, out_h, out_w
    if not maps:
        maps.append(LinearMap.diag(torch.randn(channels, generator=gen, dtype=D), (channels, h, w)))
        mats.append(torch.diag(maps[-1].weight.repeat_interleave(h * w)))
    return maps, mats


def _product(mats, j, k):
    product = mats[j]
    for i in range(j + 1, k + 1):
        product = mats[i] @ product
    return product


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_chains(), st.sampled_from(["in", "out"]))
def test_probes_assemble_the_exact_gram_matrix(chain, side):
    maps, mats = chain
    b = _product(mats, 0, len(maps) - 1)
    gram = b.T @ b if side == "in" else b @ b.T
    layout = probe_layout(maps, side)
    z, _ = _probe_sweep(maps, 0, len(maps) - 1, side, layout, {t: 1.0 for t in range(len(maps))})
    assembled = _assemble(z, layout)  # Ĝᵀ
    assert torch.allclose(assembled.T, gram, rtol=0, atol=1e-12 * max(1.0, gram.abs().max().item()))
    if layout is not None:
        assert z.shape[0] == layout.count <= gram.shape[0]


def test_local_chains_need_few_probes():
    """A 4×4 stride-2 conv, 32 → 32 channels at 28×28: 9 probes per output channel instead of 196."""
    conv = LinearMap.conv2d(torch.randn(32, 32, 4, 4, dtype=D), (32, 28, 28), stride=2, padding=1)
    assert probe_layout([conv], "out").count == 32 * 9
    assert probe_layout([conv], "in").count == 32 * 7 * 7


@pytest.mark.parametrize("make", [
    lambda: [LinearMap.dense(torch.randn(4, 12, dtype=D), (3, 2, 2))],
    lambda: [LinearMap.conv2d(torch.randn(2, 3, 3, 3, dtype=D), (3, 5, 5), padding=1, padding_mode="circular")],
    lambda: [LinearMap.diag(torch.randn(3, dtype=D), (3,))],
])
def test_non_local_chains_use_identity_probes(make):
    assert probe_layout(make(), "in") is None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_chains())
def test_gram_path_bounds_are_guaranteed_and_tight(chain):
    maps, mats = chain
    bounds = chain_upper_bounds(maps, dense_limit=0)
    for j in range(len(maps)):
        for k in range(j, len(maps)):
            exact = torch.linalg.matrix_norm(_product(mats, j, k), 2).item()
            # a zero chain (all padding) is found exactly (bound 0), or certified at λ₀ = 2⁻¹⁰⁰⁰: ≤ 2⁻⁴⁹⁹
            assert exact <= bounds[j, k].item() <= exact * (1 + 1e-6) + 2.0**-499


def test_a_chain_that_only_reads_padding_is_bounded_by_zero():
    """Hypothesis found it: the second conv reads only the rows the first fills with padding. The Gram path's
    error terms (the first conv's rounding times ‖A₂‖) gave 1.5e-15 for this zero operator; it is now found
    exactly (no path from an input to an output) and bounded by 0, while its prefix and suffix keep theirs."""
    first = LinearMap.conv2d(torch.tensor([[[[1.5410]]]], dtype=D), (1, 3, 3), stride=(2, 1), padding=(1, 0, 0, 0))
    second = LinearMap.conv2d(torch.tensor([[[[-0.2075], [-1.5406]]]], dtype=D), (1, 2, 3), stride=(2, 1),
                              padding=(1, 0, 0, 0))
    assert torch.count_nonzero(second.dense_matrix() @ first.dense_matrix()) == 0
    for limit in (0, 1 << 22):
        bounds = chain_upper_bounds([first, second], dense_limit=limit)
        assert bounds[0, 1] == 0 and bounds[0, 0] >= 1.541 and bounds[1, 1] >= 1.5406
    reads = LinearMap.conv2d(torch.tensor([[[[0.0], [1e-300]]]], dtype=D), (1, 2, 3), stride=(1, 1),
                             padding=(1, 0, 0, 0))  # a 1e-300 tap meets the first conv's outputs: not zero
    assert chain_upper_bounds([first, reads], dense_limit=0)[0, 1] > 0


def test_sweep_error_terms_bound_the_float64_errors():
    """‖Ẑ − GP‖_F ≤ β·e₁ + e₂ (module docstring), with Ẑ the float64 probe sweep and GP in exact rationals."""
    gen = torch.Generator().manual_seed(5)
    maps = [LinearMap.conv2d(torch.randn(2, 1, 3, 3, generator=gen, dtype=D) / 3, (1, 5, 5), padding=1),
            LinearMap.conv2d(torch.randn(2, 2, 2, 2, generator=gen, dtype=D) / 2, (2, 5, 5), stride=2)]
    mats = [m.dense_matrix() for m in maps]
    for side in ("in", "out"):
        layout = probe_layout(maps, side)
        abs_norms = {t: torch.linalg.matrix_norm(mats[t].abs(), 2).item() * (1 + 1e-12) for t in range(2)}
        z, phis = _probe_sweep(maps, 0, 1, side, layout, abs_norms)
        exact_mats = [[[Fraction(v) for v in row] for row in m.tolist()] for m in mats]
        # GP exactly: push the probes (exact 0/1) through the exact matrices, in the sweep's order
        error_sq = Fraction(0)
        for row, probe in zip(z.tolist(), _probe_rows(layout, maps, side)):
            x = probe
            for t, forward in _steps(0, 1, side):
                m = exact_mats[t]
                x = ([sum((a * v for a, v in zip(r, x)), Fraction(0)) for r in m] if forward else
                     [sum((m[i][c] * x[i] for i in range(len(m))), Fraction(0)) for c in range(len(m[0]))])
            error_sq += sum((Fraction(a) - e) ** 2 for a, e in zip(row, x))
        norms = {(0, 0): torch.linalg.matrix_norm(mats[0], 2).item() * (1 + 1e-12),
                 (1, 1): torch.linalg.matrix_norm(mats[1], 2).item() * (1 + 1e-12)}
        beta = torch.linalg.matrix_norm(mats[1] @ mats[0], 2).item() * (1 + 1e-12)
        pairs = [(t + 1, 1, phi) if forward else (0, t - 1, phi) for (t, forward), phi in zip(_steps(0, 1, side), phis)]
        bound = sum(norms.get((a, b), 1.0 if a > b else math.inf) * phi for a, b, phi in pairs[:2]) * beta + \
            sum(norms.get((a, b), 1.0 if a > b else math.inf) * phi for a, b, phi in pairs[2:])
        assert 0 < error_sq and math.sqrt(error_sq) <= bound < 1e-12


def _probe_rows(layout, maps, side):
    from lipkern.bounds.probing import _probes
    size = maps[0].in_features if side == "in" else maps[-1].out_features
    count = size if layout is None else layout.count
    return [[Fraction(v) for v in row] for row in _probes(layout, size, 0, count, D, "cpu").tolist()]


@pytest.mark.parametrize("n", [1, 7, 40])
def test_certified_top_eigenvalue_against_exact_values(n):
    """S = a·I + b·𝟙𝟙ᵀ (integers: exact in float64): λ_max = a + n·b exactly."""
    a, b = 3.0, 2.0
    exact = a + n * b
    s = torch.full((n, n), b, dtype=D) + a * torch.eye(n, dtype=D)
    tight = certified_top_eigenvalue(s.clone(), exact * (1 - 1e-12))
    assert exact <= tight <= exact * (1 + 1e-7)
    assert exact <= certified_top_eigenvalue(s.clone(), exact * (1 - 1e-5)) <= exact * (1 + 1e-3)  # a retry
    assert certified_top_eigenvalue(s.clone(), exact * 0.9) == math.inf  # every shift too small: refused


def test_gram_chain_falls_back_to_splits_when_the_certificate_fails(monkeypatch):
    """An estimate far below the norm certifies nothing: the chain keeps the product of its parts' bounds."""
    import lipkern.bounds.probing as probing

    gen = torch.Generator().manual_seed(2)
    maps = [LinearMap.conv2d(torch.randn(3, 2, 3, 3, generator=gen, dtype=D), (2, 6, 6), padding=1),
            LinearMap.conv2d(torch.randn(2, 3, 3, 3, generator=gen, dtype=D), (3, 6, 6), padding=1)]
    monkeypatch.setattr(probing, "_estimate", lambda *args: 1e-3)
    assert gram_chain(maps, 0, 1, "in", {0: 10.0, 1: 10.0}).eigenvalue == math.inf
    bounds = chain_upper_bounds(maps, dense_limit=0)
    exact = torch.linalg.matrix_norm(maps[1].dense_matrix() @ maps[0].dense_matrix(), 2).item()
    assert exact <= bounds[0, 1].item() and bounds[0, 1].item() >= bounds[0, 0].item() * bounds[1, 1].item() * 0.999


def test_banded_certificate_matches_the_dense_one_and_the_exact_norm():
    """A 3×3 conv on 2×20×20: the Gram's Cholesky runs on pixel-row blocks (bandwidth 2 of 20 rows), built
    from the probes without the dense matrix."""
    from lipkern.bounds.probing import BandedGram, _certify, _use_band, certified_top_eigenvalue_banded

    gen = torch.Generator().manual_seed(7)
    conv = LinearMap.conv2d(torch.randn(3, 2, 3, 3, generator=gen, dtype=D) / 3, (2, 20, 20), padding=1)
    layout = probe_layout([conv], "in")
    z, phis = _probe_sweep([conv], 0, 0, "in", layout, {0: 10.0})
    assert _use_band(layout, torch.device("cpu"))
    band = BandedGram(z, layout)
    assert band.bandwidth == 2
    a = conv.dense_matrix()
    gram = a.T @ a
    order = torch.arange(gram.shape[0]).view(2, 20, 20).permute(1, 2, 0).reshape(20, 40)  # (h; w, c)
    for i in range(20):
        for j in range(20):
            expected = gram[order[i]][:, order[j]]
            if abs(i - j) <= 2:
                assert torch.allclose(band.block(i, j), expected, rtol=0, atol=1e-12)
            else:
                assert expected.abs().max() == 0  # outside the band: exact zeros in the Gram
    exact = torch.linalg.matrix_norm(a, 2).item()
    for estimate in (exact**2, exact**2 * 0.9):
        banded = certified_top_eigenvalue_banded(band, estimate)
        dense = certified_top_eigenvalue(gram.clone(), estimate)
        if estimate < exact**2:
            assert banded == dense == math.inf
        else:
            assert exact**2 <= banded <= exact**2 * (1 + 1e-7) and banded == pytest.approx(dense, rel=1e-12)
    assert exact <= _certify([conv], 0, 0, "in", layout, {0: (z, phis)}, 0).norm_bound(0.0, 0.0) <= exact * (1 + 1e-7)


def test_chains_sharing_an_anchor_share_their_sweep():
    """Chains ending at the same map with identity probes are swept together; each is still its own bound."""
    from lipkern.bounds.probing import gram_chains

    gen = torch.Generator().manual_seed(8)
    maps = [LinearMap.conv2d(torch.randn(3, 2, 3, 3, generator=gen, dtype=D) / 3, (2, 5, 5), padding=1),
            LinearMap.conv2d(torch.randn(3, 3, 3, 3, generator=gen, dtype=D) / 3, (3, 5, 5), stride=2),
            LinearMap.dense(torch.randn(4, 12, generator=gen, dtype=D) / 3, (3, 2, 2))]
    mats = [m.dense_matrix() for m in maps]
    chains = {(0, 2): "out", (1, 2): "out", (2, 2): "out"}
    together = gram_chains(maps, chains, {t: 10.0 for t in range(3)})
    for (j, k) in chains:
        alone = gram_chain(maps, j, k, "out", {t: 10.0 for t in range(3)})
        assert together[(j, k)].eigenvalue == alone.eigenvalue
        assert together[(j, k)].first == alone.first and together[(j, k)].second == alone.second
        exact = torch.linalg.matrix_norm(_product(mats, j, k), 2).item()
        assert exact <= together[(j, k)].norm_bound(0.0, 0.0) * (1 + 1e-12) <= exact * (1 + 1e-7)


def test_float32_maps_are_certified_in_float64():
    """chain_upper_bounds takes maps of any float dtype: the Gram path (sweeps and the Lanczos estimate) works on
    float64 copies of the weights."""
    gen = torch.Generator().manual_seed(9)
    maps = [LinearMap.conv2d(torch.randn(2, 2, 3, 3, generator=gen), (2, 6, 6), padding=1) for _ in range(2)]
    bounds = chain_upper_bounds(maps, dense_limit=0)
    exact = torch.linalg.matrix_norm(maps[1].to(D).dense_matrix() @ maps[0].to(D).dense_matrix(), 2).item()
    assert exact <= bounds[0, 1].item() <= exact * (1 + 1e-6)


@pytest.mark.parametrize("scale", [1e-150, 1e150])
def test_extreme_scales_are_bounded_not_crashed(scale):
    """Weights at 1e±150: a layer's probed Gram works on W·2⁻ᵉ (tight); inside a chain the Gram overflows or
    underflows, the certificate refuses, and the chain keeps a guaranteed (looser) bound."""
    from lipkern.bounds import conv2d_spectral_norm

    gen = torch.Generator().manual_seed(10)
    w = torch.randn(4, 4, 3, 3, generator=gen, dtype=D) / 3
    conv = LinearMap.conv2d(w, (4, 24, 24), padding=1)
    exact = torch.linalg.matrix_norm(conv.dense_matrix(), 2).item()
    upper = conv2d_spectral_norm(w * scale, 24, padding=1, method="upper").upper.item()
    assert exact * scale <= upper <= exact * scale * (1 + 1e-6)
    maps = [LinearMap.conv2d(w * scale, (4, 6, 6), padding=1), LinearMap.conv2d(w, (4, 6, 6), padding=1)]
    bounds = chain_upper_bounds(maps, dense_limit=0)
    chain = torch.linalg.matrix_norm(maps[1].dense_matrix() @ maps[0].dense_matrix(), 2).item()
    assert chain <= bounds[0, 1].item() < math.inf


@pytest.mark.parametrize("limits, error", [(dict(gram_limit=-1), ValueError), (dict(gram_limit=1.5), TypeError),
                                           (dict(dense_limit=True), TypeError), (dict(gram_limit="2**20"), TypeError)])
def test_bad_limits_raise(limits, error):
    conv = LinearMap.conv2d(torch.randn(2, 2, 3, 3, dtype=D), (2, 6, 6), padding=1)
    with pytest.raises(error, match="limit"):
        chain_upper_bounds([conv], **limits)


def test_taps_that_never_meet_the_input_do_not_set_the_scale():
    """A 3×3 kernel on a 1×1 input with padding 1 reads only its centre tap: a corner tap of 1e300 must not
    scale the centre taps (1e-20) into the subnormal range (the bound would be sound but useless)."""
    from lipkern.bounds import conv2d_spectral_norm

    w = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(11), dtype=D) * 1e-20
    w[0, 0, 0, 0] = 1e300
    exact = torch.linalg.matrix_norm(dense_conv2d(w, (1, 1), padding=1), 2).item()
    upper = conv2d_spectral_norm(w, (1, 1), padding=1, method="upper").upper.item()
    assert exact <= upper <= exact * (1 + 1e-6)
