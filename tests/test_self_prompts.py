"""Training prompts the base model writes itself (medusa_rt.train.self_prompts)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from medusa_rt.errors import InvalidArgumentError
from medusa_rt.train import self_prompts as sp


def test_check_prompt_and_normalize():
    assert sp.check_prompt("How do I keep my houseplants alive in winter?") is None
    assert sp.check_prompt("hi there") == "length"
    assert sp.check_prompt("x" * 700) == "length"
    assert sp.check_prompt("Tell me more <|im_start|> about the sea") == "special"
    assert sp.check_prompt("1234 5678 9012 3456 7890 ++--") == "not text"
    assert sp.check_prompt("Supercalifragilistic expialidocious") == "too few words"
    assert sp.check_prompt("What is\x07 the best way to learn?") == "unprintable"
    assert sp.normalize("What's the CAPITAL of France?!") == sp.normalize("whats the capital of france")


class _WordTokenizer:
    """Words separated by spaces; id 0 is the end of turn."""

    def __init__(self, words):
        self.vocab = ["</t>", "SYS", "user:"] + sorted(set(words))
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def apply_chat_template(self, text):
        return f"SYS user: {text} </t>"

    def encode(self, text, add_special_tokens=False):
        return [self.ids[w] for w in text.split()]

    def decode(self, ids):
        return " ".join(self.vocab[i] for i in ids)

    def token_to_id(self, token):
        return self.ids.get(token)


class _ScriptedEngine:
    """generate_batch answers request j with the script of candidate i (its seed is
    candidate_seed(0, i) + ... for run seed 0): its tokens up to the end of turn, cut at the budget."""

    def __init__(self, scripts, tokenizer, max_seq_len=64, max_batch_size=1):
        self.tokenizer = tokenizer
        self.info = SimpleNamespace(eos_token_ids=[0], max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        self.scripts = [tokenizer.encode(s) for s in scripts]
        self.sampled = []  # candidate indices, in the order asked for

    def generate_batch(self, prompts, *, max_new_tokens, stop, do_sample, seed, medusa, **kw):
        assert do_sample and not medusa and len(prompts) <= 4 * self.info.max_batch_size
        assert all(p == self.tokenizer.encode("SYS user:") for p in prompts)
        assert stop == [] and set(kw) == {"temperature", "top_k", "top_p"}  # no <|im_end|> here: EOS id 0 ends
        out = []
        for j in range(len(prompts)):
            i = seed + j - sp.candidate_seed(0, 0)
            self.sampled.append(i)
            toks = self.scripts[i]
            ended = len(toks) <= max_new_tokens
            out.append(SimpleNamespace(tokens=toks[:max_new_tokens], finish_reason="stop" if ended else "length"))
        return out


SCRIPTS = [
    "tell me about the sea please",
    "Tell me about the sea please",  # the same after normalize
    "what is the capital of france",  # an excluded prompt
    "hi there",  # too short
    " ".join(["more"] * 80),  # never ends its turn within the budget
    "name three rivers in europe for me",
]


def test_generate_self_prompts_keeps_resumes_and_excludes(tmp_path):
    tok = _WordTokenizer(" ".join(SCRIPTS).split())
    exclude = ["What is the capital of France?"]
    eng = _ScriptedEngine(SCRIPTS, tok)
    kept = sp.generate_self_prompts(eng, 6, tmp_path / "a", exclude=exclude, max_tokens=40, progress=False)
    assert kept == [("self", SCRIPTS[0]), ("self", SCRIPTS[5])]
    recs = sp.read_candidates(tmp_path / "a" / sp.SELF_PROMPTS)
    assert [r["rejected"] for r in recs] == [None, "duplicate", "duplicate", "length", "no end of turn", None]
    assert [r["index"] for r in recs] == list(range(6)) and recs[4]["tokens"] == 40
    assert [r["ended"] for r in recs] == [True, True, True, True, False, True]
    assert eng.sampled == list(range(6))  # in batches of 4 and 2
    # Interrupted after 1 candidate, then resumed: the same records (the duplicate of the stored
    # candidate is recognised), candidates not sampled twice.
    part = _ScriptedEngine(SCRIPTS, tok)
    sp.generate_self_prompts(part, 1, tmp_path / "b", exclude=exclude, max_tokens=40, progress=False)
    rest = _ScriptedEngine(SCRIPTS, tok)
    assert sp.generate_self_prompts(rest, 6, tmp_path / "b", exclude=exclude, max_tokens=40, progress=False) == kept
    assert part.sampled == [0] and rest.sampled == [1, 2, 3, 4, 5]
    assert sp.read_candidates(tmp_path / "b" / sp.SELF_PROMPTS) == recs
    # A torn last line (a write cut short) is dropped and nothing is sampled again.
    with open(tmp_path / "b" / sp.SELF_PROMPTS, "a") as f:
        f.write('{"index": 6, "tex')
    idle = _ScriptedEngine([], tok)
    assert sp.generate_self_prompts(idle, 6, tmp_path / "b", exclude=exclude, max_tokens=40, progress=False) == kept
    assert idle.sampled == [] and sp.read_candidates(tmp_path / "b" / sp.SELF_PROMPTS) == recs
    # Fewer candidates than the file holds: the first ones only. Stored candidates are decided
    # again with the current exclusions (what a fresh run would keep).
    assert sp.generate_self_prompts(idle, 1, tmp_path / "b", max_tokens=40, progress=False) == kept[:1]
    assert sp.generate_self_prompts(idle, 6, tmp_path / "b", max_tokens=40, progress=False) == [
        ("self", SCRIPTS[0]), ("self", SCRIPTS[2]), ("self", SCRIPTS[5])]
    assert sp.generate_self_prompts(idle, 6, tmp_path / "b", exclude=[SCRIPTS[5]], max_tokens=40,
                                    progress=False) == [("self", SCRIPTS[0]), ("self", SCRIPTS[2])]
    # More candidates with other sampling settings are refused, not mixed; the stored ones are
    # read whatever the settings (nothing to sample).
    with pytest.raises(InvalidArgumentError, match="other settings"):
        sp.generate_self_prompts(idle, 7, tmp_path / "b", seed=1, max_tokens=40, progress=False)
    assert sp.generate_self_prompts(idle, 6, tmp_path / "b", seed=1, max_tokens=40, progress=False) == kept[:1] + [
        ("self", SCRIPTS[2]), ("self", SCRIPTS[5])]
    # A file drawn before the engine sampled (settings without a sampler: NumPy's draws) is
    # read, not extended.
    settings = tmp_path / "b" / sp.SELF_PROMPTS_SETTINGS
    legacy = {k: v for k, v in json.loads(settings.read_text()).items() if k != "sampler"}
    settings.write_text(json.dumps(legacy))
    assert sp.generate_self_prompts(idle, 6, tmp_path / "b", max_tokens=40, progress=False) == [
        ("self", SCRIPTS[0]), ("self", SCRIPTS[2]), ("self", SCRIPTS[5])]
    with pytest.raises(InvalidArgumentError, match="'sampler': 'numpy'"):
        sp.generate_self_prompts(idle, 7, tmp_path / "b", max_tokens=40, progress=False)
    settings.unlink()
    with pytest.raises(InvalidArgumentError, match="other settings"):
        sp.generate_self_prompts(idle, 7, tmp_path / "b", max_tokens=40, progress=False)
    # A line that is valid JSON but not a candidate ends the readable part like a torn line.
    with open(tmp_path / "b" / sp.SELF_PROMPTS, "a") as f:
        f.write('[1, 2]\n{"index": 7}\n')
    assert sp.read_candidates(tmp_path / "b" / sp.SELF_PROMPTS) == recs
    for bad in ({"count": -1}, {"temperature": 0.0}, {"top_k": 0}, {"top_p": 1.5}, {"max_tokens": 4}, {"seed": -1}):
        args = {"count": 2, **bad}
        with pytest.raises(InvalidArgumentError):
            sp.generate_self_prompts(eng, out_dir=tmp_path / "c", progress=False, **args)


def test_user_turn_prefix_needs_a_chat_template():
    tok = _WordTokenizer([])
    assert tok.decode(sp.user_turn_prefix(tok)) == "SYS user:"

    class NoTemplate(_WordTokenizer):
        def apply_chat_template(self, text):
            raise ValueError("this tokenizer has no chat template")

    with pytest.raises(InvalidArgumentError, match="chat template"):
        sp.user_turn_prefix(NoTemplate([]))


def test_self_prompts_from_a_real_engine_are_seeded(tmp_path):
    pytest.importorskip("torch")
    from _tiny_models import build_hf_model, save_and_export

    from medusa_rt import Engine

    eng = Engine(save_and_export(build_hf_model("llama-mha-tied", seed=3), tmp_path, "base"), dtype="fp32")
    texts = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        sp.generate_self_prompts(eng, 4, tmp_path / name, seed=seed, max_tokens=24, progress=False)
        texts[name] = [(r["text"], r["tokens"]) for r in sp.read_candidates(tmp_path / name / sp.SELF_PROMPTS)]
    assert texts["a"] == texts["b"] != texts["c"]
    assert len(texts["a"]) == 4 and all(0 < n <= 24 for _, n in texts["a"])
    from medusa_rt.train.pipeline import train_heads

    with pytest.raises(InvalidArgumentError, match="self_prompts"):  # refused before any engine or answer
        train_heads("no-such-model", tmp_path / "work", tmp_path / "heads.safetensors", num_prompts=4,
                    self_prompts=-1, progress=False)


def test_train_heads_answers_the_self_written_prompts(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from _tiny_models import build_hf_model, save_and_export

    from medusa_rt.train import data
    from medusa_rt.train.pipeline import train_heads
    from medusa_rt.train.trainer import TrainConfig

    base = save_and_export(build_hf_model("llama-mha-tied", seed=3), tmp_path, "base")
    # A random model writes no English: keep whatever ends its turn, so that some are kept.
    monkeypatch.setattr(sp, "check_prompt", lambda text, *a, **k: None if text else "length")
    report = train_heads(base, tmp_path / "work", tmp_path / "heads.safetensors", num_prompts=4, self_prompts=24,
                         max_new_tokens=16, dtype="fp32", batch=4, tree_nodes=4,
                         config=TrainConfig(epochs=1, batch_size=32), progress=False)
    kept = [r["text"] for r in sp.read_candidates(tmp_path / "work" / sp.SELF_PROMPTS) if r["rejected"] is None]
    assert len(sp.read_candidates(tmp_path / "work" / sp.SELF_PROMPTS)) == 24 and kept
    assert report["self_prompts"] == {"candidates": 24, "count": len(kept), "sampler": "engine", "seed": 0,
                                      **sp.SAMPLING}
    answered = {r["prompt"]: r["category"] for r in data.read_answers(tmp_path / "work" / data.ANSWERS)}
    assert all(answered[p] == "self" for p in kept) and len(answered) == 4 + len(kept)


def test_the_shipped_heads_candidates_are_reused_not_sampled(tmp_path):
    """scripts/train_default_heads.sh copies the candidates the shipped heads were trained on into
    the work directory: they are read (drawn in NumPy before the engine sampled), never extended."""
    import gzip
    import shutil
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "scripts" / "data" / "smollm2-135m"
    with gzip.open(src / "self_prompts.jsonl.gz", "rb") as f, open(tmp_path / sp.SELF_PROMPTS, "wb") as g:
        shutil.copyfileobj(f, g)
    shutil.copy(src / sp.SELF_PROMPTS_SETTINGS, tmp_path / sp.SELF_PROMPTS_SETTINGS)
    recs = sp.read_candidates(tmp_path / sp.SELF_PROMPTS)
    assert sp.stored_settings(tmp_path) == {"sampler": "numpy", "seed": 0, **sp.SAMPLING}
    idle = _ScriptedEngine([], _WordTokenizer([]))
    kept = sp.generate_self_prompts(idle, len(recs), tmp_path, progress=False)
    assert idle.sampled == [] and len(kept) == sum(r["rejected"] is None for r in recs) > 0.8 * len(recs)
    with pytest.raises(InvalidArgumentError, match="other settings"):
        sp.generate_self_prompts(idle, len(recs) + 1, tmp_path, progress=False)
