"""No host synchronization in a training step (DESIGN.md, performance policy); where the finite check went.

A train step (forward, backward, optimizer step) of every lipkern layer and of ConvNet / CPLNet reads no
tensor value on the host. Reads are counted two ways during the step, and both counts must be zero:
- Python-level reads: ``Tensor.item``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``tolist``,
  ``numpy``, wrapped for the duration of the step (they are seen inside custom ops too);
- ``aten._local_scalar_dense`` (what those methods dispatch, also from C++), counted by a TorchDispatchMode
  that opens lipkern's custom ops: it runs their implementation under itself, so it sees the ops inside them.
Triton launches are counted and their bodies excluded: the interpreter reads the kernel's arguments on the
host to run it on CPU, a GPU launch does not.

Launch count per layer, against an eager formulation of the same layer (forward + backward of one train step;
the optimizer step is the same for both): aten ops as the dispatch mode sees them (below autograd, so F.conv2d
is one ``convolution`` and its backward one ``convolution_backward``), excluding views and empty allocations
(no kernel), plus Triton launches; lipkern's custom ops are opened (their inner ops counted, not the op).
On a GPU each counted op is about one kernel launch.

The gpu-marked test runs the same steps on CUDA under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import collections
import importlib
import contextlib
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import lipkern.nn as L
from lipkern.models import ConvNet, CPLNet
from lipkern.ops.aol import aol_rescale_ref
from lipkern.ops.conv_power_iteration import ConvGeometry
from lipkern.ops.cpl import cpl_conv2d_ref, cpl_linear_ref

# ----------------------------------------------------------------------------------------------------------
# Counting harness.
# ----------------------------------------------------------------------------------------------------------
_READ_METHODS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
              "lift_fresh", "alias", "_local_scalar_dense"}


class _Counts:
    def __init__(self):
        self.reads: collections.Counter = collections.Counter()  # (what, where) -> count
        self.ops: collections.Counter = collections.Counter()
        self.launches: collections.Counter = collections.Counter()
        self.in_launch = 0

    @property
    def n_reads(self) -> int:
        return sum(self.reads.values())

    @property
    def n_launches(self) -> int:
        """Kernel-launching aten ops plus Triton launches."""
        return sum(self.ops.values()) + sum(self.launches.values())


def _caller() -> str:
    """The innermost lipkern (or test) frame: where a read happens."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if "/lipkern/" in name or ("/tests/" in name and "test_host_sync" not in name):
            return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "torch"


@contextlib.contextmanager
def _python_reads(counts: _Counts):
    own = {name: name in vars(torch.Tensor) for name in _READ_METHODS}
    originals = {name: getattr(torch.Tensor, name) for name in _READ_METHODS}

    def wrap(name, method):
        def wrapper(self, *args, **kwargs):
            if not counts.in_launch:
                counts.reads[(name, _caller())] += 1
            return method(self, *args, **kwargs)
        return wrapper

    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, wrap(name, method))
        yield
    finally:
        for name, method in originals.items():
            if own[name]:
                setattr(torch.Tensor, name, method)
            else:
                delattr(torch.Tensor, name)


@contextlib.contextmanager
def _triton_launches(counts: _Counts):
    from triton.runtime import interpreter, jit

    patched = []
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            counts.launches[getattr(self.fn, "__name__", repr(self.fn))] += 1
            counts.in_launch += 1
            try:
                with _disable_current_modes():
                    return _original(self, *args, **kwargs)
            finally:
                counts.in_launch -= 1

        cls.run = run
        patched.append((cls, original))
    try:
        yield
    finally:
        for cls, original in patched:
            cls.run = original


