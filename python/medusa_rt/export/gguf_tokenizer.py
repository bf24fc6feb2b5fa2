"""Rebuild a tokenizer file from a GGUF's ``tokenizer.ggml.*`` metadata.

* ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE): an HF ``tokenizers`` JSON with the file's
  vocabulary and merges, the pre-tokenizer llama.cpp uses for ``tokenizer.ggml.pre``, control
  tokens (type 3) as special added tokens, user-defined tokens (type 4) as plain added tokens, and
  a byte-level decoder.
* ``tokenizer.ggml.model == "llama"`` (sentencepiece BPE with scores): a sentencepiece
  ``tokenizer.model`` (``ModelProto``, serialized here by hand, so protobuf is not needed) with
  the pieces, scores and types of the file, byte fallback when all 256 ``<0xXX>`` pieces exist, and
  the ``add_space_prefix`` / ``remove_extra_whitespaces`` normalizer flags. sentencepiece then
  encodes exactly like llama.cpp's SPM tokenizer (highest-score merge first, byte fallback).

Anything else raises :class:`UnsupportedModelError`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from ..errors import ModelFormatError, UnsupportedModelError
from .writer import TokenizerInfo

__all__ = ["PRE_TOKENIZER_FAMILIES", "build_gguf_tokenizer"]

# GGUF token types (llama.cpp llama_token_type); sentencepiece uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_WORDS = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_WORDS = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

#: ``tokenizer.ggml.pre`` values grouped by the pre-tokenization llama.cpp applies to them.
#: ``gpt2``: the GPT-2 regex; ``digits_gpt2``: every digit split off, then the GPT-2 regex;
#: ``llama3``: the Llama-3 regex (+ whole-word vocabulary lookups first); ``qwen2``: the Qwen2 regex.
PRE_TOKENIZER_FAMILIES: dict[str, str] = {
    # A missing or "default" pre-tokenizer means an old conversion; the GPT-2 regex is what the
    # original byte-level BPE tokenizers used (llama.cpp's own fallback regex is a known-degraded guess).
    "": "gpt2", "default": "gpt2",
    "gpt-2": "gpt2", "gpt2": "gpt2", "phi-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    "smollm": "digits_gpt2", "starcoder": "digits_gpt2", "refact": "digits_gpt2",
    "command-r": "digits_gpt2", "codeshell": "digits_gpt2", "exaone": "digits_gpt2",
    "minerva-7b": "digits_gpt2",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "falcon3": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "stablelm2": "qwen2", "megrez": "qwen2",
}


def build_gguf_tokenizer(meta: dict[str, Any], where: str) -> TokenizerInfo:
    """Build the tokenizer file and the config ``tokenizer`` block from GGUF metadata ``meta``
    (key -> value, arrays as lists). ``where`` names the file in error messages."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ModelFormatError(f"{where}: no tokenizer in the GGUF metadata (tokenizer.ggml.model/tokens)")
    tokens = [str(t) for t in tokens]
    types = meta.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types] if types is not None else [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ModelFormatError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for "
                               f"{len(tokens)} tokens")

    def special(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        value = int(value)
        if not 0 <= value < len(tokens):
            raise ModelFormatError(f"{where}: tokenizer.ggml.{key} = {value} is outside the vocabulary "
                                   f"({len(tokens)} tokens)")
        return value

    bos_id, eos_id = special("bos_token_id"), special("eos_token_id")
    template = meta.get("tokenizer.chat_template")
    if kind == "gpt2":
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        data = _byte_level_bpe_json(meta, tokens, types, add_bos, bos_id, where)
        file, tok_type = "tokenizer.json", "hf"
    elif kind == "llama":
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        data = _sentencepiece_model(meta, tokens, types, where)
        file, tok_type = "tokenizer.model", "sentencepiece"
    else:
        raise UnsupportedModelError(f"{where}: unsupported tokenizer model {kind!r} "
                                    "(tokenizer.ggml.model); supported: gpt2, llama")
    return TokenizerInfo(
        file=file, type=tok_type, add_bos_token=add_bos,
        chat_template=str(template) if template is not None else None,
        bos_token=tokens[bos_id] if bos_id is not None else None,
        eos_token=tokens[eos_id] if eos_id is not None else None,
        data=data,
    )


# --------------------------------------------------------------------------------------------
# byte-level BPE (tokenizer.ggml.model == "gpt2")
# --------------------------------------------------------------------------------------------


def _byte_level_bpe_json(meta: dict[str, Any], tokens: list[str], types: list[int], add_bos: bool,
                         bos_id: int | None, where: str) -> bytes:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    pre = str(meta.get("tokenizer.ggml.pre") or "")
    family = PRE_TOKENIZER_FAMILIES.get(pre)
    if family is None:
        raise UnsupportedModelError(
            f"{where}: unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: "
            f"{', '.join(sorted(k for k in PRE_TOKENIZER_FAMILIES if k))}")
    raw_merges = meta.get("tokenizer.ggml.merges")
    if raw_merges is None:
        raise ModelFormatError(f"{where}: byte-level BPE tokenizer without tokenizer.ggml.merges")
    merges: list[tuple[str, str]] = []
    for m in raw_merges:
        parts = str(m).split(" ")
        if len(parts) != 2:
            raise ModelFormatError(f"{where}: malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((parts[0], parts[1]))
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicated string keeps its first id
    try:
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=(family == "llama3"),
                           fuse_unk=False, byte_fallback=False)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions on bad merges
        raise ModelFormatError(f"{where}: inconsistent BPE vocabulary/merges: {exc}") from exc
    tok = Tokenizer(model)
    tok.normalizer = None
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "gpt2":
        tok.pre_tokenizer = byte_level
    elif family == "digits_gpt2":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        regex = _LLAMA3_WORDS if family == "llama3" else _QWEN2_WORDS
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != len(vocab):
        raise ModelFormatError(f"{where}: rebuilt tokenizer has {size} tokens, expected {len(vocab)}")
    return tok.to_str(pretty=False).encode("utf-8")


# --------------------------------------------------------------------------------------------
# sentencepiece BPE (tokenizer.ggml.model == "llama")
# --------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int32/int64 negatives are 10-byte two's complement varints
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3 | 0) + _varint(int(value))


