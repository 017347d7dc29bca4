"""Property-based fuzzing of lipkern's public API: every call SUCCEEDS and keeps the package's promises, or
fails with a CLEAR error.

Classification (``_classify``). A clear error is a ValueError or TypeError (or lipkern's
BackendUnavailableError, or a NotImplementedError) whose message says what is wrong; a bare Python message
("math domain error", "float division by zero", "'<' not supported between ...") is not one. Every other
exception (ZeroDivisionError, IndexError, OverflowError, KeyError, AttributeError, AssertionError, a
RuntimeError from inside torch, ...) is a failure of the package and is re-raised as an AssertionError that
names the call. A success is checked against the promise README.md / DESIGN.md make for it:

(a) AOL layers, and Spectral / CPL layers with ``certified=True``, in eval mode: the dense Jacobian (float64)
    has spectral norm <= 1 + 1e-9, also after weight edits (``weight.data.mul_``, ``weight.data = ...``,
    ``copy_`` under no_grad, ``load_state_dict``); a ``certified`` that is not a bool (or 0/1) is refused;
(b) bounds are >= the exact dense norm (``conv2d_spectral_norm``, ``linear_spectral_norm``, ``gram_upper_bound``,
    ``lipschitz_bound(...)`` against the dense Jacobian of small Sequential models); estimates are
    <= exact * (1 + 1e-9) (float64; an estimate returned in a lower precision: up to that dtype's rounding);
(c) ``certified_radius``: finite logits only, radius >= 0, and radius * sqrt(2) * L <= margin (global L) or
    radius * L_yj <= f_y - f_j (pairwise), checked in exact rational arithmetic;
(d) losses: finite value and gradients from finite inputs and finite L >= 0 (L = 0 included) whenever the exact
    value and gradients are representable in the logits' dtype (a crude a-priori magnitude bound decides that);
(e) ops: ``aol_rescale`` (dense operator norm <= 1), ``cpl_linear`` / ``cpl_conv2d`` (1-Lipschitz for
    0 <= h <= 2/||W||^2), ``batched_power_iteration`` / ``conv_power_iteration`` (sigma <= exact * (1 + 1e-6));
(f) ``RandomizedSmoothing``: a class in range or ABSTAIN, radius >= 0 (0 on abstain); ``certified_accuracy``:
    never above the clean accuracy, non-increasing in eps.

Inputs are tiny (channels <= 4, spatial <= 6, features <= 8) with odd values (NaN, +-Inf, 0, negative, 1e30,
1e-30, subnormal), odd dtypes (float16, bfloat16, int64), odd argument types (bool, 1.9, "no", negative or
zero counts) and the meta device. The pure-PyTorch backend is forced (``knobs(backend="torch")``): the Triton
interpreter is too slow for fuzzing, and tests/ops compare the kernels against it.

Budget: each property runs its own default number of examples (derandomized: the same examples on every run;
no example database; no explain phase), about 15 s for the file on a 2-core CPU when every property holds and
under a minute while hypothesis shrinks failures. ``LIPKERN_FUZZ_EXAMPLES=N`` multiplies every property's
default by N/40 (N = 40: the defaults; N = 2000: 50x, a run of 10+ minutes), e.g.
``LIPKERN_FUZZ_EXAMPLES=2000 TRITON_INTERPRET=1 python -m pytest -q tests/test_fuzz.py``.
"""

from __future__ import annotations

import math
import os
import re
from fractions import Fraction
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, assume, given, note, settings
from hypothesis import strategies as st
from torch import nn

import lipkern
import lipkern.nn as LN
from lipkern.bounds import (conv2d_spectral_norm, gram_upper_bound, linear_spectral_norm, lipschitz_bound,
                            lipschitz_estimate)
from lipkern.certify import ABSTAIN, RandomizedSmoothing, certified_accuracy, certified_radius
from lipkern.losses import CRMLoss, LMTLoss, MultiMarginHinge, OffsetCrossEntropy
from lipkern.ops import aol_rescale, batched_power_iteration, conv_power_iteration, cpl_conv2d, cpl_linear
from tests.helpers import dense_conv2d, dense_jacobian, spectral_norm


# ----------------------------------------------------------------------------------------------------------
# Budget and settings.
# ----------------------------------------------------------------------------------------------------------
def _examples(default: int) -> int:
    """``default`` examples, or ``default * N / 40`` with ``LIPKERN_FUZZ_EXAMPLES=N`` (N = 40: the defaults)."""
    scale = os.environ.get("LIPKERN_FUZZ_EXAMPLES")
    if not scale:
        return default
    return max(1, int(scale) * default // 40)


def fuzz(default: int):
    return settings(max_examples=_examples(default), deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink])  # no (slow) explain phase


@pytest.fixture(autouse=True)
def _torch_backend(knobs):
    knobs(backend="torch")


# ----------------------------------------------------------------------------------------------------------
# Classification of outcomes.
# ----------------------------------------------------------------------------------------------------------
class Rejected(NamedTuple):
    """A clear error: the call refused its arguments with a message that says why."""

    error: BaseException


_CLEAR_TYPES = (ValueError, TypeError, lipkern.BackendUnavailableError, NotImplementedError)
# Python's own messages: they say neither which argument nor what is wrong with it.
_GENERIC = re.compile(
    r"math domain error|division by zero|modulo by zero|cannot convert float (nan|infinity) to integer"
    r"|not supported between instances|unsupported operand type|object is not (subscriptable|iterable|callable)"
    r"|not enough values to unpack|too many values to unpack|bad operand type|invalid literal for int"
    r"|could not convert string to float|can't multiply sequence|must be real number, not"
    r"|object cannot be interpreted as an integer|only integer tensors of a single element",
    re.IGNORECASE)


def _classify(call, what: str = ""):
    """Run ``call()``: its result on success, :class:`Rejected` for a clear error; anything else is a failure
    of the package, re-raised as an AssertionError naming the call (the original exception is the cause)."""
    label = what or getattr(call, "__name__", repr(call))
    try:
        return call()
    except AssertionError:
        raise  # a violated promise checked inside the call (or an assert in lipkern): a failure as it is
    except _CLEAR_TYPES as err:
        message = str(err).strip()
        if len(message) >= 10 and not _GENERIC.search(message):
            return Rejected(err)
        raise AssertionError(f"{label}: unclear {type(err).__name__}: {message!r}") from err
    except Exception as err:  # noqa: BLE001 (the classification is the point)
        raise AssertionError(f"{label}: {type(err).__name__} is not a clear error: {err}") from err


def _ok(result) -> bool:
    return not isinstance(result, Rejected)


# ----------------------------------------------------------------------------------------------------------
# Strategies.
# ----------------------------------------------------------------------------------------------------------
NAN, INF = math.nan, math.inf
FINITE_ODD = [0.0, -0.0, 1.0, -1.0, 0.5, -3.0, 1e30, -1e30, 1e-30, -1e-30, 5e-324, 1e-310, 1e300, 1e-300]
ODD = FINITE_ODD + [NAN, INF, -INF]
FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPES = FLOAT_DTYPES + [torch.int64]


def mostly(valid, odd, ratio: int = 5):
    """``valid`` ``ratio`` times out of ``ratio + 1``, else ``odd`` (shrinks towards ``valid``)."""
    return st.integers(0, ratio).flatmap(lambda i: valid if i < ratio else odd)


def odd_ints(lo: int, hi: int):
    """Ints in [lo, hi], sometimes a zero/negative int, a bool, a float or a string."""
    return mostly(st.integers(lo, hi), st.sampled_from([0, -1, True, False, 1.0, 1.9, "2", None]))


def dtypes(valid=(torch.float64,), ratio: int = 3):
    return mostly(st.sampled_from(list(valid)), st.sampled_from(DTYPES), ratio)


def seeds():
    return st.integers(0, 2**31 - 1)


