"""`medusa-rt bench` runs end to end (a smoke test on a tiny model: the numbers themselves are
for the benchmark run, not for tests)."""

from __future__ import annotations

import io
import json
import os

import pytest

pytest.importorskip("torch")

from _tiny_models import build_hf_model, save_and_export  # noqa: E402


def test_bench_suite_runs_on_a_tiny_model(tmp_path):
    from medusa_rt.bench import print_table, run_suite

    base = save_and_export(build_hf_model("llama-mha-tied", seed=3), tmp_path, "base")
    r = run_suite(str(base), new_tokens=6, repeats=2, medusa_prompts=1, hf=False, llama_cpp=False, dtypes=("fp32",))
    json.dumps(r)  # the report is JSON
    assert r["machine"]["isa"] in ("avx512", "avx2", "generic")  # the kernels the numbers are of
    d = r["decode"]["fp32"]
    assert d["tokens_per_second"] > 0 and d["bandwidth_bound_tokens_per_second"] > 0
    assert d["fraction_of_bound"] == pytest.approx(d["tokens_per_second"] / d["bandwidth_bound_tokens_per_second"])
    assert d["bandwidth_samples"] == d["samples"] > 1  # the bound is probed before each prompt's decoding
    assert "no Medusa heads" in r["medusa"]["bf16"]["skipped"] and "skipped" in r["verify_bf16"]
    assert r["prefill"]["fp32"]["tokens_per_second"] > 0
    bi = r["bf16_inputs"]  # measured where the CPU has AVX512-BF16, else skipped with the reason
    assert "AVX512-BF16" in bi["skipped"] if "skipped" in bi else bi["prefill_speedup"] > 0 and bi["batch_speedup"] > 0
    pc = r["prompt_cache"]  # a chat's later turns: their start comes from the cache, the answers are the same
    n = len(pc["turns"]) + 1
    assert n >= 2 and pc["identical_outputs"] == f"{n}/{n}"
    assert all(0 < t["cached_prompt_tokens"] < t["prompt_tokens"] for t in pc["turns"])
    assert r["ratios"]["prompt_cache_ttft_speedup"] == pc["ttft_speedup"] > 0
    sp = pc["shared_prefix"]  # a batch with one system prompt: its later requests copy it, the same answers
    assert sp["identical_outputs"] == f"{2 * sp['requests']}/{2 * sp['requests']}" and sp["requests"] >= 2
    assert r["ratios"]["shared_prefix_ttft_speedup"] == sp["ttft_speedup"] > 0
    assert r["peers"] == {"hf_transformers_fp32": {"skipped": "--no-hf"}, "llama_cpp": {"skipped": "--no-llama-cpp"}}
    assert r["ratios"]["decode_fp32_fraction_of_bandwidth_bound"] == d["fraction_of_bound"]
    out = io.StringIO()
    print_table(r, file=out)
    assert "decode" in out.getvalue() and "peer llama_cpp: --no-llama-cpp" in out.getvalue()
    assert f"{r['machine']['isa']} kernels" in out.getvalue() and "bf16 inputs (AVX512-BF16)" in out.getvalue()
    assert f"prompt cache (bf16, a {n}-turn chat" in out.getvalue()


