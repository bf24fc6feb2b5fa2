#!/usr/bin/env bash
# The prepared GPU check: builds medusa_rt with the CUDA backend, runs the GPU tests (every kernel
# against the CPU backend and NumPy, HF logits, GPU vs CPU greedy, lossless Medusa on the GPU),
# then the CUDA benchmark (Llama-7B shapes, random fp16 weights; bench/bench_cuda.py).
#   OUT=/some/dir bash scripts/gpu_check.sh
# Writes under $OUT (default ./gpu_out): device.txt, build.log, gpu_tests.log, gpu_tests.xml,
# bench_cuda.json, bench_cuda.log. Exit status: non-zero if the build, a test or the benchmark failed.
# Needs nvcc, CMake, ninja, pybind11, torch, transformers and the CUTLASS headers: the
# nvidia-cutlass package, or its wheel in .whl/ on a machine without network (docs/CUDA.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT/device.txt" 2>&1
nvcc --version | tail -2 >>"$OUT/device.txt"
if ! "$PY" -c "import cutlass_library" 2>/dev/null && ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/mrt-site .whl/nvidia_cutlass-*.whl
  export PYTHONPATH=/tmp/mrt-site${PYTHONPATH:+:$PYTHONPATH}
fi

# 1. Build: the package is staged in build/gpu/python so the CPU dev build is left alone.
t0=$(date +%s)
rm -rf build/gpu/python && mkdir -p build/gpu/python && cp -r python/medusa_rt build/gpu/python/
rm -f build/gpu/python/medusa_rt/*.so*
{
  cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DMEDUSA_RT_CUDA=ON -DMEDUSA_RT_PYTHON=ON \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v "$PY")" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/build/gpu/python/medusa_rt" &&
    cmake --build build/gpu -j "$(nproc)"
} >"$OUT/build.log" 2>&1 || { echo "BUILD FAILED (see build.log)"; tail -30 "$OUT/build.log"; exit 1; }
echo "build: $(($(date +%s) - t0)) s"
export PYTHONPATH=$PWD/build/gpu/python${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import medusa_rt, sys; n = medusa_rt.cuda_device_count(); print('CUDA devices:', n); sys.exit(n == 0)" ||
  { echo "the CUDA build sees no GPU"; exit 1; }

# 2. GPU tests (and the CPU-side halves of the same files).
t0=$(date +%s)
PYTHONUNBUFFERED=1 timeout 300 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_backend_ops.py tests/test_cuda.py \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "tests: $(($(date +%s) - t0)) s"

# 3. Benchmark.
t0=$(date +%s)
PYTHONUNBUFFERED=1 timeout 300 "$PY" bench/bench_cuda.py --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench_cuda.log" | tail -80
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "bench: $(($(date +%s) - t0)) s"
exit $status
