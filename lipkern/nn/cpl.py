"""Convex potential layers (Meunier et al. 2022): z = x − h·Wᵀσ(Wx + b) with h = 2/‖W‖₂², 1-Lipschitz when
‖W‖₂ is not under-estimated.

‖W‖ comes from the spectral-norm machinery of ``lipkern.nn.spectral`` (for the conv: the true operator of the
'same'-padded conv at the layer's input size). Training: one power iteration per step on persistent vectors,
h = 2/σ² differentiable through σ = vᵀAu (an estimate from below, so a training-mode layer is only
approximately 1-Lipschitz, as in the paper's code). Eval: σ is cached per weight version: the converged
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

import torch

from lipkern.nn.spectral import _SpectralConvBase, _SpectralLinearBase
from lipkern.ops.cpl import cpl_conv2d, cpl_linear

__all__ = ["CPLConv2d", "CPLLinear"]


def _round_down(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest value of ``dtype`` that is ≤ ``value`` (a float64 tensor); tensor ops only (compilable)."""
    t = value.to(dtype)
    return torch.where(t.double() > value, torch.nextafter(t, torch.zeros_like(t)), t)


class _StepSize:
    """h = 2/σ²: differentiable in training; in eval a constant rounded down (σ itself is an upper bound
    when certified, so h ≤ 2/‖W‖₂² exactly)."""

    def step_size(self) -> torch.Tensor:
        device = self.weight.device.type
        if device != "meta" and torch.is_autocast_enabled(device):  # σ from the weight's own precision, not autocast's
            with torch.autocast(device, enabled=False):
                return self.step_size()
        sigma = self.sigma()
        if self.training:
            return 2.0 / sigma.square().clamp_min(torch.finfo(sigma.dtype).tiny)
        s = sigma.detach().double()
        return _round_down(torch.where(s > 0, 2.0 / (s * s), 0.0), self.weight.dtype)


class CPLLinear(_StepSize, _SpectralLinearBase):
    """z = x − h·Wᵀσ(Wx + b) on (..., features); W (hidden_features, features), hidden_features defaults to
    features. Knobs: ``n_power_iterations`` per training step, ``certified`` (eval uses a guaranteed bound)."""

    def __init__(self, features: int, hidden_features: int | None = None, bias: bool = True, device=None,
                 dtype=None, *, n_power_iterations: int = 1, certified: bool = False):
        hidden = features if hidden_features is None else hidden_features
        super().__init__(features, hidden, bias, device=device, dtype=dtype,
                         n_power_iterations=n_power_iterations, certified=certified)
        self.features, self.hidden_features = features, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpl_linear(x, self.weight, self.bias, self.step_size())

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
        self._check_input(x)
        return cpl_conv2d(x, self.weight, self.bias, self.step_size(), padding="same",
                          padding_mode=self.padding_mode)

    def extra_repr(self) -> str:
        return (f"{self.channels}, hidden_channels={self.hidden_channels}, kernel_size={self.kernel_size}, "
                f"padding_mode={self.padding_mode}, input_size={self.input_size}, certified={self.certified}")
