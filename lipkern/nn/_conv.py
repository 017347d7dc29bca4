"""What every lipkern conv layer shares with nn.Conv2d: the forward with its padding, the repr, the checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lipkern._checks import as_int, is_int

GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
            "padding_mode", "_reversed_padding_repeated_twice")


class FixedGeometry:
    """Mixin (before nn.Module): the conv geometry is fixed once set. A rescaled kernel, a normalizing norm or a
    step size holds for the geometry it was derived for; changing ``padding_mode`` (say to 'reflect') or the
    stride afterwards would silently void it, so it raises instead."""

    def __setattr__(self, name, value):
        if name in GEOMETRY and name in self.__dict__ and self.__dict__[name] != value:
            raise AttributeError(f"{type(self).__name__}: {name} is fixed at construction "
                                 f"({self.__dict__[name]!r}); build a new layer with {name}={value!r}")
        super().__setattr__(name, value)


def check_sizes(layer: str, **sizes) -> None:
    """Feature / channel counts: ints >= 1 (a zero-width layer has no operator to normalize)."""
    for name, value in sizes.items():
        as_int(value, f"{layer}: {name}", minimum=1)


def check_conv_arguments(layer: str, kernel_size, stride, dilation, padding=0, groups=1, dtype=None) -> None:
    """nn.Conv2d accepts any tuple and fails only in forward (or reads True as 1): a 2-D layer takes ints or
    pairs of ints, ≥ 1 (kernel, stride, dilation, groups) or ≥ 0 (padding, also 'same' / 'valid')."""
    def is_pair(value, minimum):
        if is_int(value):
            return value >= minimum
        return (isinstance(value, (tuple, list)) and len(value) == 2
                and all(is_int(v) and v >= minimum for v in value))

    for name, value in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
        if not is_pair(value, 1):
            raise ValueError(f"{layer}: {name} must be an int >= 1 or a pair of them, got {value!r}")
    if not (padding in ("same", "valid") or is_pair(padding, 0)):
        raise ValueError(f"{layer}: padding must be 'same', 'valid', an int >= 0 or a pair of them, got "
                         f"{padding!r}")
    as_int(groups, f"{layer}: groups", minimum=1)
    check_dtype(layer, dtype)


def check_dtype(layer: str, dtype) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{layer}: dtype must be a floating-point dtype, got {dtype}")


def conv2d_forward(layer, x: torch.Tensor, weight: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
    """nn.Conv2d's forward for ``layer``'s geometry (zeros or circular padding) with another weight (and the
    layer's bias unless ``with_bias`` is False: the linear part only)."""
    bias = layer.bias if with_bias else None
    if layer.padding_mode == "circular":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode="circular")
        return F.conv2d(x, weight, bias, layer.stride, 0, layer.dilation, layer.groups)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def conv2d_repr(layer) -> str:
    """nn.Conv2d's extra_repr for ``layer``'s attributes."""
    s = f"{layer.in_channels}, {layer.out_channels}, kernel_size={layer.kernel_size}, stride={layer.stride}"
    if layer.padding != (0, 0):
        s += f", padding={layer.padding!r}" if isinstance(layer.padding, str) else f", padding={layer.padding}"
    if layer.dilation != (1, 1):
        s += f", dilation={layer.dilation}"
    if layer.groups != 1:
        s += f", groups={layer.groups}"
    if layer.bias is None:
        s += ", bias=False"
    if layer.padding_mode != "zeros":
        s += f", padding_mode={layer.padding_mode}"
    return s


def vanilla_conv2d(layer, weight: torch.Tensor) -> nn.Conv2d:
    """A plain nn.Conv2d with ``layer``'s geometry and bias holding ``weight``, in ``layer``'s train mode."""
    plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                      layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
    return plain.train(layer.training)
