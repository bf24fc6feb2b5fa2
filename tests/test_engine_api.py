"""The Python API over the engine: generate, stream, stop handling, cancellation, threads,
the portable kernel path, and the CLI, on a tiny random model with a tiny tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import medusa_rt
from medusa_rt import _core

from _threads import run_in_threads
from _tiny_models import build_hf_model, save_and_export


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    return save_and_export(build_hf_model("llama-gqa-untied", seed=7), tmp_path_factory.mktemp("api"), "api")


@pytest.fixture(scope="module")
def engine(model_dir):
    return medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=128, max_batch_size=4)


PROMPT = [5, 17, 99, 200, 3, 42, 7]


def test_info(engine):
    info = engine.info
    assert info.vocab_size == 384 and info.num_layers == 2 and info.num_kv_heads == 2
    assert info.max_seq_len == 128 and info.max_batch_size == 4 and info.dtype == "fp32"
    assert info.isa in ("avx512", "avx2", "generic") and info.num_threads >= 1
    assert info.weight_bytes > 0 and info.kv_cache_bytes == 2 * 4 * 2 * 4 * 2 * 128 * 24


def test_generate_result_and_stats(engine):
    with engine.session() as s:
        r = s.generate(PROMPT, max_new_tokens=20, ignore_eos=True)
    assert len(r.tokens) == 20 and r.finish_reason == "length"
    assert r.text == engine.tokenizer.decode(r.tokens)
    st = r.stats
    # One token per step plus what the prompt lookup (on by default on the CPU) got accepted; the
    # last step may accept more than max_new_tokens leaves room for.
    assert st.prompt_tokens == len(PROMPT) and st.new_tokens == 20 and st.steps <= 19 <= st.steps + st.lookup_tokens
    with engine.session() as s:
        plain = s.generate(PROMPT, max_new_tokens=20, ignore_eos=True, medusa=False)
    assert plain.tokens == r.tokens and plain.stats.steps == 19 and plain.stats.lookup_steps == 0
    assert st.seconds > 0 and st.tokens_per_second > 0
    assert st.prefill_seconds + st.decode_seconds == pytest.approx(st.seconds, rel=0.05, abs=1e-3)


def test_generate_is_deterministic_and_fresh(engine):
    with engine.session() as s:
        a = s.generate(PROMPT, max_new_tokens=15, ignore_eos=True, reuse_context=False)  # (other slots hold PROMPT)
        assert a.stats.cached_prompt_tokens == 0
        s.forward([1, 2, 3])  # leaves context behind: the prompt's start is reused, the rest dropped
        b = s.generate(PROMPT, max_new_tokens=15, ignore_eos=True)
        assert b.stats.cached_prompt_tokens == len(PROMPT) - 1  # the last prompt token always runs
        c = s.generate(PROMPT, max_new_tokens=15, ignore_eos=True, reuse_context=False)
        assert c.stats.cached_prompt_tokens == 0
        s.reset()  # an empty context, but the cache still holds the entries
        assert s.context_length == 0
        d = s.generate(PROMPT, max_new_tokens=15, ignore_eos=True)
        assert d.stats.cached_prompt_tokens == len(PROMPT) - 1
    assert a.tokens == b.tokens == c.tokens == d.tokens


def test_session_context_carries_to_the_next_request(model_dir):
    """The next prompt is prefilled only after the start the session's context holds: the
    previous prompt and answer (but its last token), or what forward() appended."""
    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=128, max_batch_size=2)  # no other slot holds more
    with engine.session() as s, engine.session() as fresh:
        r1 = s.generate(PROMPT, max_new_tokens=12, ignore_eos=True, medusa=False)
        assert s.context_length == len(PROMPT) + 11
        turn2 = PROMPT + r1.tokens + [9, 8, 7]
        r2 = s.generate(turn2, max_new_tokens=12, ignore_eos=True)
        assert r2.stats.cached_prompt_tokens == len(PROMPT) + 11 and r2.stats.prompt_tokens == len(turn2)
        assert r2.tokens == fresh.generate(turn2, max_new_tokens=12, ignore_eos=True, reuse_context=False).tokens
        # A prompt that leaves the context early reuses up to there.
        other = PROMPT[:3] + [1, 1, 1]
        r3 = s.generate(other, max_new_tokens=5, ignore_eos=True)
        assert r3.stats.cached_prompt_tokens == 3
        assert r3.tokens == fresh.generate(other, max_new_tokens=5, ignore_eos=True, reuse_context=False).tokens
        # max_new_tokens 0 leaves the shared start; forward() continues from any context.
        s.generate(PROMPT, max_new_tokens=0)
        assert s.context_length == 3
        s.forward(PROMPT[3:])
        assert s.generate(PROMPT + [4], max_new_tokens=4, ignore_eos=True).stats.cached_prompt_tokens == len(PROMPT)


def test_slots_keep_their_cache_for_the_next_session_and_batch(model_dir):
    """A slot's cache outlives its session: a one-off request (or a session given its first
    prompt) takes the free slot sharing the longest start with its prompt; batch requests too, so
    a shared prefix is prefilled once per slot. Always the tokens of a fresh prefill."""
    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=128, max_batch_size=3)
    with engine.session() as s:
        r1 = s.generate(PROMPT, max_new_tokens=10, ignore_eos=True)
        assert s.context_length == len(PROMPT) + 9
    turn2 = PROMPT + r1.tokens + [11, 12]
    with engine.session() as s:  # no prompt given: the slot let go longest ago (not the one above)
        assert s.context_length == 0
        # ... whose request copies the start the other slot holds instead of prefilling it
        copied = s.generate(turn2, max_new_tokens=4, ignore_eos=True).stats.cached_prompt_tokens
        assert copied == len(PROMPT) + r1.stats.new_tokens - 1
    want = engine.generate(turn2, max_new_tokens=10, ignore_eos=True, reuse_context=False)
    r2 = engine.generate(turn2, max_new_tokens=10, ignore_eos=True)
    assert r2.stats.cached_prompt_tokens == len(turn2) - 1 and r2.tokens == want.tokens
    with engine.session(prompt=turn2 + [13]) as s:
        assert s.context_length == 0
        assert s.generate(turn2 + [13], max_new_tokens=3, ignore_eos=True).stats.cached_prompt_tokens == len(turn2)
    prefix = [7, 3, 9, 200, 150, 33, 2, 90, 91, 92]
    prompts = [prefix + [i, i + 1] for i in range(20, 29)]
    fresh = engine.generate_batch(prompts, max_new_tokens=6, ignore_eos=True, reuse_context=False)
    got = engine.generate_batch(prompts, max_new_tokens=6, ignore_eos=True)
    assert [r.tokens for r in got] == [r.tokens for r in fresh]
    assert all(r.stats.cached_prompt_tokens == 0 for r in fresh)
    assert all(r.stats.cached_prompt_tokens >= len(prefix) for r in got)  # the slots hold the prefix now


def test_prompt_prefix_shared_across_slots(model_dir):
    """A prompt whose start another slot's cache holds (a session still generating, or done) copies
    those KV entries instead of prefilling them: bit for bit the entries of a fresh prefill, so the
    same tokens. A slot whose sequence moved on offers only what it still holds."""
    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=128, max_batch_size=3)
    other = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=128)
    prefix = [7, 3, 9, 200, 150, 33, 2, 90, 91, 92, 14, 15]

    def fresh(prompt, n=12):
        return other.generate(prompt, max_new_tokens=n, ignore_eos=True, reuse_context=False).tokens

    with engine.session() as a, engine.session() as b:
        a.generate(prefix + [1, 2], max_new_tokens=12, ignore_eos=True)
        r = b.generate(prefix + [3, 4], max_new_tokens=12, ignore_eos=True)
        assert r.stats.cached_prompt_tokens == len(prefix) and r.tokens == fresh(prefix + [3, 4])
        with engine.session() as c:
            c.generate(prefix + [3, 4], max_new_tokens=12, ignore_eos=True, reuse_context=False)
            n = len(prefix) + 2 + 11
            for layer in range(engine.info.num_layers):
                (kb, vb), (kc, vc) = (_core._testing.read_kv(x._core(), layer, n) for x in (b, c))
                assert np.array_equal(kb, kc) and np.array_equal(vb, vc)
        # a rewinds to the first 4 tokens: the rest of what it held is gone, b's own slot and the
        # third (c's prompt, still cached) offer more.
        a.generate(prefix[:4] + [9, 9, 9, 9], max_new_tokens=6, ignore_eos=True)
        b.reset()
        b.generate([1], max_new_tokens=40, ignore_eos=True, reuse_context=False)  # b's slot: other tokens
        with engine.session() as c:
            assert c.generate(prefix + [5], max_new_tokens=1).stats.cached_prompt_tokens == len(prefix)
            c.reset()
            c.generate([2], max_new_tokens=40, ignore_eos=True, reuse_context=False)
        with engine.session() as c:  # only a's 4 tokens are left anywhere
            r = c.generate(prefix + [6], max_new_tokens=12, ignore_eos=True)
            assert r.stats.cached_prompt_tokens == 4 and r.tokens == fresh(prefix + [6])
        # forward() offers what it appended; reuse_context=False takes nothing.
        a.reset()
        a.forward(prefix + [8])
        assert b.generate(prefix + [7], max_new_tokens=2, reuse_context=False).stats.cached_prompt_tokens == 0
        r = b.generate(prefix + [8, 1], max_new_tokens=12, ignore_eos=True)
        assert r.stats.cached_prompt_tokens == len(prefix) + 1 and r.tokens == fresh(prefix + [8, 1])


def test_a_used_prompt_start_is_kept_over_an_unused_one(model_dir):
    """A free slot whose start later requests used (a shared system prompt), and which no other
    slot holds, is taken last: an unrelated request takes a slot whose contents nobody reused,
    even one freed more recently, so the next request with that start still finds it. Among used
    starts, one left unused for long goes first."""
    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=128, max_batch_size=2)
    other = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=128)
    prefix = [7, 3, 9, 200, 150, 33, 2, 90, 91, 92, 14, 15]

    def run(prompt, **kw):
        return engine.generate(prompt, max_new_tokens=8, ignore_eos=True, **kw)

    assert run(prefix + [1, 2]).stats.cached_prompt_tokens == 0  # slot 0
    assert run(prefix + [3, 4]).stats.cached_prompt_tokens == len(prefix)  # slot 0 again: its start used
    run([300, 301, 302, 303])  # slot 1, never used
    run([310, 311, 312])  # slot 1 again, though slot 0 was let go longer ago
    r = run(prefix + [5])
    assert r.stats.cached_prompt_tokens == len(prefix)
    assert r.tokens == other.generate(prefix + [5], max_new_tokens=8, ignore_eos=True).tokens
    # A session opened without its prompt also spares the used start.
    with engine.session() as s:
        s.generate([320, 321], max_new_tokens=8, ignore_eos=True)
    assert run(prefix + [6]).stats.cached_prompt_tokens == len(prefix)
    # A used start weighs less the longer its slot sits unused: a long start nobody asked for
    # since goes before a shorter one in use.
    long_start, short_start = prefix + [20, 21, 22, 23, 24, 25, 26, 27], [40, 41, 42, 43, 44, 45]
    stale = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=128, max_batch_size=2)
    for p in [long_start + [1], long_start + [2]] + [short_start + [k] for k in range(1, 8)]:
        stale.generate(p, max_new_tokens=4, ignore_eos=True)
    stale.generate([330, 331], max_new_tokens=4, ignore_eos=True)
    assert stale.generate(short_start + [9], max_new_tokens=2).stats.cached_prompt_tokens == len(short_start)
    assert stale.generate(long_start + [9], max_new_tokens=2).stats.cached_prompt_tokens == 0
    # Without reuse nothing is marked used: a start used only by a request that prefilled it anew
    # is not kept over an older slot.
    fresh = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=128, max_batch_size=2)
    for p in (prefix + [1], prefix + [2], [300, 301], [310, 311]):
        fresh.generate(p, max_new_tokens=8, ignore_eos=True, reuse_context=False)
    assert fresh.generate(prefix + [5], max_new_tokens=2).stats.cached_prompt_tokens == 0


def test_asyncio_generation(model_dir):
    """agenerate / astream run the engine in worker threads: the same tokens as generate,
    concurrent calls batched (more than the slots wait for one), early exit and cancellation
    free the slot, a slot that does not come free in time is a CapacityError."""
    import asyncio

    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=128, max_batch_size=2)
    prompts = [PROMPT, [9, 8, 7, 6], [100, 101, 102], [5, 5, 5, 5, 5]]
    want = [engine.generate(p, max_new_tokens=24, ignore_eos=True).tokens for p in prompts]

    async def main() -> None:
        pieces: list = []
        r = await engine.agenerate(PROMPT, max_new_tokens=24, ignore_eos=True, on_text=pieces.append)
        assert r.tokens == want[0] and "".join(pieces) == r.text and r.stats.new_tokens == 24
        assert "".join([p async for p in engine.astream(PROMPT, max_new_tokens=24, ignore_eos=True)]) == r.text
        # Four requests on two slots: two wait, all finish with their own tokens.
        rs = await asyncio.gather(*(engine.agenerate(p, max_new_tokens=24, ignore_eos=True) for p in prompts))
        assert [x.tokens for x in rs] == want
        # Leaving a stream early cancels its generation, and a cancelled task too: the slots come free.
        async for _ in engine.astream(PROMPT, max_new_tokens=120, ignore_eos=True):
            break
        task = asyncio.create_task(engine.agenerate(PROMPT, max_new_tokens=120, ignore_eos=True))
        await asyncio.sleep(0)  # the task starts its worker and waits for tokens
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with engine.session(wait=10), engine.session(wait=10):
            with pytest.raises(medusa_rt.errors.CapacityError):
                await engine.agenerate(PROMPT, max_new_tokens=2, wait=0.1)
        with pytest.raises(TypeError):
            await engine.agenerate(PROMPT, max_new_tokenz=2)

    asyncio.run(main())


def test_chat_messages_and_multi_turn(engine):
    tok = engine.tokenizer
    turn1 = [{"role": "user", "content": "hi there"}]
    with engine.session() as s:
        r1 = s.generate(turn1, max_new_tokens=6, ignore_eos=True)
        assert r1.stats.prompt_tokens == len(tok.encode_chat(turn1))
        assert r1.tokens == engine.generate("hi there", chat=True, max_new_tokens=6, ignore_eos=True).tokens
        turn2 = turn1 + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "and then?"}]
        r2 = s.generate(turn2, max_new_tokens=6, ignore_eos=True)
        assert r2.stats.cached_prompt_tokens >= len(tok.encode_chat(turn1))  # the first turn is not prefilled again
        assert r2.tokens == engine.generate(turn2, max_new_tokens=6, ignore_eos=True, reuse_context=False).tokens
    with pytest.raises(medusa_rt.errors.InvalidArgumentError, match="mixes chat messages"):
        engine.generate([{"role": "user", "content": "x"}, 5], max_new_tokens=2)
    with pytest.raises(medusa_rt.errors.InvalidArgumentError, match="role"):
        engine.generate([{"content": "x"}], max_new_tokens=2)
    with pytest.raises(medusa_rt.errors.InvalidArgumentError, match="'content' must be"):
        engine.generate([{"role": "user", "content": 5}], max_new_tokens=2)  # not rendered as "5"


def test_forward_matches_generate(engine):
    with engine.session() as s:
        greedy = s.generate(PROMPT, max_new_tokens=6, ignore_eos=True).tokens
        s.reset()
        assert s.context_length == 0
        logits = s.forward(PROMPT)
        assert logits.shape == (1, engine.info.vocab_size)
        toks = [int(np.argmax(logits[0]))]
        for _ in range(5):
            toks.append(int(np.argmax(s.forward([toks[-1]])[0])))
        assert s.context_length == len(PROMPT) + 5
    assert toks == greedy


def test_stop_token_and_sequence(engine):
    with engine.session() as s:
        full = s.generate(PROMPT, max_new_tokens=30, ignore_eos=True).tokens
        stop_tok = full[9]
        first = full.index(stop_tok)
        r = s.generate(PROMPT, max_new_tokens=30, stop=stop_tok, ignore_eos=True)
        assert r.tokens == full[:first] and r.finish_reason == "stop"

        # A multi-token stop sequence, through the core API, with streaming hold-back.
        seq = full[12:14]
        first_seq = next(i for i in range(len(full) - 1) if full[i : i + 2] == seq)
        cfg = _core.GenerationConfig()
        cfg.max_new_tokens = 30
        cfg.ignore_eos = True
        cfg.stop_sequences = [seq]
        streamed = []
        res = s._core().generate(PROMPT, cfg, lambda toks: streamed.extend(toks) or True)
        assert list(res.tokens) == full[:first_seq] and res.finish_reason == "stop"
        assert streamed == list(res.tokens)  # the held-back part of the stop sequence never streamed


def test_stop_strings_match_the_text(engine):
    """A stop string stops generation where it appears in the text, whatever tokens carry it
    (here it begins inside a token, so its own encoding never comes up): the text ends right
    before it, the tokens before the token where it begins; streams never show any of it."""
    tok = engine.tokenizer
    full = engine.generate(PROMPT, max_new_tokens=40, ignore_eos=True, medusa=False)
    pieces = [tok.decode(full.tokens[:k]) for k in range(len(full.tokens) + 1)]
    # A 3-character stop string starting inside a token of at least 2 characters.
    k = next(k for k in range(5, len(full.tokens)) if len(pieces[k + 1]) - len(pieces[k]) >= 2
             and pieces[k + 1].startswith(pieces[k]) and len(full.text) >= len(pieces[k]) + 4)
    stop = full.text[len(pieces[k]) + 1:len(pieces[k]) + 4]
    cut = full.text.find(stop)
    want_tokens = full.tokens[:max(j for j in range(len(pieces)) if len(pieces[j]) <= cut)]
    for kw in ({}, {"medusa": False}):
        r = engine.generate(PROMPT, max_new_tokens=40, ignore_eos=True, stop=[stop], **kw)
        assert r.finish_reason == "stop" and r.text == full.text[:cut] and r.tokens == want_tokens
        assert r.stats.new_tokens == len(r.tokens)
        with engine.session() as s:
            shown = list(s.stream(PROMPT, max_new_tokens=40, ignore_eos=True, stop=[stop], **kw))
            assert "".join(shown) == r.text and s.last_result.text == r.text and s.last_result.tokens == r.tokens
    batch = engine.generate_batch([PROMPT, PROMPT[:4]], max_new_tokens=40, ignore_eos=True, stop=[stop])
    assert batch[0].text == r.text and batch[0].finish_reason == "stop"
    assert batch[1].tokens == engine.generate(PROMPT[:4], max_new_tokens=40, ignore_eos=True, stop=[stop]).tokens

    import asyncio

    got = asyncio.run(engine.agenerate(PROMPT, max_new_tokens=40, ignore_eos=True, stop=[stop]))
    assert got.text == r.text and got.tokens == r.tokens
    # A stop string that never appears changes nothing.
    same = engine.generate(PROMPT, max_new_tokens=40, ignore_eos=True, stop=["\u2603never"])
    assert same.tokens == full.tokens and same.finish_reason == "length"


def test_eos_stops(engine):
    with engine.session() as s:
        full = s.generate(PROMPT, max_new_tokens=30, ignore_eos=True).tokens
    eos = full[4]
    # A model whose EOS is a token greedy decoding produces stops there.
    core = _core.GenerationConfig()
    core.max_new_tokens = 30
    core.stop_token_ids = [eos]
    with engine.session() as s:
        res = s._core().generate(PROMPT, core)
    assert list(res.tokens) == full[: full.index(eos)] and res.finish_reason == "stop"


def test_stream_equals_generate(engine):
    with engine.session() as s:
        want = s.generate("hello world", max_new_tokens=25, ignore_eos=True)
        pieces = list(s.stream("hello world", max_new_tokens=25, ignore_eos=True))
        assert "".join(pieces) == want.text
        assert s.last_result is not None and s.last_result.tokens == want.tokens


def test_stream_cancel(engine):
    with engine.session() as s:
        it = s.stream(PROMPT, max_new_tokens=100, ignore_eos=True)
        next(it)
        it.close()  # cancels the generation in the engine
        assert s.last_result is not None
        assert s.last_result.finish_reason == "cancelled" and len(s.last_result.tokens) < 100
        # the session is usable afterwards
        assert len(s.generate(PROMPT, max_new_tokens=3, ignore_eos=True).tokens) == 3


def test_generate_cancel(engine):
    """generate(cancel=...) is polled after each token block: True ends the generation there
    ("cancelled"), with or without stop strings; False never changes the answer."""
    with engine.session() as s:
        want = s.generate(PROMPT, max_new_tokens=40, ignore_eos=True)
        calls = []
        r = s.generate(PROMPT, max_new_tokens=40, ignore_eos=True, cancel=lambda: calls.append(1) and False)
        assert (r.tokens, r.text, r.finish_reason) == (want.tokens, want.text, want.finish_reason) and calls
        for stop in (None, ["never in the text"]):
            r = s.generate(PROMPT, max_new_tokens=40, ignore_eos=True, stop=stop, cancel=lambda: True)
            assert r.finish_reason == "cancelled" and 0 < len(r.tokens) < 40
            assert r.tokens == want.tokens[: len(r.tokens)] and s.last_result is r


def test_callback_error_propagates(engine):
    def boom(tokens):
        raise RuntimeError("callback failed")

    cfg = _core.GenerationConfig()
    cfg.max_new_tokens = 5
    with engine.session() as s:
        with pytest.raises(RuntimeError, match="callback failed"):
            s._core().generate(PROMPT, cfg, boom)
        assert s.context_length == 0  # a failed generation leaves no context to reuse
        assert len(s.generate(PROMPT, max_new_tokens=2, ignore_eos=True).tokens) == 2


def test_chat_template(engine):
    tok = engine.tokenizer
    text = tok.apply_chat_template("hi there")
    assert text.endswith("assistant\n")
    with engine.session() as s:
        r = s.generate("hi there", chat=True, max_new_tokens=3, ignore_eos=True)
    assert r.stats.prompt_tokens == len(tok.encode(text, add_special_tokens=False))


def test_max_seq_len_ends_generation(engine):
    with engine.session() as s:
        r = s.generate(list(range(1, 121)), max_new_tokens=50, ignore_eos=True)
    assert r.finish_reason == "length" and len(r.tokens) == 128 - 120 + 1


def test_concurrent_sessions_from_threads(engine):
    prompts = [[i + 1, 2 * i + 3, 50 + i, 7] for i in range(4)]
    with engine.session() as s:
        expected = [s.generate(p, max_new_tokens=24, ignore_eos=True).tokens for p in prompts]
    got = [None] * 4

    def worker(i):
        with engine.session() as s:
            for _ in range(3):
                got[i] = s.generate(prompts[i], max_new_tokens=24, ignore_eos=True).tokens
                assert got[i] == expected[i]

    errors = run_in_threads(worker, 4)
    assert not errors and got == expected


def test_portable_kernels_agree(model_dir):
    """MEDUSA_RT_ISA=generic forces the portable kernels; they agree with the dispatched ones (exact
    inputs: the portable kernels have no bf16 dot product)."""
    code = (
        "import sys, numpy as np, medusa_rt;"
        f"e = medusa_rt.Engine({str(model_dir)!r}, dtype='bf16', matmul_inputs='fp32', max_seq_len=64);"
        "s = e.session(); l = s.forward(list(range(1, 30)), all_logits=True);"
        "s.reset(); g = s.generate(list(range(1, 30)), max_new_tokens=16, ignore_eos=True).tokens;"
        "np.save(sys.argv[1], l); print(e.info.isa, *g)"
    )
    outs = {}
    for isa in ("generic", None):
        env = dict(os.environ)
        env.pop("MEDUSA_RT_ISA", None)
        if isa:
            env["MEDUSA_RT_ISA"] = isa
        f = model_dir.parent / f"logits-{isa}.npy"
        p = subprocess.run([sys.executable, "-c", code, str(f)], env=env, capture_output=True, text=True, check=True)
        outs[isa] = (p.stdout.split(), np.load(f))
    assert outs["generic"][0][0] == "generic"
    np.testing.assert_allclose(outs["generic"][1], outs[None][1], atol=1e-4, rtol=1e-4)
    assert outs["generic"][0][1:] == outs[None][0][1:]


def test_huge_page_advice_changes_nothing_but_speed(model_dir, monkeypatch):
    """CPU memory comes from 2 MB slabs advised as huge pages unless MEDUSA_RT_HUGEPAGES=0 (read
    when an engine is made): the same bits either way, and engines made and dropped in turn
    (their slabs freed) keep working."""
    results = []
    for value in ("0", "1", "0", "1"):
        monkeypatch.setenv("MEDUSA_RT_HUGEPAGES", value)
        e = medusa_rt.Engine(model_dir, dtype="bf16", max_seq_len=64, max_batch_size=2)
        s = e.session()
        logits = s.forward(PROMPT, all_logits=True)
        s.reset()
        tokens = s.generate(PROMPT, max_new_tokens=12, ignore_eos=True).tokens
        results.append((logits, tokens))
        del s, e
    for logits, tokens in results[1:]:
        np.testing.assert_array_equal(logits, results[0][0])
        assert tokens == results[0][1]


def test_cli_generate_and_errors(model_dir):
    cli = [sys.executable, "-m", "medusa_rt.cli"]
    p = subprocess.run(cli + ["generate", "--model", str(model_dir), "-n", "8", "--dtype", "fp32", "hello"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "tokens/s" in p.stderr
    p = subprocess.run(cli + ["generate", "--model", str(model_dir / "nope"), "hello"], capture_output=True, text=True)
    assert p.returncode == 2 and "ModelNotFoundError" in p.stderr
    p = subprocess.run(cli + ["info", "--model", str(model_dir), "--max-seq-len", "64"], capture_output=True, text=True)
    assert p.returncode == 0 and '"vocab_size": 384' in p.stdout


def test_cli_chat_keeps_the_conversation(model_dir):
    """`medusa-rt chat`: one user turn per stdin line; later turns prefill only themselves, old
    turns are dropped when the conversation outgrows the cache, a message too long for it is
    refused and the conversation goes on."""
    cli = [sys.executable, "-m", "medusa_rt.cli", "chat", "--model", str(model_dir), "--dtype", "fp32",
           "--max-seq-len", "96", "-n", "12", "--system", "be brief"]
    turns = ["hello there", "and then what", "tell me more about it", "x " * 200, "why", "ok"]
    p = subprocess.run(cli, input="\n".join(turns) + "\n", capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    stats = [line for line in p.stderr.splitlines() if " tokens in " in line]
    assert len(stats) == 5 and "cached" not in stats[0] and "cached" in stats[1]
    assert p.stderr.count("CapacityError") == 1
    p = subprocess.run(cli + ["--temperature", "0.7", "--seed", "1"], input="hi\n", capture_output=True, text=True)
    assert p.returncode == 0 and " tokens in " in p.stderr, p.stderr


def test_session_refuses_concurrent_use(engine):
    """A second call on a busy session is refused with a clear error, not run on shared state."""
    cfg = _core.GenerationConfig()
    cfg.max_new_tokens = 5
    cfg.ignore_eos = True
    seen = []
    with engine.session() as s:
        core = s._core()

        def reenter(tokens):
            with pytest.raises(medusa_rt.InvalidArgumentError, match="already generating"):
                core.generate(PROMPT, cfg)
            with pytest.raises(medusa_rt.InvalidArgumentError, match="already generating"):
                core.forward([1])
            seen.append(tokens)
            return True

        r = core.generate(PROMPT, cfg, reenter)
        assert len(r.tokens) == 5 and seen
        assert len(s.generate(PROMPT, max_new_tokens=2, ignore_eos=True).tokens) == 2


def test_close_frees_the_slot_now(model_dir):
    """close() (and leaving a ``with``) gives the slot back whatever still refers to the session:
    a stream that failed (its exception's traceback holds the generator), or a close from another
    thread while the session generates (the slot goes back when that call returns)."""
    eng = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=64, max_batch_size=1)
    s = eng.session()
    core = s._core()  # another reference to the engine's session
    s.close()
    with pytest.raises(medusa_rt.InvalidArgumentError, match="closed"):
        core.generate(PROMPT, _core.GenerationConfig())
    with pytest.raises(medusa_rt.InvalidArgumentError, match="closed"):
        core.context_length
    core.close()  # a second close does nothing
    with eng.session() as s2:  # the one slot is free
        pieces = s2.stream(PROMPT * 20, max_new_tokens=4)  # longer than max_seq_len: fails
        with pytest.raises(medusa_rt.CapacityError):
            next(pieces)
    with eng.session():
        pass
    # A stream left paused (neither run to its end nor closed) is cancelled by the session's close.
    with eng.session() as s4:
        paused = s4.stream(PROMPT, max_new_tokens=40, ignore_eos=True)
        next(paused)
    with eng.session(wait=10):
        pass
    # Closed from another thread while generating: the call finishes, then the slot is free.
    s3 = eng.session()
    started, results = threading.Event(), []

    def on_tokens(tokens):
        started.set()
        time.sleep(0.01)
        return True

    cfg = _core.GenerationConfig()
    cfg.max_new_tokens = 20
    cfg.ignore_eos = True
    core3 = s3._core()
    t = threading.Thread(target=lambda: results.append(core3.generate(PROMPT, cfg, on_tokens)))
    t.start()
    assert started.wait(30)
    s3.close()
    with pytest.raises(medusa_rt.CapacityError):
        eng.session()  # still generating
    t.join()
    assert len(results[0].tokens) == 20
    with eng.session(wait=5):
        pass
