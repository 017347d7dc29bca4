"""Whole-network Lipschitz bounds (ℓ₂): the product of layer norms and LipLT (Fazlyab et al. 2023).

**The chain.** A model (an ``nn.Sequential``, nested ones flattened; also ``lipkern.models.ConvNet`` /
``CPLNet`` / ``LipLTNet``) is parsed once into items, tracking the shape of one input through it:
- linear maps (:class:`~lipkern.bounds.operators.LinearMap`, biases dropped): ``nn.Linear``, ``nn.Conv2d`` (any
  padding, 'zeros'/'circular', stride, dilation, groups), AOL / Spectral layers with the weight they APPLY
  (AOL's rescaled weight; Spectral: W/σ with the eval-mode σ, or in training mode σ = ‖A u‖ for the layer's
  current unit vector u, an estimate), ``LinearNormalized`` (rows normalized), ``nn.BatchNorm1d/2d`` folded into diag(γ/√(var+ε))
  with the RUNNING statistics (the eval-mode function), ``Normalize`` (diag 1/std), ``nn.AvgPool2d`` (a
  depthwise conv, count_include_pad=True when padded), ``FirstChannels`` / ``ZeroChannelPad`` (1×1 convs or
  dense maps with 0/1 weights) and ``nn.PixelUnshuffle`` (a stride-r conv with 0/1 weights): exact maps;
- elementwise activations, slope-restricted in [α, β]: ReLU (0, 1), LeakyReLU(a) (min(a,1), max(a,1)), ReLU6
  (0, 1), Tanh (0, 1), Sigmoid (0, ¼), Softplus (0, 1), ELU(a) (0, max(1, a)), or user-declared
  (``activation_slopes={type or module: (α, β)}``);
- opaque blocks with a known constant: MaxMin (1), ``nn.PixelShuffle`` (1, a permutation), nn.MaxPool2d
  (√(windows covering a pixel), LMT, papers.md §6), CPL layers (1: for the bound only certified layers in
  eval mode, whose step size is proven), ``Residual(branch, skip)`` (L(skip) + L(branch), each bounded the
  same way), and any module given in ``lipschitz_constants={module or type: L}`` (THE USER'S RESPONSIBILITY);
- reshapes (free): nn.Flatten, nn.Unflatten, nn.Identity.
Maximal runs of maps and activations are LipLT **segments**; the model's bound is the product over segments
and opaque blocks. Inside a segment, two maps with no activation between them get the identity (α = β = 1:
the exact norm of their product), consecutive activations compose (slopes in the hull of the products), and
activations before the first / after the last map of a segment are constants max(|α|, |β|).

**LipLT with per-activation slopes (derivation).** A segment is z_0 = A_0 x, z_k = A_k φ_{k−1}(z_{k−1}), output
z_{K−1}. Write φ_i(t) = a_i t + ψ_i(t) with a_i = (α_i + β_i)/2: ψ_i has slopes in [−b_i, b_i],
b_i = (β_i − α_i)/2, so (elementwise) ‖ψ_i(z) − ψ_i(z')‖₂ ≤ b_i‖z − z'‖₂. Unrolling z_k = a_{k−1} A_k z_{k−1}
+ A_k ψ_{k−1}(z_{k−1}):
    z_k = (∏_{i<k} a_i) A_k⋯A_0 x + Σ_{j<k} (∏_{i=j+1}^{k−1} a_i) A_k⋯A_{j+1} ψ_j(z_j).
With m_j a Lipschitz constant of x ↦ z_j and the triangle inequality:
    m_0 = ‖A_0‖,  m_k = |∏_{i<k} a_i|·‖A_k⋯A_0‖ + Σ_{j<k} b_j·|∏_{i=j+1}^{k−1} a_i|·‖A_k⋯A_{j+1}‖·m_j,
which for ReLU (a = b = ½) is papers.md §1's recursion. By induction with ‖A_k⋯A_j‖ ≤ ∏‖A_i‖ and the
identity ∏(|a_i| + b_i) = ∏|a_i| + Σ_j b_j ∏_{i<j}(|a_i| + b_i) ∏_{i>j}|a_i|, m_{K−1} ≤ ∏‖A_i‖·∏max(|α_i|,|β_i|)
= the product bound. Estimated norms need not be submultiplicative, so every segment's value is
min(LipLT, product of the same norms): LipLT ≤ product holds always.
**Pairwise** (L_ab for f_a − f_b, the margin certificate of class a against b): the last map A_{K−1} of the
network is replaced by (e_a − e_b)ᵀA_{K−1}; the chain norms ending there come from
:func:`lipkern.bounds.chain.head_chain_norms` (exact, C×C Grams), clamped by √2·‖A_{K−1}⋯A_j‖; everything
before the last segment multiplies. So L_ab ≤ √2·L and L_ab ≤ L_a + L_b.

**The bound** (:func:`lipschitz_bound`, always sound): float64, every sub-chain norm from
:func:`lipkern.bounds.chain.chain_upper_bounds` (guaranteed), the chains ending at the logits also from
``head_chain_norms(sound=True)`` (the smaller of both), every operation of the recursion rounded upward
(``torch.nextafter`` after each IEEE operation), the slope coefficients exact rationals rounded up: a
GUARANTEED upper bound of the Lipschitz constant of the real-arithmetic network with the weights it applies
(floating-point evaluation of the network itself is not covered; BatchNorm/Normalize scales are computed in
float64 and rounded up). It requires the model's function to be fixed: BatchNorm and Spectral layers in eval
mode, CPL layers certified and in eval mode. BatchNorm's γ/√(var+ε), Normalize's 1/std and average pooling's
1/k² are float64 values within a few units of float64 rounding of the real ones: every chain through them is
charged the difference (:func:`_inexact_corrections`). Every intermediate is rounded upward (nextafter),
underflow included.
**The estimate** (:func:`lipschitz_estimate`, :class:`LipschitzEstimate`, for training): the chain
norms are power-iteration ESTIMATES (from below),
differentiable in the weights; no host synchronization.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lipkern._rounding import fraction_up as _float_up
from lipkern._rounding import sqrt_int_up as _sqrt_up
from lipkern._rounding import tensor_up
from lipkern._checks import as_shape
from lipkern.bounds.operators import LinearMap, abs_norm_upper, plain_layer_operator
from lipkern.bounds.chain_power_iteration import advance_chains, chain_norm_estimates, initial_chain_vectors
from lipkern.ops.conv_power_iteration import conv_operator

__all__ = ["LipschitzBound", "LipschitzEstimate", "lipschitz_bound", "lipschitz_estimate"]

METHODS = ("liplt", "product")
_HEAD_LIMIT = 256  # the exact head norms (C passes through the segment) for logits up to this many classes
_SUPPORTED = ("nn.Sequential (nested), nn.Linear, nn.Conv2d, nn.BatchNorm1d/2d, nn.AvgPool2d, nn.MaxPool2d, "
              "nn.Flatten, nn.Unflatten, nn.Identity, nn.PixelUnshuffle, nn.PixelShuffle, nn.ReLU, nn.LeakyReLU, "
              "nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ELU, lipkern.nn AOLLinear/AOLConv2d/SpectralLinear/"
              "SpectralConv2d/CPLLinear/CPLConv2d/MaxMin, lipkern.models Normalize/Residual/FirstChannels/"
              "ZeroChannelPad/LinearNormalized/ConvNet/CPLNet/LipLTNet; others via activation_slopes= or "
              "lipschitz_constants=")


# ----------------------------------------------------------------------------------------------------------
# Plan items.
# ----------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Map:
    template: LinearMap
    weight: Callable[[bool], torch.Tensor]  # weight(precise): the applied weight now (differentiable)
    name: str
    # The precise weight is a float64 value of a real one (BatchNorm's γ/√(var+ε), 1/std, 1/k²): entrywise
    # within this relative error of it. The bound charges the difference (see _inexact_corrections).
    relative_error: float = 0.0

    def current(self, dtype=None, device=None, precise: bool = False, detach: bool = False) -> LinearMap:
        w = self.weight(precise)
        if detach:
            w = w.detach()
        if dtype is not None:
            w = w.to(device=device, dtype=dtype)
        return self.template.with_weight(w)


@dataclass(frozen=True)
class _Slope:
    alpha: Fraction
    beta: Fraction


@dataclass(frozen=True)
class _Constant:
    value: float  # already rounded up
    name: str


@dataclass(eq=False)
class _Segment:
    maps: list
    slopes: list  # (α, β) Fractions between consecutive maps
    index: int = -1


@dataclass(eq=False)
class _ResidualBlock:
    branch: list
    skip: list | None


@dataclass(eq=False)
class _Plan:
    blocks: list
    segments: list = field(default_factory=list)
    classes: int | None = None


# ----------------------------------------------------------------------------------------------------------
# Upward-rounded scalars (Python floats are IEEE doubles rounded to nearest).
# ----------------------------------------------------------------------------------------------------------
_U64 = 2.0 ** -53




# ----------------------------------------------------------------------------------------------------------
# Parsing.
# ----------------------------------------------------------------------------------------------------------
def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _builtin_slopes(module: nn.Module) -> tuple[float, float] | None:
    t = type(module)
    if t in (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Softplus):
        return (0.0, 1.0)
    if t is nn.Sigmoid:
        return (0.0, 0.25)
    if t is nn.LeakyReLU:
        a = float(module.negative_slope)
        return (min(a, 1.0), max(a, 1.0))
    if t is nn.ELU and module.alpha >= 0:
        return (0.0, max(1.0, float(module.alpha)))
    return None


def computes_forward_of(module: nn.Module, *classes: type) -> bool:
    """``module`` is an instance of one of ``classes`` and runs that class's own forward: a subclass that
    overrides forward (say ``100 * super().forward(x)``) is not the class it derives from. Parametrizations
    (torch.nn.utils.parametrize) change the weight, not the forward, and count."""
    return any(isinstance(module, cls) and type(module).forward is cls.forward for cls in classes)


def reject_hooks(module: nn.Module, who: str) -> None:
    """Forward hooks and pre-hooks can change what a module computes (the classic
    torch.nn.utils.spectral_norm recomputes the weight in a pre-hook): a bound read from the module's attributes
    would not be the bound of what runs. Refuse them."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        raise TypeError(f"{who}: global forward hooks are registered (they may change every module's output); "
                        "remove them to compute a bound")
    if module._forward_hooks or module._forward_pre_hooks:
        raise TypeError(f"{who}: {type(module).__name__} has forward hooks or pre-hooks, which may change its "
                        "output (torch.nn.utils.spectral_norm/weight_norm are hooks: use "
                        "torch.nn.utils.parametrizations instead), or declare its constant with "
                        "lipschitz_constants={module: L}")


