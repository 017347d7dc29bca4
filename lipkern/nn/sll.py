"""SDP-based Lipschitz layers (SLL, Araujo et al. ICLR 2023): z = x − 2·Wᵀ T⁻¹ σ(W x + b), T = diag(t),
t_i = Σ_j |W Wᵀ|_ij · q_j / q_i with learnable q > 0 (q = exp(log_q)), σ = ReLU.

Why it is 1-Lipschitz (every input size, no power iteration): weighted Gershgorin gives T ⪰ W Wᵀ, so with
S = diag(s), s_i ≤ 2/t_i, ‖S^{1/2} W‖² ≤ max_i s_i t_i ≤ 2; the Jacobian I − Wᵀ S D W (D = σ'(·) ∈ [0, I],
diagonal, commuting with S) has its eigenvalues in [1 − ‖S^{1/2}W‖², 1] ⊆ [−1, 1]. Any s ≤ 2/t keeps the
proof, so rounding s DOWN keeps it. For the conv (stride 1, 'same' padding, zeros or circular) W Wᵀ is the
operator whose rows are the cross-correlations ktk = conv2d(K, K, padding=k−1) of the kernel with itself:
t_i = Σ_{j,δ} |ktk_{ij,δ}| q_j/q_i bounds every row of the weighted Gershgorin sum of the circular operator
(wraps add terms of the same set), and the zero-padded A = Π·C·E (E: embedding into a larger torus, EEᵀ ⪯ I;
Π: a row selection) has AAᵀ ⪯ Π C Cᵀ Πᵀ, a principal submatrix of a circular Gram whose rows are subsets of
ktk's: the same T dominates it, at any input size. With q ≡ 1 it is AOL's bound on the
hidden side; with T = ‖W‖²·I it is CPL's step.

q matters: unlike two peer implementations where q_j/q_i cancels (it multiplies both sides of the same
axis), here t_i depends on q and its gradient is non-zero.

Training runs the SLL ops (``lipkern.ops.sll_linear`` / ``sll_conv2d``): CPL's op with W̃ = diag(√s)·W,
b̃ = √s ⊙ b and h = 1 (relu(√s·u) = √s·relu(u) for s ≥ 0): its fused forward, a backward that keeps only the
input, torch.compile / export, autocast, double backward as for the CPL layers, differentiable through √s in
W and q.
Eval (``certified`` by construction): s is computed in float64 from the stored weight with a proven margin
for the Gram's rounding (|Ĝ − G| ≤ γ_n·|W||W|ᵀ entrywise) and the sums', then rounded down to the weight's
dtype (``lipkern.ops.sll_guaranteed_scale``), and cached per (weight, log_q). Training: the same formula in the weight's dtype, differentiable in W
and q (no margin: an estimate of the eval layer to ~1e-7). ``to_vanilla()``: the eval layer as
:class:`PlainSLLLinear` / :class:`PlainSLLConv2d` (plain torch ops, the scale s a buffer).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lipkern._dispatch import check_finite
from lipkern.bounds.operators import abs_norm_upper, plain_layer_operator
from lipkern.bounds.parsing import BoundParser, register_bound_rule
from lipkern.certify.rounding import OneLipschitz, register_lipschitz_proof, register_rounding_rule
from lipkern.nn._cache import WeightSnapshot
from lipkern.ops.sll import (
    same_padding,
    sll_conv2d,
    sll_conv2d_ref,
    sll_guaranteed_scale,
    sll_linear,
    sll_linear_ref,
    sll_scale,
)

__all__ = ["PlainSLLConv2d", "PlainSLLLinear", "SLLConv2d", "SLLLinear"]

class _SLLBase(nn.Module):
    """The parts SLLLinear and SLLConv2d share: q, the scale s (training / cached eval), to_vanilla."""

    def _init_parameters(self, weight_shape: tuple, bias: bool, device, dtype) -> None:
        self.weight = nn.Parameter(torch.empty(weight_shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(weight_shape[0], device=device, dtype=dtype)) if bias else None
        self.log_q = nn.Parameter(torch.zeros(weight_shape[0], device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's / nn.Conv2d's initialization for W and b; q = 1."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.log_q)
        self._cached = None

    def scale(self) -> torch.Tensor:
        """s (hidden,) = 2/t: differentiable in training; in eval the guaranteed one (cached)."""
        if self.training:
            return sll_scale(self.weight, self.log_q)
        return self._eval_scale()

    def _eval_scale(self) -> torch.Tensor:
        cached = self._cached
        if torch.compiler.is_compiling():  # a graph cannot hold the cache check: serve the eager call's value
            if cached is None:
                raise RuntimeError(f"{type(self).__name__}: run one eager forward in eval mode before compiling or "
                                   "exporting an eval-mode model (it computes and caches the guaranteed scale)")
            return cached[2]
        if cached is not None and cached[0].matches(self.weight) and cached[1].matches(self.log_q):
            return cached[2]
        check_finite(self.weight, f"{type(self).__name__} (eval scale)")
        check_finite(self.log_q, f"{type(self).__name__}.log_q (eval scale)")
        s = sll_guaranteed_scale(self.weight, self.log_q)
        self._cached = (WeightSnapshot(self.weight), WeightSnapshot(self.log_q), s)
        return s

    def _parts(self):
        with torch.no_grad():
            bias = None if self.bias is None else self.bias.detach().clone()
            return self.weight.detach().clone(), bias, self._eval_scale().clone()


class SLLLinear(_SLLBase):
    """z = x − Wᵀ(s ⊙ relu(W x + b)) on (..., features), W (hidden_features, features), s = 2/t (module
    docstring); 1-Lipschitz in eval mode with proof."""

    def __init__(self, features: int, hidden_features: int | None = None, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        hidden = features if hidden_features is None else hidden_features
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (features, hidden)):
            raise ValueError(f"SLLLinear: features and hidden_features must be positive ints, got "
                             f"{features!r}, {hidden_features!r}")
        self.features, self.hidden_features = features, hidden
        self._init_parameters((hidden, features), bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return sll_linear(x, self.weight, self.bias, self.log_q)
        return sll_linear_ref(x, self.weight, self.bias, self._eval_scale())

    def to_vanilla(self) -> "PlainSLLLinear":
        """The eval layer as plain torch ops with its (guaranteed) scale as a buffer."""
        return PlainSLLLinear(*self._parts())

    def extra_repr(self) -> str:
        return f"{self.features}, hidden_features={self.hidden_features}, bias={self.bias is not None}"


class SLLConv2d(_SLLBase):
    """z = x − Aᵀ(s ⊙ relu(A x + b)) for A the stride-1 'same'-padded conv channels → hidden_channels
    (default channels), padding_mode 'zeros' or 'circular', Aᵀ its exact adjoint; 1-Lipschitz in eval mode
    with proof at every input size."""

    def __init__(self, channels: int, hidden_channels: int | None = None, kernel_size=3,
                 padding_mode: str = "zeros", bias: bool = True, device=None, dtype=None):
        super().__init__()
        hidden = channels if hidden_channels is None else hidden_channels
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (channels, hidden)):
            raise ValueError(f"SLLConv2d: channels and hidden_channels must be positive ints, got {channels!r}, "
                             f"{hidden_channels!r}")
        kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(kernel) != 2 or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in kernel):
            raise ValueError(f"SLLConv2d: kernel_size must be a positive int or a pair, got {kernel_size!r}")
        if padding_mode not in ("zeros", "circular"):
            raise ValueError(f"SLLConv2d: padding_mode must be 'zeros' or 'circular', got {padding_mode!r}")
        self.channels, self.hidden_channels, self.kernel_size = channels, hidden, kernel
        self.padding_mode = padding_mode
        self.padding = same_padding(kernel)  # F.pad order (left, right, top, bottom)
        self._init_parameters((hidden, channels, *kernel), bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # an unbatched input, as nn.Conv2d takes
            return self.forward(x[None])[0]
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"SLLConv2d: expected (N, {self.channels}, H, W) inputs, got {tuple(x.shape)}")
        if self.training:
            return sll_conv2d(x, self.weight, self.bias, self.log_q, self.padding_mode)
        return sll_conv2d_ref(x, self.weight, self.bias, self._eval_scale(), self.padding, self.padding_mode)

    def to_vanilla(self) -> "PlainSLLConv2d":
        """The eval layer as plain torch ops (any input size) with its guaranteed scale as a buffer."""
        return PlainSLLConv2d(*self._parts(), padding=self.padding, padding_mode=self.padding_mode)

    def extra_repr(self) -> str:
        return (f"{self.channels}, hidden_channels={self.hidden_channels}, kernel_size={self.kernel_size}, "
                f"padding_mode={self.padding_mode}, bias={self.bias is not None}")


plain_sll_linear = sll_linear_ref  # (the eval form: the ops' reference formulas)
plain_sll_conv2d = sll_conv2d_ref


class PlainSLLLinear(nn.Module):
    """z = x − Wᵀ(s ⊙ relu(W x + b)), s a constant buffer: the exported eval form of :class:`SLLLinear`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.register_buffer("scale", scale.reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return plain_sll_linear(x, self.weight, self.bias, self.scale)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, hidden_features={self.weight.shape[0]}"


class PlainSLLConv2d(nn.Module):
    """z = x − Aᵀ(s ⊙ relu(A x + b)) (:func:`plain_sll_conv2d`), s a constant buffer: the exported eval form
    of :class:`SLLConv2d`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                 padding=(1, 1, 1, 1), padding_mode: str = "zeros"):
        super().__init__()
        if padding_mode not in ("zeros", "circular"):
            raise ValueError(f"PlainSLLConv2d: padding_mode must be 'zeros' or 'circular', got {padding_mode!r}")
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.register_buffer("scale", scale.reshape(-1))
        self.padding, self.padding_mode = tuple(int(p) for p in padding), padding_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return plain_sll_conv2d(x, self.weight, self.bias, self.scale, self.padding, self.padding_mode)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, hidden_channels={self.weight.shape[0]}, kernel_size="
                f"{tuple(self.weight.shape[2:])}, padding={self.padding}, padding_mode={self.padding_mode}")


# ----------------------------------------------------------------------------------------------------------
# Bound rules (lipkern.bounds.parsing).
# ----------------------------------------------------------------------------------------------------------
_U64 = 2.0 ** -53


@register_bound_rule(SLLConv2d, SLLLinear, helpers=("_eval_scale",))
def _sll_bound_rule(parser: BoundParser, module, shape):
    """1: in eval mode the scale is the guaranteed one."""
    if parser.sound and module.training:
        raise ValueError(f"lipschitz_bound: {parser.name(module)} is 1-Lipschitz with proof in eval mode (its "
                         "scale is then the guaranteed one): call model.eval()")
    return parser.constant(module, 1.0, shape)


@register_bound_rule(PlainSLLConv2d, PlainSLLLinear)
def _plain_sll_bound_rule(parser: BoundParser, module, shape):
    """x − Wᵀ(s ⊙ relu(Wx + b)) (an exported SLL layer): its Jacobian I − Wᵀ S D W has eigenvalues in
    [1 − ‖S^{1/2}W‖², 1], so its norm is ≤ max(1, U² − 1) for U ≥ ‖S^{1/2}W‖₂ (guaranteed: S^{1/2}W is
    formed in float64 with two roundings per entry, charged)."""
    name = parser.name(module)
    scale = module.scale.detach().double()
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise ValueError(f"lipschitz_bound: {name} has a non-finite or negative scale")
    weight = module.weight.detach().double()
    root = scale.sqrt().reshape(-1, *([1] * (weight.dim() - 1)))
    try:
        operator = plain_layer_operator(module, shape, root * weight)
    except ValueError as err:
        raise ValueError(f"lipschitz_bound: {name}: {err}") from err
    # the computed S^{1/2}W is within (2u + u²) of the exact entrywise: |ΔA| ≤ 3u·|A|, ‖ΔA‖ ≤ 3u‖|A|‖
    slack = 3 * _U64 * abs_norm_upper(operator)
    upper = (float(operator.upper_bound()) + slack) * (1 + 4 * _U64)
    if not math.isfinite(upper):
        raise ValueError(f"lipschitz_bound: {name} has a non-finite weight")
    return parser.constant(module, max(1.0, upper * upper * (1 + 4 * _U64) - 1.0), shape)


@register_lipschitz_proof(SLLLinear, SLLConv2d, helpers=("_eval_scale",))
def _sll_proof(layer):
    """1-Lipschitz at every input size (the guaranteed scale)."""
    return OneLipschitz(None)


@register_rounding_rule(PlainSLLLinear, PlainSLLConv2d)
def _plain_sll_rounding_rule(analysis, module, shape):
    return analysis.residual_layer(module, shape, "sll")
