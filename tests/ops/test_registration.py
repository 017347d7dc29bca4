"""One registration path (lipkern/ops/_registration.py) and one settings object (lipkern._dispatch.Config):
every op is built by ``define_op``; settings are read once and followed by compiled graphs; second derivatives
through the compile path; mutated arguments copied back; backend choices (and refusals) through _dispatch."""

import importlib
import os

import pytest
import torch

from lipkern import _cpu_kernels, _dispatch
from lipkern._dispatch import BackendUnavailableError, Config, configure, implementations, reload_config
from lipkern.ops._registration import Op
from lipkern.ops.aol import aol_rescale, aol_rescale_ref
from lipkern.ops.cpl import cpl_conv2d, cpl_conv2d_ref, cpl_linear
from lipkern.ops.power_iteration import batched_power_iteration

aol_module = importlib.import_module("lipkern.ops.aol")
cpl_module = importlib.import_module("lipkern.ops.cpl")
dense_pi = importlib.import_module("lipkern.ops.power_iteration")
conv_pi = importlib.import_module("lipkern.ops.conv_power_iteration")
OPS = (aol_module._AOL_OP, cpl_module._CPL_LINEAR, cpl_module._CPL_CONV2D, dense_pi._POWER_OP,
       conv_pi._CONV_POWER_OP)


def test_every_op_is_one_description():
    """Each custom op in the lipkern namespace comes from an Op (its forward op, and its backward op)."""
    registered = {op.custom_op._qualname for op in OPS} | {op.backward_op._qualname for op in OPS if op.differentiable}
    assert registered == {"lipkern::aol_rescale", "lipkern::aol_rescale_backward", "lipkern::cpl_linear",
                          "lipkern::cpl_linear_backward", "lipkern::cpl_conv2d", "lipkern::cpl_conv2d_backward",
                          "lipkern::batched_power_iteration", "lipkern::conv_power_iteration"}
    assert all(isinstance(op, Op) for op in OPS)


# --- settings ------------------------------------------------------------------------------------------------
def test_config_from_env_parses_and_validates():
    cfg = Config.from_env({"LIPKERN_BACKEND": " Torch ", "LIPKERN_AOL_GRAM": "FP64", "LIPKERN_CHECK_FINITE": "0",
                           "TRITON_INTERPRET": "1", "ONEDNN_DEFAULT_FPMATH_MODE": "BF16"})
    assert cfg == Config(backend="torch", aol_gram="fp64", check_finite=False, triton_interpret=True,
                         onednn_fpmath="bf16")
    assert Config.from_env({"LIPKERN_BACKEND": "auto"}).backend is None
    with pytest.raises(BackendUnavailableError, match="must be one of"):
        Config.from_env({"LIPKERN_BACKEND": "fast"})
    with pytest.raises(ValueError, match="LIPKERN_AOL_GRAM"):
        Config.from_env({"LIPKERN_AOL_GRAM": "fp16"})


def test_environment_is_read_once_and_reloaded_on_request(monkeypatch):
    before = _dispatch.config()
    monkeypatch.setattr(_dispatch, "_CONFIG", before)
    monkeypatch.setenv("LIPKERN_AOL_GRAM", "fp64" if before.aol_gram != "fp64" else "fp32")
    assert _dispatch.config() == before  # a change of os.environ alone is not seen
    assert reload_config().aol_gram == os.environ["LIPKERN_AOL_GRAM"]
    monkeypatch.setenv("LIPKERN_BACKEND", "nonsense")
    with pytest.raises(BackendUnavailableError, match="nonsense"):
        reload_config()
    assert _dispatch.config().aol_gram == os.environ["LIPKERN_AOL_GRAM"]  # the settings as they were
    monkeypatch.setattr(_dispatch, "_CONFIG", _dispatch._initial_config())  # as at import: reported at use
    with pytest.raises(BackendUnavailableError, match="nonsense"):
        aol_rescale(torch.randn(3, 3))


def test_configure_restores_the_previous_settings():
    before = _dispatch.config()
    with configure(aol_gram="fp64", backend="torch") as cfg:
        assert cfg.aol_gram == "fp64" and _dispatch.config() is cfg
        with configure(aol_gram="fp32"):
            assert _dispatch.config().aol_gram == "fp32" and _dispatch.config().backend == "torch"
        assert _dispatch.config().aol_gram == "fp64"
    assert _dispatch.config() == before


def test_compiled_graph_follows_a_later_settings_change(knobs):
    """The knobs are read where the op runs (inside the custom op), not frozen into the compiled graph."""
    knobs(backend="torch")
    w = torch.randn(16, 8, 3, 3)
    compiled = torch.compile(lambda w: aol_rescale(w), fullgraph=True, backend="aot_eager")
    ran = {}
    for scheme in ("fp64", "fp32", "fp64"):
        knobs(aol_gram=scheme)
        implementations(clear=True)
        out = compiled(w)
        ran[scheme] = implementations()["aol_rescale"]
        with configure(aol_gram=scheme):
            torch.testing.assert_close(out, aol_rescale(w), rtol=0, atol=0)
    form = "cpp" if _cpu_kernels.available() else "torch-gemm"  # the C++ CPU kernel, where built
    assert ran == {"fp64": f"{form}/fp64", "fp32": f"{form}/fp32"}, ran


