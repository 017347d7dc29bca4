"""Margin losses for Lipschitz-margin training: LMT, AOL's offset cross-entropy, CPL's hinge, CRM.

Every loss takes ``logits`` of shape (B, C) (floating point, C >= 2) and ``target`` of shape (B,) (int64 class
indices in [0, C)), and has ``reduction`` = 'mean' (default) | 'sum' | 'none' (a (B,) tensor). The losses that
need the network's Lipschitz constant take it as a forward argument: a 0-dim tensor L (global: ‖f(x) − f(x')‖₂
≤ L‖x − x'‖₂) or, ``pairwise=True``, a (C, C) tensor whose entry L[a, b] bounds the Lipschitz constant of the
logit difference f_a − f_b (zero diagonal; a global L gives the pairwise matrix √2·L off the diagonal).
Gradients flow into the Lipschitz tensor, so the loss also pushes the constant down (use the differentiable
estimate of ``lipkern.bounds.LipschitzEstimate`` in training, a sound bound only to certify).

No forward reads a tensor value on the host (no ``.item()``, no ``bool(tensor)``): a training step stays free
of host synchronizations. Targets out of range are reported by the indexing kernel itself (a ``ValueError`` on
the CPU, a device-side assertion on CUDA); everything that can be checked from shapes, dtypes and
hyper-parameters raises a ``ValueError`` / ``TypeError`` naming the problem before any computation.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CRMLoss", "LMTLoss", "MultiMarginHinge", "OffsetCrossEntropy"]

_REDUCTIONS = ("mean", "sum", "none")
SQRT2 = math.sqrt(2.0)


# --- validation (shapes, dtypes and Python numbers only: no tensor value is read) ---------------------------
def _check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def _check_number(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_inputs(logits: Tensor, target: Tensor, loss: str) -> None:
    if not isinstance(logits, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{loss}: logits and target must be tensors, got {type(logits).__name__} and "
                        f"{type(target).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{loss}: logits must have shape (B, C), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"{loss}: logits must be floating point, got {logits.dtype}")
    if logits.shape[1] < 2:
        raise ValueError(f"{loss}: logits need at least 2 classes, got shape {tuple(logits.shape)}")
    if target.dtype != torch.int64:
        raise TypeError(f"{loss}: target must hold int64 class indices, got {target.dtype}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"{loss}: target must have shape (B,) = ({logits.shape[0]},) to match logits of "
                         f"shape {tuple(logits.shape)}, got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"{loss}: target is on {target.device}, logits on {logits.device}")


def _check_lipschitz(lipschitz, logits: Tensor, pairwise: bool, loss: str) -> Tensor:
    """The Lipschitz argument as a tensor in the logits' dtype and device (a Python number is accepted)."""
    if isinstance(lipschitz, numbers.Real) and not isinstance(lipschitz, bool):
        lipschitz = torch.tensor(float(lipschitz))
    if not isinstance(lipschitz, Tensor):
        raise TypeError(f"{loss}: lipschitz must be a tensor (or a number), got {type(lipschitz).__name__}")
    if not lipschitz.is_floating_point():
        raise TypeError(f"{loss}: lipschitz must be floating point, got {lipschitz.dtype}")
    classes = logits.shape[1]
    if pairwise and lipschitz.shape != (classes, classes):
        raise ValueError(f"{loss}: pairwise=True needs a ({classes}, {classes}) matrix of pairwise Lipschitz "
                         f"constants, got shape {tuple(lipschitz.shape)}")
    if not pairwise and lipschitz.dim() != 0:
        raise ValueError(f"{loss}: pairwise=False needs a 0-dim (global) Lipschitz constant, got shape "
                         f"{tuple(lipschitz.shape)} (pass pairwise=True for a (C, C) matrix)")
    return lipschitz.to(device=logits.device, dtype=logits.dtype)


def _nan_if_invalid(per_sample: Tensor, lipschitz: Tensor, pairwise: bool) -> Tensor:
    """per_sample, NaN everywhere when a Lipschitz constant that enters is NaN or negative (a NaN loss shows
    it without a host read; a plain cross-entropy or a negative radius would not). The diagonal of a pairwise
    matrix never enters."""
    invalid = ~(lipschitz.detach() >= 0)
    if pairwise:
        invalid &= ~torch.eye(lipschitz.shape[0], dtype=torch.bool, device=lipschitz.device)
    return torch.where(invalid.any(), math.nan, per_sample)


