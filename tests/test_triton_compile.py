"""Every Triton kernel compiles for a real GPU target (sm_90), not only under the interpreter: the interpreter
runs Python semantics and accepts code the compiler rejects (e.g. a value first defined inside a loop and used
after it). Compiling needs no GPU, but it must happen in a process where TRITON_INTERPRET is unset (the
interpreter patches triton.language at import), so the test runs this file as a script."""

import inspect
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

POINTER_DTYPES = {"sign_ptr": "*i8"}  # every other pointer takes the kernel's float dtype


def _cases():
    from lipkern.ops import aol, cpl, power_iteration

    return [
        (power_iteration._power_iteration_kernel, dict(IS_COMPLEX=False, BLOCK_ROWS=16, BLOCK_COLS=16)),
        (power_iteration._power_iteration_kernel, dict(IS_COMPLEX=True, BLOCK_ROWS=16, BLOCK_COLS=32)),
        (aol._aol_fwd_kernel, dict(KH=3, KW=3, BLOCK_C=16, BLOCK_O=16, USE_DOT=True)),
        (aol._aol_fwd_kernel, dict(KH=3, KW=2, BLOCK_C=16, BLOCK_O=16, USE_DOT=False)),
        (aol._aol_scale_kernel, dict(KK=9, BLOCK_C=16, BLOCK_K=16)),
        (aol._aol_bwd_kernel, dict(KH=3, KW=3, BLOCK_O=16, BLOCK_C=16, USE_DOT=True)),
        (aol._aol_bwd_kernel, dict(KH=1, KW=3, BLOCK_O=16, BLOCK_C=16, USE_DOT=False)),
        (cpl._bias_relu_kernel, dict(HAS_BIAS=True, BLOCK=1024)),
        (cpl._residual_kernel, dict(BLOCK=1024)),
        (cpl._backward_elementwise_kernel, dict(HAS_BIAS=True, BLOCK=1024)),
    ]


def _signature(kernel, constexprs: dict, dtype: str) -> dict:
    names = inspect.signature(kernel.fn).parameters
    return {name: "constexpr" if name in constexprs else
            POINTER_DTYPES.get(name, f"*{dtype}") if name.endswith("_ptr") else "i32" for name in names}


def compile_all() -> list[str]:
    """Compile every (kernel, constexprs, dtype); return the failures."""
    import triton
    from triton.backends.compiler import GPUTarget

    failures = []
    for kernel, constexprs in _cases():
        for dtype in ("fp32", "fp64"):
            if dtype == "fp64" and constexprs.get("USE_DOT"):
                continue  # tl.dot paths are float32 only (float64 uses the broadcast-sum path)
            source = triton.compiler.ASTSource(fn=kernel, signature=_signature(kernel, constexprs, dtype),
                                               constexprs=constexprs)
            try:
                compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
                assert compiled.asm.get("ptx"), "no PTX"
            except Exception as error:  # noqa: BLE001 - report every kernel, not just the first
                failures.append(f"{kernel.fn.__name__} {constexprs} {dtype}: {type(error).__name__}: "
                                f"{str(error)[-400:]}")
    return failures


def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", "import sys; from tests.test_triton_compile import compile_all; "
                           "f = compile_all(); print('\\n'.join(f)); sys.exit(1 if f else 0)"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
