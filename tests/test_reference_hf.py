"""The engine's forward against HF transformers on tiny random models.

Tolerance: logits agree within atol 2e-4 + rtol 1e-4 of the reference (fp32 arithmetic on
both sides; the only differences are reduction orders). For bf16 the reference is the same HF
model with its weight matrices rounded to bf16 (norms and biases stay fp32, as in the engine),
run in fp32, so the same tolerance applies. Greedy decoding must agree token for token.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import medusa_rt  # noqa: E402

from _tiny_models import CONFIGS, build_hf_model, hf_greedy, hf_logits, round_to_bf16_, save_and_export  # noqa: E402

ATOL, RTOL = 2e-4, 1e-4


def _prompt(vocab: int, n: int, seed: int = 1) -> list:
    return [int(x) for x in np.random.RandomState(seed).randint(0, vocab, n)]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_greedy_match_transformers(tmp_path, name, dtype):
    model = build_hf_model(name)
    if dtype == "bf16":
        round_to_bf16_(model)
    model_dir = save_and_export(model, tmp_path, name)
    engine = medusa_rt.Engine(model_dir, dtype=dtype, max_seq_len=160, prefill_chunk=16)
    vocab = engine.info.vocab_size
    prompt = _prompt(vocab, 40)  # > prefill_chunk: the prefill runs in three chunks

    with engine.session() as s:
        # Prefill logits of every position, then token-by-token decode logits.
        got = s.forward(prompt, all_logits=True)
        extra = _prompt(vocab, 6, seed=2)
        steps = [s.forward([t])[0] for t in extra]
    ref = hf_logits(model, prompt + extra)
    np.testing.assert_allclose(got, ref[: len(prompt)], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(np.stack(steps), ref[len(prompt):], atol=ATOL, rtol=RTOL)

    with engine.session() as s:
        result = s.generate(prompt, max_new_tokens=64, ignore_eos=True)
    assert result.finish_reason == "length"
    assert result.tokens == hf_greedy(model, prompt, 64)


def test_long_context_positions(tmp_path):
    """Positions up to max_seq_len - 1 (RoPE table edge, many prefill chunks)."""
    model = build_hf_model("llama-gqa-untied", seed=3)
    model_dir = save_and_export(model, tmp_path, "long")
    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=200, prefill_chunk=64)
    prompt = _prompt(engine.info.vocab_size, 199, seed=5)
    with engine.session() as s:
        got = s.forward(prompt, all_logits=True)
    np.testing.assert_allclose(got, hf_logits(model, prompt), atol=ATOL, rtol=RTOL)
