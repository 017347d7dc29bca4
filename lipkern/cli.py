"""``lipkern bench``: run the benchmark suite on whatever device is present and print the comparison table."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _output_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if torch.cuda.is_available():
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
        return BENCHMARKS / "results" / gpu / f"bench-{stamp}.json"
    return BENCHMARKS.parent / ".benchmarks" / f"cpu-{stamp}.json"


def _table(results: dict) -> str:
    """One row per benchmark; ratio = baseline median / lipkern median (>1: lipkern is faster)."""
    rows = defaultdict(dict)
    for bench in results["benchmarks"]:
        info = bench.get("extra_info", {})
        params = ", ".join(f"{k}={v}" for k, v in (bench.get("params") or {}).items() if k != "provider")
        case = bench["name"].split("[")[0].removeprefix("test_") + (f" {params}" if params else "")
        rows[(bench["group"], case.strip())][info.get("provider", "?")] = (bench["stats"]["median"],
                                                                           info.get("peak_bytes"))
    lines = [f"{'group':<18} {'case':<44} {'provider':<12} {'median ms':>10} {'x lipkern':>10} {'peak MiB':>9}"]
    for (group, case), providers in sorted(rows.items()):
        ours = providers.get("lipkern", (None,))[0]
        for provider, (median, peak) in sorted(providers.items(), key=lambda p: p[0] != "lipkern"):
            ratio = f"{median / ours:10.2f}" if ours else f"{'':>10}"
            mem = f"{peak / 2**20:9.1f}" if peak is not None else f"{'-':>9}"
            lines.append(f"{group:<18} {case:<44} {provider:<12} {median * 1e3:10.3f} {ratio} {mem}")
    return "\n".join(lines)


def bench(args) -> int:
    if not BENCHMARKS.is_dir():
        print("lipkern bench needs a source checkout (pip install -e .): benchmarks/ was not found next to "
              "the package.", file=sys.stderr)
        return 2
    out = _output_path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, LIPKERN_BENCH_MODE="full" if args.full else "quick")
    if torch.cuda.is_available():
        print(f"lipkern bench on {torch.cuda.get_device_name()} ({'full' if args.full else 'quick'} mode)")
    else:
        print("lipkern bench on the CPU: these are CPU timings of the PyTorch paths, not GPU kernel timings.")
        if env.get("TRITON_INTERPRET") == "1":
            print("TRITON_INTERPRET=1 is set: interpreted Triton timings mean nothing; unsetting it.")
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", str(BENCHMARKS), "-q", "-p", "no:cacheprovider",
           f"--rootdir={BENCHMARKS.parent}", "-o", "python_files=bench_*.py", "--benchmark-only", f"--benchmark-json={out}",
           "--benchmark-columns=median,iqr,rounds", *args.pytest_args]
    code = subprocess.call(cmd, env=env, cwd=BENCHMARKS.parent)
    if out.exists():
        print(_table(json.loads(out.read_text())))
        print(f"\nresults: {out}")
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lipkern")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="run the benchmark suite (quick mode by default)")
    p.add_argument("--full", action="store_true", help="more rounds and warm-up")
    p.add_argument("--output", help="where to write the pytest-benchmark JSON")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments, e.g. -k fwdbwd")
    args = parser.parse_args(argv)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
