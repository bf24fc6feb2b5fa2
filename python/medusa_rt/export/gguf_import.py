"""Importer for GGUF files (``general.architecture == "llama"``).

Tensors are dequantized (F32, F16, BF16, Q8_0, Q4_0, Q4_1), renamed to HF names, and the q/k row
permutation of llama.cpp's converter is undone, so the result matches what transformers loads from
the same file. Hyperparameters come from the ``llama.*`` keys; the tokenizer is rebuilt from
``tokenizer.ggml.*`` (see :mod:`.gguf_tokenizer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from .gguf_tokenizer import build_gguf_tokenizer
from .writer import ExportPlan, ModelConfig, TensorSpec, expected_tensors

__all__ = ["SUPPORTED_GGUF_TYPES", "import_gguf", "permute_qk", "unpermute_qk"]

#: GGML tensor types this importer can read.
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Known Llama-3.x RoPE scalings (factor, low_freq_factor, high_freq_factor, original context) that
# llama.cpp stores as a precomputed ``rope_freqs.weight`` tensor instead of metadata.
_LLAMA3_ROPE_CANDIDATES = ((8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 1.0, 4.0, 8192))


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF rows -> GGUF rows) for q/k weights or biases.

    Within each head, HF rows ``[0..d/2)`` and ``[d/2..d)`` (the halves RoPE pairs up) become
    interleaved: GGUF row ``2j + e`` = HF row ``e*d/2 + j``.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk` (GGUF rows -> HF rows)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ModelFormatError(f"cannot un-permute {rows} rows over {n_head} heads")
    return np.ascontiguousarray(
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _read_gguf(path: Path) -> Any:
    """Open a GGUF file; any parse failure becomes ModelFormatError naming the file."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # pragma: no cover - gguf is a dependency
        raise UnsupportedModelError(f"{path}: reading GGUF files needs the 'gguf' package") from exc
    try:
        reader = GGUFReader(str(path), "r")
        _ = [t.data.shape for t in reader.tensors]  # touch every tensor: catches truncation
        return reader
    except Exception as exc:  # noqa: BLE001 - GGUFReader raises ValueError/IndexError/struct.error/...
        raise ModelFormatError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def _metadata(reader: Any, path: Path) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    try:
        for key, field in reader.fields.items():
            meta[key] = field.contents()
    except Exception as exc:  # noqa: BLE001
        raise ModelFormatError(f"{path}: corrupt GGUF metadata ({type(exc).__name__}: {exc})") from exc
    return meta


