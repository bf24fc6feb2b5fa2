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
    # Exact fp32 inputs: the reference multiplies the rounded weights in fp32 (bf16 inputs, the
    # default where the CPU has AVX512-BF16, are checked against this path in test_medusa).
    engine = medusa_rt.Engine(model_dir, dtype=dtype, matmul_inputs="fp32", max_seq_len=160, prefill_chunk=16)
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


def test_layer_taps_match_transformers_hidden_states(tmp_path):
    """Session.hidden_states(tokens, layers): the final normed hidden state and the residual
    stream after each listed decoder layer equal transformers' hidden_states (output_hidden_states:
    entry L is layer L's output, the last entry the normed final state), across prefill chunks; a
    bad layer list is refused before anything is appended."""
    import torch

    model = build_hf_model("llama-gqa-untied", seed=4)
    model_dir = save_and_export(model, tmp_path, "taps")
    engine = medusa_rt.Engine(model_dir, dtype="fp32", max_seq_len=96, prefill_chunk=16, medusa_max_batch=0)
    prompt = _prompt(engine.info.vocab_size, 37)
    with torch.no_grad():
        ref = model(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    with engine.session() as s:
        plain = s.hidden_states(prompt)
        s.reset()
        got = s.hidden_states(prompt, [1])
        assert got.shape == (37, 2, engine.info.hidden_size)
        for bad in ([2], [0], [1, 1], list(range(1, 10))):
            with pytest.raises(medusa_rt.errors.InvalidArgumentError, match="layer tap"):
                s.hidden_states([3], bad)
        assert s.context_length == 37
    np.testing.assert_allclose(got[:, 0], ref[-1][0].numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(got[:, 1], ref[1][0].numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(got[:, 0], plain)