def _values(shape, dtype, seed: int, scale: float, special=None, index: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if special is not None and t.numel():
        t.view(-1)[index % t.numel()] = special
    if not dtype.is_floating_point and not dtype.is_complex:
        return torch.nan_to_num(t).clamp(-100, 100).round().to(dtype)
    return t.to(dtype)


@st.composite
def tensors(draw, shape, dtype=torch.float64, finite: bool = False, scales=None):
    """A tensor of ``shape``: normal samples times an odd scale, sometimes one odd entry."""
    scale = draw(st.sampled_from(scales or ([1.0, 2.0, 0.3] + FINITE_ODD)))
    special = draw(st.one_of(st.none(), st.sampled_from(FINITE_ODD if finite else ODD)))
    return _values(shape, dtype, draw(seeds()), scale, special, draw(st.integers(0, 10**6)))


def _tolerance(dtype: torch.dtype) -> float:
    """Relative slack of an estimate returned in ``dtype`` (round to nearest): 1e-9 in float64."""
    return 1e-9 if dtype == torch.float64 else 4 * torch.finfo(dtype).eps


def _exact_norm(matrix: torch.Tensor) -> float:
    """‖M‖₂ by LAPACK's SVD in double precision, on M scaled by a power of two (2^e in two exact halves): an
    SVD of entries near 1e300 or 1e-320 overflows or loses them."""
    if matrix.numel() == 0:
        return 0.0
    m = matrix.to(torch.complex128 if matrix.is_complex() else torch.float64)
    parts = torch.view_as_real(m) if m.is_complex() else m
    largest = parts.abs().max().item()  # |re|, |im|: |z| itself may overflow
    if largest == 0 or not math.isfinite(largest):
        return largest if largest == 0 else NAN
    exponent = math.frexp(largest)[1]
    half = exponent // 2
    scaled = m * 2.0 ** -half * 2.0 ** -(exponent - half)
    return math.ldexp(torch.linalg.matrix_norm(scaled, ord=2).item(), exponent)


# ----------------------------------------------------------------------------------------------------------
# (a) Layers: eval-mode operators have norm <= 1, also after weight edits.
# ----------------------------------------------------------------------------------------------------------
PADDINGS = mostly(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2)),
                            st.sampled_from(["same", "valid"])),
                  st.sampled_from([-1, 1.9, True, "1", (1, 1, 1, 1), None]))
PADDING_MODES = mostly(st.sampled_from(["zeros", "circular"]), st.sampled_from(["reflect", "replicate", "Zeros", 0]))
CERTIFIED = mostly(st.just(True), st.sampled_from([False, "no", 1, 0, None, "yes"]), ratio=4)
DEVICES = mostly(st.none(), st.sampled_from(["meta", "cpu"]), ratio=5)


@st.composite
def layer_specs(draw):
    kind = draw(st.sampled_from(["AOLLinear", "AOLConv2d", "SpectralLinear", "SpectralConv2d", "CPLLinear",
                                 "CPLConv2d"]))
    factory = {"device": draw(DEVICES), "dtype": draw(dtypes((torch.float64, torch.float32), ratio=4))}
    knobs = {}
    if kind.startswith(("Spectral", "CPL")):
        knobs = {"certified": draw(CERTIFIED), "n_power_iterations": draw(odd_ints(1, 3))}
    bias = draw(mostly(st.booleans(), st.sampled_from(["no", None, 2])))
    if kind in ("AOLLinear", "SpectralLinear"):
        args = (draw(odd_ints(1, 6)), draw(odd_ints(1, 6)), bias)
        return kind, args, {**factory, **knobs}
    if kind == "CPLLinear":
        args = (draw(odd_ints(1, 6)), draw(st.one_of(st.none(), odd_ints(1, 6))), bias)
        return kind, args, {**factory, **knobs}
    sizes = mostly(st.one_of(st.integers(2, 6), st.tuples(st.integers(1, 6), st.integers(1, 6))),
                   st.sampled_from([0, -2, True, 2.5, (3,), "4", (0, 3)]))
    if kind == "CPLConv2d":
        args = (draw(odd_ints(1, 3)), draw(st.one_of(st.none(), odd_ints(1, 3))),
                draw(mostly(st.sampled_from([1, 3, (1, 3)]), st.sampled_from([0, 2, 1.5, True, (3, 3, 3)]))),
                draw(PADDING_MODES), bias)
        return kind, args, {**factory, **knobs, "input_size": draw(st.one_of(st.none(), sizes))}
    groups = draw(mostly(st.sampled_from([1, 1, 2]), st.sampled_from([0, -1, True, 1.5, "2"])))
    g = groups if isinstance(groups, int) and not isinstance(groups, bool) and groups > 0 else 1
    args = (g * draw(st.integers(1, 2)), g * draw(st.integers(1, 2)),
            draw(mostly(st.sampled_from([1, 2, 3, (1, 3), (3, 2)]), st.sampled_from([0, -1, True, 2.5, (2, 2, 2)]))),
            draw(mostly(st.sampled_from([1, 1, 2, (1, 2)]), st.sampled_from([0, -1, True, 1.5]))),
            draw(PADDINGS),
            draw(mostly(st.sampled_from([1, 1, 2]), st.sampled_from([0, -1, True, 1.5]))),
            groups, bias, draw(PADDING_MODES))
    kwargs = {**factory, **knobs}
    if kind == "SpectralConv2d":
        kwargs["input_size"] = draw(st.one_of(st.none(), sizes))
    return kind, args, kwargs


def _assert_valid_geometry(layer, what: str) -> None:
    """A conv layer that was built holds a geometry nn.Conv2d can run: ints, not None / str / negative."""
    pairs = {"kernel_size": 1, "stride": 1, "dilation": 1}
    for name, minimum in pairs.items():
        value = getattr(layer, name)
        assert isinstance(value, tuple) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value), (
            f"{what}: the constructor accepted {name}={value!r}")
    padding = layer.padding
    assert padding in ("same", "valid") or (isinstance(padding, tuple) and len(padding) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in padding)), (
        f"{what}: the constructor accepted padding={padding!r}")
    assert isinstance(layer.groups, int) and not isinstance(layer.groups, bool) and layer.groups >= 1, (
        f"{what}: the constructor accepted groups={layer.groups!r}")


def _conv_min_size(layer, axis: int) -> int:
    """The smallest input size for which nn.Conv2d with this layer's geometry has a non-empty output."""
    span = layer.dilation[axis] * (layer.kernel_size[axis] - 1) + 1
    if isinstance(layer.padding, str):
        pad = 0 if layer.padding == "valid" else span
        return max(1, span - pad)
    return max(1, span - 2 * layer.padding[axis], layer.padding[axis] if layer.padding_mode == "circular" else 1)


def _input_shape(layer, draw) -> tuple[int, ...]:
    if isinstance(layer, (LN.AOLLinear, LN.SpectralLinear)):
        return (layer.in_features,)
    if isinstance(layer, LN.CPLLinear):
        return (layer.features,)
    if getattr(layer, "input_size", None) is not None:
        return (layer.in_channels, *layer.input_size)
    size = [draw(st.integers(_conv_min_size(layer, a), max(6, _conv_min_size(layer, a)))) for a in range(2)]
    return (layer.in_channels, *size)


def _conv64(layer, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if layer.padding_mode == "circular":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode="circular")
        return F.conv2d(x, weight, None, layer.stride, 0, layer.dilation, layer.groups)
    return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def _effective_map(layer):
    """The eval-mode map of ``layer`` in float64 with the weight (and step size) the layer applies in its own
    dtype, read through the layer's eval path (its caches)."""
    with torch.no_grad():
        if isinstance(layer, (LN.CPLLinear, LN.CPLConv2d)):
            w, h = layer.weight.detach().double(), layer.step_size().detach().double()
            if isinstance(layer, LN.CPLLinear):
                return lambda x: LN.cpl.plain_cpl_linear(x, w, None, h)
            return lambda x: LN.cpl.plain_cpl_conv2d(x, w, None, h, layer._reversed_padding_repeated_twice,
                                                     layer.padding_mode)
        w = (layer.rescaled_weight() if isinstance(layer, (LN.AOLLinear, LN.AOLConv2d))
             else layer.normalized_weight()).detach().double()
    if w.dim() == 2:
        return lambda x: F.linear(x, w)
    return lambda x: _conv64(layer, x, w)


def _matrix(fn, shape) -> torch.Tensor:
    """The matrix of an affine map on float64 inputs of ``shape`` (its columns, under no_grad)."""
    n = math.prod(shape)
    with torch.no_grad():
        basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
        columns = fn(basis) - fn(torch.zeros(1, *shape, dtype=torch.float64))
    return columns.reshape(n, -1).T


