"""Medusa decoding in the engine: heads in all three published layouts, trees, greedy
acceptance == plain greedy decoding token for token, stop handling inside accepted blocks,
the end of the cache, typical acceptance, statistics and bad heads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import medusa_rt  # noqa: E402
from medusa_rt.errors import InvalidArgumentError, ModelFormatError, ModelNotFoundError  # noqa: E402
from medusa_rt.export import export_medusa_heads, export_model  # noqa: E402

from _medusa_heads import fit_heads, training_prompts, write_full_checkpoint, write_heads_only  # noqa: E402
from _tiny_models import build_hf_model, save_and_export  # noqa: E402

VOCAB = 384


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("medusa")
    model = build_hf_model("llama-gqa-untied", seed=5)
    prompts = training_prompts(VOCAB)
    own = fit_heads(model, prompts, num_heads=4)
    shared = fit_heads(model, prompts, num_heads=4, shared=True)
    base = save_and_export(model, tmp, "base")
    return dict(tmp=tmp, model=model, prompts=prompts, own=own, shared=shared, base=base)


def _with_heads(setup, name: str, heads_src, **kw) -> Path:
    d = setup["tmp"] / name
    if not d.exists():
        shutil.copytree(setup["base"], d)
        export_medusa_heads(heads_src, d, progress=False, **kw)
    return d


@pytest.fixture(scope="module")
def own_dir(setup):
    return _with_heads(setup, "own", write_heads_only(setup["own"], setup["tmp"] / "own-src"))


@pytest.fixture(scope="module")
def engine(own_dir):
    # The heads' tree alone (the tests below count what each step of it accepts); prompt lookup
    # has its own test.
    return medusa_rt.Engine(own_dir, dtype="fp32", max_seq_len=256, medusa_max_batch=16, prompt_lookup=0)


def _unseen(n=4):
    return training_prompts(VOCAB, n, seed=123)


def test_engine_reports_heads_and_tree(engine):
    info = engine.info
    assert info.medusa_heads == 4 and not info.medusa_shared_lm_head
    assert info.tree == "mc_sim_7b_63" and info.tree_nodes == 64


def test_greedy_medusa_equals_plain_and_accepts(engine, setup):
    tps = []
    with engine.session() as s:
        for p in setup["prompts"][:4] + _unseen():
            plain = s.generate(p, max_new_tokens=64, ignore_eos=True, medusa=False)
            med = s.generate(p, max_new_tokens=64, ignore_eos=True)
            assert med.tokens == plain.tokens
            assert med.stats.medusa and not plain.stats.medusa
            assert plain.stats.tokens_per_step == 1.0
            st = med.stats
            # every step commits its accepted speculative tokens plus the bonus token; the first
            # of the 64 tokens comes from the prefill
            assert st.tokens_per_step == pytest.approx(63 / st.steps)
            assert sum(st.accepted_per_head) + st.steps >= 63
            assert all(a >= b for a, b in zip(st.accepted_per_head, st.accepted_per_head[1:]))
            assert st.forward_seconds > 0 and st.other_seconds >= 0
            tps.append(st.tokens_per_step)
    # The heads were fitted on the first prompts: the tree must actually be accepting there.
    assert min(tps[:4]) > 2.0


@pytest.mark.parametrize("tree", ["chain-1", "chain-4", "vicuna_7b_stage2", [[0], [1], [0, 0], [2], [0, 1], [0, 0, 0]]])
def test_other_trees_lossless(own_dir, setup, tree):
    engine = medusa_rt.Engine(own_dir, dtype="fp32", max_seq_len=128, tree=tree, medusa_max_batch=16)
    with engine.session() as s:
        for p in setup["prompts"][:2] + _unseen(2):
            plain = s.generate(p, max_new_tokens=40, ignore_eos=True, medusa=False).tokens
            assert s.generate(p, max_new_tokens=40, ignore_eos=True).tokens == plain


def test_bf16_lossless(own_dir, setup):
    engine = medusa_rt.Engine(own_dir, dtype="bf16", max_seq_len=128, medusa_max_batch=16)
    with engine.session() as s:
        for p in setup["prompts"][:3]:
            plain = s.generate(p, max_new_tokens=48, ignore_eos=True, medusa=False)
            med = s.generate(p, max_new_tokens=48, ignore_eos=True)
            assert med.tokens == plain.tokens and med.stats.tokens_per_step > 1.5


def test_max_new_tokens_inside_a_block(engine, setup):
    p = setup["prompts"][0]
    with engine.session() as s:
        plain = s.generate(p, max_new_tokens=40, ignore_eos=True, medusa=False).tokens
        for n in range(1, 41):
            r = s.generate(p, max_new_tokens=n, ignore_eos=True)
            assert r.tokens == plain[:n] and r.finish_reason == "length"


def test_stop_token_inside_a_block(engine, setup):
    p = setup["prompts"][1]
    with engine.session() as s:
        plain = s.generate(p, max_new_tokens=40, ignore_eos=True, medusa=False).tokens
        for i in (1, 5, 9, 17, 30):
            stop = plain[i]
            r = s.generate(p, max_new_tokens=40, ignore_eos=True, stop=stop)
            assert r.tokens == plain[: plain.index(stop)] and r.finish_reason == "stop"
        seq = plain[10:13]
        first = next(i for i in range(len(plain)) if plain[i : i + 3] == seq)
        core_cfg = medusa_rt._core.GenerationConfig()
        core_cfg.max_new_tokens = 40
        core_cfg.ignore_eos = True
        core_cfg.stop_sequences = [seq]
        streamed = []
        res = s._core().generate(p, core_cfg, lambda t: streamed.extend(t) or True)
        assert list(res.tokens) == plain[:first] and streamed == plain[:first]


def test_end_of_cache_falls_back(own_dir, setup):
    """Close to max_seq_len the tree is cut to the room left; output still equals plain decoding."""
    p = setup["prompts"][2]
    for max_seq in (len(p) + 2, len(p) + 7, len(p) + 30, len(p) + 70):
        engine = medusa_rt.Engine(own_dir, dtype="fp32", max_seq_len=max_seq, medusa_max_batch=16)
        with engine.session() as s:
            plain = s.generate(p, max_new_tokens=200, ignore_eos=True, medusa=False)
            med = s.generate(p, max_new_tokens=200, ignore_eos=True)
        assert med.tokens == plain.tokens and len(med.tokens) == max_seq - len(p) + 1
        assert med.finish_reason == plain.finish_reason == "length"


def test_prompt_lookup_is_lossless_and_accepts(own_dir, setup):
    """Tokens looked up in the context are verified like head candidates: with and without heads,
    greedy output equals plain decoding, and where the output repeats its context they are taken."""
    engine = medusa_rt.Engine(own_dir, dtype="fp32", max_seq_len=256, medusa_max_batch=16, prompt_lookup=4)
    no_heads = medusa_rt.Engine(setup["base"], dtype="fp32", max_seq_len=256, prompt_lookup=4)
    assert engine.info.prompt_lookup == 4 and no_heads.info.medusa_heads == 0
    looked = 0
    with engine.session() as s, no_heads.session() as s0:
        for p in setup["prompts"][:2] + _unseen(3):
            plain = s.generate(p, max_new_tokens=64, ignore_eos=True, medusa=False, prompt_lookup=False)
            assert plain.stats.lookup_steps == 0 and plain.stats.tokens_per_step == 1.0
            assert s.generate(p, max_new_tokens=64, ignore_eos=True, medusa=False).stats.lookup_steps == 0
            for r in (s.generate(p, max_new_tokens=64, ignore_eos=True),
                      s0.generate(p, max_new_tokens=64, ignore_eos=True)):
                st = r.stats
                assert r.tokens == plain.tokens
                assert st.tokens_per_step == pytest.approx(63 / st.steps)
                assert 0 <= st.lookup_tokens <= 4 * st.lookup_steps and st.lookup_steps <= st.steps
                looked += st.lookup_tokens
            # Without heads, every token beyond one per step came from the lookup (the last step
            # may accept more than max_new_tokens leaves room for).
            assert 63 <= st.steps + st.lookup_tokens < 63 + 4
    assert looked > 0
    # Batched requests (fused steps and lookup steps mixed) and the end of the cache.
    batch = medusa_rt.Engine(own_dir, dtype="fp32", max_seq_len=96, max_batch_size=3, medusa_max_batch=16,
                             prompt_lookup=6)
    prompts = setup["prompts"][:2] + _unseen(2)
    plain = [r.tokens for r in batch.generate_batch(prompts, max_new_tokens=200, ignore_eos=True, medusa=False)]
    got = batch.generate_batch(prompts, max_new_tokens=200, ignore_eos=True)
    assert [r.tokens for r in got] == plain and sum(r.stats.lookup_tokens for r in got) > 0
    assert all(r.finish_reason == "length" for r in got)
    typical = batch.generate(prompts[0], max_new_tokens=48, ignore_eos=True, acceptance="typical")
    assert len(typical.tokens) == 48 and typical.tokens[0] == plain[0][0]
    assert medusa_rt.Engine(setup["base"], dtype="fp32", max_seq_len=64).info.prompt_lookup == 4  # the CPU's default
    for bad in (-2, 65):
        with pytest.raises(InvalidArgumentError, match="prompt_lookup"):
            medusa_rt.Engine(setup["base"], dtype="fp32", max_seq_len=64, prompt_lookup=bad)


def test_session_reuses_its_context_losslessly(own_dir, setup):
    """A session's next request reuses the context its trees, looked-up chains and plain steps
    left in the cache: the same tokens as a fresh session (greedy and sampled), and the cached
    entries bit for bit those a prefill of the same tokens writes."""
    import numpy as np

    engine = medusa_rt.Engine(own_dir, dtype="fp32", max_seq_len=256, max_batch_size=2, medusa_max_batch=16,
                              prompt_lookup=4)
    p, q = setup["prompts"][0], _unseen(1)[0]
    for kw in ({}, {"medusa": False}, {"do_sample": True, "temperature": 0.8, "seed": 3}):
        with engine.session() as s, engine.session() as fresh:
            r1 = s.generate(p, max_new_tokens=40, ignore_eos=True, **kw)
            turn2 = p + r1.tokens + q[:5]
            r2 = s.generate(turn2, max_new_tokens=40, ignore_eos=True, **kw)
            ref = fresh.generate(turn2, max_new_tokens=40, ignore_eos=True, reuse_context=False, **kw)
            assert r2.tokens == ref.tokens and ref.stats.cached_prompt_tokens == 0
            # The cache holds the answer but its last token, and may hold tokens a last step
            # accepted past max_new_tokens.
            assert r2.stats.cached_prompt_tokens >= len(p) + len(r1.tokens) - 1
            assert (r1.stats.tree_steps > 0) == (kw.get("medusa") is not False)
    with engine.session() as s, engine.session() as fresh:
        full = fresh.generate(p, max_new_tokens=80, ignore_eos=True, medusa=False).tokens
        r = s.generate(p, max_new_tokens=40, ignore_eos=True)
        assert r.stats.tree_steps > 0 and r.tokens == full[:40]
        ctx = (p + full)[:s.context_length]
        fresh.reset()
        np.testing.assert_array_equal(s.forward(q[:3], all_logits=True),
                                      fresh.forward(ctx + q[:3], all_logits=True)[-3:])
    # What writes a slot's cache outside a sequence (timing hooks) drops the slot's cached tokens.
    one = medusa_rt.Engine(own_dir, dtype="fp32", max_seq_len=256, medusa_max_batch=16)
    want = one.generate(p, max_new_tokens=20, ignore_eos=True)
    assert one.generate(p, max_new_tokens=20, ignore_eos=True).stats.cached_prompt_tokens == len(p) - 1
    medusa_rt._core._testing.time_tree_step(one._engine, 4, 1, 0)
    again = one.generate(p, max_new_tokens=20, ignore_eos=True)
    assert again.stats.cached_prompt_tokens == 0 and again.tokens == want.tokens


@pytest.mark.parametrize("layout", ["safetensors", "pt", "full", "version2"])
def test_head_layouts(setup, layout):
    tmp = setup["tmp"]
    if layout == "full":
        src = write_full_checkpoint(setup["model"], setup["own"], tmp / "full-ckpt")
        d = export_model(src, tmp / "full-rt", progress=False)  # heads come along automatically
    elif layout == "version2":
        d = _with_heads(setup, "v2", write_heads_only(setup["shared"], tmp / "v2-src", version2=True))
    else:
        d = _with_heads(setup, layout, write_heads_only(setup["own"], tmp / f"{layout}-src", pt=layout == "pt"))
    engine = medusa_rt.Engine(d, dtype="fp32", max_seq_len=128, medusa_max_batch=16)
    assert engine.info.medusa_heads == 4
    assert engine.info.medusa_shared_lm_head == (layout == "version2")
    with engine.session() as s:
        p = setup["prompts"][0]
        plain = s.generate(p, max_new_tokens=48, ignore_eos=True, medusa=False)
        med = s.generate(p, max_new_tokens=48, ignore_eos=True)
    assert med.tokens == plain.tokens
    assert med.stats.tokens_per_step > 2.0


def test_same_heads_same_steps_in_every_layout(setup):
    """The layouts hold the same weights: the decoding steps must be identical."""
    tmp = setup["tmp"]
    stats = []
    for name, pt in (("safetensors", False), ("pt", True)):
        d = _with_heads(setup, name, write_heads_only(setup["own"], tmp / f"{name}-src", pt=pt))
        e = medusa_rt.Engine(d, dtype="fp32", max_seq_len=128, medusa_max_batch=16)
        stats.append(e.generate(setup["prompts"][3], max_new_tokens=48, ignore_eos=True).stats.accepted_per_head)
    assert stats[0] == stats[1]


def test_typical_acceptance(engine, setup):
    p = setup["prompts"][0]
    with engine.session() as s:
        a = s.generate(p, max_new_tokens=48, ignore_eos=True, acceptance="typical")
        b = s.generate(p, max_new_tokens=48, ignore_eos=True, acceptance="typical")
        assert a.tokens == b.tokens  # deterministic given the logits
        assert a.stats.tokens_per_step >= 1.0 and len(a.tokens) == 48
        plain = s.generate(p, max_new_tokens=48, ignore_eos=True, medusa=False)
        assert a.tokens[0] == plain.tokens[0]  # the root is always the base model's argmax
        # A threshold every candidate passes accepts a deepest path (4 speculative tokens) each step.
        loose = s.generate(p, max_new_tokens=48, ignore_eos=True, acceptance="typical",
                           posterior_threshold=1e-12, posterior_alpha=1e-12)
        steps = loose.stats.steps
        assert loose.stats.accepted_per_head == [steps] * 4 and steps == -(-47 // 5)
        with pytest.raises(InvalidArgumentError, match="posterior_threshold"):
            s.generate(p, acceptance="typical", posterior_threshold=0.0)
        with pytest.raises(InvalidArgumentError, match="acceptance must be"):
            s.generate(p, acceptance="sampling")
        # Options greedy acceptance does not use are still checked, not dropped silently
        # (temperature 0 means greedy: fine with greedy acceptance, not with typical).
        for bad in (dict(temperature=-1.0), dict(temperature=float("nan")), dict(posterior_alpha=1.5),
                    dict(posterior_threshold=-0.1), dict(temperature=0.0, acceptance="typical")):
            with pytest.raises(InvalidArgumentError, match=next(iter(bad))):
                s.generate(p, max_new_tokens=2, **bad)
        assert s.generate(p, max_new_tokens=8, ignore_eos=True, temperature=0.0).tokens == plain.tokens[:8]


def test_medusa_flags(tmp_path, setup):
    plain_engine = medusa_rt.Engine(setup["base"], dtype="fp32", max_seq_len=64, medusa_max_batch=16)
    assert plain_engine.info.medusa_heads == 0 and plain_engine.info.tree_nodes == 1
    with plain_engine.session() as s:
        r = s.generate([5, 6, 7], max_new_tokens=5, ignore_eos=True)
        assert not r.stats.medusa and r.stats.tree_steps == 0
        with pytest.raises(InvalidArgumentError, match="no Medusa heads"):
            s.generate([5, 6, 7], medusa=True)
    with pytest.raises(InvalidArgumentError, match="no Medusa heads"):
        medusa_rt.Engine(setup["base"], tree="chain-2", medusa_max_batch=16)


def test_bad_trees_for_heads(own_dir):
    with pytest.raises(InvalidArgumentError, match="5 deep but the model has 4 Medusa heads"):
        medusa_rt.Engine(own_dir, tree="chain-5", medusa_max_batch=16)
    with pytest.raises(InvalidArgumentError, match="uses rank 3 but only the top 3"):
        medusa_rt.Engine(own_dir, tree=[[0], [3]], medusa_top_k=3, medusa_max_batch=16)
    with pytest.raises(InvalidArgumentError, match="no parent"):
        medusa_rt.Engine(own_dir, tree=[[0, 1]], medusa_max_batch=16)
    with pytest.raises(InvalidArgumentError, match="unknown tree"):
        medusa_rt.Engine(own_dir, tree="mc_sim_13b", medusa_max_batch=16)


def test_heads_that_do_not_fit(setup, tmp_path):
    bad = {k: v for k, v in setup["own"].items()}
    bad["0.0.linear.weight"] = torch.zeros(95, 96)
    src = write_heads_only(bad, tmp_path / "bad-src")
    d = tmp_path / "m"
    shutil.copytree(setup["base"], d)
    with pytest.raises(ModelFormatError, match=r"0\.0\.linear\.weight has shape \[95, 96\].*needs \[96, 96\]"):
        export_medusa_heads(src, d, progress=False)
    wrong_vocab = {k: (v[:100] if k.endswith(".1.weight") else v) for k, v in setup["own"].items()}
    with pytest.raises(ModelFormatError, match="vocab_size 384"):
        export_medusa_heads(write_heads_only(wrong_vocab, tmp_path / "wv"), d, progress=False)
    missing = {k: v for k, v in setup["own"].items() if k != "2.1.weight"}
    with pytest.raises(ModelFormatError, match="head 2"):
        export_medusa_heads(write_heads_only(missing, tmp_path / "mi"), d, progress=False)
    with pytest.raises(ModelNotFoundError, match="no Medusa heads"):
        export_medusa_heads(tmp_path, d, progress=False)
    # A heads file made for another model is refused by the engine.
    other = tmp_path / "other"
    shutil.copytree(setup["base"], other)
    cfg = json.loads((other / "config.json").read_text())
    export_medusa_heads(write_heads_only(setup["own"], tmp_path / "ok"), d, progress=False)
    heads = d / "medusa_heads.safetensors"
    raw = bytearray(heads.read_bytes())
    raw[8:40] = b" " * 32  # break the header
    heads.write_bytes(bytes(raw))
    with pytest.raises(ModelFormatError, match="medusa_heads.safetensors"):
        medusa_rt.Engine(d, medusa_max_batch=16)
    assert cfg["hidden_size"] == 96


def test_existing_heads_are_not_overwritten(own_dir, setup, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(own_dir, d)
    before = (d / "medusa_heads.safetensors").read_bytes()
    with pytest.raises(InvalidArgumentError, match="exists"):
        export_medusa_heads(write_heads_only(setup["shared"], tmp_path / "s", version2=True), d, progress=False)
    assert (d / "medusa_heads.safetensors").read_bytes() == before


def test_default_tree_recorded_with_heads(setup):
    d = _with_heads(setup, "with-tree", write_heads_only(setup["own"], setup["tmp"] / "wt-src"),
                    default_tree=[[0], [0, 0], [1]])
    e = medusa_rt.Engine(d, dtype="fp32", max_seq_len=64, medusa_max_batch=16)
    assert e.info.tree_nodes == 4


def test_concurrent_medusa_sessions(own_dir, setup):
    import threading

    engine = medusa_rt.Engine(own_dir, dtype="fp32", max_seq_len=128, max_batch_size=3, medusa_max_batch=16)
    prompts = setup["prompts"][:3]
    with engine.session() as s:
        expected = [s.generate(p, max_new_tokens=32, ignore_eos=True, medusa=False).tokens for p in prompts]
    got = [None] * 3

    def run(i):
        with engine.session() as s:
            got[i] = s.generate(prompts[i], max_new_tokens=32, ignore_eos=True).tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def _root_heads(setup, scale=0.5, seed=3):
    """The fitted shared-lm_head heads plus a random root input R_k per head (published names)."""
    g = torch.Generator().manual_seed(seed)
    state = dict(setup["shared"])
    for k in range(4):
        state[f"{k}.root.weight"] = torch.randn(96, 96, generator=g) * scale
    return state


def _record_steps(engine, prompt, n):
    """Greedy Medusa generation with the host step's records: (tokens, [(root position, tree
    tokens)]) where the root position is the root token's index in prompt + tokens."""
    from medusa_rt import _core

    with engine.session() as s:
        _core._testing.set_record(s._core(), True)
        r = s.generate(prompt, max_new_tokens=n, ignore_eos=True)
        records = _core._testing.take_records(s._core())
    steps, pos = [], len(prompt)
    for rec in records:
        steps.append((pos, list(rec["tokens"])))
        pos += len(rec["path"]) + 1
    return r.tokens, steps


