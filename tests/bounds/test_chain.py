"""Sub-chain norms (lipkern.bounds.chain): guaranteed bounds of ‖A_k⋯A_j‖₂ and the head-chain norms.

Oracle: explicit float64 matrices built independently of LinearMap (nn.Conv2d on the identity basis, the
diagonal of a channel scale, the dense weight), their products and torch.linalg.matrix_norm(ord=2)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lipkern.bounds.chain import MAX_HEAD_CLASSES, chain_upper_bounds, head_chain_norms
from lipkern.bounds.operators import LinearMap
from tests.helpers import dense_conv2d

_U = 2.0**-53


@pytest.fixture(autouse=True)
def torch_backend(knobs):
    """The layer certificates' power iterations on the torch path (not the Triton interpreter: 100x slower)."""
    knobs(backend="torch")


# ----------------------------------------------------------------------------------------------------------
# Oracles and random chains.
# ----------------------------------------------------------------------------------------------------------
def _oracle_matrix(spec, weight) -> torch.Tensor:
    kind, args = spec
    if kind == "conv2d":
        return dense_conv2d(weight, args["input_size"], **args["conv"])
    if kind == "diag":
        return torch.diag(weight.double().repeat_interleave(args["pixels"]))
    return weight.double()


def _chain_matrix(mats, j, k):
    product = mats[j]
    for i in range(j + 1, k + 1):
        product = mats[i] @ product
    return product


def _norm(matrix) -> float:
    return torch.linalg.matrix_norm(matrix, ord=2).item()


