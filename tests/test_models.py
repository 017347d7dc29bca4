"""lipkern.models: the reference architectures have the published parameter counts, run, and (with exact or
certified layers) are 1-Lipschitz: the dense Jacobian of the whole network at random inputs, float64."""

import pytest
import torch

from lipkern.models import ConvNet, CPLNet, use_eager_cpl
from tests.helpers import spectral_norm


@pytest.fixture(autouse=True)
def torch_backend(knobs):
    knobs(backend="torch")  # whole networks: the kernels are tested in tests/ops


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_papers():
    # "1-Lipschitz Layers Compared": XS 1.57M parameters; CPL-XL 236M (CPL Table 1, via 1-Lip-Compared
    # Table 4)
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
    layer (same weights, same h): each lipkern layer saves its input and σ(Ax + b) (5 channels against 45 in
    the convs); eager also keeps Aᵀσ(·) (for ∂h). Measured 0.55 (the power-iteration vectors and the
    pooling/head are common to both)."""
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


@pytest.mark.parametrize("arch, channels, size, dense_in",
                         [("6C2F", 3, 32, 1024), ("4C3F", 1, 28, 3136), ("8C2F", 3, 64, 9216)])
def test_liplt_nets_have_the_published_shapes(arch, channels, size, dense_in):
    """CRM-LipLT NetworkArchitectures.py: 6C2F FC 1024→512→10 at 32×32, 4C3F FC 3136→512→512→10 at 28×28,
    8C2F FC 9216→256→classes at 64×64 (Tiny-ImageNet)."""
    from torch import nn

    from lipkern.models import LipLTNet

    model = LipLTNet(arch)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert linears[0].in_features == dense_in and linears[-1].out_features == 10
    assert len([m for m in model if isinstance(m, nn.Conv2d)]) == int(arch[0])
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 10)
    half = size // 2
    assert LipLTNet(arch, input_size=half)(torch.zeros(1, channels, half, half)).shape == (1, 10)


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


# --- issue 11: build_model, any input size, empty batches, initialization -----------------------------------
def test_build_model_names_and_families():
    from lipkern.models import MODEL_FAMILIES, build_model

    assert set(MODEL_FAMILIES.values()) == {"aol", "cpl", "sll", "spectral", "liplt", "lmt", "splitz"}
    for name in ("convnet-xs-aol", "convnet-l-spectral", "aol-l", "cpl-xl", "sll-xl", "liplt-8c2f", "lmt", "splitz-s",
                 "splitz-s-aol"):
        assert name in MODEL_FAMILIES
    for name, family in MODEL_FAMILIES.items():
        model = build_model(name, num_classes=7, in_channels=1, input_size=32, device="meta")
        assert model(torch.empty(2, 1, 32, 32, device="meta")).shape == (2, 7), name
    # AOL-L has 136M parameters (AOL paper / 1-Lip-Compared Table 4); LMT's LeNet at 28×28: dense 800 → 500
    assert round(_count(build_model("aol-l", device="meta")) / 1e6) == 136
    lenet = build_model("lmt", in_channels=1, input_size=28)
    assert [m.in_features for m in lenet if isinstance(m, torch.nn.Linear)] == [800, 500]


def test_build_model_errors():
    from lipkern.models import build_model

    with pytest.raises(ValueError, match="convnet-xs-aol.*lmt"):
        build_model("convnet-xxl-aol")
    bad = [("aol-s", {"input_size": 30}, "multiples of 4"), ("lmt", {"input_size": 8}, "16"),
           ("cpl-s", {"input_size": 3}, "4"), ("liplt-8c2f", {"input_size": 8}, "too small"),
           ("convnet-xs-aol", {"input_size": 0}, "positive"),
           ("convnet-xs-aol", {"in_channels": 17}, "in_channels"),
           ("convnet-xs-aol", {"input_size": 1, "num_classes": 20}, "num_classes"),
           ("convnet-xs-aol", {"width": 7}, "even")]
    for name, options, message in bad:
        with pytest.raises(ValueError, match=message):
            build_model(name, device="meta", **options)
    with pytest.raises(TypeError, match="convnet-xs-aol"):
        build_model("convnet-xs-aol", colour="red")


def test_pixel_unshuffle_matches_torch_and_handles_empty_batches():
    from torch import nn

    from lipkern.models import PixelUnshuffle

    x = torch.randn(2, 3, 8, 12)
    torch.testing.assert_close(PixelUnshuffle(2)(x), nn.functional.pixel_unshuffle(x, 2), rtol=0, atol=0)
    torch.testing.assert_close(PixelUnshuffle(4)(x), nn.functional.pixel_unshuffle(x, 4), rtol=0, atol=0)
    assert PixelUnshuffle(2)(torch.empty(0, 8, 32, 32)).shape == (0, 32, 16, 16)
    assert isinstance(PixelUnshuffle(2), nn.PixelUnshuffle)  # lipkern.bounds treats it as the exact 0/1 map
    with pytest.raises(ValueError, match="multiples"):
        PixelUnshuffle(2)(torch.randn(1, 1, 5, 4))


@pytest.mark.parametrize("size, blocks", [(32, 5), (64, 6), (28, 2), (8, 3), (7, 0), ((8, 4), 2)])
def test_convnet_takes_any_input_size(size, blocks):
    """One 2× downsizing block per halving while both sides are even: 32×32 is the paper's 5 blocks."""
    from lipkern.models import PixelUnshuffle, convnet_plan

    assert len(convnet_plan(size)) == blocks
    model = ConvNet("XS", "aol", in_channels=1, image_size=size, width=4)
    assert sum(isinstance(m, PixelUnshuffle) for m in model.modules()) == blocks
    h, w = (size, size) if isinstance(size, int) else size
    for batch in (0, 2):
        assert model(torch.rand(batch, 1, h, w)).shape == (batch, 10)