def _lossless_steps(engine, n=40):
    """Greedy Medusa on 3 unseen prompts, asserted equal to plain greedy decoding; yields each
    step's (hidden state at the root's position [1, H], root token, tree tokens), the root
    asserted to be the tree's first token."""
    for p in _unseen(3):
        tokens, steps = _record_steps(engine, p, n)
        assert tokens == engine.generate(p, max_new_tokens=n, ignore_eos=True, medusa=False).tokens
        seq = p + tokens
        with engine.session() as s:
            hidden = s.hidden_states(seq)
        for pos, tree_tokens in steps:
            assert tree_tokens[0] == seq[pos]
            yield hidden[pos - 1:pos], seq[pos], tree_tokens


def _batch_fused_and_host(d, tree, heads_file=None):
    """Greedy Medusa on 3 unseen prompts in one batch, with the fused step and with the host step:
    asserts both give the same tokens and acceptance; returns [(tokens, accepted per head)]."""
    import os

    stats = {}
    for fused in ("1", "0"):
        os.environ["MEDUSA_RT_FUSED_STEP"] = fused
        try:
            e = medusa_rt.Engine(d, dtype="fp32", max_seq_len=256, max_batch_size=3, tree=tree, medusa_max_batch=16,
                                 medusa_heads=heads_file)
            stats[fused] = [(r.tokens, r.stats.accepted_per_head)
                            for r in e.generate_batch(_unseen(3), max_new_tokens=30, ignore_eos=True)]
        finally:
            del os.environ["MEDUSA_RT_FUSED_STEP"]
    assert stats["1"] == stats["0"]
    return stats["1"]