@st.composite
def chains(draw, max_convs=3):
    """(maps, oracle matrices): convs with random geometry, diag scales, then dense layers."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    channels, size = draw(st.integers(1, 3)), (draw(st.integers(3, 6)), draw(st.integers(3, 6)))
    maps, mats = [], []

    def add(m, spec):
        maps.append(m)
        mats.append(_oracle_matrix(spec, m.weight))

    scale = 2.0 ** draw(st.integers(-20, 20))
    for _ in range(draw(st.integers(0, max_convs))):
        if draw(st.booleans()):
            w = (torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5) * scale
            add(LinearMap.diag(w, (channels, *size)), ("diag", {"pixels": size[0] * size[1]}))
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0]))
        out = groups * draw(st.integers(1, 2))
        kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        mode = draw(st.sampled_from(["zeros", "circular"]))
        padding = draw(st.integers(0, min(2, *size)))
        span = [dilation * (k - 1) + 1 for k in kernel]
        if any(s + 2 * padding < sp for s, sp in zip(size, span)):
            padding, dilation = max(kernel), 1
            span = list(kernel)
            if mode == "circular" and padding > min(size):
                mode = "zeros"
        w = torch.randn(out, channels // groups, *kernel, generator=gen, dtype=torch.float64) * scale
        if draw(st.booleans()):
            w = w.float()  # stored float32 weights: the exact operator is the float32 values
        conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode)
        m = LinearMap.conv2d(w, (channels, *size), **conv)
        add(m, ("conv2d", {"input_size": size, "conv": conv}))
        channels, size = out, m.out_shape[1:]
    features = maps[-1].out_features if maps else draw(st.integers(1, 8))
    in_shape = maps[-1].out_shape if maps else (features,)
    for _ in range(draw(st.integers(0 if maps else 1, 2))):
        out = draw(st.integers(1, 6))
        w = torch.randn(out, features, generator=gen, dtype=torch.float64) * scale
        add(LinearMap.dense(w, in_shape), ("dense", {}))
        features, in_shape = out, (out,)
    return maps, mats


# ----------------------------------------------------------------------------------------------------------
# chain_upper_bounds.
# ----------------------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains())
def test_chain_bounds_cover_every_sub_chain_and_are_tight(chain):
    maps, mats = chain
    bounds = chain_upper_bounds(maps)
    layer_norms = [_norm(m) for m in mats]
    assert bounds.dtype == torch.float64 and bounds.shape == (len(maps), len(maps))
    for j in range(len(maps)):
        for k in range(len(maps)):
            if j > k:
                assert bounds[j, k] == 0
                continue
            exact = _norm(_chain_matrix(mats, j, k))
            assert bounds[j, k].item() >= exact, (j, k)
            # every chain here is small enough for the explicit path: tight (the rounding term is relative to
            # the sizes of the intermediate results: it stays when the chain cancels to 0)
            scale = math.prod(layer_norms[j:k + 1])
            assert bounds[j, k].item() <= exact * (1 + 1e-6) + 1e-9 * scale + 1e-300, (j, k, bounds[j, k].item(), exact)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains(max_convs=2))
def test_chain_bounds_without_dense_path_use_products_of_layer_bounds(chain):
    maps, mats = chain
    bounds = chain_upper_bounds(maps, dense_limit=0, gram_limit=0)
    singles = [m.upper_bound().item() for m in maps]
    for j in range(len(maps)):
        assert bounds[j, j].item() >= _norm(mats[j])
        for k in range(j, len(maps)):
            assert bounds[j, k].item() >= _norm(_chain_matrix(mats, j, k))
            product = math.prod(singles[j:k + 1])
            assert bounds[j, k].item() <= product * (1 + 4 * len(maps) * _U)  # upward rounding only


def test_dense_limit_mixes_explicit_and_split_bounds():
    """Only (0, 2) is under the limit (20·25 = 500 entries; the others have ≥ 600): explicit and tight there,
    layer bounds and splits elsewhere."""
    gen = torch.Generator().manual_seed(3)
    maps = [LinearMap.dense(torch.randn(30, 20, generator=gen, dtype=torch.float64)),
            LinearMap.dense(torch.randn(30, 30, generator=gen, dtype=torch.float64)),
            LinearMap.dense(torch.randn(25, 30, generator=gen, dtype=torch.float64))]
    mats = [m.weight for m in maps]
    bounds = chain_upper_bounds(maps, dense_limit=550, gram_limit=0)
    singles = [m.upper_bound().item() for m in maps]
    for j in range(3):
        assert bounds[j, j].item() == singles[j]
        for k in range(j, 3):
            assert bounds[j, k].item() >= _norm(_chain_matrix(mats, j, k))
    assert bounds[0, 1].item() <= singles[0] * singles[1] * (1 + 4 * _U)
    exact = _norm(_chain_matrix(mats, 0, 2))
    assert bounds[0, 2].item() <= exact * (1 + 1e-6) < singles[0] * singles[1] * singles[2]


# ----------------------------------------------------------------------------------------------------------
# The rounding term: cases whose computed chain matrix is far from the exact one.
# ----------------------------------------------------------------------------------------------------------
_BIG = 2.0**53


def _cancelling_chain():
    """x ↦ (2⁵³x, x) ↦ (2⁵³x + x, 2⁵³x) ↦ difference: exactly x, but 2⁵³ + 1 rounds to 2⁵³ in float64 (a
    two-term sum: no summation order avoids it), so the computed chain matrix is 0."""
    w0 = torch.tensor([[_BIG], [1.0]], dtype=torch.float64)
    w1 = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    w2 = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    return [w0, w1, w2]


def test_rounding_term_covers_cancellation_forward():
    weights = _cancelling_chain()
    maps = [LinearMap.dense(w) for w in weights]
    assert (weights[2].long() @ weights[1].long() @ weights[0].long()).item() == 1  # integers: exact
    computed = maps[2].forward(maps[1].forward(maps[0].forward(torch.ones(1, 1, dtype=torch.float64))))
    assert computed.item() == 0.0  # the float64 chain loses everything
    bounds = chain_upper_bounds(maps)
    assert bounds[0, 2].item() >= 1.0  # the exact chain is [[1]]
    assert bounds[0, 2].item() < bounds[0, 1].item() * bounds[2, 2].item()  # and it is the explicit bound


def test_rounding_term_covers_cancellation_adjoint_sweep_and_head():
    """The transposed chain with a wider input: bounded by an adjoint sweep (in_features > out_features)."""
    w0, w1, w2 = _cancelling_chain()
    first = torch.cat([w2.T, torch.zeros(2, 1, dtype=torch.float64)], 1)  # (2, 2): input (x, ignored)
    maps = [LinearMap.dense(first), LinearMap.dense(w1.T), LinearMap.dense(w0.T)]  # 2 inputs, 1 output
    exact = w0.T.long() @ w1.T.long() @ first.long()  # integers: exact
    assert torch.equal(exact, torch.tensor([[1, 0]]))
    adjoint = maps[0].adjoint(maps[1].adjoint(maps[2].adjoint(torch.ones(1, 1, dtype=torch.float64))))
    assert (adjoint == 0).all()  # the float64 adjoint sweep loses everything
    bounds = chain_upper_bounds(maps)
    assert 1.0 <= bounds[0, 2].item() < bounds[0, 1].item() * bounds[2, 2].item()
    head = head_chain_norms(maps)
    assert head[0].item() >= 1.0
    last = torch.cat([w0.T, torch.zeros(1, 2, dtype=torch.float64)], 0)  # (2, 2): a second, zero logit
    maps = [LinearMap.dense(first), LinearMap.dense(w1.T), LinearMap.dense(last)]
    head = head_chain_norms(maps)
    assert head[0].item() >= 1.0
    pairwise = head_chain_norms(maps, pairwise=True)
    assert pairwise[0, 0, 1].item() >= 1.0 and pairwise[0, 1, 0].item() >= 1.0


# ----------------------------------------------------------------------------------------------------------
# head_chain_norms.
# ----------------------------------------------------------------------------------------------------------
def _head_case(dtype=torch.float64, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    maps = [
        LinearMap.conv2d(torch.randn(4, 2, 3, 3, generator=gen, dtype=dtype), (2, 6, 6), padding=1),
        LinearMap.diag(torch.rand(4, generator=gen, dtype=dtype) + 0.5, (4, 6, 6)),
        LinearMap.conv2d(torch.randn(6, 4, 4, 4, generator=gen, dtype=dtype), (4, 6, 6), stride=2, padding=1,
                         padding_mode="circular"),
        LinearMap.dense(torch.randn(12, 54, generator=gen, dtype=dtype), (6, 3, 3)),
        LinearMap.dense(torch.randn(classes, 12, generator=gen, dtype=dtype)),
    ]
    mats = [dense_conv2d(maps[0].weight, 6, padding=1),
            torch.diag(maps[1].weight.double().repeat_interleave(36)),
            dense_conv2d(maps[2].weight, 6, stride=2, padding=1, padding_mode="circular"),
            maps[3].weight.double(), maps[4].weight.double()]
    return maps, mats


def _pairwise_oracle(product):
    classes = product.shape[0]
    out = torch.zeros(classes, classes, dtype=torch.float64)
    for a in range(classes):
        for b in range(classes):
            out[a, b] = torch.linalg.vector_norm(product[a] - product[b])
    return out


def test_head_norms_match_dense_svd():
    maps, mats = _head_case()
    last = len(maps) - 1
    exact = torch.tensor([_norm(_chain_matrix(mats, j, last)) for j in range(len(maps))], dtype=torch.float64)
    sound = head_chain_norms(maps)
    value = head_chain_norms(maps, sound=False)
    assert sound.shape == (len(maps),) and sound.dtype == torch.float64
    assert (sound >= exact).all() and (sound <= exact * (1 + 1e-6)).all()
    torch.testing.assert_close(value, exact, rtol=1e-10, atol=0)
    bounds = chain_upper_bounds(maps)
    assert (bounds[:, last] >= exact).all() and (bounds[:, last] <= exact * (1 + 1e-6)).all()
    with_bounds = head_chain_norms(maps, chain_bounds=bounds)  # prefix norms for the error term from U
    assert (with_bounds >= exact).all() and (with_bounds <= exact * (1 + 1e-6)).all()
    with pytest.raises(ValueError, match="chain_bounds must be"):
        head_chain_norms(maps, chain_bounds=bounds[1:])


def test_head_pairwise_norms_match_dense_differences():
    maps, mats = _head_case()
    last = len(maps) - 1
    exact = torch.stack([_pairwise_oracle(_chain_matrix(mats, j, last)) for j in range(len(maps))])
    sound = head_chain_norms(maps, pairwise=True)
    value = head_chain_norms(maps, pairwise=True, sound=False)
    assert sound.shape == exact.shape and value.shape == exact.shape
    assert (sound.diagonal(0, 1, 2) == 0).all() and (value.diagonal(0, 1, 2) == 0).all()
    assert (sound >= exact).all() and (sound <= exact * (1 + 1e-6)).all()
    torch.testing.assert_close(value, exact, rtol=1e-10, atol=0)


def test_head_norms_float32_weights():
    maps, mats = _head_case(torch.float32, seed=1)
    last = len(maps) - 1
    exact = torch.tensor([_norm(_chain_matrix(mats, j, last)) for j in range(len(maps))], dtype=torch.float64)
    value = head_chain_norms(maps, sound=False)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), exact, rtol=1e-5, atol=0)
    assert (head_chain_norms(maps) >= exact).all()  # sound: the float32 values as exact reals


def test_head_norms_gradient_matches_dense_autograd():
    maps, _ = _head_case(seed=2)
    weights = [m.weight.clone().requires_grad_(True) for m in maps]
    coeffs = torch.rand(len(maps), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    pair_coeffs = torch.rand(len(maps), 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def loss_ours():
        ms = [m.with_weight(w) for m, w in zip(maps, weights)]
        return (head_chain_norms(ms, sound=False) * coeffs).sum() + \
            (head_chain_norms(ms, pairwise=True, sound=False) * pair_coeffs).sum()

    def loss_oracle():
        mats = [dense_conv2d_grad(weights[0], padding=1),
                torch.diag(weights[1].repeat_interleave(36)),
                dense_conv2d_grad(weights[2], stride=2, padding=1, padding_mode="circular"),
                weights[3], weights[4]]
        total = 0.0
        for j in range(len(mats)):
            product = _chain_matrix(mats, j, len(mats) - 1)
            total = total + coeffs[j] * torch.linalg.matrix_norm(product, ord=2)
            diffs = product[:, None, :] - product[None, :, :]
            off = ~torch.eye(4, dtype=torch.bool)
            total = total + (pair_coeffs[j][off] * torch.linalg.vector_norm(diffs[off], dim=-1)).sum()
        return total

    ours = torch.autograd.grad(loss_ours(), weights)
    oracle = torch.autograd.grad(loss_oracle(), weights)
    for g, r in zip(ours, oracle):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9)


def dense_conv2d_grad(weight, **conv_args):
    """nn.functional.conv2d on the identity basis of (in, 6, 6), differentiable in the weight."""
    c_in = weight.shape[1] * conv_args.get("groups", 1)
    eye = torch.eye(c_in * 36, dtype=torch.float64).reshape(-1, c_in, 6, 6)
    if conv_args.pop("padding_mode", "zeros") == "circular":
        p = conv_args.pop("padding")
        eye = torch.nn.functional.pad(eye, (p, p, p, p), mode="circular")
    return torch.nn.functional.conv2d(eye, weight, **conv_args).reshape(c_in * 36, -1).T


# ----------------------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------------------
def test_bad_input():
    a = LinearMap.dense(torch.randn(4, 3, dtype=torch.float64))
    b = LinearMap.dense(torch.randn(2, 5, dtype=torch.float64))
    for fn in (chain_upper_bounds, head_chain_norms):
        with pytest.raises(ValueError, match="non-empty"):
            fn([])
        with pytest.raises(ValueError, match="gives 4 features"):
            fn([a, b])
        with pytest.raises(TypeError, match="not a LinearMap"):
            fn([a, torch.zeros(3)])
    with pytest.raises(ValueError, match="NaN or Inf"):
        chain_upper_bounds([LinearMap.dense(torch.tensor([[float("inf")]]))])
    wide = LinearMap.dense(torch.randn(MAX_HEAD_CLASSES + 1, 3))
    with pytest.raises(ValueError, match="limited to"):
        head_chain_norms([wide])
    with pytest.raises(ValueError, match="limited to"):
        head_chain_norms([wide], sound=False)
