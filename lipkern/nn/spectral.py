"""Spectrally normalized layers (LMT / Miyato style): the weight divided by its operator norm.

Training: each forward advances the persistent power-iteration vectors by ``n_power_iterations`` steps (under
no_grad; the buffers ``u`` and ``v`` are written) and divides by σ = vᵀ A u, which is differentiable in the
weight. σ is an **estimate** from below, so a training-mode layer is only approximately 1-Lipschitz.
The layers of a model with equal geometry (and dtype, device, n_power_iterations) advance their vectors in ONE
stacked ``conv_power_iteration`` / ``batched_power_iteration`` call per training step, with no user code and
the same results as a per-layer step: see ``lipkern.nn.power`` for the mechanism and why it is exact.
Precision: float32 / float64 weights iterate in their dtype. float16 / bfloat16 weights are accepted: the power
iteration runs in float32 on an upcast copy (the kernels need the range of ‖A‖² and unit vectors that bf16
rounds to 3 digits), σ = vᵀAu is formed in float32 and rounded to the weight's dtype, the buffers keep the
layer's dtype. ``torch.autocast`` (bf16/fp16) leaves float32 layers iterating in float32 (the ops disable it
inside); the layer's own conv / linear runs in the autocast dtype as for ``nn.Conv2d``. A certified eval norm
of a half-precision weight is rounded up to that dtype (``certified=True`` works; the rounding slack is bf16's).
Eval: σ is computed once per weight (``lipkern.nn._cache``: writes through ``weight.data`` included) and cached: the converged power iteration (an estimate), or
with ``certified=True`` a guaranteed upper bound of the operator norm (Gram iteration in float64, see
``lipkern.bounds``) enlarged by the rounding of W/σ in the weight's dtype, so that the eval-mode layer,
with the weights it stores, is 1-Lipschitz with proof.

The vectors start deterministic (a function of the layer's shape only), so every DDP rank holds the same
ones; their updates depend only on the weight and the vectors, so ranks stay identical.
torch.compile: training steps compile with fullgraph=True; in eval, a compiled call serves the norm that the
last eager eval call cached (the eval norm comes from data-dependent loops a graph cannot hold).
Host synchronization: none in a training step (no value is read on the host; a NaN/Inf weight makes σ, the
vectors and the output NaN). The eval norm is computed where values are read anyway: it rejects a NaN/Inf
weight with a ValueError (``lipkern._dispatch.check_finite``, skipped with LIPKERN_CHECK_FINITE=0; the bounds
of ``lipkern.bounds`` used there reject it regardless), and so does ``to_vanilla``, which uses it.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lipkern._checks import as_bool
from lipkern._rounding import cast_up, smallest_normal
from lipkern._dispatch import autocast_off, check_finite
from lipkern.nn import power
from lipkern.nn._cache import WeightSnapshot
from lipkern.bounds.spectral import _circular_embedding, conv2d_spectral_norm, linear_spectral_norm
from lipkern.bounds.parsing import BoundParser, register_bound_rule
from lipkern.certify.rounding import OneLipschitz, register_lipschitz_proof
from lipkern.nn._conv import (GEOMETRY, FixedGeometry, check_conv_arguments, check_dtype, check_sizes,
                              conv2d_forward, conv2d_repr, vanilla_conv2d)
from lipkern.ops.conv_power_iteration import (
    ConvGeometry,
    advance_conv_power_iteration,
    conv_bilinear,
    conv_bilinear_gradient,
    conv_operator,
    cpu_conv_power_rows,
    initial_conv_vectors,
)
from lipkern.ops.power_iteration import (advance_power_iteration, cpu_power_rows, initial_vectors,
                                         power_of_two_scale)

__all__ = ["SpectralConv2d", "SpectralLinear"]

_EVAL_MAX_ITER = 1000
_EVAL_RTOL = 1e-6


def _round_up(value: float, dtype: torch.dtype) -> torch.Tensor:
    """The smallest value of ``dtype`` that is ≥ ``value``."""
    t = torch.tensor(cast_up(value, dtype), dtype=dtype)
    if not torch.isfinite(t):
        raise ValueError(f"the certified norm {value:.3g} does not fit in {dtype}; keep the weight in float32")
    return t


class _SpectralNormalized(nn.Module):
    """Shared train/eval logic. Subclasses provide the power step, vᵀAu and the eval-time norms."""

    def _init_spectral(self, n_power_iterations: int, certified: bool) -> None:
        if not isinstance(n_power_iterations, int) or n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be an int >= 1, got {n_power_iterations!r}")
        self.n_power_iterations = n_power_iterations
        self.certified = as_bool(certified, f"{type(self).__name__}: certified")
        self._cached_sigma: torch.Tensor | None = None
        self._snapshot: WeightSnapshot | None = None

    def _eval_sigma(self) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # the eval norm is computed by data-dependent loops that a graph cannot hold: compile serves
            # the value an eager eval call cached
            if self._cached_sigma is None:
                raise RuntimeError(f"{type(self).__name__}: run one eager forward in eval mode before compiling "
                                   "an eval-mode model (it computes and caches the layer's norm)")
            return self._cached_sigma
        if self._cached_sigma is None or not self._snapshot.matches(self.weight, self.certified):
            check_finite(self.weight, f"{type(self).__name__} (eval-mode norm of the weight)")
            with torch.inference_mode(False), torch.no_grad():
                sigma = self._certified_divisor() if self.certified else self._converged_estimate()
            self._cached_sigma, self._snapshot = sigma, WeightSnapshot(self.weight, self.certified)
        return self._cached_sigma

    def sigma(self) -> torch.Tensor:
        """The divisor of the weight: in training, vᵀAu after the power step; in eval, the cached value."""
        if self.training:
            weight, u, v = power._tensors(self)
            rows = self._direct_power_rows(weight, u, self.n_power_iterations)
            if rows is not None:  # a small layer on the CPU: its own C++ call (lipkern.nn.power: no round to share)
                torch._foreach_copy_([u, v], rows[:2])
                return self._bilinear(*rows)
        if self.weight.is_meta:  # shape propagation (a model built on the meta device): no values to compute
            return self.weight.new_empty(())
        if not self.training:
            return self._eval_sigma()
        with torch.no_grad():
            u, v, extra = power.advance(self)  # one stacked call per group of equal geometry (lipkern.nn.power)
        return self._bilinear(u, v, extra)

    def _power_step(self, n_iter: int) -> None:
        """Advance this layer's vectors alone by ``n_iter`` steps (not used by training, which groups)."""
        with torch.no_grad():
            u, v, _ = power.stacked_power_step([self], n_iter)
            torch._foreach_copy_([self.u, self.v], [u[0], v[0]])  # (the rows of a round of one)

    def _bilinear_dtype(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma if sigma.dtype == self.weight.dtype else sigma.to(self.weight.dtype)

    def _compute_weight(self) -> torch.Tensor:
        """The weight in the power iteration's dtype (float32 for float16 / bfloat16 weights), differentiable."""
        dtype = power._compute_dtype(self.weight.dtype)
        return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)

    def normalized_weight(self) -> torch.Tensor:
        return self._divide(self.sigma())

    def _divide(self, sigma: torch.Tensor) -> torch.Tensor:
        """W/σ; σ = 0 only for a zero weight (0/tiny = 0), and raising a certified σ keeps it a bound."""
        weight = self.weight
        return weight / sigma.clamp_min(smallest_normal(weight.dtype))

    def _tap_operator_norm(self) -> float:
        """A bound on the norm of the operator of one kernel tap with unit weight matrix (1: a partial
        permutation; more when circular padding repeats input pixels)."""
        return 1.0

    def _certified_divisor(self) -> torch.Tensor:
        """upper(‖A‖) + u_d·τ·Σ_taps ‖W_tap‖_F, rounded up to the weight's dtype (τ: `_tap_operator_norm`):
        the rounding of W/d changes each entry by at most u_d relative, so by the triangle inequality over the
        taps ‖A(fl(W/d))‖ ≤ (‖A(W)‖ + u_d τ Σ‖W_tap‖_F)/d ≤ 1."""
        upper = self._upper().item()
        w, exponent = power_of_two_scale(self.weight.detach().double())  # no overflow in the squares
        taps = w.reshape(w.shape[0], w.shape[1], -1)
        tap_norms = math.ldexp(torch.linalg.vector_norm(taps, dim=(0, 1)).sum().item() * (1 + 1e-12),
                               exponent.item())
        slack = torch.finfo(self.weight.dtype).eps * self._tap_operator_norm() * tap_norms
        return _round_up((upper + slack) * (1 + 1e-12), self.weight.dtype).to(self.weight.device)

    def train(self, mode: bool = True):
        self._cached_sigma, self._snapshot = None, None
        return super().train(mode)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        super()._load_from_state_dict(state_dict, prefix, *args)
        u = self.u
        if u is not None and not u.is_meta and not bool(torch.isfinite(u).all() & (u.abs().amax() > 0)):
            warnings.warn(f"{type(self).__name__} {prefix or '(root)'}: the loaded power-iteration vector u is "
                          "zero or not finite (a power iteration from it stays there, σ = 0); it restarts from "
                          "the initial vector", RuntimeWarning, stacklevel=2)
            with torch.no_grad():
                u.copy_(self._initial_u())


