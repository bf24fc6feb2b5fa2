"""The CUDA backend end to end (marked ``gpu``; skipped without a CUDA build and a GPU):
logits against HF transformers, greedy tokens against the CPU engine where the CPU's choice has a
clear margin, greedy Medusa identical to plain greedy decoding on the GPU (random heads and an
oracle that forces long accepted paths and KV compaction, with the KV cache compared bit for
bit), and the device errors. The kernels one by one: tests/test_backend_ops.py."""

from __future__ import annotations

import numpy as np
import pytest

import medusa_rt
from medusa_rt import _core
from medusa_rt.errors import InvalidArgumentError

torch = pytest.importorskip("torch")

from _medusa_heads import random_heads, training_prompts, write_heads_only  # noqa: E402
from _tiny_models import build_hf_model, hf_logits, round_to_bf16_, save_and_export  # noqa: E402

HAVE_GPU = medusa_rt.cuda_device_count() > 0


def gpu_only(f):
    return pytest.mark.gpu(pytest.mark.skipif(not HAVE_GPU, reason="no CUDA backend in this build or no GPU")(f))


VOCAB, HIDDEN = 384, 96


def test_cuda_device_errors(tmp_path_factory):
    """Without the CUDA backend or GPU, device="cuda" is a clear error; bad device strings always are."""
    base = save_and_export(build_hf_model("llama-mha-tied", seed=3), tmp_path_factory.mktemp("dev"), "m")
    with pytest.raises(InvalidArgumentError, match="device must be"):
        medusa_rt.Engine(base, device="gpu0")
    with pytest.raises(InvalidArgumentError, match="cuda"):
        medusa_rt.Engine(base, device="cuda:99" if HAVE_GPU else "cuda")
    if HAVE_GPU:
        with pytest.raises(InvalidArgumentError, match="fp32"):
            medusa_rt.Engine(base, device="cuda", dtype="fp32")


@pytest.fixture(scope="module")
def hf_model():
    m = build_hf_model("llama-gqa-untied", seed=11)
    round_to_bf16_(m)  # the engine's bf16 weights are then exactly HF's
    return m


@pytest.fixture(scope="module")
def model_dir(hf_model, tmp_path_factory):
    return save_and_export(hf_model, tmp_path_factory.mktemp("cuda"), "base")


PROMPTS = training_prompts(VOCAB, 4, seed=31)


@gpu_only
def test_logits_match_hf(hf_model, model_dir):
    e = medusa_rt.Engine(model_dir, device="cuda", dtype="bf16", max_seq_len=128)
    assert e.info.device.startswith("cuda:0") and e.info.isa.startswith("sm_")
    for p in PROMPTS:
        with e.session() as s:
            got = s.forward(p, all_logits=True)
        ref = hf_logits(hf_model, p)
        # GEMM inputs are rounded to bf16 on the GPU (fp32 accumulation): small differences.
        np.testing.assert_allclose(got, ref, rtol=0, atol=3e-2 * np.abs(ref).max())


def _greedy_with_margins(engine, prompt, n):
    """Greedy tokens and the top-1 minus top-2 logit gap at each step (CPU engine, fp32 logits)."""
    tokens, gaps = [], []
    with engine.session() as s:
        logits = s.forward(prompt)
        for _ in range(n):
            top = np.sort(logits)[-2:]
            gaps.append(float(top[1] - top[0]))
            t = int(np.argmax(logits))
            tokens.append(t)
            logits = s.forward([t])
    return tokens, gaps


@gpu_only
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gpu_greedy_equals_cpu_where_margins_are_clear(model_dir, dtype):
    cpu = medusa_rt.Engine(model_dir, dtype=dtype, max_seq_len=128)
    gpu_e = medusa_rt.Engine(model_dir, device="cuda", dtype=dtype, max_seq_len=128)
    compared = 0
    for p in PROMPTS:
        ref, gaps = _greedy_with_margins(cpu, p, 40)
        got = gpu_e.generate(p, max_new_tokens=40, ignore_eos=True, medusa=False).tokens
        for i, (a, b) in enumerate(zip(ref, got)):
            if gaps[i] < 0.05:  # a near tie: the two devices may round it differently; stop here
                break
            assert a == b, f"prompt {p}: token {i} differs (margin {gaps[i]:.3f})"
            compared += 1
    assert compared >= 40


@pytest.fixture(scope="module")
def medusa_dir(tmp_path_factory):
    from medusa_rt.export import export_medusa_heads

    tmp = tmp_path_factory.mktemp("cuda-medusa")
    base = save_and_export(build_hf_model("llama-mha-tied", seed=9), tmp, "base")
    export_medusa_heads(write_heads_only(random_heads(HIDDEN, VOCAB, shared=True), tmp / "heads"), base,
                        progress=False)
    return base


