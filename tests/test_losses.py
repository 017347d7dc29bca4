"""lipkern.losses against float64 formulas written out here (loops over samples and classes), gradients
against finite differences (gradcheck), the properties each loss is for, no host reads in forward + backward,
and the errors for bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lipkern.losses import CRMLoss, LMTLoss, MultiMarginHinge, OffsetCrossEntropy

SQRT2 = math.sqrt(2.0)
B, C = 7, 5


def _data(batch=B, classes=C, dtype=torch.float64, scale=2.0):
    logits = (scale * torch.randn(batch, classes, dtype=dtype)).requires_grad_()
    target = torch.randint(0, classes, (batch,))
    return logits, target


def _pairwise_matrix(classes=C, dtype=torch.float64):
    """A symmetric positive matrix with zero diagonal."""
    a = torch.rand(classes, classes, dtype=dtype) + 0.5
    m = (a + a.T) / 2
    return m.fill_diagonal_(0.0)


def _reduce(values, reduction):
    values = torch.stack(values)
    return {"mean": values.mean(), "sum": values.sum(), "none": values}[reduction]


# --- float64 oracles, one sample at a time ------------------------------------------------------------------
def _ce(row, y):
    return math.log(sum(math.exp(v) for v in row)) - row[y]


def lmt_oracle(logits, target, lipschitz, c, pairwise, clip, reduction):
    out = []
    for i in range(logits.shape[0]):
        f, y = logits[i].tolist(), int(target[i])
        shift = [0.0 if j == y else c * (float(lipschitz[y, j]) if pairwise else SQRT2 * float(lipschitz))
                 for j in range(len(f))]
        if clip:
            factors = []
            for j in range(len(f)):
                if j == y:
                    continue
                margin = f[y] - f[j]
                factors.append(1.0 if margin >= shift[j] else 0.0 if margin < 0 else margin / shift[j])
            factor = min(factors)
            shift = [factor * s for s in shift]
        out.append(torch.tensor(_ce([f[j] + shift[j] for j in range(len(f))], y), dtype=torch.float64))
    return _reduce(out, reduction)


def offset_ce_oracle(logits, target, offset, temperature, reduction):
    out = []
    for i in range(logits.shape[0]):
        f, y = logits[i].tolist(), int(target[i])
        shifted = [(f[j] - (offset if j == y else 0.0)) / temperature for j in range(len(f))]
        out.append(torch.tensor(temperature * _ce(shifted, y), dtype=torch.float64))
    return _reduce(out, reduction)


def hinge_oracle(logits, target, margin, p, reduction):
    out = []
    for i in range(logits.shape[0]):
        f, y = logits[i].tolist(), int(target[i])
        total = sum(max(0.0, margin - (f[y] - f[j])) ** p for j in range(len(f)) if j != y)
        out.append(torch.tensor(total / len(f), dtype=torch.float64))
    return _reduce(out, reduction)


def crm_oracle(logits, target, lipschitz, t, lam, r0, pairwise, variant, regularize_misclassified, reduction):
    out = []
    for i in range(logits.shape[0]):
        f, y = logits[i].tolist(), int(target[i])
        pred = max(range(len(f)), key=lambda j: f[j])
        radii = [(f[pred] - f[j]) / (float(lipschitz[pred, j]) if pairwise else SQRT2 * float(lipschitz))
                 for j in range(len(f)) if j != pred]
        robust = 0.0
        if min(radii) < r0 and (pred == y or regularize_misclassified):
            if variant == "softmax":
                robust = math.log(sum(math.exp(-t * d) for d in radii)) / t
            else:
                robust = math.exp(-t * min(radii)) / t
        out.append(torch.tensor(_ce(f, y) + lam * robust, dtype=torch.float64))
    return _reduce(out, reduction)


# --- values -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("pairwise", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_lmt_matches_formula(reduction, pairwise, clip):
    logits, target = _data()
    lipschitz = _pairwise_matrix() if pairwise else torch.tensor(0.7, dtype=torch.float64)
    loss = LMTLoss(0.9, pairwise=pairwise, clip=clip, reduction=reduction)(logits, target, lipschitz)
    expected = lmt_oracle(logits.detach(), target, lipschitz, 0.9, pairwise, clip, reduction)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_lmt_clip_covers_all_three_cases():
    """The clip oracle test above means something only if the 3 cases (full shift, partial, none) occur."""
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.5, 0.0, 0.2], [0.0, 3.0, 0.0]], dtype=torch.float64)
    target = torch.tensor([0, 0, 0])
    lipschitz = torch.tensor(1.0, dtype=torch.float64)
    loss = LMTLoss(1.0, clip=True, reduction="none")(logits, target, lipschitz)
    # full shift √2 for sample 0, margin 0.3 for sample 1, nothing for the misclassified sample 2
    expected = torch.stack([
        F.cross_entropy(logits[0:1] + torch.tensor([[0.0, SQRT2, SQRT2]], dtype=torch.float64), target[:1]),
        F.cross_entropy(logits[1:2] + torch.tensor([[0.0, 0.3, 0.3]], dtype=torch.float64), target[:1]),
        F.cross_entropy(logits[2:3], target[:1])])
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("offset, temperature",
                         [(SQRT2, 0.25), (SQRT2 / 16, 1 / 64), (16 * SQRT2, 4.0), (0, 1)])
def test_offset_cross_entropy_matches_formula(reduction, offset, temperature):
    logits, target = _data()
    loss = OffsetCrossEntropy(offset, temperature, reduction=reduction)(logits, target)
    expected = offset_ce_oracle(logits.detach(), target, offset, temperature, reduction)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_offset_cross_entropy_defaults_are_aol():
    loss = OffsetCrossEntropy()
    assert loss.offset == pytest.approx(SQRT2) and loss.temperature == 0.25


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin, p", [(0.7, 1), (1.5, 2), (0.0, 1)])
def test_multi_margin_hinge_matches_formula(reduction, margin, p):
    logits, target = _data(scale=0.5)
    loss = MultiMarginHinge(margin, p=p, reduction=reduction)(logits, target)
    expected = hinge_oracle(logits.detach(), target, margin, p, reduction)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert MultiMarginHinge().margin == 0.7


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("pairwise", [False, True])
@pytest.mark.parametrize("variant", ["softmax", "max"])
@pytest.mark.parametrize("regularize_misclassified", [False, True])
def test_crm_matches_formula(reduction, pairwise, variant, regularize_misclassified):
    logits, target = _data(batch=12, scale=1.0)
    lipschitz = _pairwise_matrix() if pairwise else torch.tensor(1.3, dtype=torch.float64)
    kwargs = dict(t=5.0, lam=3.0, r0=0.4)
    loss = CRMLoss(**kwargs, start_epoch=2, pairwise=pairwise, variant=variant,
                   regularize_misclassified=regularize_misclassified, reduction=reduction)
    value = loss(logits, target, lipschitz, epoch=2)
    expected = crm_oracle(logits.detach(), target, lipschitz, **kwargs, pairwise=pairwise, variant=variant,
                          regularize_misclassified=regularize_misclassified, reduction=reduction)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)


def test_crm_example_has_both_selected_and_unselected_samples():
    """The data of test_crm_matches_formula exercises the selection: some samples are regularized, some
    are not (radius above r0 or misclassified)."""
    torch.manual_seed(0)
    logits, target = _data(batch=12, scale=1.0)
    _, radii = CRMLoss(r0=0.4).radii(logits.detach(), torch.tensor(1.3, dtype=torch.float64))
    radius = radii.amin(1)
    correct = logits.argmax(1) == target
    assert (radius < 0.4).any() and (radius >= 0.4).any()
    assert correct.any() and (~correct).any()
    assert ((radius < 0.4) & ~correct).any()  # regularize_misclassified changes the value


# --- properties ---------------------------------------------------------------------------------------------
def test_lmt_with_zero_lipschitz_is_cross_entropy():
    logits, target = _data()
    for pairwise, lip in [(False, torch.tensor(0.0, dtype=torch.float64)),
                          (True, torch.zeros(C, C, dtype=torch.float64))]:
        for clip in (False, True):
            loss = LMTLoss(1.0, pairwise=pairwise, clip=clip)(logits, target, lip)
            torch.testing.assert_close(loss, F.cross_entropy(logits, target), rtol=1e-14, atol=1e-14)


def test_lmt_shifted_logits_push_for_the_certified_margin():
    """A correct point whose margin is below √2·c·L still pays a large loss and its gradient widens the margin
    and shrinks L; once its margin exceeds √2·c·L by a lot the loss is near zero."""
    lipschitz = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0])
    small = torch.tensor([[0.5, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)  # correct, margin 0.5
    loss = LMTLoss(1.0)(small, target, lipschitz)
    plain = F.cross_entropy(small.detach(), target)
    assert loss > plain + 0.5  # the shifted logits misclassify: the loss is that of a wrong prediction
    loss.backward()
    assert small.grad[0, 0] < 0 and (small.grad[0, 1:] > 0).all()  # descent raises f_y, lowers the others
    assert lipschitz.grad > 0  # descent lowers L
    large = torch.tensor([[20.0, 0.0, 0.0]], dtype=torch.float64)
    assert LMTLoss(1.0)(large, target, lipschitz.detach()) < 1e-6


def test_pairwise_sqrt2_l_equals_global():
    logits, target = _data()
    lipschitz = torch.tensor(0.8, dtype=torch.float64)
    matrix = (SQRT2 * lipschitz * (1 - torch.eye(C, dtype=torch.float64)))
    for clip in (False, True):
        torch.testing.assert_close(LMTLoss(0.5, pairwise=True, clip=clip)(logits, target, matrix),
                                   LMTLoss(0.5, clip=clip)(logits, target, lipschitz), rtol=1e-14, atol=1e-14)
    for variant in ("softmax", "max"):
        pair = CRMLoss(r0=10.0, pairwise=True, variant=variant)(logits, target, matrix, epoch=20)
        glob = CRMLoss(r0=10.0, variant=variant)(logits, target, lipschitz, epoch=20)
        torch.testing.assert_close(pair, glob, rtol=1e-14, atol=1e-14)


def test_crm_is_cross_entropy_before_start_epoch():
    logits, target = _data()
    lipschitz = torch.tensor(1.0, dtype=torch.float64)
    loss = CRMLoss(t=5.0, lam=100.0, r0=100.0, start_epoch=3)
    for epoch in (0, 2):
        torch.testing.assert_close(loss(logits, target, lipschitz, epoch), F.cross_entropy(logits, target),
                                   rtol=1e-14, atol=1e-14)
    # From start_epoch on the robust term (which may be negative: a log-sum-exp of small terms) is added.
    assert abs(loss(logits, target, lipschitz, 3) - F.cross_entropy(logits, target)) > 1e-3


def test_crm_regularizes_only_radii_below_r0():
    """Sample 0: radius 4/√2 above r0 (no term); sample 1: radius 0.1/√2 below r0 (its term is added);
    gradients of the unselected sample come from the cross-entropy alone."""
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.2, 0.0, 0.1]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 0])
    lipschitz = torch.tensor(1.0, dtype=torch.float64)
    loss = CRMLoss(t=2.0, lam=1.0, r0=1.0, start_epoch=0, reduction="none")(logits, target, lipschitz, 0)
    ce = F.cross_entropy(logits.detach(), target, reduction="none")
    radii = torch.tensor([0.2, 0.1], dtype=torch.float64) / SQRT2
    robust = torch.logsumexp(-2.0 * radii, 0) / 2.0
    torch.testing.assert_close(loss, torch.stack([ce[0], ce[1] + robust]), rtol=1e-14, atol=1e-14)
    loss[0].backward()
    ce_grad = F.softmax(logits.detach()[0], 0) - F.one_hot(target[0], 3)
    torch.testing.assert_close(logits.grad[0], ce_grad, rtol=1e-14, atol=1e-14)
    # Raising r0 above sample 0's radius (4/√2 ≈ 2.83) turns its term on.
    high = CRMLoss(t=2.0, lam=1.0, r0=3.0, start_epoch=0, reduction="none")(logits, target, lipschitz, 0)
    term = torch.logsumexp(-2.0 * torch.tensor([4.0, 4.0], dtype=torch.float64) / SQRT2, 0) / 2.0
    torch.testing.assert_close(high[0], ce[0] + term, rtol=1e-14, atol=1e-14)


def test_crm_robust_term_pushes_radius_up():
    logits = torch.tensor([[0.3, 0.0, 0.1]], dtype=torch.float64, requires_grad=True)
    lipschitz = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    loss = CRMLoss(lam=1.0, r0=1.0, start_epoch=0)
    robust = loss(logits, torch.tensor([0]), lipschitz, 0) - F.cross_entropy(logits, torch.tensor([0]))
    robust.backward()
    assert logits.grad[0, 0] < 0 and (logits.grad[0, 1:] > 0).all() and lipschitz.grad > 0


# --- gradients ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pairwise", [False, True])
def test_lmt_gradcheck(pairwise):
    logits, target = _data(batch=4)
    lipschitz = (_pairwise_matrix() if pairwise else torch.tensor(0.6, dtype=torch.float64)).requires_grad_()
    loss = LMTLoss(0.7, pairwise=pairwise)
    torch.autograd.gradcheck(lambda f, lip: loss(f, target, lip), (logits, lipschitz))


def test_lmt_clip_gradient_treats_factor_as_constant():
    """Official LMT: where the factor is 0 or 1 it is locally constant (gradcheck holds); in between the
    backward uses the factor's value without differentiating it."""
    target = torch.tensor([0, 0])
    saturated = torch.tensor([[6.0, 0.0, 1.0], [0.0, 2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    lipschitz = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda f, lip: LMTLoss(1.0, clip=True)(f, target, lip), (saturated, lipschitz))

    partial = torch.tensor([[0.4, 0.0, 0.1]], dtype=torch.float64, requires_grad=True)
    loss = LMTLoss(1.0, clip=True)(partial, target[:1], lipschitz)
    loss.backward()
    factor = 0.3 / (SQRT2 * 0.9)
    shifted = partial.detach() + factor * SQRT2 * 0.9 * torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    softmax = F.softmax(shifted[0], 0)
    torch.testing.assert_close(partial.grad[0], softmax - torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lipschitz.grad, factor * SQRT2 * (softmax[1] + softmax[2]), rtol=1e-12,
                               atol=1e-12)


def test_offset_and_hinge_gradcheck():
    logits, target = _data(batch=4, scale=0.5)
    torch.autograd.gradcheck(lambda f: OffsetCrossEntropy(0.9, 0.3)(f, target), (logits,))
    torch.autograd.gradcheck(lambda f: MultiMarginHinge(0.7, p=2)(f, target), (logits,))
    torch.autograd.gradcheck(lambda f: MultiMarginHinge(0.7, p=1)(f, target), (logits,))


@pytest.mark.parametrize("pairwise", [False, True])
@pytest.mark.parametrize("variant", ["softmax", "max"])
def test_crm_gradcheck(pairwise, variant):
    logits, target = _data(batch=6, scale=1.0)
    target = logits.detach().argmax(1)  # regularized samples (correct), some radii below r0
    target[0] = (target[0] + 1) % C  # one misclassified
    lipschitz = (_pairwise_matrix() if pairwise else torch.tensor(1.1, dtype=torch.float64)).requires_grad_()
    loss = CRMLoss(t=3.0, lam=2.0, r0=0.8, start_epoch=0, pairwise=pairwise, variant=variant)
    torch.autograd.gradcheck(lambda f, lip: loss(f, target, lip, 0), (logits, lipschitz))


# --- no host reads ------------------------------------------------------------------------------------------
class _CountHostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make, needs_lipschitz", [
    (lambda: LMTLoss(0.5), "global"), (lambda: LMTLoss(0.5, pairwise=True, clip=True), "pairwise"),
    (lambda: LMTLoss(0.5, clip=True), "global"), (lambda: OffsetCrossEntropy(), None),
    (lambda: MultiMarginHinge(), None), (lambda: CRMLoss(start_epoch=0), "global"),
    (lambda: CRMLoss(start_epoch=0, pairwise=True, variant="max", regularize_misclassified=True),
     "pairwise")])