def _norm(matrix: torch.Tensor, what: str) -> float:
    assert torch.isfinite(matrix).all(), f"{what}: the eval-mode operator of a finite weight is not finite"
    return spectral_norm(matrix)


def _layer_norm(layer, shape, seed: int) -> float:
    """The largest spectral norm of the layer's dense Jacobian (float64): of the layer itself when it is float64
    (under no_grad: the eval cache; and with autograd), and of its effective map (any dtype)."""
    gen = torch.Generator().manual_seed(seed)
    points = [torch.randn((1, *shape), generator=gen, dtype=torch.float64) * s for s in (1.0, 10.0)]
    fn = _effective_map(layer)
    name = type(layer).__name__
    if isinstance(layer, (LN.CPLLinear, LN.CPLConv2d)):  # nonlinear: Jacobians at points
        norms = [_norm(dense_jacobian(fn, points[1]), name)]
        if layer.weight.dtype == torch.float64:
            norms.append(_norm(dense_jacobian(layer, points[0]), name))
        return max(norms)
    norms = [_norm(_matrix(fn, shape), name)]
    if layer.weight.dtype == torch.float64:
        norms.append(_norm(_matrix(layer, shape), name))
        if isinstance(layer, (LN.AOLLinear, LN.AOLConv2d)):  # with autograd AOL recomputes (no cache)
            norms.append(_norm(dense_jacobian(layer, points[0]), name))
    return max(norms)


EDITS = st.tuples(st.sampled_from(["mul", "assign", "copy", "load", "entry"]),
                  st.sampled_from([3.0, -2.0, 0.0, 0.1, 1e30, 1e-30, 1e-310, 1e300, NAN, INF]), seeds())


def _edit(layer: nn.Module, how: str, scale: float, seed: int) -> None:
    w = layer.weight
    if how == "mul":
        w.data.mul_(scale)
        return
    new = _values(w.shape, w.dtype, seed, scale).to(w.device) if w.device.type != "meta" else torch.empty_like(w)
    if how == "assign":
        w.data = new
    elif how == "copy":
        with torch.no_grad():
            w.copy_(new)
    elif how == "entry":
        if w.numel():
            with torch.no_grad():
                w.view(-1)[seed % w.numel()] = torch.tensor(scale, dtype=torch.float64).to(w.dtype).to(w.device)
    else:
        state = layer.state_dict()
        state["weight"] = new
        layer.load_state_dict(state)


def _check_eval_layer(layer, shape, seed, what, check_norm: bool) -> None:
    x = torch.randn((2, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x.to(dtype=layer.weight.dtype, device=layer.weight.device)
    y = _classify(lambda: layer(x), f"{what}.forward (eval)")
    if not _ok(y):
        return
    if layer.weight.device.type == "meta":
        assert y.device.type == "meta"
        return
    assert torch.isfinite(layer.weight).all(), f"{what}: eval forward accepted a NaN/Inf weight (gave {y})"
    if not check_norm or layer.weight.numel() == 0 or math.prod(shape) == 0:
        return
    if isinstance(layer, (LN.CPLLinear, LN.CPLConv2d)) and not 1e-150 < layer.weight.abs().max().item() < 1e150:
        return  # a known limit: h = 2/σ² under/overflows float64 there and h·Aᵀσ(Ax + b) is 0·inf (NaN)
    norm = _classify(lambda: _layer_norm(layer, shape, seed), f"{what} (dense Jacobian)")
    if _ok(norm):
        assert norm <= 1 + 1e-9, f"{what}: eval-mode operator norm {norm!r} > 1"


@fuzz(120)
@given(spec=layer_specs(), edits=st.lists(EDITS, max_size=3), data=st.data())
def test_eval_layers_are_one_lipschitz_after_any_weight_edit(spec, edits, data):
    kind, args, kwargs = spec
    layer = _classify(lambda: getattr(LN, kind)(*args, **kwargs), f"{kind}{args} {kwargs}")
    if not _ok(layer):
        return
    certified = kwargs.get("certified", True)
    assert isinstance(certified, int) and certified in (0, 1) and getattr(layer, "certified", True) == certified, (
        f"{kind}: certified={certified!r} was accepted and read as {layer.certified!r}; a flag that is not a "
        "bool must be refused (bool('no') is True)")
    check = bool(layer.certified) if hasattr(layer, "certified") else True  # uncertified: an estimate
    if hasattr(layer, "kernel_size"):
        _assert_valid_geometry(layer, f"{kind}{args}")
    shape = _input_shape(layer, data.draw)
    note(f"input shape {shape}")
    layer.eval()
    _check_eval_layer(layer, shape, 0, f"{kind}{args} {kwargs}", check)
    for how, scale, seed in edits:
        if not _ok(_classify(lambda: _edit(layer, how, scale, seed), f"{kind}{args} {kwargs}: edit {how} {scale}")):
            return
        _check_eval_layer(layer, shape, seed, f"{kind}{args} {kwargs} after {how} {scale}", check)


# ----------------------------------------------------------------------------------------------------------
# (b) Bounds >= exact, estimates <= exact.
# ----------------------------------------------------------------------------------------------------------
@st.composite
def conv_cases(draw):
    """Arguments of conv2d_spectral_norm (and the conv ops): each geometry argument odd about 1 time in 11."""
    groups = draw(mostly(st.sampled_from([1, 1, 2]), st.sampled_from([0, -1, True, 1.5, "2", 3]), 10))
    g = groups if isinstance(groups, int) and not isinstance(groups, bool) and groups > 0 else 1
    out = g * draw(mostly(st.integers(1, 2), st.just(0), 10))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dtype = draw(dtypes((torch.float64, torch.float32)))
    weight = draw(tensors((out, draw(st.integers(1, 2)), kh, kw), dtype))
    if draw(st.integers(0, 15)) == 15:
        weight = weight.to("meta")
    sizes = st.tuples(st.integers(kh, 6), st.integers(kw, 6)).map(lambda t: t[0] if t[0] == t[1] else t)
    return dict(
        weight=weight,
        input_size=draw(mostly(st.one_of(sizes, st.tuples(st.integers(1, 6), st.integers(1, 6))),
                               st.sampled_from([0, -2, True, 2.5, (3,), "4", (0, 3), None]), 10)),
        stride=draw(mostly(st.sampled_from([1, 1, 2, 3, (1, 2)]), st.sampled_from([0, -1, True, 1.5, (2, 2, 2)]),
                           10)),
        padding=draw(mostly(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2)),
                                      st.sampled_from(["same", "valid"])),
                            st.sampled_from([-1, 1.9, True, "1", (1, 1, 1, 1), None]), 10)),
        dilation=draw(mostly(st.sampled_from([1, 1, 2, (2, 1)]), st.sampled_from([0, -1, True, 1.5]), 10)),
        groups=groups,
        padding_mode=draw(mostly(st.sampled_from(["zeros", "circular"]),
                                 st.sampled_from(["reflect", "replicate", "Zeros", 0]), 10)),
    )


def _oracle_conv_norm(case) -> float:
    if case["weight"].shape[0] == 0:
        return 0.0  # no output channel: the zero map (nn.Conv2d refuses to build it)
    size = case["input_size"]
    args = {k: case[k] for k in ("stride", "padding", "dilation", "groups", "padding_mode")}
    padding = args["padding"]
    if isinstance(padding, (tuple, list)) and len(padding) == 4 \
            and all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in padding):
        return _padded_conv_norm(case["weight"].double(), size, padding, args)  # lipkern's (top, bottom, left, right)
    return spectral_norm(dense_conv2d(case["weight"].double(), size, **args))


def _padded_conv_norm(weight, size, padding, args) -> float:
    """The dense operator of F.pad(x, (left, right, top, bottom), zeros or circular) followed by an unpadded
    conv2d."""
    h, w = (size, size) if isinstance(size, int) else size
    c_in = weight.shape[1] * args["groups"]
    top, bottom, left, right = padding
    eye = torch.eye(c_in * h * w, dtype=torch.float64).reshape(-1, c_in, h, w)
    mode = "circular" if args["padding_mode"] == "circular" else "constant"
    out = F.conv2d(F.pad(eye, (left, right, top, bottom), mode=mode), weight, stride=args["stride"], dilation=args["dilation"],
                   groups=args["groups"])
    return spectral_norm(out.reshape(c_in * h * w, -1).T)