def _field_bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _field_float(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", float(value))


def _sentencepiece_model(meta: dict[str, Any], tokens: list[str], types: Sequence[int], where: str) -> bytes:
    """Serialize a sentencepiece ``ModelProto`` (BPE) for a GGUF "llama" vocabulary."""
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise UnsupportedModelError(f"{where}: sentencepiece vocabulary without per-token scores "
                                    "(tokenizer.ggml.scores) cannot be rebuilt faithfully")
    if len(set(tokens)) != len(tokens):
        raise UnsupportedModelError(f"{where}: sentencepiece vocabulary has duplicate pieces")
    if any(t not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) for t in types):
        raise UnsupportedModelError(f"{where}: unknown token type in tokenizer.ggml.token_type")
    unknown = [i for i, t in enumerate(types) if t == UNKNOWN]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None and unknown:
        unk_id = unknown[0]
    if unk_id is None or not 0 <= int(unk_id) < len(tokens):
        raise UnsupportedModelError(f"{where}: sentencepiece vocabulary without an unknown token")
    unk_id = int(unk_id)
    # sentencepiece wants exactly one UNKNOWN piece: the declared one. Other pieces typed UNKNOWN
    # (placeholders in some conversions) can never come out of the encoder either way.
    types = [UNKNOWN if i == unk_id else (UNUSED if t == UNKNOWN else t) for i, t in enumerate(types)]
    byte_pieces = {f"<0x{b:02X}>" for b in range(256)}
    byte_fallback = sum(1 for tok, t in zip(tokens, types) if t == BYTE and tok in byte_pieces) == 256
    if any(t == BYTE and tok not in byte_pieces for tok, t in zip(tokens, types)):
        raise UnsupportedModelError(f"{where}: byte tokens not spelled <0xXX>")

    pieces = bytearray()
    for tok, score, ty in zip(tokens, scores, types):
        if ty == BYTE and not byte_fallback:
            ty = UNUSED
        msg = _field_bytes(1, tok.encode("utf-8")) + _field_float(2, float(score)) + _field_varint(3, ty)
        pieces += _field_bytes(1, msg)

    def piece(key: str) -> tuple[int, str | None]:
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is None or not 0 <= int(value) < len(tokens):
            return -1, None
        return int(value), tokens[int(value)]

    bos_id, bos_piece = piece("bos_token_id")
    eos_id, eos_piece = piece("eos_token_id")
    pad_id, pad_piece = piece("padding_token_id")
    trainer = bytearray()
    trainer += _field_varint(3, 2)  # model_type = BPE
    trainer += _field_varint(4, len(tokens))  # vocab_size
    trainer += _field_varint(35, int(byte_fallback))
    trainer += _field_varint(40, unk_id)
    trainer += _field_varint(41, bos_id)
    trainer += _field_varint(42, eos_id)
    trainer += _field_varint(43, pad_id)
    trainer += _field_bytes(45, tokens[unk_id].encode("utf-8"))
    for number, value in ((46, bos_piece), (47, eos_piece), (48, pad_piece)):
        if value is not None:
            trainer += _field_bytes(number, value.encode("utf-8"))

    normalizer = bytearray()
    charsmap = meta.get("tokenizer.ggml.precompiled_charsmap")
    normalizer += _field_bytes(1, b"identity" if not charsmap else b"nmt_nfkc")
    if charsmap:
        normalizer += _field_bytes(2, bytes(int(b) & 0xFF for b in charsmap))
    normalizer += _field_varint(3, int(bool(meta.get("tokenizer.ggml.add_space_prefix", True))))
    normalizer += _field_varint(4, int(bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False))))
    normalizer += _field_varint(5, 1)  # escape_whitespaces

    model = bytes(pieces) + _field_bytes(2, bytes(trainer)) + _field_bytes(3, bytes(normalizer))
    _check_sentencepiece(model, where)
    return model


def _check_sentencepiece(model: bytes, where: str) -> None:
    """Load the serialized model once so a vocabulary sentencepiece rejects fails here, typed."""
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_proto=model)
    except Exception as exc:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError variants
        raise UnsupportedModelError(f"{where}: sentencepiece rejects the rebuilt vocabulary: {exc}") from exc
