"""The C++ integration: public headers compile on their own and stay CUDA-free; the example
program builds against the installed CMake package and generates the same tokens as Python."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import medusa_rt

from _medusa_heads import fit_heads, training_prompts, write_heads_only
from _tiny_models import build_hf_model, save_and_export

REPO = Path(__file__).resolve().parent.parent
HEADERS = ["engine.h", "errors.h", "tree.h", "version.h"]


def _cmake_dir() -> Path:
    env = os.environ.get("MEDUSA_RT_CMAKE_DIR")
    if env:
        return Path(env)
    try:
        return medusa_rt.cmake_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


CUDA_CODE = re.compile(r"#\s*include\s*[<\"](cuda|cutlass|cute|cublas|nvrtc)|\bcuda[A-Z]\w*|\bcu[A-Z]\w*_t\b|"
                       r"\bCU[a-z]\w*|__(global|device|host|shared)__|\bCUDA_\w+|__nv_bfloat16|__half\b")


def _include_dir() -> Path:
    return _cmake_dir().parent.parent.parent / "include"


@pytest.mark.parametrize("header", HEADERS)
def test_headers_self_contained_and_cuda_free(tmp_path, header):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    for inc in (REPO / "include", _include_dir()):
        text = (inc / "medusa_rt" / header).read_text()
        # The API may name the device ("cuda"), but no CUDA header, type or keyword appears.
        assert not CUDA_CODE.search(text), CUDA_CODE.search(text)
        src = tmp_path / "t.cc"
        src.write_text(f'#include "medusa_rt/{header}"\nint main() {{ return 0; }}\n')
        subprocess.run([cxx, "-std=c++17", "-Wall", "-Werror", "-fsyntax-only", f"-I{inc}", str(src)], check=True)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("no cmake")
    build = tmp_path_factory.mktemp("example-build")
    subprocess.run(["cmake", "-S", str(REPO / "examples" / "cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    f"-Dmedusa_rt_DIR={_cmake_dir()}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    exe = build / "medusa_generate"
    assert exe.is_file()
    return exe


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("cpp-model")
    model = build_hf_model("llama-gqa-untied", seed=5)
    d = save_and_export(model, tmp, "base")
    heads = fit_heads(model, training_prompts(384, 6), num_heads=3, steps=120)
    from medusa_rt.export import export_medusa_heads

    export_medusa_heads(write_heads_only(heads, tmp / "heads"), d, progress=False)
    return d


def _run(exe: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *args], capture_output=True, text=True)


@pytest.mark.parametrize("medusa", [True, False])
@pytest.mark.parametrize("sample", [False, True])
def test_example_matches_python(example, model_dir, medusa, sample):
    prompt = training_prompts(384, 1)[0]
    args = [str(model_dir), *map(str, prompt), "--max-new-tokens", "40", "--dtype", "fp32"]
    if not medusa:
        args.append("--no-medusa")
    kw = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=11) if sample else {}
    if sample:
        args += ["--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--seed", "11"]
    p = _run(example, *args)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    tokens = [int(t) for t in lines[-1].split(":")[1].split()]
    streamed = [int(t) for t in lines[0].split(":")[1].split()]
    engine = medusa_rt.Engine(model_dir, dtype="fp32")
    want = engine.generate(prompt, max_new_tokens=40, medusa=medusa, **kw).tokens
    assert tokens == want and streamed == want
    if sample:  # the same draws with and without Medusa, and not the greedy tokens
        assert want == engine.generate(prompt, max_new_tokens=40, medusa=not medusa, **kw).tokens
        assert want != engine.generate(prompt, max_new_tokens=40).tokens
    assert ("tree mc_sim_7b_63" if medusa else "Medusa heads 3") in p.stderr


def test_example_reports_typed_errors(example, tmp_path, model_dir):
    p = _run(example, str(tmp_path / "missing"), "1", "2")
    assert p.returncode == 1 and "model directory not found" in p.stderr
    p = _run(example, str(model_dir), "1", "99999")
    assert p.returncode == 1 and "out of range" in p.stderr
    p = _run(example, str(model_dir), "1", "--tree", "chain-9")
    assert p.returncode == 1 and "Medusa heads" in p.stderr
