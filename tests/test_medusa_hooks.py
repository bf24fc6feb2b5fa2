"""Medusa under test hooks: random heads (low acceptance), an oracle that feeds the true
continuation as head candidates (long paths, heavy KV compaction, final KV cache compared), and
typical acceptance checked against an independent NumPy implementation of the reference rule."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import medusa_rt  # noqa: E402
from medusa_rt import _core  # noqa: E402
from medusa_rt.export import export_medusa_heads  # noqa: E402

from _medusa_heads import random_heads as _random_heads, training_prompts, write_heads_only  # noqa: E402
from _tiny_models import build_hf_model, save_and_export  # noqa: E402

VOCAB, HIDDEN, LAYERS = 384, 96, 2


def random_heads(num_heads=4, seed=0, shared=False):
    return _random_heads(HIDDEN, VOCAB, num_heads=num_heads, seed=seed, shared=shared)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hooks")
    base = save_and_export(build_hf_model("llama-mha-tied", seed=9), tmp, "base")
    export_medusa_heads(write_heads_only(random_heads(), tmp / "heads"), base, progress=False)
    return base


@pytest.fixture(scope="module")
def engine(model_dir):
    return medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=200, medusa_max_batch=16, prompt_lookup=0)


PROMPTS = training_prompts(VOCAB, 4, seed=77)


def test_random_heads_are_lossless(engine):
    with engine.session() as s:
        for p in PROMPTS:
            plain = s.generate(p, max_new_tokens=60, ignore_eos=True, medusa=False)
            med = s.generate(p, max_new_tokens=60, ignore_eos=True)
            assert med.tokens == plain.tokens
            assert med.stats.tokens_per_step < 1.5  # random heads rarely guess right


def _kv(s, length):
    return [_core._testing.read_kv(s._core(), layer, length) for layer in range(LAYERS)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-step", "host-step"])
@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "vicuna_7b_stage2", "chain-4"])
def test_oracle_long_paths_and_kv(model_dir, tree, fused, monkeypatch):
    """Both step implementations: the fused step (rows, acceptance, compaction and candidates in
    backend memory, as on the GPU) and the host step (used with recording hooks, typical
    acceptance, mixed batches). Recording forces the host step, so only it counts moved nodes."""
    if not fused:
        monkeypatch.setenv("MEDUSA_RT_FUSED_STEP", "0")
    # A chain only uses rank 0: with top_k 1 the oracle's true token is always there.
    top_k = 1 if tree.startswith("chain") else 10
    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=200, tree=tree, medusa_top_k=top_k, medusa_max_batch=16)
    moved = 0
    for p in PROMPTS[:3]:
        with engine.session() as s:
            plain = s.generate(p, max_new_tokens=90, ignore_eos=True, medusa=False)
            n = len(p) + len(plain.tokens) - 1  # the last token is never fed back
            kv_plain = _kv(s, n)
            _core._testing.set_oracle(s._core(), p + plain.tokens)
            _core._testing.set_record(s._core(), not fused)
            med = s.generate(p, max_new_tokens=90, ignore_eos=True)
            records = _core._testing.take_records(s._core())
            assert med.tokens == plain.tokens
            assert s.context_length >= n
            kv_med = _kv(s, n)
            for (k1, v1), (k2, v2) in zip(kv_plain, kv_med):
                assert np.array_equal(k1, k2) and np.array_equal(v1, v2)  # bit for bit
        assert med.stats.tokens_per_step > 2.0
        moved += sum(1 for r in records for j, node in enumerate(r["path"]) if node != j + 1)
    if tree != "chain-4" and not fused:
        assert moved > 10  # accepted nodes away from the front: compaction really moved K/V


def test_fused_and_host_steps_agree(model_dir, monkeypatch):
    """The same generations through the fused step and the host step: same tokens, same
    acceptance statistics (random heads, then the oracle), in a batch of mixed prompts."""
    results = {}
    for fused in (True, False):
        monkeypatch.setenv("MEDUSA_RT_FUSED_STEP", "1" if fused else "0")
        engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=200, max_batch_size=4, medusa_max_batch=16)
        out = [(r.tokens, r.stats.accepted_per_head)
               for r in engine.generate_batch(PROMPTS, max_new_tokens=50, ignore_eos=True)]
        with engine.session() as s:
            ref = s.generate(PROMPTS[0], max_new_tokens=60, ignore_eos=True, medusa=False).tokens
            _core._testing.set_oracle(s._core(), PROMPTS[0] + ref)
            r = s.generate(PROMPTS[0], max_new_tokens=60, ignore_eos=True)
            out.append((r.tokens, r.stats.accepted_per_head))
        results[fused] = out
    assert results[True] == results[False]


def _reference_paths(paths):
    """Independent re-derivation of the reference buffers (sorted nodes, retrieve_indices)."""
    nodes = sorted((tuple(p) for p in paths), key=lambda p: (len(p), p))
    index = {p: i + 1 for i, p in enumerate(nodes)}
    seen, rows = set(), []
    for p in reversed(nodes):
        if p in seen:
            continue
        rows.append([0] + [index[p[:k]] for k in range(1, len(p) + 1)])
        seen.update(p[:k] for k in range(1, len(p) + 1))
    depth = max(len(p) for p in nodes)
    return [r + [-1] * (depth + 1 - len(r)) for r in rows]


def _typical_reference(tokens, logits, retrieve, threshold, alpha, temperature):
    """The reference rule (evaluate_posterior, typical) in NumPy, float64, with padded slots
    never accepted. Returns (accepted node indices after the root, decision margin)."""
    tokens = np.asarray(tokens)
    retrieve = np.asarray(retrieve)
    n = len(tokens)
    valid = (retrieve >= 0) & (retrieve < n)
    idx = np.where(valid, retrieve, 0)
    cand = tokens[idx]  # [P, D+1]
    z = logits.astype(np.float64)[idx[:, :-1]] / temperature  # [P, D, V]
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    q = np.take_along_axis(p, cand[:, 1:, None], axis=-1)[..., 0]
    ent = -(p * np.log(p + 1e-5)).sum(-1)
    tau = np.minimum(threshold, alpha * np.exp(-ent))
    match = (q > tau) & valid[:, 1:] & valid[:, :-1]
    acc = np.cumprod(match, axis=1).sum(axis=1)
    best_len = acc.max()
    margin = np.abs(q - tau)[valid[:, 1:]].min() / tau.max()
    if best_len == 0:
        return [], margin
    logq = np.where(np.arange(match.shape[1])[None, :] < best_len, np.log(np.maximum(q, 1e-300)), 0).sum(1)
    logq = np.where(acc == best_len, logq, -np.inf)
    best = int(np.argmax(logq))
    return [int(x) for x in retrieve[best, 1 : best_len + 1]], margin


@pytest.mark.parametrize("threshold, alpha, temperature", [(0.09, 0.3, 1.0), (0.09, 0.3, 0.7), (0.3, 0.09, 0.5)])
def test_typical_matches_numpy_reference(model_dir, threshold, alpha, temperature):
    tree = _core.TreeSpec.named("mc_sim_7b_63")
    retrieve = _reference_paths([list(p) for p in tree.paths])
    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=200, medusa_max_batch=16, prompt_lookup=0)
    compared = 0
    with engine.session() as s:
        for p in PROMPTS:
            _core._testing.set_record(s._core(), True)
            s.generate(p, max_new_tokens=60, ignore_eos=True, acceptance="typical",
                       posterior_threshold=threshold, posterior_alpha=alpha, temperature=temperature)
            for rec in _core._testing.take_records(s._core()):
                if len(rec["tokens"]) < tree.num_nodes:
                    continue
                want, margin = _typical_reference(rec["tokens"], rec["logits"], retrieve, threshold, alpha,
                                                  temperature)
                if margin < 1e-4:
                    continue  # a probability within float rounding of its threshold
                assert rec["path"] == want
                compared += 1
    assert compared >= 20


def test_deep_chain_tree(tmp_path, model_dir):
    """A 20-deep chain with perfect candidates: 21 tokens per step, still exact."""
    d = tmp_path / "deep"
    shutil.copytree(model_dir, d, ignore=shutil.ignore_patterns("medusa_heads.safetensors"))
    export_medusa_heads(write_heads_only(random_heads(num_heads=20, seed=3), tmp_path / "h20"), d, progress=False)
    engine = medusa_rt.Engine(d, dtype="fp32", max_seq_len=200, tree="chain-20", medusa_top_k=1, medusa_max_batch=16, prompt_lookup=0)
    p = PROMPTS[0]
    with engine.session() as s:
        plain = s.generate(p, max_new_tokens=100, ignore_eos=True, medusa=False)
        n = len(p) + 99
        kv_plain = _kv(s, n)
        _core._testing.set_oracle(s._core(), p + plain.tokens, vary_rank=False)
        med = s.generate(p, max_new_tokens=100, ignore_eos=True)
        assert med.tokens == plain.tokens
        assert med.stats.accepted_per_head[19] >= 3 and med.stats.tokens_per_step > 15
        for (k1, v1), (k2, v2) in zip(kv_plain, _kv(s, n)):
            assert np.array_equal(k1, k2) and np.array_equal(v1, v2)
