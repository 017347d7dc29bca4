"""Reference architectures built from lipkern layers; :func:`build_model` builds each by name (see
:data:`MODEL_FAMILIES`) for a class count, input channels and any input size the architecture admits.

- ``ConvNet(size, layer)``: the common ConvNet of "1-Lipschitz Layers Compared" (Prach et al. 2024), sizes
  XS/S/M/L (width 16/32/64/128), usable with AOL, CPL and Spectral layers: zero channel padding to the
  width, a 1×1 conv + MaxMin, downsizing blocks [5 × (k×k conv + MaxMin), FirstChannels(t/2),
  PixelUnshuffle(2)] (5 at 32×32; one per halving in general), flatten, a linear layer,
  FirstChannels(classes).
- ``CPLNet(size)``: CPL-S/M/L/XL as the CPL code builds them (Meunier et al. 2022): zero channel padding,
  n_conv CPL convs whose hidden width is ``conv_hidden`` (5 in the reference code, not the channel count),
  AvgPool2d(4, divisor_override=4) (norm exactly 1), n_dense CPL dense layers (hidden 2048) and a
  row-normalized last layer (use pairwise margins to certify it: unit rows do not make it 1-Lipschitz).
- ``CPLNet(size, layer="sll")``: SLL-S/M/L/XL (Araujo et al. 2023): the same body with SLL layers
  (``lipkern.nn.SLLConv2d`` / ``SLLLinear``) and the row-normalized head (certify it pairwise).
- ``AOLNet(size)``: AOL-S/M/L, the patchwise network of Prach & Lampert 2022 (Table 2).
- ``LipLTNet(arch)``: the plain ReLU CNNs of LipLT / CRM (Fazlyab et al. 2023): "4C3F" (MNIST), "6C2F"
  (CIFAR-10), "8C2F" (Tiny-ImageNet), ``nn.Sequential``s whose Lipschitz constant
  :func:`lipkern.bounds.lipschitz_bound` bounds (LipLT or product of norms).
- ``LMTNet()``: the LeNet-like MNIST network of LMT (Tsuzuku et al. 2018), plain layers.
- ``SplitzNet(left)``: a SPLITZ network (Zhong & Tandon 2024), noise after a short left half (BatchNorm or AOL
  with MaxMin), certified by randomized smoothing of the right half and the left half's local bound.
- ``Normalize(mean, std)``: per-channel input standardization (x − mean)/std, a diagonal linear map (its
  Lipschitz constant 1/min std enters the model's); ``Residual(branch, skip=None)``: skip(x) + branch(x).

Initialization and training (measured on scikit-learn's digits, see tests/test_training_families.py): the AOL
and Spectral layers of ConvNet start as the identity (Dirac kernels), so the body is an isometry on images
as long as the pixels fit in the kept channels; the 10 logits then read 10 input coordinates, so on random
inputs the network contracts by about √(10/d) (d = input size): expected for any 1-Lipschitz map to 10 logits.
A deep AOL stack must not be trained with Adam at lr 1e-3 (or SGD at lr 0.1): the steps add small dense
entries to the Dirac kernels, AOL's bound Σ|WᵀW| charges every one of them, each layer's scale drops (mean
column energy 1 → 0.65 in 10 Adam steps) and 26 layers multiply to ~1e-6: the output becomes constant. The
Spectral ConvNet does the same under Adam at 1e-3 (dense updates raise each layer's top singular value above
the rest). Use SGD (Nesterov, lr 1e-3 to 1e-2 for AOL, ≤ 3e-3 for Spectral at 32×32) with the offset
cross-entropy (temperature 1/4), and train at the data's own size rather than zero-padding small images.

Every block here is 1-Lipschitz (permutations, projections, MaxMin, the layers) except the last linear layer
of CPLNet, whose pairwise Lipschitz constants are ‖ŵ_i − ŵ_j‖.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from lipkern.nn import (AOLConv2d, AOLLinear, CPLConv2d, CPLLinear, MaxMin, SLLConv2d, SLLLinear, SpectralConv2d,
                        SpectralLinear)
from lipkern.ops.cpl import cpl_conv2d_ref, cpl_linear_ref
from lipkern.bounds.operators import LinearMap
from lipkern.bounds.parsing import BoundParser, pixel_unshuffle_rule, register_bound_rule
from lipkern.certify.rounding import register_rounding_rule

__all__ = ["AOLNet", "CPLNet", "ConvNet", "FirstChannels", "LMTNet", "LinearNormalized", "LipLTNet",
           "MODEL_FAMILIES", "Normalize", "PixelUnshuffle", "Residual", "SplitzNet", "ZeroChannelPad", "build_model",
           "to_vanilla", "use_eager_cpl"]

CONVNET_WIDTHS = {"XS": 16, "S": 32, "M": 64, "L": 128}
# n_conv, n_dense, w
CPL_SIZES = {"S": (20, 7, 45), "M": (30, 10, 60), "L": (50, 10, 90), "XL": (70, 15, 120)}
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


class PixelUnshuffle(nn.PixelUnshuffle):
    """``nn.PixelUnshuffle`` by a reshape and a permutation (the same channel order c·r² + i·r + j): a
    permutation of the coordinates, so an isometry. torch's ``F.pixel_unshuffle`` returns a wrong shape on an
    empty batch ((0, 8, 32, 32) stays (0, 8, 32, 32)); this one gives (0, 32, 16, 16). Subclassing
    ``nn.PixelUnshuffle`` keeps it recognized as the exact 0/1 map by :mod:`lipkern.bounds`."""

    def forward(self, x):
        r = self.downscale_factor
        if x.dim() != 4 or x.shape[-2] % r or x.shape[-1] % r:
            raise ValueError(f"PixelUnshuffle({r}): expected (N, C, H, W) with H, W multiples of {r}, got "
                             f"{tuple(x.shape)}")
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // r, r, w // r, r).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(n, c * r * r, h // r, w // r)


def _size_pair(input_size, who: str) -> tuple[int, int]:
    """An int or an (H, W) pair of positive ints, as (H, W)."""
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size):
        raise ValueError(f"{who}: input_size must be a positive int or a pair (H, W) of them, "
                         f"got {input_size!r}")
    return size


def _check_channels(who: str, in_channels: int, width: int) -> None:
    if not isinstance(in_channels, int) or in_channels < 1 or in_channels > width:
        raise ValueError(f"{who}: in_channels must be an int in [1, {width}] (zero-padded to {width} "
                         "channels), "
                         f"got {in_channels!r}")


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
    """skip(x) + branch(x); ``skip=None`` is the identity. Its Lipschitz constant is at most
    L(skip) + L(branch)."""

    def __init__(self, branch: nn.Module, skip: nn.Module | None = None):
        super().__init__()
        self.branch, self.skip = branch, skip

    def forward(self, x):
        return (x if self.skip is None else self.skip(x)) + self.branch(x)


LIPLT_ARCHS = {  # convs (out, kernel, stride, padding), dense widths (CRM-LipLT NetworkArchitectures.py)
    "4C3F": ([(32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)], [512, 512]),
    "6C2F": ([(32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)],
             [512]),
    "8C2F": ([(64, 3, 1, 1), (64, 3, 1, 0), (64, 4, 2, 0), (128, 3, 1, 1), (128, 3, 1, 1), (128, 4, 2, 0),
              (256, 3, 1, 1), (256, 4, 2, 0)], [256]),
}
_LIPLT_DEFAULTS = {"6C2F": (3, 32), "4C3F": (1, 28), "8C2F": (3, 64)}  # in_channels, input_size


class LipLTNet(nn.Sequential):
    """The plain ReLU CNNs of LipLT / CRM (CRM-LipLT ``NetworkArchitectures.py``): convs, ReLU after every
    layer but the last, flatten, dense layers.

    - "4C3F" (MNIST, 28×28): 1→32→32→64→64 (kernels 3/4, strides 1/2, padding 1), then 3136→512→512→classes;
    - "6C2F" (CIFAR-10, 32×32): 3→32→32→64→64→64→64, same alternation, then 1024→512→classes;
    - "8C2F" (Tiny-ImageNet, 64×64): 3→64 (3, p1), 64→64 (3, p0), 64→64 (4, s2, p0), 64→128 (3, p1),
      128→128 (3, p1), 128→128 (4, s2, p0), 128→256 (3, p1), 256→256 (4, s2, p0), then 9216→256→classes.
    ``in_channels`` and ``input_size`` (int or (H, W)) default to the dataset's; another input size changes
    the flattened width (computed here; a ValueError if a conv gets no output pixel). No normalization layers.
    """

    def __init__(self, arch: str = "6C2F", in_channels: int | None = None, num_classes: int = 10,
                 input_size=None, device=None, dtype=None):
        if arch not in LIPLT_ARCHS:
            raise ValueError(f"LipLTNet: arch must be one of {list(LIPLT_ARCHS)}, got {arch!r}")
        convs, dense = LIPLT_ARCHS[arch]
        default_channels, default_size = _LIPLT_DEFAULTS[arch]
        channels = default_channels if in_channels is None else in_channels
        h, w = _size_pair(default_size if input_size is None else input_size, f"LipLTNet({arch!r})")
        factory = {"device": device, "dtype": dtype}
        modules: list[nn.Module] = []
        for out, kernel, stride, pad in convs:
            modules += [nn.Conv2d(channels, out, kernel, stride, pad, **factory), nn.ReLU()]
            channels, h, w = out, (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
            if h < 1 or w < 1:
                raise ValueError(f"LipLTNet: input_size {input_size} is too small for {arch}")
        features = channels * h * w
        modules.append(nn.Flatten())
        for width in dense:
            modules += [nn.Linear(features, width, **factory), nn.ReLU()]
            features = width
        modules.append(nn.Linear(features, num_classes, **factory))
        super().__init__(*modules)
        self.arch = arch


def _conv(layer: str, channels: int, kernel: int, size, **kwargs) -> nn.Module:
    if layer == "aol":
        return nn.Sequential(AOLConv2d(channels, channels, kernel, padding=kernel // 2, **kwargs), MaxMin())
    if layer == "cpl":  # MaxMin after CPL too ("1-Lipschitz Layers Compared", Remark 1)
        return nn.Sequential(CPLConv2d(channels, channels, kernel, input_size=size, **kwargs), MaxMin())
    conv = SpectralConv2d(channels, channels, kernel, padding=kernel // 2, input_size=size, **kwargs)
    _identity_init(conv)
    return nn.Sequential(conv, MaxMin())


def _linear(layer: str, features: int, **kwargs) -> nn.Module:
    if layer == "aol":
        return AOLLinear(features, features, **kwargs)
    if layer == "cpl":
        return CPLLinear(features, **kwargs)
    return _identity_init(SpectralLinear(features, features, **kwargs))


def _identity_init(layer: nn.Module) -> nn.Module:
    """Dirac kernel / identity matrix and zero bias: the operator is the identity (norm exactly 1), as AOL's
    size-preserving layers start. With nn.Conv2d's default init a spectrally normalized 3×3 conv has a typical
    gain far below 1 (its norm is the largest singular value); 26 of them in a ConvNet shrink distances by
    ~1e-8 at 32×32 and training never starts (measured; see tests/test_models.py)."""
    with torch.no_grad():
        if not layer.weight.is_meta:
            (nn.init.dirac_ if layer.weight.dim() == 4 else nn.init.eye_)(layer.weight)
            if layer.bias is not None:
                layer.bias.zero_()
    return layer


def convnet_plan(input_size, blocks: int | None = None) -> list[tuple[int, int]]:
    """The resolutions (H, W) at which ConvNet's downsizing blocks run: one block per 2× halving while both
    sides are even (at most ``blocks`` of them). 32×32 → 5 blocks (32, 16, 8, 4, 2) as in the paper; 64×64 → 6
    (the paper's Tiny-ImageNet net); 28×28 → 2 (28, 14; 7×7 remains); 8×8 → 3."""
    h, w = _size_pair(input_size, "ConvNet")
    plan = []
    while h % 2 == 0 and w % 2 == 0 and (blocks is None or len(plan) < blocks):
        plan.append((h, w))
        h, w = h // 2, w // 2
    return plan


class ConvNet(nn.Module):
    """ConvNet XS/S/M/L of "1-Lipschitz Layers Compared" with ``layer`` in 'aol' | 'cpl' | 'spectral'.

    Zero channel padding to the width t, a 1×1 conv + MaxMin, downsizing blocks [5 × (k×k conv + MaxMin),
    FirstChannels(t/2), PixelUnshuffle(2)] (t doubles per block; k = 3, k = 1 once a side is ≤ 2), flatten of
    what remains (t_final·h·w features), a square linear layer and FirstChannels(num_classes).
    ``image_size`` (int or (H, W)): any size; one block per 2× halving while both sides are even
    (:func:`convnet_plan`; ``blocks`` caps their number). At 32×32 this is the paper's network exactly.
    ``width`` overrides the size's width (even). Inputs (N, in_channels, H, W) -> logits (N, num_classes).
    """

    def __init__(self, size: str = "XS", layer: str = "aol", in_channels: int = 3, num_classes: int = 10,
                 image_size=32, width: int | None = None, blocks: int | None = None, **layer_kwargs):
        if size not in CONVNET_WIDTHS or layer not in LAYERS:
            raise ValueError(f"ConvNet: size in {list(CONVNET_WIDTHS)}, layer in {LAYERS}; got {size!r}, "
                             f"{layer!r}")
        t = CONVNET_WIDTHS[size] if width is None else width
        if not isinstance(t, int) or t < 2 or t % 2:
            raise ValueError(f"ConvNet: width must be an even int >= 2 (MaxMin halves), got {width!r}")
        _check_channels("ConvNet", in_channels, t)
        if blocks is not None and (not isinstance(blocks, int) or blocks < 0):
            raise ValueError(f"ConvNet: blocks must be a non-negative int or None, got {blocks!r}")
        h, w = _size_pair(image_size, "ConvNet")
        modules: list[nn.Module] = [ZeroChannelPad(t), _conv(layer, t, 1, (h, w), **layer_kwargs)]
        for h, w in convnet_plan((h, w), blocks):
            kernel = 1 if min(h, w) <= 2 else 3
            modules += [_conv(layer, t, kernel, (h, w), **layer_kwargs) for _ in range(5)]
            modules += [FirstChannels(t // 2), PixelUnshuffle(2)]
            t, h, w = 2 * t, h // 2, w // 2
        features = t * h * w
        if num_classes > features:
            raise ValueError(f"ConvNet: num_classes {num_classes} > {features} features before the head")
        modules += [nn.Flatten(), _linear(layer, features, **layer_kwargs), FirstChannels(num_classes)]
        super().__init__()
        self.layers = nn.Sequential(*modules)

    def forward(self, x):
        return self.layers(x)


class CPLNet(nn.Module):
    """CPL-S/M/L/XL (see the module docstring): ``body`` (1-Lipschitz) then ``head`` (LLN). ``image_size``
    (int or (H, W)) ≥ 4: the CPL convs run at that size, AvgPool2d(4, divisor_override=4) keeps ⌊H/4⌋×⌊W/4⌋
    windows (dropping border pixels is a projection, still 1-Lipschitz). ``n_conv`` / ``n_dense`` override the
    size's layer counts (small variants for tests and CPU runs)."""

    def __init__(self, size: str = "S", in_channels: int = 3, num_classes: int = 10, conv_hidden: int = 5,
                 dense_hidden: int = 2048, image_size=32, n_conv: int | None = None,
                 n_dense: int | None = None, layer: str = "cpl", **layer_kwargs):
        if size not in CPL_SIZES:
            raise ValueError(f"CPLNet: size must be one of {list(CPL_SIZES)}, got {size!r}")
        default_conv, default_dense, w = CPL_SIZES[size]
        n_conv = default_conv if n_conv is None else n_conv
        n_dense = default_dense if n_dense is None else n_dense
        _check_channels("CPLNet", in_channels, w)
        height, width = _size_pair(image_size, "CPLNet")
        if min(height, width) < 4:
            raise ValueError(f"CPLNet: image_size must be at least 4×4 (4×4 average pooling), "
                             f"got {image_size!r}")
        if layer not in ("cpl", "sll"):
            raise ValueError(f"CPLNet: layer must be 'cpl' or 'sll', got {layer!r}")
        features = w * (height // 4) * (width // 4)
        modules: list[nn.Module] = [ZeroChannelPad(w)]
        if layer == "cpl":
            modules += [CPLConv2d(w, conv_hidden, 3, input_size=(height, width), **layer_kwargs)
                        for _ in range(n_conv)]
        else:  # SLL: the same body, its steps certified by the weighted Gershgorin bound (no input size)
            modules += [SLLConv2d(w, conv_hidden, 3, **layer_kwargs) for _ in range(n_conv)]
        modules += [nn.AvgPool2d(4, divisor_override=4), nn.Flatten()]
        dense = CPLLinear if layer == "cpl" else SLLLinear
        modules += [dense(features, dense_hidden, **layer_kwargs) for _ in range(n_dense)]
        factory = {k: v for k, v in layer_kwargs.items() if k in ("device", "dtype")}
        super().__init__()
        self.body = nn.Sequential(*modules)
        self.head = LinearNormalized(features, num_classes, **factory)

    def forward(self, x):
        return self.head(self.body(x))


AOL_WIDTHS = {"S": 16, "M": 32, "L": 48}


class AOLNet(nn.Sequential):
    """AOL-S/M/L, the "patchwise" network of Prach & Lampert 2022 (Table 2), all AOL layers, zero padding:
    PixelUnshuffle(4) (4×4 concatenation pooling), AOL conv 1×1 → ``conv_channels`` (192) + MaxMin,
    ``n_conv`` (12) × [AOL conv 3×3 + MaxMin], AOL conv 1×1, FirstChannels(w), flatten (w·H/4·W/4 = 64w at
    32×32), ``n_dense`` (13) × [AOL dense + MaxMin], AOL dense, FirstChannels(num_classes); w = 16/32/48.
    ``image_size`` (int or (H, W)): both sides multiples of 4. 1-Lipschitz by construction."""

    def __init__(self, size: str = "S", in_channels: int = 3, num_classes: int = 10, image_size=32,
                 width: int | None = None, conv_channels: int = 192, n_conv: int = 12, n_dense: int = 13,
                 device=None, dtype=None):
        if size not in AOL_WIDTHS:
            raise ValueError(f"AOLNet: size must be one of {list(AOL_WIDTHS)}, got {size!r}")
        w = AOL_WIDTHS[size] if width is None else width
        h, wd = _size_pair(image_size, "AOLNet")
        if h % 4 or wd % 4:
            raise ValueError(f"AOLNet: image_size sides must be multiples of 4 (4×4 concatenation pooling), "
                             f"got "
                             f"{image_size!r}")
        if conv_channels % 2 or w > conv_channels or w < 1:
            raise ValueError(f"AOLNet: need an even conv_channels >= width >= 1, got {conv_channels}, {w}")
        features = w * (h // 4) * (wd // 4)
        if features % 2 or num_classes > features:
            raise ValueError(f"AOLNet: {features} dense features: must be even and >= num_classes "
                             f"{num_classes}")
        f = {"device": device, "dtype": dtype}
        modules: list[nn.Module] = [PixelUnshuffle(4), AOLConv2d(16 * in_channels, conv_channels, 1, **f),
                                    MaxMin()]
        for _ in range(n_conv):
            modules += [AOLConv2d(conv_channels, conv_channels, 3, padding=1, **f), MaxMin()]
        modules += [AOLConv2d(conv_channels, conv_channels, 1, **f), FirstChannels(w), nn.Flatten()]
        for _ in range(n_dense):
            modules += [AOLLinear(features, features, **f), MaxMin()]
        modules += [AOLLinear(features, features, **f), FirstChannels(num_classes)]
        super().__init__(*modules)


class LMTNet(nn.Sequential):
    """The LeNet-like MNIST network of LMT (Tsuzuku et al. 2018, ``src/model/lenet.py``, after Peck et al.
    2017): conv 5×5 → 20, ReLU, MaxPool 2, conv 5×5 → 50, ReLU, MaxPool 2, flatten, dense 500, ReLU, dense
    num_classes; He-normal weights. Plain layers: its Lipschitz constant comes from
    :func:`lipkern.bounds.lipschitz_bound` and is pushed down by the LMT loss. ``image_size`` ≥ 16."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size=28, device=None, dtype=None):
        h, w = _size_pair(image_size, "LMTNet")
        out_h, out_w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if out_h < 1 or out_w < 1:
            raise ValueError(f"LMTNet: image_size must be at least 16×16 (two 5×5 convs and 2× poolings), "
                             f"got {image_size!r} (lipkern train: --input-size 16 pads smaller images)")
        f = {"device": device, "dtype": dtype}
        super().__init__(nn.Conv2d(in_channels, 20, 5, **f), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(20, 50, 5, **f), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(50 * out_h * out_w, 500, **f), nn.ReLU(), nn.Linear(500, num_classes, **f))
        for m in self:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)


SPLITZ_LEFTS = ("bn", "aol")


class SplitzNet(nn.Module):
    """A SPLITZ network (Zhong & Tandon 2024): f = right ∘ noise ∘ left, the noise N(0, σ²) added after the left
    half in training mode only (:class:`lipkern.certify.GaussianNoise`); in eval mode ``forward`` is the base
    classifier right(left(x)). Certify it with :class:`lipkern.certify.SplitzCertifier` (``left``, ``right``,
    ``sigma``): randomized smoothing of the right half at left(x), divided by the local Lipschitz bound of the
    left half (:class:`lipkern.certify.LocalReluLipschitz`).

    left = "bn": conv 3×3 → ``width``, BatchNorm, AvgPool 2, ReLU (the local bound drops the units inactive on
    the ball); "aol": AOL conv 3×3 → ``width``, AvgPool 2, MaxMin (1/2-Lipschitz by construction). Like the
    authors' networks the left half is short, one conv: the certificate builds its dense matrix (MNIST: 3136 ×
    784). right: conv 3×3 → 2·width, ReLU, conv 3×3 stride 2 → 2·width, ReLU, flatten, dense 128, ReLU, dense
    num_classes. Even image sides only."""

    def __init__(self, left: str = "bn", in_channels: int = 1, num_classes: int = 10, image_size=28,
                 sigma: float = 0.25, width: int = 16, device=None, dtype=None):
        super().__init__()
        from lipkern.certify.splitz import GaussianNoise

        h, w = _size_pair(image_size, "SplitzNet")
        if h % 2 or w % 2 or h < 4 or w < 4:
            raise ValueError(f"SplitzNet: image sides must be even and >= 4 (2× average pooling), got "
                             f"{image_size!r}")
        if left not in SPLITZ_LEFTS:
            raise ValueError(f"SplitzNet: left must be one of {', '.join(SPLITZ_LEFTS)}, got {left!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 2 or width % 2:
            raise ValueError(f"SplitzNet: width must be an even int >= 2, got {width!r}")
        f = {"device": device, "dtype": dtype}
        if left == "bn":
            self.left = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, **f), nn.BatchNorm2d(width, **f),
                                      nn.AvgPool2d(2), nn.ReLU())
        else:
            self.left = nn.Sequential(AOLConv2d(in_channels, width, 3, padding=1, **f), nn.AvgPool2d(2), MaxMin())
        self.noise = GaussianNoise(sigma)
        out_h, out_w = (h // 2 - 1) // 2 + 1, (w // 2 - 1) // 2 + 1
        self.right = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, **f), nn.ReLU(),
                                   nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, **f), nn.ReLU(),
                                   nn.Flatten(), nn.Linear(2 * width * out_h * out_w, 128, **f), nn.ReLU(),
                                   nn.Linear(128, num_classes, **f))

    @property
    def sigma(self) -> float:
        return self.noise.sigma

    def forward(self, x):
        return self.right(self.noise(self.left(x)))


def _model_table() -> dict[str, tuple[str, object]]:
    """name -> (family, builder(num_classes, in_channels, input_size, **options))."""
    table: dict[str, tuple[str, object]] = {}
    for size in CONVNET_WIDTHS:
        for layer in LAYERS:
            table[f"convnet-{size.lower()}-{layer}"] = (layer, lambda c, i, s, size=size, layer=layer, **o:
                                                        ConvNet(size, layer, i, c, s, **o))
    for size in AOL_WIDTHS:
        table[f"aol-{size.lower()}"] = ("aol", lambda c, i, s, size=size, **o: AOLNet(size, i, c, s, **o))
    for size in CPL_SIZES:
        table[f"cpl-{size.lower()}"] = ("cpl", lambda c, i, s, size=size, **o:
                                             CPLNet(size, i, c, image_size=s, **o))
    for size in CPL_SIZES:  # SLL-S/M/L/XL: CPL's architecture with SLL layers (Araujo et al. 2023)
        table[f"sll-{size.lower()}"] = ("sll", lambda c, i, s, size=size, **o:
                                             CPLNet(size, i, c, image_size=s, layer="sll", **o))
    for arch in LIPLT_ARCHS:
        table[f"liplt-{arch.lower()}"] = ("liplt", lambda c, i, s, arch=arch, **o:
                                               LipLTNet(arch, i, c, s, **o))
    table["lmt"] = ("lmt", lambda c, i, s, **o: LMTNet(i, c, s, **o))
    table["splitz-s"] = ("splitz", lambda c, i, s, **o: SplitzNet("bn", i, c, s, **o))
    table["splitz-s-aol"] = ("splitz", lambda c, i, s, **o: SplitzNet("aol", i, c, s, **o))
    return table


_MODELS = _model_table()
MODEL_FAMILIES: dict[str, str] = {name: family for name, (family, _) in _MODELS.items()}
"""Every name :func:`build_model` knows -> its family in {"aol", "cpl", "sll", "spectral", "liplt", "lmt", "splitz"}
(the family selects the training recipe)."""


def build_model(name: str, *, num_classes: int = 10, in_channels: int = 3, input_size=32,
                **options) -> nn.Module:
    """A reference network by its lower-case name (see :data:`MODEL_FAMILIES`), for inputs
    (N, in_channels, H, W) with ``input_size`` = H = W (an int) or (H, W), giving logits (N, num_classes).

    - "convnet-{xs,s,m,l}-{aol,cpl,spectral}": :class:`ConvNet` (options: width, blocks, layer options such
      as certified=, n_power_iterations=, device=, dtype=);
    - "aol-{s,m,l}": :class:`AOLNet` (options: width, conv_channels, n_conv, n_dense, device, dtype);
    - "cpl-{s,m,l,xl}": :class:`CPLNet` (options: conv_hidden, dense_hidden, n_conv, n_dense, certified, ...);
    - "sll-{s,m,l,xl}": :class:`CPLNet` with ``layer="sll"`` (options: conv_hidden, dense_hidden, n_conv, n_dense);
    - "liplt-{4c3f,6c2f,8c2f}": :class:`LipLTNet`; "lmt": :class:`LMTNet` (device, dtype);
    - "splitz-s", "splitz-s-aol": :class:`SplitzNet` with a BatchNorm / AOL left half (options: sigma, width,
      device, dtype).
    Raises ValueError for an unknown name (listing the choices) or an input size / option the architecture
    does not admit, TypeError for an unknown option.
    """
    if name not in _MODELS:
        raise ValueError(f"build_model: unknown model {name!r}; choices: {', '.join(_MODELS)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"build_model: num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"build_model: in_channels must be a positive int, got {in_channels!r}")
    _size_pair(input_size, f"build_model({name!r})")
    try:
        return _MODELS[name][1](num_classes, in_channels, input_size, **options)
    except TypeError as err:
        raise TypeError(f"build_model({name!r}): {err}") from err


def to_vanilla(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every lipkern layer replaced by its plain eval-mode equivalent:
    AOL / Spectral layers by ``nn.Conv2d`` / ``nn.Linear`` holding the rescaled / normalized weight, CPL
    layers by :class:`lipkern.nn.PlainCPLConv2d` / :class:`~lipkern.nn.PlainCPLLinear` (plain torch ops,
    constant step size), :class:`LinearNormalized` by an ``nn.Linear`` with unit rows. The parameter-free
    modules (MaxMin, FirstChannels, ZeroChannelPad, PixelUnshuffle, Normalize) are plain torch ops and stay.
    The copy computes what the eval-mode model computes (up to float rounding: the same weights, other
    kernels) at the cost of the plain layers; ``model`` itself is not changed. Certified layers export their
    certified form (the eval form uses the guaranteed bound)."""
    import copy

    plain = copy.deepcopy(model).eval()
    _replace_layers(plain, model)
    return plain


def _vanilla_of(module: nn.Module) -> nn.Module | None:
    if isinstance(module, LinearNormalized):
        layer = nn.Linear(module.in_features, module.out_features, module.bias is not None,
                          device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(F.normalize(module.weight, dim=1))
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        return layer.eval()
    if isinstance(module, (AOLConv2d, AOLLinear, CPLConv2d, CPLLinear, SpectralConv2d, SpectralLinear, SLLConv2d,
                           SLLLinear)):
        return module.to_vanilla().eval()
    return None


def _replace_layers(module: nn.Module, original: nn.Module) -> None:
    """Replace in the copy ``module`` the layers of ``original`` it copies: built from the ORIGINAL layers,
    whose cached eval norms (a certified bound can take seconds) are valid; a deep copy's are recomputed."""
    originals = dict(original.named_children())
    for name, child in module.named_children():
        replacement = _vanilla_of(originals[name])
        if replacement is None:
            _replace_layers(child, originals[name])
        else:
            setattr(module, name, replacement)


def _eager_conv_forward(self, x):
    self._check_input(x)
    return cpl_conv2d_ref(x, self.weight, self.bias, self.step_size(), self.geometry)


def _eager_linear_forward(self, x):
    return cpl_linear_ref(x, self.weight, self.bias, self.step_size())


_eager_conv_forward.same_function = True  # the same function as the layer's forward (lipkern._registry)
_eager_linear_forward.same_function = True


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


# ----------------------------------------------------------------------------------------------------------
# Bound rules (lipkern.bounds.parsing).
# ----------------------------------------------------------------------------------------------------------
register_bound_rule(PixelUnshuffle)(pixel_unshuffle_rule)  # its own forward, the same 0/1 map


@register_bound_rule(ConvNet)
def _convnet_bound_rule(parser: BoundParser, module, shape):
    return parser.parse(module.layers, shape)


@register_bound_rule(CPLNet)
def _cplnet_bound_rule(parser: BoundParser, module, shape):
    return parser.sequence([module.body, module.head], shape)


@register_bound_rule(Residual)
def _residual_bound_rule(parser: BoundParser, module, shape):
    return parser.residual(module, module.branch, module.skip, shape)


@register_bound_rule(LinearNormalized)
def _linear_normalized_bound_rule(parser: BoundParser, module, shape):
    return parser.dense(module, shape, lambda precise: F.normalize(module.weight, dim=1))


@register_bound_rule(Normalize)
def _normalize_bound_rule(parser: BoundParser, module, shape):
    """diag(1/std): a float64 quotient within one rounding of the real one (charged)."""
    return parser.diag(module, shape, lambda precise: 1.0 / module.std.double() if precise else 1.0 / module.std,
                       2 * 2.0**-53)


@register_bound_rule(FirstChannels, ZeroChannelPad)
def _channel_selection_bound_rule(parser: BoundParser, module, shape):
    """A 0/1 coordinate projection or embedding: a 1×1 conv, or a dense map on vectors."""
    out = parser.run(module, shape)
    eye = torch.eye(out[0], shape[0], dtype=torch.float64, device=parser.device)
    name = parser.name(module)
    if len(shape) == 1:
        return parser.map_item(module, lambda: LinearMap.dense(eye, shape, name), lambda p: eye)
    if len(shape) == 3:
        weight = eye[:, :, None, None]
        return parser.map_item(module, lambda: LinearMap.conv2d(weight, shape, name=name), lambda p: weight)
    return parser.constant(module, 1.0, shape)


@register_rounding_rule(ConvNet)
def _convnet_rounding_rule(analysis, module, shape):
    return analysis.parse(module.layers, shape)


@register_rounding_rule(CPLNet)
def _cplnet_rounding_rule(analysis, module, shape):
    return analysis.sequence([module.body, module.head], shape)


@register_rounding_rule(Residual)
def _residual_rounding_rule(analysis, module, shape):
    return analysis.residual(module, module.branch, module.skip, shape)


@register_rounding_rule(FirstChannels, ZeroChannelPad, PixelUnshuffle)
def _selection_rounding_rule(analysis, module, shape):
    """Copies and zeros: no rounding."""
    return analysis.exact(module, shape)


@register_rounding_rule(Normalize)
def _normalize_rounding_rule(analysis, module, shape):
    return analysis.diagonal(module, shape, 1.0 / module.std, module.mean, None, 4)