def test_heads_with_a_root_input(setup, tmp_path):
    """Heads that also read the root token's embedding (format_version 2): the engine's candidates
    are an independent NumPy evaluation of the heads given the hidden state and the root (the
    model's input embedding, untied from its lm_head here), lossless, same in both step kinds."""
    import numpy as np

    from medusa_rt.export.safetensors_io import SafetensorsFile
    from medusa_rt.train.heads_np import RuntimeHeads, load_embedding, load_lm_head

    d = _with_heads(setup, "root", write_heads_only(_root_heads(setup), tmp_path / "src"))
    heads_file = d / "medusa_heads.safetensors"
    with SafetensorsFile(heads_file) as f:
        assert f.metadata["format_version"] == "2" and "medusa.3.root.weight" in f.keys()
    tree = [[0], [1], [2], [0, 0], [0, 0, 0]]  # nodes: head 0 ranks 0-2, head 1 rank 0, head 2 rank 0
    engine = medusa_rt.Engine(d, dtype="fp32", medusa_heads_dtype="fp32", max_seq_len=256, tree=tree, medusa_max_batch=16, prompt_lookup=0)
    heads = RuntimeHeads.load(heads_file)
    assert heads.roots is not None
    plain = RuntimeHeads(heads.blocks, None, heads.metadata)  # the same heads without the root input
    lm, emb = load_lm_head(d), load_embedding(d)
    assert not np.array_equal(lm, emb)
    differs = 0
    for h, root, tree_tokens in _lossless_steps(engine):
        want = heads.top_k(h, lm, 3, emb[[root]])[:, 0]
        assert tree_tokens[1:4] == want[0].tolist()
        assert tree_tokens[4:] == [int(want[1][0]), int(want[2][0])]
        differs += plain.top_k(h, lm, 3)[0, 0].tolist() != want[0].tolist()
    assert differs > 0  # the root input changes the candidates: the check above has teeth
    # The fused step (candidates for each row's root gathered in backend memory) agrees.
    _batch_fused_and_host(d, tree)


