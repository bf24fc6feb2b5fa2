#!/usr/bin/env bash
# Incremental developer build: compiles only what changed and drops the extension next to the
# sources, so `PYTHONPATH=python python -m pytest tests` runs against it.
#   bash scripts/dev_build.sh [extra cmake args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -f build/dev/CMakeCache.txt ]; then
  gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S . -B build/dev "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v "$PY")" \
    -DMEDUSA_RT_PYTHON=ON -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/python/medusa_rt" "$@"
fi
cmake --build build/dev -j "$(nproc)"
