"""`lipkern bench`: argument pass-through to pytest, group selection with -k, the comparison table (ratios,
alignment whatever the names' lengths), the plot, the time box and its record in the JSON, and one tiny
end-to-end CPU run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lipkern import cli

ROOT = Path(__file__).resolve().parent.parent


def _bench(name, group, provider, median_s, **extra):
    return {"name": name, "group": group, "params": {"provider": provider},
            "stats": {"median": median_s, "iqr": median_s / 10, "rounds": 20},
            "extra_info": {"provider": provider, "peak_bytes": extra.pop("peak", None), "rounds": 20,
                           **extra}}


RESULTS = {
    "machine_info": {"lipkern": {"device": "cpu", "tf32_matmul": False, "tf32_cudnn": True, "mode": "quick"}},
    "benchmarks": [
        _bench("test_step[lipkern]", "model-train-step", "lipkern", 2e-3, peak=3 * 2**20),
        _bench("test_step[eager]", "model-train-step", "eager", 3e-3, peak=30 * 2**20),
        _bench("test_step[plain]", "model-train-step", "plain", 1e-3),
        _bench("test_a_very_long_case_name_that_goes_on_and_on[lipkern-power]",
               "a-much-longer-group-name-here", "lipkern-power", 4e-3),
        _bench("test_a_very_long_case_name_that_goes_on_and_on[an-unusually-long-provider-name]",
               "a-much-longer-group-name-here", "an-unusually-long-provider-name", 1e-3, time_boxed=True),
    ],
    "skipped": [{"name": "test_slow[orthogonium]", "group": "conv-upper-bound", "time_box": True,
                 "reason": "time box: one call took 20.0 s, over the 15 s budget"}],
}


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CLI drops it too: interpreted timings mean nothing
    return env


def test_ratios_are_provider_median_over_lipkern_median():
    rows = {(r["case"], r["provider"]): r for r in cli.comparison_rows(RESULTS)}
    assert rows[("step", "lipkern")]["ratio"] is None
    assert rows[("step", "eager")]["ratio"] == pytest.approx(1.5)
    assert rows[("step", "plain")]["ratio"] == pytest.approx(0.5)
    # Without a 'lipkern' provider the first provider named lipkern-* is the reference.
    long_case = "a_very_long_case_name_that_goes_on_and_on"
    assert rows[(long_case, "lipkern-power")]["ratio"] is None
    assert rows[(long_case, "an-unusually-long-provider-name")]["ratio"] == pytest.approx(0.25)
    # lipkern is listed first within its case.
    assert [r["provider"] for r in cli.comparison_rows(RESULTS) if r["case"] == "step"][0] == "lipkern"


def test_table_columns_aligned_with_long_names():
    table = cli.format_table(RESULTS)
    lines = table.splitlines()
    header_at = next(i for i, line in enumerate(lines) if line.startswith("group"))
    separator = lines[header_at + 1]
    spans, pos = [], 0
    for dashes in separator.split("  "):
        spans.append((pos, pos + len(dashes)))
        pos += len(dashes) + 2
    rows = lines[header_at + 2:header_at + 2 + len(RESULTS["benchmarks"])]
    assert len(rows) == 5
    for line in [lines[header_at], *rows]:
        for start, end in spans:
            if start >= len(line):  # trailing empty cells are stripped
                continue
            assert start == 0 or line[start - 2:start] == "  ", (line, start)  # each column on its span
            assert len(line) <= end or line[end:end + 2] == "  ", (line, end)
    assert "an-unusually-long-provider-name" in table and "a-much-longer-group-name-here" in table
    assert "1.50" in table and "0.50" in table and "0.25" in table
    assert "30.0" in table  # peak MiB
    assert "(time-boxed)" in table
    assert "TF32 matmul=False cudnn=True" in table
    assert "time box: one call took 20.0 s" in table and "1 by the time box" in table


def test_bench_arguments_pass_through_to_pytest(tmp_path):
    args = cli.parse_args(["bench", "-k", "fwdbwd"])
    assert args.k == "fwdbwd" and args.pytest_args == []
    cmd = cli.pytest_command(args, tmp_path / "out.json")
    assert cmd[cmd.index("-k") + 1] == "fwdbwd"
    assert str(cli.BENCHMARKS) in cmd

    args = cli.parse_args(["bench", "--full", "-x", "--maxfail", "2", "--plot", "p.png", "--", "-k", "aol",
                           "-v"])
    assert args.full and args.plot == "p.png"
    assert args.pytest_args == ["-x", "--maxfail", "2", "-k", "aol", "-v"]
    assert cli.pytest_command(args, tmp_path / "out.json")[-6:] == ["-x", "--maxfail", "2", "-k", "aol", "-v"]

    # A file or node id replaces the default of the whole folder.
    args = cli.parse_args(["bench", "benchmarks/bench_aol.py::test_aol_rescale_forward"])
    cmd = cli.pytest_command(args, tmp_path / "out.json")
    assert str(cli.BENCHMARKS) not in cmd and "benchmarks/bench_aol.py::test_aol_rescale_forward" in cmd


def test_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = cli.write_plot(RESULTS, tmp_path / "plots" / "ratios.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_fails_before_running(monkeypatch, capsys):
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    assert cli.main(["bench", "--plot", "x.png"]) == 2
    assert "lipkern[plot]" in capsys.readouterr().err


def test_bench_end_to_end_on_cpu(tmp_path):
    """`lipkern bench -k fwdbwd` (rejected by argparse before, then matching no test name) selects the
    aol-fwdbwd group; two tiny cases run and the JSON and the table have them, with the time box and TF32."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lipkern.cli", "bench", "--output", str(out), "--budget", "1.5", "-k",
         "fwdbwd and c16 and (lipkern or eager)"],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CPU timings" in proc.stdout and "ratio" in proc.stdout
    assert "[  1/2" in proc.stdout and "[  2/2" in proc.stdout  # progress lines
    data = json.loads(out.read_text())
    assert {b["extra_info"]["provider"] for b in data["benchmarks"]} == {"lipkern", "eager"}
    assert all(b["group"] == "aol-fwdbwd" for b in data["benchmarks"])
    assert all("time_boxed" in b["extra_info"] and b["extra_info"]["tf32_cudnn"] is not None
               for b in data["benchmarks"])
    env = data["machine_info"]["lipkern"]
    assert env["torch"] and env["budget_s"] == 1.5 and "tf32_matmul" in env and env["cpu_threads"] == 1
    assert data["skipped"] == []