def test_draft_vocabulary_cut_to_its_most_frequent_tokens(setup, tmp_path):
    """medusa_draft_vocab=N: the heads rank only the N most frequent tokens of the file's draft
    vocabulary (by medusa.draft_vocab_count; ties to the lower id). The engine's candidates are
    the NumPy heads' top-k over those N, different from the whole vocabulary's, and lossless; bad
    counts and limits are refused by name."""
    import numpy as np

    from medusa_rt.export.medusa_heads import write_heads_file
    from medusa_rt.export.safetensors_io import SafetensorsFile, TensorToWrite, write_safetensors
    from medusa_rt.train.heads_np import RuntimeHeads, load_lm_head

    from medusa_rt import _core

    heads = {k: v.float().numpy() for k, v in setup["shared"].items()}
    vocab = np.arange(3, VOCAB, 2)  # 191 draft tokens
    # 38 tokens counted 9 times, 4 tied at 5 (the cut at 40 keeps the two with the lower ids),
    # the rest once.
    counts = np.ones(vocab.size, np.int64)
    top = list(range(150, 188))
    counts[top] = 9
    counts[[120, 7, 99, 30]] = 5
    keep = sorted(int(vocab[i]) for i in top + [7, 30])
    f = tmp_path / "counted.safetensors"
    write_heads_file(heads, f, hidden=96, vocab=VOCAB, dtype="float32", draft_vocab=vocab, draft_counts=counts,
                     progress=False)
    assert RuntimeHeads.load(f, draft_vocab=40).draft_vocab.tolist() == keep
    tree = [[0], [1], [0, 0]]
    e = medusa_rt.Engine(setup["base"], dtype="fp32", medusa_heads=f, medusa_heads_dtype="fp32", tree=tree,
                         medusa_max_batch=16, prompt_lookup=0, medusa_draft_vocab=40)
    assert e.info.medusa_draft_vocab == 40 and _core._testing.draft_vocab(e._engine) == keep
    ref, whole = RuntimeHeads.load(f, draft_vocab=40), RuntimeHeads.load(f)
    lm = load_lm_head(setup["base"])
    differs = 0
    for h, _, tree_tokens in _lossless_steps(e):
        want = ref.top_k(h, lm, 2)
        assert tree_tokens[1:] == [int(want[0, 0, 0]), int(want[0, 0, 1]), int(want[1, 0, 0])]
        assert np.isin(tree_tokens[1:], keep).all()
        differs += whole.top_k(h, lm, 2)[:, 0, 0].tolist() != want[:, 0, 0].tolist()
    assert differs > 0  # the cut changes the candidates: the check above has teeth
    # 0 (and anything at or above the file's size) keeps the whole draft vocabulary.
    assert medusa_rt.Engine(setup["base"], medusa_heads=f, tree=tree, medusa_draft_vocab=0).info.medusa_draft_vocab == 191
    assert medusa_rt.Engine(setup["base"], medusa_heads=f, tree=tree, medusa_draft_vocab=999).info.medusa_draft_vocab == 191
    with pytest.raises(InvalidArgumentError, match="medusa_top_k"):
        medusa_rt.Engine(setup["base"], medusa_heads=f, tree=tree, medusa_draft_vocab=5)
    with pytest.raises(InvalidArgumentError, match="medusa_draft_vocab"):
        medusa_rt.Engine(setup["base"], medusa_heads=f, tree=tree, medusa_draft_vocab=-2)
    # Without counts the default keeps everything and an explicit cut is refused; without a draft
    # vocabulary any explicit N is.
    plain = tmp_path / "uncounted.safetensors"
    write_heads_file(heads, plain, hidden=96, vocab=VOCAB, dtype="float32", draft_vocab=vocab, progress=False)
    assert medusa_rt.Engine(setup["base"], medusa_heads=plain, tree=tree).info.medusa_draft_vocab == 191
    with pytest.raises(InvalidArgumentError, match="draft_vocab_count"):
        medusa_rt.Engine(setup["base"], medusa_heads=plain, tree=tree, medusa_draft_vocab=40)
    with pytest.raises(InvalidArgumentError, match="draft_vocab_count"):
        RuntimeHeads.load(plain, draft_vocab=40)
    full = tmp_path / "full.safetensors"
    write_heads_file(heads, full, hidden=96, vocab=VOCAB, dtype="float32", progress=False)
    assert medusa_rt.Engine(setup["base"], medusa_heads=full, tree=tree).info.medusa_draft_vocab == 0
    with pytest.raises(InvalidArgumentError, match="no draft vocabulary"):
        medusa_rt.Engine(setup["base"], medusa_heads=full, tree=tree, medusa_draft_vocab=400)
    with pytest.raises(InvalidArgumentError, match="draft_counts"):
        write_heads_file(heads, tmp_path / "x.safetensors", hidden=96, vocab=VOCAB, dtype="float32",
                         draft_vocab=vocab, draft_counts=counts[:-1], progress=False)
    # Counts of the wrong shape, negative ones, or counts without a draft vocabulary in a file are
    # refused with the tensor named.
    for src_file, bad_counts in ((plain, counts[:-1].astype("<i4")), (plain, np.full(vocab.size, -1, "<i4")),
                                 (full, counts.astype("<i4"))):
        bad = tmp_path / "bad.safetensors"
        with SafetensorsFile(src_file) as src:
            items = [TensorToWrite(n, src.dtype(n), tuple(src.shape(n)), lambda a=np.array(src.get(n)): a)
                     for n in src.keys()]
            meta = dict(src.metadata)
        items.append(TensorToWrite("medusa.draft_vocab_count", "I32", bad_counts.shape, lambda c=bad_counts: c))
        write_safetensors(bad, items, metadata=meta)
        with pytest.raises(ModelFormatError, match="medusa.draft_vocab_count"):
            medusa_rt.Engine(setup["base"], medusa_heads=bad, tree=tree)
        if src_file is plain:
            with pytest.raises(ModelFormatError, match="medusa.draft_vocab_count"):
                RuntimeHeads.load(bad, draft_vocab=40)


