"""Batched decoding: generate_batch and concurrent sessions share decode steps; every sequence
gets exactly the tokens it gets alone (greedy), with its own stop point, admission as slots free
up, cancellation that leaves the others alone, and the batch-size speculation policy."""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import medusa_rt  # noqa: E402
from medusa_rt.errors import CapacityError, InvalidArgumentError  # noqa: E402
from medusa_rt.export import export_medusa_heads  # noqa: E402

from _medusa_heads import fit_heads, training_prompts, write_heads_only  # noqa: E402
from _threads import run_in_threads  # noqa: E402
from _tiny_models import build_hf_model, save_and_export  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch")
    model = build_hf_model("qwen2-bias", seed=4)
    d = save_and_export(model, tmp, "base")
    heads = fit_heads(model, training_prompts(384, 8), num_heads=3, steps=150)
    export_medusa_heads(write_heads_only(heads, tmp / "heads"), d, progress=False)
    return d


def _prompts(n, seed=5):
    rs = np.random.RandomState(seed)
    return [[int(x) for x in rs.randint(3, 384, rs.randint(2, 30))] for _ in range(n)]


def _alone(engine, prompts, **kw):
    with engine.session() as s:
        return [s.generate(p, **kw) for p in prompts]


@pytest.mark.parametrize("medusa", [False, True])
def test_batch_equals_one_at_a_time(model_dir, medusa):
    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=160, max_batch_size=4, medusa_max_batch=4)
    prompts = _prompts(10) + training_prompts(384, 3)
    kw = dict(max_new_tokens=48, medusa=medusa)
    alone = _alone(engine, prompts, ignore_eos=True, **kw)
    # a stop token that some sequences produce early, some late, some never
    stop = alone[0].tokens[10]
    want = [r.tokens[: r.tokens.index(stop)] if stop in r.tokens else r.tokens for r in alone]
    got = engine.generate_batch(prompts, ignore_eos=True, stop=stop, **kw)  # 13 requests, 4 slots
    assert [r.tokens for r in got] == want
    for r, w in zip(got, want):
        assert r.finish_reason == ("stop" if len(w) < 48 else "length")
        assert r.stats.prompt_tokens > 0 and r.stats.new_tokens == len(w)
    if medusa:
        assert any(r.stats.tree_steps > 0 for r in got)


def test_speculation_policy_by_batch_size(model_dir):
    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=160, max_batch_size=4, medusa_max_batch=1)
    prompts = training_prompts(384, 4)
    alone = _alone(engine, prompts, max_new_tokens=32, ignore_eos=True)
    got = engine.generate_batch(prompts, max_new_tokens=32, ignore_eos=True)
    assert [r.tokens for r in got] == [r.tokens for r in alone]
    # four sequences share every step: none may verify a tree
    assert all(r.stats.tree_steps == 0 and r.stats.medusa for r in got)
    assert all(r.stats.tree_steps > 0 for r in alone)


def test_cancel_one_request(model_dir):
    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=160, max_batch_size=3, medusa_max_batch=16)
    prompts = _prompts(5, seed=9)
    alone = _alone(engine, prompts, max_new_tokens=40, ignore_eos=True)
    counts = {}

    def on_tokens(i, toks):
        counts[i] = counts.get(i, 0) + len(toks)
        return not (i == 1 and counts[i] >= 5)

    got = engine.generate_batch(prompts, max_new_tokens=40, ignore_eos=True, on_tokens=on_tokens)
    assert got[1].finish_reason == "cancelled" and len(got[1].tokens) < 40
    assert got[1].tokens == alone[1].tokens[: len(got[1].tokens)]
    for i in (0, 2, 3, 4):
        assert got[i].tokens == alone[i].tokens and got[i].finish_reason == "length"


def test_a_failing_callback_frees_every_slot(model_dir):
    """A callback that raises (at a request's first token, or later) ends the batch with its
    error, and every slot the batch held is free again."""
    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=96, max_batch_size=2, medusa_max_batch=16)
    prompts = _prompts(3, seed=4)
    for after in (1, 6):
        seen = {}

        def on_tokens(i, toks):
            seen[i] = seen.get(i, 0) + len(toks)
            if seen[i] >= after:
                raise RuntimeError("callback failed")

        with pytest.raises(RuntimeError, match="callback failed"):
            engine.generate_batch(prompts, max_new_tokens=20, ignore_eos=True, on_tokens=on_tokens)
        with engine.session(), engine.session():  # both slots came back
            pass


def test_eight_threads_share_steps(model_dir):
    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=160, max_batch_size=8, medusa_max_batch=16)
    prompts = _prompts(8, seed=3)
    alone = [r.tokens for r in _alone(engine, prompts, max_new_tokens=40, ignore_eos=True)]
    got = [None] * 8

    def worker(i):
        with engine.session() as s:
            for _ in range(3):
                got[i] = s.generate(prompts[i], max_new_tokens=40, ignore_eos=True).tokens
                assert got[i] == alone[i]

    errors = run_in_threads(worker, 8, together=True)
    assert not errors and got == alone


