"""Margin certificates from Lipschitz constants (LMT, LipLT/CRM): radii and certified accuracy.

With a global ℓ₂ Lipschitz bound L of the logit map f, the predicted class ŷ = argmax f(x) cannot change
within ‖δ‖₂ < (f_ŷ − max_{j≠ŷ} f_j) / (√2·L) (Tsuzuku et al. 2018): every difference f_ŷ − f_j is
√2·L-Lipschitz. With pairwise bounds L_ab of the differences f_a − f_b (a (C, C) matrix), the radius is
min_{j≠ŷ} (f_ŷ − f_j) / L_ŷj, never smaller than the global one when L_ab ≤ √2·L.

Row-normalized ("LLN") last layers: unit rows do NOT make the head 1-Lipschitz (‖Ŵ‖₂ can reach √C), so the √2
form with L = 1 is invalid there. Use :func:`lln_pairwise_lipschitz` (L_ab = L_body·‖ŵ_a − ŵ_b‖) and the
pairwise form instead.

Rounding. :func:`certified_radius` computes in float64 and rounds down by explicit margins, so a radius never
exceeds the exact quotient of the given values; the logits' own rounding enters through ``error``.
:func:`certified_accuracy` certifies the network AS IT RUNS (``evaluation``, default: the model's float32 /
TF32 evaluation): margins from the float64 evaluation of the weights the model applies (frozen by
``lipkern.models.to_vanilla``, upcast exactly, never recomputed in float64), minus a rigorous bound on the
evaluation error of the deployed logits anywhere in the radius (:mod:`lipkern.certify.rounding`). Inside a
certified radius the deployed floating-point network cannot change its prediction, whatever its summation
order. ``evaluation="exact"`` certifies the real-arithmetic network only; ``evaluation=None`` takes the logits
as the model computes them, their rounding not bounded (black-box models).
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from typing import Iterable, NamedTuple, Sequence

import torch
from torch import nn

__all__ = ["CertifiedAccuracy", "certified_accuracy", "certified_radius", "lln_pairwise_lipschitz"]

_U = 2.0 ** -53
_SUBNORMAL_SLACK = 2.0 ** -1073
_ROUND_DOWN = 1.0 - 8 * _U  # margin, √2, product and quotient: < 5 roundings of u, relative
_SQRT2 = math.sqrt(2.0)


class CertifiedAccuracy(NamedTuple):
    """Result of :func:`certified_accuracy`.

    eps (E,) float64: the radii asked for; accuracy (E,) float64: fraction of points correctly classified with
    a certified radius > eps; clean_accuracy: fraction correctly classified; radii (N,) float64: certified
    radius of each point's predicted class (0 for ties, +inf where the bound allows any perturbation); correct
    (N,) bool: prediction == label; evaluation: what the radii cover ('float32', 'tf32', 'float64': that
    deployed evaluation; 'exact': the real-arithmetic network; None: the logits as computed); rounding (N,)
    float64 or None: the bound on the logits' evaluation error at each point (ℓ₂, float64 evaluation and
    deployed one together) taken off the margins; rounding_slope: how much the deployed one may grow per unit
    of distance (added to the denominators, see :func:`certified_radius`)."""

    eps: torch.Tensor
    accuracy: torch.Tensor
    clean_accuracy: float
    radii: torch.Tensor
    correct: torch.Tensor
    evaluation: str | None = None
    rounding: torch.Tensor | None = None
    rounding_slope: float = 0.0


# --- validation ------------------------------------------------------------------------------------------
def _check_logits(logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"certified_radius: logits must be a tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"certified_radius: logits must be (B, C) with C >= 2 classes, "
                         f"got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"certified_radius: logits must be floating point, got {logits.dtype}")
    if logits.is_meta:
        raise ValueError("certified_radius: logits are on the meta device (shapes only): a radius needs values")
    logits = logits.detach().to(torch.float64)
    if not torch.isfinite(logits).all():
        raise ValueError("certified_radius: logits contain NaN or Inf")
    return logits


def _as_lipschitz(lipschitz, num_classes: int, device: torch.device) -> torch.Tensor:
    """A 0-dim or (C, C) float64 tensor of non-negative, non-NaN Lipschitz bounds."""
    if isinstance(lipschitz, bool) or not isinstance(lipschitz, (numbers.Real, torch.Tensor)):
        raise TypeError(f"certified_radius: lipschitz must be a float or a tensor, "
                        f"got {type(lipschitz).__name__}")
    if isinstance(lipschitz, numbers.Real):  # straight to float64: a float32 tensor would round L (maybe down)
        value = torch.tensor(float(lipschitz), dtype=torch.float64, device=device)
    elif lipschitz.is_meta:
        raise ValueError("certified_radius: lipschitz is on the meta device (shapes only)")
    else:
        value = lipschitz.detach().to(device=device, dtype=torch.float64)
    if value.dim() == 1 and value.numel() == 1:
        value = value.reshape(())
    if value.dim() != 0 and tuple(value.shape) != (num_classes, num_classes):
        raise ValueError(f"certified_radius: lipschitz must be a scalar or a ({num_classes}, {num_classes}) "
                         f"pairwise matrix for {num_classes} classes, got shape {tuple(value.shape)}")
    if torch.isnan(value).any():
        raise ValueError("certified_radius: lipschitz contains NaN")
    if (value < 0).any():
        raise ValueError("certified_radius: lipschitz bounds must be non-negative")
    if value.dim() == 2:  # L_ab bounds f_a − f_b and f_b − f_a alike: a one-sided (triangular) fill is used
        value = torch.maximum(value, value.T)  # for both, never a missing 0 read as "constant difference"
    return value


# --- radii -----------------------------------------------------------------------------------------------
def _safe_quotient(margin: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """margin / denominator rounded down, with 0 for margin 0 (ties) and +inf for margin > 0 over 0 (a tiny
    denominator whose quotient overflows gives the largest finite float64, below the true quotient). The
    relative factor covers normal results; a subnormal quotient errs by ≤ 2⁻¹⁰⁷⁵ absolute per rounding (two:
    the quotient and the factor), hence the 2⁻¹⁰⁷³ taken off (a no-op on normal results)."""
    radius = (margin / denominator).clamp(max=torch.finfo(torch.float64).max) * _ROUND_DOWN
    radius = (radius - _SUBNORMAL_SLACK).clamp_min(0.0)
    radius = torch.where(denominator == 0, torch.full_like(radius, math.inf), radius)
    return torch.where(margin <= 0, torch.zeros_like(radius), radius)


def _check_error(error, error_slope, rows: int, device) -> tuple[torch.Tensor | None, float]:
    if isinstance(error_slope, bool) or not isinstance(error_slope, numbers.Real) or not error_slope >= 0:
        raise ValueError(f"certified_radius: error_slope must be a number >= 0, got {error_slope!r}")
    if error is None:
        return None, float(error_slope)
    error = torch.as_tensor(error).detach().to(device=device, dtype=torch.float64).reshape(-1)
    if error.numel() == 1 and rows != 1:
        error = error.expand(rows)
    if error.numel() != rows or not (error >= 0).all():
        raise ValueError(f"certified_radius: error must be {rows} numbers >= 0 (one per row of logits; +inf: "
                         f"no radius)")
    return error, float(error_slope)


def certified_radius(logits: torch.Tensor, lipschitz, *, error=None, error_slope: float = 0.0) -> torch.Tensor:
    """Certified ℓ₂ radius (B,) float64 of the predicted class of each row of ``logits`` (B, C).

    ``lipschitz``: a float or 0-dim tensor L (a global ℓ₂ Lipschitz bound of the logit map): radius =
    (f_ŷ − max_{j≠ŷ} f_j)/(√2·L); or a (C, C) tensor of pairwise bounds L_ab of f_a − f_b (diagonal ignored):
    radius = min_{j≠ŷ} (f_ŷ − f_j)/L_ŷj. Ties (margin 0) give 0; a zero bound with a positive margin gives
    +inf. The radius is rounded down (float64) and guaranteed for these logit values; see the module docstring
    about the logits' own rounding. No gradient (certification only).
    ``error`` (B,) and ``error_slope``: the logits are within ``error`` (ℓ₂) of the real-arithmetic network's at
    the point, and the evaluation that must not flip errs by at most ``error + error_slope·ε`` at distance ε
    (:class:`lipkern.certify.rounding.EvaluationError`: error = exact + center): the radius becomes
    min_j ((f_ŷ − f_j) − √2·error) / (L_ŷj + √2·error_slope) (global: L_ŷj = √2·L).
    A radius is only as good as ``lipschitz``: it must be an UPPER bound (:func:`lipkern.bounds.lipschitz_bound`
    gives one); an estimate (``lipschitz_estimate``) or an unverified constant can give radii that are too
    large."""
    logits = _check_logits(logits)
    num_classes = logits.shape[1]
    bound = _as_lipschitz(lipschitz, num_classes, logits.device)
    error, slope = _check_error(error, error_slope, logits.shape[0], logits.device)
    top = logits.argmax(dim=1)
    top_value = logits.gather(1, top[:, None])
    # √2·error rounded up; the subtraction from a margin rounded down by (1 − 2u) (its result, where positive)
    offset = None if error is None else (_SQRT2 * error * (1 + 4 * _U))[:, None]
    if bound.dim() == 0:
        others = logits.scatter(1, top[:, None], -math.inf)
        margin = top_value[:, 0] - others.max(dim=1).values
        if offset is not None:
            margin = (margin - offset[:, 0]) * (1 - 2 * _U)
        # √2·(L + slope) rounded up: relative 4u for normal values, one subnormal unit (absolute) below
        total = bound + slope if slope else bound
        denominator = torch.where(total == 0, 0.0, _SQRT2 * total * (1 + 4 * _U) + 2.0 ** -1074)
        return _safe_quotient(margin, denominator)
    margins = top_value - logits  # (B, C), >= 0
    if offset is not None:
        margins = (margins - offset) * (1 - 2 * _U)
    denominators = bound[top]
    if slope:
        denominators = (denominators + _SQRT2 * slope * (1 + 2 * _U)) * (1 + 2 * _U)
    per_class = _safe_quotient(margins, denominators)
    per_class = per_class.scatter(1, top[:, None], math.inf)  # j = ŷ does not count
    return per_class.min(dim=1).values


def lln_pairwise_lipschitz(head_weight: torch.Tensor, body_lipschitz) -> torch.Tensor:
    """Pairwise bounds (C, C) float64 for a row-normalized last layer f = Ŵ·h(x) + b, ŵ_a = w_a / ‖w_a‖.

    L_ab = L_body·‖ŵ_a − ŵ_b‖₂ bounds the Lipschitz constant of f_a − f_b when ``body_lipschitz`` bounds that
    of the body h. The normalization is F.normalize's (rows of norm below 1e-12 are divided by 1e-12).
    Computed in float64 and rounded up by an explicit margin (for ‖ŵ_a − ŵ_b‖ near 0 an absolute one). Zero
    diagonal. ``head_weight``: (C, D); ``body_lipschitz``: a non-negative float or 0-dim tensor, an UPPER bound
    of the body's constant (the result, and any radius from it, is only as good as that bound)."""
    if not isinstance(head_weight, torch.Tensor) or head_weight.dim() != 2 or head_weight.shape[0] < 2:
        raise ValueError("lln_pairwise_lipschitz: head_weight must be a (C, D) tensor with C >= 2, got "
                         f"{getattr(head_weight, 'shape', type(head_weight).__name__)}")
    w = head_weight.detach().to(torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError("lln_pairwise_lipschitz: head_weight contains NaN or Inf")
    body = torch.as_tensor(body_lipschitz).detach().to(device=w.device, dtype=torch.float64)
    if body.numel() != 1 or not torch.isfinite(body).all() or (body < 0).any():
        raise ValueError("lln_pairwise_lipschitz: body_lipschitz must be one finite non-negative number")
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    distances = (unit[:, None, :] - unit[None, :, :]).norm(dim=2)
    # Each computed unit row is within (D + 3)u of the exact one (norm, sqrt, quotient); the difference norm
    # has a relative error below (D + 2)u. Generous factors of 4 on both.
    slack = 4 * (w.shape[1] + 4) * _U
    distances = distances * (1 + slack) + 2 * slack
    distances.fill_diagonal_(0.0)
    return body.reshape(()) * distances * (1 + 2 * _U)


# --- certified accuracy ----------------------------------------------------------------------------------
def _eps_tensor(eps) -> torch.Tensor:
    values = [eps] if isinstance(eps, numbers.Real) and not isinstance(eps, bool) else eps
    try:
        values = torch.as_tensor(list(values) if not isinstance(values, torch.Tensor) else values,
                                 dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise TypeError(f"certified_accuracy: eps must be a float or a sequence of floats, "
                        f"got {eps!r}") from err
    if values.numel() == 0 or not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"certified_accuracy: eps must be finite, non-negative and not empty, got {eps!r}")
    return values


def _batches(data, batch_size: int) -> Iterable:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"certified_accuracy: x has {x.shape[0]} inputs but y has {y.shape[0]} labels")
        return ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0], batch_size))
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError("certified_accuracy: data must be (x, y) tensors or an iterable of (x, y) batches")
    return data


