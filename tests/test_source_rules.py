"""Rules of the source tree that keep the CPU build and the public headers CUDA-free."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_INCLUDE = re.compile(r'#\s*include\s*[<"](cuda[^>"]*|cutlass/[^>"]*|cute/[^>"]*|cublas[^>"]*|nvrtc[^>"]*)[>"]')


def test_only_cpp_cuda_includes_cuda_headers():
    offenders = []
    for p in list((ROOT / "cpp").rglob("*")) + list((ROOT / "include").rglob("*")):
        if p.suffix not in (".h", ".cc", ".cuh", ".cu", ".hpp") or (ROOT / "cpp" / "cuda") in p.parents:
            continue
        if p.suffix in (".cu", ".cuh") or CUDA_INCLUDE.search(p.read_text()):
            offenders.append(str(p.relative_to(ROOT)))
    assert offenders == [], f"CUDA code outside cpp/cuda: {offenders}"


def test_cuda_sources_are_built_by_cmake():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for p in (ROOT / "cpp" / "cuda").glob("*.cu"):
        assert f"cpp/cuda/{p.name}" in cmake, f"{p.name} is not compiled by the CUDA build"