def _try_oracle(case) -> float | None:
    """The oracle's norm, or None where nn.Conv2d itself refuses the geometry."""
    try:
        return _oracle_conv_norm(case)
    except Exception:  # noqa: BLE001 (torch's own refusal, not lipkern's)
        return None


@fuzz(250)
@given(case=conv_cases(), method=mostly(st.sampled_from(["upper", "auto", "power", "fft"]),
                                        st.sampled_from(["exact", None, "UPPER"])),
       options=st.fixed_dictionaries({}, optional={
           "n_iter": mostly(st.sampled_from([1, 2, 5, 50]), st.sampled_from([0, -1, True, 1.5])),
           "rtol": mostly(st.sampled_from([1e-30, 1e-8, 0.5, 10.0]), st.sampled_from([0.0, -1.0, NAN, INF, True,
                                                                                       "1e-4"]))}))
def test_conv2d_spectral_norm_upper_is_at_least_the_dense_norm(case, method, options):
    result = _classify(lambda: conv2d_spectral_norm(**case, method=method, **options), "conv2d_spectral_norm")
    if not _ok(result):
        return
    weight = case["weight"]
    assert weight.device.type != "meta", f"conv2d_spectral_norm returned {result} for a meta weight (no values)"
    assert weight.is_floating_point() and torch.isfinite(weight).all(), (
        f"conv2d_spectral_norm accepted a {weight.dtype} weight with NaN/Inf or no float values: {result}")
    exact = _try_oracle(case)
    assert exact is not None, f"conv2d_spectral_norm accepted a geometry nn.Conv2d refuses: {result}"
    if result.upper is not None:
        assert result.upper.dtype == torch.float64 and result.upper.dim() == 0
        assert result.upper.item() >= exact, f"upper {result.upper.item()!r} < exact {exact!r}"
    if result.estimate is not None:
        est = result.estimate.item()
        assert est <= exact * (1 + _tolerance(result.estimate.dtype)) + 1e-300, (
            f"estimate {est!r} > exact {exact!r} ({result.estimate.dtype})")


@fuzz(200)
@given(data=st.data(), m=mostly(st.integers(1, 8), st.just(0), 8), n=mostly(st.integers(1, 8), st.just(0), 8),
       dtype=dtypes((torch.float64, torch.float32)),
       method=mostly(st.sampled_from(["upper", "auto", "power"]), st.sampled_from(["fft", None])),
       options=st.fixed_dictionaries({}, optional={
           "n_iter": mostly(st.sampled_from([1, 2, 5, 50]), st.sampled_from([0, -1, True, 1.5])),
           "rtol": mostly(st.sampled_from([1e-30, 1e-8, 0.5, 10.0]), st.sampled_from([0.0, -1.0, NAN, INF, True]))}),
       use_u=st.sampled_from([None, None, "given", "zero", "nan", "wrong"]))
def test_linear_spectral_norm_upper_is_at_least_the_exact_norm(data, m, n, dtype, method, options, use_u):
    weight = data.draw(tensors((m, n), dtype))
    u_dtype = dtype if dtype.is_floating_point else torch.float64
    u = {None: None, "given": torch.randn(n, dtype=torch.float64).to(u_dtype), "zero": torch.zeros(n, dtype=dtype),
         "nan": torch.full((n,), NAN, dtype=u_dtype), "wrong": torch.ones(n + 1, dtype=dtype)}[use_u]
    result = _classify(lambda: linear_spectral_norm(weight, method, u=u, **options),
                       "linear_spectral_norm")
    if not _ok(result):
        return
    assert weight.is_floating_point() and torch.isfinite(weight).all(), (
        f"linear_spectral_norm accepted a {weight.dtype} weight with NaN/Inf or no float values: {result}")
    exact = _exact_norm(weight)
    assume(math.isfinite(exact))  # (NaN: LAPACK's SVD failed on it, no oracle)
    if result.upper is not None:
        assert result.upper.item() >= exact, f"upper {result.upper.item()!r} < exact {exact!r}"
    if result.estimate is not None:
        est = result.estimate.item()
        assert est <= exact * (1 + _tolerance(result.estimate.dtype)) + 1e-300, f"estimate {est!r} > exact {exact!r}"


@fuzz(200)
@given(data=st.data(), b=mostly(st.integers(1, 3), st.just(0), 8), m=mostly(st.integers(1, 6), st.just(0), 8),
       n=mostly(st.integers(1, 6), st.just(0), 8),
       dtype=dtypes((torch.float64, torch.complex128, torch.float32)),
       options=st.fixed_dictionaries({}, optional={
           "max_iter": mostly(st.sampled_from([None, 0, 1, 3, 60]), st.sampled_from([-1, True, 2.5])),
           "rtol": mostly(st.sampled_from([1e-30, 1e-8, 0.5, 10.0]), st.sampled_from([0.0, -1.0, NAN, INF, True])),
           "lower": mostly(st.sampled_from([0.0, 1.0, 1e30, 1e-300, 0.5]), st.sampled_from([-1.0, NAN, INF]))}))
def test_gram_upper_bound_is_at_least_the_exact_norm(data, b, m, n, dtype, options):
    matrices = data.draw(tensors((b, m, n), dtype if not dtype.is_complex else torch.float64))
    if dtype.is_complex:
        matrices = torch.complex(matrices, data.draw(tensors((b, m, n))))
    result = _classify(lambda: gram_upper_bound(matrices, **options),
                       "gram_upper_bound")
    if not _ok(result):
        return
    assert torch.isfinite(matrices).all(), f"gram_upper_bound accepted NaN/Inf matrices: {result}"
    assert result.shape == (b,) and result.dtype == torch.float64
    for i in range(b):
        exact = _exact_norm(matrices[i])
        if math.isfinite(exact):  # (NaN: LAPACK's SVD failed on it, no oracle)
            assert result[i].item() >= exact, f"matrix {i}: bound {result[i].item()!r} < exact {exact!r}"


# --- whole networks ------------------------------------------------------------------------------------------
def _randomize(layer: nn.Module, draw) -> None:
    scale = draw(st.sampled_from([None, 1.0, 3.0, 0.3, 0.0, 1e-3, 20.0]))
    if scale is None:
        return
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(_values(p.shape, p.dtype, draw(seeds()), scale))


@st.composite
def small_models(draw):
    d = {"dtype": torch.float64}
    layers: list[nn.Module] = []
    if draw(st.booleans()):
        c, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
        shape = (c, h, w)
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(["aol", "spectral", "cpl", "conv", "relu", "maxmin", "tanh", "leaky"]))
            if kind in ("aol", "spectral", "conv"):
                k, p = draw(st.integers(1, 3)), draw(st.integers(0, 1))
                s = draw(st.sampled_from([1, 1, 2]))
                mode = draw(st.sampled_from(["zeros", "circular"])) if kind != "conv" else "zeros"
                if k > min(h, w) + 2 * p or (mode == "circular" and 2 * p > k - 1):
                    continue
                c2 = draw(st.integers(1, 3))
                if kind == "aol":
                    layer = LN.AOLConv2d(c, c2, k, s, p, padding_mode=mode, **d)
                elif kind == "spectral":
                    layer = LN.SpectralConv2d(c, c2, k, s, p, padding_mode=mode, input_size=(h, w),
                                              certified=draw(st.booleans()), **d)
                else:
                    layer = nn.Conv2d(c, c2, k, s, p, **d)
                c, h, w = c2, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            elif kind == "cpl":
                layer = LN.CPLConv2d(c, draw(st.integers(1, 3)), input_size=(h, w),
                                     certified=draw(st.sampled_from([True, True, False])), **d)
            elif kind == "maxmin":
                if c % 2:
                    continue
                layer = LN.MaxMin()
            else:
                layer = {"relu": nn.ReLU(), "tanh": nn.Tanh(), "leaky": nn.LeakyReLU(-0.5)}[kind]
            _randomize(layer, draw)
            layers.append(layer)
        layers.append(nn.Flatten())
        n = c * h * w
    else:
        n = draw(st.integers(1, 6))
        shape = (n,)
    for last in [False] * draw(st.integers(0, 2)) + [True]:
        kind = draw(st.sampled_from(["aol", "spectral", "linear"] + ([] if last else ["cpl", "relu", "maxmin"])))
        if kind == "maxmin" and n % 2:
            continue
        n2 = draw(st.integers(2, 4)) if last else draw(st.integers(1, 6))
        layer = {"aol": lambda: LN.AOLLinear(n, n2, **d),
                 "spectral": lambda: LN.SpectralLinear(n, n2, certified=draw(st.booleans()), **d),
                 "linear": lambda: nn.Linear(n, n2, **d),
                 "cpl": lambda: LN.CPLLinear(n, n2, certified=draw(st.sampled_from([True, True, False])), **d),
                 "relu": lambda: nn.ReLU(), "maxmin": lambda: LN.MaxMin()}[kind]()
        if kind in ("aol", "spectral", "linear"):
            n = n2
        _randomize(layer, draw)
        layers.append(layer)
    return nn.Sequential(*layers).eval(), shape