class _OpCounter(TorchDispatchMode):
    def __init__(self, counts: _Counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("lipkern::"):  # open the custom op: count what its implementation runs
            with _OpCounter(self.counts):
                return custom_ops.OPDEFS[name]._init_fn(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts.reads[("_local_scalar_dense", _caller())] += 1
        elif not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL:
            self.counts.ops[func.overloadpacket.__name__] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def counting():
    counts = _Counts()
    with _python_reads(counts), _triton_launches(counts), _OpCounter(counts):
        yield counts


# ----------------------------------------------------------------------------------------------------------
# Eager formulations of the same layers (the baselines of the launch count).
# ----------------------------------------------------------------------------------------------------------
def _unit(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t.flatten(), dim=0).view_as(t)


class _EagerConvPowerIteration(nn.Module):
    """One power-iteration step on the conv operator per training forward, written as
    torch.nn.utils.parametrizations.spectral_norm writes it for a matrix; sigma = vᵀAu, differentiable."""

    def _init_vectors(self, c_in, c_out, size):
        self.register_buffer("u", _unit(torch.randn(1, c_in, size, size)))
        self.register_buffer("v", torch.zeros(1, c_out, size, size))

    def sigma(self):
        w, p = self.weight, self.pad
        with torch.no_grad():
            self.v.copy_(_unit(F.conv2d(self.u, w, padding=p)))
            self.u.copy_(_unit(F.conv_transpose2d(self.v, w, padding=p)))
        return (self.v.clone() * F.conv2d(self.u.clone(), w, padding=p)).sum()


class _EagerSpectralConv2d(_EagerConvPowerIteration):
    def __init__(self, c_in, c_out, k, size):
        super().__init__()
        conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)
        self.weight, self.bias, self.pad = conv.weight, conv.bias, k // 2
        self._init_vectors(c_in, c_out, size)

    def forward(self, x):
        return F.conv2d(x, self.weight / self.sigma(), self.bias, padding=self.pad)


class _EagerCPLConv2d(_EagerConvPowerIteration):
    def __init__(self, c, hidden, k, size):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden, c, k, k) / (3 * k))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.pad, self.geometry = k // 2, ConvGeometry.create(size, k, padding="same")
        self._init_vectors(c, hidden, size)

    def forward(self, x):
        return cpl_conv2d_ref(x, self.weight, self.bias, 2 / self.sigma().square(), self.geometry)


class _EagerCPLLinear(nn.Module):
    def __init__(self, features, hidden):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden, features) / features ** 0.5)
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.register_buffer("u", _unit(torch.randn(features)))
        self.register_buffer("v", _unit(torch.randn(hidden)))

    def forward(self, x):
        w = self.weight
        with torch.no_grad():
            self.v.copy_(_unit(torch.mv(w, self.u)))
            self.u.copy_(_unit(torch.mv(w.T, self.v)))
        sigma = torch.dot(self.v.clone(), torch.mv(w, self.u.clone()))
        return cpl_linear_ref(x, w, self.bias, 2 / sigma.square())


class _EagerAOLLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, aol_rescale_ref(self.weight), self.bias)


class _EagerAOLConv2d(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, aol_rescale_ref(self.weight), self.bias, padding=self.padding)


def _eager_spectral_linear(features, out):
    return nn.utils.parametrizations.spectral_norm(nn.Linear(features, out))