def _check_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)
            and isinstance(batch[1], torch.Tensor)):
        raise TypeError("certified_accuracy: every batch must be an (x, y) pair of tensors")
    x, y = batch[0], batch[1]
    if y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"certified_accuracy: labels must be (B,) for x {tuple(x.shape)}, "
                         f"got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"certified_accuracy: labels must be integers, got {y.dtype}")
    return x, y


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _warn_if_lln_head(model: nn.Module, bound: torch.Tensor) -> None:
    from lipkern.models import LinearNormalized

    leaves = [m for m in model.modules() if not list(m.children())]
    if bound.dim() == 0 and leaves and isinstance(leaves[-1], LinearNormalized):
        warnings.warn("certified_accuracy: the model ends in a row-normalized (LLN) layer and a global L "
                      "was given: the √2·L certificate is valid only if L includes the head's spectral norm "
                      "(unit rows are not 1-Lipschitz). Prefer lln_pairwise_lipschitz and the pairwise form.",
                      UserWarning, stacklevel=3)


def _default_lipschitz(model, input_shape, pairwise: bool):
    from lipkern.bounds import lipschitz_bound  # lazy: provided by lipkern.bounds.network

    return lipschitz_bound(model, input_shape, method="liplt", pairwise=pairwise)


EVALUATIONS = ("auto", "float32", "tf32", "float64", "exact", None)


