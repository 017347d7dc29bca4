"""Benchmark fixtures: device, quick/full mode, time-boxed synchronized timing, peak memory, TF32 settings,
machine and version info, one progress line per case, and the record of skipped cases in the JSON.

Time box: every case has a wall-clock budget (``LIPKERN_BENCH_BUDGET_S``; default 15 s quick / 60 s full on a
GPU, 20 s / 60 s on a CPU). ``run_timed`` times the first call (compilation, autotuning) and the warm-up
calls, skips the case when one call does not fit the budget, and otherwise runs as many rounds as the mode
asks for and the budget allows (fewer rounds are recorded as ``time_boxed`` in the JSON). A hard limit on the
whole test call (``LIPKERN_BENCH_HARD_LIMIT_S``, default 1.5 × budget + 10 s, 40 s for the CPU's 20 s; SIGALRM,
acted on between Python bytecodes, so not inside one long CUDA call) stops a case whose single call runs long
(a 62 s case against 20 s ran to its end before) and one that hangs: a skip too. Every skip, with its
reason, is written to the JSON under ``skipped`` (``time_box``: true when the time box caused it).

CPU timings use one thread by default (``LIPKERN_BENCH_CPU_THREADS``): on a loaded 2-core machine two OpenMP
threads stall each other at every barrier and small ops vary by 100× between runs.

Paired rounds (CPU): a shared VM's speed drifts by 10–30 % within minutes, more than most differences between
providers, so on the CPU every other provider of a case is timed round by round against lipkern's own call of
the same case (kept from the lipkern test, which runs first): one lipkern call, then the provider's call, in
every round. The ratio of the case is the ratio of these two medians (``paired_lipkern_median_s`` in the JSON);
the lipkern row itself reports its own test's rounds. GPU timings (CUDA events) are not paired.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading
import time

import pytest
import torch

import lipkern  # here, not in a timed case: importing lipkern takes ~0.6 s (Triton, torch.library)
from lipkern import _dispatch

QUICK = os.environ.get("LIPKERN_BENCH_MODE", "quick") != "full"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def _float_env(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


BUDGET_S = _float_env("LIPKERN_BENCH_BUDGET_S",
                      (15.0 if QUICK else 60.0) if ON_GPU else (20.0 if QUICK else 60.0))
HARD_LIMIT_S = _float_env("LIPKERN_BENCH_HARD_LIMIT_S", 1.5 * BUDGET_S + 10)
CPU_THREADS = int(_float_env("LIPKERN_BENCH_CPU_THREADS", 1))
# Rounds: at least MIN_ROUNDS and enough for MIN_TIME_S of timed calls, at most MAX_ROUNDS (then the budget).
if ON_GPU:
    WARMUP, MIN_ROUNDS, MIN_TIME_S, MAX_ROUNDS = (3, 20, 0.25, 500) if QUICK else (10, 100, 2.0, 5000)
else:
    WARMUP, MIN_ROUNDS, MIN_TIME_S, MAX_ROUNDS = (3, 15, 2.0, 5000) if QUICK else (5, 30, 5.0, 20000)
FEWEST_ROUNDS = 3  # below this a case is skipped rather than reported from too few samples


def _tf32_settings() -> tuple[bool, bool]:
    """(matmul, cudnn) for every provider: ``LIPKERN_BENCH_TF32`` = default (PyTorch's: matmul off, cuDNN on),
    on or off."""
    mode = os.environ.get("LIPKERN_BENCH_TF32", "default").strip().lower()
    if mode in ("on", "1", "true"):
        return True, True
    if mode in ("off", "0", "false"):
        return False, False
    return False, True


TF32_MATMUL, TF32_CUDNN = _tf32_settings()


def _apply_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = TF32_MATMUL
    torch.backends.cudnn.allow_tf32 = TF32_CUDNN


def _current_tf32() -> dict:
    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32}


def _git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__), text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment_info() -> dict:
    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (timings are CPU timings)"
    info = {"device": device,
            "torch": torch.__version__, "cuda": torch.version.cuda, "git_sha": _git_sha(),
            "mode": "quick" if QUICK else "full", **_current_tf32(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cpu_threads": torch.get_num_threads(), "budget_s": BUDGET_S, "hard_limit_s": HARD_LIMIT_S,
            "min_rounds": MIN_ROUNDS, "min_time_s": MIN_TIME_S}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["lipkern_C"] = lipkern.cuda_extension_available()
    info["lipkern_cpu"] = lipkern.cpu_kernels_available()  # the C++ CPU kernels ran where they apply
    info["knobs"] = _dispatch.knobs()  # LIPKERN_* and TRITON_INTERPRET as set for this run
    info["autocast"] = {"cuda": torch.is_autocast_enabled("cuda"), "cpu": torch.is_autocast_enabled("cpu")}
    return info


# --- session state: groups, progress, skipped cases ---------------------------------------------------------
_GROUPS: dict[str, str] = {}  # nodeid -> benchmark group
_RESULTS: dict[str, str] = {}  # nodeid -> one-line timing summary for the progress line
_REFERENCE: dict = {}  # the last CPU case's lipkern call: {case key: fn} (one case kept at a time)
_SKIPPED: dict[str, dict] = {}  # nodeid -> record written to the JSON
_PROGRESS = {"done": 0, "total": 0, "start": time.perf_counter()}


def _group_of(item) -> str | None:
    marker = item.get_closest_marker("benchmark")
    return marker.kwargs.get("group") if marker else None


def pytest_configure(config):
    import torch._dynamo  # noqa: F401  (the first custom-op call imports it, ~1 s: not the first case's time)

    _apply_tf32()
    if DEVICE.type == "cpu" and CPU_THREADS > 0:
        torch.set_num_threads(CPU_THREADS)
    _PROGRESS["start"] = time.perf_counter()
    stale = config.getoption("benchmark_json", None)
    if stale and os.path.exists(stale):  # so that a run that times nothing never leaves an old file in place
        os.remove(stale)


def pytest_collection_modifyitems(config, items):
    """The group name (aol-fwd, aol-fwdbwd, model-train-step, ...) becomes a keyword, so ``-k fwdbwd`` or
    ``-k model-train-step`` select by group as well as by test name and provider."""
    for item in items:
        group = _group_of(item)
        if group:
            item.extra_keyword_matches.add(group)
            _GROUPS[item.nodeid] = group


def pytest_collection_finish(session):
    _PROGRESS["total"] = len(session.items)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lipkern"] = environment_info()


def _skip_record(nodeid: str, reason: str) -> dict:
    name = nodeid.split("::")[-1]
    return {"fullname": nodeid, "name": name, "group": _GROUPS.get(nodeid), "reason": reason,
            "time_box": reason.startswith("time box"), "budget_s": BUDGET_S}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    for bench in output_json.get("benchmarks", []):  # the per-round times (MBs on a CPU): stats are kept
        bench.get("stats", {}).pop("data", None)
    output_json["skipped"] = list(_SKIPPED.values())
    output_json["time_box"] = {"budget_s": BUDGET_S, "hard_limit_s": HARD_LIMIT_S}


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """pytest-benchmark writes no JSON when no case ran; write one that still lists the skipped cases."""
    path = session.config.getoption("benchmark_json", None)
    if not path or os.path.exists(path):
        return
    import json

    with open(path, "w") as fh:
        json.dump({"machine_info": {"lipkern": environment_info()}, "benchmarks": [],
                   "skipped": list(_SKIPPED.values()),
                   "time_box": {"budget_s": BUDGET_S, "hard_limit_s": HARD_LIMIT_S}}, fh, indent=2)


def pytest_report_teststatus(report, config):
    """No progress dots in quiet mode: ``pytest_runtest_logreport`` prints one line per case instead."""
    if config.option.verbose <= 0 and (report.when == "call" or (report.skipped and report.when == "setup")):
        return report.outcome, "", report.outcome.upper()
    return None


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        _SKIPPED[report.nodeid] = _skip_record(report.nodeid, reason)
        status = f"skipped: {reason}"
    elif report.when == "call":
        status = _RESULTS.get(report.nodeid, report.outcome) if report.passed else report.outcome.upper()
    elif report.failed:  # setup or teardown error
        status = f"{report.when} ERROR"
    else:
        return
    _PROGRESS["done"] += 1
    elapsed = time.perf_counter() - _PROGRESS["start"]
    case = report.nodeid.split("/")[-1]
    line = f"[{_PROGRESS['done']:>3}/{_PROGRESS['total']} {elapsed:6.1f} s] {case}: {status}"
    reporter = _terminal_reporter[0]
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(line)
        reporter.flush()


_terminal_reporter: list = [None]


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    _terminal_reporter[0] = session.config.pluginmanager.get_plugin("terminalreporter")


# --- hard time box on the whole test call -------------------------------------------------------------------
class _HardTimeBox(BaseException):
    """Raised by SIGALRM; a BaseException, so that no ``except Exception`` in the code under test eats it."""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    use_alarm = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    previous = None
    if use_alarm:
        def on_alarm(signum, frame):
            raise _HardTimeBox()

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, HARD_LIMIT_S)
    try:
        return (yield)
    except _HardTimeBox:
        fixture = getattr(item, "funcargs", {}).get("benchmark")
        if fixture is not None:
            fixture.has_error = True  # drop its partial statistics from the JSON
        raise pytest.skip.Exception(f"time box: {item.nodeid} ran past the hard limit of {HARD_LIMIT_S:g} s "
                                    f"(budget {BUDGET_S:g} s per case)") from None
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def _same_tf32_for_every_provider():
    """Every case starts with the session's TF32 settings, whatever an earlier case or library changed."""
    _apply_tf32()
    yield
    _apply_tf32()


# --- timing -------------------------------------------------------------------------------------------------
def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _timed_call(fn) -> float:
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def plan_rounds(per_call_s: float, remaining_s: float) -> tuple[int, bool]:
    """(rounds, time_boxed): enough rounds for MIN_TIME_S (at least MIN_ROUNDS, at most MAX_ROUNDS), cut to
    what fits in ``remaining_s`` (90% of it, for the variance of the calls)."""
    per_call_s = max(per_call_s, 1e-7)
    wanted = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(MIN_TIME_S / per_call_s)))
    fits = int(0.9 * max(remaining_s, 0.0) / per_call_s)
    return (wanted, False) if fits >= wanted else (fits, True)