# name: (lipkern layer, eager formulation, input shape)
LAYERS = {
    "SpectralLinear": (lambda: L.SpectralLinear(8, 6), lambda: _eager_spectral_linear(8, 6), (4, 8)),
    "SpectralConv2d": (lambda: L.SpectralConv2d(4, 6, 3, padding=1, input_size=6),
                       lambda: _EagerSpectralConv2d(4, 6, 3, 6), (2, 4, 6, 6)),
    "CPLLinear": (lambda: L.CPLLinear(8, 6), lambda: _EagerCPLLinear(8, 6), (4, 8)),
    "CPLConv2d": (lambda: L.CPLConv2d(4, 6, 3, input_size=6), lambda: _EagerCPLConv2d(4, 6, 3, 6),
                  (2, 4, 6, 6)),
    "AOLLinear": (lambda: L.AOLLinear(8, 6), lambda: _EagerAOLLinear(8, 6), (4, 8)),
    "AOLConv2d": (lambda: L.AOLConv2d(4, 6, 3, padding=1), lambda: _EagerAOLConv2d(4, 6, 3, padding=1),
                  (2, 4, 6, 6)),
}
# The models at their smallest: ConvNet needs 32×32 inputs; its AOL variant at width 4 because the interpreter
# runs AOL's kernels slowly at width 16 (the launches per layer do not depend on the width). CPLNet on 8×8.
MODELS = {
    "ConvNet-XS-cpl": (lambda: ConvNet("XS", "cpl"), (1, 3, 32, 32)),
    "ConvNet-XS-spectral": (lambda: ConvNet("XS", "spectral"), (1, 3, 32, 32)),
    "ConvNet-aol-width4": (lambda: ConvNet("XS", "aol", width=4), (1, 3, 32, 32)),
    "CPLNet-S-8x8": (lambda: CPLNet("S", image_size=8), (1, 3, 8, 8)),
}
# On the GPU, at full size.
GPU_MODELS = {
    "ConvNet-XS-aol": lambda: ConvNet("XS", "aol"),
    "ConvNet-XS-cpl": lambda: ConvNet("XS", "cpl"),
    "ConvNet-XS-spectral": lambda: ConvNet("XS", "spectral"),
    "CPLNet-S": lambda: CPLNet("S"),
}


@pytest.fixture(autouse=True)
def nan_poisoned_allocations():
    """Overrides the suite's NaN poisoning of lipkern's allocations: its fill_ would count as launches."""
    yield


def _forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    model(x).square().sum().backward()