class _Parser:
    def __init__(self, model: nn.Module, sound: bool, activation_slopes, lipschitz_constants):
        self.sound = sound
        self.slopes = dict(activation_slopes or {})
        self.constants = dict(lipschitz_constants or {})
        self.names = {id(m): n or type(m).__name__ for n, m in model.named_modules()}
        tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        self.dtype = tensors[0].dtype if tensors else torch.get_default_dtype()
        self.device = tensors[0].device if tensors else torch.device("cpu")
        for key, value in self.slopes.items():
            alpha, beta = value
            if not (math.isfinite(alpha) and math.isfinite(beta) and alpha <= beta):
                raise ValueError(f"activation_slopes[{key!r}]: need finite alpha <= beta, got {value!r}")
        for key, value in self.constants.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"lipschitz_constants[{key!r}]: need a finite number >= 0, got {value!r}")

    def name(self, module) -> str:
        return f"{self.names.get(id(module), type(module).__name__)} ({type(module).__name__})"

    @staticmethod
    def _lookup(table: dict, module):
        if module in table:
            return table[module]
        for key, value in table.items():
            if isinstance(key, type) and isinstance(module, key):
                return value
        return None

    def run(self, module, shape) -> tuple[int, ...]:
        """The output shape of ``module`` on a batch of two zero inputs of ``shape`` (two: BatchNorm in training
        mode needs more than one value per channel). Buffers are restored afterwards: a bound does not advance
        a layer's power iteration or a BatchNorm's running statistics."""
        x = torch.zeros(2, *shape, dtype=self.dtype, device=self.device)
        saved = [(b, b.detach().clone()) for b in module.buffers()]
        try:
            with torch.no_grad():
                y = module(x)
        except (RuntimeError, ValueError, IndexError) as err:
            raise ValueError(f"lipschitz_bound: {self.name(module)} does not accept an input of shape {shape} "
                             f"(batch dim excluded): {err}") from err
        finally:
            with torch.no_grad():
                for buffer, value in saved:
                    if not torch.equal(buffer, value):
                        buffer.copy_(value)
        if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != 2:
            raise ValueError(f"lipschitz_bound: {self.name(module)} changed the batch dimension")
        return tuple(y.shape[1:])

    # -- the walk ------------------------------------------------------------------------------------------
    def parse(self, module: nn.Module, shape: tuple) -> tuple[list, tuple]:
        from lipkern import models as M

        constant = self._lookup(self.constants, module)
        if constant is not None:
            return [_Constant(float(constant), self.name(module))], self.run(module, shape)
        reject_hooks(module, f"lipschitz_bound: {self.name(module)}")
        slopes = self._lookup(self.slopes, module) or _builtin_slopes(module)
        if slopes is not None:
            return [_Slope(Fraction(slopes[0]), Fraction(slopes[1]))], shape
        if computes_forward_of(module, nn.Sequential):
            return self.parse_sequence(list(module), shape)
        if computes_forward_of(module, M.ConvNet):
            return self.parse(module.layers, shape)
        if computes_forward_of(module, M.CPLNet):
            return self.parse_sequence([module.body, module.head], shape)
        if computes_forward_of(module, M.Residual):
            inplace = [m for m in module.modules() if getattr(m, "inplace", False) is True]
            if inplace:  # an in-place op at the start of a path overwrites the input the other path adds
                raise ValueError(f"lipschitz_bound: {self.name(module)} contains in-place modules "
                                 f"({', '.join(self.name(m) for m in inplace)}); they can overwrite the block's "
                                 "input before the skip adds it: use inplace=False inside residual blocks")
            branch, out = self.parse(module.branch, shape)
            skip, skip_out = (None, shape) if module.skip is None else self.parse(module.skip, shape)
            if skip_out != out:
                raise ValueError(f"lipschitz_bound: {self.name(module)}: the branch gives {out}, the skip "
                                 f"{skip_out}")
            return [_ResidualBlock(branch, skip)], out
        if computes_forward_of(module, nn.Flatten, nn.Unflatten, nn.Identity):
            return [], self.run(module, shape)
        handled = self.parse_layer(module, shape)
        if handled is None:
            raise TypeError(f"lipschitz_bound: unsupported module {self.name(module)}. Supported: {_SUPPORTED}. "
                            "Pass an nn.Sequential of supported modules, or declare the module's constant with "
                            "lipschitz_constants={module: L} (your responsibility) or its elementwise slopes "
                            "with activation_slopes={module: (alpha, beta)}")
        return handled

    def parse_sequence(self, modules, shape) -> tuple[list, tuple]:
        items = []
        for m in modules:
            new, shape = self.parse(m, shape)
            items += new
        return items, shape

    def map_item(self, module, template_fn, weight_fn, relative_error: float = 0.0) -> tuple[list, tuple]:
        try:
            template = template_fn()
        except ValueError as err:
            raise ValueError(f"lipschitz_bound: {self.name(module)}: {err}") from err
        return [_Map(template, weight_fn, self.name(module), relative_error)], template.out_shape

    def parse_layer(self, module, shape):  # noqa: C901 (one branch per layer type)
        from lipkern import models as M
        from lipkern import nn as LN

        name = self.name(module)
        if computes_forward_of(module, LN.CPLConv2d, LN.CPLLinear):
            if self.sound and (not module.certified or module.training):
                raise ValueError(f"lipschitz_bound: {name} is 1-Lipschitz with proof only with "
                                 "certified=True and in eval mode (its step size uses a guaranteed norm bound)")
            return [_Constant(1.0, name)], self.run(module, shape)
        if computes_forward_of(module, LN.PlainCPLConv2d, LN.PlainCPLLinear):
            return self.plain_cpl(module, shape)
        if computes_forward_of(module, LN.SLLConv2d, LN.SLLLinear):
            if self.sound and module.training:
                raise ValueError(f"lipschitz_bound: {name} is 1-Lipschitz with proof in eval mode (its scale is "
                                 "then the guaranteed one): call model.eval()")
            return [_Constant(1.0, name)], self.run(module, shape)
        if computes_forward_of(module, LN.PlainSLLConv2d, LN.PlainSLLLinear):
            return self.plain_sll(module, shape)
        if computes_forward_of(module, LN.MaxMin):
            return [_Constant(1.0, name)], self.run(module, shape)
        if computes_forward_of(module, nn.PixelShuffle):
            return [_Constant(1.0, name)], self.run(module, shape)
        if computes_forward_of(module, nn.MaxPool2d):
            return self.max_pool(module, shape)
        if computes_forward_of(module, LN.SpectralConv2d, LN.SpectralLinear):
            return self.spectral(module, shape)
        if computes_forward_of(module, M.LinearNormalized):
            return self.dense(module, shape, lambda p: F.normalize(module.weight, dim=1))
        if computes_forward_of(module, LN.AOLLinear):
            return self.dense(module, shape, lambda p: module.rescaled_weight())
        if computes_forward_of(module, LN.AOLConv2d):
            return self.conv(module, shape, lambda p: module.rescaled_weight())
        if computes_forward_of(module, nn.Linear):
            return self.dense(module, shape, lambda p: module.weight)
        if computes_forward_of(module, nn.Conv2d):
            return self.conv(module, shape, lambda p: module.weight)
        if computes_forward_of(module, nn.BatchNorm1d, nn.BatchNorm2d):
            return self.batch_norm(module, shape)
        if computes_forward_of(module, M.Normalize):
            return self.normalize(module, shape)
        if computes_forward_of(module, nn.AvgPool2d):
            return self.avg_pool(module, shape)
        if computes_forward_of(module, M.FirstChannels, M.ZeroChannelPad, nn.PixelUnshuffle, M.PixelUnshuffle):
            return self.selection(module, shape)
        return None

    # -- layer types ---------------------------------------------------------------------------------------
    def plain_cpl(self, module, shape):
        """x − h·Wᵀrelu(Wx + b) (an exported CPL layer): its Jacobian I − h·WᵀDW (0 ≤ D ≤ I) has eigenvalues in
        [1 − h‖W‖², 1], so its norm is ≤ max(1, h·U² − 1) for any U ≥ ‖W‖₂ (a guaranteed bound here)."""
        try:
            operator = plain_layer_operator(module, shape)
        except ValueError as err:
            raise ValueError(f"lipschitz_bound: {self.name(module)}: {err}") from err
        upper, h = float(operator.upper_bound()), float(module.h)
        if not (math.isfinite(upper) and math.isfinite(h) and h >= 0):
            raise ValueError(f"lipschitz_bound: {self.name(module)} has a non-finite weight or step size")
        value = max(1.0, h * upper * upper * (1 + 8 * 2.0**-53) - 1.0)  # rounded up: 3 products, 1 difference
        return [_Constant(value, self.name(module))], self.run(module, shape)

    def plain_sll(self, module, shape):
        """x − Wᵀ(s ⊙ relu(Wx + b)) (an exported SLL layer): its Jacobian I − Wᵀ S D W has eigenvalues in
        [1 − ‖S^{1/2}W‖², 1], so its norm is ≤ max(1, U² − 1) for U ≥ ‖S^{1/2}W‖₂ (guaranteed: S^{1/2}W is
        formed in float64 with two roundings per entry, charged)."""
        scale = module.scale.detach().double()
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise ValueError(f"lipschitz_bound: {self.name(module)} has a non-finite or negative scale")
        weight = module.weight.detach().double()
        root = scale.sqrt().reshape(-1, *([1] * (weight.dim() - 1)))
        try:
            operator = plain_layer_operator(module, shape, root * weight)
        except ValueError as err:
            raise ValueError(f"lipschitz_bound: {self.name(module)}: {err}") from err
        # the computed S^{1/2}W is within (2u + u²) of the exact entrywise: |ΔA| ≤ 3u·|A|, ‖ΔA‖ ≤ 3u‖|A|‖
        slack = 3 * _U64 * abs_norm_upper(operator)
        upper = (float(operator.upper_bound()) + slack) * (1 + 4 * _U64)
        if not math.isfinite(upper):
            raise ValueError(f"lipschitz_bound: {self.name(module)} has a non-finite weight")
        value = max(1.0, upper * upper * (1 + 4 * _U64) - 1.0)
        return [_Constant(value, self.name(module))], self.run(module, shape)

    def dense(self, module, shape, weight_fn):
        if len(shape) != 1:
            raise ValueError(f"lipschitz_bound: {self.name(module)} gets inputs of shape {shape}; a linear layer "
                             "acts on the last dimension only: add nn.Flatten before it")
        return self.map_item(module, lambda: LinearMap.dense(weight_fn(False).detach(), shape, self.name(module)),
                             weight_fn)

    def conv(self, module, shape, weight_fn):
        if module.padding_mode not in ("zeros", "circular"):
            raise ValueError(f"lipschitz_bound: {self.name(module)} has padding_mode={module.padding_mode!r}; "
                             "only 'zeros' and 'circular' are supported ('reflect'/'replicate' repeat pixels)")
        if len(shape) != 3:
            raise ValueError(f"lipschitz_bound: {self.name(module)} needs (C, H, W) inputs, gets {shape}")
        return self.map_item(module, lambda: LinearMap.conv2d(
            weight_fn(False).detach(), shape, module.stride, module.padding, module.dilation, module.groups,
            module.padding_mode, self.name(module)), weight_fn)

    def spectral(self, module, shape):
        if self.sound and module.training:
            raise ValueError(f"lipschitz_bound: {self.name(module)} is in training mode, where its "
                             "divisor changes every step: call model.eval()")

        def weight_fn(precise):
            if module.training:  # σ ≈ ‖A u‖ with the layer's current unit vector u (finite before any forward)
                u = module.u.to(module.weight.dtype)
                if getattr(module, "geometry", None) is not None:
                    au = conv_operator(u[None], module.weight, module.geometry)
                else:
                    au = module.weight @ u
                return module._divide(torch.linalg.vector_norm(au))
            return module._divide(module._eval_sigma())

        if isinstance(module, nn.Module) and hasattr(module, "geometry"):
            if module.geometry is None:
                raise ValueError(f"lipschitz_bound: {self.name(module)} has no input size yet (pass input_size)")
            if len(shape) == 3 and tuple(shape[1:]) != tuple(module.geometry.input_size):
                raise ValueError(f"lipschitz_bound: {self.name(module)} is normalized for inputs of size "
                                 f"{tuple(module.geometry.input_size)} and refuses others; it gets {tuple(shape[1:])}")
            return self.conv(module, shape, weight_fn)
        return self.dense(module, shape, weight_fn)

    def diag(self, module, shape, weight_fn, relative_error: float):
        if len(shape) < 1 or shape[0] != weight_fn(False).numel():
            raise ValueError(f"lipschitz_bound: {self.name(module)} has {weight_fn(False).numel()} channels, "
                             f"its input shape is {shape}")
        return self.map_item(module, lambda: LinearMap.diag(weight_fn(False).detach().reshape(-1), shape,
                                                            self.name(module)), weight_fn, relative_error)

    def batch_norm(self, module, shape):
        if module.running_var is None:
            raise ValueError(f"lipschitz_bound: {self.name(module)} has no running statistics "
                             "(track_running_stats=False): it is not a fixed linear map")
        if self.sound and module.training:
            raise ValueError(f"lipschitz_bound: {self.name(module)} is in training mode (batch "
                             "statistics): call model.eval(); the bound is for the running statistics")

        def weight_fn(precise):
            var = module.running_var.double() if precise else module.running_var
            scale = torch.rsqrt(var + module.eps)
            if module.weight is not None:
                scale = scale * (module.weight.double() if precise else module.weight)
            return scale

        return self.diag(module, shape, weight_fn, 8 * _U64)  # + ε, sqrt, quotient (rsqrt), product by γ

    def normalize(self, module, shape):
        def weight_fn(precise):
            return 1.0 / module.std.double() if precise else 1.0 / module.std

        return self.diag(module, shape, weight_fn, 2 * _U64)  # one quotient

    def avg_pool(self, module, shape):
        kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
        padding = _pair(module.padding)
        if module.ceil_mode:
            raise ValueError(f"lipschitz_bound: {self.name(module)} has ceil_mode=True (windows of varying "
                             "size); not supported")
        if any(padding) and not module.count_include_pad:
            raise ValueError(f"lipschitz_bound: {self.name(module)} pads with count_include_pad=False (border "
                             "windows divide by fewer pixels); not supported")
        if len(shape) != 3:
            raise ValueError(f"lipschitz_bound: {self.name(module)} needs (C, H, W) inputs, gets {shape}")
        divisor = module.divisor_override or kernel[0] * kernel[1]
        weight = torch.full((shape[0], 1, *kernel), 1.0 / divisor, dtype=torch.float64, device=self.device)
        items, out = self.map_item(module, lambda: LinearMap.conv2d(weight, shape, stride, padding, 1, shape[0],
                                                                    name=self.name(module)),
                                   lambda p: weight, 2 * _U64)  # 1/divisor: one quotient
        if self.run(module, shape) != out:
            raise ValueError(f"lipschitz_bound: {self.name(module)}: unexpected output shape")
        return items, out

    def selection(self, module, shape):
        """FirstChannels / ZeroChannelPad (1×1 conv or dense 0/1 map) and PixelUnshuffle (stride-r conv)."""
        from lipkern import models as M

        out = self.run(module, shape)
        if isinstance(module, nn.PixelUnshuffle):
            r, c = module.downscale_factor, shape[0]
            weight = torch.zeros(c * r * r, c, r, r, dtype=torch.float64, device=self.device)
            for ch in range(c):
                for i in range(r):
                    for j in range(r):
                        weight[ch * r * r + i * r + j, ch, i, j] = 1.0
            return self.map_item(module, lambda: LinearMap.conv2d(weight, shape, r, name=self.name(module)),
                                 lambda p: weight)
        assert isinstance(module, (M.FirstChannels, M.ZeroChannelPad))
        eye = torch.eye(out[0], shape[0], dtype=torch.float64, device=self.device)
        if len(shape) == 1:
            return self.map_item(module, lambda: LinearMap.dense(eye, shape, self.name(module)), lambda p: eye)
        if len(shape) == 3:
            weight = eye[:, :, None, None]
            return self.map_item(module, lambda: LinearMap.conv2d(weight, shape, name=self.name(module)),
                                 lambda p: weight)
        return [_Constant(1.0, self.name(module))], out

    def max_pool(self, module, shape):
        out = self.run(module, shape)
        kernel, stride, dilation = _pair(module.kernel_size), _pair(module.stride or module.kernel_size), \
            _pair(module.dilation)
        covering = 1
        for k, s, d, o in zip(kernel, stride, dilation, out[-2:]):
            covering *= min(k, -(-((k - 1) * d + 1) // s), o)
        return [_Constant(_sqrt_up(covering), self.name(module))], out


# ----------------------------------------------------------------------------------------------------------
# Blocks: LipLT segments, constants, residuals.
# ----------------------------------------------------------------------------------------------------------
def _compose(first, second):
    """Slopes of φ₂∘φ₁ for slope-restricted φ₁ ∈ [α₁, β₁], φ₂ ∈ [α₂, β₂]: the hull of the four products."""
    if first is None:
        return second
    products = [a * b for a in first for b in second]
    return (min(products), max(products))


def _max_abs(slopes) -> float:
    return _float_up(max(abs(slopes[0]), abs(slopes[1])))


def _build_blocks(items: list, method: str, segments: list) -> list:
    blocks, maps, between, pending = [], [], [], None

    def flush():
        nonlocal maps, between, pending
        if maps:
            seg = _Segment(maps, between, len(segments))
            segments.append(seg)
            blocks.append(seg)
        if pending is not None:
            blocks.append(_Constant(_max_abs(pending), "activation"))
        maps, between, pending = [], [], None

    for item in items:
        if isinstance(item, _Map):
            if maps and method == "product":
                flush()
            if maps:
                between.append(pending or (Fraction(1), Fraction(1)))
            elif pending is not None:
                blocks.append(_Constant(_max_abs(pending), "activation"))
            pending = None
            maps.append(item)
        elif isinstance(item, _Slope):
            pending = _compose(pending, (item.alpha, item.beta))
        else:
            flush()
            if isinstance(item, _ResidualBlock):
                skip = None if item.skip is None else _build_blocks(item.skip, method, segments)
                blocks.append(_ResidualBlock(_build_blocks(item.branch, method, segments), skip))
            else:
                blocks.append(item)
    flush()
    return blocks


def _coefficients(seg: _Segment) -> tuple[list, list, float]:
    """(full (K,), coef (K, K), slope product) rounded up: full[k] = |∏_{i<k} a_i|,
    coef[j][k] = b_j·|∏_{i=j+1}^{k−1} a_i| (j < k), product = ∏ max(|α_i|, |β_i|)."""
    count = len(seg.maps)
    a = [abs(alpha + beta) / 2 for alpha, beta in seg.slopes]
    b = [(beta - alpha) / 2 for alpha, beta in seg.slopes]
    full, coef = [0.0] * count, [[0.0] * count for _ in range(count)]
    for k in range(count):
        full[k] = _float_up(math.prod(a[:k], start=Fraction(1)))
        for j in range(k):
            coef[j][k] = _float_up(b[j] * math.prod(a[j + 1:k], start=Fraction(1)))
    product = _float_up(math.prod((x + y for x, y in zip(a, b)), start=Fraction(1)))
    return full, coef, product


def build_plan(model: nn.Module, input_shape, method: str = "liplt", pairwise: bool = False, sound: bool = False,
               activation_slopes=None, lipschitz_constants=None) -> _Plan:
    """Parse ``model`` on inputs of ``input_shape`` (no batch dim) into segments and opaque blocks."""
    if method not in METHODS:
        raise ValueError(f"lipschitz_bound: method must be one of {METHODS}, got {method!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"lipschitz_bound: model must be an nn.Module, got {type(model).__name__}")
    if sound and any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ValueError("lipschitz_bound: the model is on the meta device (shapes only): a bound "
                         "needs values")
    try:
        shape = as_shape(input_shape, "input_shape", minimum=0)
    except TypeError:
        raise ValueError(f"lipschitz_bound: input_shape must be a tuple of ints, got {input_shape!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"lipschitz_bound: input_shape must be a non-empty tuple of positive ints (one input "
                         f"without the batch dim, e.g. (3, 32, 32)), got {input_shape!r}")
    parser = _Parser(model, sound, activation_slopes, lipschitz_constants)
    items, out = parser.parse(model, shape)
    plan = _Plan([])
    plan.blocks = _build_blocks(items, method, plan.segments)
    if pairwise:
        last = plan.blocks[-1] if plan.blocks else None
        if not isinstance(last, _Segment) or items[-1] is not last.maps[-1]:
            raise ValueError("lipschitz_bound(pairwise=True): the model must end with a linear layer (the logits), "
                             "not an activation or an opaque block")
        plan.classes = math.prod(out)
    return plan


# ----------------------------------------------------------------------------------------------------------
# Evaluation: the same recursion on estimates (tensors) or on guaranteed bounds (each op rounded up).
# ----------------------------------------------------------------------------------------------------------
class _Plain:
    """Estimate arithmetic: ordinary tensor ops, vectorized sums."""

    @staticmethod
    def mul(a, b):
        return a * b

    @staticmethod
    def add(a, b):
        return a + b

    @staticmethod
    def weighted_sum(coef, col, m):
        return (coef * col * m).sum(0)

    @staticmethod
    def prod(t):
        return t.prod(0)


class _Upward:
    """float64 tensors, every IEEE operation followed by nextafter(+inf): each result ≥ its exact value
    (nonnegative operands; correct rounding makes nextafter of the rounded result an upper bound)."""

    @staticmethod
    def _up(t):
        return tensor_up(t)

    def mul(self, a, b):
        return self._up(torch.as_tensor(a, dtype=torch.float64) * b)

    def add(self, a, b):
        return self._up(torch.as_tensor(a, dtype=torch.float64) + b)

    def weighted_sum(self, coef, col, m):
        total = None
        for j in range(col.shape[0]):
            term = self.mul(self.mul(coef[j], col[j]), m[j])
            total = term if total is None else self.add(total, term)
        return total

    def prod(self, t):
        total = t[0]
        for j in range(1, t.shape[0]):
            total = self.mul(total, t[j])
        return total


def _expand(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.reshape(coef.shape + (1,) * (like.dim() - 1))


def _segment_value(norms: torch.Tensor, head, coefs, ar) -> torch.Tensor:
    """min(LipLT, product) of one segment. norms (K, K): norms[j, k] ≥ / ≈ ‖A_k⋯A_j‖; head (K, C, C) or None:
    the pairwise norms of the chains ending at the last map; coefs = (full (K,), coef (K, K), slope product)."""
    full, coef, slope_product = coefs
    count = norms.shape[0]
    if count == 1 and head is None:  # one map: LipLT = product = its norm (no activations inside a segment)
        return norms[0, 0]
    m = []
    for k in range(count):
        col = head if (head is not None and k == count - 1) else norms[:, k]
        value = col[0] if k == 0 else ar.mul(full[k], col[0])
        if k > 0:
            stacked = torch.stack(m)
            value = ar.add(value, ar.weighted_sum(_expand(coef[:k, k], col[1:k + 1]), col[1:k + 1],
                                                  _expand(stacked, col[1:k + 1])))
        m.append(value)
    diag = norms.diagonal()
    last = diag[-1] if head is None else head[-1]
    product = last if count == 1 else ar.mul(ar.prod(diag[:-1]), last)
    product = ar.mul(product, slope_product)
    return torch.minimum(m[-1], product)


def _sequence_value(blocks, seg_values, ar, one):
    total = one
    for block in blocks:
        if isinstance(block, _Segment):
            value = seg_values[block.index]
        elif isinstance(block, _ResidualBlock):
            skip = one if block.skip is None else _sequence_value(block.skip, seg_values, ar, one)
            value = ar.add(skip, _sequence_value(block.branch, seg_values, ar, one))
        else:
            value = block.value
        total = ar.mul(total, value)
    return total


def _coefficient_tensors(seg, dtype, device):
    full, coef, product = _coefficients(seg)
    return (torch.tensor(full, dtype=dtype, device=device), torch.tensor(coef, dtype=dtype, device=device),
            torch.tensor(product, dtype=dtype, device=device))


def _sound_bound(plan: _Plan, pairwise: bool, chain_options: dict) -> torch.Tensor:
    from lipkern.bounds.chain import chain_upper_bounds, head_chain_norms

    ar, cpu = _Upward(), torch.device("cpu")
    seg_values = []
    for seg in plan.segments:
        maps = [m.current(precise=True, detach=True) for m in seg.maps]
        maps = [m.to(torch.float64) if m.weight.dtype != torch.float64 else m for m in maps]
        device = maps[0].weight.device
        maps = [m.with_weight(m.weight.to(device)) for m in maps]
        bounds = chain_upper_bounds(maps, **chain_options)
        norms = bounds.to(cpu)
        head = None
        last = norms[:, -1].clone()
        if pairwise and seg is plan.blocks[-1]:
            off_diagonal = 1 - torch.eye(plan.classes, dtype=torch.float64)
            head = torch.minimum(head_chain_norms(maps, pairwise=True, sound=True, chain_bounds=bounds).to(cpu),
                                 ar.mul(_sqrt_up(2), last)[:, None, None] * off_diagonal)
        elif seg is plan.blocks[-1] and maps[-1].out_features <= _HEAD_LIMIT:
            norms[:, -1] = torch.minimum(last, head_chain_norms(maps, pairwise=False, sound=True,
                                                                     chain_bounds=bounds).to(cpu))
        correction = _inexact_corrections(seg.maps, norms)
        if correction is not None:  # of the real maps: the float64 ones plus their rounding (tiny)
            norms = ar.add(norms, correction)
            if head is not None:
                head = ar.add(head, ar.mul(_sqrt_up(2), correction[:, -1])[:, None, None] * off_diagonal)
        seg_values.append(_segment_value(norms, head, _coefficient_tensors(seg, torch.float64, cpu), ar))
    value = _sequence_value(plan.blocks, seg_values, ar, torch.ones((), dtype=torch.float64))
    if pairwise:  # exact zeros on the diagonal (the upward rounding made them the smallest subnormal)
        value = value * (1 - torch.eye(plan.classes, dtype=torch.float64))
    return value


def _inexact_corrections(maps: list, norms: torch.Tensor) -> torch.Tensor | None:
    """Chains through maps whose float64 weight M_i is within a relative r_i of the real one M_i + Δ_i
    (‖Δ_i‖ ≤ r_i‖M_i‖): ‖∏(M_i + Δ_i)‖ ≤ ‖∏M_i‖ + (∏(1 + r_i) − 1)·∏‖M_i‖ (expand the product). Returns the
    (K, K) upper triangle of these additive terms (exact rationals rounded up), with ‖M_i‖ ≤ norms[i, i];
    None when every map is exact."""
    rel = [Fraction(m.relative_error) for m in maps]
    if not any(rel):
        return None
    k = len(maps)
    diag = [Fraction(float(norms[i, i])) for i in range(k)]
    out = torch.zeros(k, k, dtype=torch.float64)
    for j in range(k):
        growth, product = Fraction(1), Fraction(1)
        for i in range(j, k):
            growth *= 1 + rel[i]
            product *= diag[i]
            out[j, i] = _float_up((growth - 1) * product)
    return out


# ----------------------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------------------
class LipschitzEstimate(nn.Module):
    """Differentiable ESTIMATE of a model's Lipschitz constant (LipLT or product of norms), for training: NOT a
    bound (a certificate needs :func:`lipschitz_bound`).

    model: see the module docstring (parsed once, on inputs of ``input_shape`` without the batch dim; the
    model is NOT registered as a submodule: its parameters stay the model's own, this module holds only the
    power-iteration vectors as buffers, one tensor per (segment, start layer), deterministic from the shapes).
    forward(): advances the vectors of ALL sub-chains by ``n_iter`` power-iteration steps in one
    :func:`lipkern.bounds.chain_power_iteration.chain_power_iteration` pass (no_grad; 2K operator calls per step for a segment of K
    maps), then returns σ_jk = ‖A_k⋯A_j u_jk‖ (u detached; gradient to the weights) combined by the
    recursion: a 0-dim tensor, or with ``pairwise=True`` a (C, C) tensor of L_ab (zero diagonal; the chains
    ending at the logits exactly from ``head_chain_norms``). An estimate from below of the bound (power
    iteration converges from below): use :func:`lipschitz_bound` for a certificate.
    No host synchronization. Options: ``activation_slopes``, ``lipschitz_constants`` (see the module docstring).
    """

    def __init__(self, model: nn.Module, input_shape, method: str = "liplt", pairwise: bool = False,
                 n_iter: int = 5, *, activation_slopes=None, lipschitz_constants=None):
        super().__init__()
        if not isinstance(n_iter, int) or isinstance(n_iter, bool) or n_iter < 1:
            raise ValueError(f"{type(self).__name__}: n_iter must be an int >= 1, got {n_iter!r}")
        self._plan = build_plan(model, input_shape, method, pairwise, False, activation_slopes,
                                lipschitz_constants)
        object.__setattr__(self, "_model", model)  # a plain reference: not a submodule, not in state_dict
        object.__setattr__(self, "_parsed_layers", tuple(model.modules()))  # what the plan was built from
        self.method, self.pairwise, self.n_iter = method, bool(pairwise), n_iter
        self.input_shape = as_shape(input_shape, "input_shape")
        tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        dtype = tensors[0].dtype if tensors else torch.get_default_dtype()
        device = tensors[0].device if tensors else torch.device("cpu")
        if dtype not in (torch.float32, torch.float64):
            dtype = torch.float32
        self._dtype, self._device = dtype, device  # used only by a model without linear layers
        self._vector_names = []
        for s, seg in enumerate(self._plan.segments):
            names = []
            for j, u in enumerate(initial_chain_vectors([m.template for m in seg.maps], dtype, device,
                                                        key=f"liplt:{s}")):
                names.append(f"u_{s}_{j}")
                self.register_buffer(names[-1], u)
            self._vector_names.append(names)
            for name, t in zip(("full", "coef", "slopes"), _coefficient_tensors(seg, dtype, device)):
                self.register_buffer(f"_{name}_{s}", t, persistent=False)

    @property
    def model(self) -> nn.Module:
        return self._model

    def forward(self) -> torch.Tensor:
        layers = tuple(self._model.modules())
        if len(layers) != len(self._parsed_layers) or any(a is not b for a, b in zip(layers, self._parsed_layers)):
            raise ValueError(f"{type(self).__name__}: the model's layers changed after this estimate was built (a "
                             f"replaced or added submodule): build a new one for the model as it is now")
        dtype, device = self._dtype, self._device
        if self._plan.segments:
            dtype, device = self.u_0_0.dtype, self.u_0_0.device
        segments = [[m.current(dtype, device) for m in seg.maps] for seg in self._plan.segments]
        vectors = [[getattr(self, n) for n in names] for names in self._vector_names]
        advance_chains(segments, vectors, self.n_iter)
        ar, seg_values = _Plain(), []
        for s, (seg, maps) in enumerate(zip(self._plan.segments, segments)):
            norms = chain_norm_estimates(maps, vectors[s])
            head = None
            if self.pairwise and seg is self._plan.blocks[-1]:
                from lipkern.bounds.chain import head_chain_norms

                pair = head_chain_norms(maps, pairwise=True, sound=False).to(dtype)
                head = torch.minimum(pair, math.sqrt(2.0) * norms[:, -1, None, None])
            coefs = (getattr(self, f"_full_{s}"), getattr(self, f"_coef_{s}"), getattr(self, f"_slopes_{s}"))
            seg_values.append(_segment_value(norms, head, coefs, ar))
        return _sequence_value(self._plan.blocks, seg_values, ar, torch.ones((), dtype=dtype, device=device))

    def extra_repr(self) -> str:
        sizes = [len(seg.maps) for seg in self._plan.segments]
        return (f"method={self.method!r}, pairwise={self.pairwise}, n_iter={self.n_iter}, input_shape="
                f"{self.input_shape}, segment lengths={sizes}")


class LipschitzBound(LipschitzEstimate):
    """Deprecated name of :class:`LipschitzEstimate` (it is an estimate from below, not a bound)."""

    def __init__(self, *args, **kwargs):
        warnings.warn("lipkern.bounds.LipschitzBound is renamed LipschitzEstimate: it is a differentiable "
                      "estimate from below, not a bound (lipschitz_bound gives the guaranteed upper bound)",
                      DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)


def lipschitz_bound(model: nn.Module, input_shape, method: str = "liplt", pairwise: bool = False, *,
                    activation_slopes=None, lipschitz_constants=None, dense_limit: int | None = None,
                    sound: bool | None = None) -> torch.Tensor:
    """A GUARANTEED upper bound (float64) of the Lipschitz constant (ℓ₂) of ``model`` on inputs of
    ``input_shape`` (one input, no batch dim): the real-arithmetic network with the weights it applies, every
    floating-point operation of the bound itself rounded upward (module docstring: what is covered and
    required). For the differentiable training estimate use :func:`lipschitz_estimate`.

    method: "liplt" (loop transformation, papers.md §1, generalized to [α, β] slopes; always ≤ "product") or
    "product" (∏ of the layers' norms and constants). pairwise=True: a (C, C) tensor of L_ab, the Lipschitz
    constants of the logit differences f_a − f_b (zero diagonal), else a 0-dim tensor.
    ``dense_limit`` is passed to :func:`lipkern.bounds.chain.chain_upper_bounds`: sub-chains whose explicit
    matrix has more entries get only products of shorter chains' bounds (sound, looser: on LipLTNet("6C2F") at
    32×32 with the default, 2.5× the converged estimate); raise it for tighter bounds at the cost of memory and
    time. ``sound``: deprecated (the bound is always sound); ``sound=False`` is refused.
    """
    if sound is not None:
        if not sound:
            raise ValueError("lipschitz_bound is always a guaranteed upper bound; the differentiable estimate "
                             "(from below) is lipschitz_estimate(model, input_shape, method, pairwise, n_iter)")
        warnings.warn("lipschitz_bound(sound=True): the bound is always sound now; drop the argument",
                      DeprecationWarning, stacklevel=2)
    plan = build_plan(model, input_shape, method, pairwise, True, activation_slopes, lipschitz_constants)
    with torch.no_grad():
        return _sound_bound(plan, pairwise, {} if dense_limit is None else {"dense_limit": dense_limit})


def lipschitz_estimate(model: nn.Module, input_shape, method: str = "liplt", pairwise: bool = False,
                       n_iter: int = 100, *, activation_slopes=None, lipschitz_constants=None) -> torch.Tensor:
    """An ESTIMATE of the Lipschitz constant (ℓ₂) of ``model`` on inputs of ``input_shape``: a fresh
    :class:`LipschitzEstimate` run for ``n_iter`` power-iteration steps, differentiable in the weights, from
    below the exact-norm value it converges to. Not a certificate: use :func:`lipschitz_bound` for one.
    method / pairwise / activation_slopes / lipschitz_constants as for :func:`lipschitz_bound`."""
    return LipschitzEstimate(model, input_shape, method, pairwise, n_iter, activation_slopes=activation_slopes,
                             lipschitz_constants=lipschitz_constants)()
