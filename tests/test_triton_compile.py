"""Every Triton kernel compiles for a real GPU target (sm_90), not only under the interpreter: the interpreter
runs Python semantics and accepts code the compiler rejects (e.g. a value first defined inside a loop and used
after it). Compiling needs no GPU, but it must happen in a process where TRITON_INTERPRET is unset (the
interpreter patches triton.language at import), so the test runs this file as a script.

The AOL kernels are also compiled at every tile the launchers pick on a GPU, with their number of warps, and
must not spill registers: `cuobjdump -res-usage` (bundled with Triton) reads the stack frame of the cubin."""

import inspect
import os
import re
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("triton")

POINTER_DTYPES = {"sign_ptr": "*i8"}  # every other pointer takes the kernel's float dtype
FLOAT64_POINTERS = {"col_abs_ptr", "row_abs_ptr", "partial_ptr", "slack_ptr", "dot_ptr"}  # float64 sums
FLOAT_SCALARS = {"EPS_REL", "EPS_ABS_BASE", "D_MARGIN"}


def _cases():
    import importlib

    from lipkern.ops import aol, cpl, power_iteration

    conv_pi = importlib.import_module("lipkern.ops.conv_power_iteration")  # the package exports its function

    return [
        (power_iteration._power_iteration_kernel, dict(IS_COMPLEX=False, BLOCK_ROWS=16, BLOCK_COLS=16)),
        (power_iteration._power_iteration_kernel, dict(IS_COMPLEX=True, BLOCK_ROWS=16, BLOCK_COLS=32)),
        (aol._aol_prep_kernel, dict(KK=9, BLOCK_O=4, BLOCK_C=64, BLOCK_K=16)),
        (aol._aol_gram_kernel, dict(KH=3, KW=2, BLOCK_C=16, BLOCK_O=16, TF32X3=False, EPS_ABS_POWER=10)),
        (aol._aol_scale_kernel, dict(KK=9, BLOCK_C=16, BLOCK_K=16)),
        (aol._aol_grad_dot_kernel, dict(KK=9, BLOCK_O=16, BLOCK_C=32, BLOCK_K=16)),
        (aol._aol_coefficient_kernel, dict(KH=1, KW=3, BLOCK=16, HAS_GRAD_SCALE=True)),
        (aol._aol_bwd_kernel, dict(KH=1, KW=3, BLOCK_O=16, BLOCK_C=16, BLOCK_J=32, USE_TF32=False)),
        (conv_pi._unit_kernel, dict(KEEP_WHEN_ZERO=True, STORE_NORM=True, BLOCK=1024)),
        (power_iteration._power_split_rows_kernel, dict(BLOCK_ROWS=16, BLOCK_COLS=64)),
        (power_iteration._power_split_reduce_kernel, dict(SCALE_V=True, BLOCK_P=16, BLOCK_COLS=64, BLOCK_V=64)),
        (cpl._bias_relu_kernel, dict(HAS_BIAS=True, BLOCK=1024)),
        (cpl._residual_kernel, dict(BLOCK=1024)),
        (cpl._backward_elementwise_kernel, dict(CHANNEL_IN_ROWS=True, IS_F64=False, BR=16, BC=64)),
    ]


def _aol_half_precision_cases():
    """AOL with bf16/fp16 weights: 16-bit weight pointers, float32 working copies and scales."""
    from lipkern.ops import aol

    for half in ("bf16", "fp16"):
        yield aol._aol_prep_kernel, dict(KK=9, BLOCK_O=4, BLOCK_C=64, BLOCK_K=16), {"w_ptr": f"*{half}"}
        yield aol._aol_gram_kernel, dict(KH=3, KW=3, BLOCK_C=32, BLOCK_O=16, TF32X3=False, EPS_ABS_POWER=0), {}
        yield aol._aol_scale_kernel, dict(KK=9, BLOCK_C=32, BLOCK_K=16), {"w_ptr": f"*{half}", "out_ptr": f"*{half}"}
        yield aol._aol_grad_dot_kernel, dict(KK=9, BLOCK_O=16, BLOCK_C=32, BLOCK_K=16), {
            "grad_ptr": f"*{half}", "w_ptr": f"*{half}"}
        yield aol._aol_bwd_kernel, dict(KH=3, KW=3, BLOCK_O=32, BLOCK_C=32, BLOCK_J=32, USE_TF32=True), {
            "grad_out_ptr": f"*{half}", "grad_in_ptr": f"*{half}"}


