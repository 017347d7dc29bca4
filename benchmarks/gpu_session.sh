#!/usr/bin/env bash
# One GPU session in one call: build lipkern._C against the machine's CUDA torch, run the gpu-marked tests,
# run the benchmark suite, and leave logs and JSON in ${OUT:-benchmarks/results/latest}.
set -uo pipefail
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c \
  "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; \
} 2>&1 | tee "$OUT/machine.txt"
python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3 | tee "$OUT/build.log"
python3 -c "import lipkern; print('lipkern._C built:', lipkern.cuda_extension_available())" | tee -a "$OUT/build.log"
python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu-tests.log"
python3 -m lipkern.cli bench ${BENCH_FLAGS:---full} --output "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
# Memory checking of the compiled CUDA kernels (small shapes; skipped when the tool is missing).
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck python3 -m pytest -q -m gpu tests/ops/test_power_iteration_cuda.py \
    -k "not 70000" 2>&1 | tail -20 | tee "$OUT/sanitizer.log"
fi