def test_bench_verify_interleaves_rounds_after_a_context(tmp_path):
    from medusa_rt import _core
    from medusa_rt.bench import TREE_SIZES, bench_verify
    from medusa_rt.engine import Engine
    from medusa_rt.errors import InvalidArgumentError
    from medusa_rt.export import export_medusa_heads

    from _medusa_heads import random_heads, write_heads_only

    model = build_hf_model("llama-mha-tied", seed=3)
    base = save_and_export(model, tmp_path, "base")
    heads = random_heads(model.config.hidden_size, model.config.vocab_size)
    export_medusa_heads(write_heads_only(heads, tmp_path / "heads"), base, progress=False)
    # Medusa against plain decoding, and the heads alone next to the default prompt lookup.
    from medusa_rt.bench import bench_medusa

    m = bench_medusa(str(base), "fp32", ["Tell me about the sea.", "A list of four colors."], 8, "chain-2", seq=128)
    assert m["prompt_lookup"] == 4 and m["identical_outputs"] == "2/2" and m["tree"] == "chain-2"
    assert {"medusa", "heads_only", "plain", "sampled", "sampled_plain"} <= set(m) and m["plain"]["tokens_per_step"] == 1.0
    assert m["speedup"] > 0 and m["heads_only_speedup"] > 0 and m["heads_only"]["lookup_tokens"] == 0
    assert m["sampled_speedup"] > 0 and m["sampled_plain"]["tokens_per_step"] == 1.0  # identical: counted above
    r = bench_verify(str(base), "bf16", seq=128, rounds=3, context=1000)
    assert r["context"] == 128 - TREE_SIZES[-1] and r["rounds"] == 3  # the context is cut to the cache
    rows = r["rows"]
    assert [x["nodes"] for x in rows] == TREE_SIZES and rows[0]["x_decode_step"] == 1.0
    assert all(x["forward_ms"] > 0 and x["x_decode_step"] > 0 for x in rows) and rows[0]["heads_ms"] == 0
    assert all(x["heads_ms"] > 0 for x in rows[1:])
    # The compute floor: the matrix products' flops per tree token at the given peak, against the
    # measured decode step (linear in the tree size).
    r = bench_verify(str(base), "bf16", seq=128, rounds=1, fma_peak=1e9)
    floors = [x["compute_floor_x_decode_step"] for x in r["rows"]]
    assert r["fma_peak_GFLOPs"] == 1.0 and floors[0] > 0
    assert floors == pytest.approx([floors[0] * n for n in TREE_SIZES])
    # A timed step must fit the cache after its context.
    eng = Engine(base, dtype="bf16", max_seq_len=128, tree="mc_sim_7b_63", medusa_max_batch=0)
    with pytest.raises(InvalidArgumentError, match="max_seq_len"):
        _core._testing.time_tree_step(eng._engine, 8, 1, 121)
    assert len(_core._testing.time_tree_step(eng._engine, 8, 1, 120)) == 2


def test_fma_peak_probe_each_kernel_set():
    """The arithmetic-peak probe runs on every kernel set (MEDUSA_RT_ISA caps the choice per
    process): one thread and all threads (rates summed over threads) give plausible flop/s."""
    import subprocess
    import sys

    code = "from medusa_rt import _core; print(_core._testing.fma_peak(1, 2), _core._testing.fma_peak(0, 2))"
    for isa in ("generic", "avx2"):
        env = dict(os.environ, MEDUSA_RT_ISA=isa)
        one, all_ = map(float, subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                              check=True).stdout.split())
        assert 1e8 < one < 1e13 and 0.5 * one < all_ < 1e14


def test_cuda_bench_script_runs_on_the_cpu(tmp_path, monkeypatch):
    """bench/bench_cuda.py (what scripts/gpu_check.sh runs on a lent GPU) end to end on tiny
    random models on the CPU, so a rare GPU run does not find the script broken: verify steps up
    to 64 nodes, the small model's up to 128 with the shipped heads' tree, generation with and
    without Medusa, graphs against eager."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_cuda.py"
    spec = importlib.util.spec_from_file_location("bench_cuda", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "bench_cuda.json"
    monkeypatch.delenv("MEDUSA_RT_CUDA_GRAPHS", raising=False)  # the script sets it; restored after the test
    assert mod.main(["--shape", "tiny", "--small-shape", "tiny", "--device", "cpu", "--no-peer",
                     "--work", str(tmp_path / "models"), "--json", str(out), "--steps", "8"]) == 0
    r = json.loads(out.read_text())
    assert [int(n) for n in r["verify_steps"]] == mod.TREE_SIZES
    assert [int(n) for n in r["small_verify_steps"]] == mod.SMALL_TREE_SIZES and mod.SMALL_TREE_SIZES[-1] == 128
    assert all(v["step_ms"] > 0 for v in r["small_verify_steps"].values())
    assert r["cuda_graphs"]["tree_nodes"] == 128
    for run in (r["generation"], r["cuda_graphs"]["graphs"], r["cuda_graphs"]["eager"]):
        assert run["plain"]["tokens_per_step"] == 1.0 and run["medusa"]["tokens_per_step"] >= 1.0