@fuzz(60)
@given(model_shape=small_models(), method=mostly(st.sampled_from(["liplt", "product"]), st.just("lipLT")),
       pairwise=st.booleans(), seed=seeds())
def test_sound_lipschitz_bound_is_at_least_the_dense_jacobian_norm(model_shape, method, pairwise, seed):
    model, shape = model_shape
    note(f"model {model}, input shape {shape}")
    bound = _classify(lambda: lipschitz_bound(model, shape, method, pairwise), "lipschitz_bound")
    if not _ok(bound):
        return
    assert bound.dtype == torch.float64 and not torch.isnan(bound).any() and (bound >= 0).all(), bound
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        classes = model(torch.zeros(1, *shape, dtype=torch.float64)).shape[1]
    for scale in (1.0, 5.0):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        jac = dense_jacobian(lambda t: model(t[None])[0], x)
        if pairwise:
            assert bound.shape == (classes, classes)
            for a in range(classes):
                for b in range(classes):
                    if a != b:
                        diff = torch.linalg.vector_norm(jac[a] - jac[b]).item()
                        assert diff <= bound[a, b].item(), f"L[{a},{b}] = {bound[a, b].item()!r} < {diff!r}"
        else:
            assert bound.dim() == 0
            assert spectral_norm(jac) <= bound.item(), f"bound {bound.item()!r} < ||J|| {spectral_norm(jac)!r}"
    estimate = _classify(lambda: lipschitz_estimate(model, shape, method, pairwise, n_iter=20),
                         "lipschitz_estimate")
    if _ok(estimate):
        assert (estimate.detach() <= bound * (1 + 1e-9)).all(), (
            f"estimate {estimate.detach()} above the sound bound {bound} (documented: from below)")


# ----------------------------------------------------------------------------------------------------------
# (c) Certified radii.
# ----------------------------------------------------------------------------------------------------------
@st.composite
def lipschitz_args(draw, classes: int):
    form = draw(st.sampled_from(["float", "float", "tensor0", "matrix", "odd"]))
    if form == "float":
        return draw(st.sampled_from([1.0, 0.0, 2.5, 1e30, 1e-30, 5e-324, 1e300, -1.0, NAN, INF]))
    if form == "tensor0":
        return torch.tensor(draw(st.sampled_from([1.0, 0.0, 0.5, -2.0, NAN, INF])))
    if form == "matrix":
        c = draw(mostly(st.just(classes), st.integers(0, 4)))
        dtype = draw(dtypes((torch.float64, torch.float32)))
        m = draw(tensors((c, c), dtype, scales=[1.0, 1e-30, 1e30, 0.0])).abs()
        if m.numel() and m.is_floating_point() and draw(st.booleans()):
            m.view(-1)[draw(st.integers(0, m.numel() - 1))] = draw(st.sampled_from([0.0, NAN, INF, -1.0]))
        return m
    return draw(st.sampled_from([True, "1", None, [1.0], torch.tensor([1.0, 2.0]), torch.tensor(1)]))


def _exact(x) -> Fraction:
    return Fraction(float(x))


@fuzz(300)
@given(data=st.data(), b=st.integers(0, 4), c=mostly(st.integers(2, 5), st.integers(0, 1)),
       dtype=dtypes((torch.float64, torch.float32, torch.float16)))
def test_certified_radius_is_sound_for_finite_logits(data, b, c, dtype):
    logits = data.draw(tensors((b, c), dtype, scales=[1.0, 1e-30, 1e30, 0.0, 1e300, 5e-324]))
    if data.draw(st.booleans()) and logits.numel() and logits.is_floating_point():  # ties
        logits.view(-1)[data.draw(st.integers(0, logits.numel() - 1))] = logits.view(-1)[0]
    lipschitz = data.draw(lipschitz_args(c))
    radius = _classify(lambda: certified_radius(logits, lipschitz), "certified_radius")
    if not _ok(radius):
        return
    assert logits.is_floating_point() and torch.isfinite(logits).all(), (
        f"certified_radius accepted non-finite / non-float logits: radius {radius}")
    assert radius.shape == (b,) and radius.dtype == torch.float64
    assert not torch.isnan(radius).any() and (radius >= 0).all(), f"radius {radius}"
    # the user's value itself (a Python float is exact in float64)
    lip = torch.tensor(float(lipschitz), dtype=torch.float64) if isinstance(lipschitz, float) \
        else torch.as_tensor(lipschitz).double()
    assert not torch.isnan(lip).any() and (lip >= 0).all(), f"accepted lipschitz {lipschitz!r}"
    if lip.numel() == 1:
        lip = lip.reshape(())
    rows = logits.double().tolist()
    for i, row in enumerate(rows):
        r = radius[i].item()
        top = max(range(c), key=lambda j: (row[j], -j))
        if r == 0:
            continue
        for j in range(c):
            if j == top:
                continue
            margin = _exact(row[top]) - _exact(row[j])
            if lip.dim() == 0:
                bound = lip.item()
                if math.isinf(r):
                    assert bound == 0 and margin > 0, f"row {i}: infinite radius with L = {bound!r}"
                    continue
                assert 2 * _exact(r) ** 2 * _exact(bound) ** 2 <= margin ** 2 and margin >= 0, (
                    f"row {i}: radius {r!r} * sqrt(2) * L {bound!r} > margin {float(margin)!r}")
            else:
                pair = lip[top, j].item()
                if math.isinf(r):
                    assert pair == 0 and margin > 0, f"row {i}: infinite radius with L[{top},{j}] = {pair!r}"
                    continue
                assert _exact(r) * _exact(pair) <= margin, (
                    f"row {i}: radius {r!r} * L[{top},{j}] {pair!r} > margin {float(margin)!r}")


@fuzz(80)
@given(data=st.data(), n=st.integers(0, 5), c=st.integers(2, 4), features=st.integers(1, 4),
       eps=mostly(st.lists(st.sampled_from([0.0, 0.1, 1.0, 1e30]), min_size=1, max_size=3),
                  st.sampled_from([[], -1.0, NAN, "0.1", True, [0.1, INF]])),
       batch_size=mostly(st.integers(1, 4), st.sampled_from([0, -1, True, 2.5])),
       evaluation=mostly(st.sampled_from(["auto", "exact", "float64", "float32", None]),
                         st.sampled_from(["bf16", 3, torch.float64, "Float32"])),
       pairwise=st.booleans())
def test_certified_accuracy_is_monotone_and_at_most_clean_accuracy(data, n, c, features, eps, batch_size,
                                                                  evaluation, pairwise):
    model = nn.Sequential(LN.AOLLinear(features, c, dtype=torch.float64)).eval()
    _randomize(model[0], data.draw)
    x = data.draw(tensors((n, features), scales=[1.0, 10.0, 0.0]))
    gen = torch.Generator().manual_seed(data.draw(seeds()))
    y = data.draw(mostly(st.just(torch.randint(0, c, (n,), generator=gen)), st.sampled_from(
        [torch.full((n,), c), torch.zeros(n), torch.zeros(n + 1, dtype=torch.long)])))
    result = _classify(lambda: certified_accuracy(model, (x, y), eps, pairwise=pairwise, batch_size=batch_size,
                                                  evaluation=evaluation), "certified_accuracy")
    if not _ok(result):
        return
    acc = result.accuracy
    assert ((acc >= 0) & (acc <= result.clean_accuracy + 1e-12)).all(), result
    order = torch.argsort(result.eps)
    assert (acc[order][1:] <= acc[order][:-1] + 1e-12).all(), f"accuracy grows with eps: {result}"
    assert (result.radii >= 0).all() and not torch.isnan(result.radii).any(), result.radii


