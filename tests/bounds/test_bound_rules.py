"""The registry of bound rules (lipkern.bounds.parsing): module types bring their own rule; lipkern.bounds
imports no layer or model code."""

import ast
import pathlib

import pytest
import torch
from torch import nn

import lipkern
from lipkern.bounds import BoundParser, lipschitz_bound, register_bound_rule
from lipkern.bounds.parsing import _RULES, bound_rule_for, supported_modules, unregister_bound_rule
from tests.helpers import ChannelScale, dense_jacobian, spectral_norm


@pytest.fixture
def channel_scale_rule():
    @register_bound_rule(ChannelScale)
    def rule(parser: BoundParser, module, shape):
        return parser.diag(module, shape, lambda precise: module.scale, 0.0)

    yield rule
    unregister_bound_rule(ChannelScale)


def test_a_registered_rule_bounds_a_user_layer_inside_liplt(channel_scale_rule):
    """A user's layer with its own rule is a map of the LipLT chain: the bound is ≥ the norm of the dense
    Jacobian (the network is linear between ReLUs that are active on a positive input) and tighter than the
    product of layer norms."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), ChannelScale([0.5, 2.0, 1.5]), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 5)).double().eval()
    bound = lipschitz_bound(model, (2, 4, 4)).item()
    product = lipschitz_bound(model, (2, 4, 4), method="product").item()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    sampled = max(spectral_norm(dense_jacobian(model, x + 0.01 * torch.randn_like(x))) for _ in range(10))
    assert sampled <= bound <= product * (1 + 1e-12)
    linear_part = nn.Sequential(*list(model)[:2], nn.Flatten()).double()
    exact = spectral_norm(dense_jacobian(linear_part, x))  # conv then scale: one map, exact chain norm
    assert exact <= lipschitz_bound(linear_part, (2, 4, 4)).item() <= exact * (1 + 1e-9)


def test_unregistered_and_overridden_forwards_are_refused(channel_scale_rule):
    class Doubled(nn.Linear):  # a subclass that computes something else than nn.Linear
        def forward(self, x):
            return 2 * super().forward(x)

    class PlainSubclass(nn.Linear):  # keeps nn.Linear's forward: nn.Linear's rule applies
        pass

    assert bound_rule_for(Doubled(3, 3)) is None
    assert bound_rule_for(PlainSubclass(3, 3)) is bound_rule_for(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="unsupported module .*Doubled"):
        lipschitz_bound(nn.Sequential(Doubled(3, 3)), (3,))
    assert "ChannelScale" in supported_modules()


def test_what_a_module_computes_decides_not_its_type(channel_scale_rule):
    """An instance-level forward, or a subclass that overrides a method the forward calls
    (nn.Conv2d._conv_forward, AOL's rescaled_weight), computes something else: refused. A class registered
    twice raises unless replace=True."""
    linear = nn.Linear(3, 3)
    original = linear.forward
    linear.forward = lambda x: 10 * original(x)
    with pytest.raises(TypeError, match="unsupported module"):
        lipschitz_bound(nn.Sequential(linear), (3,))

    class LoudConv(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(x, 10 * weight, bias)

    class LoudAOL(lipkern.nn.AOLLinear):
        def rescaled_weight(self):
            return 10 * super().rescaled_weight()

    for module, shape in ((LoudConv(1, 1, 3, padding=1), (1, 4, 4)), (LoudAOL(3, 3), (3,))):
        assert bound_rule_for(module) is None
        with pytest.raises(TypeError, match="unsupported module"):
            lipschitz_bound(nn.Sequential(module.eval()), shape)
    eager = lipkern.models.use_eager_cpl(nn.Sequential(lipkern.nn.CPLLinear(4, certified=True)).eval())
    assert lipschitz_bound(eager, (4,)).item() == 1.0  # marked: the same function as the layer's forward
    with pytest.raises(ValueError, match="already has a rule"):
        register_bound_rule(ChannelScale)(lambda parser, module, shape: parser.constant(module, 1.0, shape))
    register_bound_rule(ChannelScale, replace=True)(channel_scale_rule)


def test_lipkern_layers_and_models_register_their_rules():
    for cls in (lipkern.nn.AOLLinear, lipkern.nn.AOLConv2d, lipkern.nn.SpectralConv2d, lipkern.nn.SpectralLinear,
                lipkern.nn.CPLConv2d, lipkern.nn.CPLLinear, lipkern.nn.SLLConv2d, lipkern.nn.SLLLinear,
                lipkern.nn.MaxMin, lipkern.models.Residual, lipkern.models.Normalize, lipkern.models.ConvNet,
                lipkern.models.CPLNet, lipkern.models.LinearNormalized, lipkern.models.PixelUnshuffle):
        assert cls in _RULES, cls
        assert cls.__module__ in _RULES[cls].__module__ or _RULES[cls].__module__.startswith("lipkern.bounds")


def test_bounds_imports_no_layer_or_model_code():
    """Data flows down: lipkern.bounds knows torch's layers and the rules registered with it, nothing above."""
    root = pathlib.Path(lipkern.__file__).parent / "bounds"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                assert not name.startswith(("lipkern.nn", "lipkern.models", "lipkern.certify", "lipkern.train")), \
                    f"{path.name} imports {name}"
