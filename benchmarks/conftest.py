"""Benchmark fixtures: device, quick/full mode, synchronized timing, peak memory, machine and version info."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

QUICK = os.environ.get("LIPKERN_BENCH_MODE", "quick") != "full"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__), text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment_info() -> dict:
    info = {"device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (timings are CPU timings)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "git_sha": _git_sha(),
            "mode": "quick" if QUICK else "full", "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    import lipkern

    info["lipkern_C"] = lipkern.cuda_extension_available()
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lipkern"] = environment_info()


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def run_timed(benchmark):
    """Time ``fn`` (warm-up, then synchronized rounds) and record its peak memory beyond the inputs."""

    def run(fn, provider: str, **extra):
        for _ in range(3 if QUICK else 10):
            fn()
        _sync()
        peak = None
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            _sync()
            peak = torch.cuda.max_memory_allocated() - base

        def step():
            fn()
            _sync()

        rounds = (5 if DEVICE.type == "cpu" else 20) if QUICK else 100
        benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
        benchmark.extra_info.update(provider=provider, peak_bytes=peak, device=str(DEVICE), **extra)

    return run
