"""Linear layers of a network as operators on one input shape: the common currency of the whole-network bounds.

A :class:`LinearMap` is one linear layer y = A x with its true geometry (conv padding, stride, dilation, groups,
padding mode at the real input size), batched over a leading dimension: ``forward`` maps (B, *in_shape) to
(B, *out_shape) and ``adjoint`` is its exact transpose. A linear layer after a flatten simply has a flat
``in_shape``: inputs are reshaped, never copied. Biases are dropped (they do not change a Lipschitz constant).

Kinds:
- ``"conv2d"``: weight (out, in/groups, kh, kw), in_shape (in, H, W), geometry a :class:`ConvGeometry`;
- ``"dense"``:  weight (out, in), in_shape (in,) or any shape with prod = in (flattened first);
- ``"diag"``:   weight (C,), a per-channel scale (folded BatchNorm, input normalization): in_shape (C, ...)
  or (C,), out_shape = in_shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from lipkern._checks import as_shape
from lipkern.ops.conv_power_iteration import ConvGeometry, conv_adjoint, conv_operator

KINDS = ("conv2d", "dense", "diag")


@dataclass(frozen=True, eq=False)
class LinearMap:
    kind: str
    weight: torch.Tensor
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    geometry: ConvGeometry | None = None
    name: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"LinearMap: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "conv2d" and self.geometry is None:
            raise ValueError("LinearMap: a conv2d map needs its ConvGeometry")

    # -- constructors ---------------------------------------------------------------------------------
    @classmethod
    def conv2d(cls, weight: torch.Tensor, in_shape, stride=1, padding=0, dilation=1, groups: int = 1,
               padding_mode: str = "zeros", name: str = "") -> LinearMap:
        """nn.Conv2d's arguments; in_shape (in, H, W)."""
        in_shape = as_shape(in_shape, "in_shape")
        if len(in_shape) != 3:
            raise ValueError(f"LinearMap.conv2d: in_shape must be (C, H, W), got {in_shape}")
        if weight.dim() != 4 or weight.shape[1] * groups != in_shape[0]:
            raise ValueError(f"LinearMap.conv2d: weight {tuple(weight.shape)} with groups={groups} does not take "
                             f"{in_shape[0]} input channels")
        g = ConvGeometry.create(in_shape[1:], tuple(weight.shape[-2:]), stride, padding, dilation, groups,
                                padding_mode)
        g.check_weight(weight, stacked=False)
        return cls("conv2d", weight, in_shape, (weight.shape[0], *g.output_size), g, name)

    @classmethod
    def dense(cls, weight: torch.Tensor, in_shape=None, name: str = "") -> LinearMap:
        if weight.dim() != 2:
            raise ValueError(f"LinearMap.dense: weight must be (out, in), got {tuple(weight.shape)}")
        in_shape = (weight.shape[1],) if in_shape is None else as_shape(in_shape, "in_shape")
        if math.prod(in_shape) != weight.shape[1]:
            raise ValueError(f"LinearMap.dense: input shape {in_shape} has {math.prod(in_shape)} features, the "
                             f"weight takes {weight.shape[1]}")
        return cls("dense", weight, in_shape, (weight.shape[0],), None, name)

    @classmethod
    def diag(cls, scale: torch.Tensor, in_shape, name: str = "") -> LinearMap:
        in_shape = as_shape(in_shape, "in_shape")
        if scale.dim() != 1 or not in_shape or in_shape[0] != scale.shape[0]:
            raise ValueError(f"LinearMap.diag: scale {tuple(scale.shape)} must have one entry per channel of "
                             f"{in_shape}")
        return cls("diag", scale, in_shape, in_shape, None, name)

    # -- the operator ---------------------------------------------------------------------------------
    def with_weight(self, weight: torch.Tensor) -> LinearMap:
        """The same geometry with another weight (|W|, a float64 copy, a differentiable view...). A shallow copy
        (the fields were checked when this map was built; ``dataclasses.replace`` costs ~15 µs a call, and
        estimates make several per map and training step)."""
        if weight.shape != self.weight.shape:
            return replace(self, weight=weight)  # (its checks)
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        object.__setattr__(copy, "weight", weight)
        return copy

    def abs(self) -> LinearMap:
        """The map with |W| entrywise: |A x| ≤ |A|·|x| bounds rounding errors of chains."""
        return self.with_weight(self.weight.abs())

    def to(self, dtype: torch.dtype) -> LinearMap:
        return self.with_weight(self.weight.to(dtype))

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """A x for x (B, *in_shape) (any shape with B·prod(in_shape) elements); returns (B, *out_shape)."""
        w = self.weight if weight is None else weight
        x = x.reshape(-1, *self.in_shape)
        if self.kind == "conv2d":
            return conv_operator(x, w, self.geometry)
        if self.kind == "dense":
            return x.flatten(1) @ w.T
        return x * w.reshape(-1, *([1] * (len(self.in_shape) - 1)))

    def adjoint(self, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Aᵀ y for y (B, *out_shape); returns (B, *in_shape)."""
        w = self.weight if weight is None else weight
        y = y.reshape(-1, *self.out_shape)
        if self.kind == "conv2d":
            return conv_adjoint(y, w, self.geometry)
        if self.kind == "dense":
            return (y @ w).reshape(-1, *self.in_shape)
        return y * w.reshape(-1, *([1] * (len(self.in_shape) - 1)))

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_shape)

    def adjoint_accumulation_length(self) -> int:
        """The most nonzero products summed into one entry of Aᵀy: out/groups channels × kh·kw taps per padded
        position × the padded positions that wrap onto one input position (circular padding)."""
        if self.kind == "dense":
            return self.weight.shape[0]
        if self.kind == "diag":
            return 1
        g = self.geometry
        wraps = 1
        if g.padding_mode == "circular":
            for padded, size in zip(g.padded_size, g.input_size):
                wraps *= -(-padded // size)
        kh, kw = g.kernel_size
        return (self.weight.shape[0] // g.groups) * kh * kw * wraps

    def accumulation_length(self) -> int:
        """The most products summed into one output entry (for rounding-error bounds)."""
        if self.kind == "conv2d":
            return self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
        if self.kind == "dense":
            return self.weight.shape[1]
        return 1

    def dense_matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The explicit (out_features, in_features) matrix (small maps only: tests, certificates)."""
        eye = torch.eye(self.in_features, dtype=dtype, device=self.weight.device)
        return self.forward(eye, self.weight.to(dtype)).reshape(self.in_features, -1).T

    def upper_bound(self) -> torch.Tensor:
        """A guaranteed upper bound of ‖A‖₂ (float64, rounding included), from :mod:`lipkern.bounds`."""
        from lipkern.bounds.spectral import conv2d_spectral_norm, linear_spectral_norm

        w = self.weight.detach()
        if self.kind == "diag":
            return w.abs().max().to(torch.float64)  # exact: a max of absolute values does not round
        if self.kind == "dense":
            return linear_spectral_norm(w, method="upper").upper
        g = self.geometry
        return conv2d_spectral_norm(w, g.input_size, g.stride, g.padding, g.dilation, g.groups, g.padding_mode,
                                    method="upper").upper

    def extra_repr(self) -> str:
        return f"{self.kind}{' ' + self.name if self.name else ''}: {self.in_shape} -> {self.out_shape}"


# ----------------------------------------------------------------------------------------------------------
# ‖|A|‖₂ from above, cheaply (rounding-error bounds need it).
# ----------------------------------------------------------------------------------------------------------
def _gamma64(n: int) -> float:
    u = 2.0 ** -53
    return n * u / (1 - n * u) * (1 + 2.0 ** -40)


def circular_repeats(g: ConvGeometry | None) -> int:
    """Circular padding: output o reads the torus row (o·s − p) mod n, so rows repeat when the output is
    longer than one period (padding wider than 'same'): the most outputs on one torus row (product over the
    axes). Zero padding or no geometry: 1."""
    if g is None or g.padding_mode != "circular":
        return 1
    repeats = 1
    for out, size, stride in zip(g.output_size, g.input_size, g.stride):
        counts: dict[int, int] = {}
        for o in range(out):
            counts[(o * stride) % size] = counts.get((o * stride) % size, 0) + 1
        repeats *= max(counts.values(), default=1)
    return repeats


def nonnegative_norm_upper(w: torch.Tensor, steps: int = 30) -> float:
    """A guaranteed upper bound of ‖W‖₂ for a non-negative (out, in) float64 matrix: ρ(WᵀW) ≤ max_i
    (WᵀW v)_i / v_i for ANY positive v (Collatz–Wielandt), v from a few power steps (kept positive). W is
    scaled by a power of two first (exact; no underflow in the products), every product of non-negative terms
    charged its relative rounding."""
    largest = float(w.max()) if w.numel() else 0.0
    if largest == 0.0:
        return 0.0
    if not math.isfinite(largest):
        return math.inf
    exponent = math.frexp(largest)[1]
    w = torch.ldexp(w, torch.tensor(-exponent, dtype=torch.int32, device=w.device))
    v = torch.ones(w.shape[1], dtype=torch.float64, device=w.device)
    for _ in range(steps):
        v = w.T @ (w @ v)
        v = v / v.max().clamp_min(1e-300) + 1e-12  # positive, bounded away from 0
    ratio = float(((w.T @ (w @ v)) / v).max())
    terms = w.shape[0] + w.shape[1]
    # subnormal products of the scaled matrix (entries < 2⁻¹⁰²² of its largest) err absolutely: a tiny term
    ratio = ratio * (1 + _gamma64(2 * terms + 4)) + (2 * terms + 4) * 2.0 ** -1000
    return math.ldexp(math.sqrt(ratio) * (1 + 2.0 ** -40), exponent)


def abs_norm_upper(operator: LinearMap) -> float:
    """A guaranteed upper bound of ‖|A|‖₂ (|A| the operator with |W|). Dense: :func:`nonnegative_norm_upper`.
    Conv: a non-negative kernel's operator is entrywise below the circular conv on a large enough torus (zero
    padding: a submatrix; a stride keeps a subset of its rows; circular padding wider than 'same' repeats rows:
    × √:func:`circular_repeats`), whose norm is the largest singular value of S = Σ_taps |W| (its frequency
    responses are entrywise ≤ S in modulus), per group. Diagonal: max |w|."""
    from lipkern.bounds.spectral import linear_spectral_norm

    w = operator.weight.detach().to(torch.float64).abs()
    if operator.kind == "diag":
        return float(w.max()) if w.numel() else 0.0
    if operator.kind == "dense":
        return nonnegative_norm_upper(w)
    taps = w.shape[2] * w.shape[3]
    summed = w.sum(dim=(2, 3)) * (1 + 2 * _gamma64(taps))  # ≥ the exact sums
    groups = operator.geometry.groups
    rows = summed.shape[0] // groups
    norm = max(float(linear_spectral_norm(summed[g * rows:(g + 1) * rows], method="upper").upper)
               for g in range(groups))
    return norm * math.sqrt(circular_repeats(operator.geometry)) * (1 + 2.0 ** -40)


def plain_layer_operator(module, shape, weight: torch.Tensor | None = None) -> LinearMap:
    """The map W of an exported residual layer z = x − Wᵀ(…relu(W x + b)) (PlainCPL* / PlainSLL*): dense for a
    2-dim weight, else the stride-1 conv after its ``padding`` (left, right, top, bottom) in its
    ``padding_mode``. ``weight`` replaces the module's (a rescaled copy)."""
    weight = module.weight.detach() if weight is None else weight
    if weight.dim() == 2:
        return LinearMap.dense(weight, shape)
    left, right, top, bottom = module.padding
    return LinearMap.conv2d(weight, shape, padding=(top, bottom, left, right), padding_mode=module.padding_mode)
