#!/usr/bin/env bash
# On a GPU machine (e.g. the lent H100): build the extension with its CUDA kernels against the
# machine's own torch, run the op tests (CUDA cases included) and the benchmark. Logs go to $OUT
# when set. Usage: [BENCH_ONLY=step] bash tools/gpu_check.sh [pytest paths...]
# (BENCH_ONLY: one group of benchmark rows, as --only; a device call is limited to 10 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mtv_gpu}"; mkdir -p "$OUT"
# The system compiler: the lent machines preset CXX to a wrapped /opt/gcc g++ whose objects break
# C++ exceptions thrown from the extension (a segfault on the first TORCH_CHECK).
if [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" FORCE_CUDA=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -m pytest -q -x -p no:cacheprovider ${@:-tests/ops} 2>&1 | tee "$OUT/pytest.log" | tail -15
python3 tools/benchmark.py --device cuda ${BENCH_ONLY:+--only "$BENCH_ONLY"} --json "$OUT/bench_cuda.json" 2>&1 \
    | tee "$OUT/bench.log"