def test_time_box_skips_and_records_slow_and_hanging_cases(tmp_path):
    (tmp_path / "bench_box.py").write_text(
        "import time\n\nimport pytest\n\n"
        "@pytest.mark.benchmark(group='box')\n"
        "def test_quick(run_timed):\n"
        "    run_timed(lambda: time.sleep(0.001), 'lipkern')\n\n"
        "@pytest.mark.benchmark(group='box')\n"
        "def test_slow(run_timed):\n"
        "    run_timed(lambda: time.sleep(0.5), 'eager')\n\n"
        "@pytest.mark.benchmark(group='box')\n"
        "def test_hangs(run_timed):\n"
        "    def forever():\n"
        "        while True:\n"
        "            pass\n"
        "    run_timed(forever, 'plain')\n")
    out = tmp_path / "bench.json"
    env = dict(_env(), LIPKERN_BENCH_BUDGET_S="0.2", LIPKERN_BENCH_HARD_LIMIT_S="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path / "bench_box.py"), "-q", "-p",
                           "benchmarks.conftest", "-p", "no:cacheprovider", "-o", "python_files=bench_*.py",
                           f"--rootdir={tmp_path}", f"--benchmark-json={out}"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    [quick] = data["benchmarks"]
    assert quick["name"] == "test_quick" and quick["extra_info"]["time_boxed"]
    assert data["time_box"] == {"budget_s": 0.2, "hard_limit_s": 1.0}
    skipped = {s["name"]: s for s in data["skipped"]}
    assert set(skipped) == {"test_slow", "test_hangs"}
    assert all(s["time_box"] and s["group"] == "box" for s in skipped.values())
    assert ("one call of bench_box.py::test_slow took 0.5 s, over the 0.2 s budget"
            in skipped["test_slow"]["reason"])
    assert "hard limit of 1 s" in skipped["test_hangs"]["reason"]