def _target_logit(logits: Tensor, target: Tensor, loss: str) -> Tensor:
    """f_y, shape (B, 1). The gather checks the index range in its kernel (no host read)."""
    if logits.is_cuda:
        classes = logits.shape[1]
        torch._assert_async(((target >= 0) & (target < classes)).all(),
                            f"{loss}: target class indices must lie in [0, {classes})")
    try:
        return logits.gather(1, target[:, None])
    except RuntimeError as error:
        raise ValueError(f"{loss}: target class indices must lie in [0, {logits.shape[1]}) "
                         f"({error})") from None


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        if per_sample.numel() == 0:
            raise ValueError("logits: an empty batch has no mean loss (skip it, or use reduction='sum')")
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _one_hot(target: Tensor, logits: Tensor) -> Tensor:
    """Boolean (B, C) mask of the target class (no range check on the host, unlike F.one_hot)."""
    return torch.arange(logits.shape[1], device=logits.device) == target[:, None]


def _pairwise_rows(lipschitz: Tensor, rows: Tensor, pairwise: bool, logits: Tensor) -> Tensor:
    """(B, C) Lipschitz constants of f_{rows[i]} − f_j: L[rows[i], j] (pairwise) or √2·L (global)."""
    if pairwise:
        return lipschitz[rows]
    return (SQRT2 * lipschitz).expand_as(logits)


# --- LMT ----------------------------------------------------------------------------------------------------
class LMTLoss(nn.Module):
    r"""Lipschitz-margin training (Tsuzuku, Sato & Sugiyama, NeurIPS 2018, arXiv 1802.04034).

    Softmax cross-entropy on logits whose non-target entries are raised by the margin a certificate of radius
    ``c`` needs:

        loss_i = CE(f(x_i) + s_i, y_i),   s_ij = √2·c·L (global L)   or   c·L[y_i, j] (pairwise),   s_iy = 0.

    A point whose shifted logits are still classified correctly has margin f_y − f_j > s_j, i.e. it is
    certified at radius c. Gradients flow into the logits and into L (the Lipschitz constant is penalized).
    With L → 0 the loss is plain cross-entropy.

    ``clip=True`` reproduces what the official code does instead (ytsmiling/lmt ``src/function/last_fc.py``:
    ``Lmt`` for a global L, ``LmtFc`` for the pairwise last-layer form): the shift is multiplied by the factor
    φ_i = clamp(min_{j≠y} (f_y − f_j) / s_ij, 0, 1), so a point whose margin already exceeds s gets the full
    shift, a correctly classified point with a smaller margin gets only its own margin, and a misclassified
    point gets nothing; φ is treated as a constant in the backward pass (no gradient through it, L still gets
    φ·∂s/∂L).

    Args:
        c: the target radius (LMT's hyper-parameter; the official SVHN recipe ramps c linearly from 1e-5 to
            0.1 or 0.01 over the first 5 epochs — schedule it by setting ``loss.c``).
        pairwise: the forward's ``lipschitz`` is a (C, C) pairwise matrix instead of a 0-dim global constant.
        clip: the official code's clipped margin (see above).
        reduction: 'mean' | 'sum' | 'none'.

    Shapes: forward(logits (B, C), target (B,) int64, lipschitz 0-dim or (C, C)) -> 0-dim, or (B,) for 'none'.
    """

    def __init__(self, c: float, pairwise: bool = False, clip: bool = False, reduction: str = "mean"):
        super().__init__()
        self.c = _check_number("LMTLoss: c", c, nonnegative=True)
        self.pairwise = bool(pairwise)
        self.clip = bool(clip)
        self.reduction = _check_reduction(reduction)

    def extra_repr(self) -> str:
        return f"c={self.c}, pairwise={self.pairwise}, clip={self.clip}, reduction={self.reduction!r}"

    def forward(self, logits: Tensor, target: Tensor, lipschitz) -> Tensor:
        _check_inputs(logits, target, "LMTLoss")
        lipschitz = _check_lipschitz(lipschitz, logits, self.pairwise, "LMTLoss")
        target_logit = _target_logit(logits, target, "LMTLoss")
        is_target = _one_hot(target, logits)
        shift = self.c * _pairwise_rows(lipschitz, target, self.pairwise, logits)
        shift = shift.masked_fill(is_target, 0.0)
        if self.clip:
            shift = shift * self._official_factor(target_logit - logits, shift, is_target)
        per_sample = F.cross_entropy(logits + shift, target, reduction="none")
        return _reduce(_nan_if_invalid(per_sample, lipschitz, self.pairwise), self.reduction)

    @staticmethod
    def _official_factor(margin: Tensor, shift: Tensor, is_target: Tensor) -> Tensor:
        """φ (B, 1) of the official code, elementwise as in ``LmtFc``: 1 where the margin covers the shift, 0
        where it is negative, margin / shift in between; minimum over the classes; a constant (detached)."""
        margin, shift = margin.detach(), shift.detach()
        ones = torch.ones_like(margin)
        factor = torch.where(margin >= shift, ones, torch.where(margin < 0, ones * 0, margin / shift))
        return factor.masked_fill(is_target, 1.0).amin(dim=1, keepdim=True)