def test_root_input_file_errors(setup, tmp_path):
    from medusa_rt.export.safetensors_io import SafetensorsFile, TensorToWrite, write_safetensors

    partial = {k: v for k, v in _root_heads(setup).items() if k != "2.root.weight"}
    d = tmp_path / "m"
    shutil.copytree(setup["base"], d)
    with pytest.raises(ModelFormatError, match=r"root inputs .* for heads \[0, 1, 3\]"):
        export_medusa_heads(write_heads_only(partial, tmp_path / "partial"), d, progress=False)
    export_medusa_heads(write_heads_only(_root_heads(setup), tmp_path / "ok"), d, progress=False)
    good = d / "medusa_heads.safetensors"

    def rewrite(drop=None, version=None):
        with SafetensorsFile(good) as f:
            meta = dict(f.metadata)
            items = [TensorToWrite(n, f.dtype(n), tuple(f.shape(n)), lambda a=f.get(n).copy(): a)
                     for n in f.keys() if n != drop]
        if version:
            meta["format_version"] = version
        out = tmp_path / "bad.safetensors"
        write_safetensors(out, items, metadata=meta)
        return out

    with pytest.raises(ModelFormatError, match=r"medusa\.1\.root\.weight"):
        medusa_rt.Engine(d, medusa_heads=rewrite(drop="medusa.1.root.weight"), medusa_max_batch=16)
    with pytest.raises(ModelFormatError, match="needs format_version 2"):
        medusa_rt.Engine(d, medusa_heads=rewrite(version="1"), medusa_max_batch=16)
    with pytest.raises(ModelFormatError, match=r"medusa\.1\.path\.1\.weight"):
        medusa_rt.Engine(d, medusa_heads=rewrite(version="3"), medusa_max_batch=16)
    with pytest.raises(ModelFormatError, match="metadata 'draft_layer' missing"):
        medusa_rt.Engine(d, medusa_heads=rewrite(version="4"), medusa_max_batch=16)
    with pytest.raises(medusa_rt.errors.UnsupportedModelError, match="format_version 6"):
        medusa_rt.Engine(d, medusa_heads=rewrite(version="6"), medusa_max_batch=16)


def _path_heads(setup, scale=0.5, seed=5):
    """Root-input heads plus a random path input P_kj (j = 1..k) per head (published names)."""
    g = torch.Generator().manual_seed(seed)
    state = _root_heads(setup)
    for k in range(4):
        for j in range(1, k + 1):
            state[f"{k}.path.{j}.weight"] = torch.randn(96, 96, generator=g) * scale
    return state


def test_heads_with_a_path_input(setup, tmp_path):
    """Heads that read their tree path (format_version 3, Hydra-style): every tree node with
    children has its own candidates, an independent NumPy evaluation of head d on h + R_d e(root)
    + sum_j P_dj e(path_j) with the node's path as the engine drafted it; lossless, same in both
    step kinds and across batch sizes."""
    import numpy as np

    from medusa_rt import _core
    from medusa_rt.export.safetensors_io import SafetensorsFile
    from medusa_rt.train.heads_np import RuntimeHeads, load_embedding, load_lm_head

    d = _with_heads(setup, "path", write_heads_only(_path_heads(setup), tmp_path / "src"))
    heads_file = d / "medusa_heads.safetensors"
    with SafetensorsFile(heads_file) as f:
        assert f.metadata["format_version"] == "3" and "medusa.3.path.3.weight" in f.keys()
    tree = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]]
    nodes = [()] + sorted(map(tuple, tree), key=lambda p: (len(p), p))  # the engine's node order
    assert [list(p) for p in _core.TreeSpec(tree).paths] == [list(p) for p in nodes[1:]]
    engine = medusa_rt.Engine(d, dtype="fp32", medusa_heads_dtype="fp32", max_seq_len=256, tree=tree, medusa_max_batch=16, prompt_lookup=0)
    heads = RuntimeHeads.load(heads_file)
    assert heads.paths is not None and len(heads.paths[3]) == 3
    lm, emb = load_lm_head(d), load_embedding(d)
    checked = differs = 0
    for h, root, tree_tokens in _lossless_steps(engine):
        tok = dict(zip(nodes, tree_tokens))
        for parent in nodes:
            children = [c for c in nodes if len(c) == len(parent) + 1 and c[:-1] == parent]
            if not children:
                continue
            depth = len(parent)
            path_emb = [emb[[tok[parent[:j]]]] for j in range(1, depth + 1)]
            pad = [np.zeros_like(emb[[root]])] * (3 - depth)  # heads past this depth: not compared
            want = heads.top_k(h, lm, 3, emb[[root]], path_emb + pad)[depth, 0]
            for c in children:
                assert tok[c] == int(want[c[-1]]), (parent, c)
                checked += 1
        differs += tok[(0, 0)] != tok[(1, 0)]  # same head and rank, different paths
    assert checked > 0 and differs > 0  # the path input changes the candidates: the check has teeth
    batch = _batch_fused_and_host(d, tree)
    alone = [engine.generate(p, max_new_tokens=30, ignore_eos=True) for p in _unseen(3)]
    assert [r.tokens for r in alone] == [t for t, _ in batch]


def _five_node_tree_engine(d, heads_file, cfg):
    """A 5-node tree of depth 3 (two branches) for per-step candidate checks: its paths, its nodes
    in engine order (root first), an fp32 engine with the heads and no prompt lookup, and the NumPy
    heads."""
    from medusa_rt.train.heads_np import RuntimeHeads

    tree = [[0], [1], [0, 0], [1, 0], [0, 0, 0]]
    nodes = [()] + sorted(map(tuple, tree), key=lambda p: (len(p), p))
    engine = medusa_rt.Engine(d, dtype="fp32", medusa_heads_dtype="fp32", max_seq_len=256, tree=tree,
                              medusa_heads=heads_file, medusa_max_batch=16, prompt_lookup=0)
    return tree, nodes, engine, RuntimeHeads.load(heads_file, config=cfg)


def _drafted_parents(nodes, tree_tokens, emb, max_depth=3):
    """The tree's nodes with children (above max_depth) as (depth, [(child, its token)], path
    input): the embeddings of the node's path as the engine drafted it, zero rows for the heads
    past its depth (their candidates are not compared)."""
    import numpy as np

    tok = dict(zip(nodes, tree_tokens))
    for parent in (n for n in nodes if len(n) < max_depth):
        children = [c for c in nodes if len(c) == len(parent) + 1 and c[:-1] == parent]
        if children:
            depth = len(parent)
            path = [emb[[tok[parent[:j]]]] for j in range(1, depth + 1)]
            yield depth, [(c, tok[c]) for c in children], path + [np.zeros_like(emb[:1])] * (max_depth - depth)


