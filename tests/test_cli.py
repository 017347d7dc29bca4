"""`lipkern bench`: argument pass-through to pytest, group selection with -k, the comparison table (ratios,
alignment whatever the names' lengths), the plot, the time box and its record in the JSON, and one tiny
end-to-end CPU run."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import report
from lipkern import cli
from lipkern.cli import bench as bench_command

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
    rows = {(r["case"], r["provider"]): r for r in report.comparison_rows(RESULTS)}
    assert rows[("step", "lipkern")]["ratio"] is None
    assert rows[("step", "eager")]["ratio"] == pytest.approx(1.5)
    assert rows[("step", "plain")]["ratio"] == pytest.approx(0.5)
    # Without a 'lipkern' provider the first provider named lipkern-* is the reference.
    long_case = "a_very_long_case_name_that_goes_on_and_on"
    assert rows[(long_case, "lipkern-power")]["ratio"] is None
    assert rows[(long_case, "an-unusually-long-provider-name")]["ratio"] == pytest.approx(0.25)
    # lipkern is listed first within its case.
    assert [r["provider"] for r in report.comparison_rows(RESULTS) if r["case"] == "step"][0] == "lipkern"


def test_table_columns_aligned_with_long_names():
    table = report.format_table(RESULTS)
    lines = table.splitlines()
    assert all(len(line) <= report.TABLE_WIDTH for line in lines), max(map(len, lines))
    blocks = [i for i, line in enumerate(lines) if line.startswith("[")]
    assert [lines[i] for i in blocks] == ["[a-much-longer-group-name-here]", "[model-train-step]"]
    for at, n_rows in zip(blocks, (2, 3)):
        header, separator, rows = lines[at + 1], lines[at + 2], lines[at + 3:at + 3 + n_rows]
        assert header.startswith("case")
        spans, pos = [], 0
        for dashes in separator.split("  "):
            spans.append((pos, pos + len(dashes)))
            pos += len(dashes) + 2
        for line in [header, *rows]:
            for start, end in spans:
                if start >= len(line):  # trailing empty cells are stripped
                    continue
                assert start == 0 or line[start - 2:start] == "  ", (line, start)  # each column on its span
                assert len(line) <= end or line[end:end + 2] == "  ", (line, end)
    assert "an-unusually-long-provider-name" in table and "a-much-longer-group-name-here" in table
    assert "1.50" in table and "0.50" in table and "0.25" in table
    assert "30.0" in table  # peak MiB
    assert "4.000  " in table and "20*" in table  # the time-boxed row is marked
    assert "TF32 matmul=False cudnn=True" in table
    assert "time box: one call took 20.0 s" in table and "1 by the time box" in table


def test_cuda_event_timings_replace_the_synchronized_rounds():
    """A GPU run records median / IQR of CUDA-event timings (no synchronize inside the timed region): the
    comparison uses them, not pytest-benchmark's few synchronized rounds."""
    lipkern, eager = _bench("test_s[lipkern]", "g", "lipkern", 9.0), _bench("test_s[eager]", "g", "eager", 9.0)
    lipkern["extra_info"].update(median_s=1e-3, iqr_s=1e-4, event_rounds=500)
    eager["extra_info"].update(median_s=3e-3, iqr_s=1e-4, event_rounds=400)
    gpu = dict(RESULTS, benchmarks=[lipkern, eager])
    rows = report.comparison_rows(gpu)
    assert [(r["median"], r["rounds"]) for r in rows] == [(1e-3, 500), (3e-3, 400)]
    assert rows[1]["ratio"] == pytest.approx(3.0)


def test_paired_cpu_rounds_give_the_ratio():
    """A provider timed round by round against lipkern's call (CPU) is compared with that paired median, not
    with lipkern's own row from minutes earlier; the table says so."""
    lipkern = _bench("test_p[lipkern]", "g", "lipkern", 2e-3)
    eager = _bench("test_p[eager]", "g", "eager", 3e-3, paired_lipkern_median_s=1.5e-3)
    plain = _bench("test_p[plain]", "g", "plain", 1e-3)
    rows = {r["provider"]: r for r in report.comparison_rows(dict(RESULTS, benchmarks=[lipkern, eager, plain]))}
    assert rows["eager"]["ratio"] == pytest.approx(2.0) and rows["eager"]["paired"]
    assert rows["plain"]["ratio"] == pytest.approx(0.5) and not rows["plain"]["paired"]
    assert rows["lipkern"]["ratio"] is None and not rows["lipkern"]["paired"]
    table = report.format_table(dict(RESULTS, benchmarks=[lipkern, eager, plain]))
    assert "interleaved" in table and "2.00" in table
    assert "interleaved" not in report.format_table(RESULTS)


def test_a_size_parameter_reads_as_key_value_pairs():
    bench = _bench("test_step[b64-lipkern]", "g", "lipkern", 1e-3)
    bench["params"]["size"] = {"batch": 64, "channels": 8}
    assert report._case_name(bench) == "step batch=64 channels=8"


def test_table_shortens_a_case_name_to_fit_and_writes_plain_json(tmp_path):
    long = dict(RESULTS, benchmarks=[_bench("test_" + "x" * 200 + "[lipkern]", "g", "lipkern", 1e-3),
                                     _bench("test_" + "x" * 200 + "[eager]", "g", "eager", 2e-3)])
    lines = report.format_table(long).splitlines()
    assert all(len(line) <= report.TABLE_WIDTH for line in lines) and any("…" in line for line in lines)
    rows = json.loads(json.dumps(report.comparison_json(long)))["rows"]
    assert [(r["provider"], r["ratio"]) for r in rows] == [("lipkern", None), ("eager", 2.0)]


