"""Before / after on the CPU in ONE process: AOL's rescale, layer steps and the batched power iteration of an
older commit against the working tree and the eager formula, interleaved round by round (the issue's method;
separate runs on a noisy VM differ by ±10–30%). Prints a Markdown table (ratio = eager / lipkern).

    python benchmarks/cpu_before_after.py --base 4f014e9 [--threads 1]

The old ``lipkern/ops/aol.py`` and ``lipkern/ops/power_iteration.py`` are read with ``git show BASE:path`` and
imported beside the current package; the layers' ``aol_rescale`` is swapped per call.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lipkern  # noqa: E402
import lipkern.nn.aol as aol_layers  # noqa: E402
from benchmarks.bench_aol import _train_step, eager_aol_rescale, swap_aol_layers  # noqa: E402
from lipkern.bounds.spectral import frequency_matrices  # noqa: E402
from lipkern.models import ConvNet  # noqa: E402
from lipkern.ops import aol as new_aol  # noqa: E402
from lipkern.ops import power_iteration as new_power  # noqa: E402


def old_module(base: str, path: str, name: str, folder: Path):
    source = subprocess.check_output(["git", "show", f"{base}:{path}"], cwd=ROOT, text=True)
    file = folder / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(f"lipkern.ops.{name}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def rescale_rows(old_aol, channels: int):
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
        m = interleaved({"before": wrap(old_aol.aol_rescale), "after": wrap(new_aol.aol_rescale),
                         "eager": wrap(eager_aol_rescale)}, 21, 10)
        print(row(f"aol_rescale {label} c{channels}", m), flush=True)


def layer_row(old_aol, case: str, make, x, rounds: int, inner: int):
    steps = {}
    for provider in ("lipkern", "eager", "plain"):
        torch.manual_seed(0)
        steps[provider] = _train_step(swap_aol_layers(make(), provider), x)

    def with_rescale(impl):
        def run():
            aol_layers.aol_rescale = impl
            steps["lipkern"]()
        return run

    try:
        m = interleaved({"before": with_rescale(old_aol.aol_rescale),
                         "after": with_rescale(new_aol.aol_rescale),
                         "eager": steps["eager"], "plain": steps["plain"]}, rounds, inner)
    finally:
        aol_layers.aol_rescale = new_aol.aol_rescale
    print(row(case, m), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare with (e.g. 4f014e9)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        old_aol = old_module(args.base, "lipkern/ops/aol.py", "aol_before", Path(folder))
        old_power = old_module(args.base, "lipkern/ops/power_iteration.py", "power_iteration_before",
                               Path(folder))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}, "
              f"before = {args.base}")
        print("| case | before ms | after ms | eager ms | eager/before | eager/after | after/plain |")
        print("|---|---|---|---|---|---|---|")
        for channels in (16, 32, 64):
            rescale_rows(old_aol, channels)
        conv = lambda c: nn.Sequential(lipkern.nn.AOLConv2d(c, c, 3, padding=1))  # noqa: E731
        layer_row(old_aol, "AOLConv2d step b8 c16 8²", lambda: conv(16), torch.randn(8, 16, 8, 8), 21, 10)
        layer_row(old_aol, "AOLLinear step b32 64", lambda: nn.Sequential(lipkern.nn.AOLLinear(64, 64)),
                  torch.randn(32, 64), 21, 10)
        layer_row(old_aol, "AOLLinear step b32 256", lambda: nn.Sequential(lipkern.nn.AOLLinear(256, 256)),
                  torch.randn(32, 256), 21, 10)
        layer_row(old_aol, "ConvNet-XS AOL step b8 32²", lambda: ConvNet("XS", layer="aol"),
                  torch.randn(8, 3, 32, 32), 7, 2)
        layer_row(old_aol, "AOLConv2d step b64 c64 32²", lambda: conv(64), torch.randn(64, 64, 32, 32), 5, 2)
        layer_row(old_aol, "ConvNet-XS AOL step b64 32²", lambda: ConvNet("XS", layer="aol"),
                  torch.randn(64, 3, 32, 32), 3, 1)
        weight = torch.randn(16, 16, 3, 3) / 12
        matrices = frequency_matrices(weight, (8, 8))[0].to(torch.complex64)
        m = interleaved({"before": lambda: old_power.batched_power_iteration(matrices, n_iter=100),
                         "after": lambda: new_power.batched_power_iteration(matrices, n_iter=100),
                         "eager": lambda: torch.linalg.matrix_norm(
                             torch.fft.rfft2(weight, s=(8, 8)).permute(2, 3, 0, 1), ord=2).max()}, 11, 5)
        print(row("power iteration, 100 steps, 40 complex 16×16 (eager = batched SVD)", m), flush=True)


if __name__ == "__main__":
    main()