def _fused_heads(setup, scale=0.1, seed=9):
    """Path-input heads plus a random fusion weight F_0 for feature layer 1 (published names)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v.float().numpy() for k, v in _path_heads(setup).items()}
    state["fuse.0.weight"] = (torch.randn(96, 96, generator=g) * scale).numpy()
    return state


def test_heads_with_feature_layers(setup, tmp_path):
    """Heads that also read a base-model layer's output (format_version 5): the engine's
    candidates are an independent NumPy evaluation of the path-input heads on h + F rmsnorm(x_1),
    x_1 the residual stream after decoder layer 1 at the root's position; lossless; the fused and
    the host step agree."""
    import json

    from medusa_rt.export.medusa_heads import write_heads_file
    from medusa_rt.export.safetensors_io import SafetensorsFile
    from medusa_rt.train.heads_np import RuntimeHeads, load_embedding, load_lm_head

    d = setup["base"]
    cfg = json.loads((d / "config.json").read_text())
    heads_file = tmp_path / "fused.safetensors"
    with pytest.raises(ModelFormatError, match="feature layers need fuse"):
        write_heads_file(_fused_heads(setup), heads_file, hidden=96, vocab=cfg["vocab_size"], dtype="float32")
    write_heads_file(_fused_heads(setup), heads_file, hidden=96, vocab=cfg["vocab_size"], dtype="float32",
                     feature_layers=[1])
    with SafetensorsFile(heads_file) as f:
        assert f.metadata["format_version"] == "5" and json.loads(f.metadata["feature_layers"]) == [1]
    tree, nodes, engine, heads = _five_node_tree_engine(d, heads_file, cfg)
    assert heads.feature_layers == (1,) and heads.paths is not None
    unfused = RuntimeHeads(heads.blocks, None, heads.metadata, heads.draft_vocab, heads.roots, heads.paths)
    lm, emb = load_lm_head(d), load_embedding(d)
    checked = differs = 0
    for p in _unseen(3):
        tokens, steps = _record_steps(engine, p, 30)
        assert tokens == engine.generate(p, max_new_tokens=30, ignore_eos=True, medusa=False).tokens
        seq = p + tokens
        with engine.session() as s:
            out = s.hidden_states(seq, [1])  # [rows, 2, H]: final, after layer 1 (checked against HF)
        for pos, tree_tokens in steps:
            h = heads.input_states(out[pos - 1:pos, 0], out[pos - 1:pos, 1:])
            for depth, children, path in _drafted_parents(nodes, tree_tokens, emb):
                want = heads.top_k(h, lm, 2, emb[[seq[pos]]], path)[depth, 0]
                for c, token in children:
                    assert token == int(want[c[-1]]), (pos, c)
                    checked += 1
            raw = unfused.top_k(out[pos - 1:pos, 0], lm, 2, emb[[seq[pos]]], [emb[[tree_tokens[1]]]] * 3)
            differs += raw[0, 0].tolist() != tree_tokens[1:3]  # nodes (0,) and (1,)
    assert checked > 0 and differs > 0  # the fusion changes the candidates: the check has teeth
    _batch_fused_and_host(d, tree, heads_file)


def test_feature_layer_file_errors(setup, tmp_path):
    """Broken format-5 heads files get a ModelFormatError naming the problem."""
    import json

    from medusa_rt.export.medusa_heads import write_heads_file
    from medusa_rt.export.safetensors_io import SafetensorsFile, TensorToWrite, write_safetensors

    d = setup["base"]
    cfg = json.loads((d / "config.json").read_text())
    good = tmp_path / "fused.safetensors"
    write_heads_file(_fused_heads(setup), good, hidden=96, vocab=cfg["vocab_size"], dtype="float32",
                     feature_layers=[1])

    def rewrite(drop=None, add=None, **meta_updates):
        with SafetensorsFile(good) as f:
            meta = dict(f.metadata)
            items = [TensorToWrite(n, f.dtype(n), tuple(f.shape(n)), lambda a=f.get(n).copy(): a)
                     for n in f.keys() if n != drop]
            if add:
                items.append(TensorToWrite(add, "F32", (96, 96), lambda a=f.get("medusa.fuse.0.weight").copy(): a))
        meta.update(meta_updates)
        out = tmp_path / "bad.safetensors"
        write_safetensors(out, items, metadata=meta)
        return out

    def load(path):
        return medusa_rt.Engine(d, medusa_heads=path, medusa_max_batch=16, tree=[[0], [0, 0]])

    load(good)
    with pytest.raises(ModelFormatError, match=r"medusa\.fuse\.0\.weight"):
        load(rewrite(drop="medusa.fuse.0.weight"))
    with pytest.raises(ModelFormatError, match=r"medusa\.fuse\.1\.weight is not one of the 1 fusion"):
        load(rewrite(add="medusa.fuse.1.weight"))
    for bad in ("[2]", "[0]", "[]", "[1, 1]", "1", "[1.5]"):  # the tiny model has 2 decoder layers
        with pytest.raises(ModelFormatError, match="feature_layers must be a JSON list"):
            load(rewrite(feature_layers=bad))
    with pytest.raises(ModelFormatError, match="feature_layers"):
        load(rewrite(feature_layers="not json"))
    with pytest.raises(ModelFormatError, match="root_input 'true'"):
        load(rewrite(root_input="false"))


def _draft_heads(setup, width=64, scale=0.3, seed=7):
    """Path-input heads plus a random draft layer (published names, float32 arrays)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v.float().numpy() for k, v in _path_heads(setup).items()}
    H = 96
    for name, shape in (("root", (H, H)), ("qkv", (3 * H, H)), ("o", (H, H)), ("gate_up", (2 * width, H)),
                        ("down", (H, width))):
        state[f"draft.{name}.weight"] = (torch.randn(*shape, generator=g) * scale).numpy()
    for name in ("norm1", "norm2"):
        state[f"draft.{name}.weight"] = (1 + 0.2 * torch.randn(H, generator=g)).numpy()
    return state


def test_heads_with_a_draft_layer(setup, tmp_path):
    """Heads with a draft layer (format_version 4): the engine's candidates at every step are an
    independent NumPy evaluation of the draft layer over the committed positions since the
    prompt's last token (hidden states from the engine, roots = the tokens that follow) and then
    the heads on its last row; lossless; the fused and the host step agree, alone and batched,
    with prompt lookup too; a session's second prompt restarts the draft cache."""
    import json

    from medusa_rt.export.medusa_heads import write_heads_file
    from medusa_rt.export.safetensors_io import SafetensorsFile
    from medusa_rt.train.heads_np import load_embedding, load_lm_head

    d = setup["base"]
    cfg = json.loads((d / "config.json").read_text())
    heads_file = tmp_path / "draft.safetensors"
    write_heads_file(_draft_heads(setup), heads_file, hidden=96, vocab=cfg["vocab_size"], dtype="float32")
    with SafetensorsFile(heads_file) as f:
        assert f.metadata["format_version"] == "4" and f.metadata["draft_layer"] == "true"
    tree, nodes, engine, heads = _five_node_tree_engine(d, heads_file, cfg)
    assert heads.draft is not None and heads.paths is not None
    lm, emb = load_lm_head(d), load_embedding(d)
    checked = differs = 0
    for p in _unseen(3):
        tokens, steps = _record_steps(engine, p, 30)
        assert tokens == engine.generate(p, max_new_tokens=30, ignore_eos=True, medusa=False).tokens
        seq = p + tokens
        with engine.session() as s:
            hidden = s.hidden_states(seq)
        P = len(p)
        for pos, tree_tokens in steps:  # pos: the root's index in seq; rows P-1 .. pos-1 are committed
            z = heads.draft.states(hidden[P - 1:pos], emb[seq[P:pos + 1]])[-1:]
            for depth, children, path in _drafted_parents(nodes, tree_tokens, emb):
                want = heads.top_k(z, lm, 2, emb[[seq[pos]]], path)[depth, 0]
                for c, token in children:
                    assert token == int(want[c[-1]]), (pos, c)
                    checked += 1
                # The heads on the hidden state itself (no draft layer) would draft otherwise.
                on_h = heads.top_k(hidden[pos - 1:pos], lm, 2, emb[[seq[pos]]], path)[depth, 0]
                differs += on_h.tolist() != want.tolist()
    assert checked > 50 and differs > 10  # the check above has teeth
    # Fused and host steps, batched, with and without prompt lookup, give the same tokens and
    # acceptance; every result equals plain decoding.
    import os

    prompts = _unseen(3)
    runs = {}
    for fused in ("1", "0"):
        for lookup in (0, 3):
            os.environ["MEDUSA_RT_FUSED_STEP"] = fused
            try:
                e = medusa_rt.Engine(d, dtype="fp32", max_seq_len=256, max_batch_size=3, tree=tree,
                                     medusa_heads=heads_file, medusa_max_batch=16, prompt_lookup=lookup)
                runs[fused, lookup] = [(r.tokens, r.stats.accepted_per_head) for r in
                                       e.generate_batch(prompts, max_new_tokens=30, ignore_eos=True)]
            finally:
                del os.environ["MEDUSA_RT_FUSED_STEP"]
    assert runs["1", 0] == runs["0", 0]
    plain_tokens = [engine.generate(p, max_new_tokens=30, ignore_eos=True, medusa=False).tokens for p in prompts]
    for key, res in runs.items():
        assert [t for t, _ in res] == plain_tokens, key
    assert [r[1] for r in runs["1", 0]] == [engine.generate(p, max_new_tokens=30, ignore_eos=True)
                                            .stats.accepted_per_head for p in prompts]
    # A second prompt in one session: the draft cache starts again at its last token, so the
    # acceptance equals a fresh session's.
    with engine.session() as s:
        s.generate(prompts[0], max_new_tokens=20, ignore_eos=True)
        again = s.generate(prompts[1], max_new_tokens=30, ignore_eos=True)
    fresh = engine.generate(prompts[1], max_new_tokens=30, ignore_eos=True)
    assert again.stats.accepted_per_head == fresh.stats.accepted_per_head


