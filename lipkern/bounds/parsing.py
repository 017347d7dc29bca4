"""Parsing a model into the items of a Lipschitz bound, and the registry of bound rules.

A model is walked once, tracking the shape of one input (no batch dim), into plan items: linear maps
(:class:`_Map`, a :class:`~lipkern.bounds.operators.LinearMap` template and the weight it applies now),
slope-restricted activations (:class:`_Slope`), opaque blocks of known constant (:class:`_Constant`) and residual
blocks (:class:`_ResidualBlock`). What each module contributes is its **bound rule**, registered by type with
:func:`register_bound_rule` next to the module's own code: torch's layers here, lipkern's layers in
``lipkern.nn``, lipkern's models in ``lipkern.models`` (data flows down: nothing here imports them). A rule is
found for a module whose class, or a base class whose ``forward`` it runs unchanged, registered one
(:func:`computes_forward_of`); a subclass that overrides ``forward`` computes something else and needs its own.
:mod:`lipkern.bounds.liplt` turns the items into segments and evaluates them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import torch
from torch import nn

from lipkern._registry import TypeRegistry, computes_forward_of
from lipkern._rounding import sqrt_int_up
from lipkern.bounds.operators import LinearMap

__all__ = ["BoundParser", "bound_rule_for", "computes_forward_of", "register_bound_rule", "reject_hooks",
           "supported_modules", "unregister_bound_rule"]

_U64 = 2.0 ** -53  # unit roundoff of float64


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
class _ResidualBlock:
    branch: list
    skip: list | None




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


def inplace_modules(module: nn.Module) -> list[nn.Module]:
    """The submodules of a residual block that write their input in place (``inplace=True``): at the start of
    a path they overwrite the input the other path adds, so the block is not the sum it looks like."""
    return [m for m in module.modules() if getattr(m, "inplace", False) is True]


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




# ----------------------------------------------------------------------------------------------------------
# The registry of bound rules.
# ----------------------------------------------------------------------------------------------------------
BoundRule = Callable[["BoundParser", nn.Module, tuple], tuple]
_REGISTRY = TypeRegistry("register_bound_rule")
_RULES = _REGISTRY.rules


def register_bound_rule(*classes: type, replace: bool = False, helpers: tuple[str, ...] = ()):
    """Decorator: ``rule(parser, module, shape) -> (items, output shape)`` is how modules of ``classes`` (and
    of subclasses that keep their ``forward`` and the ``helpers`` methods it calls) enter a Lipschitz bound.
    The rule builds its items with the parser's helpers (:class:`BoundParser`) and must refuse (ValueError)
    what it cannot prove when ``parser.sound`` is set. A class registered twice raises unless ``replace``."""
    return _REGISTRY.register(*classes, replace=replace, helpers=helpers)


def unregister_bound_rule(*classes: type) -> None:
    _REGISTRY.unregister(*classes)


def bound_rule_for(module: nn.Module) -> BoundRule | None:
    """The rule of the nearest class in ``module``'s MRO that registered one and whose forward it runs."""
    return _REGISTRY.rule_for(module)


def supported_modules() -> str:
    """The registered module types, for messages."""
    return (_REGISTRY.names() + ", and the elementwise activations ReLU, LeakyReLU, ReLU6, Tanh, Sigmoid, "
            "Softplus, ELU")


class BoundParser:
    """Walks a model, tracking the shape of one input, into plan items. Bound rules (see
    :func:`register_bound_rule`) get the parser and use its helpers: :meth:`parse` / :meth:`sequence` for
    submodules, :meth:`constant`, :meth:`dense`, :meth:`conv`, :meth:`diag` and :meth:`residual` for items,
    :meth:`run` for an output shape, :meth:`name` for messages; ``sound`` says whether a guaranteed bound is
    being built (a rule refuses what it cannot prove, e.g. a layer in training mode)."""

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
        """The items of ``module`` on inputs of ``shape`` and its output shape: a user-declared constant or
        slopes, a built-in activation's slopes, else the bound rule registered for its type."""
        constant = self._lookup(self.constants, module)
        if constant is not None:
            return [_Constant(float(constant), self.name(module))], self.run(module, shape)
        reject_hooks(module, f"lipschitz_bound: {self.name(module)}")
        slopes = self._lookup(self.slopes, module) or _builtin_slopes(module)
        if slopes is not None:
            return [_Slope(Fraction(slopes[0]), Fraction(slopes[1]))], shape
        rule = bound_rule_for(module)
        if rule is None:
            raise TypeError(f"lipschitz_bound: unsupported module {self.name(module)}. Supported: "
                            f"{supported_modules()}. Pass an nn.Sequential of supported modules, or declare the "
                            "module's constant with lipschitz_constants={module: L} (your responsibility) or its "
                            "elementwise slopes with activation_slopes={module: (alpha, beta)}")
        return rule(self, module, shape)

    def sequence(self, modules, shape) -> tuple[list, tuple]:
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

    def constant(self, module, value: float, shape) -> tuple[list, tuple]:
        """An opaque block of Lipschitz constant ``value`` (already rounded up) with ``module``'s output shape."""
        return [_Constant(value, self.name(module))], self.run(module, shape)

    def residual(self, module, branch, skip, shape) -> tuple[list, tuple]:
        """x ↦ skip(x) + branch(x) (skip None: the identity), each parsed on ``shape``: L(skip) + L(branch)."""
        inplace = inplace_modules(module)
        if inplace:
            raise ValueError(f"lipschitz_bound: {self.name(module)} contains in-place modules "
                             f"({', '.join(self.name(m) for m in inplace)}); they can overwrite the block's "
                             "input before the skip adds it: use inplace=False inside residual blocks")
        branch_items, out = self.parse(branch, shape)
        skip_items, skip_out = (None, shape) if skip is None else self.parse(skip, shape)
        if skip_out != out:
            raise ValueError(f"lipschitz_bound: {self.name(module)}: the branch gives {out}, the skip {skip_out}")
        return [_ResidualBlock(branch_items, skip_items)], out

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

    def diag(self, module, shape, weight_fn, relative_error: float):
        if len(shape) < 1 or shape[0] != weight_fn(False).numel():
            raise ValueError(f"lipschitz_bound: {self.name(module)} has {weight_fn(False).numel()} channels, "
                             f"its input shape is {shape}")
        return self.map_item(module, lambda: LinearMap.diag(weight_fn(False).detach().reshape(-1), shape,
                                                            self.name(module)), weight_fn, relative_error)


