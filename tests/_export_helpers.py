"""Builders for the export / tokenizer / registry tests: tiny HF checkpoints (transformers + torch),
tiny byte-level BPE tokenizers, and synthetic llama GGUF files (gguf.GGUFWriter).

Everything here is written for the tests, independently of the code under test: the GGUF q/k
permutation and the block dequantizers below are spelled out from the format definitions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Medusa adds extra decoding heads to a language model to predict several tokens at once.",
    "def add(a, b):\n    return a + b  # 42\n",
    "Numbers 0123456789 and unicode: caf\u00e9, na\u00efve, \u65e5\u672c\u8a9e, emoji \U0001F600.",
]
SAMPLE_TEXTS = [
    "", " ", "   ", "\n\n", "\t x", "Hello world", " Hello World!", "The quick brown fox.",
    "def add(a, b):\n    return a + b\n", "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001F600\U0001F999",
    "<|im_start|>user\nhi<|im_end|>\n", "numbers 12 345 6789", "a  9 b\n\n7", "it's they'll we've",
]


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------


def train_byte_level_bpe(vocab_size: int = 300) -> Any:
    """A small byte-level BPE (tokenizers.Tokenizer) with SPECIALS at ids 0..2."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(TRAIN_TEXT * 20, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=SPECIALS, show_progress=False)
    return tok


