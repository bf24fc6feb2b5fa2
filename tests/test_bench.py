"""`medusa-rt bench` runs end to end (a smoke test on a tiny model: the numbers themselves are
for the benchmark run, not for tests)."""

from __future__ import annotations

import io
import json

import pytest

pytest.importorskip("torch")

from _tiny_models import build_hf_model, save_and_export  # noqa: E402


def test_bench_suite_runs_on_a_tiny_model(tmp_path):
    from medusa_rt.bench import print_table, run_suite

    base = save_and_export(build_hf_model("llama-mha-tied", seed=3), tmp_path, "base")
    r = run_suite(str(base), new_tokens=6, repeats=1, medusa_prompts=1, hf=False, llama_cpp=False, dtypes=("fp32",))
    json.dumps(r)  # the report is JSON
    d = r["decode"]["fp32"]
    assert d["tokens_per_second"] > 0 and d["bandwidth_bound_tokens_per_second"] > 0
    assert d["fraction_of_bound"] == pytest.approx(d["tokens_per_second"] / d["bandwidth_bound_tokens_per_second"])
    assert "no Medusa heads" in r["medusa"]["bf16"]["skipped"] and "skipped" in r["verify_bf16"]
    assert r["prefill"]["fp32"]["tokens_per_second"] > 0
    assert r["peers"] == {"hf_transformers_fp32": {"skipped": "--no-hf"}, "llama_cpp": {"skipped": "--no-llama-cpp"}}
    assert r["ratios"]["decode_fp32_fraction_of_bandwidth_bound"] == d["fraction_of_bound"]
    out = io.StringIO()
    print_table(r, file=out)
    assert "decode" in out.getvalue() and "peer llama_cpp: --no-llama-cpp" in out.getvalue()