def test_threads_share_prompt_prefixes_while_stepping(model_dir):
    """Sessions in threads whose prompts share starts copy them from each other's slots while the
    others decode (Medusa steps included), and every answer is the one a fresh prefill gives."""
    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=160, max_batch_size=4, medusa_max_batch=16)
    reference = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=160)
    rs = np.random.RandomState(8)
    bases = [[int(x) for x in rs.randint(3, 384, 24)] for _ in range(2)]
    work = [[bases[(i + j) % 2][: 8 + 8 * ((i + j) % 3)] + [int(x) for x in rs.randint(3, 384, 3)] for j in range(4)]
            for i in range(4)]
    want = [[reference.generate(p, max_new_tokens=30, ignore_eos=True, reuse_context=False).tokens for p in w]
            for w in work]
    got = [[None] * 4 for _ in range(4)]
    copied = []

    def worker(i):
        with engine.session() as s:
            for j, p in enumerate(work[i]):
                r = s.generate(p, max_new_tokens=30, ignore_eos=True)
                got[i][j] = r.tokens
                copied.append(r.stats.cached_prompt_tokens)

    errors = run_in_threads(worker, 4, together=True)
    assert not errors and got == want
    assert sum(c >= 8 for c in copied) >= 8  # most requests found their start in some slot


def test_admission_while_sessions_run(model_dir):
    """A generate_batch and sessions in other threads share the engine's slots and steps."""
    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=160, max_batch_size=4, medusa_max_batch=16)
    prompts = _prompts(6, seed=21)
    alone = [r.tokens for r in _alone(engine, prompts, max_new_tokens=30, ignore_eos=True)]
    out = {}
    session = engine.session()  # holds one slot; the batch gets the other three

    def session_worker():
        with session as s:
            out["s"] = s.generate(prompts[0], max_new_tokens=30, ignore_eos=True).tokens

    t = threading.Thread(target=session_worker)
    t.start()
    got = engine.generate_batch(prompts[1:], max_new_tokens=30, ignore_eos=True)
    t.join()
    assert out["s"] == alone[0] and [r.tokens for r in got] == alone[1:]


def test_batch_capacity_and_bad_requests(model_dir):
    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=64, max_batch_size=1, medusa_max_batch=16)
    with engine.session():
        with pytest.raises(CapacityError, match="held by sessions"):
            engine.generate_batch([[1, 2]], max_new_tokens=3)
    with pytest.raises(InvalidArgumentError, match="request 1: .*token id 999"):
        engine.generate_batch([[1, 2], [999]], max_new_tokens=3)
    with pytest.raises(CapacityError, match="request 0: the prompt has 70 tokens"):
        engine.generate_batch([[1] * 70], max_new_tokens=3)
    assert engine.generate_batch([], max_new_tokens=3) == []


def test_session_waits_for_a_slot(model_dir):
    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=64, max_batch_size=1, medusa_max_batch=16)
    first = engine.session()
    with pytest.raises(CapacityError, match="none came free within"):
        engine.session(wait=0.05)
    threading.Timer(0.1, first.close).start()
    second = engine.session(wait=5.0)  # gets the slot once the first session closes
    assert len(second.generate([1, 2, 3], max_new_tokens=2, ignore_eos=True).tokens) == 2


def test_speculation_threshold_is_measured(model_dir):
    """By default the engine measures up to which batch size a tree step is worth it."""
    generous = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=64, max_batch_size=4,
                                medusa_expected_tokens_per_step=1e6)
    assert generous.info.medusa_max_batch == 4
    strict = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=64, max_batch_size=4,
                              medusa_expected_tokens_per_step=1.0)
    assert strict.info.medusa_max_batch == 0  # 64 rows never cost less than one
    r = strict.generate(training_prompts(384, 1)[0], max_new_tokens=8, ignore_eos=True)
    assert not r.stats.medusa and r.stats.tree_steps == 0  # threshold 0: plain decoding, heads not run
    fixed = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=64, max_batch_size=4, medusa_max_batch=3)
    assert fixed.info.medusa_max_batch == 3
    with pytest.raises(InvalidArgumentError, match="medusa_max_batch"):
        medusa_rt.Engine(model_dir, medusa_max_batch=-2)


def test_measurement_with_a_short_cache(model_dir):
    """The measurement never writes past the cache (tree of 64 nodes, max_seq_len 10)."""
    e = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=10, max_batch_size=2)
    assert 0 <= e.info.medusa_max_batch <= 2
    p = [5, 6, 7]
    plain = e.generate(p, max_new_tokens=20, ignore_eos=True, medusa=False)
    assert e.generate(p, max_new_tokens=20, ignore_eos=True).tokens == plain.tokens