def deployed_evaluation(model: nn.Module, device: torch.device) -> str:
    """What ``evaluation="auto"`` certifies: the model's own precision on ``device``: 'float64' for a float64
    model; for float32, 'tf32' where PyTorch's settings let matmuls / convolutions use TF32 (CUDA, or mkldnn on
    a CPU), else 'float32'; bfloat16 operands and half-precision parameters are refused (not analyzed). A model
    deployed under torch.autocast runs in another precision than its parameters': not covered."""
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    dtype = torch.float32 if not dtypes else (torch.float64 if dtypes == {torch.float64} else max(
        dtypes, key=lambda d: torch.finfo(d).eps))
    if dtype == torch.float64:
        return "float64"
    if dtype != torch.float32:
        raise ValueError(f"certified_accuracy: the rounding of a {dtype} evaluation is not analyzed; pass "
                         "evaluation='exact' (the real-arithmetic network) or evaluation=None (the logits as "
                         "computed, their rounding not bounded)")
    modes = _float32_modes(device)
    if "bf16" in modes:
        raise ValueError(f"certified_accuracy: PyTorch's settings let {device.type} float32 matmuls / convolutions "
                         "use bfloat16 operands (torch.set_float32_matmul_precision('medium') or an fp32_precision "
                         "of 'bf16'), a rounding not analyzed: set torch.set_float32_matmul_precision('highest'), "
                         "or pass evaluation='exact' (the real-arithmetic network only)")
    return "tf32" if "tf32" in modes else "float32"


