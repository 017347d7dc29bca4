"""Reference architectures built from lipkern layers.

- ``ConvNet(size, layer)``: the common ConvNet of "1-Lipschitz Layers Compared" (Prach et al. 2024), sizes
  XS/S/M/L (width 16/32/64/128), usable with AOL, CPL and Spectral layers: zero channel padding to the
  width, a 1×1 conv + MaxMin, 5 downsizing blocks [5 × (k×k conv + MaxMin), FirstChannels(t/2),
  PixelUnshuffle(2)] (k = 3, k = 1 in the last block), flatten, a linear layer and FirstChannels(classes).
- ``CPLNet(size)``: CPL-S/M/L/XL as the CPL code builds them (Meunier et al. 2022): zero channel padding,
  n_conv CPL convs whose hidden width is ``conv_hidden`` (5 in the reference code, not the channel count),
  AvgPool2d(4, divisor_override=4) (norm exactly 1), n_dense CPL dense layers (hidden 2048) and a
  row-normalized last layer (use pairwise margins to certify it: unit rows do not make it 1-Lipschitz).

Every block here is 1-Lipschitz (permutations, projections, MaxMin, the layers) except the last linear layer of
CPLNet, whose pairwise Lipschitz constants are ‖ŵ_i − ŵ_j‖.
"""

from __future__ import annotations

import types

import torch.nn.functional as F
from torch import nn

from lipkern.nn import AOLConv2d, AOLLinear, CPLConv2d, CPLLinear, MaxMin, SpectralConv2d, SpectralLinear
from lipkern.ops.cpl import cpl_conv2d_ref, cpl_linear_ref

__all__ = ["CPLNet", "ConvNet", "FirstChannels", "LinearNormalized", "ZeroChannelPad", "use_eager_cpl"]

CONVNET_WIDTHS = {"XS": 16, "S": 32, "M": 64, "L": 128}
CPL_SIZES = {"S": (20, 7, 45), "M": (30, 10, 60), "L": (50, 10, 90), "XL": (70, 15, 120)}  # n_conv, n_dense, w
LAYERS = ("aol", "cpl", "spectral")


class ZeroChannelPad(nn.Module):
    """Append zero channels up to ``channels`` (an isometry)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x):
        if x.shape[1] > self.channels:
            raise ValueError(f"ZeroChannelPad: input has {x.shape[1]} > {self.channels} channels")
        return F.pad(x, (0, 0, 0, 0, 0, self.channels - x.shape[1]) if x.dim() == 4 else
                     (0, self.channels - x.shape[1]))

    def extra_repr(self):
        return str(self.channels)


class FirstChannels(nn.Module):
    """Keep the first ``channels`` channels (a coordinate projection, norm ≤ 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x):
        return x[:, :self.channels]

    def extra_repr(self):
        return str(self.channels)


class LinearNormalized(nn.Linear):
    """Linear layer with unit-norm rows ("LLN"). Not 1-Lipschitz in spectral norm; its pairwise constants are
    ‖ŵ_i − ŵ_j‖ ≤ 2."""

    def forward(self, x):
        return F.linear(x, F.normalize(self.weight, dim=1), self.bias)