# --- AOL: offset cross-entropy ------------------------------------------------------------------------------
class OffsetCrossEntropy(nn.Module):
    r"""The offset cross-entropy of AOL (Prach & Lampert, ECCV 2022, arXiv 2208.03160), also used by SLL and
    "1-Lipschitz Layers Compared":

        loss_i = t · CE((f(x_i) − u·e_{y_i}) / t, y_i)

    with offset u subtracted from the true logit as it is (no further √2 factor inside the loss) and
    temperature t; the outer factor t keeps the gradient scale independent of t. Sources:
    berndprach/1LipschitzLayersCompared ``trainer/metrics/lipschit_ce_loss.py`` (``LipCrossEntropyLoss``:
    scatter_add of −margin at the label, CE of out / temperature, times temperature) and the SLL code
    ``core/utils.py`` (``LossXent``: outputs − offset·one_hot, / temperature, CE × temperature).

    For a network with global Lipschitz constant L = 1, a margin u corresponds to the certified radius
    u / √2, so u = √2·r targets radius r. Defaults are the AOL paper's: u = √2 (radius 1), t = 1/4; the
    paper's ablation goes from (√2/16, 1/64) to (16√2, 4). SLL uses u = 3√2/2, t = 1/4; the 1-Lip-Compared
    code passes u = 2·√2·36/255, t = 1/4.

    Shapes: forward(logits (B, C), target (B,) int64) -> 0-dim, or (B,) for reduction='none'.
    """

    def __init__(self, offset: float = SQRT2, temperature: float = 0.25, reduction: str = "mean"):
        super().__init__()
        self.offset = _check_number("OffsetCrossEntropy: offset", offset)
        self.temperature = _check_number("OffsetCrossEntropy: temperature", temperature, positive=True)
        self.reduction = _check_reduction(reduction)

    def extra_repr(self) -> str:
        return f"offset={self.offset}, temperature={self.temperature}, reduction={self.reduction!r}"

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_inputs(logits, target, "OffsetCrossEntropy")
        _target_logit(logits, target, "OffsetCrossEntropy")  # the index range check
        shifted = logits - self.offset * _one_hot(target, logits).to(logits.dtype)
        # t·CE(z/t) = t·logsumexp((z − m)/t) + m − z_y with m = max_j z_j: no overflow of z/t for small t
        top = shifted.detach().amax(dim=1, keepdim=True)
        # a temperature below the dtype's smallest normal would round to 0 in it; at that scale the loss is the
        # hinge limit max_j z_j − z_y to within t·log(C)
        t = max(self.temperature, torch.finfo(logits.dtype).tiny)
        per_sample = (t * torch.logsumexp((shifted - top) / t, dim=1)
                      + (top - shifted.gather(1, target[:, None]))[:, 0])
        return _reduce(per_sample, self.reduction)


