"""What a user relies on beyond the math: fixed geometry, argument checks that name the layer, state_dicts that
refuse the wrong input size, and shape propagation on the meta device."""

import copy

import pytest
import torch

from lipkern.nn import AOLConv2d, AOLLinear, CPLConv2d, CPLLinear, SpectralConv2d, SpectralLinear

CONVS = {
    "AOLConv2d": lambda **kw: AOLConv2d(2, 2, 3, padding=1, **kw),
    "SpectralConv2d": lambda **kw: SpectralConv2d(2, 2, 3, padding=1, input_size=5, **kw),
    "CPLConv2d": lambda **kw: CPLConv2d(2, 3, input_size=5, **kw),
}


@pytest.mark.parametrize("name", CONVS)
@pytest.mark.parametrize("attribute, value", [("padding_mode", "reflect"), ("stride", (2, 2)),
                                              ("padding", (0, 0)), ("dilation", (2, 2))])
def test_geometry_cannot_change_after_construction(name, attribute, value):
    layer = CONVS[name]()
    before = getattr(layer, attribute)
    with pytest.raises(AttributeError, match=f"{name}: {attribute} is fixed"):
        setattr(layer, attribute, value)
    assert getattr(layer, attribute) == before
    setattr(layer, attribute, before)  # the same value is not a change


@pytest.mark.parametrize("name", CONVS)
def test_padding_mode_error_names_the_layer(name):
    build = {"AOLConv2d": lambda: AOLConv2d(2, 2, 3, padding_mode="reflect"),
             "SpectralConv2d": lambda: SpectralConv2d(2, 2, 3, padding_mode="reflect"),
             "CPLConv2d": lambda: CPLConv2d(2, padding_mode="reflect")}[name]
    with pytest.raises(ValueError, match=f"^{name}: padding_mode"):
        build()


@pytest.mark.parametrize("build", [lambda: AOLConv2d(2, 2, (3, 3, 3)), lambda: SpectralConv2d(2, 2, (3, 3, 3)),
                                   lambda: CPLConv2d(2, 2, (3, 3, 3)), lambda: AOLConv2d(2, 2, 3, stride=(1, 1, 1))])
def test_three_dimensional_arguments_fail_at_construction(build):
    with pytest.raises(ValueError, match="must be an int >= 1 or a pair of them"):
        build()


@pytest.mark.parametrize("cls", [SpectralConv2d, CPLConv2d])
def test_state_saved_at_another_input_size_is_refused(cls):
    make = (lambda size: SpectralConv2d(2, 3, 3, input_size=size)) if cls is SpectralConv2d else (
        lambda size: CPLConv2d(2, 3, input_size=size))
    saved = make(8).state_dict()
    target = make(16)
    with pytest.raises(RuntimeError, match=r"saved at input size \(8, 8\).*built for \(16, 16\)"):
        target.load_state_dict(saved)
    assert target.input_size == (16, 16)
    lazy = make(None)  # a layer without an input size takes the saved one
    lazy.load_state_dict(saved)
    assert lazy.input_size == (8, 8)


META_LAYERS = [lambda d: AOLConv2d(2, 2, 3, device=d), lambda d: SpectralConv2d(2, 2, 3, input_size=5, device=d),
               lambda d: CPLConv2d(2, input_size=5, device=d), lambda d: AOLLinear(4, 3, device=d),
               lambda d: SpectralLinear(4, 3, device=d), lambda d: CPLLinear(4, device=d)]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("build", META_LAYERS)
def test_meta_device_forward_gives_the_shape(build, train):
    layer = build("meta").train(train)
    conv = isinstance(layer, (AOLConv2d, SpectralConv2d, CPLConv2d))
    shape = (2, 2, 5, 5) if conv else (2, 4)
    expected = build("cpu").train(train)(torch.zeros(shape)).shape  # the same layer with values
    out = layer(torch.empty(shape, device="meta"))
    assert out.is_meta and out.shape == expected


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", CONVS)
def test_unbatched_input_as_nn_conv2d(name, train):
    """A (C, H, W) input is one sample, as for nn.Conv2d: the result is the batched one's first row (a copy of
    the layer runs the batched input: in training each call advances the power iteration)."""
    torch.manual_seed(0)
    layer = CONVS[name](dtype=torch.float64).train(train)
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    out = layer(x)
    batched = twin(x[None])[0]
    assert out.shape == batched.shape
    torch.testing.assert_close(out, batched, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("build", META_LAYERS)
def test_train_step_under_fake_tensor_mode(build):
    """FakeTensorMode (shape propagation, export) runs the custom ops, not kernels on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = build("cpu").train()
    conv = isinstance(layer, (AOLConv2d, SpectralConv2d, CPLConv2d))
    shape = (2, 2, 5, 5) if conv else (2, 4)
    expected = build("cpu").train()(torch.zeros(shape)).shape
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = layer(torch.empty(shape))
        out.sum().backward()
    assert out.shape == expected


def test_cpl_conv_refuses_inputs_that_do_not_fit_the_layer():
    layer = CPLConv2d(2, 3, input_size=5)
    with pytest.raises(ValueError, match="x has 4 channels, weight expects 2"):
        layer(torch.randn(1, 4, 5, 5))