# ----------------------------------------------------------------------------------------------------------
# (d) Losses: finite values and gradients from finite inputs.
# ----------------------------------------------------------------------------------------------------------
LOSS_NUMBERS = [0.0, 1.0, 0.7, 5.0, 1e-30, 1e30, 2.0, 15.0, 0.2]
ODD_NUMBERS = [-1.0, NAN, INF, True, "1", None, 5e-324]


def _loss_modules(draw, pairwise: bool):
    hyper = lambda: draw(mostly(st.sampled_from(LOSS_NUMBERS), st.sampled_from(ODD_NUMBERS), 5))  # noqa: E731
    reduction = draw(mostly(st.sampled_from(["mean", "sum", "none"]), st.sampled_from(["avg", None])))
    kind = draw(st.sampled_from(["LMT", "Offset", "Hinge", "CRM"]))
    if kind == "LMT":
        c = hyper()
        return kind, {"c": c}, lambda: LMTLoss(c, pairwise=pairwise, clip=draw(st.booleans()), reduction=reduction)
    if kind == "Offset":
        offset, temperature = hyper(), hyper()
        return kind, {"offset": offset, "t": temperature}, lambda: OffsetCrossEntropy(offset, temperature, reduction)
    if kind == "Hinge":
        margin, p = hyper(), draw(mostly(st.sampled_from([1, 2]), st.sampled_from([0, 3, True, 1.0])))
        return kind, {"margin": margin, "p": p}, lambda: MultiMarginHinge(margin, p, reduction)
    t, lam, r0 = hyper(), hyper(), hyper()
    start = draw(mostly(st.just(0), st.sampled_from([5, -1, True, 0.0])))
    return kind, {"t": t, "lam": lam, "r0": r0}, lambda: CRMLoss(
        t, lam, r0, start, pairwise=pairwise, variant=draw(mostly(st.sampled_from(["softmax", "max"]),
                                                                   st.just("min"))),
        regularize_misclassified=draw(st.booleans()), reduction=reduction)


def _gate(kind: str, hyper: dict, logits: torch.Tensor, lip: torch.Tensor, c: int) -> float:
    """A crude a-priori bound on |loss| and |gradients| for these inputs; if it is far below the dtype's
    largest value, the exact value and gradients are representable and must come out finite."""
    big = float(logits.double().abs().max()) if logits.numel() else 0.0
    if lip.dim() == 2:
        off = lip.double()[~torch.eye(c, dtype=torch.bool)] if c > 1 else lip.double().reshape(0)
    else:
        off = lip.double().reshape(1)
    lmax = float(off.max()) if off.numel() else 0.0
    positive = off[off > 0]
    lmin = float(positive.min()) if positive.numel() else INF
    if kind == "LMT":  # the loss, and its gradient in L (c·√2 per class)
        return (big + 2 * hyper["c"] * lmax + 1) * 4 * c + 2 * hyper["c"] * c
    if kind == "Offset":
        return 2 * (big + abs(hyper["offset"])) + hyper["t"] * math.log(c) + 2
    if kind == "Hinge":
        return (abs(hyper["margin"]) + 2 * big + 1) * (abs(hyper["margin"]) + 2 * big + 1) * 4
    lam, t, r0 = hyper["lam"], hyper["t"], hyper["r0"]
    lmin = min(lmin, 1.0)
    return 2 * big + math.log(c) + 2 + lam * (math.log(c) + 1) / t + lam * (2 + r0 + 1 / t) / lmin / lmin


@fuzz(300)
@given(data=st.data(), b=mostly(st.integers(1, 4), st.just(0), 6), c=mostly(st.integers(2, 5), st.just(1), 8),
       dtype=dtypes((torch.float64, torch.float32, torch.float16, torch.bfloat16), ratio=6),
       pairwise=st.booleans(), epoch=mostly(st.just(20), st.sampled_from([0, 2.5, True])))
def test_losses_are_finite_with_finite_gradients(data, b, c, dtype, pairwise, epoch):
    kind, hyper, make = _loss_modules(data.draw, pairwise)
    loss_fn = _classify(make, f"{kind}Loss({hyper})")
    if not _ok(loss_fn):
        return
    logits = data.draw(tensors((b, c), dtype, finite=True,
                               scales=[1.0, 10.0, 0.0, 1e-30, 1e30, 5e-324, 1e4, 1e-4]))
    if not dtype.is_floating_point:  # integer logits: a clear error, nothing to differentiate
        run = _classify(lambda: loss_fn(logits, torch.zeros(b, dtype=torch.long), *(
            (torch.tensor(1.0),) if kind in ("LMT", "CRM") else ()), *((epoch,) if kind == "CRM" else ())),
            f"{kind}Loss on {dtype} logits")
        assert not _ok(run), f"{kind}Loss accepted {dtype} logits: {run}"
        return
    assume(torch.isfinite(logits).all())  # finite inputs (a cast to float16 may overflow)
    gen = torch.Generator().manual_seed(data.draw(seeds()))
    target = data.draw(mostly(st.just(torch.randint(0, c, (b,), generator=gen)),
                              st.sampled_from([torch.full((b,), c), torch.full((b,), -1), torch.zeros(b)])))
    if pairwise:
        lip = data.draw(tensors((c, c), dtype, finite=True, scales=[1.0, 0.0, 1e-30, 1e30, 5e-324, 3.0])).abs()
        lip = (lip + lip.T) / 2 if data.draw(st.booleans()) else lip
        lip.fill_diagonal_(0.0)
    else:
        lip = torch.tensor(data.draw(st.sampled_from([0.0, 1.0, 1e-30, 1e30, 5e-324, 0.5, 40.0])), dtype=dtype)
    assume(torch.isfinite(lip).all())
    logits.requires_grad_(True)
    lip.requires_grad_(True)
    what = f"{kind}Loss({hyper}, pairwise={pairwise})"

    def run():
        if kind in ("LMT", "CRM"):
            args = (logits, target, lip) + ((epoch,) if kind == "CRM" else ())
            return loss_fn(*args)
        return loss_fn(logits, target)

    value = _classify(run, what)
    if not _ok(value):
        return
    assert target.dtype == torch.int64 and ((target >= 0) & (target < c)).all(), (
        f"{what}: accepted targets {target} for {c} classes")
    assert all(isinstance(v, (int, float)) for v in hyper.values()), f"{what}: accepted a non-number"
    numbers = {k: float(v) for k, v in hyper.items()}
    try:
        gate = _gate(kind, numbers, logits.detach(), lip.detach(), c)
    except (OverflowError, ZeroDivisionError):
        gate = INF
    representable = gate * 64 < torch.finfo(dtype).max
    note(f"value {value}, gate {gate:.3g}")
    if not representable:
        return
    assert torch.isfinite(value).all(), f"{what}: non-finite loss {value} from finite inputs"
    if value.numel() == 0:
        return
    grads = torch.autograd.grad(value.sum(), [logits, lip], allow_unused=True)
    for name, grad in zip(("logits", "lipschitz"), grads):
        if grad is not None:
            assert torch.isfinite(grad).all(), f"{what}: non-finite gradient of {name}: {grad}"


# ----------------------------------------------------------------------------------------------------------
# (e) Ops.
# ----------------------------------------------------------------------------------------------------------
@fuzz(250)
@given(data=st.data(), conv=st.booleans(), dtype=dtypes((torch.float64, torch.float32), ratio=4),
       groups=mostly(st.sampled_from([1, 1, 2]), st.sampled_from([0, -1, True, 1.5, "2", 3])),
       meta=st.integers(0, 12))