def _float32_modes(device: torch.device) -> set[str]:
    """The precisions PyTorch may use for float32 matmuls and convolutions on ``device``: a subset of {'ieee',
    'tf32', 'bf16'}, from the fp32_precision settings (a node's 'none' inherits its parent's) and the legacy
    switches (allow_tf32, set_float32_matmul_precision)."""
    try:
        legacy = {"highest": "ieee", "high": "tf32", "medium": "bf16"}[torch.get_float32_matmul_precision()]
    except RuntimeError:  # legacy and new APIs mixed: the new one's per-backend settings decide
        legacy = "ieee"

    def resolved(*nodes) -> str | None:
        for node in nodes:
            value = getattr(node, "fp32_precision", "none")
            if value not in ("none", None):
                return value
        return None

    backends = torch.backends
    top = getattr(backends, "fp32_precision", "none")
    if device.type == "cuda":
        modes = {resolved(backends.cuda.matmul) or (top if top != "none" else legacy),
                 resolved(getattr(backends.cudnn, "conv", None), backends.cudnn) or (top if top != "none" else None)}
        try:  # the legacy switches (reading them after the new API was used may raise)
            if backends.cuda.matmul.allow_tf32 or backends.cudnn.allow_tf32:
                modes.add("tf32")
        except RuntimeError:
            pass
    else:
        mkldnn = getattr(backends, "mkldnn", None)
        modes = {resolved(getattr(mkldnn, "matmul", None), mkldnn) or (top if top != "none" else legacy),
                 resolved(getattr(mkldnn, "conv", None), mkldnn) or (top if top != "none" else legacy)}
    return {m for m in modes if m is not None}


