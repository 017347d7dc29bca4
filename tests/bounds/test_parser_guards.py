"""Ways a model can compute something other than what its weights say; each once gave a bound far below the
network's true Lipschitz constant (an independent review found them). The bound must refuse, not guess."""

import math

import pytest
import torch
from torch import nn

from lipkern.bounds import lipschitz_bound, lipschitz_estimate
from lipkern.bounds.chain import _row_norms_upper, matrix_norm_upper
from lipkern.certify import SplitzCertifier
from lipkern.certify.splitz import LocalReluLipschitz
from lipkern.models import Residual


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch, knobs):
    knobs(backend="torch")


class ScaledSequential(nn.Sequential):
    def forward(self, x):
        return 100 * super().forward(x)


class ScaledIdentity(nn.Identity):
    def forward(self, x):
        return 50 * x


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 100 * super().forward(x)


class ScaledFlatten(nn.Flatten):
    def forward(self, x):
        return 7 * super().forward(x)


@pytest.mark.parametrize("model", [ScaledSequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4), ScaledIdentity()),
                                   nn.Sequential(ScaledLinear(4, 4)), nn.Sequential(ScaledFlatten(), nn.Linear(4, 3)),
                                   Residual(ScaledSequential(nn.Linear(4, 4)))],
                         ids=["sequential", "identity", "linear", "flatten", "residual"])
@pytest.mark.parametrize("sound", [True, False])
def test_a_subclass_that_overrides_forward_is_refused(model, sound):
    with pytest.raises(TypeError, match="unsupported module"):
        lipschitz_bound(model, (4,)) if sound else lipschitz_estimate(model, (4,), n_iter=2)


def test_a_declared_constant_makes_an_overriding_subclass_usable():
    layer = ScaledLinear(4, 4)
    bound = lipschitz_bound(nn.Sequential(layer), (4,), lipschitz_constants={layer: 1e3})
    assert float(bound) == pytest.approx(1e3, rel=1e-12)


def test_forward_hooks_are_refused():
    hooked = nn.Linear(4, 4)
    hooked.register_forward_hook(lambda module, args, out: 30 * out)
    with pytest.raises(TypeError, match="forward hooks"):
        lipschitz_bound(nn.Sequential(hooked), (4,))
    classic = torch.nn.utils.spectral_norm(nn.Linear(4, 4))  # recomputes its weight in a pre-hook
    with pytest.raises(TypeError, match="parametrizations"):
        lipschitz_bound(nn.Sequential(classic), (4,))


def test_parametrized_spectral_norm_is_bounded_by_its_computed_weight():
    layer = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(5, 4, dtype=torch.float64)).eval()
    exact = torch.linalg.matrix_norm(layer.weight.detach(), 2)
    bound = lipschitz_bound(nn.Sequential(layer), (5,))
    assert exact <= bound <= exact * (1 + 1e-9)


def test_in_place_activations_inside_a_residual_block_are_refused():
    # LeakyReLU(3, inplace) overwrites x before the identity skip adds it: the block is ~3-Lipschitz, not ~1
    block = Residual(nn.Sequential(nn.LeakyReLU(3.0, inplace=True), nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="in-place"):
        lipschitz_bound(block, (4,))
    safe = Residual(nn.Sequential(nn.LeakyReLU(3.0), nn.Linear(4, 4)))
    assert torch.isfinite(lipschitz_bound(safe, (4,)))


def test_splitz_local_bound_refuses_overriding_subclasses_and_hooks():
    with pytest.raises(ValueError, match="nested\\) nn.Sequential"):
        LocalReluLipschitz(nn.Sequential(ScaledLinear(4, 4), nn.ReLU()), (4,))
    hooked = nn.Linear(4, 4)
    hooked.register_forward_hook(lambda module, args, out: 50 * out)
    with pytest.raises(ValueError, match="nested\\) nn.Sequential"):
        LocalReluLipschitz(nn.Sequential(hooked, nn.ReLU()), (4,))
    # the certifier then has no bound at all for these left halves (the global bound refuses them too)
    certifier = SplitzCertifier(nn.Sequential(ScaledLinear(4, 4)), nn.Linear(4, 3), 0.25, 3, input_shape=(4,))
    with pytest.raises(ValueError, match="no Lipschitz bound"):
        certifier.lipschitz_at(torch.zeros(4), 1.0)


@pytest.mark.parametrize("scale", [1e-320, 3e-310, 1e-300])
def test_norm_bounds_of_tiny_matrices_are_finite_and_above_the_truth(scale):
    m = torch.tensor([[scale, 0.0], [0.0, 0.0]], dtype=torch.float64)
    assert matrix_norm_upper(m) >= scale and math.isfinite(matrix_norm_upper(m))
    rows = torch.tensor([[scale, 0.0], [3e-310, 1e-311]], dtype=torch.float64)
    norms = _row_norms_upper(rows)
    assert torch.isfinite(norms).all()
    assert norms[0] >= scale and norms[1] >= math.hypot(3e-310, 1e-311)


def test_computing_a_bound_leaves_buffers_unchanged():
    from lipkern.nn import CPLLinear

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), CPLLinear(4), nn.Linear(4, 3)).train()
    model[1].running_mean.fill_(0.5)
    before = {name: b.clone() for name, b in model.named_buffers()}
    lipschitz_estimate(model, (4,), method="product", n_iter=2,
                       lipschitz_constants={model[2]: 1.0})
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name


@pytest.mark.parametrize("conv", [True, False])
def test_exported_cpl_layers_are_bounded(conv):
    from lipkern.nn import CPLConv2d, CPLLinear, PlainCPLConv2d, PlainCPLLinear

    torch.manual_seed(0)
    layer = (CPLConv2d(2, 3, input_size=4, certified=True) if conv else CPLLinear(5, 4, certified=True)).double()
    plain = layer.eval().to_vanilla()
    shape = (2, 4, 4) if conv else (5,)
    assert float(lipschitz_bound(nn.Sequential(plain), shape)) <= 1 + 1e-12  # h ≤ 2/‖W‖², proven
    # a step size 3x too large: the layer is not 1-Lipschitz, the bound must cover its Jacobians
    big = (PlainCPLConv2d if conv else PlainCPLLinear)(plain.weight.detach(), plain.bias.detach(), plain.h * 3,
                                                       *((plain.padding, plain.padding_mode) if conv else ()))
    bound = float(lipschitz_bound(nn.Sequential(big), shape))
    for seed in range(5):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda t: big(t[None])[0], x).reshape(x.numel(), x.numel())
        assert torch.linalg.matrix_norm(jac, 2) <= bound
    assert bound > 1.5