def test_bench_arguments_pass_through_to_pytest(tmp_path):
    args = cli.parse_args(["bench", "-k", "fwdbwd"])
    assert args.k == "fwdbwd" and args.pytest_args == []
    cmd = bench_command.pytest_command(args, tmp_path / "out.json")
    assert cmd[cmd.index("-k") + 1] == "fwdbwd"
    assert str(bench_command.BENCHMARKS) in cmd

    args = cli.parse_args(["bench", "--full", "-x", "--maxfail", "2", "--plot", "p.png", "--", "-k", "aol",
                           "-v"])
    assert args.full and args.plot == "p.png"
    assert args.pytest_args == ["-x", "--maxfail", "2", "-k", "aol", "-v"]
    assert bench_command.pytest_command(args, tmp_path / "out.json")[-6:] == ["-x", "--maxfail", "2", "-k", "aol", "-v"]

    # A file or node id replaces the default of the whole folder.
    args = cli.parse_args(["bench", "benchmarks/bench_aol.py::test_aol_rescale_forward"])
    cmd = bench_command.pytest_command(args, tmp_path / "out.json")
    assert str(bench_command.BENCHMARKS) not in cmd and "benchmarks/bench_aol.py::test_aol_rescale_forward" in cmd


def test_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = report.write_plot(RESULTS, tmp_path / "plots" / "ratios.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_fails_before_running(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
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


def test_cpu_providers_are_timed_interleaved_with_lipkerns_call(tmp_path):
    """On the CPU each non-lipkern provider's round runs lipkern's call of the same case first (kept from the
    lipkern test): the call counts show the interleaving, and a case with other parameters is not paired."""
    (tmp_path / "bench_pair.py").write_text(
        "import time\n\nimport pytest\n\nCALLS = []\n\n"
        "@pytest.mark.benchmark(group='pair')\n"
        "@pytest.mark.parametrize('provider', ['lipkern', 'eager'])\n"
        "@pytest.mark.parametrize('size', [1, 2])\n"
        "def test_case(run_timed, provider, size):\n"
        "    def fn():\n"
        "        CALLS.append((provider, size))\n"
        "        time.sleep(0.002 if provider == 'lipkern' else 0.004)\n"
        "    run_timed(fn, provider)\n\n"
        "def test_zz_counts():\n"
        "    import json, pathlib\n"
        "    pathlib.Path('calls.json').write_text(json.dumps(CALLS))\n")
    out = tmp_path / "bench.json"
    env = dict(_env(), LIPKERN_BENCH_BUDGET_S="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path / "bench_pair.py"), "-q", "-p",
                           "benchmarks.conftest", "-p", "no:cacheprovider", "-o", "python_files=bench_*.py",
                           f"--rootdir={tmp_path}", f"--benchmark-json={out}"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    calls = [tuple(c) for c in json.loads((tmp_path / "calls.json").read_text())]
    benches = {b["name"]: b for b in json.loads(out.read_text())["benchmarks"]}
    for size in (1, 2):
        eager = benches[f"test_case[{size}-eager]"]["extra_info"]
        start = calls.index(("eager", size))  # the eager test's calls, from its first one to the next test
        stop = calls.index(("lipkern", 2)) if size == 1 else len(calls)
        window = calls[start:stop]
        assert set(window) == {("eager", size), ("lipkern", size)}  # lipkern's call of the same size only
        assert window.count(("lipkern", size)) >= eager["rounds"]  # one per paired round
        assert eager["paired_lipkern_median_s"] == pytest.approx(0.002, abs=0.0015)
        assert "paired_lipkern_median_s" not in benches[f"test_case[{size}-lipkern]"]["extra_info"]


# --- lipkern certify ----------------------------------------------------------------------------------------
import math  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

EPS = [0.0, 0.02, 0.05, 0.08]


class TinyNet(nn.Sequential):
    """A small ReLU MLP on (2, 3, 2) inputs with 3 classes: what `--model TinyNet` builds in these tests."""

    def __init__(self, hidden: int = 8, num_classes: int = 3):
        super().__init__(nn.Flatten(), nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def _certify_api():
    certify = pytest.importorskip("lipkern.certify")
    if not hasattr(certify, "certified_accuracy"):
        pytest.skip("lipkern.certify.certified_accuracy is not there yet")
    return certify


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """TinyNet registered in lipkern.models, its state_dict and a 24-point dataset saved under tmp_path."""
    from lipkern import models

    monkeypatch.setattr(models, "TinyNet", TinyNet, raising=False)
    monkeypatch.setattr(models, "__all__", [*models.__all__, "TinyNet"])
    torch.manual_seed(3)
    model = TinyNet(hidden=8).eval()
    x = torch.randn(24, 2, 3, 2)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:5] = (y[:5] + 1) % 3  # some wrong labels
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    return model, x, y, tmp_path


def _run(argv, capsys):
    code = cli.main(["certify", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _tiny_args(tmp_path, *extra):
    return ["--model", "TinyNet", "--model-args", '{"hidden": 8}', "--state-dict", tmp_path / "weights.pt",
            "--data", tmp_path / "data.pt", "--device", "cpu", "--eps", *EPS, *extra]


def _margin_radius_oracle(model, x, lipschitz, rounding=None, slope=0.0):
    """min_{j != top} (f_top − f_j − √2·rounding) / (√2 (L + slope)) in float64, one point at a time (without
    ``rounding``: the real-arithmetic network's radius)."""
    with torch.no_grad():
        logits = model.double()(x.double())
    model.float()
    radii = []
    for i, row in enumerate(logits.tolist()):
        top = max(range(len(row)), key=lambda j: row[j])
        margin = min(row[top] - row[j] for j in range(len(row)) if j != top)
        if rounding is not None:
            margin = max(margin - math.sqrt(2) * rounding[i], 0.0)
        radii.append(margin / (math.sqrt(2) * (lipschitz + slope)))
    return torch.tensor(radii, dtype=torch.float64), logits.argmax(1)


def test_certify_declared_lipschitz_end_to_end(tiny, capsys):
    certify = _certify_api()
    model, x, y, tmp_path = tiny
    out_json = tmp_path / "out" / "results.json"
    code, out, err = _run(_tiny_args(tmp_path, "--lipschitz", 2.5, "--output", out_json), capsys)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    direct = certify.certified_accuracy(model, (x, y), EPS, lipschitz=2.5)
    assert result["eps"] == EPS
    assert result["certified_accuracy"] == pytest.approx(direct.accuracy.tolist(), abs=0)
    assert result["clean_accuracy"] == pytest.approx(direct.clean_accuracy, abs=0)
    assert result["num_points"] == 24 and result["points"]["label"] == y.tolist()
    assert "user-declared" in result["lipschitz"]["source"] and result["lipschitz"]["value"] == 2.5
    # The radii are (margin − √2·rounding) / (√2 (L + slope)) with the per-point bound on the float32
    # evaluation's error the JSON records (rounded down by at most a few float64 units), and never above the
    # real-arithmetic network's margin / (√2 L).
    assert result["evaluation"] == "float32" and 0 < result["rounding_max"] < 1e-4
    radii, prediction = _margin_radius_oracle(model, x, 2.5, result["points"]["rounding"],
                                              result["rounding_slope"])
    torch.testing.assert_close(torch.tensor(result["points"]["radius"], dtype=torch.float64), radii,
                               rtol=1e-12, atol=1e-15)
    assert (radii <= _margin_radius_oracle(model, x, 2.5)[0]).all()
    correct = prediction == y
    assert result["points"]["correct"] == correct.tolist()
    counts = [int((correct & (radii > e)).sum()) for e in EPS]
    assert result["certified_count"] == counts
    assert 0 < counts[-1] < counts[0] < 24  # the grid separates points
    # The table shows the same numbers.
    assert "user-declared (--lipschitz), not verified" in out and "L = 2.5" in out
    for e, c in zip(EPS, counts):
        assert f"{e:.4f}" in out and f"{100 * c / 24:.2f}%" in out and f"{c}/24" in out
    assert f"clean accuracy: {100 * correct.double().mean().item():.2f}% ({int(correct.sum())}/24)" in out


def test_certify_exact_evaluation_and_the_deprecated_float64(tiny, capsys):
    """--evaluation exact: the real-arithmetic network's radii, the float64 oracle's up to the float64
    evaluation's bounded rounding and the certificate's rounding-down (a few float64 units); the user's model
    is left in float32. --float64 is accepted, says it is deprecated and changes nothing."""
    certify = _certify_api()
    model, x, y, tmp_path = tiny
    out_json = tmp_path / "exact.json"
    code, out, err = _run(_tiny_args(tmp_path, "--lipschitz", 2.5, "--evaluation", "exact", "--output", out_json),
                          capsys)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert result["rounding_slope"] == 0 and 0 < result["rounding_max"] < 1e-12  # the float64 evaluation's
    radii, _ = _margin_radius_oracle(model, x, 2.5, result["points"]["rounding"])
    torch.testing.assert_close(torch.tensor(result["points"]["radius"], dtype=torch.float64), radii,
                               rtol=1e-13, atol=1e-15)
    assert (torch.tensor(result["points"]["radius"], dtype=torch.float64) <= _margin_radius_oracle(model, x, 2.5)[0]).all()
    direct = certify.certified_accuracy(model, (x, y), EPS, lipschitz=2.5, evaluation="exact")
    assert result["points"]["radius"] == direct.radii.tolist() and result["evaluation"] == "exact"
    assert "real-arithmetic network" in out and next(model.parameters()).dtype == torch.float32
    code, out64, err = _run(_tiny_args(tmp_path, "--lipschitz", 2.5, "--float64"), capsys)
    assert code == 0 and "--float64 is deprecated" in err and "network as it runs: float32" in out64
    code, _, err = _run(_tiny_args(tmp_path, "--evaluation", "exact", "--smoothing", "--sigma", 0.1), capsys)
    assert code == 2 and "--evaluation applies to the Lipschitz-margin and SPLITZ certificates" in err


@pytest.mark.parametrize("method", ["liplt", "product"])
@pytest.mark.parametrize("pairwise", [False, True])
def test_certify_sound_bound_matches_direct_call(tiny, capsys, pairwise, method):
    certify = _certify_api()
    bounds = pytest.importorskip("lipkern.bounds")
    if not hasattr(bounds, "lipschitz_bound"):
        pytest.skip("lipkern.bounds.lipschitz_bound is not there yet")
    model, x, y, tmp_path = tiny
    out_json = tmp_path / "results.json"
    extra = ["--method", method, "--output", out_json, "--limit", 20] + ["--pairwise"] * pairwise
    code, out, err = _run(_tiny_args(tmp_path, *extra), capsys)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    bound = bounds.lipschitz_bound(model, (2, 3, 2), method=method, pairwise=pairwise)
    direct = certify.certified_accuracy(model, (x[:20], y[:20]), EPS, lipschitz=bound, pairwise=pairwise)
    assert result["certified_accuracy"] == pytest.approx(direct.accuracy.tolist(), abs=0)
    assert result["num_points"] == 20
    assert result["lipschitz"]["pairwise"] is pairwise and "sound" in result["lipschitz"]["source"]
    torch.testing.assert_close(torch.tensor(result["lipschitz"]["value"], dtype=torch.float64),
                               bound.double(), rtol=0, atol=0)
    # What the CLI used is an upper bound: the network's Lipschitz constant is >= the norm of its Jacobian
    # (or, pairwise, of the Jacobian's row differences) at any input.
    for point in x[:5]:
        jac = torch.autograd.functional.jacobian(lambda v: model(v.reshape(1, 2, 3, 2))[0], point.reshape(-1))
        jac = jac.double()
        if pairwise:
            for a in range(3):
                for b in range(3):
                    if a != b:
                        assert result["lipschitz"]["value"][a][b] >= torch.linalg.norm(jac[a] - jac[b]).item()
        else:
            assert result["lipschitz"]["value"] >= torch.linalg.matrix_norm(jac, ord=2).item()
    assert "sound" in out


def test_certify_plot_writes_png(tiny, capsys):
    _certify_api()
    pytest.importorskip("matplotlib")
    _, _, _, tmp_path = tiny
    plot = tmp_path / "plots" / "curve.png"
    code, out, err = _run(_tiny_args(tmp_path, "--lipschitz", 2.0, "--plot", plot), capsys)
    assert code == 0, err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {plot}" in out


def test_certify_plot_without_matplotlib_fails_before_running(tiny, monkeypatch, capsys):
    _, _, _, tmp_path = tiny
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    code, out, err = _run(_tiny_args(tmp_path, "--lipschitz", 1.0, "--plot", tmp_path / "x.png"), capsys)
    assert code == 2 and "lipkern[plot]" in err and out == ""


def test_certify_smoothing_matches_direct_calls(tiny, capsys):
    certify = _certify_api()
    if not hasattr(certify, "RandomizedSmoothing"):
        pytest.skip("lipkern.certify.RandomizedSmoothing is not there yet")
    model, x, y, tmp_path = tiny
    out_json = tmp_path / "smooth.json"
    args = ["--smoothing", "--sigma", 0.5, "--num-select", 20, "--num-samples", 200, "--alpha", 0.01, "--skip", 3,
            "--limit", 12, "--batch-size", 64, "--seed", 7, "--output", out_json]
    code, out, err = _run(_tiny_args(tmp_path, *args), capsys)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    points = result["points"]
    assert points["index"] == [0, 3, 6, 9]
    smoother = certify.RandomizedSmoothing(model, 0.5, 3)
    for k, i in enumerate(points["index"]):
        prediction, radius = smoother.certify(x[i], 20, 200, 0.01, 64, seed=7 + i)
        assert points["prediction"][k] == prediction and points["radius"][k] == pytest.approx(radius, abs=0)
        assert points["correct"][k] == (prediction == int(y[i]))
    counts = [sum(ok and r > e for ok, r in zip(points["correct"], points["radius"])) for e in EPS]
    assert result["certified_count"] == counts
    assert result["certified_accuracy"] == pytest.approx([c / 4 for c in counts])
    assert result["smoothing"]["abstained"] == points["prediction"].count(-1)
    assert "randomized smoothing, sigma = 0.5" in out
    assert "randomized smoothing: 4 points, 20 + 200 noise draws each" in err


def test_interrupted_smoothing_resumes_to_the_uninterrupted_result(tiny, capsys, monkeypatch):
    """Points are written as they finish; Ctrl-C says where they are; the same command without --resume refuses
    to start over them, with --resume it certifies only the rest and ends with the file of an uninterrupted run
    (the point files then removed)."""
    from lipkern.certify import RandomizedSmoothing

    model, x, y, tmp_path = tiny
    options = ["--smoothing", "--sigma", 0.5, "--num-select", 10, "--num-samples", 60, "--limit", 8, "--seed", 5]
    full, cut = tmp_path / "full.json", tmp_path / "cut.json"
    assert _run(_tiny_args(tmp_path, *options, "--output", full), capsys)[0] == 0
    original, calls, interrupt = RandomizedSmoothing.certify, [], [True]

    def interrupted(self, *args, **kwargs):
        calls.append(kwargs["seed"])
        if len(calls) == 4 and interrupt.pop():
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RandomizedSmoothing, "certify", interrupted)
    code, _, err = _run(_tiny_args(tmp_path, *options, "--output", cut), capsys)
    assert code == 130 and "--resume to continue" in err and not cut.exists()
    assert len((tmp_path / "cut.json.points-0.jsonl").read_text().splitlines()) == 1 + 3  # settings + 3 points
    code, _, err = _run(_tiny_args(tmp_path, *options, "--output", cut), capsys)
    assert code == 2 and "--resume" in err
    code, _, err = _run(_tiny_args(tmp_path, *options[:-1], "6", "--output", cut, "--resume"), capsys)
    assert code == 2 and "other settings" in err  # another seed: the kept points do not belong to this run
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    changed = {k: v + 0.01 for k, v in weights.items()}
    torch.save(changed, tmp_path / "weights.pt")  # the same path, other weights (a model retrained in place)
    code, _, err = _run(_tiny_args(tmp_path, *options, "--output", cut, "--resume"), capsys)
    assert code == 2 and "other settings" in err and "fingerprint" in err
    torch.save(weights, tmp_path / "weights.pt")
    from lipkern.cli.certify import _recorded_batch_size

    assert _recorded_batch_size(str(cut)) == 256  # what --batch-size auto takes when resuming (its noise streams)
    calls.clear()
    interrupt.append(False)
    code, _, err = _run(_tiny_args(tmp_path, *options, "--output", cut, "--resume", "--batch-size", "auto"), capsys)
    assert code == 0, err
    assert len(calls) == 8 - 3 and "(3 done before)" in err and "smoothing batch size" not in err
    a, b = json.loads(full.read_text()), json.loads(cut.read_text())
    for key in ("index", "prediction", "radius", "correct"):
        assert a["points"][key] == b["points"][key], key
    assert a["certified_count"] == b["certified_count"]
    assert not list(tmp_path.glob("*.points-*.jsonl"))


def test_certify_adaptive_smoothing_matches_the_direct_call_and_counts_draws(tiny, capsys):
    """--adaptive: each point as RandomizedSmoothing.certify_adaptive gives it (radii of the table as its
    targets), points.samples per point (selection included) in both modes, and the total in the table."""
    from lipkern.certify import RandomizedSmoothing

    model, x, y, tmp_path = tiny
    options = ["--smoothing", "--sigma", 0.5, "--num-select", 10, "--num-samples", 4000, "--limit", 6,
               "--seed", 2, "--batch-size", 500]
    code, out, err = _run(_tiny_args(tmp_path, *options, "--adaptive", "--output", tmp_path / "a.json"), capsys)
    assert code == 0, err
    points = json.loads((tmp_path / "a.json").read_text())["points"]
    smoother = RandomizedSmoothing(model, 0.5, 3)
    for k, i in enumerate(points["index"]):
        expected = smoother.certify_adaptive(x[i], 10, 4000, 0.001, 500, EPS, seed=2 + i)
        assert (points["prediction"][k], points["radius"][k], points["samples"][k]) == expected
    assert f"adaptive: {sum(points['samples']):,} noise draws" in out
    code, out, err = _run(_tiny_args(tmp_path, *options, "--output", tmp_path / "f.json"), capsys)
    assert json.loads((tmp_path / "f.json").read_text())["points"]["samples"] == [4010] * 6


def test_certify_smoothing_says_early_how_long_it_will_take(tiny, capsys, monkeypatch):
    """A long smoothing run (the default n = 100,000 on a CPU) says after its first point how long all will
    take, with the options that shorten it (a clock that advances 10 s per reading stands in for a slow run)."""
    model, x, y, tmp_path = tiny
    clock = iter(range(0, 10**6, 10))
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(clock)))
    code, _, err = _run(_tiny_args(tmp_path, "--smoothing", "--sigma", 0.5, "--n0", 10, "--n", 20, "--limit", 12),
                        capsys)
    assert code == 0, err
    assert "the first point took 10.0 s: about 2 min for all 12 (fewer draws: --num-samples" in err, err


def test_sample_counts_have_names_torchrun_leaves_alone():
    """torchrun's parser took `--n` as an ambiguous abbreviation of its own options: the counts are
    --num-samples / --num-select, the old spellings still parse in one process."""
    new = cli.parse_args(["certify", "--scripted", "m.pt", "--smoothing", "--num-samples", "300", "--num-select", "30"])
    old = cli.parse_args(["certify", "--scripted", "m.pt", "--smoothing", "--n", "300", "--n0", "30"])
    assert (new.n, new.n0) == (old.n, old.n0) == (300, 30)
    torchrun = pytest.importorskip("torch.distributed.run")
    parsed = torchrun.get_args_parser().parse_args(["--nproc-per-node", "2", "-m", "lipkern.cli", "certify",
                                                    "--num-samples", "300", "--num-select", "30"])
    assert parsed.training_script_args[-4:] == ["--num-samples", "300", "--num-select", "30"]


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_certify_torchscript_and_exported_with_declared_lipschitz(tiny, capsys):
    certify = _certify_api()
    model, x, y, tmp_path = tiny
    scripted = tmp_path / "model.ts"
    torch.jit.script(model).save(str(scripted))
    exported = tmp_path / "model.pt2"
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(model, (x[:2],), dynamic_shapes=({0: batch},)), str(exported))
    direct = certify.certified_accuracy(model, (x, y), EPS, lipschitz=3.0)
    for flag, path in (("--scripted", scripted), ("--exported", exported)):
        out_json = tmp_path / f"{flag[2:]}.json"
        code, out, err = _run([flag, path, "--lipschitz", 3.0, "--data", tmp_path / "data.pt", "--device",
                               "cpu", "--eps", *EPS, "--output", out_json, "--batch-size", 10], capsys)
        assert code == 0, err
        result = json.loads(out_json.read_text())
        assert result["certified_accuracy"] == pytest.approx(direct.accuracy.tolist(), abs=1e-12)
        assert "user-declared" in out and ("TorchScript" if flag == "--scripted" else "exported") in out