def _autocast_enabled(tensor: torch.Tensor) -> bool:
    return tensor.device.type != "meta" and torch.is_autocast_enabled(tensor.device.type)


class _SpectralLinearBase(_SpectralNormalized):
    """A weight (out, in) with persistent power-iteration vectors and its spectral norm (train / eval)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 n_power_iterations: int = 1, certified: bool = False):
        super().__init__()
        check_sizes(type(self).__name__, in_features=in_features, out_features=out_features)
        check_dtype(type(self).__name__, dtype)
        proto = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.weight, self.bias = proto.weight, proto.bias
        self._init_spectral(n_power_iterations, certified)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.register_buffer("u", initial_vectors((1, in_features), **factory, key="linear")[0])
        self.register_buffer("v", torch.zeros(out_features, **factory))

    def _initial_u(self) -> torch.Tensor:
        return initial_vectors((1, self.in_features), self.weight.dtype, self.weight.device, key="linear")[0]

    def _power_key(self) -> tuple:
        w = self.weight
        return ("linear", tuple(w.shape), self.n_power_iterations, w.dtype, w.device)

    def _new_v_rows(self, layers: int, dtype: torch.dtype) -> torch.Tensor:
        return power.new_empty((layers, self.out_features), dtype, self.weight.device)

    @staticmethod
    def _stacked_power(weights, u_rows, v_rows, n_iter: int) -> None:
        advance_power_iteration(weights, u_rows, v_rows, n_iter)

    @staticmethod
    def _stacked_sigma_data(u_rows, v_rows) -> None:
        return None

    def _direct_power_rows(self, weight, u, n_iter: int) -> tuple | None:
        if type(self)._stacked_power is not _SpectralLinearBase._stacked_power:  # a subclass's own step
            return None
        rows = cpu_power_rows(weight, u, n_iter)
        return None if rows is None else (*rows, None)

    def _bilinear(self, u: torch.Tensor, v: torch.Tensor, extra=None) -> torch.Tensor:
        """σ = vᵀWu, differentiable in W (u and v are never written again: no clone needed)."""
        return self._bilinear_dtype(v @ (self._compute_weight() @ u))

    def _converged_estimate(self) -> torch.Tensor:
        est = linear_spectral_norm(self.weight, "power", n_iter=_EVAL_MAX_ITER, rtol=_EVAL_RTOL,
                                   u=self.u.clone()).estimate
        return est.detach().to(self.weight.dtype)

    def _upper(self) -> torch.Tensor:
        return linear_spectral_norm(self.weight, "upper").upper



class SpectralLinear(_SpectralLinearBase):
    """``nn.Linear`` with weight W/σ, σ ≈ ‖W‖₂ (see the module docstring for train/eval/certified).

    Same signature as ``nn.Linear`` plus ``n_power_iterations`` (per training step) and ``certified``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)

    def to_vanilla(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the eval-mode normalized weight."""
        layer = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device,
                          dtype=self.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self._divide(self._eval_sigma()))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                f", n_power_iterations={self.n_power_iterations}, certified={self.certified}")


class _SpectralConvBase(FixedGeometry, _SpectralNormalized):
    """A conv weight with its geometry at a fixed input size, persistent vectors and its operator norm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 input_size=None, n_power_iterations: int = 1, certified: bool = False):
        super().__init__()
        if padding_mode not in ("zeros", "circular"):
            raise ValueError(f"{type(self).__name__}: padding_mode must be 'zeros' or 'circular', got "
                             f"{padding_mode!r} ('reflect' and 'replicate' padding are not 1-Lipschitz)")
        check_sizes(type(self).__name__, in_channels=in_channels, out_channels=out_channels)
        check_conv_arguments(type(self).__name__, kernel_size, stride, dilation, padding, groups, dtype)
        proto = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                          padding_mode, device=device, dtype=dtype)
        for name in GEOMETRY:
            setattr(self, name, getattr(proto, name))
        self.weight, self.bias = proto.weight, proto.bias
        self._init_spectral(n_power_iterations, certified)
        self.register_buffer("u", None)
        self.register_buffer("v", None)
        self.geometry: ConvGeometry | None = None
        if input_size is not None:
            self._set_input_size(input_size)

    # -- geometry and vectors -----------------------------------------------------------------------------
    def _make_geometry(self, input_size) -> ConvGeometry:
        return ConvGeometry.create(input_size, self.kernel_size, self.stride, self.padding, self.dilation,
                                   self.groups, self.padding_mode)

    def _initial_u(self) -> torch.Tensor:
        return initial_conv_vectors(1, self.in_channels, self.geometry.input_size, self.weight.dtype,
                                    self.weight.device, key="conv")[0]

    def _set_input_size(self, input_size) -> None:
        self.geometry = self._make_geometry(input_size)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        with torch.inference_mode(False):  # first sized inside inference_mode (certification): normal buffers
            self.u = self._initial_u()
            self.v = torch.zeros(self.out_channels, *self.geometry.output_size, **factory)

    @property
    def input_size(self) -> tuple[int, int] | None:
        return None if self.geometry is None else self.geometry.input_size

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        u = state_dict.get(prefix + "u")
        if u is not None and self.geometry is None:  # a lazy layer takes the saved input size
            self._set_input_size(tuple(u.shape[-2:]))
        elif u is not None and self.u is not None and tuple(u.shape[-2:]) != tuple(self.u.shape[-2:]):
            error_msgs.append(f"{type(self).__name__} {prefix or '(root)'}: the state was saved at input size "
                              f"{tuple(u.shape[-2:])}, this layer is built for {self.geometry.input_size} (its "
                              "norm depends on the input size; build it with input_size=None to take the saved one)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() not in (3, 4):
            raise ValueError(f"{type(self).__name__}: expected a 3-D or 4-D input, got shape {tuple(x.shape)}")
        size = tuple(x.shape[-2:])
        if self.geometry is None:
            self._set_input_size(size)
        elif size != self.geometry.input_size:
            raise ValueError(f"{type(self).__name__}: this layer is normalized for inputs of size {self.geometry.input_size}"
                             f", got {size}; the operator norm depends on the input size (create the layer with "
                             "input_size=... for the size you use)")

    # -- the operator norm ---------------------------------------------------------------------------------
    def _conv_kwargs(self) -> dict:
        g = self.geometry
        return dict(stride=g.stride, padding=g.padding, dilation=g.dilation, groups=g.groups,
                    padding_mode=g.padding_mode)

    def _power_key(self) -> tuple:
        w = self.weight
        return ("conv", tuple(w.shape), self.geometry, self.n_power_iterations, w.dtype, w.device)

    def _new_v_rows(self, layers: int, dtype: torch.dtype) -> torch.Tensor:
        return power.new_empty((layers, self.out_channels, *self.geometry.output_size), dtype, self.weight.device)

    def _stacked_power(self, weights, u_rows, v_rows, n_iter: int) -> None:
        advance_conv_power_iteration(weights, u_rows, v_rows, n_iter, self.geometry)

    def _stacked_sigma_data(self, u_rows, v_rows) -> torch.Tensor:
        """G_l = ∂⟨v_l, A u_l⟩/∂W_l for the whole round, flattened (L, weight.numel()): one grouped
        weight-gradient convolution (on CUDA with several layers: one batched GEMM on the unfolded vectors; small
        ones on the CPU: the C++ kernel)."""
        with autocast_off(u_rows):
            grad = conv_bilinear_gradient(u_rows, v_rows, tuple(self.weight.shape), self.geometry)
        return grad.reshape(grad.shape[0], -1)

    def _direct_power_rows(self, weight, u, n_iter: int) -> tuple | None:
        cls = type(self)
        if (cls._stacked_power is not _SpectralConvBase._stacked_power  # a subclass's own step
                or cls._stacked_sigma_data is not _SpectralConvBase._stacked_sigma_data):
            return None
        return cpu_conv_power_rows(weight, u, n_iter, self.geometry)

    def _bilinear(self, u: torch.Tensor, v: torch.Tensor, extra=None) -> torch.Tensor:
        """σ = ⟨v, A u⟩ = ⟨W, G⟩ (the form is linear in W): one dot product per layer, whose gradient in W is G
        (no per-layer convolution forward or backward). Without G: the convolution."""
        weight = self._compute_weight()
        if extra is None:
            # reshape, not [0]: a view whose backward is a view too (select's backward is a zero-filled copy)
            sigma = conv_bilinear(weight[None], u[None], v[None], self.geometry).reshape(())
        elif _autocast_enabled(weight):
            with autocast_off(weight):
                sigma = torch.dot(weight.reshape(-1), extra)
        else:  # (a context manager per layer and step costs more than the dot product at small sizes)
            sigma = torch.dot(weight.reshape(-1), extra)
        return self._bilinear_dtype(sigma)

    def _spectral_norm(self, method: str, **kwargs):
        g = self.geometry
        return conv2d_spectral_norm(self.weight, g.input_size, g.stride, g.padding, g.dilation, g.groups,
                                    g.padding_mode, method, **kwargs)

    def _converged_estimate(self) -> torch.Tensor:
        est = self._spectral_norm("power", n_iter=_EVAL_MAX_ITER, rtol=_EVAL_RTOL, u=self.u.clone()).estimate
        return est.detach().to(self.weight.dtype)

    def _upper(self) -> torch.Tensor:
        return self._spectral_norm("upper").upper

    def _tap_operator_norm(self) -> float:
        return _circular_embedding(self.geometry).factor  # √(input pixels repeated by circular padding)

    def sigma(self) -> torch.Tensor:
        if self.geometry is None:
            raise RuntimeError(f"{type(self).__name__}: the input size is unknown; pass input_size or run a forward")
        return super().sigma()

    # -- nn.Conv2d behaviour -------------------------------------------------------------------------------
    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return conv2d_forward(self, x, weight)



class SpectralConv2d(_SpectralConvBase):
    """``nn.Conv2d`` whose kernel is divided by the spectral norm of the conv operator it applies (its
    padding, stride, dilation and groups at the real input size).

    Same signature as ``nn.Conv2d`` plus ``input_size`` ((H, W) the layer sees; if None it is fixed by the
    first forward, which then allocates the vectors: pass it, or run one forward before wrapping in DDP),
    ``n_power_iterations`` (per training step) and ``certified``. The norm depends on the input size, so an
    input of another size raises a ValueError. padding_mode 'zeros' or 'circular'.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self._conv(x, self.normalized_weight())

    def to_vanilla(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the eval-mode normalized kernel and the same geometry."""
        with torch.no_grad():
            return vanilla_conv2d(self, self._divide(self._eval_sigma()))

    def extra_repr(self) -> str:
        return conv2d_repr(self) + f", input_size={self.input_size}, certified={self.certified}"


# ----------------------------------------------------------------------------------------------------------
# Bound rule (lipkern.bounds.parsing): W/σ as the layer divides it.
# ----------------------------------------------------------------------------------------------------------
# what the layers' forward, bound and proof rely on: a subclass overriding one of these needs its own rule
_SPECTRAL_HELPERS = ("normalized_weight", "sigma", "_divide", "_eval_sigma", "_certified_divisor", "_conv")
# ----------------------------------------------------------------------------------------------------------
@register_bound_rule(SpectralConv2d, SpectralLinear, helpers=_SPECTRAL_HELPERS)
def _spectral_bound_rule(parser: BoundParser, module, shape):
    """The applied weight W/σ: the eval-mode σ; in training mode σ ≈ ‖A u‖ with the layer's current unit vector
    u (an estimate; refused when a guaranteed bound is asked for)."""
    name = parser.name(module)
    if parser.sound and module.training:
        raise ValueError(f"lipschitz_bound: {name} is in training mode, where its divisor changes every step: "
                         "call model.eval()")

    def weight_fn(precise):
        if module.training:  # finite before any forward
            u = module.u.to(module.weight.dtype)
            if getattr(module, "geometry", None) is not None:
                au = conv_operator(u[None], module.weight, module.geometry)
            else:
                au = module.weight @ u
            return module._divide(torch.linalg.vector_norm(au))
        return module._divide(module._eval_sigma())

    if isinstance(module, SpectralConv2d):
        if module.geometry is None:
            raise ValueError(f"lipschitz_bound: {name} has no input size yet (pass input_size)")
        if len(shape) == 3 and tuple(shape[1:]) != tuple(module.geometry.input_size):
            raise ValueError(f"lipschitz_bound: {name} is normalized for inputs of size "
                             f"{tuple(module.geometry.input_size)} and refuses others; it gets {tuple(shape[1:])}")
        return parser.conv(module, shape, weight_fn)
    return parser.dense(module, shape, weight_fn)


def _certified_proof(layer) -> OneLipschitz | None:
    """A certified layer's proof: the norm of its operator at its input size (conv; none before it has one),
    at any size (linear)."""
    if layer.certified is not True:
        return None
    geometry = getattr(layer, "geometry", None)
    if isinstance(layer, _SpectralConvBase):
        return None if geometry is None else OneLipschitz(tuple(geometry.input_size))
    return OneLipschitz(None)


register_lipschitz_proof(SpectralConv2d, SpectralLinear, helpers=_SPECTRAL_HELPERS)(_certified_proof)
