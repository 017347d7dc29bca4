"""`lipkern bench` runs the benchmark suite end to end and prints the comparison table (CPU smoke run)."""

import json
import subprocess
import sys


def test_bench_cli_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "lipkern.cli", "bench", "--output", str(out), "--",
                           "-k", "channels or c16 or train_step"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CPU timings" in proc.stdout
    data = json.loads(out.read_text())
    providers = {b["extra_info"]["provider"] for b in data["benchmarks"]}
    assert {"lipkern", "eager", "plain"} <= providers
    assert data["machine_info"]["lipkern"]["torch"]
    assert "x lipkern" in proc.stdout