def _llama3_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float,
                         original: int) -> np.ndarray:
    """Per-frequency divisors llama.cpp stores in ``rope_freqs.weight`` for Llama-3 RoPE scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wavelen, high_wavelen = original / low, original / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float64)


def _rope(meta: dict[str, Any], head_dim: int, rope_freqs: np.ndarray | None, where: str) -> dict[str, Any]:
    theta = float(meta.get("llama.rope.freq_base", 10000.0))
    out: dict[str, Any] = {"theta": theta, "type": "default"}
    kind = meta.get("llama.rope.scaling.type")
    factor = meta.get("llama.rope.scaling.factor")
    if kind is None and meta.get("llama.rope.scale_linear") is not None:
        kind, factor = "linear", meta["llama.rope.scale_linear"]
    if kind in ("linear",) and factor is not None and float(factor) != 1.0:
        out.update(type="linear", factor=float(factor))
    elif kind not in (None, "none", "linear"):
        raise UnsupportedModelError(f"{where}: unsupported rope scaling type {kind!r} "
                                    "(llama.rope.scaling.type); supported: none, linear")
    if rope_freqs is not None:
        if out["type"] != "default":
            raise UnsupportedModelError(f"{where}: rope_freqs tensor combined with {kind} scaling")
        got = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
        for fac, low, high, orig in _LLAMA3_ROPE_CANDIDATES:
            want = _llama3_rope_factors(head_dim, theta, fac, low, high, orig)
            if got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=0):
                out.update(type="llama3", factor=fac, low_freq_factor=low, high_freq_factor=high,
                           original_max_position_embeddings=orig)
                break
        else:
            if not np.all(got == 1.0):
                raise UnsupportedModelError(f"{where}: rope_freqs.weight holds RoPE frequency factors that "
                                            "match no known Llama-3 scaling")
    return out


def import_gguf(src: str | Path, *, dtype: str = "auto", name: str | None = None) -> ExportPlan:
    """Read a GGUF file and plan its export.

    Raises ModelNotFoundError (no such file), ModelFormatError (corrupt/truncated file, missing
    metadata or tensor, shape mismatch), UnsupportedModelError (architecture other than llama,
    quantization type other than F32/F16/BF16/Q8_0/Q4_0/Q4_1, unsupported features).
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    path = Path(src)
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {path} does not exist")
    reader = _read_gguf(path)
    meta = _metadata(reader, path)
    where = str(path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"{where}: unsupported GGUF architecture {arch!r} (only 'llama')")
    if int(meta.get("llama.expert_count") or 0) > 0:
        raise UnsupportedModelError(f"{where}: mixture-of-experts llama models are not supported")

    def need(key: str) -> int:
        value = meta.get(key)
        if value is None:
            raise ModelFormatError(f"{where}: missing GGUF metadata key {key}")
        return int(value)

    hidden = need("llama.embedding_length")
    heads = need("llama.attention.head_count")
    kv_heads = int(meta.get("llama.attention.head_count_kv") or heads)
    if hidden % heads and meta.get("llama.attention.key_length") is None:
        raise ModelFormatError(f"{where}: embedding_length {hidden} not divisible by head_count {heads}")
    head_dim = int(meta.get("llama.attention.key_length") or hidden // heads)
    value_dim = int(meta.get("llama.attention.value_length") or head_dim)
    if value_dim != head_dim:
        raise UnsupportedModelError(f"{where}: key_length {head_dim} != value_length {value_dim}")
    rot = int(meta.get("llama.rope.dimension_count") or head_dim)
    if rot != head_dim:
        raise UnsupportedModelError(f"{where}: partial rotary embeddings (rope.dimension_count {rot} "
                                    f"< head_dim {head_dim}) are not supported")

    tensors = {t.name: t for t in reader.tensors}
    tokenizer = build_gguf_tokenizer(meta, where)
    n_tokens = len(meta.get("tokenizer.ggml.tokens") or [])
    vocab = int(meta.get("llama.vocab_size") or n_tokens)
    if "token_embd.weight" in tensors:
        vocab_rows = int(tensors["token_embd.weight"].shape[-1])
        if meta.get("llama.vocab_size") is None:
            vocab = vocab_rows

    rope_freqs = None
    if "rope_freqs.weight" in tensors:
        rf = tensors["rope_freqs.weight"]
        rope_freqs = _dequantize(rf, dequantize, GGMLQuantizationType, where)

    def opt_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        return int(value) if value is not None else None

    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        tid = opt_id(key)
        if tid is not None and tid not in eos_ids:
            eos_ids.append(tid)
    has_bias = "blk.0.attn_q.bias" in tensors
    cfg = ModelConfig(
        architecture="llama",
        hidden_size=hidden,
        intermediate_size=need("llama.feed_forward_length"),
        num_hidden_layers=need("llama.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        max_position_embeddings=int(meta.get("llama.context_length") or 2048),
        rms_norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope=_rope(meta, head_dim, rope_freqs, where),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias=has_bias,
        sliding_window=None,
        bos_token_id=opt_id("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=opt_id("padding_token_id"),
        tokenizer=tokenizer,
        source={"kind": "gguf", "path": str(path.absolute()), "name": name or path.stem},
    )
    cfg.validate(where)

    expected = expected_tensors(cfg)
    hf_names: dict[str, str] = {}  # hf name -> gguf name
    for gname in tensors:
        if gname == "rope_freqs.weight":
            continue
        hf = _hf_name(gname)
        if hf is None or hf not in expected:
            raise UnsupportedModelError(f"{where}: unsupported tensor {gname} in a llama GGUF")
        hf_names[hf] = gname

    specs: list[TensorSpec] = []
    src_types: set[str] = set()
    for hf, (shape, kind) in expected.items():
        gname = hf_names.get(hf)
        if gname is None:
            raise ModelFormatError(f"{where}: tensor {_gguf_name(hf)} ({hf}) is missing, "
                                   f"expected shape {list(shape)}")
        t = tensors[gname]
        actual = tuple(int(d) for d in reversed([int(x) for x in t.shape]))  # GGUF lists ne0 first
        if actual != shape:
            raise ModelFormatError(f"{where}: tensor {gname} ({hf}) has shape {list(actual)}, "
                                   f"expected {list(shape)}")
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED_GGUF_TYPES:
            raise UnsupportedModelError(f"{where}: tensor {gname} has unsupported type {qtype}; "
                                        f"supported: {', '.join(SUPPORTED_GGUF_TYPES)}")
        if kind == "matrix":
            src_types.add(qtype)
        permute_heads = None
        if gname.endswith((".attn_q.weight", ".attn_q.bias")):
            permute_heads = heads
        elif gname.endswith((".attn_k.weight", ".attn_k.bias")):
            permute_heads = kv_heads
        src_dtype = qtype if qtype in ("F32", "F16", "BF16") else "F32"
        specs.append(TensorSpec(hf, shape, kind, src_dtype,
                                _loader(t, shape, permute_heads, dequantize, GGMLQuantizationType, where)))

    if dtype == "auto":
        only = src_types.pop() if len(src_types) == 1 else None
        weight_dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(only or "", "float32")
    else:
        weight_dtype = dtype
    return ExportPlan(config=cfg, tensors=specs, weight_dtype=weight_dtype)


def _hf_name(gname: str) -> str | None:
    if gname in _TOP:
        return _TOP[gname]
    parts = gname.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK:
        return f"model.layers.{int(parts[1])}.{_BLOCK[parts[2]]}.{parts[3]}"
    return None


def _gguf_name(hf: str) -> str:
    for g, h in _TOP.items():
        if h == hf:
            return g
    parts = hf.split(".")
    if len(parts) >= 5 and parts[0] == "model" and parts[1] == "layers":
        mid = ".".join(parts[3:-1])
        for g, h in _BLOCK.items():
            if h == mid:
                return f"blk.{parts[2]}.{g}.{parts[-1]}"
    return hf


def _dequantize(t: Any, dequantize: Callable[..., np.ndarray], qtypes: Any, where: str) -> np.ndarray:
    """The tensor's values: raw for F32/F16, uint16 bit patterns for BF16, float32 otherwise."""
    qt = t.tensor_type
    if qt.name not in SUPPORTED_GGUF_TYPES:
        raise UnsupportedModelError(f"{where}: tensor {t.name} has unsupported type {qt.name}")
    data = np.asarray(t.data)
    if qt == qtypes.F32:
        return data.view(np.float32)
    if qt == qtypes.F16:
        return data.view(np.float16)
    if qt == qtypes.BF16:
        return np.ascontiguousarray(data).view(np.uint16)
    return np.asarray(dequantize(data, qt), dtype=np.float32)


def _loader(t: Any, shape: tuple[int, ...], permute_heads: int | None, dequantize: Callable[..., np.ndarray],
            qtypes: Any, where: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        w = _dequantize(t, dequantize, qtypes, where).reshape(shape)
        if permute_heads is not None:
            w = unpermute_qk(w, permute_heads)
        return w

    return load
