"""Reference architectures built from lipkern layers.

- ``ConvNet(size, layer)``: the common ConvNet of "1-Lipschitz Layers Compared" (Prach et al. 2024), sizes
  XS/S/M/L (width 16/32/64/128), usable with AOL, CPL and Spectral layers: zero channel padding to the
  width, a 1×1 conv + MaxMin, 5 downsizing blocks [5 × (k×k conv + MaxMin), FirstChannels(t/2),
  PixelUnshuffle(2)] (k = 3, k = 1 in the last block), flatten, a linear layer and FirstChannels(classes).
- ``CPLNet(size)``: CPL-S/M/L/XL as the CPL code builds them (Meunier et al. 2022): zero channel padding,
  n_conv CPL convs whose hidden width is ``conv_hidden`` (5 in the reference code, not the channel count),
  AvgPool2d(4, divisor_override=4) (norm exactly 1), n_dense CPL dense layers (hidden 2048) and a
  row-normalized last layer (use pairwise margins to certify it: unit rows do not make it 1-Lipschitz).
- ``LipLTNet(arch)``: the plain ReLU CNNs of LipLT / CRM (Fazlyab et al. 2023): "6C2F" (CIFAR-10, 32×32) and
  "4C3F" (MNIST, 28×28), an ``nn.Sequential`` whose Lipschitz constant :func:`lipkern.bounds.lipschitz_bound`
  bounds (LipLT or product of norms).
- ``Normalize(mean, std)``: per-channel input standardization (x − mean)/std, a diagonal linear map (its
  Lipschitz constant 1/min std enters the model's); ``Residual(branch, skip=None)``: skip(x) + branch(x).

Every block here is 1-Lipschitz (permutations, projections, MaxMin, the layers) except the last linear layer of
CPLNet, whose pairwise Lipschitz constants are ‖ŵ_i − ŵ_j‖.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from lipkern.nn import AOLConv2d, AOLLinear, CPLConv2d, CPLLinear, MaxMin, SpectralConv2d, SpectralLinear
from lipkern.ops.cpl import cpl_conv2d_ref, cpl_linear_ref

__all__ = ["CPLNet", "ConvNet", "FirstChannels", "LinearNormalized", "LipLTNet", "Normalize", "Residual",
           "ZeroChannelPad", "use_eager_cpl"]

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


class Normalize(nn.Module):
    """(x − mean)/std per channel (dim 1) for inputs (N, C, ...) or (N, C): input standardization inside the
    model. ``mean`` and ``std`` (C,) become buffers (a scalar is one value for every channel); std > 0."""

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.get_default_dtype()).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.get_default_dtype()).reshape(-1)
        if mean.numel() != std.numel() and min(mean.numel(), std.numel()) != 1:
            raise ValueError(f"Normalize: mean has {mean.numel()} entries, std {std.numel()}")
        if not bool((std > 0).all()):
            raise ValueError("Normalize: std must be positive")
        channels = max(mean.numel(), std.numel())
        self.register_buffer("mean", mean.expand(channels).clone())
        self.register_buffer("std", std.expand(channels).clone())

    def forward(self, x):
        if x.dim() < 2 or x.shape[1] != self.std.numel():
            raise ValueError(f"Normalize: expected (N, {self.std.numel()}, ...) inputs, got {tuple(x.shape)}")
        shape = (-1, *([1] * (x.dim() - 2)))
        return (x - self.mean.reshape(shape)) / self.std.reshape(shape)

    def extra_repr(self):
        return f"channels={self.std.numel()}"


class Residual(nn.Module):
    """skip(x) + branch(x); ``skip=None`` is the identity. Its Lipschitz constant is at most L(skip) + L(branch)."""

    def __init__(self, branch: nn.Module, skip: nn.Module | None = None):
        super().__init__()
        self.branch, self.skip = branch, skip

    def forward(self, x):
        return (x if self.skip is None else self.skip(x)) + self.branch(x)


LIPLT_ARCHS = {  # convs (out, kernel, stride), dense widths; every conv has padding 1
    "6C2F": ([(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2), (64, 3, 1), (64, 4, 2)], [512]),
    "4C3F": ([(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)], [512, 512]),
}
_LIPLT_DEFAULTS = {"6C2F": (3, 32), "4C3F": (1, 28)}  # in_channels, input_size


class LipLTNet(nn.Sequential):
    """The plain ReLU CNNs of LipLT / CRM (CRM-LipLT ``NetworkArchitectures.py``): convs with padding 1 and
    kernels 3 (stride 1) / 4 (stride 2), ReLU after every layer but the last, flatten, dense layers.

    - "6C2F" (CIFAR-10, 32×32): 3→32→32→64→64→64→64 channels, then 1024→512→num_classes;
    - "4C3F" (MNIST, 28×28): 1→32→32→64→64, then 3136→512→512→num_classes.
    ``in_channels`` and ``input_size`` default to the dataset's (3/32, 1/28); another input size changes the
    flattened width (computed here). No normalization layers (add :class:`Normalize` in front if needed).
    """

    def __init__(self, arch: str = "6C2F", in_channels: int | None = None, num_classes: int = 10,
                 input_size: int | None = None, device=None, dtype=None):
        if arch not in LIPLT_ARCHS:
            raise ValueError(f"LipLTNet: arch must be one of {list(LIPLT_ARCHS)}, got {arch!r}")
        convs, dense = LIPLT_ARCHS[arch]
        default_channels, default_size = _LIPLT_DEFAULTS[arch]
        channels = default_channels if in_channels is None else in_channels
        size = default_size if input_size is None else input_size
        factory = {"device": device, "dtype": dtype}
        modules: list[nn.Module] = []
        for out, kernel, stride in convs:
            modules += [nn.Conv2d(channels, out, kernel, stride, 1, **factory), nn.ReLU()]
            channels, size = out, (size + 2 - kernel) // stride + 1
            if size < 1:
                raise ValueError(f"LipLTNet: input_size {input_size} is too small for {arch}")
        features = channels * size * size
        modules.append(nn.Flatten())
        for width in dense:
            modules += [nn.Linear(features, width, **factory), nn.ReLU()]
            features = width
        modules.append(nn.Linear(features, num_classes, **factory))
        super().__init__(*modules)
        self.arch = arch


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
