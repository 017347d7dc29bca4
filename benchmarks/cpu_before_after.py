"""Before / after on the CPU in ONE process, interleaved round by round with the eager formula (separate runs on
a noisy VM differ by ±10–30%). "before" runs lipkern's PyTorch paths (``lipkern.configure(cpu_kernels=False)``:
no C++ CPU kernels, and the CPL op at every size), "after" the default dispatch (the C++ kernels of
``lipkern._cpu`` where built, the composite CPL form for small CPU train steps). Prints a Markdown table
(ratio = eager / lipkern, > 1: lipkern faster).

    python benchmarks/cpu_before_after.py [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lipkern  # noqa: E402
from benchmarks.bench_aol import EagerAOLConv2d, EagerAOLLinear, _train_step, eager_aol_rescale  # noqa: E402
from benchmarks.bench_models import EagerCPLConv2d, EagerCPLLinear, _network  # noqa: E402
from lipkern.bounds.spectral import frequency_matrices  # noqa: E402
from lipkern.ops import aol_rescale, batched_power_iteration  # noqa: E402
from lipkern.ops import cpl as cpl_ops  # noqa: E402


@contextlib.contextmanager
def pytorch_paths():
    """The dispatch before the C++ CPU kernels and the composite CPL form."""
    limit = cpl_ops._COMPOSITE_MAX_MACS
    cpl_ops._COMPOSITE_MAX_MACS = -1
    try:
        with lipkern.configure(cpu_kernels=False):
            yield
    finally:
        cpl_ops._COMPOSITE_MAX_MACS = limit


def before(fn):
    def run():
        with pytorch_paths():
            fn()
    return run


def interleaved(fns: dict, rounds: int, inner: int) -> dict:
    times = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(3):
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                f()
            times[k].append((time.perf_counter() - start) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def row(case: str, m: dict) -> str:
    plain = f" {m['after'] / m['plain']:.2f} |" if "plain" in m else " |"
    return (f"| {case} | {m['before'] * 1e3:.3f} | {m['after'] * 1e3:.3f} | {m['eager'] * 1e3:.3f} | "
            f"{m['eager'] / m['before']:.2f} | {m['eager'] / m['after']:.2f} |{plain}")


def compare(case: str, lipkern_fn, eager_fn, rounds: int, inner: int, plain_fn=None) -> None:
    fns = {"before": before(lipkern_fn), "after": lipkern_fn, "eager": eager_fn}
    if plain_fn is not None:
        fns["plain"] = plain_fn
    print(row(case, interleaved(fns, rounds, inner)), flush=True)


def rescale_rows(channels: int, rounds: int) -> None:
    w = torch.randn(channels, channels, 3, 3)
    wg, g = w.clone().requires_grad_(), torch.randn_like(w)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(w)
        return run

    def forward_backward(fn):
        def run():
            wg.grad = None
            fn(wg).backward(g)
        return run

    for label, wrap in (("fwd", forward), ("fwd+bwd", forward_backward)):
        compare(f"aol_rescale {label} c{channels}", wrap(aol_rescale), wrap(eager_aol_rescale), rounds, 10)


def step_of(make, x):
    torch.manual_seed(0)
    return _train_step(make(), x)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the tiny sizes only, fewer rounds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = 11 if args.quick else 21
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}, "
          f"lipkern._cpu built: {lipkern._cpu_kernels._cpu is not None}")
    print("| case | before ms | after ms | eager ms | eager/before | eager/after | after/plain |")
    print("|---|---|---|---|---|---|---|")
    for channels in (16, 32, 64):
        rescale_rows(channels, rounds)
    x = torch.randn(8, 16, 8, 8)
    compare("AOLConv2d step b8 c16 8²", step_of(lambda: lipkern.nn.AOLConv2d(16, 16, 3, padding=1), x),
            step_of(lambda: EagerAOLConv2d(16, 16, 3, padding=1), x), rounds, 10,
            step_of(lambda: nn.Conv2d(16, 16, 3, padding=1), x))
    x = torch.randn(32, 64)
    compare("AOLLinear step b32 64", step_of(lambda: lipkern.nn.AOLLinear(64, 64), x),
            step_of(lambda: EagerAOLLinear(64, 64), x), rounds, 10, step_of(lambda: nn.Linear(64, 64), x))
    compare("CPLLinear step b32 64", step_of(lambda: lipkern.nn.CPLLinear(64), x),
            step_of(lambda: EagerCPLLinear(lipkern.nn.CPLLinear(64)), x), rounds, 10)
    x = torch.randn(8, 8, 8, 8)
    compare("CPLConv2d step b8 c8 8²", step_of(lambda: lipkern.nn.CPLConv2d(8, input_size=8), x),
            step_of(lambda: EagerCPLConv2d(lipkern.nn.CPLConv2d(8, input_size=8)), x), rounds, 10)
    data = torch.randn(8, 3, 8, 8)
    for name in ("convnet-xs-aol", "convnet-xs-cpl", "convnet-xs-spectral", "cpl-s"):
        compare(f"{name} step b8 8² (the bench's small model)", step_of(lambda: _network(name, "lipkern"), data),
                step_of(lambda: _network(name, "eager"), data), max(5, rounds // 3), 2)
    matrices, u, v, u_eager = torch.randn(1, 64, 64), torch.randn(1, 64), torch.empty(1, 64), torch.randn(64)

    def eager_power_step():  # the reference codes' step on a persistent vector
        v_eager = torch.nn.functional.normalize(matrices[0] @ u_eager, dim=0)
        u_eager.copy_(torch.nn.functional.normalize(matrices[0].T @ v_eager, dim=0))

    compare("power iteration, 1 step, 64×64 (op, vectors given)",
            lambda: batched_power_iteration(matrices, u, v, n_iter=1), eager_power_step, rounds, 20)
    if args.quick:
        return
    x = torch.randn(64, 64, 32, 32)
    compare("AOLConv2d step b64 c64 32²", step_of(lambda: lipkern.nn.AOLConv2d(64, 64, 3, padding=1), x),
            step_of(lambda: EagerAOLConv2d(64, 64, 3, padding=1), x), 5, 2,
            step_of(lambda: nn.Conv2d(64, 64, 3, padding=1), x))
    compare("CPLConv2d step b64 c64 32²", step_of(lambda: lipkern.nn.CPLConv2d(64, input_size=32), x),
            step_of(lambda: EagerCPLConv2d(lipkern.nn.CPLConv2d(64, input_size=32)), x), 5, 1)
    weight = torch.randn(16, 16, 3, 3) / 12
    spectra = frequency_matrices(weight, (8, 8))[0].to(torch.complex64)
    compare("power iteration, 100 steps, 40 complex 16×16 (eager = batched SVD)",
            lambda: batched_power_iteration(spectra, n_iter=100),
            lambda: torch.linalg.matrix_norm(torch.fft.rfft2(weight, s=(8, 8)).permute(2, 3, 0, 1), ord=2).max(),
            11, 5)


if __name__ == "__main__":
    main()
