"""AOL layers (Prach & Lampert 2022): drop-in replacements for nn.Linear and nn.Conv2d that are 1-Lipschitz.

The parameter is an unconstrained weight W; the layer uses W·diag(d) from :func:`lipkern.ops.aol_rescale`.
Why a strided AOLConv2d stays 1-Lipschitz: a stride-s conv is the stride-1 conv (norm ≤ 1 by AOL, for any
input size and zero or circular padding) followed by keeping every s-th output pixel, a coordinate
projection of norm ≤ 1; the composition has norm ≤ 1. Dilation likewise: a dilated conv splits into
independent undilated convs on interleaved sub-grids, each with the same kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lipkern._dispatch import check_finite
from lipkern.bounds.parsing import BoundParser, register_bound_rule
from lipkern.certify.rounding import OneLipschitz, register_lipschitz_proof
from lipkern.nn._cache import WeightSnapshot
from lipkern.nn._conv import (GEOMETRY, FixedGeometry, check_conv_arguments, check_dtype, check_sizes,
                              conv2d_forward, conv2d_repr, vanilla_conv2d)
from lipkern.ops.aol import aol_layer_rescale, aol_rescale

__all__ = ["AOLLinear", "AOLConv2d"]

_SUPPORTED_PADDING_MODES = ("zeros", "circular")


def _check_circular_padding(conv: nn.Conv2d) -> None:
    """Circular padding wider than 'same' repeats output pixels (a wrapped copy): the norm can exceed 1."""
    pads = conv._reversed_padding_repeated_twice  # (left, right, top, bottom)
    for axis, total in ((0, pads[2] + pads[3]), (1, pads[0] + pads[1])):
        span = conv.dilation[axis] * (conv.kernel_size[axis] - 1)
        if total > span:
            raise ValueError(f"AOLConv2d: circular padding {total} along dim {axis} exceeds dilation*(k-1) = "
                             f"{span}; the wrapped copies make the layer not 1-Lipschitz")


def _orthogonal_(weight: torch.Tensor) -> None:
    """nn.init.orthogonal_ (QR), in float32 for 16-bit weights (the CPU has no half-precision QR)."""
    if weight.dtype in (torch.float16, torch.bfloat16):
        weight.copy_(nn.init.orthogonal_(torch.empty_like(weight, dtype=torch.float32)))
    else:
        nn.init.orthogonal_(weight)


class _CachedRescale(nn.Module):
    """Serves the rescaled weight; in eval mode, when no gradient to the weight is needed, from a cache.

    The cache is keyed on the weight itself (``lipkern.nn._cache``: version counter, storage, dtype, device and
    contents, so an optimizer step, ``load_state_dict``, ``.to()``, ``.half()`` and writes through
    ``weight.data`` invalidate it), and ``train()`` clears it. It is not part of the state_dict.

    Finite weights: a training step checks nothing on the host (no device synchronization); a NaN/Inf weight
    makes the rescaled weight and so the output NaN. In eval mode (cached or not) and in ``to_vanilla()`` a
    NaN/Inf weight raises a ValueError (one synchronization per eval forward without the cache, per cache
    fill with it), so no certified or exported layer holds one (``LIPKERN_CHECK_FINITE=0`` skips these
    checks).
    """

    groups: int = 1

    def __init__(self):
        super().__init__()
        self._cached_weight: torch.Tensor | None = None
        self._snapshot: WeightSnapshot | None = None

    def _cache_usable(self) -> bool:
        needs_weight_grad = torch.is_grad_enabled() and self.weight.requires_grad
        return (not self.training and not needs_weight_grad and not torch.compiler.is_compiling()
                and not self.weight.is_inference())

    def rescaled_weight(self) -> torch.Tensor:
        """The weight the layer applies: ``aol_rescale(self.weight)``."""
        if not self._cache_usable():
            if not (self.training or self.weight.is_meta or torch.compiler.is_compiling()):  # eval: NaN raises as
                check_finite(self.weight, type(self).__name__)  # in the Spectral / CPL layers
            return aol_layer_rescale(self.weight, self.groups)
        if self._cached_weight is None or not self._snapshot.matches(self.weight):
            check_finite(self.weight, type(self).__name__)
            with torch.inference_mode(False), torch.no_grad():
                self._cached_weight = aol_rescale(self.weight, self.groups)
            self._snapshot = WeightSnapshot(self.weight)
        return self._cached_weight

    def train(self, mode: bool = True):
        self._cached_weight, self._snapshot = None, None
        return super().train(mode)


class AOLLinear(_CachedRescale):
    """``nn.Linear`` with an AOL-rescaled weight: ‖x ↦ W·diag(d)·x‖₂ ≤ 1.

    Same signature as ``nn.Linear``. Initialization: identity when ``in_features == out_features``,
    else a random matrix with orthonormal rows or columns (Prach & Lampert 2022); zero bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        check_sizes("AOLLinear", in_features=in_features, out_features=out_features)
        check_dtype("AOLLinear", dtype)
        proto = nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=dtype)  # validates
        self.in_features, self.out_features = proto.in_features, proto.out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.in_features == self.out_features:
                nn.init.eye_(self.weight)
            else:
                _orthogonal_(self.weight)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.rescaled_weight(), self.bias)

    def to_vanilla(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the rescaled weight: identical outputs, no rescaling cost."""
        w = self.weight
        check_finite(w, "AOLLinear.to_vanilla")
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                          dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(aol_rescale(w))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer.train(self.training)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class AOLConv2d(FixedGeometry, _CachedRescale):
    """``nn.Conv2d`` with an AOL-rescaled kernel: the conv operator has spectral norm ≤ 1.

    Same signature as ``nn.Conv2d`` (stride, padding incl. 'same'/'valid', dilation, groups, bias,
    padding_mode, device, dtype). ``padding_mode`` must be 'zeros' or 'circular': 'reflect' and
    'replicate' copy input pixels, so the padded operator can have norm > 1. Initialization: the identity
    (Dirac) kernel when ``in_channels == out_channels``, else orthogonal rows/columns of the flattened
    kernel (Prach & Lampert 2022); zero bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__()
        if padding_mode not in _SUPPORTED_PADDING_MODES:
            raise ValueError(f"AOLConv2d: padding_mode must be one of {_SUPPORTED_PADDING_MODES}, got "
                             f"{padding_mode!r} ('reflect' and 'replicate' padding are not 1-Lipschitz)")
        check_conv_arguments("AOLConv2d", kernel_size, stride, dilation, padding, groups, dtype)
        check_sizes("AOLConv2d", in_channels=in_channels, out_channels=out_channels)
        # nn.Conv2d on the meta device validates every argument exactly as PyTorch does.
        proto = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                          padding_mode, device="meta", dtype=dtype)
        if padding_mode == "circular":
            _check_circular_padding(proto)
        for name in GEOMETRY:
            setattr(self, name, getattr(proto, name))
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(proto.weight.shape, **factory))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_channels, **factory)) if bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.in_channels == self.out_channels:
                nn.init.dirac_(self.weight, groups=self.groups)
            else:
                _orthogonal_(self.weight)
            if self.bias is not None:
                self.bias.zero_()

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return conv2d_forward(self, x, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.rescaled_weight())

    def to_vanilla(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the rescaled kernel and the same geometry: identical outputs."""
        check_finite(self.weight, "AOLConv2d.to_vanilla")
        with torch.no_grad():
            return vanilla_conv2d(self, aol_rescale(self.weight, self.groups))

    def extra_repr(self) -> str:
        return conv2d_repr(self)


# ----------------------------------------------------------------------------------------------------------
# Bound rules (lipkern.bounds.parsing): the weight the layer applies.
# ----------------------------------------------------------------------------------------------------------
@register_bound_rule(AOLLinear, helpers=("rescaled_weight",))
def _aol_linear_bound_rule(parser: BoundParser, module, shape):
    return parser.dense(module, shape, lambda precise: module.rescaled_weight())


@register_bound_rule(AOLConv2d, helpers=("rescaled_weight", "_conv"))
def _aol_conv_bound_rule(parser: BoundParser, module, shape):
    return parser.conv(module, shape, lambda precise: module.rescaled_weight())


@register_lipschitz_proof(AOLLinear, AOLConv2d, helpers=("rescaled_weight",))
def _aol_proof(layer):
    """1-Lipschitz at every input size (the rescaling's proven margin, lipkern.ops.aol)."""
    return OneLipschitz(None)