def test_draft_layer_file_errors(setup, tmp_path):
    """A format-4 heads file with a draft tensor missing, a mis-shaped one, or draft tensors in an
    older format: typed errors naming the problem."""
    import json

    from medusa_rt.export.medusa_heads import write_heads_file
    from medusa_rt.export.safetensors_io import SafetensorsFile, TensorToWrite, write_safetensors

    d = setup["base"]
    vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    good = tmp_path / "good.safetensors"
    write_heads_file(_draft_heads(setup), good, hidden=96, vocab=vocab, dtype="float32")

    def rewrite(drop=None, meta_update=None, reshape=None):
        with SafetensorsFile(good) as f:
            meta = dict(f.metadata)
            items = []
            for n in f.keys():
                if n == drop:
                    continue
                a = f.get(n).copy()
                if n == reshape:
                    a = a[:-1]
                items.append(TensorToWrite(n, f.dtype(n), tuple(a.shape), lambda a=a: a))
        meta.update(meta_update or {})
        out = tmp_path / "bad.safetensors"
        write_safetensors(out, items, metadata=meta)
        return out

    with pytest.raises(ModelFormatError, match=r"medusa\.draft\.o\.weight"):
        medusa_rt.Engine(d, medusa_heads=rewrite(drop="medusa.draft.o.weight"), medusa_max_batch=16)
    with pytest.raises(ModelFormatError, match=r"medusa\.draft\.qkv\.weight"):
        medusa_rt.Engine(d, medusa_heads=rewrite(reshape="medusa.draft.qkv.weight"), medusa_max_batch=16)
    with pytest.raises(ModelFormatError, match="need format_version 4"):
        medusa_rt.Engine(d, medusa_heads=rewrite(meta_update={"format_version": "3"}), medusa_max_batch=16)
    with pytest.raises(ModelFormatError, match="draft_layer 'true'"):
        medusa_rt.Engine(d, medusa_heads=rewrite(meta_update={"draft_layer": "false"}), medusa_max_batch=16)
    with pytest.raises(ModelFormatError, match="draft layer needs"):
        write_heads_file({k: v for k, v in _draft_heads(setup).items() if k != "draft.down.weight"},
                         tmp_path / "x.safetensors", hidden=96, vocab=vocab, dtype="float32")


def test_heads_dtype(own_dir, setup):
    """An fp32 model's heads run in bf16 on the CPU unless asked otherwise (half the bytes their
    pass reads); they only draft, so the output is plain decoding's either way."""
    fp32 = medusa_rt.Engine(own_dir, dtype="fp32", max_seq_len=256, medusa_max_batch=16, medusa_heads_dtype="fp32")
    auto = medusa_rt.Engine(own_dir, dtype="fp32", max_seq_len=256, medusa_max_batch=16)
    assert (fp32.info.medusa_heads_dtype, auto.info.medusa_heads_dtype) == ("fp32", "bf16")
    assert medusa_rt.Engine(own_dir, dtype="bf16", max_seq_len=256).info.medusa_heads_dtype == "bf16"
    assert auto.info.weight_bytes < fp32.info.weight_bytes
    accepted = 0
    for p in setup["prompts"][:2] + _unseen(2):
        plain = fp32.generate(p, max_new_tokens=40, ignore_eos=True, medusa=False).tokens
        for e in (fp32, auto):
            r = e.generate(p, max_new_tokens=40, ignore_eos=True)
            assert r.tokens == plain
            accepted += sum(r.stats.accepted_per_head)
    assert accepted > 0
    with pytest.raises(InvalidArgumentError, match="medusa_heads_dtype"):
        medusa_rt.Engine(own_dir, dtype="fp32", medusa_heads_dtype="int4")


def _lossless_and_close(engine, reference, prompts, tol):
    """engine's Medusa trees, prompt lookup and batches give exactly its plain decoding's tokens
    (drafts accepted along the way), and its logits are within tol (relative) of reference's."""
    import numpy as np

    accepted = 0
    for p in prompts:
        plain = engine.generate(p, max_new_tokens=40, ignore_eos=True, medusa=False)
        med = engine.generate(p, max_new_tokens=40, ignore_eos=True)
        assert med.tokens == plain.tokens and med.stats.medusa
        accepted += sum(med.stats.accepted_per_head)
        with engine.session() as a, reference.session() as b:
            la, lb = a.forward(p)[-1], b.forward(p)[-1]
            np.testing.assert_allclose(la, lb, rtol=tol, atol=tol * float(np.abs(lb).max()))
    assert accepted > 0
    got = engine.generate_batch(prompts, max_new_tokens=40, ignore_eos=True)
    assert [r.tokens for r in got] == [engine.generate(p, max_new_tokens=40, ignore_eos=True, medusa=False).tokens
                                       for p in prompts]


def test_bf16_kv_cache(own_dir, setup):
    """kv_dtype="bf16" keeps keys and values in bf16 (half the cache): Medusa trees, prompt lookup
    and batches still give exactly plain decoding's tokens over that cache, and the logits stay
    close to the fp32 cache's."""
    kw = dict(dtype="fp32", max_seq_len=256, max_batch_size=2, medusa_max_batch=16, prompt_lookup=3)
    e16 = medusa_rt.Engine(own_dir, kv_dtype="bf16", **kw)
    e32 = medusa_rt.Engine(own_dir, **kw)
    assert (e16.info.kv_dtype, e32.info.kv_dtype) == ("bf16", "fp32")
    assert 2 * e16.info.kv_cache_bytes == e32.info.kv_cache_bytes
    _lossless_and_close(e16, e32, setup["prompts"][:2] + _unseen(2), tol=0.02)
    for bad in ("fp16", "int8"):
        with pytest.raises(InvalidArgumentError, match="kv_dtype"):
            medusa_rt.Engine(own_dir, kv_dtype=bad)