def _conv(layer: str, channels: int, kernel: int, size: int, **kwargs) -> nn.Module:
    if layer == "aol":
        return nn.Sequential(AOLConv2d(channels, channels, kernel, padding=kernel // 2, **kwargs), MaxMin())
    if layer == "cpl":  # MaxMin after CPL too ("1-Lipschitz Layers Compared", Remark 1)
        return nn.Sequential(CPLConv2d(channels, channels, kernel, input_size=size, **kwargs), MaxMin())
    return nn.Sequential(SpectralConv2d(channels, channels, kernel, padding=kernel // 2, input_size=size,
                                        **kwargs), MaxMin())


def _linear(layer: str, features: int, **kwargs) -> nn.Module:
    if layer == "aol":
        return AOLLinear(features, features, **kwargs)
    if layer == "cpl":
        return CPLLinear(features, **kwargs)
    return SpectralLinear(features, features, **kwargs)


class ConvNet(nn.Module):
    """ConvNet XS/S/M/L of "1-Lipschitz Layers Compared" with ``layer`` in 'aol' | 'cpl' | 'spectral'.
    ``image_size`` must be 32 (5 halvings to 1×1); ``width`` overrides the size's width."""

    def __init__(self, size: str = "XS", layer: str = "aol", in_channels: int = 3, num_classes: int = 10,
                 image_size: int = 32, width: int | None = None, **layer_kwargs):
        if size not in CONVNET_WIDTHS or layer not in LAYERS:
            raise ValueError(f"ConvNet: size in {list(CONVNET_WIDTHS)}, layer in {LAYERS}; got {size!r}, {layer!r}")
        if image_size != 32:
            raise ValueError("ConvNet: image_size must be 32 (five 2× downsizing blocks to 1×1)")
        t = width or CONVNET_WIDTHS[size]
        modules: list[nn.Module] = [ZeroChannelPad(t), _conv(layer, t, 1, image_size, **layer_kwargs)]
        resolution = image_size
        for block in range(5):
            kernel = 1 if block == 4 else 3
            modules += [_conv(layer, t, kernel, resolution, **layer_kwargs) for _ in range(5)]
            modules += [FirstChannels(t // 2), nn.PixelUnshuffle(2)]
            t, resolution = 2 * t, resolution // 2
        modules += [nn.Flatten(), _linear(layer, t, **layer_kwargs), FirstChannels(num_classes)]
        super().__init__()
        self.layers = nn.Sequential(*modules)

    def forward(self, x):
        return self.layers(x)


class CPLNet(nn.Module):
    """CPL-S/M/L/XL on 32×32 inputs (see the module docstring): ``body`` (1-Lipschitz) then ``head`` (LLN)."""

    def __init__(self, size: str = "S", in_channels: int = 3, num_classes: int = 10, conv_hidden: int = 5,
                 dense_hidden: int = 2048, image_size: int = 32, **layer_kwargs):
        if size not in CPL_SIZES:
            raise ValueError(f"CPLNet: size must be one of {list(CPL_SIZES)}, got {size!r}")
        n_conv, n_dense, w = CPL_SIZES[size]
        features = w * (image_size // 4) ** 2
        modules: list[nn.Module] = [ZeroChannelPad(w)]
        modules += [CPLConv2d(w, conv_hidden, 3, input_size=image_size, **layer_kwargs) for _ in range(n_conv)]
        modules += [nn.AvgPool2d(4, divisor_override=4), nn.Flatten()]
        modules += [CPLLinear(features, dense_hidden, **layer_kwargs) for _ in range(n_dense)]
        factory = {k: v for k, v in layer_kwargs.items() if k in ("device", "dtype")}
        super().__init__()
        self.body = nn.Sequential(*modules)
        self.head = LinearNormalized(features, num_classes, **factory)

    def forward(self, x):
        return self.head(self.body(x))


def _eager_conv_forward(self, x):
    self._check_input(x)
    return cpl_conv2d_ref(x, self.weight, self.bias, self.step_size(), self.geometry)


def _eager_linear_forward(self, x):
    return cpl_linear_ref(x, self.weight, self.bias, self.step_size())


def use_eager_cpl(model: nn.Module) -> nn.Module:
    """Switch every CPL layer of ``model`` (in place) to the eager formula x − h·Aᵀσ(Ax + b) in plain autograd
    (``cpl_conv2d_ref`` / ``cpl_linear_ref``), with the same parameters, power iteration and step size h: the
    network the lipkern op is compared with in the memory tests and benchmarks. Returns ``model``."""
    for module in model.modules():
        if isinstance(module, CPLConv2d):
            module.forward = types.MethodType(_eager_conv_forward, module)
        elif isinstance(module, CPLLinear):
            module.forward = types.MethodType(_eager_linear_forward, module)
    return model
