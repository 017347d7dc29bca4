"""lipkern.models: the reference architectures have the published parameter counts, run, and (with exact or
certified layers) are 1-Lipschitz: the dense Jacobian of the whole network at random inputs, float64."""

import pytest
import torch

from lipkern.models import ConvNet, CPLNet, use_eager_cpl
from tests.helpers import spectral_norm


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("LIPKERN_BACKEND", "torch")  # whole networks: the kernels are tested in tests/ops


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_papers():
    # "1-Lipschitz Layers Compared": XS 1.57M parameters; CPL-XL 236M (CPL Table 1, via 1-Lip-Compared Table 4)
    assert round(_count(ConvNet("XS", "aol", device="meta")) / 1e6, 2) == 1.57
    assert round(_count(ConvNet("S", "cpl", device="meta")) / 1e6, 2) == 6.28
    assert round(_count(CPLNet("XL", device="meta")) / 1e6) == 236


@pytest.mark.parametrize("layer", ["aol", "cpl", "spectral"])
def test_convnet_is_one_lipschitz(layer):
    kwargs = {} if layer == "aol" else {"certified": True}
    model = ConvNet("XS", layer, width=4, dtype=torch.float64, **kwargs).eval()
    for _ in range(2):
        x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(model, x).reshape(10, -1)
        assert spectral_norm(jac) <= 1 + 1e-9


def test_cplnet_runs_and_its_body_does_not_expand_distances():
    """The body's Jacobian is too large for a CPU test; sampled pairs are a necessary condition."""
    model = CPLNet("S", dense_hidden=64, dtype=torch.float64, certified=True).eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = x + 0.1 * torch.randn_like(x)
    assert model(x).shape == (4, 10)
    body = model.body  # all but the row-normalized head
    ratio = (body(x) - body(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert (ratio <= 1 + 1e-12).all() and (ratio > 0.01).all()


def test_bad_arguments():
    with pytest.raises(ValueError):
        ConvNet("XXL")
    with pytest.raises(ValueError):
        ConvNet("XS", "lot")
    with pytest.raises(ValueError):
        ConvNet("XS", image_size=0)
    with pytest.raises(ValueError):
        CPLNet("XS")


def _saved_activation_bytes(model, x):
    """Bytes of the distinct storages a forward saves for its backward, parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(n for ptr, n in saved.items() if ptr not in own), out


def test_cplnet_saves_about_half_the_bytes_of_the_eager_network():
    """CPL-S (8×8 inputs, 64 dense hidden units) against the same network with the eager formula in every CPL
    layer (same weights, same h): each lipkern layer saves its input and σ(Ax + b) (5 channels against 45 in the
    convs); eager also keeps Aᵀσ(·) (for ∂h). Measured 0.55 (the power-iteration vectors and the pooling/head
    are common to both)."""
    model = CPLNet("S", image_size=8, dense_hidden=64).train()
    eager = use_eager_cpl(CPLNet("S", image_size=8, dense_hidden=64).train())
    eager.load_state_dict(model.state_dict())
    x = torch.randn(16, 3, 8, 8)
    ours, out = _saved_activation_bytes(model, x)
    theirs, out_eager = _saved_activation_bytes(eager, x)
    assert torch.allclose(out, out_eager, rtol=1e-4, atol=1e-5)
    assert ours <= 0.6 * theirs, (ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cplnet_train_step_under_cpu_autocast(dtype):
    """The CPL ops run in x's dtype under autocast (float32 here), the head in the autocast dtype."""
    model = CPLNet("S", image_size=8, dense_hidden=32).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert logits.dtype == dtype and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("arch, channels, size, dense_in", [("6C2F", 3, 32, 1024), ("4C3F", 1, 28, 3136)])
def test_liplt_nets_have_the_published_shapes(arch, channels, size, dense_in):
    """CRM-LipLT NetworkArchitectures.py: 6C2F FC 1024→512→10 at 32×32, 4C3F FC 3136→512→512→10 at 28×28."""
    from torch import nn

    from lipkern.models import LipLTNet

    model = LipLTNet(arch)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert linears[0].in_features == dense_in and linears[-1].out_features == 10
    assert len([m for m in model if isinstance(m, nn.Conv2d)]) == int(arch[0])
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 10)
    assert LipLTNet(arch, input_size=16)(torch.zeros(1, channels, 16, 16)).shape == (1, 10)


def test_normalize_and_residual():
    from torch import nn

    from lipkern.models import Normalize, Residual

    norm = Normalize([1.0, 2.0], [0.5, 4.0])
    x = torch.randn(3, 2, 4, 4)
    expected = (x - torch.tensor([1.0, 2.0])[:, None, None]) / torch.tensor([0.5, 4.0])[:, None, None]
    torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(Normalize(0.5, 2.0)(x[:, :1]), (x[:, :1] - 0.5) / 2)
    with pytest.raises(ValueError, match="positive"):
        Normalize([0.0], [0.0])
    branch, skip = nn.Linear(3, 3), nn.Linear(3, 3)
    y = torch.randn(2, 3)
    torch.testing.assert_close(Residual(branch)(y), y + branch(y))
    torch.testing.assert_close(Residual(branch, skip)(y), skip(y) + branch(y))