def test_no_host_read_in_forward_and_backward(make, needs_lipschitz):
    logits, target = _data(dtype=torch.float32)
    args = (logits, target)
    if needs_lipschitz == "global":
        args += (torch.tensor(0.9, requires_grad=True),)
    elif needs_lipschitz == "pairwise":
        args += (_pairwise_matrix(dtype=torch.float32).requires_grad_(),)
    loss_fn = make()
    extra = (0,) if isinstance(loss_fn, CRMLoss) else ()
    with _CountHostReads() as counter:
        loss_fn(*args, *extra).backward()
    assert counter.reads == 0
    with _CountHostReads() as sanity:  # the counter does see a read
        logits.sum().item()
    assert sanity.reads == 1


# --- bad input ----------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    logits, target = _data()
    lip = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape \(B, C\)"):
        OffsetCrossEntropy()(logits[0], target)
    with pytest.raises(ValueError, match="at least 2 classes"):
        MultiMarginHinge()(logits[:, :1], target.clamp(max=0))
    with pytest.raises(TypeError, match="int64"):
        OffsetCrossEntropy()(logits, target.int())
    with pytest.raises(TypeError, match="floating point"):
        OffsetCrossEntropy()(logits.detach().long(), target)
    with pytest.raises(ValueError, match=r"target must have shape \(B,\)"):
        MultiMarginHinge()(logits, target[:-1])
    for bad in (C, -1):
        with pytest.raises(ValueError, match=rf"in \[0, {C}\)"):
            LMTLoss(1.0)(logits, torch.full((B,), bad), lip)
        with pytest.raises(ValueError, match=rf"in \[0, {C}\)"):
            OffsetCrossEntropy()(logits, torch.full((B,), bad))
        with pytest.raises(ValueError, match=rf"in \[0, {C}\)"):
            CRMLoss()(logits, torch.full((B,), bad), lip, 20)
    with pytest.raises(ValueError, match="pairwise=True needs"):
        LMTLoss(1.0, pairwise=True)(logits, target, lip)
    with pytest.raises(ValueError, match="0-dim"):
        LMTLoss(1.0)(logits, target, torch.ones(C, C, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(5, 5\) matrix"):
        CRMLoss(pairwise=True)(logits, target, torch.ones(C + 1, C + 1), 20)
    with pytest.raises(TypeError, match="epoch must be an int"):
        CRMLoss()(logits, target, lip, 1.5)
    with pytest.raises(ValueError, match="reduction"):
        LMTLoss(1.0, reduction="average")
    with pytest.raises(ValueError, match="c must be >= 0"):
        LMTLoss(-1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        OffsetCrossEntropy(temperature=0.0)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        MultiMarginHinge(p=3)
    with pytest.raises(ValueError, match="t must be > 0"):
        CRMLoss(t=0)
    with pytest.raises(ValueError, match="variant"):
        CRMLoss(variant="hard")
    with pytest.raises(TypeError, match="real number"):
        CRMLoss(lam="15")
    with pytest.raises(ValueError, match="finite"):
        CRMLoss(r0=math.inf)
