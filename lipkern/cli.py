"""``lipkern bench``: run the benchmark suite on whatever device is present and print the comparison table."""

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

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
GROUPS = ("aol-fwd", "aol-fwdbwd", "model-train-step", "power-iteration-step", "circular-exact-norm",
          "conv-upper-bound")

BENCH_HELP = f"""\
Run the benchmark suite (pytest-benchmark, in benchmarks/) on the GPU when there is one, else on the CPU
(CPU timings of the PyTorch paths, one thread), and print one table: median per case and provider, the
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


# --- results ------------------------------------------------------------------------------------------------
def _case_name(bench: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in (bench.get("params") or {}).items() if k != "provider")
    case = bench["name"].split("[")[0].removeprefix("test_")
    return f"{case} {params}".strip()


def _accuracy(info: dict) -> str:
    if info.get("relative_error") is not None:
        return f"rel. error {info['relative_error']:.1e}"
    if info.get("bound_over_reference") is not None:
        return f"bound/ref {info['bound_over_reference']:.4f}"
    return ""


def _reference_provider(providers) -> str | None:
    """The provider the others are compared with: 'lipkern', else the first whose name starts with it."""
    if "lipkern" in providers:
        return "lipkern"
    return next((p for p in sorted(providers) if p.startswith("lipkern")), None)


def comparison_rows(results: dict) -> list[dict]:
    """One row per (group, case, provider), lipkern first within a case, with ``ratio`` = median / lipkern's
    median (None for lipkern itself or without a lipkern row)."""
    cases: dict[tuple, dict] = {}
    for bench in results.get("benchmarks", []):
        info = bench.get("extra_info", {})
        provider = info.get("provider") or (bench.get("params") or {}).get("provider") or "?"
        cases.setdefault((bench.get("group") or "", _case_name(bench)), {})[provider] = {
            "median": bench["stats"]["median"], "iqr": bench["stats"].get("iqr"),
            "rounds": info.get("rounds", bench["stats"].get("rounds")), "peak": info.get("peak_bytes"),
            "time_boxed": bool(info.get("time_boxed")), "accuracy": _accuracy(info)}
    rows = []
    for (group, case), providers in sorted(cases.items()):
        ref = _reference_provider(providers)
        ref_median = providers[ref]["median"] if ref else None
        for provider in sorted(providers, key=lambda p: (p != ref, not p.startswith("lipkern"), p)):
            r = providers[provider]
            ratio = r["median"] / ref_median if ref_median and provider != ref else None
            rows.append(dict(group=group, case=case, provider=provider, ratio=ratio, **r))
    return rows


def _format_columns(header: list[str], body: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row):
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *map(line, body)]


def format_table(results: dict) -> str:
    """The comparison table, columns as wide as their longest entry, then the skipped cases with reasons."""
    env = (results.get("machine_info") or {}).get("lipkern") or {}
    lines = []
    if env:
        lines.append(f"device: {env.get('device')} | torch {env.get('torch')} | triton {env.get('triton')} | "
                     f"mode {env.get('mode')} | TF32 matmul={env.get('tf32_matmul')} "
                     f"cudnn={env.get('tf32_cudnn')} | CPU threads {env.get('cpu_threads')} | "
                     f"time box {env.get('budget_s')} s per case")
    rows = comparison_rows(results)
    if rows:
        header = ["group", "case", "provider", "median ms", "IQR %", "rounds", "ratio", "peak MiB", "accuracy"]
        body = []
        for r in rows:
            iqr = f"{100 * r['iqr'] / r['median']:.0f}" if r["iqr"] is not None and r["median"] else "-"
            rounds = f"{r['rounds']}{' (time-boxed)' if r['time_boxed'] else ''}" if r["rounds"] else "-"
            body.append([r["group"], r["case"], r["provider"], f"{r['median'] * 1e3:.3f}", iqr, rounds,
                         f"{r['ratio']:.2f}" if r["ratio"] is not None else "",
                         f"{r['peak'] / 2**20:.1f}" if r["peak"] is not None else "-", r["accuracy"]])
        lines += _format_columns(header, body, right={3, 4, 5, 6, 7})
        lines.append("ratio = provider median / lipkern median (> 1: lipkern is faster); "
                     "plain = no Lipschitz constraint at all (the limit)")
    else:
        lines.append("no benchmark case ran")
    skipped = results.get("skipped") or []
    if skipped:
        boxed = sum(bool(s.get("time_box")) for s in skipped)
        lines.append(f"\nskipped ({len(skipped)}, {boxed} by the time box):")
        body = [[s.get("group") or "", s.get("name", ""), s.get("reason", "")] for s in skipped]
        lines += _format_columns(["group", "case", "reason"], body, right=set())
    return "\n".join(lines)


def write_plot(results: dict, path: str | Path) -> Path:
    """A horizontal bar chart of the ratios (log scale, 1 = as fast as lipkern). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in comparison_rows(results) if r["ratio"] is not None]
    path = Path(path)
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.28 * max(len(rows), 1)))
    if rows:
        labels = [f"{r['group']} | {r['case']} | {r['provider']}" for r in rows][::-1]
        ratios = [r["ratio"] for r in rows][::-1]
        colors = ["tab:green" if x >= 1 else "tab:red" for x in ratios]
        # Bars grow from 1 (as fast as lipkern) to the ratio, on a log scale symmetric about 1.
        ax.barh(range(len(rows)), [x - 1 for x in ratios], left=1, color=colors)
        for y, x in enumerate(ratios):
            ax.annotate(f"{x:.2f}", (x, y), xytext=(3 if x >= 1 else -3, 0), textcoords="offset points",
                        ha="left" if x >= 1 else "right", va="center", fontsize=7)
        span = max(max(ratios), 1 / min(ratios), 1.5) ** 1.25
        ax.set_xscale("log")
        ax.set_xlim(1 / span, span)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8)
    else:
        ax.text(0.5, 0.5, "no ratios (no case ran against lipkern)", ha="center", va="center")
    env = (results.get("machine_info") or {}).get("lipkern") or {}
    ax.set_xlabel("provider median / lipkern median (> 1: lipkern faster)")
    ax.set_title(f"lipkern bench on {env.get('device', '?')} ({env.get('mode', '?')} mode)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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


def bench(args) -> int:
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
        print("lipkern bench on the CPU: these are CPU timings of the PyTorch paths, not GPU kernel timings.")
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
        print(format_table(results))
        print(f"\nresults: {out}")
        if args.plot:
            print(f"plot: {write_plot(results, args.plot)}")
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipkern")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="run the benchmark suite (quick mode by default)",
                       description=BENCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="more rounds and warm-up, 60 s time box per case")
    p.add_argument("--output", help="where to write the pytest-benchmark JSON")
    p.add_argument("--plot", metavar="PATH", help="also write a bar chart of the ratios (needs matplotlib: "
                   "pip install 'lipkern[plot]')")
    p.add_argument("-k", metavar="EXPR",
                   help="select cases by test name, provider or group (pytest -k syntax)")
    p.add_argument("--budget", type=float, metavar="SECONDS", help="time box per case")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse ``lipkern`` arguments; for ``bench``, everything it does not know (and everything after ``--``)
    is kept, in order, in ``pytest_args``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.pytest_args = unknown + rest
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
