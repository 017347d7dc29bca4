"""SPLITZ (Zhong & Tandon, arXiv 2407.02811): randomized smoothing of the right half of f = f_R ∘ f_L.

The smoothed classifier is g(x) = argmax_c P_δ[f_R(f_L(x) + δ) = c], δ ∼ N(0, σ²I): the noise enters AFTER the
left half. Its certificate (Theorem 1 as stated by the authors) is

    R(x) = max_{γ ≥ 0} min{ R_right(f_L(x)) / L_left(x, γ), γ },

where R_right(z) = σ·Φ⁻¹(p̲_A) is Cohen et al.'s radius of the smoothed right half at z = f_L(x) and
L_left(x, γ) bounds ‖f_L(x') − f_L(x)‖ / ‖x' − x‖ over the ℓ₂ ball B(x, γ). Proof sketch: for ‖x' − x‖ < R(x)
≤ γ, ‖f_L(x') − f_L(x)‖ ≤ L_left(x, γ)·‖x' − x‖ < R_right, so the smoothed right half predicts the same class
at f_L(x'). Every γ gives a valid certificate; the search only looks for a good one. The guarantee holds with
probability ≥ 1 − α over the Monte Carlo noise (as Cohen's), for the exact-arithmetic left half.

Where L_left comes from, in this order:
1. ``local_lipschitz(x, gamma) -> float``, a user callable (its soundness is the user's responsibility);
2. :class:`LocalReluLipschitz` when f_L is a sequence of nn.Linear / nn.Conv2d / nn.ReLU / nn.Flatten /
   nn.Identity (small: the layers become dense float64 matrices), min'd with the global bound below when
   ``lipkern.bounds.lipschitz_bound`` is available;
3. the global bound ``lipkern.bounds.lipschitz_bound(f_L, input_shape)`` (a constant:
   R = R_right/L).

Training recipe of the paper (not implemented as a trainer here): Gaussian augmentation with the same σ inside
the model after f_L (:class:`GaussianNoise`), plus the regularizer λ·relu(L̂_left − θ) on an estimate of f_L's
(local) Lipschitz constant (:func:`splitz_regularizer`; θ = 0.5 so f_L is not pushed to collapse,
λ ∈ [0.7, 1]).

Input normalization pitfall (papers.md §5): a normalization (x − μ)/s inside f_L multiplies its Lipschitz
constant by 1/min(s). The withdrawn ICLR version omitted it and overstated radii ~5×. Here any such layer must
be part of f_L's bound: LocalReluLipschitz refuses layers it does not know, and the global bound
includes them.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch
from torch import nn

from lipkern._checks import as_shape
from lipkern._rounding import add_up, div_down, down, mul_up, up
from lipkern.certify.smoothing import ABSTAIN, RandomizedSmoothing

__all__ = ["GaussianNoise", "LocalLipschitzEstimate", "LocalReluLipschitz", "SplitzCertifier", "splitz_loss",
           "splitz_regularizer"]

_U = 2.0 ** -53
_GAMMA_STEPS = 14


_TINY = 2.0 ** -1022  # the smallest normal float64: a clipping value below it is not trusted


def _norms_up(matrix: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Upper bounds of the ℓ₂ norms of the rows (``dim=1``) or of the whole matrix (Frobenius, ``dim=None``),
    free of underflow: each row (or the matrix) is scaled by a power of two so that its largest entry lies in
    [0.5, 1), then the norm is rounded up (relative (n + 2)·u, doubled) plus the entries that the scaling made
    subnormal (≤ √n·2⁻¹⁰⁷⁴ each, scaled back). Non-finite entries give +inf."""
    absolute = matrix.abs()
    if absolute.numel() == 0:
        return absolute.new_zeros(absolute.shape[0] if dim is not None else ())
    largest = absolute.amax(dim=dim, keepdim=dim is not None)
    exponent = torch.frexp(torch.where(largest > 0, largest, torch.ones_like(largest))).exponent
    scaled = torch.ldexp(absolute, -exponent.to(absolute.dtype))
    length = absolute.shape[dim] if dim is not None else absolute.numel()
    norms = torch.linalg.vector_norm(scaled, dim=dim) * (1 + 2 * (length + 2) * _U) + math.sqrt(length) * 2.0 ** -1074
    exponent = exponent.squeeze(dim) if dim is not None else exponent
    bound = torch.ldexp(norms, exponent.to(norms.dtype))
    bound = torch.where(largest.squeeze(dim) > 0 if dim is not None else largest > 0, bound, torch.zeros_like(bound))
    return torch.where(torch.isfinite(bound), bound, torch.full_like(bound, math.inf))