# --- derivatives through every path --------------------------------------------------------------------------
def _hessian_vector(f, w, v, g):
    """d/dw ⟨∂⟨f(w), g⟩/∂w, v⟩ by double backward."""
    w = w.detach().requires_grad_()
    (grad,) = torch.autograd.grad((f(w) * g).sum(), w, create_graph=True)
    (hv,) = torch.autograd.grad((grad * v).sum(), w)
    return hv


@pytest.mark.parametrize("path", ["eager", "custom-op"])
def test_aol_second_derivative_matches_the_reference(path):
    """Eager, and through the custom op (the compile / export boundary, called in eager mode: torch.compile
    itself has no double backward)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64)
    g, v = torch.randn(w.shape, generator=gen, dtype=torch.float64), torch.randn(w.shape, generator=gen,
                                                                                   dtype=torch.float64)
    op = aol_rescale if path == "eager" else (lambda w: aol_module._AOL_OP.custom_op(w, 1)[0])
    got = _hessian_vector(op, w, v, g)
    expected = _hessian_vector(aol_rescale_ref, w, v, g)
    # the proven margin scales d by (1 − m) with m ~ 1e-13 in float64: far below this tolerance
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path", ["eager", "custom-op"])
def test_cpl_conv_second_derivative_matches_the_reference(path):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    b, h = torch.randn(4, generator=gen, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    g, v = torch.randn(x.shape, generator=gen, dtype=torch.float64), torch.randn(w.shape, generator=gen,
                                                                                   dtype=torch.float64)
    def op(x, w, b, h, padding):
        if path == "eager":
            return cpl_conv2d(x, w, b, h, padding=padding)
        g = conv_pi.ConvGeometry.create(tuple(x.shape[-2:]), tuple(w.shape[-2:]), 1, padding)
        return cpl_module._CPL_CONV2D.custom_op(*cpl_module._conv_op_args(x, w, b, h, g))[0]


    def mixed(f):  # ∂/∂W of ⟨∂⟨z, g⟩/∂x, V⟩ with V = v's leading block reshaped to x (a mixed second derivative)
        wr = w.clone().requires_grad_()
        xr = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad((f(xr, wr, b, h, padding=1) * g).sum(), xr, create_graph=True)
        (gw,) = torch.autograd.grad((gx * x.flip(0)).sum(), wr)
        return gw

    ref = mixed(lambda x, w, b, h, padding: cpl_conv2d_ref(x, w, b, h, conv_pi.ConvGeometry.create(
        tuple(x.shape[-2:]), tuple(w.shape[-2:]), 1, padding)))
    torch.testing.assert_close(mixed(op), ref, rtol=1e-10, atol=1e-10)


def test_no_gradient_asked_means_no_autograd_node():
    w = torch.randn(8, 4, requires_grad=True)
    with torch.no_grad():
        assert aol_rescale(w).grad_fn is None
    x = torch.randn(3, 4)
    assert cpl_linear(x, w.detach(), None, 0.1).grad_fn is None
    assert cpl_linear(x, w, None, 0.1).grad_fn is not None


def test_autocast_does_not_reach_inside_the_ops():
    """AOL's guarantee rests on its own precision: under bf16 autocast the result is the float32 one."""
    w = torch.randn(16, 8, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = aol_rescale(w)
        m = torch.randn(3, 6, 5)
        sigma = batched_power_iteration(m, n_iter=4).sigma
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, aol_rescale(w), rtol=0, atol=0)
    torch.testing.assert_close(sigma, batched_power_iteration(m, n_iter=4).sigma, rtol=0, atol=0)


# --- mutated arguments ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_vectors_are_updated_in_place(knobs, backend):
    if backend == "triton" and not _dispatch.triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 on a CPU")
    knobs(backend=backend)
    gen = torch.Generator().manual_seed(2)
    m = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    u_store = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    v_store = torch.zeros(5, 3, dtype=torch.float64)
    u, v = u_store.T, v_store.T  # (3, 7) and (3, 5) views with strides (1, 3): not contiguous
    u_plain, v_plain = u.clone(), v.clone()
    sigma = batched_power_iteration(m, u, v, n_iter=3).sigma
    expected = batched_power_iteration(m, u_plain, v_plain, n_iter=3).sigma
    torch.testing.assert_close(sigma, expected, rtol=0, atol=0)
    torch.testing.assert_close(u_store.T, u_plain, rtol=0, atol=0)  # written through the views
    torch.testing.assert_close(v_store.T, v_plain, rtol=0, atol=0)
    dense = torch.linalg.matrix_norm(m, 2)
    assert torch.all(sigma <= dense * (1 + 1e-12))


# --- backend choices through _dispatch -----------------------------------------------------------------------
def test_a_forced_backend_that_cannot_take_the_call_says_why(knobs):
    if not _dispatch.triton_importable():
        pytest.skip("triton is not installed")
    knobs(backend="triton", triton_interpret=True)
    with pytest.raises(BackendUnavailableError, match="wider than"):
        batched_power_iteration(torch.randn(1, 2, dense_pi._TRITON_MAX_COLS + 1))
    with pytest.raises(BackendUnavailableError, match="bfloat16"):
        cpl_linear(torch.randn(2, 4, dtype=torch.bfloat16), torch.randn(3, 4, dtype=torch.bfloat16), None, 0.1)
    knobs(backend=None)  # auto: the op's refusal sends the call to the torch path
    implementations(clear=True)
    batched_power_iteration(torch.randn(1, 2, dense_pi._TRITON_MAX_COLS + 1))
    assert not implementations()["batched_power_iteration"].startswith("triton")  # torch/... or cpp
