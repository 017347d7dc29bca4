"""Convex potential layers (Meunier et al. 2022): z = x − h·Wᵀσ(Wx + b) with h = 2/‖W‖₂², 1-Lipschitz when
‖W‖₂ is not under-estimated.

‖W‖ comes from the spectral-norm machinery of ``lipkern.nn.spectral`` (for the conv: the true operator of the
'same'-padded conv at the layer's input size). Training: one power iteration per step on persistent vectors,
h = 2/σ² differentiable through σ = vᵀAu (an estimate from below, so a training-mode layer is only
approximately 1-Lipschitz, as in the paper's code). Eval: σ is cached per weight (``lipkern.nn._cache``): the converged
estimate, or with ``certified=True`` a guaranteed upper bound, and then h = 2/σ² is rounded down, so the
eval-mode layer is 1-Lipschitz with proof. The forward and backward are ``lipkern.ops.cpl_linear`` /
``cpl_conv2d``, whose backward keeps the input and the hidden activation σ(Wx + b) only (eager autograd also
keeps Wᵀσ(·)).
Precision: the layers work in float64, float32, bfloat16 and float16 (weight, bias and input of one dtype;
the eval step size is rounded down in the weight's dtype, so a certified bf16/fp16 layer stays 1-Lipschitz).
Under ``torch.autocast`` σ and h are computed in the weight's dtype (autocast off) and the op runs in the
input's dtype: a float32 residual stream stays float32. Training may use TF32 convolutions/GEMMs (PyTorch's
settings, as the eager layer does); certification uses the eval-time bound computed in float64.
A training step reads no value on the host: a NaN/Inf weight makes σ, h and the output NaN. The eval-mode σ
rejects it with a ValueError (see ``lipkern.nn.spectral``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lipkern._dispatch import check_finite
from lipkern._rounding import smallest_normal
from lipkern.bounds.operators import plain_layer_operator
from lipkern.bounds.parsing import BoundParser, register_bound_rule
from lipkern.certify.rounding import register_lipschitz_proof, register_rounding_rule
from lipkern.nn.spectral import _certified_proof, _SpectralConvBase, _SpectralLinearBase
from lipkern.ops.cpl import _adjoint_of_padding, _autocast_on, _round_down, cpl_layer_forward

__all__ = ["CPLConv2d", "CPLLinear", "PlainCPLConv2d", "PlainCPLLinear"]


class _StepSize:
    """h = 2/σ²: differentiable in training; in eval a constant rounded down (σ itself is an upper bound
    when certified, so h ≤ 2/‖W‖₂² exactly)."""

    def step_size(self) -> torch.Tensor:
        # σ from the weight's own precision, not autocast's
        if _autocast_on(self.weight):
            with torch.autocast(self.weight.device.type, enabled=False):
                return self.step_size()
        if self.training:
            sigma = self.sigma()
            # 2/σ² as Tensor.__rdiv__ computes it (reciprocal, then × 2), without its Python wrapper
            return sigma.square().clamp_min(smallest_normal(sigma.dtype)).reciprocal() * 2.0
        return self._eval_step_size()

    def _eval_step_size(self) -> torch.Tensor:
        """The eval-mode h (whatever the mode): 2/σ² of the cached eval σ, rounded down in the weight's
        dtype."""
        s = self._eval_sigma().detach().double() if not self.weight.is_meta else self.sigma()
        # a tiny σ (subnormal weights): 2/σ² overflows; the largest finite h is below it, so still safe
        h = (2.0 / (s * s)).clamp(max=torch.finfo(torch.float64).max)
        return _round_down(torch.where(s > 0, h, 0.0), self.weight.dtype)

    def _export_parts(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        check_finite(self.weight, f"{type(self).__name__}.to_vanilla")
        with torch.no_grad():
            bias = None if self.bias is None else self.bias.detach().clone()
            return self.weight.detach().clone(), bias, self._eval_step_size().clone()


class CPLLinear(_StepSize, _SpectralLinearBase):
    """z = x − h·Wᵀσ(Wx + b) on (..., features); W (hidden_features, features), hidden_features defaults to
    features. Knobs: ``n_power_iterations`` per training step, ``certified`` (eval uses a guaranteed
    bound). ``to_vanilla()``: the eval form as :class:`PlainCPLLinear`."""

    def __init__(self, features: int, hidden_features: int | None = None, bias: bool = True, device=None,
                 dtype=None, *, n_power_iterations: int = 1, certified: bool = False):
        hidden = features if hidden_features is None else hidden_features
        super().__init__(features, hidden, bias, device=device, dtype=dtype,
                         n_power_iterations=n_power_iterations, certified=certified)
        self.features, self.hidden_features = features, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() and not self.training:  # the traced graph holds the plain eval form
            return plain_cpl_linear(x, self.weight, self.bias, self._eval_step_size())
        return cpl_layer_forward(x, self.weight, self.bias, self.step_size())

    def to_vanilla(self) -> "PlainCPLLinear":
        """The eval-mode layer as plain torch ops with the constant step size h (the certified one with
        ``certified=True``): :class:`PlainCPLLinear`; same outputs as this layer in eval mode."""
        return PlainCPLLinear(*self._export_parts())

    def extra_repr(self) -> str:
        return (f"{self.features}, hidden_features={self.hidden_features}, bias={self.bias is not None}, "
                f"certified={self.certified}")


class CPLConv2d(_StepSize, _SpectralConvBase):
    """z = x − h·Aᵀσ(Ax + b) for A the 'same'-padded conv channels → hidden_channels (default channels), its
    exact adjoint Aᵀ (conv_transpose), padding_mode 'zeros' or 'circular'. ``input_size`` as for
    SpectralConv2d: the norm is that of the operator at this size; another input size raises a ValueError.
    """

    def __init__(self, channels: int, hidden_channels: int | None = None, kernel_size=3,
                 padding_mode: str = "zeros", bias: bool = True, device=None, dtype=None, *, input_size=None,
                 n_power_iterations: int = 1, certified: bool = False):
        hidden = channels if hidden_channels is None else hidden_channels
        super().__init__(channels, hidden, kernel_size, 1, "same", 1, 1, bias, padding_mode, device=device,
                         dtype=dtype, input_size=input_size, n_power_iterations=n_power_iterations,
                         certified=certified)
        self.channels, self.hidden_channels = channels, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() and not self.training:  # the traced graph holds the plain eval form
            return plain_cpl_conv2d(x, self.weight, self.bias, self._eval_step_size(),
                                    self._reversed_padding_repeated_twice, self.padding_mode)
        self._check_input(x)
        if x.dim() == 3:  # an unbatched input, as nn.Conv2d takes
            return self.forward(x[None])[0]
        return cpl_layer_forward(x, self.weight, self.bias, self.step_size(), self.geometry)

    def to_vanilla(self) -> "PlainCPLConv2d":
        """The eval-mode layer as plain torch ops with the constant step size h: :class:`PlainCPLConv2d`
        (any input size runs; h holds for ``input_size``); same outputs as this layer in eval mode."""
        return PlainCPLConv2d(*self._export_parts(), padding=self._reversed_padding_repeated_twice,
                              padding_mode=self.padding_mode)

    def extra_repr(self) -> str:
        return (f"{self.channels}, hidden_channels={self.hidden_channels}, kernel_size={self.kernel_size}, "
                f"padding_mode={self.padding_mode}, input_size={self.input_size}, certified={self.certified}")


def plain_cpl_linear(x, weight, bias, h):
    """x − h·Wᵀ relu(Wx + b) in plain torch ops (h a 0-dim tensor)."""
    return x - h * (F.relu(F.linear(x, weight, bias)) @ weight)


def plain_cpl_conv2d(x, weight, bias, h, padding, padding_mode: str = "zeros"):
    """x − h·Aᵀ relu(Ax + b) in plain torch ops, A the stride-1 conv after zero / circular padding by
    ``padding`` = (left, right, top, bottom), Aᵀ its exact adjoint (transposed conv, then the padding's
    adjoint)."""
    mode = "constant" if padding_mode == "zeros" else "circular"
    pre = F.conv2d(F.pad(x, padding, mode=mode), weight, bias)
    return x - h * _adjoint_of_padding(F.conv_transpose2d(F.relu(pre), weight), padding, padding_mode)


class PlainCPLLinear(nn.Module):
    """z = x − h·Wᵀ relu(Wx + b) with a constant h (a buffer) and plain torch ops: the exported eval form of
    :class:`CPLLinear`. Parameters ``weight`` (hidden, features), ``bias`` (hidden,) or None; buffer ``h``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.register_buffer("h", h.reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return plain_cpl_linear(x, self.weight, self.bias, self.h)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, hidden_features={self.weight.shape[0]}, h={self.h.item():.6g}"


class PlainCPLConv2d(nn.Module):
    """z = x − h·Aᵀ relu(Ax + b) (:func:`plain_cpl_conv2d`), A the stride-1 conv after ``padding`` (left,
    right, top, bottom) zero or circular padding, Aᵀ its exact adjoint, h a constant buffer, plain torch ops:
    the exported eval form of :class:`CPLConv2d`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor, padding=(1, 1, 1, 1),
                 padding_mode: str = "zeros"):
        super().__init__()
        if padding_mode not in ("zeros", "circular"):
            raise ValueError(f"PlainCPLConv2d: padding_mode must be 'zeros' or 'circular', got "
                             f"{padding_mode!r}")
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.register_buffer("h", h.reshape(()))
        self.padding, self.padding_mode = tuple(int(p) for p in padding), padding_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return plain_cpl_conv2d(x, self.weight, self.bias, self.h, self.padding, self.padding_mode)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, hidden_channels={self.weight.shape[0]}, kernel_size="
                f"{tuple(self.weight.shape[2:])}, padding={self.padding}, padding_mode={self.padding_mode}, "
                f"h={self.h.item():.6g}")


# ----------------------------------------------------------------------------------------------------------
# Bound rules (lipkern.bounds.parsing).
# ----------------------------------------------------------------------------------------------------------
_CPL_HELPERS = ("step_size", "_eval_step_size", "sigma", "_eval_sigma", "_certified_divisor")


@register_bound_rule(CPLConv2d, CPLLinear, helpers=_CPL_HELPERS)
def _cpl_bound_rule(parser: BoundParser, module, shape):
    """1: a certified layer in eval mode is 1-Lipschitz with proof (its step size is ≤ 2/‖W‖² exactly)."""
    if parser.sound and (not module.certified or module.training):
        raise ValueError(f"lipschitz_bound: {parser.name(module)} is 1-Lipschitz with proof only with "
                         "certified=True and in eval mode (its step size uses a guaranteed norm bound)")
    return parser.constant(module, 1.0, shape)


@register_bound_rule(PlainCPLConv2d, PlainCPLLinear)
def _plain_cpl_bound_rule(parser: BoundParser, module, shape):
    """x − h·Wᵀrelu(Wx + b) (an exported CPL layer): its Jacobian I − h·WᵀDW (0 ≤ D ≤ I) has eigenvalues in
    [1 − h‖W‖², 1], so its norm is ≤ max(1, h·U² − 1) for any U ≥ ‖W‖₂ (a guaranteed bound here)."""
    try:
        operator = plain_layer_operator(module, shape)
    except ValueError as err:
        raise ValueError(f"lipschitz_bound: {parser.name(module)}: {err}") from err
    upper, h = float(operator.upper_bound()), float(module.h)
    if not (math.isfinite(upper) and math.isfinite(h) and h >= 0):
        raise ValueError(f"lipschitz_bound: {parser.name(module)} has a non-finite weight or step size")
    value = max(1.0, h * upper * upper * (1 + 8 * 2.0**-53) - 1.0)  # rounded up: 3 products, 1 difference
    return parser.constant(module, value, shape)


@register_lipschitz_proof(CPLConv2d, CPLLinear, helpers=_CPL_HELPERS)
def _cpl_proof(layer):
    """With certified=True: 1-Lipschitz at the conv's input_size (any size for the linear layer)."""
    return _certified_proof(layer)


@register_rounding_rule(PlainCPLLinear, PlainCPLConv2d)
def _plain_cpl_rounding_rule(analysis, module, shape):
    return analysis.residual_layer(module, shape, "cpl")
