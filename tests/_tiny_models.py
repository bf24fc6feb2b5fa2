"""Tiny random HF models (built with transformers) exported to the runtime format, for tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

torch = None  # imported lazily: only the reference tests need it


def _torch():
    global torch
    if torch is None:
        import torch as _t

        torch = _t
    return torch


BASE: Dict[str, Any] = dict(
    vocab_size=384,
    hidden_size=96,
    intermediate_size=200,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.08,
)

# name -> (architecture, config overrides)
CONFIGS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "llama-gqa-untied": ("llama", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=500000.0)),
    "llama-linear-rope": (
        "llama",
        dict(rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    "llama-llama3-rope": (
        "llama",
        dict(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "qwen2-bias": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "mistral": ("mistral", dict(tie_word_embeddings=False, rope_theta=10000.0, sliding_window=None)),
}


def build_hf_model(name: str, seed: int = 0):
    """Returns a seeded random HF causal LM (fp32, eval mode) for CONFIGS[name]."""
    t = _torch()
    import transformers

    arch, overrides = CONFIGS[name]
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    kwargs = dict(BASE)
    kwargs.update(overrides)
    if arch == "qwen2":
        kwargs.pop("rope_scaling", None)
    cfg = cfg_cls(**kwargs)
    t.manual_seed(seed)
    model = model_cls(cfg).eval()
    return model


def round_to_bf16_(model) -> None:
    """Rounds the weight matrices (not norms or biases) to bf16, in place, staying fp32:
    the reference for an engine holding bf16 weights and computing in fp32."""
    t = _torch()
    with t.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(p.to(t.bfloat16).to(t.float32))


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

_TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Medusa adds extra decoding heads to a language model to predict several tokens at once.",
    "def add(a, b):\n    return a + b\n",
    "Numbers 0123456789 and unicode: caf\u00e9, na\u00efve, \u65e5\u672c\u8a9e, emoji \U0001F600.",
]


def write_tiny_tokenizer(hf_dir: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with exactly vocab_size tokens: <unk>=0, <s>=1, </s>=2."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(_TRAIN_TEXT * 20, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    assert tok.get_vocab_size() <= vocab_size
    hf_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
    }))


def save_and_export(model, tmp: Path, name: str) -> Path:
    """save_pretrained + a tiny tokenizer + medusa_rt export; returns the runtime model directory."""
    from medusa_rt.export import export_model

    hf_dir = tmp / f"{name}-hf"
    model.save_pretrained(hf_dir)
    write_tiny_tokenizer(hf_dir, model.config.vocab_size)
    return export_model(hf_dir, tmp / f"{name}-rt", progress=False)


def hf_logits(model, ids) -> np.ndarray:
    t = _torch()
    with t.no_grad():
        return model(t.tensor([list(ids)])).logits[0].float().numpy()


def hf_greedy(model, ids, n: int) -> list:
    """n greedy tokens from HF with its KV cache (a plain loop: no EOS handling, no processors)."""
    t = _torch()
    tokens = []
    with t.no_grad():
        out = model(t.tensor([list(ids)]), use_cache=True)
        for _ in range(n):
            nxt = int(out.logits[0, -1].argmax())
            tokens.append(nxt)
            out = model(t.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens
