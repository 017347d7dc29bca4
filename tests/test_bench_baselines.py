"""The benchmarks' eager baselines compute what lipkern's layers compute (a row compares equal work): the
reference-code CPL layers of benchmarks/bench_models.py against lipkern's training-mode layers, float64, from
the same power-iteration vector."""

import pytest
import torch

import lipkern
from benchmarks.bench_models import EagerCPLConv2d, EagerCPLLinear, _network


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_eager_cpl_conv_matches_the_training_layer(kernel_size):
    torch.manual_seed(0)
    layer = lipkern.nn.CPLConv2d(3, kernel_size=kernel_size, input_size=5, dtype=torch.float64).train()
    eager = EagerCPLConv2d(layer).double()
    eager.u.copy_(layer.u / layer.u.norm())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(eager(x), layer(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(eager.u[0] / eager.u.norm(), layer.u / layer.u.norm(), rtol=1e-10, atol=1e-12)


def test_eager_cpl_linear_matches_the_training_layer():
    torch.manual_seed(0)
    layer = lipkern.nn.CPLLinear(6, dtype=torch.float64).train()
    eager = EagerCPLLinear(layer).double()
    eager.u.copy_(layer.u / layer.u.norm())
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(eager(x), layer(x), rtol=1e-10, atol=1e-12)


def test_the_eager_cpl_network_holds_no_lipkern_layer():
    """(so that paired CPU rounds do not share lipkern's grouped power step between the two networks)"""
    net = _network("convnet-xs-cpl", "eager")
    assert not any(isinstance(m, (lipkern.nn.CPLConv2d, lipkern.nn.CPLLinear)) for m in net.modules())
    assert any(isinstance(m, EagerCPLConv2d) for m in net.modules())
    assert any(isinstance(m, EagerCPLLinear) for m in net.modules())
