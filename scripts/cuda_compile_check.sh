#!/usr/bin/env bash
# Compiles the CUDA backend (cpp/cuda) and links the library with it, without running anything:
# CI runs this on a machine with nvcc and no GPU so that GPU code cannot rot unnoticed.
#   bash scripts/cuda_compile_check.sh
# Without nvcc it is skipped, unless MEDUSA_RT_REQUIRE_CUDA_COMPILE=1 (CI) makes that an error.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v nvcc >/dev/null; then
  if [ "${MEDUSA_RT_REQUIRE_CUDA_COMPILE:-0}" = 1 ]; then
    echo "CUDA compile check: nvcc not found (MEDUSA_RT_REQUIRE_CUDA_COMPILE=1)" >&2
    exit 1
  fi
  echo "CUDA compile check skipped: nvcc not found"
  exit 0
fi
"$PY" -m pip install --quiet "nvidia-cutlass>=3.5"
t0=$(date +%s)
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S . -B build/cuda-check "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DMEDUSA_RT_CUDA=ON -DMEDUSA_RT_PYTHON=OFF \
  -DPython_EXECUTABLE="$(command -v "$PY")" >/dev/null
cmake --build build/cuda-check --target medusa_rt -j "$(nproc)"
echo "CUDA compile check: cpp/cuda compiled for sm_80 and sm_90a and linked ($(($(date +%s) - t0)) s, $(nvcc --version | tail -1))"
