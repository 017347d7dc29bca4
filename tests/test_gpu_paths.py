"""What the Triton interpreter hides (bf16 and TF32 tensor-core math, races, out-of-bounds reads, the compiled
kernels themselves): the CPL Triton passes, the Triton batched power iteration and the Spectral / CPL / AOL
layers on a real GPU, against float64 references on the CPU. All gpu-marked: skipped without a CUDA device,
run by ``benchmarks/gpu_session.sh``."""

import copy
import contextlib

import pytest
import torch

import lipkern
from lipkern.ops import batched_power_iteration, cpl_conv2d, cpl_linear
from lipkern.ops.conv_power_iteration import ConvGeometry
from lipkern.ops.cpl import cpl_conv2d_ref, cpl_linear_ref
from lipkern.ops.power_iteration import batched_power_iteration_ref, initial_vectors
from tests.helpers import assert_close

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@contextlib.contextmanager
def tf32(enabled: bool):
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _cpl_case(kind: str, dtype=torch.float64):
    """(op, reference, inputs) of one CPL case: x, W, b, h (h ≈ 1/‖W‖² so the residual is not negligible)."""
    g = torch.Generator().manual_seed(3)
    if kind == "linear":
        x, w = torch.randn(33, 70, generator=g, dtype=dtype), torch.randn(50, 70, generator=g, dtype=dtype) / 10
        return cpl_linear, cpl_linear_ref, (x, w, torch.randn(50, generator=g, dtype=dtype), torch.tensor(0.8))
    x, w = torch.randn(3, 6, 9, 11, generator=g, dtype=dtype), torch.randn(5, 6, 3, 3, generator=g, dtype=dtype) / 6
    geometry = ConvGeometry.create((9, 11), (3, 3), 1, 1, 1, 1, "zeros")

    def op(x, w, b, h):
        return cpl_conv2d(x, w, b, h, padding=1)

    def ref(x, w, b, h):
        return cpl_conv2d_ref(x, w, b, h, geometry)

    return op, ref, (x, w, torch.randn(5, generator=g, dtype=dtype), torch.tensor(0.8))


def _forward_backward(fn, inputs, grad):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, grad.to(out.dtype)))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cpl_ops_match_float64_reference_without_tf32(kind):
    op, ref, inputs = _cpl_case(kind)
    grad = torch.randn_like(inputs[0])
    want = _forward_backward(ref, inputs, grad)
    with tf32(False):
        got = _forward_backward(op, [t.to(CUDA, torch.float32) for t in inputs], grad.to(CUDA))
    for name, g, w in zip(("out", "x", "W", "b", "h"), got, want):
        assert_close(g.cpu(), w, dtype=torch.float32, msg=name)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cpl_ops_with_tf32_no_worse_than_twice_pytorch(kind):
    """With TF32 convolutions and GEMMs (what training may use), the op errs from float64 at most twice as much
    as PyTorch's own formula under the same settings."""
    op, ref, inputs = _cpl_case(kind)
    grad = torch.randn_like(inputs[0])
    want = _forward_backward(ref, inputs, grad)
    cuda_inputs = [t.to(CUDA, torch.float32) for t in inputs]
    with tf32(True):
        got = _forward_backward(op, cuda_inputs, grad.to(CUDA))
        theirs = _forward_backward(ref, cuda_inputs, grad.to(CUDA))
    for name, g, t, w in zip(("out", "x", "W", "b", "h"), got, theirs, want):
        ours_err = (g.cpu().double() - w).abs().max().item()
        their_err = (t.cpu().double() - w).abs().max().item()
        assert ours_err <= 2 * their_err + 1e-6 * w.abs().max().item(), (name, ours_err, their_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cpl_ops_in_half_precision_no_worse_than_twice_pytorch(kind, dtype):
    op, ref, inputs = _cpl_case(kind)
    grad = torch.randn_like(inputs[0])
    want = _forward_backward(ref, inputs, grad)
    low = [t.to(CUDA, dtype) for t in inputs[:3]] + [inputs[3].to(CUDA, dtype)]
    got = _forward_backward(op, low, grad.to(CUDA))
    theirs = _forward_backward(ref, low, grad.to(CUDA))
    for name, g, t, w in zip(("out", "x", "W", "b", "h"), got, theirs, want):
        assert_close(g.cpu(), w, dtype=dtype, same_dtype_torch=t.cpu(), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64], ids=str)
@pytest.mark.parametrize("shape", [(3, 100, 70), (2, 1, 513), (5, 33, 1)], ids=lambda s: "x".join(map(str, s)))
def test_triton_batched_power_iteration_matches_float64_reference(monkeypatch, dtype, shape, knobs):
    knobs(backend="triton")
    batch, rows, cols = shape
    m = torch.randn(shape, dtype=dtype)
    u0 = initial_vectors((batch, cols), dtype, "cpu")
    sigma, u, v = batched_power_iteration(m.to(CUDA), u0.clone().to(CUDA), n_iter=7)
    wide = torch.complex128 if dtype.is_complex else torch.float64
    ref = batched_power_iteration_ref(m.to(wide), u0.to(wide), 7)
    assert_close(sigma.cpu(), ref.sigma, dtype=torch.float32, msg="sigma")
    as_real = (lambda t: torch.view_as_real(t.to(torch.complex128))) if dtype.is_complex else (lambda t: t)
    assert_close(as_real(u.cpu()), as_real(ref.u), dtype=torch.float32, msg="u")
    assert_close(as_real(v.cpu()), as_real(ref.v), dtype=torch.float32, msg="v")


LAYERS = {
    "spectral-conv": lambda: lipkern.nn.SpectralConv2d(4, 6, 3, padding=1, input_size=8),
    "cpl-conv": lambda: lipkern.nn.CPLConv2d(4, input_size=8),
    "aol-conv": lambda: lipkern.nn.AOLConv2d(4, 6, 3, padding=1),
    "spectral-linear": lambda: lipkern.nn.SpectralLinear(16, 8),
    "cpl-linear": lambda: lipkern.nn.CPLLinear(16),
    "aol-linear": lambda: lipkern.nn.AOLLinear(16, 8),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_train_step_on_cuda_match_float64_on_the_cpu(name):
    """Two training forwards (the power iteration advances between them) and a backward of each layer on the
    GPU in float32 (TF32 off) against the same layer in float64 on the CPU: outputs and weight gradients."""
    torch.manual_seed(0)
    reference = LAYERS[name]().double()
    with torch.no_grad():  # away from the identity initialization, so the constraint does something
        reference.weight.add_(0.3 * torch.randn_like(reference.weight))
    layer = copy.deepcopy(reference).float().to(CUDA)
    x = torch.randn(3, *((4, 8, 8) if "conv" in name else (16,)), dtype=torch.float64)
    with tf32(False):
        for _ in range(2):
            want = reference(x)
            got = layer(x.float().to(CUDA))
            assert_close(got.cpu(), want.detach(), dtype=torch.float32, msg=f"{name} forward")
        (want.square().sum()).backward()
        (got.square().sum()).backward()
    assert_close(layer.weight.grad.cpu(), reference.weight.grad, dtype=torch.float32, msg=f"{name} weight grad")