def event_timing(fn, rounds: int) -> dict:
    """GPU timing without a synchronize inside the timed region (the method of ``triton.testing.do_bench``,
    for a fixed number of calls): per call, zero a 256 MB buffer (L2 flushed), record a CUDA event, call,
    record an event; one synchronize at the end. Median and IQR of the ``rounds`` calls, in seconds."""
    cache = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=DEVICE)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    for start, end in zip(starts, ends):
        cache.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends))
    quantile = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"median_s": quantile(0.5), "iqr_s": quantile(0.75) - quantile(0.25), "event_rounds": len(times),
            "l2_flushed": True}


def _case_key(request) -> tuple:
    """The case of a test: its function and parameters, the provider left out."""
    callspec = getattr(request.node, "callspec", None)
    params = {} if callspec is None else {k: v for k, v in callspec.params.items() if k != "provider"}
    return request.node.nodeid.split("[")[0], repr(sorted(params.items(), key=lambda kv: kv[0]))


@pytest.fixture
def run_timed(benchmark, request):
    """Time ``fn`` within the case's budget: a first call and warm-up calls (their time counts against the
    budget), peak memory of one call beyond the inputs (CUDA), then synchronized rounds; median reported."""

    def run(fn, provider: str, **extra):
        case, key = request.node.nodeid.split("/")[-1], _case_key(request)
        events = DEVICE.type == "cuda"
        reference = None if events or provider == "lipkern" else _REFERENCE.get(key)
        start = time.perf_counter()
        _dispatch.implementations(clear=True)
        first = _timed_call(fn)
        if provider.startswith("lipkern"):  # which implementation and precision scheme lipkern's ops ran
            extra.setdefault("implementation", _dispatch.implementations())
        if first > BUDGET_S:
            pytest.skip(f"time box: one call of {case} took {first:.1f} s, over the {BUDGET_S:g} s budget")
        # Calls after the first (which may compile or autotune): always one, more while within half the
        # budget; their minimum plans the rounds.
        warm = [_timed_call(fn)]
        while len(warm) < WARMUP - 1 and time.perf_counter() - start + min(warm) <= BUDGET_S / 2:
            warm.append(_timed_call(fn))
        per_call = min(warm)
        if reference is not None:  # each round also runs lipkern's call
            per_call += _timed_call(reference)
        peak = None
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            per_call = min(per_call, _timed_call(fn))
            peak = torch.cuda.max_memory_allocated() - base
        rounds, time_boxed = plan_rounds(per_call, BUDGET_S - (time.perf_counter() - start))
        if rounds < FEWEST_ROUNDS:
            pytest.skip(f"time box: {case} takes {per_call:.2f} s per call; only {rounds} round(s) fit in "
                        f"the {BUDGET_S:g} s budget after {time.perf_counter() - start:.1f} s of warm-up")

        def step():
            fn()
            _sync()

        reference_times = []

        def paired_round():  # pytest-benchmark calls it before each timed round, outside the round's time
            reference_times.append(_timed_call(reference))

        if events:  # the timings are do_bench's; pytest-benchmark keeps a few synchronized rounds for its JSON
            extra.update(event_timing(fn, rounds))
            rounds = FEWEST_ROUNDS
        benchmark.pedantic(step, setup=paired_round if reference is not None else None, rounds=rounds,
                           iterations=1, warmup_rounds=0)
        if reference_times:
            extra["paired_lipkern_median_s"] = sorted(reference_times)[len(reference_times) // 2]
        elif provider == "lipkern" and not events:
            _REFERENCE.clear()
            _REFERENCE[key] = fn
        benchmark.extra_info.update(provider=provider, peak_bytes=peak, device=str(DEVICE), rounds=rounds,
                                    time_boxed=time_boxed, budget_s=BUDGET_S, first_call_s=first,
                                    timing="cuda-events" if events else "perf_counter",
                                    **_current_tf32(), **extra)
        median = extra.get("median_s", benchmark.stats.stats.median)
        note = f", time-boxed to {rounds} rounds" if time_boxed else f", {rounds} rounds"
        if reference_times:
            note += f", paired with lipkern {extra['paired_lipkern_median_s'] * 1e3:.3f} ms"
        mem = f", peak {peak / 2**20:.1f} MiB" if peak is not None else ""
        _RESULTS[request.node.nodeid] = f"{provider} median {median * 1e3:.3f} ms{note}{mem}"

    return run