# ----------------------------------------------------------------------------------------------------------
# Rules of torch's modules.
# ----------------------------------------------------------------------------------------------------------
@register_bound_rule(nn.Sequential)
def _sequential_rule(parser: BoundParser, module, shape):
    return parser.sequence(list(module), shape)


@register_bound_rule(nn.Flatten, nn.Unflatten, nn.Identity)
def _reshape_rule(parser: BoundParser, module, shape):
    return [], parser.run(module, shape)


@register_bound_rule(nn.PixelShuffle)
def _permutation_rule(parser: BoundParser, module, shape):
    return parser.constant(module, 1.0, shape)


@register_bound_rule(nn.Linear)
def _linear_rule(parser: BoundParser, module, shape):
    return parser.dense(module, shape, lambda precise: module.weight)


@register_bound_rule(nn.Conv2d, helpers=("_conv_forward",))
def _conv_rule(parser: BoundParser, module, shape):
    return parser.conv(module, shape, lambda precise: module.weight)


@register_bound_rule(nn.BatchNorm1d, nn.BatchNorm2d)
def _batch_norm_rule(parser: BoundParser, module, shape):
    if module.running_var is None:
        raise ValueError(f"lipschitz_bound: {parser.name(module)} has no running statistics "
                         "(track_running_stats=False): it is not a fixed linear map")
    if parser.sound and module.training:
        raise ValueError(f"lipschitz_bound: {parser.name(module)} is in training mode (batch "
                         "statistics): call model.eval(); the bound is for the running statistics")

    def weight_fn(precise):
        var = module.running_var.double() if precise else module.running_var
        scale = torch.rsqrt(var + module.eps)
        if module.weight is not None:
            scale = scale * (module.weight.double() if precise else module.weight)
        return scale

    return parser.diag(module, shape, weight_fn, 8 * _U64)  # + ε, sqrt, quotient (rsqrt), product by γ


@register_bound_rule(nn.AvgPool2d)
def _avg_pool_rule(parser: BoundParser, module, shape):
    kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
    padding = _pair(module.padding)
    name = parser.name(module)
    if module.ceil_mode:
        raise ValueError(f"lipschitz_bound: {name} has ceil_mode=True (windows of varying size); not supported")
    if any(padding) and not module.count_include_pad:
        raise ValueError(f"lipschitz_bound: {name} pads with count_include_pad=False (border windows divide by "
                         "fewer pixels); not supported")
    if len(shape) != 3:
        raise ValueError(f"lipschitz_bound: {name} needs (C, H, W) inputs, gets {shape}")
    divisor = module.divisor_override or kernel[0] * kernel[1]
    weight = torch.full((shape[0], 1, *kernel), 1.0 / divisor, dtype=torch.float64, device=parser.device)
    items, out = parser.map_item(module, lambda: LinearMap.conv2d(weight, shape, stride, padding, 1, shape[0],
                                                                  name=name),
                                 lambda p: weight, 2 * _U64)  # 1/divisor: one quotient
    if parser.run(module, shape) != out:
        raise ValueError(f"lipschitz_bound: {name}: unexpected output shape")
    return items, out


@register_bound_rule(nn.PixelUnshuffle)
def pixel_unshuffle_rule(parser: BoundParser, module, shape):
    """A stride-r conv with 0/1 weights (the channel order c·r² + i·r + j)."""
    parser.run(module, shape)
    r, c = module.downscale_factor, shape[0]
    weight = torch.zeros(c * r * r, c, r, r, dtype=torch.float64, device=parser.device)
    for ch in range(c):
        for i in range(r):
            for j in range(r):
                weight[ch * r * r + i * r + j, ch, i, j] = 1.0
    return parser.map_item(module, lambda: LinearMap.conv2d(weight, shape, r, name=parser.name(module)),
                           lambda p: weight)


@register_bound_rule(nn.MaxPool2d)
def _max_pool_rule(parser: BoundParser, module, shape):
    """√(the most windows covering one pixel) (LMT, papers.md §6)."""
    out = parser.run(module, shape)
    kernel, stride, dilation = _pair(module.kernel_size), _pair(module.stride or module.kernel_size), \
        _pair(module.dilation)
    covering = 1
    for k, s, d, o in zip(kernel, stride, dilation, out[-2:]):
        covering *= min(k, -(-((k - 1) * d + 1) // s), o)
    return [_Constant(sqrt_int_up(covering), parser.name(module))], out