def write_hf_tokenizer(hf_dir: Path, vocab_size: int, *, tokenizer_config: dict | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (ChatML template, eos <|im_end|>) into ``hf_dir``."""
    tok = train_byte_level_bpe(vocab_size)
    assert tok.get_vocab_size() <= vocab_size
    hf_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(hf_dir / "tokenizer.json"))
    cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
           "chat_template": CHAT_TEMPLATE}
    cfg.update(tokenizer_config or {})
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(cfg))


def bpe_vocab_and_merges(tok: Any) -> tuple[list[str], list[str]]:
    """(tokens in id order, merges as "a b" strings) of a trained tokenizers BPE."""
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, merges


# ---------------------------------------------------------------------------------------------
# HF checkpoints
# ---------------------------------------------------------------------------------------------

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5)


def make_hf_model(hf_dir: Path, arch: str = "llama", *, seed: int = 0, dtype: str = "float32",
                  tokenizer: bool = True, save_kwargs: dict | None = None, **overrides: Any) -> Any:
    """Save a seeded random tiny HF model (+ tokenizer) to ``hf_dir``; return the torch model."""
    import torch
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    kwargs = dict(TINY, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(overrides)
    cfg = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # make norms non-trivial so a norm mix-up shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(hf_dir, **(save_kwargs or {}))
    if tokenizer:
        write_hf_tokenizer(hf_dir, cfg.vocab_size)
    return model


def state_dict_f32(model: Any) -> dict[str, np.ndarray]:
    """The model's parameters as float32 numpy arrays."""
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def edit_json(path: Path, **changes: Any) -> None:
    """Update keys of a JSON file (a value of None deletes the key)."""
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------


def gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order, written as an explicit loop: within head h of size d, GGUF row
    2*j + e holds HF row e*d/2 + j (RoPE pairs (j, j + d/2) become adjacent rows)."""
    rows = w.shape[0]
    d = rows // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for j in range(d // 2):
            for e in range(2):
                out[h * d + 2 * j + e] = w[h * d + e * (d // 2) + j]
    return out


def ref_dequantize(raw: np.ndarray, qtype: str, n: int) -> np.ndarray:
    """Dequantize ``n`` values of GGML block data from the block layouts (reference for the tests)."""
    b = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if qtype == "BF16":
        return (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32)[:n]
    out = np.empty(n, dtype=np.float32)
    if qtype == "Q8_0":  # 34 bytes: f16 d, 32 x int8
        for k in range(n // 32):
            blk = b[k * 34:(k + 1) * 34]
            d = float(blk[:2].view(np.float16)[0])
            out[k * 32:(k + 1) * 32] = np.float32(d) * blk[2:].view(np.int8).astype(np.float32)
    elif qtype == "Q4_0":  # 18 bytes: f16 d, 16 bytes: low nibbles = x[0:16], high = x[16:32]; x = d*(q-8)
        for k in range(n // 32):
            blk = b[k * 18:(k + 1) * 18]
            d = np.float32(blk[:2].view(np.float16)[0])
            q = blk[2:]
            vals = np.concatenate([q & 0x0F, q >> 4]).astype(np.int8) - 8
            out[k * 32:(k + 1) * 32] = d * vals.astype(np.float32)
    elif qtype == "Q4_1":  # 20 bytes: f16 d, f16 m, 16 bytes nibbles; x = d*q + m
        for k in range(n // 32):
            blk = b[k * 20:(k + 1) * 20]
            d = np.float32(blk[0:2].view(np.float16)[0])
            m = np.float32(blk[2:4].view(np.float16)[0])
            q = blk[4:]
            vals = np.concatenate([q & 0x0F, q >> 4]).astype(np.float32)
            out[k * 32:(k + 1) * 32] = d * vals + m
    else:
        raise ValueError(qtype)
    return out


def write_gguf(path: Path, *, arch: str = "llama", hidden: int = 64, ffn: int = 96, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, vocab_size: int = 300, tied: bool = True,
               tensor_types: dict[str, str] | None = None, default_type: str = "F32",
               seed: int = 0, skip_tensors: tuple[str, ...] = (), extra_tensors: dict | None = None,
               rope_theta: float = 10000.0, tokenizer: bool = True, metadata: dict | None = None,
               hf_weights: dict[str, np.ndarray] | None = None, pre: str = "gpt-2") -> dict[str, np.ndarray]:
    """Write a tiny llama GGUF (byte-level BPE tokenizer) and return the HF-layout float32 weights
    it encodes (after quantization, i.e. what an exact importer must produce).

    ``tensor_types`` maps GGUF tensor names to F32/F16/BF16/Q8_0/Q4_0/Q4_1/... (others quantized
    with gguf.quants when it can). ``hf_weights`` supplies the HF-layout weights (else random).
    """
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    tensor_types = tensor_types or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(rope_theta)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab_size)
    if tokenizer:
        tok = train_byte_level_bpe(vocab_size)
        tokens, merges = bpe_vocab_and_merges(tok)
        tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]  # pad to vocab_size
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3 if t in SPECIALS else (4 if t.startswith("<extra_") else 1) for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        else:
            w.add_uint32(key, int(value))

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    hf: dict[str, np.ndarray] = {}
    plan: list[tuple[str, str, np.ndarray]] = []  # (gguf name, hf name, hf-layout values)
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim

    def add(gname: str, hname: str, shape: tuple[int, ...]) -> None:
        value = hf_weights[hname] if hf_weights is not None else (
            rand(*shape) if len(shape) == 2 else (rng.random(shape) + 0.5).astype(np.float32))
        plan.append((gname, hname, value))

    add("token_embd.weight", "model.embed_tokens.weight", (vocab_size, hidden))
    for i in range(layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight", (hidden,))
        add(b + "attn_q.weight", p + "self_attn.q_proj.weight", (q_rows, hidden))
        add(b + "attn_k.weight", p + "self_attn.k_proj.weight", (kv_rows, hidden))
        add(b + "attn_v.weight", p + "self_attn.v_proj.weight", (kv_rows, hidden))
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight", (hidden, q_rows))
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", (hidden,))
        add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", (ffn, hidden))
        add(b + "ffn_up.weight", p + "mlp.up_proj.weight", (ffn, hidden))
        add(b + "ffn_down.weight", p + "mlp.down_proj.weight", (hidden, ffn))
    add("output_norm.weight", "model.norm.weight", (hidden,))
    if not tied:
        add("output.weight", "lm_head.weight", (vocab_size, hidden))

    for gname, hname, value in plan:
        if gname in skip_tensors:
            continue
        stored = value
        if gname.endswith("attn_q.weight"):
            stored = gguf_permute(value, heads)
        elif gname.endswith("attn_k.weight"):
            stored = gguf_permute(value, kv_heads)
        qname = tensor_types.get(gname, default_type if value.ndim == 2 else "F32")
        qtype = gguf.GGMLQuantizationType[qname]
        if qname == "F32":
            data, decoded = stored, stored
            w.add_tensor(gname, data)
        elif qname == "F16":
            data = stored.astype(np.float16)
            decoded = data.astype(np.float32)
            w.add_tensor(gname, data)
        else:
            data = quantize(stored, qtype)
            w.add_tensor(gname, data, raw_dtype=qtype)
            decoded = ref_dequantize(data, qname, stored.size).reshape(stored.shape) if qname in (
                "BF16", "Q8_0", "Q4_0", "Q4_1") else stored
        # what the importer must return: the decoded values, back in HF row order
        if gname.endswith("attn_q.weight"):
            decoded = _inverse_loop_permute(decoded, heads)
        elif gname.endswith("attn_k.weight"):
            decoded = _inverse_loop_permute(decoded, kv_heads)
        hf[hname] = np.asarray(decoded, dtype=np.float32)
    for gname, value in (extra_tensors or {}).items():
        w.add_tensor(gname, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _inverse_loop_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    d = rows // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for j in range(d // 2):
            for e in range(2):
                out[h * d + e * (d // 2) + j] = w[h * d + 2 * j + e]
    return out


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (independent of the code under test)."""
    import struct

    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


def load_export_f32(out_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of an export as float32 (via torch's safetensors loader, which handles bf16)."""
    import torch
    from safetensors.torch import load_file

    files = [out_dir / "model.safetensors"]
    index = out_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted({out_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    out: dict[str, np.ndarray] = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            out[k] = v.to(torch.float32).numpy()
    return out
