"""The suite's one tolerance helper and its dense-operator oracles."""

from __future__ import annotations

import torch

# Absolute/relative tolerance of a result computed in `dtype` against a float64 reference.
_TOLERANCES = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-5)}


def assert_close(actual: torch.Tensor, reference: torch.Tensor, *, dtype: torch.dtype | None = None,
                 same_dtype_torch: torch.Tensor | None = None, msg: str = "") -> None:
    """float64/float32: elementwise against the float64 reference. float16/bfloat16: the error to the float64
    reference may be at most twice that of PyTorch computing the same thing in the same dtype
    (``same_dtype_torch``), plus one unit of that dtype's rounding."""
    dtype = dtype or actual.dtype
    actual64, reference64 = actual.double(), reference.double()
    assert not torch.isnan(actual64).any(), f"{msg}: NaN in result (an element left unwritten?)"
    if dtype in _TOLERANCES:
        atol, rtol = _TOLERANCES[dtype]
        torch.testing.assert_close(actual64, reference64, atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}")
        return
    assert same_dtype_torch is not None, "low-precision comparisons need PyTorch's own result in that dtype"
    ours = (actual64 - reference64).abs().max().item()
    theirs = (same_dtype_torch.double() - reference64).abs().max().item()
    unit = torch.finfo(dtype).eps * reference64.abs().max().item()
    assert ours <= 2 * theirs + unit, f"{msg}: max error {ours:.3g} > 2 x PyTorch's {theirs:.3g} + {unit:.3g}"


def dense_jacobian(fn, example: torch.Tensor) -> torch.Tensor:
    """The explicit (numel(out), numel(in)) matrix of a linear(ised) map at `example`, in float64."""
    jac = torch.autograd.functional.jacobian(fn, example.double())
    out_numel = jac.numel() // example.numel()
    return jac.reshape(out_numel, example.numel())


def spectral_norm(matrix: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(matrix.double(), ord=2).item()