def _train_step(model: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    _forward_backward(model, x)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # SGD: Adam keeps its step count on the CPU and reads it with .item() (a CPU read, no device sync)
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


def _describe(counts: _Counts) -> str:
    return ", ".join(f"{what} at {where} ×{n}" for (what, where), n in counts.reads.most_common())


# ----------------------------------------------------------------------------------------------------------
# Zero host reads in a train step; launches no more than the eager formulation.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_train_step_reads_nothing_on_the_host(name):
    make, _, shape = LAYERS[name]
    model, x = make().train(), torch.randn(shape)
    with counting() as counts:
        _train_step(model, x, _optimizer(model))
    assert counts.n_reads == 0, f"{name}: host reads in a train step: {_describe(counts)}"


@pytest.mark.parametrize("name", list(MODELS))
def test_model_train_step_reads_nothing_on_the_host(name):
    make, shape = MODELS[name]
    model, x = make().train(), torch.randn(shape)
    with counting() as counts:
        _train_step(model, x, _optimizer(model))
    assert counts.n_reads == 0, f"{name}: host reads in a train step: {_describe(counts)}"


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_launches_no_more_than_the_eager_formulation(name):
    make, make_eager, shape = LAYERS[name]
    x = torch.randn(shape)
    totals = {}
    for label, model in (("lipkern", make().train()), ("eager", make_eager().train())):
        _forward_backward(model, x)  # first call: lazy initialization (none expected) is not counted
        with counting() as counts:
            _forward_backward(model, x)
        totals[label] = counts
    lip, eager = totals["lipkern"], totals["eager"]
    assert lip.n_launches <= eager.n_launches, (
        f"{name}: lipkern {lip.n_launches} (aten {dict(lip.ops)}, triton {dict(lip.launches)}) > eager "
        f"{eager.n_launches} ({dict(eager.ops)})")


@pytest.mark.parametrize("name", ["ConvNet-XS-spectral", "CPLNet-S-8x8"])
def test_model_step_issues_one_stacked_power_iteration_per_geometry_group(name, monkeypatch, knobs):
    """lipkern.nn.power: after the first step (which discovers the groups), each group of layers of equal
    geometry advances its vectors in ONE conv_power_iteration / batched_power_iteration call per step."""
    knobs(backend="torch", cpu_kernels=False)  # the grouping (the GPU's form) is under test, not the kernels
    make, shape = MODELS[name]
    model, x = make().train(), torch.randn(shape)
    optimizer = _optimizer(model)
    _train_step(model, x, optimizer)
    calls = collections.Counter()
    conv_pi = importlib.import_module("lipkern.ops.conv_power_iteration")
    dense_pi = importlib.import_module("lipkern.ops.power_iteration")
    for op in (conv_pi._CONV_POWER_OP, dense_pi._POWER_OP):
        def counted(*args, _impl=op.forward, _name=op.name, **kwargs):
            calls[_name] += 1
            return _impl(*args, **kwargs)
        monkeypatch.setattr(op, "forward", counted)  # eager calls run the implementation, not the custom op

    _train_step(model, x, optimizer)
    layers = [m for m in model.modules() if hasattr(m, "_power_key")]
    groups = {m._power_key() for m in layers}
    assert sum(calls.values()) == len(groups) < len(layers), (dict(calls), len(groups), len(layers))


def test_the_harness_sees_reads_inside_custom_ops_and_triton_launches():
    """The counters are not vacuous: a read inside a custom op, a read by ``bool``, a Triton launch."""
    from lipkern._dispatch import check_finite
    from lipkern.ops import batched_power_iteration

    with counting() as counts:
        check_finite(torch.ones(3), "probe")
        batched_power_iteration(torch.randn(1, 3, 4))
        torch.ones(2).sum().item()
    kinds = {what for what, _ in counts.reads}
    assert {"__bool__", "item", "_local_scalar_dense"} <= kinds
    assert sum(counts.launches.values()) == 1 and counts.ops["sum"] == 1


# ----------------------------------------------------------------------------------------------------------
# Non-finite weights: visible in training (NaN output), a clear error where results are cached or certified.
# ----------------------------------------------------------------------------------------------------------
def _poisoned(name, value):
    make, _, shape = LAYERS[name]
    layer = make()
    with torch.no_grad():
        layer.weight.view(-1)[1] = value
    return layer, torch.randn(shape)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", list(LAYERS))
def test_non_finite_weight_in_training_gives_a_non_finite_output(name, value):
    layer, x = _poisoned(name, value)
    out = layer.train()(x)
    assert not torch.isfinite(out).all()
    out.sum().backward()  # no error either


@pytest.mark.parametrize("certified", [False, True])
@pytest.mark.parametrize("name", ["SpectralLinear", "SpectralConv2d", "CPLLinear", "CPLConv2d"])
def test_non_finite_weight_is_rejected_by_the_eval_norm_and_to_vanilla(name, certified):
    layer, x = _poisoned(name, float("nan"))
    layer.certified = certified
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.eval()(x)
    if hasattr(layer, "to_vanilla"):
        with pytest.raises(ValueError, match="NaN or Inf"):
            layer.to_vanilla()
    with torch.no_grad():  # a finite weight again: a new weight version, a fresh eval norm
        layer.weight.nan_to_num_(0.0)
    assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("name", ["AOLLinear", "AOLConv2d"])
def test_non_finite_weight_is_rejected_by_the_aol_eval_cache(name):
    layer, x = _poisoned(name, float("nan"))
    with torch.no_grad(), pytest.raises(ValueError, match="NaN or Inf"):
        layer.eval()(x)


# ----------------------------------------------------------------------------------------------------------
# GPU: the same train steps must not synchronize.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(LAYERS) + list(GPU_MODELS))
def test_train_step_does_not_synchronize_the_gpu(name):
    device = torch.device("cuda")
    if name in LAYERS:
        make, _, shape = LAYERS[name]
    else:
        make, shape = GPU_MODELS[name], (8, 3, 32, 32)
    model = make().to(device)
    x = torch.randn(shape, device=device)
    optimizer = _optimizer(model)
    _train_step(model.train(), x, optimizer)  # warm-up: Triton compiles, cuDNN chooses its algorithms
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            _train_step(model, x, optimizer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