# --- CPL: multi-margin hinge --------------------------------------------------------------------------------
class MultiMarginHinge(nn.Module):
    r"""The multi-class hinge loss CPL trains with (Meunier et al., ICML 2022, arXiv 2110.12690):

        loss_i = (1/C) · Σ_{j ≠ y_i} max(0, m − (f_{y_i}(x_i) − f_j(x_i)))^p

    i.e. ``torch.nn.functional.multi_margin_loss(logits, target, p=p, margin=m)``: note the division by the
    number of classes C (not C − 1). Source: MILES-PSL/Convex-Potential-Layer ``util.py::margin_loss``
    (``F.multi_margin_loss(y_pred, y, margin=eps, p=1)``) with ``--margin`` default 0.7 in ``main.py``; the
    1-Lip-Compared ``trainer/metrics/multi_margin_loss.py`` computes the same quantity.

    With a global L = 1 a margin m on every pair certifies the radius m / √2.

    Args:
        margin: m (CPL's default 0.7).
        p: 1 (CPL) or 2 (squared hinge).
        reduction: 'mean' | 'sum' | 'none'.
    """

    def __init__(self, margin: float = 0.7, p: int = 1, reduction: str = "mean"):
        super().__init__()
        self.margin = _check_number("MultiMarginHinge: margin", margin)
        if p not in (1, 2) or isinstance(p, bool):
            raise ValueError(f"MultiMarginHinge: p must be 1 or 2, got {p!r}")
        self.p = int(p)
        self.reduction = _check_reduction(reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, p={self.p}, reduction={self.reduction!r}"

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_inputs(logits, target, "MultiMarginHinge")
        target_logit = _target_logit(logits, target, "MultiMarginHinge")
        hinge = (self.margin - (target_logit - logits)).clamp_min(0.0)
        hinge = hinge.masked_fill(_one_hot(target, logits), 0.0)
        per_sample = hinge.pow(self.p).sum(dim=1) / logits.shape[1]
        return _reduce(per_sample, self.reduction)


# --- CRM ----------------------------------------------------------------------------------------------------
class CRMLoss(nn.Module):
    r"""Certified-radius maximization (Fazlyab, Entesari, Roy & Chellappa, NeurIPS 2023, arXiv 2310.00116).

    With ŷ_i = argmax_j f_j(x_i) the predicted class and the per-class radii

        d_ij = (f_ŷ(x_i) − f_j(x_i)) / L[ŷ_i, j]  (pairwise)   or   (f_ŷ − f_j) / (√2·L)  (global),  j ≠ ŷ_i,

    the loss (mean reduction) is

        CE(f(x), y) + λ · (1/B) · Σ_{i ∈ R} (1/t) · logsumexp_{j ≠ ŷ_i}(−t · d_ij)            ('softmax')
        CE(f(x), y) + λ · (1/B) · Σ_{i ∈ R} (1/t) · exp(−t · min_{j ≠ ŷ_i} d_ij)              ('max')

    where R holds the samples with certified radius min_j d_ij < r₀ that are correctly classified (ŷ_i = y_i;
    all of them with ``regularize_misclassified=True``). The robust term is a soft minimum of the radii, so
    minimizing it enlarges the smallest radius; samples already certified beyond r₀ are left alone. Before
    ``start_epoch`` the loss is the cross-entropy alone. B is the whole batch (the official code divides by
    ``output.shape[0]`` after selecting R). Gradients flow into the logits (through f_ŷ − f_j; ŷ and R are
    piecewise constant) and into L. L must be positive off the diagonal.

    Source: o4lc/CRM-LipLT ``Losses/CrossEntropy.py::CertifiedRadiusCrossEntropy`` (``robustLossType``
    'softMax' / 'max') and ``train.py`` (radii from the argmax class, inf at ŷ, rows of misclassified samples
    dropped unless ``--regularizeMisclassified``, robust term from ``robustStartingEpoch``). Here the
    selection is a mask (no data-dependent shapes, no host synchronization); the λ and r₀ schedules of the
    official code (``schedulerStep``) are left to the caller, who may set ``loss.lam`` and ``loss.r0`` between
    epochs.

    Defaults are the paper's CIFAR-10 recipe: t = 5 (the code's ``alpha``), λ = 15, r₀ = 0.2, start epoch 10
    (MNIST: r₀ = 2.2, λ = 30; Tiny-ImageNet: t = 12, λ = 150, r₀ = 0.2).

    Shapes: forward(logits (B, C), target (B,) int64, lipschitz 0-dim or (C, C), epoch: int) -> 0-dim, or
    (B,) (CE_i + λ·robust_i) for reduction='none'.
    """

    def __init__(self, t: float = 5.0, lam: float = 15.0, r0: float = 0.2, start_epoch: int = 10, *,
                 pairwise: bool = False, variant: str = "softmax", regularize_misclassified: bool = False,
                 reduction: str = "mean"):
        super().__init__()
        self.t = _check_number("CRMLoss: t", t, positive=True)
        self.lam = _check_number("CRMLoss: lam", lam, nonnegative=True)
        self.r0 = _check_number("CRMLoss: r0", r0, nonnegative=True)
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, numbers.Integral):
            raise TypeError(f"CRMLoss: start_epoch must be an int, got {type(start_epoch).__name__}")
        self.start_epoch = int(start_epoch)
        if variant not in ("softmax", "max"):
            raise ValueError(f"CRMLoss: variant must be 'softmax' or 'max', got {variant!r}")
        self.variant = variant
        self.pairwise = bool(pairwise)
        self.regularize_misclassified = bool(regularize_misclassified)
        self.reduction = _check_reduction(reduction)

    def extra_repr(self) -> str:
        return (f"t={self.t}, lam={self.lam}, r0={self.r0}, start_epoch={self.start_epoch}, "
                f"pairwise={self.pairwise}, variant={self.variant!r}, "
                f"regularize_misclassified={self.regularize_misclassified}, reduction={self.reduction!r}")

    def radii(self, logits: Tensor, lipschitz: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(predicted class ŷ (B,), radii d (B, C) with +inf at ŷ). ``lipschitz`` already validated. ``rows``:
        a (B,) mask; the other rows' radii are placeholders (+inf, no gradient)."""
        predicted = logits.argmax(dim=1)
        is_predicted = _one_hot(predicted, logits)
        denominator = _pairwise_rows(lipschitz, predicted, self.pairwise, logits)
        if rows is not None:
            denominator = torch.where(rows[:, None], denominator, 1.0)
            is_predicted = is_predicted | ~rows[:, None]  # masked rows: placeholders, +inf like ŷ below
        margin = logits.gather(1, predicted[:, None]) - logits
        # L = 0: f_ŷ − f_j is constant, its radius +inf (margin > 0) or 0; the division sees 1 there (and at ŷ,
        # replaced by +inf) so that no 0/0 or x/0 enters the graph (its gradient would be NaN)
        constant = denominator == 0
        radii = margin / denominator.masked_fill(constant, 1.0)
        radii = torch.where(constant, torch.where(margin > 0, math.inf, 0.0), radii)
        return predicted, radii.masked_fill(is_predicted, math.inf)

    def forward(self, logits: Tensor, target: Tensor, lipschitz, epoch: int) -> Tensor:
        _check_inputs(logits, target, "CRMLoss")
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
            raise TypeError(f"CRMLoss: epoch must be an int, got {type(epoch).__name__}")
        lipschitz = _check_lipschitz(lipschitz, logits, self.pairwise, "CRMLoss")
        _target_logit(logits, target, "CRMLoss")  # the index range check
        cross_entropy = F.cross_entropy(logits, target, reduction="none")
        if epoch < self.start_epoch:
            return _reduce(cross_entropy, self.reduction)
        with torch.no_grad():
            predicted, radii = self.radii(logits, lipschitz)
            selected = radii.amin(dim=1) < self.r0
            if not self.regularize_misclassified:
                selected = selected & (predicted == target)
        # the radii with gradients, of the selected rows only (the others divide by 1: the robust term of a
        # masked row is multiplied by 0 in the backward, and 0·inf from a tiny L would be NaN)
        _, radii = self.radii(logits, lipschitz, rows=selected)
        radius = radii.amin(dim=1)
        if self.variant == "softmax":
            robust = torch.logsumexp(-self.t * radii, dim=1) / self.t
        else:
            robust = torch.exp(-self.t * radius) / self.t
        per_sample = cross_entropy + self.lam * torch.where(selected, robust, torch.zeros_like(robust))
        return _reduce(_nan_if_invalid(per_sample, lipschitz, self.pairwise), self.reduction)