def certified_accuracy(model: nn.Module, data, eps, lipschitz=None, *, pairwise: bool = False,
                       input_shape: Sequence[int] | None = None, device=None, batch_size: int = 256,
                       evaluation: str | None = "auto", dtype: torch.dtype | None = None) -> CertifiedAccuracy:
    """Certified accuracy of ``model`` on ``data`` at each radius of ``eps`` from a Lipschitz certificate.

    data: (x, y) tensors (x (N, *input_shape), y (N,) int), split into batches of ``batch_size``, or an
    iterable of (x, y) batches (a DataLoader; extra items per batch are ignored). eps: a float or a sequence.
    lipschitz: a float / 0-dim tensor (global L) or a (C, C) pairwise tensor; None computes the sound bound
    ``lipkern.bounds.lipschitz_bound(model, input_shape, method="liplt", pairwise=pairwise)`` (input_shape
    defaults to the first batch's x.shape[1:]). A certificate is only as good as ``lipschitz``: it must be an
    upper bound of the Lipschitz constant of the network with the weights it applies.
    evaluation: what a radius covers (module docstring). "auto" (default): the model's own floating-point
    evaluation on ``device`` (float32; TF32 on CUDA where enabled; float64): margins come from the float64
    evaluation of the frozen weights and lose a rigorous bound of the deployed logits' rounding (any summation
    order) anywhere in the radius. "float32" / "tf32" / "float64": that evaluation. "exact": the
    real-arithmetic network (the float64 evaluation's own rounding still bounded). None: the logits as the
    model computes them, their rounding NOT bounded (any module; for black boxes). The analyzed evaluations
    need the layers :class:`lipkern.certify.rounding.RoundingAnalysis` knows (a TypeError names any other).
    A point counts at ε iff it is correctly classified and its radius (:func:`certified_radius`) is > ε. The
    model runs in eval mode under inference_mode on ``device`` (default: the model's); its training flag is
    restored. ``dtype``: deprecated (the margins always come from the float64 evaluation of the applied
    weights; ``evaluation=None`` keeps the logits as computed)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"certified_accuracy: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"certified_accuracy: batch_size must be a positive int, got {batch_size!r}")
    if dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"certified_accuracy: dtype must be None, torch.float32 or torch.float64, "
                         f"got {dtype}")
    if dtype is not None:
        warnings.warn("certified_accuracy(dtype=...) is deprecated: the margins always come from the float64 "
                      "evaluation of the weights the model applies, with its rounding bounded (see evaluation=)",
                      DeprecationWarning, stacklevel=2)
    if evaluation not in EVALUATIONS:
        raise ValueError(f"certified_accuracy: evaluation must be one of {EVALUATIONS}, got {evaluation!r}")
    eps_values = _eps_tensor(eps)
    if lipschitz is not None and pairwise and torch.as_tensor(lipschitz).dim() == 0:
        raise ValueError("certified_accuracy: pairwise=True but a scalar lipschitz was given")
    device = torch.device(device) if device is not None else _model_device(model)
    if evaluation == "auto":
        evaluation = deployed_evaluation(model, device)
    # evaluation=None runs the model itself on the device (a copy there: the user's model stays); the analyzed
    # evaluations run its frozen float64 copy
    moved = evaluation is None and device != _model_device(model)
    net = copy.deepcopy(model).to(device=device) if moved else model
    was_training = model.training, net.training
    radii, correct, rounding, slopes = [], [], [], [0.0]
    bound, analysis = None, None
    try:
        model.eval()
        net.eval()
        for batch in _batches(data, batch_size):
            x, y = _check_batch(batch)
            x = x.to(device)
            if x.shape[0] == 0:
                continue
            shape = tuple(input_shape) if input_shape is not None else tuple(x.shape[1:])
            if evaluation is None:
                with torch.inference_mode():
                    logits = net(x)
                error, slope = None, 0.0
            else:
                if analysis is None:
                    from lipkern.certify.rounding import RoundingAnalysis

                    analysis = RoundingAnalysis(model, shape, None if evaluation == "exact" else evaluation,
                                                device=device)
                with torch.inference_mode():
                    result = analysis(x)
                logits, error, slope = result.logits, result.exact + result.center, result.slope
                # an overflowing bound (huge weights or inputs) certifies nothing there: never a NaN radius
                error = torch.nan_to_num(error, nan=math.inf)
                slope = math.inf if math.isnan(slope) else slope
                rounding.append(error)
                slopes.append(slope)
            if bound is None:
                if lipschitz is None:
                    lipschitz = _default_lipschitz(model, shape, pairwise)  # eval mode (BatchNorm, spectral)
                bound = _as_lipschitz(lipschitz, logits.shape[1], device)
                _warn_if_lln_head(model, bound)
            y = y.to(device)
            if ((y < 0) | (y >= logits.shape[1])).any():
                raise ValueError(f"certified_accuracy: labels must lie in [0, {logits.shape[1]})")
            radii.append(certified_radius(logits, bound, error=error, error_slope=slope))
            correct.append(logits.argmax(dim=1) == y)
    finally:
        model.train(was_training[0])
        net.train(was_training[1])
    if not radii:
        raise ValueError("certified_accuracy: data contains no inputs")
    radii_all, correct_all = torch.cat(radii).cpu(), torch.cat(correct).cpu()
    certified = correct_all[None, :] & (radii_all[None, :] > eps_values[:, None])
    accuracy = certified.double().mean(dim=1)
    return CertifiedAccuracy(eps_values, accuracy, correct_all.double().mean().item(), radii_all, correct_all,
                             evaluation, torch.cat(rounding).cpu() if rounding else None, max(slopes))
