#!/usr/bin/env bash
# One GPU session in one call of at most 10 minutes: build lipkern._C for this GPU only, run the gpu-marked
# tests, the quick benchmarks and a profile of the AOL kernels; logs and results go to ${OUT}.
# No network: nothing is downloaded (pip --no-build-isolation --no-deps).
#
# Stages, each under `timeout` (SIGINT, then SIGKILL after a grace period); budgets sum to 440 s, 480 s (8 min)
# with every grace period used:
#   1 machine   10 s (+5)   GPU, driver, versions, which optional packages import     -> machine.txt
#   2 build     80 s (+10)  lipkern._C for the present compute capability only        -> build.log
#   3 tests    130 s (+10)  pytest -m gpu tests, -n 8 when pytest-xdist imports       -> gpu-tests.log
#   4 bench    200 s (+10)  lipkern bench (quick; CUDA-event timings): table, JSON,   -> bench.log bench.json ratios.png
#                           ratio plot
#   5 profile   20 s (+5)   torch.profiler key_averages of the AOL kernels            -> profile.txt
# session.log has each stage's exit code and duration (124: it ran out of its budget). 8 files at most.
set -uo pipefail
OUT=${OUT:-benchmarks/results/latest}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$SECONDS

stage() {  # stage NAME BUDGET GRACE LOG FUNCTION (one of those below, run by a child bash under timeout)
  local name=$1 budget=$2 grace=$3 log=$4 func=$5 t0=$SECONDS rc
  echo "== $name: budget ${budget} s, started at $((t0 - START)) s" | tee -a "$OUT/session.log"
  timeout -s INT -k "$grace" "$budget" bash -c "$func" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')" \
    | tee -a "$OUT/session.log"
  return "$rc"
}

machine_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  "$PY" - <<'EOF'
import importlib.util, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda)
for name in ("triton", "xdist", "pytest_benchmark", "matplotlib", "orthogonium", "scipy", "tqdm", "hypothesis"):
    spec = importlib.util.find_spec(name)
    print(f"{name}: {'yes' if spec else 'no'}", end="  ")
print()
# TF32 operand rounding (lipkern.certify.rounding assumes truncation, 2^-10): a = 1 + 2^-10 - 2^-23 has its
# first 10 mantissa bits zero, so a*1 is 1 if operands are truncated, 1 + 2^-10 if rounded to nearest.
torch.backends.cuda.matmul.allow_tf32 = True
a = torch.full((16, 16), 1 + 2.0**-10 - 2.0**-23, device="cuda")
product = (a @ torch.eye(16, device="cuda"))[0, 0].item()
print("TF32 operands:", "truncated" if product == 1.0 else f"not truncated (a*1 = {product!r})")
EOF
}

build() {
  local cap
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
  export LIPKERN_CUDA_GENCODE="-gencode=arch=compute_${cap},code=sm_${cap}"
  echo "LIPKERN_CUDA_GENCODE=$LIPKERN_CUDA_GENCODE"
  "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
  "$PY" -c "import lipkern; print('lipkern._C built:', lipkern.cuda_extension_available())"
}

gpu_tests() {
  local parallel=()
  if "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n 8); else echo "pytest-xdist missing: serial run"; fi
  "$PY" -m pytest -q -m gpu tests -p no:cacheprovider --durations=10 "${parallel[@]}"
}

bench() {
  local plot=()
  if "$PY" -c "import matplotlib" 2>/dev/null; then plot=(--plot "$OUT/ratios.png"); fi
  "$PY" -m lipkern.cli bench ${BENCH_FLAGS:-} --output "$OUT/bench.json" "${plot[@]}"
}

profile_aol() {
  "$PY" benchmarks/profile_aol.py --output -
}

export OUT PY
export -f machine_info build gpu_tests bench profile_aol
stage machine 10 5 "$OUT/machine.txt" machine_info
stage build 80 10 "$OUT/build.log" build
stage tests 130 10 "$OUT/gpu-tests.log" gpu_tests
stage bench 200 10 "$OUT/bench.log" bench
stage profile 20 5 "$OUT/profile.txt" profile_aol
echo "== session: $((SECONDS - START)) s; files in $OUT:" | tee -a "$OUT/session.log"
ls -la "$OUT" | tee -a "$OUT/session.log"
