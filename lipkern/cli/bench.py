"""``lipkern bench``: run the benchmark suite (benchmarks/, pytest-benchmark) on whatever device is present
and print the comparison table (its code lives next to the benchmarks, in benchmarks/report.py)."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

# The suite and its report live in the source checkout, beside the package (lipkern bench needs one).
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
GROUPS = ("aol-fwd", "aol-fwdbwd", "model-train-step", "power-iteration-step", "circular-exact-norm",
          "conv-upper-bound")

BENCH_HELP = f"""\
Run the benchmark suite (pytest-benchmark, in benchmarks/) on the GPU when there is one, else on the CPU
(CPU timings, one thread), and print one table: median per case and provider, the
ratio provider median / lipkern median (> 1: lipkern is faster; the 'plain' provider is nn.Conv2d /
nn.Linear without any Lipschitz constraint) and the peak GPU memory beyond the inputs.

Select cases with -k, matched against test names, providers and group names ({', '.join(GROUPS)}), e.g.
  lipkern bench -k fwdbwd
  lipkern bench -k "model-train-step and not cpl"
  lipkern bench -k "convnet and (lipkern or eager)"
-k matches substrings: "aol-fwd" also selects aol-fwdbwd ("aol-fwd and not fwdbwd" does not). Every other
argument (or everything after --) goes to pytest unchanged.

Each case is time-boxed (--budget seconds, default 15 s quick / 60 s full on a GPU, 20 / 60 on a CPU): a case
whose calls do not fit is skipped and says so, and fewer rounds than asked are marked 'time-boxed'. TF32
settings are the same for every provider (LIPKERN_BENCH_TF32 = default | on | off) and recorded in the JSON.
"""


# --- running ------------------------------------------------------------------------------------------------
def _output_path(explicit: str | None) -> Path:
    import torch

    if explicit:
        return Path(explicit)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if torch.cuda.is_available():
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
        return BENCHMARKS / "results" / gpu / f"bench-{stamp}.json"
    return BENCHMARKS.parent / ".benchmarks" / f"cpu-{stamp}.json"


def pytest_command(args, out: Path) -> list[str]:
    """The pytest command line ``lipkern bench`` runs (without the interpreter)."""
    extra = list(args.pytest_args)
    # A test file or node id among the arguments replaces the default of the whole benchmarks/ folder.
    targets = [] if any("::" in a or a.endswith(".py") or Path(a).is_dir() for a in extra
                        if not a.startswith("-")) else [str(BENCHMARKS)]
    cmd = ["-m", "pytest", *targets, "-q", "-rfE", "-p", "no:cacheprovider", f"--rootdir={BENCHMARKS.parent}",
           "-o", "python_files=bench_*.py", "-o", "console_output_style=classic", "--benchmark-only",
           "--benchmark-quiet", f"--benchmark-json={out}"]
    if args.k:
        cmd += ["-k", args.k]
    return cmd + extra


def report():
    """benchmarks/report.py, the comparison table, JSON and plot (imported from the checkout by its path)."""
    spec = importlib.util.spec_from_file_location("lipkern_bench_report", BENCHMARKS / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args) -> int:
    if not BENCHMARKS.is_dir():
        print("lipkern bench needs a source checkout (pip install -e .): benchmarks/ was not found next to "
              "the package.", file=sys.stderr)
        return 2
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("lipkern bench --plot needs matplotlib: pip install 'lipkern[plot]' "
              "(or pip install matplotlib).", file=sys.stderr)
        return 2
    import torch

    out = _output_path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, LIPKERN_BENCH_MODE="full" if args.full else "quick")
    if args.budget is not None:
        env["LIPKERN_BENCH_BUDGET_S"] = str(args.budget)
    if torch.cuda.is_available():
        print(f"lipkern bench on {torch.cuda.get_device_name()} ({'full' if args.full else 'quick'} mode)")
    else:
        print("lipkern bench on the CPU: these are CPU timings, not GPU kernel timings.")
        if env.get("TRITON_INTERPRET") == "1":
            print("TRITON_INTERPRET=1 is set: interpreted Triton timings mean nothing; unsetting it.")
        env.pop("TRITON_INTERPRET", None)
    sys.stdout.flush()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *pytest_command(args, out)], env=env, cwd=BENCHMARKS.parent)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # pytest got the interrupt too: let it write the JSON of what finished
        try:
            code = proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.send_signal(signal.SIGKILL)
            code = proc.wait()
        print("interrupted: the table below has the cases that finished", file=sys.stderr)
    print(f"\nsuite finished in {time.perf_counter() - start:.0f} s (pytest exit code {code})")
    if code == 5:
        print(f"no benchmark case was selected (-k matches test names, providers and the groups "
              f"{', '.join(GROUPS)})", file=sys.stderr)
    if out.exists() and out.stat().st_size:
        results = json.loads(out.read_text())
        table = report()
        print(table.format_table(results))
        print(f"\nresults: {out}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(table.comparison_json(results), indent=2))
            print(f"comparison JSON: {args.json}")
        if args.plot:
            print(f"plot: {table.write_plot(results, args.plot)}")
    return code



def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark suite (quick mode by default)",
                       description=BENCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="more rounds and warm-up, 60 s time box per case")
    p.add_argument("--output", help="where to write the pytest-benchmark JSON")
    p.add_argument("--json", metavar="PATH", help="also write the comparison (rows with ratios, environment, "
                   "skipped cases) as plain JSON")
    p.add_argument("--plot", metavar="PATH", help="also write a bar chart of the ratios (needs matplotlib: "
                   "pip install 'lipkern[plot]')")
    p.add_argument("-k", metavar="EXPR",
                   help="select cases by test name, provider or group (pytest -k syntax)")
    p.add_argument("--budget", type=float, metavar="SECONDS", help="time box per case")