def _aol_gpu_tiles():
    """(kernel, constexprs, num_warps) for every tile the AOL launchers pick on a GPU (float32 weights)."""
    from lipkern.ops import aol

    for tile in (16, 32, 64):
        warps = aol._num_warps(tile)
        for tf32x3 in (False, True):
            yield aol._aol_gram_kernel, dict(KH=3, KW=3, BLOCK_C=tile, BLOCK_O=32 if tf32x3 else 16,
                                             TF32X3=tf32x3, EPS_ABS_POWER=2 if tf32x3 else 0), warps
        yield aol._aol_bwd_kernel, dict(KH=3, KW=3, BLOCK_O=tile, BLOCK_C=tile, BLOCK_J=32, USE_TF32=True), warps
        yield aol._aol_coefficient_kernel, dict(KH=3, KW=3, BLOCK=tile, HAS_GRAD_SCALE=True), 4


def _signature(kernel, constexprs: dict, dtype: str, pointers: dict | None = None) -> dict:
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name in (pointers or {}):
            return pointers[name]
        if name.endswith("_ptr"):
            return POINTER_DTYPES.get(name, "*fp64" if name in FLOAT64_POINTERS else f"*{dtype}")
        return "fp32" if name in FLOAT_SCALARS else "i32"

    return {name: kind(name) for name in inspect.signature(kernel.fn).parameters}


def _compile(kernel, constexprs, dtype, num_warps=4, pointers=None):
    import triton
    from triton.backends.compiler import GPUTarget

    source = triton.compiler.ASTSource(fn=kernel, signature=_signature(kernel, constexprs, dtype, pointers),
                                       constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm.get("ptx"), "no PTX"
    return compiled


def _stack_bytes(cubin: bytes) -> int | None:
    """The stack frame (spilled registers) of a cubin, from Triton's bundled cuobjdump; None without it."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.findall(r"STACK:(\d+)", report)
    return max(map(int, found)) if found else None


def compile_all() -> list[str]:
    """Compile every (kernel, constexprs, dtype), and the AOL kernels at their GPU tiles; return the failures."""
    failures = []
    for kernel, constexprs in _cases():
        for dtype in ("fp32", "fp64"):
            try:
                _compile(kernel, constexprs, dtype)
            except Exception as error:  # noqa: BLE001 - report every kernel, not just the first
                failures.append(f"{kernel.fn.__name__} {constexprs} {dtype}: {type(error).__name__}: "
                                f"{str(error)[-400:]}")
    for kernel, constexprs, pointers in _aol_half_precision_cases():
        try:
            _compile(kernel, constexprs, "fp32", pointers=pointers)
        except Exception as error:  # noqa: BLE001
            failures.append(f"{kernel.fn.__name__} {constexprs} {pointers}: {type(error).__name__}: "
                            f"{str(error)[-400:]}")
    for kernel, constexprs, warps in _aol_gpu_tiles():
        try:
            stack = _stack_bytes(_compile(kernel, constexprs, "fp32", warps).asm["cubin"])
        except Exception as error:  # noqa: BLE001
            failures.append(f"{kernel.fn.__name__} {constexprs}: {type(error).__name__}: {str(error)[-400:]}")
            continue
        if stack is None:
            failures.append("cuobjdump (bundled with Triton) is missing: spills cannot be checked")
        elif stack:
            failures.append(f"{kernel.fn.__name__} {constexprs} num_warps={warps}: {stack} bytes of stack (spills)")
    return failures


def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", "import sys; from tests.test_triton_compile import compile_all; "
                           "f = compile_all(); print('\\n'.join(f)); sys.exit(1 if f else 0)"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