@gpu_only
@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "chain-4"])
def test_gpu_medusa_greedy_is_lossless(medusa_dir, tree):
    """Random heads, then an oracle: long accepted paths and KV compaction on the device; the
    tokens and the final KV cache equal plain greedy decoding's, bit for bit."""
    top_k = 1 if tree.startswith("chain") else 10
    e = medusa_rt.Engine(medusa_dir, device="cuda", dtype="bf16", max_seq_len=200, tree=tree, medusa_top_k=top_k,
                         medusa_max_batch=16)
    layers = 2
    for p in PROMPTS[:3]:
        with e.session() as s:
            plain = s.generate(p, max_new_tokens=80, ignore_eos=True, medusa=False)
            assert s.generate(p, max_new_tokens=80, ignore_eos=True).tokens == plain.tokens  # random heads
            n = len(p) + len(plain.tokens) - 1
            kv_plain = [_core._testing.read_kv(s._core(), layer, n) for layer in range(layers)]
            _core._testing.set_oracle(s._core(), p + plain.tokens)
            med = s.generate(p, max_new_tokens=80, ignore_eos=True)
            assert med.tokens == plain.tokens
            assert med.stats.tokens_per_step > 2.0
            kv_med = [_core._testing.read_kv(s._core(), layer, n) for layer in range(layers)]
            for (k1, v1), (k2, v2) in zip(kv_plain, kv_med):
                assert np.array_equal(k1, k2) and np.array_equal(v1, v2)


@gpu_only
def test_gpu_prompt_caching_is_exact(medusa_dir):
    """The cache entries decode steps (trees, then plain steps) leave equal a prefill's of the same
    tokens bit for bit, so a request reusing them (reuse_context) gives a fresh prefill's tokens."""
    e = medusa_rt.Engine(medusa_dir, device="cuda", dtype="bf16", max_seq_len=200, max_batch_size=2,
                         medusa_max_batch=16)
    p = PROMPTS[0]
    plain = e.generate(p, max_new_tokens=90, ignore_eos=True, medusa=False).tokens
    with e.session() as s, e.session() as fresh:
        _core._testing.set_oracle(s._core(), p + plain)
        r = s.generate(p, max_new_tokens=60, ignore_eos=True)
        assert r.stats.tokens_per_step > 2.0 and r.tokens == plain[:60]
        n = s.context_length
        ctx = (p + plain)[:n]
        fresh.forward(ctx)
        for layer in range(2):
            (k1, v1), (k2, v2) = _core._testing.read_kv(s._core(), layer, n), _core._testing.read_kv(fresh._core(), layer, n)
            assert np.array_equal(k1, k2) and np.array_equal(v1, v2)
        turn2 = ctx + PROMPTS[1][:5]
        reused = s.generate(turn2, max_new_tokens=30, ignore_eos=True)
        assert reused.stats.cached_prompt_tokens == n
        assert reused.tokens == fresh.generate(turn2, max_new_tokens=30, ignore_eos=True, reuse_context=False).tokens


@gpu_only
def test_gpu_prompt_prefix_copied_across_slots(medusa_dir):
    """A prompt whose start another slot holds copies those KV entries (device to device):
    bit for bit a prefill's, so a fresh prefill's tokens."""
    e = medusa_rt.Engine(medusa_dir, device="cuda", dtype="bf16", max_seq_len=200, max_batch_size=3)
    p = PROMPTS[0] + PROMPTS[1]
    with e.session() as a, e.session() as b, e.session() as c:
        a.generate(p + [3], max_new_tokens=20, ignore_eos=True)
        r = b.generate(p + [4], max_new_tokens=40, ignore_eos=True)
        assert r.stats.cached_prompt_tokens == len(p)
        want = c.generate(p + [4], max_new_tokens=40, ignore_eos=True, reuse_context=False)
        assert r.tokens == want.tokens
        for layer in range(2):
            (k1, v1), (k2, v2) = (_core._testing.read_kv(x._core(), layer, len(p) + 1) for x in (b, c))
            assert np.array_equal(k1, k2) and np.array_equal(v1, v2)


@gpu_only
def test_gpu_batch_equals_single(medusa_dir):
    e = medusa_rt.Engine(medusa_dir, device="cuda", dtype="fp16", max_batch_size=4, max_seq_len=160,
                         medusa_max_batch=4)
    single = [e.generate(p, max_new_tokens=30, ignore_eos=True).tokens for p in PROMPTS]
    batch = [r.tokens for r in e.generate_batch(PROMPTS, max_new_tokens=30, ignore_eos=True)]
    assert batch == single



@gpu_only
def test_gpu_graph_replay_and_host_step_equal_eager(medusa_dir, monkeypatch):
    """The fused step replayed from CUDA graphs, run eagerly (MEDUSA_RT_CUDA_GRAPHS=0), and the
    host step (MEDUSA_RT_FUSED_STEP=0) give the same tokens, with and without Medusa, batched."""
    results = {}
    for graphs, fused in (("1", "1"), ("0", "1"), ("0", "0")):
        monkeypatch.setenv("MEDUSA_RT_CUDA_GRAPHS", graphs)
        monkeypatch.setenv("MEDUSA_RT_FUSED_STEP", fused)
        e = medusa_rt.Engine(medusa_dir, device="cuda", dtype="bf16", max_batch_size=4, max_seq_len=200,
                             medusa_max_batch=4)
        out = [r.tokens for r in e.generate_batch(PROMPTS, max_new_tokens=40, ignore_eos=True)]
        out += [e.generate(p, max_new_tokens=40, ignore_eos=True, medusa=False).tokens for p in PROMPTS[:2]]
        results[graphs + fused] = out
    assert results["11"] == results["01"] == results["00"]
