"""Conv spectral norms: one power-iteration step for all convs of a 20-layer network (stacked vs the per-layer
eager loop of public CPL / LiResNet code), the exact circular norm (batched power iteration over the
frequency matrices vs batched SVD of the rfft blocks), and the guaranteed upper bound vs orthogonium's
get_conv_sv (time and tightness). Groups: power-iteration-step, circular-exact-norm, conv-upper-bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import DEVICE
from lipkern.bounds import conv2d_spectral_norm, frequency_matrices
from lipkern.ops import batched_power_iteration, conv_power_iteration
from lipkern.ops.conv_power_iteration import initial_conv_vectors

ON_GPU = DEVICE.type == "cuda"
NETWORK = dict(layers=20, channels=64, size=32) if ON_GPU else dict(layers=20, channels=8, size=8)
CIRCULAR = dict(channels=256, size=32) if ON_GPU else dict(channels=16, size=8)


# --- one power-iteration step for every conv of a 20-conv network -------------------------------------------
def _network():
    torch.manual_seed(0)
    c, n, layers = NETWORK["channels"], NETWORK["size"], NETWORK["layers"]
    weights = [torch.randn(c, c, 3, 3, device=DEVICE) / 3 for _ in range(layers)]
    u = initial_conv_vectors(layers, c, n, torch.float32, DEVICE)
    return weights, u


def _eager_step(weight, u):
    """One iteration as the CPL reference writes it: conv, normalize, transposed conv, normalize, σ."""
    v = F.conv2d(u, weight, padding=1)
    v = v / v.norm()
    u_new = F.conv_transpose2d(v, weight, padding=1)
    u_new = u_new / u_new.norm()
    sigma = (v * F.conv2d(u_new, weight, padding=1)).sum()
    return u_new, sigma


@pytest.mark.benchmark(group="power-iteration-step")
@pytest.mark.parametrize("provider", ["lipkern", "lipkern-prestacked", "eager-loop"])
def test_power_iteration_step_all_layers(run_timed, provider):
    weights, u = _network()
    stacked = torch.stack(weights)
    us = [u_l[None].clone() for u_l in u]
    v = None

    def lipkern_step():
        nonlocal v
        w = stacked if provider == "lipkern-prestacked" else torch.stack(weights)
        sigma, _, v = conv_power_iteration(w, u, v, 1, padding=1)
        return sigma

    def eager_loop():
        with torch.no_grad():
            for i, weight in enumerate(weights):
                us[i], _ = _eager_step(weight, us[i])

    run_timed(eager_loop if provider == "eager-loop" else lipkern_step, provider, **NETWORK)


# --- exact norm of a circular convolution --------------------------------------------------------------------
def _circular_kernel():
    torch.manual_seed(0)
    c = CIRCULAR["channels"]
    return torch.randn(c, c, 3, 3, device=DEVICE) / (3 * c**0.5)


def _svd_norm(weight, n):
    blocks = torch.fft.rfft2(weight, s=(n, n)).permute(2, 3, 0, 1)
    return torch.linalg.matrix_norm(blocks, ord=2).max()


@pytest.mark.benchmark(group="circular-exact-norm")
@pytest.mark.parametrize("provider", ["lipkern-power", "batched-svd"])
def test_circular_exact_norm(run_timed, provider, benchmark):
    weight, n = _circular_kernel(), CIRCULAR["size"]
    exact = _svd_norm(weight.double(), n).item()
    matrices = frequency_matrices(weight, (n, n))[0].to(torch.complex64)
    state = {}

    def lipkern_power():
        sigma, _, _ = batched_power_iteration(matrices, n_iter=100)
        state["value"] = sigma.max()

    def batched_svd():
        state["value"] = _svd_norm(weight, n)

    run_timed(lipkern_power if provider == "lipkern-power" else batched_svd, provider, **CIRCULAR,
              iterations=100 if provider == "lipkern-power" else None)
    benchmark.extra_info["relative_error"] = abs(state["value"].item() / exact - 1)


# --- guaranteed upper bounds ---------------------------------------------------------------------------------
def _orthogonium_bound(weight, n, padding_mode):
    get_sv = pytest.importorskip("orthogonium.layers.conv.singular_values.get_sv")
    layer = torch.nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1, padding_mode=padding_mode,
                            bias=False, device=DEVICE)
    layer.weight.data.copy_(weight)
    return get_sv.get_conv_sv(layer, n_iter=6, imsize=n)


@pytest.mark.benchmark(group="conv-upper-bound")
@pytest.mark.parametrize("padding_mode", ["circular", "zeros"])
@pytest.mark.parametrize("provider", ["lipkern", "orthogonium"])
def test_conv_upper_bound(run_timed, provider, padding_mode, benchmark):
    weight, n = _circular_kernel(), CIRCULAR["size"]
    state = {}

    def lipkern_upper():
        state["value"] = conv2d_spectral_norm(weight, n, padding=1, padding_mode=padding_mode,
                                              method="upper").upper

    def orthogonium_upper():
        state["value"] = _orthogonium_bound(weight, n, padding_mode)

    fn = lipkern_upper if provider == "lipkern" else orthogonium_upper
    run_timed(fn, provider, padding_mode=padding_mode, **CIRCULAR)
    reference = conv2d_spectral_norm(weight.double(), n, padding=1, padding_mode=padding_mode, method="power",
                                     n_iter=2000, rtol=1e-9).estimate.item()
    value = state["value"]
    value = value.item() if hasattr(value, "item") else float(value)
    benchmark.extra_info["bound_over_power_estimate"] = value / reference