def test_int8_weights(own_dir, setup):
    """dtype="int8" (weight-only, quantized at load; CPU only): Medusa trees, prompt lookup and
    batches give exactly int8 plain decoding's tokens; logits close to fp32's; about half bf16's
    weight bytes; the heads stay bf16 unless asked."""
    kw = dict(max_seq_len=256, max_batch_size=2, medusa_max_batch=16, prompt_lookup=3)
    q = medusa_rt.Engine(own_dir, dtype="int8", **kw)
    ref = medusa_rt.Engine(own_dir, dtype="fp32", **kw)
    assert (q.info.dtype, q.info.medusa_heads_dtype, q.info.matmul_inputs) == ("int8", "bf16", "fp32")
    base_bytes = {d: medusa_rt.Engine(own_dir, dtype=d, medusa_heads_dtype="bf16", max_seq_len=64).info.weight_bytes
                  for d in ("int8", "bf16")}
    assert base_bytes["int8"] < 0.8 * base_bytes["bf16"]
    _lossless_and_close(q, ref, setup["prompts"][:2] + _unseen(2), tol=0.05)
    assert medusa_rt.Engine(own_dir, dtype="int8", medusa_heads_dtype="int8", max_seq_len=64).info.medusa_heads_dtype == "int8"
    for bad in (dict(kv_dtype="int8"), dict(dtype="int8", matmul_inputs="bf16"), dict(dtype="int4")):
        with pytest.raises(InvalidArgumentError):
            medusa_rt.Engine(own_dir, **bad)


def test_bf16_matmul_inputs(own_dir, setup):
    """matmul_inputs="bf16" (bf16 weights on a CPU with AVX512-BF16): Medusa trees, prompt lookup
    and batches still give exactly plain decoding's tokens; logits close to the exact inputs'."""
    kw = dict(dtype="bf16", max_seq_len=256, max_batch_size=2, medusa_max_batch=16, prompt_lookup=3)
    with pytest.raises(InvalidArgumentError, match="matmul_inputs"):
        medusa_rt.Engine(own_dir, dtype="fp32", matmul_inputs="bf16")
    with pytest.raises(InvalidArgumentError, match="matmul_inputs"):
        medusa_rt.Engine(own_dir, dtype="bf16", matmul_inputs="fp16")
    try:
        fast = medusa_rt.Engine(own_dir, matmul_inputs="bf16", **kw)
    except InvalidArgumentError as e:
        assert "AVX512-BF16" in str(e)
        pytest.skip(str(e))
    exact = medusa_rt.Engine(own_dir, matmul_inputs="fp32", **kw)
    assert (fast.info.matmul_inputs, exact.info.matmul_inputs) == ("bf16", "fp32")
    assert medusa_rt.Engine(own_dir, **kw).info.matmul_inputs == "bf16"  # "auto" takes it where the CPU has it
    assert medusa_rt.Engine(own_dir, dtype="fp32").info.matmul_inputs == "fp32"
    _lossless_and_close(fast, exact, setup["prompts"][:2] + _unseen(2), tol=0.05)


def test_sampling_same_seed_same_tokens_with_or_without_medusa(engine, own_dir, setup):
    """do_sample: each position's draw is fixed by (seed, position) and a draft token is accepted
    when it equals the token drawn at its position, so Medusa trees, prompt lookup and batching
    give exactly the tokens plain sampled decoding gives with the same seed."""
    lookup = medusa_rt.Engine(own_dir, dtype="fp32", max_seq_len=256, max_batch_size=3, medusa_max_batch=16,
                              prompt_lookup=4)
    prompts = setup["prompts"][:2] + _unseen(2)
    kw = dict(max_new_tokens=64, ignore_eos=True, do_sample=True, temperature=0.7, top_k=50, top_p=0.9)
    accepted = 0
    with engine.session() as s:
        for i, p in enumerate(prompts):
            plain = s.generate(p, medusa=False, seed=100 + i, **kw)
            assert plain.stats.tokens_per_step == 1.0
            med = s.generate(p, seed=100 + i, **kw)
            assert med.tokens == plain.tokens and med.stats.medusa
            accepted += sum(med.stats.accepted_per_head)
            assert lookup.generate(p, seed=100 + i, **kw).tokens == plain.tokens
            greedy = s.generate(p, max_new_tokens=64, ignore_eos=True)
            assert plain.tokens != greedy.tokens  # it did sample
    assert accepted > 0  # the heads' drafts matched the draws at times
    # A batch gives request i the seed seed + i; fused and host steps mixed in one batch.
    got = lookup.generate_batch(prompts, seed=100, **kw)
    with engine.session() as s:
        assert [r.tokens for r in got] == [s.generate(p, medusa=False, seed=100 + i, **kw).tokens
                                           for i, p in enumerate(prompts)]
    # Another seed, other tokens; seed -1 (the default) draws a fresh seed per request.
    p = prompts[0]
    assert engine.generate(p, seed=7, **kw).tokens != engine.generate(p, seed=8, **kw).tokens
    assert engine.generate(p, **kw).tokens != engine.generate(p, **kw).tokens
    with engine.session() as s:
        for bad, match in ((dict(top_k=-1), "top_k"), (dict(top_k=VOCAB + 1), "top_k"), (dict(top_p=0.0), "top_p"),
                           (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"), (dict(seed=-2), "seed"),
                           (dict(seed=2**63), "seed"), (dict(do_sample=True, temperature=0.0), "temperature > 0"),
                           (dict(do_sample=True, acceptance="typical"), "greedy acceptance")):
            with pytest.raises(InvalidArgumentError, match=match):
                s.generate(p, max_new_tokens=2, **bad)


@pytest.mark.parametrize("k,top_p", [(12, 0.8), (0, 0.5)], ids=["top_k+top_p", "top_p"])
def test_sampling_follows_the_truncated_softmax(engine, setup, k, top_p):
    """The first sampled token over many seeds against softmax(logits / T) cut to top_k then
    top_p: nothing outside the kept set, frequencies within sampling error. (top_p alone selects
    among the weight classes that hold the nucleus rather than the whole vocabulary.)"""
    import numpy as np

    p = setup["prompts"][0]
    with engine.session() as s:
        logits = s.forward(p)[0].astype(np.float64)
    T, n = 0.5, 3000
    order = np.lexsort((np.arange(logits.size), -logits))[:k or logits.size]  # by logit, ties to the lower id
    q = np.exp((logits[order] - logits[order[0]]) / T)
    q /= q.sum()
    keep = int(np.searchsorted(np.cumsum(q), top_p)) + 1
    assert 2 <= keep < len(order)  # the test exercises the cuts
    expected = np.zeros(logits.size)
    expected[order[:keep]] = q[:keep] / q[:keep].sum()
    rs = engine.generate_batch([p] * n, max_new_tokens=1, ignore_eos=True, medusa=False, do_sample=True,
                               temperature=T, top_k=k, top_p=top_p, seed=0)
    counts = np.bincount([r.tokens[0] for r in rs], minlength=logits.size) / n
    assert set(np.flatnonzero(counts)) <= set(order[:keep].tolist())
    assert np.abs(counts - expected).max() < 4 * np.sqrt(0.25 / n)
    # A temperature so small that 1 / T overflows a float still puts all the mass on the argmax.
    greedy = engine.generate(p, max_new_tokens=8, ignore_eos=True, medusa=False)
    tiny = engine.generate(p, max_new_tokens=8, ignore_eos=True, medusa=False, do_sample=True, temperature=1e-40,
                           top_p=top_p, seed=3)
    assert tiny.tokens == greedy.tokens