@pytest.mark.parametrize("layer", ["aol", "cpl", "spectral"])
def test_convnet_other_sizes_are_one_lipschitz_and_take_empty_batches(layer):
    kwargs = {} if layer == "aol" else {"certified": True}
    model = ConvNet("XS", layer, in_channels=2, width=4, image_size=(8, 4), dtype=torch.float64, **kwargs)
    for p in model.parameters():  # away from the identity init
        p.data.add_(0.3 * torch.randn_like(p))
    model.eval()
    x = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(model, x).reshape(10, -1)
    assert spectral_norm(jac) <= 1 + 1e-9
    assert model(x[:0]).shape == (0, 10)


def test_aolnet_small_is_one_lipschitz():
    from lipkern.models import AOLNet

    model = AOLNet("S", in_channels=1, image_size=8, width=4, conv_channels=8, n_conv=2, n_dense=2,
                   dtype=torch.float64)
    for p in model.parameters():
        p.data.add_(0.3 * torch.randn_like(p))
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(model, x).reshape(10, -1)
    assert spectral_norm(jac) <= 1 + 1e-9


@pytest.mark.parametrize("layer", ["aol", "spectral"])
def test_convnet_starts_as_an_isometry_on_images(layer):
    """Regression for the collapse diagnosis: at init the AOL and Spectral ConvNets (Dirac / identity layers)
    keep distances between non-negative images exactly while every pixel fits in the kept channels (8×8, one
    channel, width 8: 64 features). With nn.Conv2d's default init the Spectral stack shrank them ~1e-6."""
    model = ConvNet("XS", layer, in_channels=1, width=8, image_size=8).eval()
    body = model.layers[:-1]  # all but FirstChannels(num_classes)
    x, y = torch.rand(8, 1, 8, 8), torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        ratio = (body(x) - body(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    # AOL's proven rounding margin makes each identity layer contract by its documented cost: on the CPU path
    # at most (ε_fp32 + c_out)/2 + m with r_i = S_i = 1 (module docstring of lipkern.ops.aol); 1 − 1e-5 else
    lowest = 1 - 1e-5
    if layer == "aol":
        from lipkern.nn import AOLConv2d
        from lipkern.ops.aol import _scale_margin, gram_error_bound, output_rounding_margin

        for conv in (m for m in body.modules() if isinstance(m, AOLConv2d)):
            out, inp, kh, kw = conv.weight.shape
            eps = gram_error_bound("fp32", out, kh * kw, torch.float32)[0] + output_rounding_margin(torch.float32)
            lowest *= (1 - _scale_margin(torch.float32, out, inp, kh * kw)) / (1 + eps * (1 + 2.0**-20)) ** 0.5
    assert torch.all(ratio >= lowest - 1e-6) and torch.all(ratio <= 1 + 1e-6), (ratio.min(), lowest)