def _varying(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Units whose deviation box is not {0} (NaN counts as moving)."""
    return ~((hi <= 0) & (lo >= 0))


# --- the local bound -------------------------------------------------------------------------------------
def _lipkern_layer_types() -> tuple[type, ...]:
    from lipkern.nn import AOLConv2d, AOLLinear, SpectralConv2d, SpectralLinear

    return AOLConv2d, AOLLinear, SpectralConv2d, SpectralLinear


def _leaves(module: nn.Module, applied: bool = True) -> list[nn.Module] | None:
    """The layers of a (nested) nn.Sequential, or None if any is not supported: a subclass that overrides
    forward or a module with forward hooks computes something else than its weights say. AOL / Spectral layers
    become the plain layer of the weight they apply in eval mode (``to_vanilla``), unless ``applied`` is
    False (then they are returned as they are)."""
    from lipkern.bounds.parsing import computes_forward_of
    from lipkern.nn import MaxMin

    if module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks \
            or nn.modules.module._global_forward_pre_hooks:
        return None
    if computes_forward_of(module, nn.Sequential):
        out: list[nn.Module] = []
        for child in module:
            sub = _leaves(child, applied)
            if sub is None:
                return None
            out += sub
        return out
    if computes_forward_of(module, nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.Identity, nn.AvgPool2d,
                           MaxMin):
        return [module]
    if computes_forward_of(module, nn.BatchNorm1d, nn.BatchNorm2d) and module.running_var is not None:
        return [module]
    if computes_forward_of(module, *_lipkern_layer_types()):
        return [module.to_vanilla().eval() if applied else module]
    return None


def _affine(layer: nn.Module, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (out, in), b (out,)) in float64 of a Linear or Conv2d layer on inputs of ``shape`` (flattened)."""
    from lipkern.bounds.operators import LinearMap

    weight = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        matrix = weight.to(torch.float64)
        if shape != (layer.in_features,):
            raise ValueError(f"LocalReluLipschitz: {layer} gets inputs of shape {shape}; flatten them first")
        bias_per_out = torch.zeros(layer.out_features, dtype=torch.float64, device=weight.device)
    else:
        if layer.padding == "same" or layer.padding == "valid":
            raise ValueError("LocalReluLipschitz: give Conv2d padding as numbers, not 'same'/'valid'")
        op = LinearMap.conv2d(weight, shape, layer.stride, layer.padding, layer.dilation, layer.groups,
                              layer.padding_mode)
        matrix = op.dense_matrix(torch.float64)
        bias_per_out = torch.zeros(op.out_shape, dtype=torch.float64, device=weight.device)
    if layer.bias is not None:
        bias = layer.bias.detach().to(torch.float64)
        bias_per_out = bias_per_out + (bias if bias_per_out.dim() == 1 else bias[:, None, None])
    return matrix, bias_per_out.reshape(-1)


def _dot_gamma(length: int) -> float:
    """γ_n = n·u/(1 − n·u): relative error bound of a length-n float64 dot product (any order)."""
    g = (length + 2) * _U
    return 2 * g / (1 - g)


# A linear piece (M, b, E, e_b): the exact map is z ↦ M̂z + b̂ with |M̂ − M| ≤ E and |b̂ − b| ≤ e_b entrywise
# (E, e_b: None when exact). M is a dense (out, in) matrix or a 1-D diagonal. Consecutive pieces are composed
# at construction, so the norms are taken of the composed map.
def _mul(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    if left.dim() == 1:
        return left[:, None] * right if right.dim() == 2 else left * right
    return left @ right if right.dim() == 2 else left * right[None, :]


def _matvec(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    return matrix @ vector if matrix.dim() == 2 else matrix * vector


def _compose(outer: tuple, inner: tuple) -> tuple:
    """outer ∘ inner as one piece; the float64 products' rounding goes into the error terms (γ_k·|M₂||M₁|,
    then the error terms' own rounding covered by a factor 1 + 2γ_k)."""
    m2, b2, e2, eb2 = outer
    m1, b1, e1, eb1 = inner
    inner_length = m2.shape[1] if m2.dim() == 2 and m1.dim() == 2 else 1
    g = _dot_gamma(inner_length)
    g_vector = _dot_gamma(m2.shape[1] + 1) if m2.dim() == 2 else _dot_gamma(1)  # M₂·b₁ + b₂: a dot product
    a2, a1 = m2.abs(), m1.abs()
    matrix = _mul(m2, m1)
    error = g * _mul(a2, a1)
    bias = _matvec(m2, b1) + b2
    bias_error = g_vector * (_matvec(a2, b1.abs()) + b2.abs())
    if e2 is not None:
        error = error + _mul(e2, a1 + (e1 if e1 is not None else 0))
        bias_error = bias_error + _matvec(e2, b1.abs() + (eb1 if eb1 is not None else 0))
    if e1 is not None:
        error = error + _mul(a2, e1)
    if eb1 is not None:
        bias_error = bias_error + _matvec(a2, eb1)
    if eb2 is not None:
        bias_error = bias_error + eb2
    underflow = (m2.shape[1] + 2 if m2.dim() == 2 else 2) * 2.0 ** -1073  # products below the normal range
    return matrix, bias, error * (1 + 2 * g) + underflow, bias_error * (1 + 2 * g_vector) + underflow


def _batchnorm_piece(layer: nn.Module, shape: tuple[int, ...]) -> tuple:
    """The eval-mode BatchNorm (running statistics) as a diagonal piece: a = γ/√(var + ε) in float64 (three
    roundings: |â − a| ≤ 4u|a|), b = β − a·mean."""
    if shape[0] != layer.num_features or (isinstance(layer, nn.BatchNorm1d) and len(shape) != 1):
        raise ValueError(f"LocalReluLipschitz: {layer} gets inputs of shape {shape}")
    var = layer.running_var.detach().to(torch.float64)
    mean = layer.running_mean.detach().to(torch.float64)
    weight = layer.weight.detach().to(torch.float64) if layer.weight is not None else torch.ones_like(var)
    beta = layer.bias.detach().to(torch.float64) if layer.bias is not None else torch.zeros_like(var)
    scale = weight / torch.sqrt(var + layer.eps)
    scale_error = 8 * _U * scale.abs()
    shift = beta - scale * mean
    shift_error = scale_error * mean.abs() + 4 * _U * ((scale * mean).abs() + beta.abs())
    repeat = math.prod(shape[1:])
    return tuple(t.repeat_interleave(repeat) for t in (scale, shift, scale_error, shift_error))


def _avgpool_piece(layer: nn.Module, shape: tuple[int, ...]) -> tuple:
    """Average pooling as a dense matrix: the pooling of each unit vector of one channel in float64 (one
    rounding of 1/divisor per entry: |M̂ − M| ≤ 4u|M|), repeated over the channels."""
    channels, pixels = shape[0], math.prod(shape[1:])
    with torch.no_grad():
        basis = torch.eye(pixels, dtype=torch.float64).reshape(pixels, 1, *shape[1:])
        spatial = layer(basis).reshape(pixels, -1).T
    matrix = torch.block_diag(*[spatial] * channels)
    out = matrix.shape[0]
    return matrix, torch.zeros(out, dtype=torch.float64), 4 * _U * matrix.abs(), None


def _pool_columns(layer: nn.Module, piece: tuple, shape: tuple[int, ...]) -> tuple:
    """Average pooling after a dense piece, without the pooling's matrix: the pooling of the piece's columns
    (and bias) as images of ``shape``. Pooling is a non-negative linear map P (rows summing to ≤ 1), so the
    float64 result is within γ_w·P|M| of P·M (w = window area + 1 roundings), and P·E bounds the old error."""
    matrix, bias, error, bias_error = piece
    _check_pooling(layer, shape)
    kernel = layer.kernel_size if isinstance(layer.kernel_size, tuple) else (layer.kernel_size,) * 2
    g = _dot_gamma(math.prod(kernel) + 1)

    def pool(columns: torch.Tensor) -> torch.Tensor:  # (n, k) rows laid out as `shape` -> pooled rows
        with torch.no_grad():
            return layer(columns.T.reshape(-1, *shape)).reshape(columns.shape[1], -1).T

    new_matrix = pool(matrix)
    new_error = g * pool(matrix.abs()) + (pool(error) if error is not None else 0)
    new_bias = pool(bias[:, None])[:, 0]
    new_bias_error = g * pool(bias.abs()[:, None])[:, 0] + (pool(bias_error[:, None])[:, 0]
                                                            if bias_error is not None else 0)
    underflow = (math.prod(kernel) + 2) * 2.0 ** -1073
    return new_matrix, new_bias, new_error * (1 + 2 * g) + underflow, new_bias_error * (1 + 2 * g) + underflow


def _check_pooling(layer: nn.Module, shape: tuple[int, ...]) -> None:
    if len(shape) != 3:
        raise ValueError(f"LocalReluLipschitz: {layer} needs inputs (C, H, W), got {shape}")
    if layer.divisor_override is not None and layer.divisor_override <= 0:
        raise ValueError(f"LocalReluLipschitz: {layer} has divisor_override <= 0 (a negative or infinite map)")


def _maxmin_pairs(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (a, b) of the pairs MaxMin compares: channel c against c + C/2 at every position."""
    channels = shape[0]
    if channels % 2:
        raise ValueError(f"LocalReluLipschitz: MaxMin needs an even channel count, got shape {shape}")
    index = torch.arange(math.prod(shape)).reshape(channels, -1)
    return index[:channels // 2].reshape(-1), index[channels // 2:].reshape(-1)


def _norm_upper(matrix: torch.Tensor, error: torch.Tensor | None = None) -> float:
    """Guaranteed upper bound of ‖M̂‖₂ for every |M̂ − matrix| ≤ error: the guaranteed bound of ‖matrix‖₂
    (:func:`lipkern.bounds.chain.matrix_norm_upper`: an eigenvalue estimate certified by a float64 Cholesky
    factorization, its rounding included) plus ‖error‖_F (doubled for its own rounding)."""
    from lipkern.bounds.chain import matrix_norm_upper

    if matrix.numel() == 0:
        return 0.0
    value = matrix_norm_upper(matrix)
    if error is not None:
        value = add_up(value, 2 * float(_norms_up(error)))
    return value


class LocalReluLipschitz:
    """Sound local Lipschitz bound L(x, γ) ≥ sup_{x' ∈ B(x, γ)} ‖f(x') − f(x)‖₂ / ‖x' − x‖₂ of a small network
    f = a (nested) nn.Sequential of nn.Linear / nn.Conv2d / eval-mode nn.BatchNorm1d/2d / nn.AvgPool2d /
    nn.ReLU / lipkern MaxMin / nn.Flatten / nn.Identity and lipkern's AOL / Spectral layers (the weight they
    apply in eval mode), on inputs of ``input_shape`` (no batch dim). BatchNorm is its eval-mode function (the
    running statistics), whatever the module's mode.

    Method (all in float64, the exact-arithmetic network): the linear layers between two activations are
    composed into one map A_k (dense, with an entrywise bound on the rounding of the composition and of
    BatchNorm's and pooling's scales). The deviations Δz = z(x') − z(x) of every pre-activation over the ball
    are enclosed in boxes [lo, hi], each entry the tighter of
    - interval arithmetic on the previous box: A⁺·hi + A⁻·lo, and
    - the norm form |Δz_i| ≤ ‖(A P)_i‖·γ·L_prefix, with L_prefix the bound of the layers before;
    the first map is exact: |Δz_i| ≤ γ·‖a_i‖. The centre z(x) is computed with an error bound e (γ_n terms).
    Through a ReLU, Δh has Δz's sign and |Δh| ≤ |Δz|: hi_h = clamp(z + e + hi, 0, hi), lo_h = −clamp(z + e, 0,
    −lo); a neuron with z + e + hi ≤ 0 is stably inactive on the ball (Δh ≡ 0). Through MaxMin each output of a
    pair (a, b) moves within [min(lo_a, lo_b), max(hi_a, hi_b)], and ‖ΔMaxMin(z)‖ ≤ ‖P Δz‖ (1-Lipschitz on each
    pair; a pair that does not move stays put). P_k = the units whose deviation box is not {0}. Then for x', x''
    in the ball ‖Δh_k‖ ≤ ‖P_k Δz_k‖ = ‖P_k A_k P_{k−1} Δh_{k−1}‖, so L(x, γ) = ∏_k ‖P_k A_k P_{k−1}‖₂, each norm
    a guaranteed upper bound (an eigenvalue estimate certified by a float64 Cholesky factorization,
    :func:`lipkern.bounds.chain.matrix_norm_upper`), the product rounded up. The bound is non-decreasing in γ up
    to that certificate's relative slack (≤ 1e-4): the boxes only grow and a submatrix has a smaller norm.
    γ = inf gives the global product bound ∏‖A_k‖.

    The layers' weights are copied (float64 dense matrices) at construction: build a new instance after the
    weights change. Maps above ``max_entries`` matrix entries are refused (ValueError)."""

    def __init__(self, module: nn.Module, input_shape: Sequence[int], max_entries: int = 10_000_000):
        layers = _leaves(module)
        if layers is None:
            raise ValueError("LocalReluLipschitz: the module must be a (nested) nn.Sequential of nn.Linear, "
                             "nn.Conv2d, nn.BatchNorm1d/2d, nn.AvgPool2d, nn.ReLU, MaxMin, nn.Flatten, "
                             "nn.Identity and lipkern AOL / Spectral layers (or one such layer); got "
                             f"{type(module).__name__}. Pass local_lipschitz= or rely on the global bound.")
        self.input_shape = as_shape(input_shape, "input_shape")
        self.max_entries = max_entries
        self.ops: list[tuple] = []  # ("affine", M, b, E, e_b) | ("relu",) | ("maxmin", a, b)
        shape = self.input_shape
        piece = None  # the linear maps since the last activation, composed
        for layer in layers:
            if isinstance(layer, nn.AvgPool2d) and piece is not None and piece[0].dim() == 2:
                piece, shape = _pool_columns(layer, piece, shape), _output_shape(layer, shape)
                continue
            new, out_shape = self._piece(layer, shape)
            if new is not None:
                piece = new if piece is None else _compose(new, piece)
                self._check_size(piece, layer)
            shape = out_shape
            if not isinstance(layer, (nn.ReLU, _maxmin_type())):
                continue
            if piece is not None:
                self.ops.append(self._affine_op(piece))
                piece = None
            self.ops.append(("relu",) if isinstance(layer, nn.ReLU) else ("maxmin", *_maxmin_pairs(shape)))
        if piece is not None:
            self.ops.append(self._affine_op(piece))
        self._global: float | None = None
        self._norms: dict[tuple, float] = {}  # (op, rows, columns) -> bound: a bisection revisits masks

    def _piece(self, layer: nn.Module, shape: tuple[int, ...]) -> tuple[tuple | None, tuple[int, ...]]:
        """(the layer's linear piece or None, its output shape)."""
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            out_shape = self._dense_shape(layer, shape)
            return (*_affine(layer, shape), None, None), out_shape
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return _batchnorm_piece(layer, shape), shape
        if isinstance(layer, nn.AvgPool2d):
            _check_pooling(layer, shape)
            return _avgpool_piece(layer, shape), self._dense_shape(layer, shape)
        if isinstance(layer, _maxmin_type()) and layer.dim != 1:
            raise ValueError(f"LocalReluLipschitz: MaxMin over dim {layer.dim}; only the channels (dim=1)")
        return None, _output_shape(layer, shape)

    def _dense_shape(self, layer: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The layer's output shape; a ValueError when its dense matrix exceeds ``max_entries``."""
        out_shape = _output_shape(layer, shape)
        if math.prod(shape) * math.prod(out_shape) > self.max_entries:
            raise ValueError(f"LocalReluLipschitz: {layer} on {shape} is a {math.prod(out_shape)} x "
                             f"{math.prod(shape)} matrix, above max_entries={self.max_entries}")
        return out_shape

    def _check_size(self, piece: tuple, layer: nn.Module) -> None:
        if piece[0].dim() == 2 and piece[0].numel() > self.max_entries:
            raise ValueError(f"LocalReluLipschitz: the linear maps up to {layer} compose to a "
                             f"{piece[0].shape[0]} x {piece[0].shape[1]} matrix, above "
                             f"max_entries={self.max_entries}")

    def _affine_op(self, piece: tuple) -> tuple:
        matrix, bias, error, bias_error = piece
        if not all(bool(torch.isfinite(t).all()) for t in piece if t is not None):
            raise ValueError("LocalReluLipschitz: the left half's weights (or BatchNorm's scales, or their "
                             "composition in float64) are not finite: no finite bound")
        if matrix.dim() == 1:  # a lone diagonal (BatchNorm between two activations)
            if matrix.numel() ** 2 > self.max_entries:
                raise ValueError(f"LocalReluLipschitz: a BatchNorm of {matrix.numel()} units between two "
                                 f"activations is a dense matrix above max_entries={self.max_entries}")
            matrix = torch.diag(matrix)
            error = torch.diag(error) if error is not None else None
        return ("affine", matrix, bias, error, bias_error)

    def global_bound(self) -> float:
        """∏_k ‖A_k‖₂ over the composed linear maps (guaranteed; ReLU and MaxMin are 1-Lipschitz)."""
        if self._global is None:
            value = 1.0
            for op in self.ops:
                if op[0] == "affine":
                    value = mul_up(value, _norm_upper(op[1], op[3]))
            self._global = value
        return self._global

    def __call__(self, x: torch.Tensor, gamma: float) -> float:
        if gamma < 0 or math.isnan(gamma):
            raise ValueError(f"LocalReluLipschitz: gamma must be >= 0, got {gamma}")
        if math.isinf(gamma):
            return self.global_bound()
        if tuple(x.shape) != self.input_shape:
            raise ValueError(f"LocalReluLipschitz: x must have shape {self.input_shape}, "
                             f"got {tuple(x.shape)}")
        centre = x.detach().to(torch.float64).reshape(-1)
        error = torch.zeros_like(centre)
        hi = torch.full_like(centre, gamma)  # the input's deviation box
        lo = -hi
        varying = torch.ones_like(centre, dtype=torch.bool)
        prefix, pending = 1.0, None  # bound of the layers before, and the last map's (A P_{k-1}, E P_{k-1})
        for index, op in enumerate(self.ops):
            if op[0] == "affine":
                _, matrix, bias, matrix_error, bias_error = op
                pending = (matrix[:, varying], None if matrix_error is None else matrix_error[:, varying],
                           index, varying)
                centre, error, lo, hi = self._affine_step(op, centre, error, lo, hi, pending, gamma * prefix)
                varying = _varying(lo, hi)
                continue
            if op[0] == "relu":
                lo, hi, centre = self._relu_step(centre, error, lo, hi)
                rows = varying = _varying(lo, hi)
            else:  # MaxMin: ‖ΔMaxMin(z)‖ ≤ ‖P Δz‖ with P the units of z that move
                rows = varying
                centre, error, lo, hi = self._maxmin_step(op[1], op[2], centre, error, lo, hi)
                varying = _varying(lo, hi)
            if pending is not None:  # (an activation first or after another has slope ≤ 1: nothing to multiply)
                prefix = mul_up(prefix, self._masked_norm(pending, rows))
                pending = None
        if pending is not None:
            prefix = mul_up(prefix, self._masked_norm(pending, None))
        return prefix if not math.isnan(prefix) else math.inf

    def _masked_norm(self, pending: tuple, rows: torch.Tensor | None) -> float:
        """Bound of ‖P_rows A P_columns‖ (cached by the masks)."""
        matrix, error, index, columns = pending
        key = (index, columns.cpu().numpy().tobytes(), None if rows is None else rows.cpu().numpy().tobytes())
        if key not in self._norms:
            if len(self._norms) > 4096:
                self._norms.clear()
            self._norms[key] = _norm_upper(matrix, error) if rows is None else \
                _norm_upper(matrix[rows], _rows(error, rows))
        return self._norms[key]

    @staticmethod
    def _affine_step(op, centre, error, lo, hi, masked, radius):
        _, matrix, bias, matrix_error, bias_error = op
        length = matrix.shape[1] + 1
        g = _dot_gamma(length)
        absolute = matrix.abs()
        deviation = torch.maximum(lo.abs(), hi.abs())
        new_centre = matrix @ centre + bias
        underflow = length * 2.0 ** -1073  # products below the normal range round absolutely
        new_error = (absolute @ error) * (1 + g) + g * (absolute @ centre.abs() + bias.abs()) + underflow
        slack = g * (absolute @ deviation) + underflow
        row_norms = _norms_up(masked[0], dim=1)
        if matrix_error is not None:  # the exact map differs from `matrix` by at most E entrywise
            new_error = new_error + (matrix_error @ (centre.abs() + error)) * (1 + g) + underflow
            slack = slack + (matrix_error @ deviation) * (1 + g) + underflow
            row_norms = row_norms + 2 * _norms_up(masked[1], dim=1)
        # |Δz_i| ≤ ‖row_i‖·radius; a product in the subnormal range rounds absolutely: no clipping there
        clip = row_norms * radius * (1 + 4 * _U)
        row_norms = torch.where((clip >= _TINY) | (row_norms == 0) | (radius == 0), clip,
                                torch.full_like(clip, math.inf))
        if bias_error is not None:
            new_error = new_error + bias_error
        new_error = new_error * (1 + 4 * _U) + 1e-300
        positive, negative = matrix.clamp_min(0), matrix.clamp_max(0)
        new_hi = positive @ hi + negative @ lo
        new_lo = positive @ lo + negative @ hi
        new_hi = torch.minimum(new_hi + slack + new_hi.abs() * 4 * _U, row_norms)
        new_lo = torch.maximum(new_lo - slack - new_lo.abs() * 4 * _U, -row_norms)
        return new_centre, new_error, new_lo, new_hi

    @staticmethod
    def _relu_step(centre, error, lo, hi):
        top = centre + error
        top_plus = top + hi
        top = top + 4 * _U * (top.abs() + error)  # rounded up
        top_plus = top_plus + 4 * _U * (centre.abs() + error + hi.abs())
        new_hi = torch.minimum(top_plus.clamp_min(0.0), hi)
        new_lo = -torch.minimum(top.clamp_min(0.0), -lo)
        inactive = top_plus <= 0
        new_hi = torch.where(inactive, torch.zeros_like(new_hi), new_hi)
        new_lo = torch.where(inactive, torch.zeros_like(new_lo), new_lo)
        return new_lo, new_hi, centre.clamp_min(0.0)

    @staticmethod
    def _maxmin_step(first, second, centre, error, lo, hi):
        """max(a + Δa, b + Δb) − max(a, b) and the same for min lie in [min(Δa, Δb), max(Δa, Δb)]; the centres
        are exact maxima and minima of the float64 centres (their error: the larger of the two)."""
        a, b = centre[first], centre[second]
        pair_error = torch.maximum(error[first], error[second])
        pair_lo = torch.minimum(lo[first], lo[second])
        pair_hi = torch.maximum(hi[first], hi[second])
        new_centre, new_error = centre.clone(), error.clone()
        new_lo, new_hi = lo.clone(), hi.clone()
        new_centre[first], new_centre[second] = torch.maximum(a, b), torch.minimum(a, b)
        for index in (first, second):
            new_error[index], new_lo[index], new_hi[index] = pair_error, pair_lo, pair_hi
        return new_centre, new_error, new_lo, new_hi


def _structure(module) -> tuple:
    """What a module computes besides its tensors: every submodule's type and attributes (numbers, strings and
    tuples of them by value, hooks and other objects by identity, the tensor and child names)."""
    if not isinstance(module, nn.Module):
        return (id(module),)
    from torch.nn.modules import module as torch_module

    items = []
    for name, sub in module.named_modules():
        attributes = []
        for key, value in sorted(vars(sub).items()):
            if key in ("_parameters", "_buffers", "_modules"):
                attributes.append((key, tuple(value)))
            elif isinstance(value, (bool, int, float, str, type(None))) or (
                    isinstance(value, tuple) and all(isinstance(v, (bool, int, float, str)) for v in value)):
                attributes.append((key, value))
            elif isinstance(value, dict):
                attributes.append((key, tuple((k, id(v)) for k, v in value.items())))
            elif not isinstance(value, torch.Tensor):  # (tensors: compared by value elsewhere, or caches)
                attributes.append((key, id(value)))
        items.append((name, type(sub), tuple(attributes)))
    hooks = (tuple(torch_module._global_forward_hooks), tuple(torch_module._global_forward_pre_hooks))
    return tuple(items), hooks


def _rows(matrix: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if matrix is None else matrix[rows]


def _maxmin_type() -> type:
    from lipkern.nn import MaxMin

    return MaxMin


def _output_shape(layer: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape (no batch dim) of the layer's output, from a zero probe in the layer's dtype and device."""
    params = list(layer.parameters())
    dtype, device = (params[0].dtype, params[0].device) if params else (torch.float32, None)
    with torch.no_grad():
        return tuple(layer(torch.zeros((1, *shape), dtype=dtype, device=device)).shape[1:])


# --- the certifier ---------------------------------------------------------------------------------------
class SplitzCertifier:
    """SPLITZ certificate for f = right ∘ left with noise level σ after ``left`` (see the module docstring).

    ``input_shape``: one input of ``left`` without the batch dim (needed for the global bound; default: the
    shape of the x given to certify). ``local_lipschitz``: optional callable (x, gamma) -> float bounding
    left's local Lipschitz constant on B(x, gamma) (the user's responsibility).

    ``evaluation``: what the radius covers, as in :func:`lipkern.certify.certified_accuracy`. With "auto" (the
    default: the left half's own precision, TF32 where PyTorch lets float32 matmuls use it), "float32", "tf32"
    or "float64" the smoothed classifier is the deployed one, right's smoothing at the left half AS COMPUTED in
    that precision in any summation order: :class:`lipkern.certify.rounding.RoundingAnalysis` bounds
    ‖f̂_L(z) − f_L(z)‖ ≤ P + Q·‖z − x‖ on the ball, so ‖f̂_L(x') − f̂_L(x)‖ ≤ (L + Q)·r + 2P and the radius is
    min((R_right − 2P)/(L(x, γ) + Q), γ). With "exact" the smoothed classifier uses the real-arithmetic left
    half: R_right is reduced by a bound of ‖left(x) as computed − f_L(x)‖. With None the rounding of the left
    half is not bounded (the radius holds for the real-arithmetic left half only up to it): the choice for a
    left half the rounding analysis does not parse."""

    def __init__(self, left: nn.Module, right: nn.Module, sigma: float, num_classes: int,
                 input_shape: Sequence[int] | None = None,
                 local_lipschitz: Callable[[torch.Tensor, float], float] | None = None, *,
                 autocast_dtype: torch.dtype | None = None, evaluation: str | None = "auto"):
        if not callable(left):
            raise TypeError(f"SplitzCertifier: left must be a module or callable, got {type(left).__name__}")
        if local_lipschitz is not None and not callable(local_lipschitz):
            raise TypeError("SplitzCertifier: local_lipschitz must be a callable (x, gamma) -> float")
        if evaluation not in ("auto", "float32", "tf32", "float64", "exact", None):
            raise ValueError(f"SplitzCertifier: evaluation must be 'auto', 'float32', 'tf32', 'float64', 'exact' "
                             f"or None, got {evaluation!r}")
        if evaluation is not None and not isinstance(left, nn.Module):
            raise ValueError("SplitzCertifier: the rounding of a left half that is not an nn.Module is not "
                             "analyzed: pass evaluation=None (the radius then ignores its rounding)")
        self.evaluation = evaluation
        self.left = left
        self.smoothing = RandomizedSmoothing(right, sigma, num_classes, autocast_dtype=autocast_dtype)
        self.input_shape = as_shape(input_shape, "input_shape") if input_shape is not None else None
        self.local_lipschitz = local_lipschitz
        self._local: LocalReluLipschitz | None = None
        self._global: float | None = None
        self._analysis = None  # RoundingAnalysis of the left half (evaluation not None)
        self._prepared = False

    @property
    def sigma(self) -> float:
        return self.smoothing.sigma

    def _same_left(self, shape: tuple[int, ...], precision: str | None) -> bool:
        """The left half is the one the bounds were computed for: the same parameter and buffer values (not only
        versions: ``.data`` edits bypass version counters), the same modules with the same attributes and hooks
        (a swapped layer, a changed BatchNorm eps or a Spectral layer's ``certified`` flag), the same input
        shape and precision. Records the current state otherwise."""
        from lipkern.nn._cache import WeightSnapshot

        tensors = [*self.left.parameters(), *self.left.buffers()] if isinstance(self.left, nn.Module) else []
        key = (_structure(self.left), shape, precision, len(tensors))
        snapshot = getattr(self, "_snapshot", None)
        same = snapshot is not None and snapshot[0] == key and all(
            copy.matches(t) for copy, t in zip(snapshot[1], tensors))
        if not same:
            self._snapshot = (key, [WeightSnapshot(t) for t in tensors])
        return same

    def _precision(self, device: torch.device) -> str | None:
        if self.evaluation != "auto":
            return self.evaluation
        from lipkern.certify.margin import deployed_evaluation

        return deployed_evaluation(self.left, device)

    # -- L_left ----------------------------------------------------------------------------------------------
    def _prepare(self, shape: tuple[int, ...]) -> None:
        """The local and global bounds of the current weights (once per certify call; either may be None)."""
        if self._prepared:
            return
        self._prepared = True
        errors: list[str] = []
        try:
            from lipkern.bounds import lipschitz_bound
        except ImportError:
            lipschitz_bound = None
        if lipschitz_bound is not None:
            try:
                self._global = float(lipschitz_bound(self.left, shape))
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        if _leaves(self.left) is not None:
            try:
                self._local = LocalReluLipschitz(self.left, shape)
            except ValueError as err:  # e.g. too large for dense matrices
                errors.append(str(err))
        if self._local is None and self._global is None and self.local_lipschitz is None:
            raise ValueError("SplitzCertifier: no Lipschitz bound for left (neither LocalReluLipschitz nor "
                             "lipkern.bounds.lipschitz_bound applies): pass local_lipschitz=. "
                             + " | ".join(errors))

    def _rounding(self, x: torch.Tensor, z: torch.Tensor, precision: str | None) -> tuple[float, float]:
        """(what the rounding takes from R_right, what it adds to L) for ``evaluation`` (class docstring)."""
        if precision is None:
            return 0.0, 0.0
        if self._analysis is None:
            from lipkern.certify.rounding import RoundingAnalysis

            try:
                self._analysis = RoundingAnalysis(self.left, tuple(x.shape),
                                                  None if precision == "exact" else precision, device=x.device)
            except (TypeError, ValueError) as err:
                raise ValueError(f"SplitzCertifier: the rounding of this left half is not analyzed ({err}); "
                                 "pass evaluation=None to certify the real-arithmetic left half only") from None
        with torch.inference_mode():
            error = self._analysis(x[None])
        exact, center, slope = float(error.exact[0]), float(error.center[0]), float(error.slope)
        if precision != "exact":  # ‖f̂(x') − f̂(x)‖ ≤ ‖f(x') − f(x)‖ + (P + Q·r) + P
            return up(2 * center), slope
        gap = float(_norms_up(z.to(torch.float64).reshape(-1) - error.logits[0].reshape(-1)))
        return add_up(gap, exact), 0.0

    def lipschitz_at(self, x: torch.Tensor, gamma: float) -> float:
        """The bound of left's Lipschitz constant on B(x, gamma) used by :meth:`certify`: the user's callable,
        else min(LocalReluLipschitz, the global bound), whichever exist."""
        if self.local_lipschitz is not None:
            value = float(self.local_lipschitz(x, gamma))
            if not value >= 0:
                raise ValueError(f"SplitzCertifier: local_lipschitz returned {value}, not a number >= 0")
            return value
        self._prepare(self.input_shape or tuple(x.shape))
        candidates = [v for v in (self._global, None if self._local is None else self._local(x, gamma))
                      if v is not None]
        return math.inf if any(math.isnan(v) for v in candidates) else min(candidates)

    def best_radius(self, x: torch.Tensor, right_radius: float, steps: int = _GAMMA_STEPS,
                    slope: float = 0.0) -> tuple[float, float]:
        """(radius, gamma) = a γ maximizing min(right_radius / (L(x, γ) + slope), γ), by bisection on the
        crossing (exact for a constant L). Every candidate is a valid certificate; the best evaluated one is
        returned. ``slope``: the rounding's growth with the radius (class docstring)."""
        if right_radius <= 0:
            return 0.0, 0.0

        def bound(gamma: float) -> float:
            value = self.lipschitz_at(x, gamma) + slope
            return up(value) if slope else value

        def candidate(gamma: float) -> float:
            return min(div_down(right_radius, bound(gamma)), gamma)

        l_far = bound(math.inf)
        if l_far == 0:  # left is constant: any perturbation keeps f_L(x)
            return math.inf, math.inf
        low = div_down(right_radius, l_far)  # the crossing is ≥ R / L(∞) ...
        l_near = bound(low * 1e-3)  # ... and ≤ R / L(γ) for γ below it
        high = right_radius / l_near if l_near > 0 else 2 * low
        while l_near == 0 and high < 1e12 * low and candidate(high) >= high:  # L(γ) = 0 near x
            low, high = high, 2 * high
        best = (candidate(low), -low)  # the best radius, then the smallest γ giving it
        if self.local_lipschitz is None and self._local is None:  # a constant L: the crossing is exact
            return best[0], -best[1]
        for _ in range(steps):
            if high <= low * (1 + 1e-12):
                break
            mid = 0.5 * (low + high)
            value = candidate(mid)
            best = max(best, (value, -mid))
            if value >= mid:  # R/L(mid) ≥ mid: the crossing lies above
                low = mid
            else:
                high = mid
        return best[0], -best[1]

    # -- CERTIFY --------------------------------------------------------------------------------------------
    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                seed: int | None = None, progress: bool = False) -> tuple[int, float, float]:
        """(class, radius, gamma), or (ABSTAIN = −1, 0.0, 0.0). The right half is certified by Cohen's CERTIFY
        at z = left(x) (:class:`RandomizedSmoothing`, same arguments); radius = min(R_right / L(x, γ), γ) at
        the γ found by :meth:`best_radius`. Holds with probability ≥ 1 − alpha. x: one input, no batch dim."""
        x = self.smoothing._check_input(x)
        precision = self._precision(x.device) if self.evaluation is not None else None
        if not self._same_left(self.input_shape or tuple(x.shape), precision):  # bounds of the current left half
            self._local, self._global, self._analysis, self._prepared = None, None, None, False
        was_training = getattr(self.left, "training", None)
        try:
            if isinstance(self.left, nn.Module):
                self.left.eval()
            with torch.inference_mode():
                z = self.left(x[None])[0]
        finally:
            if isinstance(self.left, nn.Module):
                self.left.train(was_training)
        if not bool(torch.isfinite(z).all()):
            raise ValueError("SplitzCertifier: left(x) contains NaN or Inf (a diverged left half?)")
        label, right_radius = self.smoothing.certify(z.clone(), n0, n, alpha, batch_size, seed, progress)
        if label == ABSTAIN:
            return ABSTAIN, 0.0, 0.0
        taken, slope = self._rounding(x, z, precision)
        remaining = right_radius - taken
        if not remaining > 0:  # the rounding of the left half uses up the right half's radius
            return label, 0.0, 0.0
        radius, gamma = self.best_radius(x, down(remaining) if taken else remaining, slope=slope)
        return label, radius, gamma


# --- training helpers ------------------------------------------------------------------------------------
def splitz_loss(cross_entropy: torch.Tensor, local_estimate: torch.Tensor, kappa: float,
                theta: float = 0.5) -> torch.Tensor:
    """The SPLITZ training objective as the authors' code applies it: (1 − κ)·CE + κ·L̂ while the local
    Lipschitz estimate L̂ of the left half exceeds θ, CE alone once it is below (θ = 0.5 keeps f_L from
    collapsing). κ goes from 1 to 0.7 over the first two thirds of training in their recipe
    (``lipkern.train``'s "splitz" recipe). No host read: the switch is a tensor ``where``."""
    if isinstance(kappa, bool) or not isinstance(kappa, numbers.Real) or not 0 <= kappa <= 1:
        raise ValueError(f"splitz_loss: kappa must lie in [0, 1], got {kappa!r}")
    mixed = (1 - kappa) * cross_entropy + kappa * local_estimate
    return torch.where(local_estimate > theta, mixed, cross_entropy)


class LocalLipschitzEstimate(nn.Module):
    """Differentiable ESTIMATE (not a bound) of the local Lipschitz constant of a left half on the ℓ₂ balls
    B(x_i, γ), averaged over a batch: SPLITZ's training regularizer (the authors follow Huang et al. 2021).

    For each input, interval arithmetic on the box x ± γ (the first linear map's rows clipped by γ·‖w_i‖)
    marks the ReLUs that may be active on the ball; the Jacobian chain J_i = A_K D_{K−1} ⋯ D_1 A_1 (BatchNorm as
    its running-statistics scale, MaxMin as the pair order at x_i) is then power-iterated ``n_iter`` times from
    a persistent vector (a buffer, updated each call), and σ_i = ‖J_i v_i‖ with v_i detached carries the
    gradient to the weights. Supports what :class:`LocalReluLipschitz` does (Linear, Conv2d, BatchNorm,
    AvgPool2d, ReLU, MaxMin, Flatten, Identity, AOL layers), with the module's live parameters. An estimate
    from below of the local constant at the masks' linearization; certificates use :class:`LocalReluLipschitz`.
    """

    def __init__(self, left: nn.Module, input_shape: Sequence[int], n_iter: int = 2):
        super().__init__()
        from lipkern.nn import SpectralConv2d, SpectralLinear

        layers = _leaves(left, applied=False)
        if layers is None or any(isinstance(m, (SpectralConv2d, SpectralLinear)) for m in layers):
            raise ValueError("LocalLipschitzEstimate: the left half must be a (nested) nn.Sequential of "
                             "nn.Linear, nn.Conv2d, nn.BatchNorm1d/2d, nn.AvgPool2d, nn.ReLU, MaxMin, "
                             f"nn.Flatten, nn.Identity and AOL layers; got {type(left).__name__}")
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"LocalLipschitzEstimate: n_iter must be an int >= 1, got {n_iter!r}")
        object.__setattr__(self, "_layers", tuple(layers))  # the left half's own modules, not submodules
        self.input_shape = as_shape(input_shape, "input_shape")
        self.n_iter = n_iter
        start = torch.randn(self.input_shape, generator=torch.Generator().manual_seed(0))
        self.register_buffer("u", start / start.norm())

    def forward(self, x: torch.Tensor, gamma: float) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"LocalLipschitzEstimate: inputs must be (N, *{self.input_shape}), got "
                             f"{tuple(x.shape)}")
        if not gamma >= 0:
            raise ValueError(f"LocalLipschitzEstimate: gamma must be >= 0, got {gamma!r}")
        weights = [self._weight(layer) for layer in self._layers]  # once per call (AOL's rescaling)
        frozen = [None if w is None else w.detach() for w in weights]
        with torch.no_grad():
            linearization = self._linearization(x.detach(), float(gamma), frozen)
        v = self.u.to(x.dtype).expand_as(x).contiguous()
        for _ in range(self.n_iter):
            with torch.enable_grad():
                v = v.detach().requires_grad_(True)
                image = self._jacobian(v, linearization, frozen)
                (v,) = torch.autograd.grad(image, v, image)  # JᵀJv
            v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).reshape(-1, *[1] * (x.dim() - 1))
        v = v.detach()
        sigma = self._jacobian(v, linearization, weights).flatten(1).norm(dim=1)
        with torch.no_grad():  # the next call starts from the batch's mean direction (no host read)
            mean = v.mean(0).to(self.u.dtype)
            norm = mean.norm()
            usable = torch.isfinite(norm) & (norm > 0)
            self.u.copy_(torch.where(usable, mean / torch.where(usable, norm, 1.0), self.u))
        return sigma.mean()

    def _linearization(self, x: torch.Tensor, gamma: float, weights: list) -> list:
        """Per layer: the ReLU mask (units whose upper bound on the box is > 0) or MaxMin's pair order at x."""
        point, low, high = x, x - gamma, x + gamma
        first, out = True, []
        for layer, weight in zip(self._layers, weights):
            if isinstance(layer, nn.ReLU):
                out.append(high > 0)
                point, low, high = point.clamp_min(0), low.clamp_min(0), high.clamp_min(0)
            elif isinstance(layer, _maxmin_type()):
                a, b = point.chunk(2, dim=1)
                out.append(a >= b)
                point, low, high = layer(point), layer(low), layer(high)  # MaxMin is monotone in each output
            else:
                centre, radius = (low + high) / 2, (high - low) / 2
                new_centre = self._affine(layer, centre, weight)
                new_radius = self._linear(layer, radius, None if weight is None else weight.abs(), absolute=True)
                if first and weight is not None:  # the first map: |Δz_i| ≤ γ·‖w_i‖ on the ℓ₂ ball
                    norms = weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (radius.dim() - 2))
                    new_radius = torch.minimum(new_radius, gamma * norms.expand_as(new_radius))
                    first = False
                point = self._affine(layer, point, weight)
                low, high = new_centre - new_radius, new_centre + new_radius
                out.append(None)
        return out

    def _jacobian(self, v: torch.Tensor, linearization: list, weights: list) -> torch.Tensor:
        for layer, fixed, weight in zip(self._layers, linearization, weights):
            if isinstance(layer, nn.ReLU):
                v = v * fixed
            elif isinstance(layer, _maxmin_type()):
                a, b = v.chunk(2, dim=1)
                v = torch.cat([torch.where(fixed, a, b), torch.where(fixed, b, a)], dim=1)
            else:
                v = self._linear(layer, v, weight)
        return v

    @staticmethod
    def _weight(layer: nn.Module) -> torch.Tensor | None:
        """The weight the layer applies (AOL's rescaled one, differentiable), None for weightless layers."""
        if isinstance(layer, _lipkern_layer_types()):
            return layer.rescaled_weight()
        return layer.weight if isinstance(layer, (nn.Linear, nn.Conv2d)) else None

    @staticmethod
    def _linear(layer: nn.Module, v: torch.Tensor, weight: torch.Tensor | None,
                absolute: bool = False) -> torch.Tensor:
        """The linear part of the layer with ``weight`` (no bias; BatchNorm's running-statistics scale, its
        absolute value with ``absolute``)."""
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            scale = _bn_scale(layer)
            scale = scale.abs() if absolute else scale
            return v * scale.reshape(-1, *[1] * (v.dim() - 2))
        if weight is None:
            return layer(v)  # pooling, flatten, identity: linear and non-negative
        if weight.dim() == 2:
            return torch.nn.functional.linear(v, weight)
        from lipkern.nn._conv import conv2d_forward

        return conv2d_forward(layer, v, weight, with_bias=False)

    @classmethod
    def _affine(cls, layer: nn.Module, v: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        out = cls._linear(layer, v, weight)
        bias = getattr(layer, "bias", None)
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            shift = -_bn_scale(layer) * layer.running_mean + (bias if bias is not None else 0)
            return out + shift.reshape(-1, *[1] * (v.dim() - 2))
        if weight is not None and bias is not None:
            out = out + bias.reshape(-1, *[1] * (v.dim() - 2))
        return out


def _bn_scale(layer: nn.Module) -> torch.Tensor:
    scale = torch.rsqrt(layer.running_var + layer.eps)
    return scale * layer.weight if layer.weight is not None else scale


def splitz_regularizer(left_lipschitz_estimate, lam: float, theta: float = 0.5):
    """SPLITZ's penalty λ·relu(L̂ − θ) on an estimate L̂ of the left half's Lipschitz constant (a
    differentiable tensor, e.g. ``lipkern.bounds.LipschitzEstimate(left, shape)()``; no host read).
    Paper: θ = 0.5, λ ∈ [0.7, 1]."""
    for name, value in (("lam", lam), ("theta", theta)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
            raise ValueError(f"splitz_regularizer: {name} must be a float >= 0, got {value!r}")
    estimate = torch.as_tensor(left_lipschitz_estimate)
    return lam * torch.relu(estimate - theta)


class GaussianNoise(nn.Module):
    """Adds N(0, σ²) noise in training mode only (SPLITZ's augmentation between f_L and f_R); the identity
    in eval mode."""

    def __init__(self, sigma: float):
        super().__init__()
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not sigma >= 0:
            raise ValueError(f"GaussianNoise: sigma must be a float >= 0, got {sigma!r}")
        self.sigma = float(sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sigma * torch.randn_like(x) if self.training and self.sigma > 0 else x

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"