def test_certify_lipkern_model_state_dict_round_trip(tmp_path, capsys, monkeypatch, knobs):
    """A real lipkern.models class (ConvNet with AOL layers, narrow): built from --model-args, weights loaded,
    logits as the saved model's (same margins, hence the same radii for the declared L = 1)."""
    certify = _certify_api()
    from lipkern.models import ConvNet

    knobs(backend="torch")  # the Triton interpreter is slow for 26 layers
    kwargs = {"size": "XS", "layer": "aol", "width": 4, "num_classes": 3}
    model = ConvNet(**kwargs).eval()
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    torch.save(model.state_dict(), tmp_path / "convnet.pt")
    torch.save((x, y), tmp_path / "data.pt")
    out_json = tmp_path / "r.json"
    code, out, err = _run(["--model", "ConvNet", "--model-args", json.dumps(kwargs), "--state-dict",
                           tmp_path / "convnet.pt", "--data", tmp_path / "data.pt", "--lipschitz", 1,
                           "--device", "cpu", "--eps", 0, 0.01, "--output", out_json], capsys)
    assert code == 0, err
    direct = certify.certified_accuracy(model, (x, y), [0, 0.01], lipschitz=1.0)
    result = json.loads(out_json.read_text())
    torch.testing.assert_close(torch.tensor(result["points"]["radius"], dtype=torch.float64), direct.radii,
                               rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_certify_errors(tiny, capsys):
    _, x, y, tmp_path = tiny
    data = ["--data", tmp_path / "data.pt"]
    weights = ["--state-dict", tmp_path / "weights.pt"]

    def error(argv):
        code, out, err = _run(argv, capsys)
        assert code == 2 and out == "", (out, err)
        return err

    err = error(["--model", "NoSuchNet", *weights, *data])
    assert "unknown --model 'NoSuchNet'" in err and "ConvNet" in err and "TinyNet" in err
    assert "needs --state-dict" in error(["--model", "TinyNet", *data])
    assert "not valid JSON" in error(["--model", "TinyNet", "--model-args", "{hidden: 8}", *weights, *data])
    err = error(["--model", "TinyNet", "--model-args", '{"width": 4}', *weights, *data])
    assert "could not build TinyNet(width=4)" in err
    err = error(["--model", "TinyNet", "--model-args", '{"hidden": 5}', *weights, *data, "--lipschitz", 1])
    assert "does not match TinyNet(hidden=5)" in err and "size mismatch" in err
    torch.save({"inputs": x, "labels": y}, tmp_path / "bad.pt")
    err = error(["--model", "TinyNet", *weights, "--data", tmp_path / "bad.pt"])
    assert "must hold {'x': inputs, 'y': labels}" in err and "inputs" in err
    torch.save({"x": torch.randn(5, 3, 3), "y": torch.zeros(5, dtype=torch.long)}, tmp_path / "shape.pt")
    err = error(["--model", "TinyNet", *weights, "--data", tmp_path / "shape.pt", "--lipschitz", 1])
    assert "does not accept the data's inputs of shape (3, 3)" in err
    torch.save({"x": x, "y": y.float()}, tmp_path / "float_labels.pt")
    err = error(["--model", "TinyNet", *weights, "--data", tmp_path / "float_labels.pt"])
    assert "integer class labels" in err
    torch.save({"x": x, "y": y + 3}, tmp_path / "range.pt")
    err = error(["--model", "TinyNet", *weights, "--data", tmp_path / "range.pt", "--lipschitz", 1])
    assert "labels must lie in [0, 3)" in err
    assert "no such file" in error(["--model", "TinyNet", "--state-dict", tmp_path / "missing.pt", *data])
    scripted = tmp_path / "model.ts"
    torch.jit.script(TinyNet()).save(str(scripted))
    err = error(["--scripted", scripted, *data])
    assert "--lipschitz L or use --smoothing" in err
    assert "go with --model" in error(["--scripted", scripted, *weights, *data, "--lipschitz", 1])
    assert "--pairwise needs the model's structure" in error(["--scripted", scripted, *data, "--lipschitz", 1,
                                                              "--pairwise"])
    assert "--sigma" in error(["--scripted", scripted, *data, "--smoothing"])
    with pytest.raises(SystemExit):  # certify does not pass unknown arguments anywhere
        cli.main(["certify", "--scripted", str(scripted), *map(str, data), "--lipschitz", "1", "--bogus"])
    with pytest.raises(SystemExit):  # one model source only
        cli.main(["certify", "--scripted", str(scripted), "--model", "TinyNet", *map(str, data)])


# --- lipkern train ------------------------------------------------------------------------------------------
@pytest.fixture
def one_thread_torch_backend(knobs):
    knobs(backend="torch")  # small networks: the reference path, one thread
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_train_then_certify_the_checkpoint(tmp_path, capsys, one_thread_torch_backend):
    """lipkern train writes a checkpoint, results.json and a plot; lipkern certify --checkpoint rebuilds the
    model and reproduces the certification; both agree with certified_accuracy called on a model built and
    loaded independently of the checkpoint loader."""
    certify = _certify_api()
    run = tmp_path / "run"
    code = cli.main(["train", "--model", "convnet-xs-aol", "--model-args", '{"width": 8}', "--epochs", "2",
                     "--batch-size", "32", "--train-limit", "128", "--lr", "0.05", "--threads", "1",
                     "--output-dir", str(run), "--no-progress", "--eps", "0", "0.05",
                     "--certify-limit", "60"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "certified accuracy" in out.out and "sound" in out.out and "epoch 2/2" in out.err
    assert (run / "checkpoint.pt").is_file()
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is an optional extra
        assert (run / "certified_accuracy.png").stat().st_size > 0
    trained = json.loads((run / "results.json").read_text())["certification"]

    code, out, err = _run(["--checkpoint", run / "checkpoint.pt", "--pairwise", "--method", "product",
                           "--limit", 60, "--eps", 0, 0.05, "--device", "cpu",
                           "--output", tmp_path / "c.json"], capsys)
    assert code == 0, err
    assert "convnet-xs-aol (checkpoint" in out and "digits test split" in out
    certified = json.loads((tmp_path / "c.json").read_text())
    assert certified["certified_count"] == trained["certified_count"]
    assert certified["points"]["radius"] == trained["points"]["radius"]
    # with the checkpoint alone: its training run's certificate settings (product, pairwise, evaluation, eps)
    code, out, err = _run(["--checkpoint", run / "checkpoint.pt", "--limit", 60, "--threads", 1, "--device", "cpu",
                           "--output", tmp_path / "d.json"], capsys)
    assert code == 0, err
    alone = json.loads((tmp_path / "d.json").read_text())
    assert alone["eps"] == trained["eps"] and alone["certified_count"] == trained["certified_count"]
    assert alone["lipschitz"]["method"] == "product" and alone["lipschitz"]["pairwise"]
    assert alone["points"]["radius"] == trained["points"]["radius"]

    from lipkern.bounds import lipschitz_bound
    from lipkern.data import load_dataset
    from lipkern.models import build_model

    model = build_model("convnet-xs-aol", num_classes=10, in_channels=1, input_size=8, width=8)
    model.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=True)["state_dict"])
    model.eval()
    x, y = load_dataset("digits", split="test")
    bound = lipschitz_bound(model, (1, 8, 8), method="product", pairwise=True)
    direct = certify.certified_accuracy(model, (x[:60], y[:60]), [0, 0.05], lipschitz=bound, pairwise=True)
    assert certified["clean_count"] == int(direct.correct.sum())
    radii = [math.inf if r is None else r for r in certified["points"]["radius"]]
    torch.testing.assert_close(torch.tensor(radii, dtype=direct.radii.dtype), direct.radii)


def test_runs_are_never_overwritten(tmp_path):
    """As a user runs it (subprocesses in one folder): a second run with the default folder goes to
    runs/<model>-<dataset>-2, an explicit folder holding a run is refused (exit 2, the checkpoint untouched), an
    --output-dir that is a file fails before any epoch, and --resume without --output-dir continues in the
    checkpoint's own folder, removing the earlier results that no longer describe it."""
    common = ["--model", "convnet-xs-aol", "--model-args", '{"width": 8}', "--epochs", "2", "--batch-size", "32",
              "--train-limit", "64", "--threads", "1", "--no-progress", "--no-certify"]
    env = dict(_env(), LIPKERN_BACKEND="torch")

    def train(*argv):
        return subprocess.run([sys.executable, "-m", "lipkern.cli", "train", *common, *argv], capture_output=True,
                              text=True, timeout=300, env=env, cwd=tmp_path)

    first, second = tmp_path / "runs" / "convnet-xs-aol-digits", tmp_path / "runs" / "convnet-xs-aol-digits-2"
    for folder in (first, second):
        proc = train("--stop-after", "1")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (folder / "checkpoint.pt").is_file(), proc.stderr[-2000:]
    saved = (first / "checkpoint.pt").read_bytes()
    proc = train("--output-dir", "runs/convnet-xs-aol-digits")
    assert proc.returncode == 2 and "holds an earlier run (checkpoint.pt, metrics.csv)" in proc.stderr, proc.stderr[-2000:]
    assert "--resume runs/convnet-xs-aol-digits/checkpoint.pt" in proc.stderr
    assert (first / "checkpoint.pt").read_bytes() == saved
    (tmp_path / "a_file").write_text("x")
    proc = train("--output-dir", "a_file")
    assert proc.returncode == 2 and "is a file" in proc.stderr and "epoch 1" not in proc.stderr, proc.stderr
    (first / "results.json").write_text("{}")  # as a finished earlier certification would have left it
    proc = train("--resume", str(first / "checkpoint.pt"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 2/2" in proc.stderr and "removed results.json" in proc.stderr
    assert torch.load(first / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert not (first / "results.json").exists()
    assert torch.load(second / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["convnet-xs-aol-digits",
                                                                     "convnet-xs-aol-digits-2"]


def test_resume_from_the_checkpoint_alone(tmp_path):
    """--resume with nothing else (or the help's form, --model and --epochs repeated) continues the run with its
    own options; an option given that contradicts the checkpoint is still refused."""
    env = dict(_env(), LIPKERN_BACKEND="torch")

    def train(*argv):
        return subprocess.run([sys.executable, "-m", "lipkern.cli", "train", "--threads", "1", "--no-progress",
                               "--no-certify", *argv], capture_output=True, text=True, timeout=300, env=env,
                              cwd=tmp_path)

    proc = train("--model", "convnet-xs-aol", "--model-args", '{"width": 8}', "--epochs", "3", "--batch-size", "32",
                 "--lr", "0.02", "--train-limit", "64", "--seed", "3", "--stop-after", "1", "--output-dir", "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    proc = train("--resume", str(checkpoint), "--stop-after", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 2/3" in proc.stderr and "batch 32" in proc.stderr and "lr 0.02" in proc.stderr, proc.stderr
    proc = train("--model", "convnet-xs-aol", "--resume", str(checkpoint), "--epochs", "3")  # the help's form
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 3 and state["model_args"]["width"] == 8
    assert {k: state["config"][k] for k in ("batch_size", "lr", "train_limit", "seed")} == dict(
        batch_size=32, lr=0.02, train_limit=64, seed=3)
    proc = train("--resume", str(checkpoint), "--epochs", "3", "--batch-size", "16")
    assert proc.returncode == 2 and "batch_size was 32 in the checkpoint, 16 now" in proc.stderr, proc.stderr


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_during_training_says_what_is_safe(tmp_path):
    """SIGINT to a running lipkern train (what Ctrl-C sends): exit code 130, one message naming the saved
    checkpoint and the --resume command, no traceback; the checkpoint loads and resumes."""
    env = dict(_env(), LIPKERN_BACKEND="torch")
    command = [sys.executable, "-m", "lipkern.cli", "train", "--model-args", '{"width": 8}', "--epochs", "50",
               "--batch-size", "32", "--train-limit", "128", "--threads", "1", "--no-progress", "--no-certify",
               "--output-dir", "run"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path)
    lines = []
    try:
        for line in proc.stderr:  # epoch 2's log line: epoch 1's checkpoint is on disk
            lines.append(line)
            if line.startswith("epoch 2/50"):
                break
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = "".join(lines) + rest
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    assert f"is safe in {Path('run') / 'checkpoint.pt'}" in err and "lipkern train --resume run/checkpoint.pt" in err
    assert torch.load(checkpoint, weights_only=True)["epoch"] >= 1


def test_train_errors(tmp_path, capsys, one_thread_torch_backend):
    def error(argv):
        code = cli.main(["train", "--output-dir", str(tmp_path), "--no-progress", *map(str, argv)])
        out = capsys.readouterr()
        assert code == 2, (out.out, out.err)
        return out.err

    assert "unknown model 'resnet18'" in error(["--model", "resnet18"])
    assert "not valid JSON" in error(["--model-args", "{width: 8}"])
    assert "batch_size must be a positive integer" in error(["--batch-size", "0"])
    assert "needs root" in error(["--dataset", "mnist"])
    assert "could not build" in error(["--model-args", '{"width": 3}'])
    assert "--input-size 16" in error(["--model", "lmt", "--dataset", "digits", "--epochs", "1"])
    assert "save_best must be 'val' or 'certified@EPS'" in error(["--val-split", "0.2", "--save-best", "acc"])
    assert "give val_split > 0" in error(["--save-best", "certified@0.1"])
    if not torch.cuda.is_available():  # a CUDA device on this torch: a clear message, not an AssertionError
        assert "use --device cpu" in error(["--device", "cuda", "--epochs", "1"])
        code, _, err = _run(["--model", "TinyNet", "--device", "cuda", "--data", tmp_path / "none.pt"], capsys)
        assert code == 2 and "use --device cpu" in err, err
    with pytest.raises(SystemExit):
        cli.main(["train", "--loss", "mse"])
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    code, _, err = _run(["--checkpoint", tmp_path / "w.pt", "--dataset", "digits"], capsys)
    assert code == 2 and "not a lipkern train checkpoint" in err
    code, _, err = _run(["--checkpoint", tmp_path / "w.pt", "--state-dict", tmp_path / "w.pt"], capsys)
    assert code == 2 and "go with --model" in err
    torch.save({"format": "lipkern-train-1", "state_dict": {}}, tmp_path / "ckpt.pt")
    code, _, err = _run(["--model", "ConvNet", "--state-dict", tmp_path / "ckpt.pt", "--dataset", "digits"],
                        capsys)
    assert code == 2 and "certify it with --checkpoint" in err


def test_train_save_best_and_tensorboard_options():
    """--save-best alone means the val accuracy, --save-best certified@EPS the certified one; --tensorboard /
    --no-tensorboard override the default (on when installed)."""
    from lipkern.cli.train import _config_from_args

    def config(*argv):
        return _config_from_args(cli.parse_args(["train", *argv]))

    assert config("--val-split", "0.1", "--save-best").save_best == "val"
    assert config("--save-best", "certified@0.141", "--epochs", "3").save_best == "certified@0.141"
    assert config().save_best is None and config().tensorboard is None
    assert config("--tensorboard").tensorboard is True and config("--no-tensorboard").tensorboard is False


def test_plot_title_wraps_instead_of_clipping():
    model = "convnet-xs-aol (checkpoint runs/" + "a-long-folder-name/" * 8 + "checkpoint.pt, epoch 30)"
    title = cli.certify.plot_title({"model": model, "mode": "lipschitz-margin", "num_points": 360})
    lines = title.split("\n")
    assert len(lines) > 1 and all(len(line) <= 80 for line in lines)
    assert "".join(title.split()) == "".join(f"{model} (lipschitz-margin, 360 points)".split())


def test_version_has_one_source(capsys):
    """lipkern --version prints the package version, which pyproject.toml reads from lipkern.__version__."""
    import tomllib
    from importlib.metadata import version

    import lipkern

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"lipkern {lipkern.__version__}"
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert version("lipkern") == lipkern.__version__


def test_train_help_lists_every_model_with_its_recipe(capsys):
    from lipkern.models import MODEL_FAMILIES
    from lipkern.train import RECIPES

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for name, family in MODEL_FAMILIES.items():
        assert name in text
        assert f"{family} ({RECIPES[family]['source']}): loss {RECIPES[family]['loss']}" in text


def test_certify_under_torchrun_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m lipkern.cli certify --smoothing ...` (gloo on the CPU): the points are
    shared out by index, each keeps its noise seed, and rank 0 writes one file equal to one process's, point
    for point; the margin certificate too (its bound computed once, the margins and the rounding analysis of the
    network as it runs shared out), including a model whose structure is known (the sound bound, float32)."""
    from lipkern.models import ConvNet

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    torch.jit.save(torch.jit.script(net), tmp_path / "net.pt")
    torch.save({"x": torch.randn(9, 2, 3, 2), "y": torch.randint(0, 3, (9,))}, tmp_path / "data.pt")
    conv_args = {"size": "XS", "layer": "aol", "in_channels": 1, "num_classes": 3, "image_size": 8, "width": 4}
    torch.save(ConvNet(**conv_args).state_dict(), tmp_path / "conv.pt")
    torch.save({"x": torch.rand(7, 1, 8, 8), "y": torch.randint(0, 3, (7,))}, tmp_path / "images.pt")
    common = ["certify", "--device", "cpu", "--threads", "1", "--eps", "0.0", "0.1"]
    scripted = ["--scripted", str(tmp_path / "net.pt"), "--data", str(tmp_path / "data.pt")]
    cases = {"smoothing": [*scripted, "--smoothing", "--sigma", "0.5", "--num-select", "20", "--num-samples",
                           "200", "--alpha", "0.01", "--batch-size", "64", "--seed", "3"],
             "margin": [*scripted, "--lipschitz", "2.0"],
             "sound": ["--model", "ConvNet", "--model-args", json.dumps(conv_args), "--state-dict",
                       str(tmp_path / "conv.pt"), "--data", str(tmp_path / "images.pt"), "--batch-size", "2"]}
    env = dict(_env(), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for name, extra in cases.items():
        one, two = tmp_path / f"{name}1.json", tmp_path / f"{name}2.json"
        single = subprocess.run([sys.executable, "-m", "lipkern.cli", *common, *extra, "--output", str(one)],
                                capture_output=True, text=True, timeout=300, env=env)
        assert single.returncode == 0, single.stderr[-3000:]
        ranked = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 "2", "-m", "lipkern.cli", *common, *extra, "--output", str(two)],
                                capture_output=True, text=True, timeout=300, env=env)
        assert ranked.returncode == 0, ranked.stdout[-3000:] + ranked.stderr[-3000:]
        a, b = json.loads(one.read_text()), json.loads(two.read_text())
        assert a["points"].keys() == b["points"].keys()
        for key in set(a["points"]) - {"seconds"}:
            assert a["points"][key] == b["points"][key], (name, key)
        assert a["certified_count"] == b["certified_count"] and b["ranks"] == 2 and "ranks" not in a
        assert a.get("lipschitz") == b.get("lipschitz")
        assert a.get("evaluation") == b.get("evaluation") and a.get("rounding_max") == b.get("rounding_max")
        assert ranked.stdout.count("certified accuracy") == 1  # one table, from rank 0