def test_aol_rescale_has_operator_norm_at_most_one(data, conv, dtype, groups, meta):
    g = groups if isinstance(groups, int) and not isinstance(groups, bool) and groups > 0 else 1
    if conv:
        shape = (g * data.draw(mostly(st.integers(1, 3), st.just(0), 8)), data.draw(st.integers(1, 3)),
                 data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    else:
        shape = (data.draw(mostly(st.integers(1, 8), st.just(0), 8)), data.draw(mostly(st.integers(1, 8),
                                                                                         st.just(0), 8)))
    weight = data.draw(tensors(shape, dtype))
    if meta == 12:
        weight = weight.to("meta")
    result = _classify(lambda: aol_rescale(weight, groups), "aol_rescale")
    if not _ok(result):
        return
    assert result.shape == weight.shape and result.dtype == weight.dtype and result.device == weight.device
    if weight.device.type == "meta":
        return
    if not torch.isfinite(weight).all():
        assert not torch.isfinite(result).all(), "aol_rescale turned a NaN/Inf weight into a finite result"
        return
    assert torch.isfinite(result).all(), f"aol_rescale: non-finite result from a finite weight: {result}"
    if not conv:
        norm = _exact_norm(result)
        assert norm <= 1 + 1e-9, f"||aol_rescale(W)|| = {norm!r} > 1"
        return
    size = data.draw(st.integers(max(shape[2], shape[3]), 6))
    mode = data.draw(st.sampled_from(["zeros", "circular"]))
    pad = data.draw(st.integers(0, (min(shape[2], shape[3]) - 1) // 2 if mode == "circular" else 2))
    stride = data.draw(st.sampled_from([1, 2]))
    norm = spectral_norm(dense_conv2d(result, size, stride=stride, padding=pad, groups=g, padding_mode=mode))
    assert norm <= 1 + 1e-9, f"conv operator of aol_rescale(W) has norm {norm!r} > 1 ({size=}, {pad=}, {mode})"


def _representable(norm: float, x: torch.Tensor, b) -> bool:
    """r = Aᵀσ(Ax + b) (of size ≤ ‖A‖·(‖A‖·|x| + |b|)) and h·r (≤ 2/‖A‖² times that) fit in float64 with
    room; else the exact output is not representable (or h·r is computed as 0·inf)."""
    if not 1e-150 < norm < 1e150:
        return False  # a known limit: h = 2/‖A‖² and AᵀA g (the backward) under/overflow float64 there
    inner = norm * x.abs().max().item() + (b.abs().max().item() if b is not None and b.numel() else 0.0)
    size = norm * inner
    step = 2 * inner / norm
    return max(size, step) * x.numel() < 1e300


H_CHOICES = ["fraction", "fraction", "max", 0.0, -1.0, NAN, INF, 1e30, "tensor", "wrong"]


def _step(h_choice, norm: float, dtype, fraction: float):
    safe = 2.0 / (norm * norm) if norm * norm > 0 else 1.0  # (h <= 2/||W||^2 holds for any h when ||W||^2 = 0)
    if h_choice == "fraction":
        return safe * fraction
    if h_choice == "max":
        return safe * (1 - 1e-12)
    if h_choice == "tensor":
        return torch.tensor(safe * fraction, dtype=dtype)
    if h_choice == "wrong":
        return torch.ones(2, dtype=dtype)
    return h_choice


@fuzz(200)
@given(data=st.data(), features=mostly(st.integers(1, 6), st.just(0), 8), hidden=mostly(st.integers(1, 6),
                                                                                        st.just(0), 8),
       dtype=dtypes((torch.float64,), ratio=4), bias=st.booleans(), h_choice=st.sampled_from(H_CHOICES),
       fraction=st.sampled_from([1.0, 0.5, 0.0, 0.99]), xdims=st.sampled_from([2, 2, 1, 3, 0]))
def test_cpl_linear_is_one_lipschitz_for_safe_step_sizes(data, features, hidden, dtype, bias, h_choice,
                                                         fraction, xdims):
    weight = data.draw(tensors((hidden, features), dtype, scales=[1.0, 3.0, 0.1, 0.0, 1e-30, 1e30, 1e-310]))
    b = data.draw(tensors((hidden,), dtype)) if bias else None
    x = data.draw(tensors((2, 3, features)[-xdims:] if xdims else (), dtype, finite=True))
    norm = _exact_norm(weight) if torch.isfinite(weight).all() and weight.is_floating_point() else NAN
    h = _step(h_choice, norm, dtype, fraction)
    out = _classify(lambda: cpl_linear(x, weight, b, h), "cpl_linear")
    if not _ok(out):
        return
    assert out.shape == x.shape and out.dtype == x.dtype, f"cpl_linear: {tuple(out.shape)} for x {tuple(x.shape)}"
    safe_h = isinstance(h, float) or (isinstance(h, torch.Tensor) and h.numel() == 1)
    h_value = float(h) if safe_h else NAN
    finite = all(torch.isfinite(t).all() for t in (weight, x) + ((b,) if b is not None else ()))
    if not (finite and dtype == torch.float64 and 0 <= h_value and h_value * norm * norm <= 2 and x.dim() >= 1
            and x.numel() and weight.numel() and _representable(norm, x, b)):
        return
    assert torch.isfinite(out).all(), f"cpl_linear: non-finite output {out} from finite inputs"
    for point in (x.reshape(-1, features)[0], x.reshape(-1, features)[-1] * 3):
        jac = dense_jacobian(lambda t: cpl_linear(t, weight, b, h), point)
        n = spectral_norm(jac)
        assert n <= 1 + 1e-9, f"cpl_linear with h = {h_value!r} <= 2/||W||^2 has Jacobian norm {n!r}"


@fuzz(40)
@given(data=st.data(), case=conv_cases(), dtype=dtypes((torch.float64,), ratio=4), bias=st.booleans(),
       h_choice=st.sampled_from(H_CHOICES), fraction=st.sampled_from([1.0, 0.5, 0.99]))
def test_cpl_conv2d_is_one_lipschitz_for_safe_step_sizes(data, case, dtype, bias, h_choice, fraction):
    weight = case["weight"]
    if weight.device.type != "meta":
        weight = weight.to(dtype)
    size = case["input_size"]
    hw = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    if not (isinstance(hw, tuple) and len(hw) == 2 and all(isinstance(v, int) and v > 0 for v in hw)):
        hw = (3, 3)
    groups = case["groups"]
    g = groups if isinstance(groups, int) and not isinstance(groups, bool) and groups > 0 else 1
    x = data.draw(tensors((data.draw(st.integers(1, 2)), weight.shape[1] * g, *hw), dtype, finite=True,
                          scales=[1.0, 10.0, 0.0]))
    if weight.device.type == "meta":
        x = x.to("meta")
    b = data.draw(tensors((weight.shape[0],), dtype)) if bias else None
    if b is not None and weight.device.type == "meta":
        b = b.to("meta")
    args = {k: case[k] for k in ("stride", "padding", "dilation", "groups", "padding_mode")}
    usable = weight.device.type != "meta" and weight.is_floating_point() and bool(torch.isfinite(weight).all())
    oracle = _try_oracle({**case, "weight": weight, "input_size": hw}) if usable else None
    norm = NAN if oracle is None else oracle
    h = _step(h_choice, norm, dtype, fraction)
    if isinstance(h, torch.Tensor) and weight.device.type == "meta":
        h = h.to("meta")
    out = _classify(lambda: cpl_conv2d(x, weight, b, h, **args), "cpl_conv2d")
    if not _ok(out):
        return
    assert out.shape == x.shape and out.dtype == x.dtype, f"cpl_conv2d: {tuple(out.shape)} for x {tuple(x.shape)}"
    if weight.device.type == "meta":
        return
    assert not usable or oracle is not None, f"cpl_conv2d accepted a geometry nn.Conv2d refuses: {args}"
    h_value = float(h) if isinstance(h, float) or (isinstance(h, torch.Tensor) and h.numel() == 1) else NAN
    finite = all(torch.isfinite(t).all() for t in (weight, x) + ((b,) if b is not None else ()))
    if not (finite and dtype == torch.float64 and 0 <= h_value and h_value * norm * norm <= 2 and weight.numel()
            and _representable(norm, x, b)):
        return
    assert torch.isfinite(out).all(), "cpl_conv2d: non-finite output from finite inputs"
    jac = dense_jacobian(lambda t: cpl_conv2d(t[None], weight, b, h, **args)[0], x[0])
    n = spectral_norm(jac)
    assert n <= 1 + 1e-9, f"cpl_conv2d with h = {h_value!r} <= 2/||A||^2 has Jacobian norm {n!r}"


@fuzz(200)
@given(data=st.data(), b=mostly(st.integers(1, 3), st.just(0), 8), m=mostly(st.integers(1, 6), st.just(0), 8),
       n=mostly(st.integers(1, 6), st.just(0), 8),
       dtype=dtypes((torch.float64, torch.float32, torch.complex128, torch.complex64), ratio=4),
       n_iter=mostly(st.integers(1, 30), st.sampled_from([0, -1, True, 2.5, "3"])),
       use_u=st.sampled_from([None, None, "given", "zero", "wrong"]))
def test_batched_power_iteration_never_exceeds_the_norm(data, b, m, n, dtype, n_iter, use_u):
    real = torch.float64 if dtype in (torch.complex128, torch.float64) else torch.float32
    scales = [1.0, 3.0, 0.0, 1e-30, 1e30, 1e-20, 1e15, 5e-324]
    matrices = data.draw(tensors((b, m, n), real if dtype.is_complex else dtype, scales=scales))
    if dtype.is_complex:
        matrices = torch.complex(matrices, data.draw(tensors((b, m, n), real, scales=scales)))
    u = {None: None, "given": torch.randn(b, n, dtype=torch.float64).to(dtype), "zero": torch.zeros(b, n, dtype=dtype),
         "wrong": torch.ones(b, n + 1, dtype=dtype)}[use_u]
    result = _classify(lambda: batched_power_iteration(matrices, u, None, n_iter), "batched_power_iteration")
    if not _ok(result):
        return
    sigma = result.sigma
    assert sigma.shape == (b,) and not sigma.is_complex()
    for i in range(b):
        if not torch.isfinite(matrices[i]).all():
            assert torch.isnan(sigma[i]), f"matrix {i} with NaN/Inf got sigma {sigma[i].item()!r} (documented: NaN)"
            continue
        exact = _exact_norm(matrices[i])
        if not math.isfinite(exact):
            continue  # LAPACK's SVD failed on it (subnormal complex entries): no oracle
        if exact * exact >= torch.finfo(real).max / 4:
            continue  # documented precondition: ||M||^2 representable in the dtype
        s = sigma[i].item()
        # an estimate, exact up to rounding: relative in normal numbers, and in the subnormal range a few units of
        # the smallest subnormal per term of the sums it is formed from (absolute: a relative slack cannot hold)
        subnormal = 16 * (m + n) * torch.finfo(real).tiny * torch.finfo(real).eps
        assert s <= exact * (1 + 1e-6) + subnormal, f"matrix {i}: sigma {s!r} > exact {exact!r}"
        assert not math.isnan(s), f"matrix {i}: NaN sigma for a finite matrix"


@fuzz(60)
@given(data=st.data(), case=conv_cases(), layers=mostly(st.integers(1, 2), st.just(0), 8),
       n_iter=mostly(st.integers(1, 20), st.sampled_from([0, -1, True, 2.5])))
def test_conv_power_iteration_never_exceeds_the_norm(data, case, layers, n_iter):
    weight = case["weight"]
    size = case["input_size"]
    hw = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    if not (isinstance(hw, tuple) and len(hw) == 2 and all(isinstance(v, int) and v > 0 for v in hw)):
        hw = (3, 3)
    g = case["groups"] if isinstance(case["groups"], int) and not isinstance(case["groups"], bool) \
        and case["groups"] > 0 else 1
    weights = torch.stack([weight] * layers) if layers else weight[None][:0]
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    u = torch.randn(layers, weight.shape[1] * g, *hw, dtype=torch.float64).to(dtype=dtype, device=weight.device)
    args = {k: case[k] for k in ("stride", "padding", "dilation", "groups", "padding_mode")}
    result = _classify(lambda: conv_power_iteration(weights, u, None, n_iter, **args), "conv_power_iteration")
    if not _ok(result):
        return
    sigma = result[0]
    assert sigma.shape == (layers,)
    if weight.device.type == "meta":
        return
    if not torch.isfinite(weight).all():
        assert torch.isnan(sigma).all(), f"NaN/Inf weights gave sigma {sigma} (documented: NaN)"
        return
    exact = _try_oracle({**case, "input_size": hw})
    assert exact is not None, f"conv_power_iteration accepted a geometry nn.Conv2d refuses: {args}"
    if exact * exact >= torch.finfo(dtype).max / 4:
        return
    for i in range(layers):
        assert sigma[i].item() <= exact * (1 + 1e-6), f"sigma {sigma[i].item()!r} > exact {exact!r}"


# ----------------------------------------------------------------------------------------------------------
# (f) Randomized smoothing.
# ----------------------------------------------------------------------------------------------------------
class _Base(nn.Module):
    def __init__(self, classes: int, features: int, mode: str, seed: int):
        super().__init__()
        self.lin = nn.Linear(features, classes, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.copy_(_values(self.lin.weight.shape, torch.float64, seed, 3.0))
        self.mode, self.classes = mode, classes

    def forward(self, x):
        logits = self.lin(x.reshape(x.shape[0], -1).double())
        if self.mode == "nan":
            return logits * NAN
        if self.mode == "some-nan":
            return torch.where(logits[:, :1] > 0, logits, NAN)
        if self.mode == "constant":
            return torch.zeros_like(logits).index_fill_(1, torch.tensor([0]), 1.0)
        if self.mode == "wrong-shape":
            return logits[:, :1]
        return logits


@fuzz(100)
@given(data=st.data(), classes=mostly(st.integers(2, 4), st.sampled_from([1, 0, True, 2.5])),
       features=st.integers(1, 4),
       sigma=mostly(st.sampled_from([0.25, 1.0, 1e-30, 1e30]), st.sampled_from([0.0, -1.0, NAN, INF, True, "0.5"])),
       mode=st.sampled_from(["plain", "plain", "constant", "nan", "some-nan", "wrong-shape"]),
       n0=mostly(st.integers(1, 8), st.sampled_from([0, -1, True, 2.5])),
       n=mostly(st.integers(1, 40), st.sampled_from([0, -1, 2.5])),
       alpha=mostly(st.sampled_from([0.001, 0.1, 0.5]), st.sampled_from([0.0, 1.0, -0.1, NAN, True])),
       batch_size=mostly(st.integers(1, 16), st.sampled_from([0, -1, True, 2.5])),
       seed=mostly(st.integers(0, 10), st.sampled_from([None, -1, 2.5, "1"])))
def test_randomized_smoothing_returns_a_class_or_abstain_and_a_nonnegative_radius(
        data, classes, features, sigma, mode, n0, n, alpha, batch_size, seed):
    c = classes if isinstance(classes, int) and not isinstance(classes, bool) and classes > 0 else 2
    base = _Base(c, features, mode, data.draw(seeds()))
    smoothed = _classify(lambda: RandomizedSmoothing(base, sigma, classes), "RandomizedSmoothing")
    if not _ok(smoothed):
        return
    x = data.draw(tensors((features,), data.draw(dtypes((torch.float64, torch.float32))),
                          scales=[1.0, 0.0, 1e30, 1e-30]))
    out = _classify(lambda: smoothed.certify(x, n0, n, alpha, batch_size, seed=seed), "certify")
    if _ok(out):
        label, radius = out
        assert label == ABSTAIN or (isinstance(label, int) and 0 <= label < c), f"label {label!r}"
        assert isinstance(radius, float) and radius >= 0 and not math.isnan(radius), f"radius {radius!r}"
        if label == ABSTAIN:
            assert radius == 0.0, f"abstain with radius {radius!r}"
        assert torch.isfinite(x).all(), f"certify accepted a non-finite x: {out}"
    predicted = _classify(lambda: smoothed.predict(x, n, alpha, batch_size, seed=seed), "predict")
    if _ok(predicted):
        assert predicted == ABSTAIN or (isinstance(predicted, int) and 0 <= predicted < c), predicted
