"""The suite's one tolerance helper and its dense-operator oracles."""

from __future__ import annotations

import math
import socket

import pytest
import torch

from lipkern import _cpu_kernels

# Absolute/relative tolerance of a result computed in `dtype` against a float64 reference.
# Parametrize CPU-path tests over the C++ kernels of lipkern._cpu (where built) and the PyTorch path they
# replace: knobs(cpu_kernels=...) with one of these.
CPU_KERNELS = [pytest.param(True, id="cpp", marks=pytest.mark.skipif(_cpu_kernels._cpu is None,
                                                                      reason="lipkern._cpu is not built")),
               pytest.param(False, id="torch")]

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


def dense_conv2d(weight: torch.Tensor, input_size, **conv_args) -> torch.Tensor:
    """The explicit float64 matrix of ``nn.Conv2d(**conv_args)`` with this weight on (in, H, W) inputs, built
    by PyTorch's own conv on the identity basis (independent of lipkern's operator code)."""
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    groups = conv_args.get("groups", 1)
    c_in = weight.shape[1] * groups
    conv = torch.nn.Conv2d(c_in, weight.shape[0], tuple(weight.shape[-2:]), bias=False, dtype=torch.float64,
                           **conv_args)
    with torch.no_grad():
        conv.weight.copy_(weight.double())
        eye = torch.eye(c_in * h * w, dtype=torch.float64).reshape(-1, c_in, h, w)
        return conv(eye).reshape(c_in * h * w, -1).T


def pgd_flips(model, x: torch.Tensor, radius: torch.Tensor, steps: int = 25,
              restarts: int = 3) -> torch.Tensor:
    """Tiny ℓ₂ PGD with random restarts (the attack of the soundness tests): True where some δ with
    ‖δ‖ ≤ radius (per row of x, any input shape) changes the model's prediction."""
    with torch.no_grad():
        label = model(x).argmax(1)
    flipped = torch.zeros(len(x), dtype=torch.bool)
    r = radius.to(x.dtype).clamp_max(1e3).reshape(-1, *([1] * (x.dim() - 1)))

    def norm(t):
        return t.flatten(1).norm(dim=1).reshape(r.shape).clamp_min(1e-30)

    for restart in range(restarts):
        generator = torch.Generator().manual_seed(restart)
        delta = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        delta = delta / norm(delta) * r * torch.rand(r.shape, generator=generator, dtype=x.dtype)
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            others = logits.scatter(1, label[:, None], -math.inf)
            loss = (others.max(1).values - logits.gather(1, label[:, None])[:, 0]).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = delta + 0.25 * r * grad / norm(grad)
                delta = delta * (r / norm(delta)).clamp_max(1.0)
        with torch.no_grad():
            flipped |= model(x + delta).argmax(1) != label
    return flipped


class ChannelScale(torch.nn.Module):
    """x ↦ s ⊙ x per channel (dim 1): a linear layer lipkern has no rule for (registry tests)."""

    def __init__(self, scale, dtype=torch.float64):
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(scale, dtype=dtype))

    def forward(self, x):
        return x * self.scale.reshape(-1, *([1] * (x.dim() - 2)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for the gloo rendezvous of the DDP tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
