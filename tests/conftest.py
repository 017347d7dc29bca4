import os
import sys

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter (set before triton is imported).
# With a GPU it stays unset, so the gpu-marked tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_POISON_INT = {torch.int8: 127, torch.int16: 32767, torch.int32: 2**31 - 1, torch.int64: 2**63 - 1}


def _poisoned(factory):
    """Wrap an allocator so that tensors allocated from inside lipkern start as NaN (or an invalid int),
    making any output element a kernel forgets to write fail the test."""

    def wrapper(*args, **kwargs):
        t = factory(*args, **kwargs)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("lipkern") and t.numel():
            if t.is_floating_point() or t.is_complex():
                t.fill_(float("nan"))
            elif t.dtype in _POISON_INT:
                t.fill_(_POISON_INT[t.dtype])
        return t

    return wrapper


@pytest.fixture(autouse=True)
def nan_poisoned_allocations(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))
    yield


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> torch.device:
    """Run a test on the CPU (Triton interpreter) and, gpu-marked, on CUDA tensors (the compiled kernels)."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def knobs(monkeypatch):
    """Change lipkern's settings (``lipkern._dispatch.Config`` fields) for one test: ``knobs(backend="torch")``;
    restored after it. (lipkern reads the environment once, at import.)"""
    import dataclasses

    from lipkern import _dispatch

    def change(**changes):
        monkeypatch.setattr(_dispatch, "_CONFIG", dataclasses.replace(_dispatch.config(), **changes))

    return change
