"""Bad input gets a typed exception whose message names the problem; nothing crashes."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import medusa_rt
from medusa_rt import _core
from medusa_rt.errors import (
    CapacityError,
    InvalidArgumentError,
    MedusaError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
)

from _tiny_models import build_hf_model, save_and_export


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("errors")
    return save_and_export(build_hf_model("llama-gqa-untied"), tmp, "tiny")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _core_engine(path: Path, **opts) -> "_core.Engine":
    o = _core.EngineOptions()
    o.dtype = "fp32"
    for k, v in opts.items():
        setattr(o, k, v)
    return _core.Engine(str(path), o)


def _rewrite_safetensors(path: Path, edit) -> None:
    """Rewrites the header of a safetensors file with edit(header_dict), keeping the data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_error_classes_are_one_hierarchy():
    for cls in (InvalidArgumentError, ModelNotFoundError, ModelFormatError, UnsupportedModelError, CapacityError):
        assert issubclass(cls, MedusaError)
    assert issubclass(ModelNotFoundError, FileNotFoundError)
    assert issubclass(InvalidArgumentError, ValueError)


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model directory or known model named .*does-not-exist"):
        medusa_rt.Engine(tmp_path / "does-not-exist")
    with pytest.raises(ModelNotFoundError, match="model directory not found"):
        _core_engine(tmp_path / "does-not-exist")


def test_unknown_model_name():
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        medusa_rt.Engine("no-such-model")


def test_dir_without_weights(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        _core_engine(d)


def test_truncated_safetensors(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelFormatError, match="out of range|truncated"):
        _core_engine(d)


def test_truncated_header(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ModelFormatError, match="header length"):
        _core_engine(d)


def test_header_offsets_out_of_range(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")

    def edit(h):
        e = h["model.norm.weight"]
        e["data_offsets"] = [e["data_offsets"][0] + 10**9, e["data_offsets"][1] + 10**9]

    _rewrite_safetensors(d / "model.safetensors", edit)
    with pytest.raises(ModelFormatError, match="model.norm.weight.*out of range"):
        _core_engine(d)


def test_header_size_disagrees_with_shape(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")

    def edit(h):
        h["model.norm.weight"]["shape"] = [7]

    _rewrite_safetensors(d / "model.safetensors", edit)
    with pytest.raises(ModelFormatError, match="model.norm.weight.*needs"):
        _core_engine(d)


def test_unknown_dtype_in_header(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    _rewrite_safetensors(d / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype="Q4"))
    with pytest.raises(ModelFormatError, match="unknown dtype 'Q4'"):
        _core_engine(d)


def test_garbage_header(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:20] = b"{not json!!!"
    f.write_bytes(bytes(raw))
    with pytest.raises(ModelFormatError, match="invalid JSON"):
        _core_engine(d)


def test_tensor_shape_mismatch(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 8  # the stored MLP matrices no longer fit the config
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match=r"mlp\.(gate|up)_proj\.weight.*shape"):
        _core_engine(d)


def test_missing_tensor(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match=r"model\.layers\.2\..*missing"):
        _core_engine(d)


def test_unknown_architecture(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architecture"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        _core_engine(d)


def test_unknown_architecture_at_export(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        medusa_rt.export_model(d, tmp_path / "out", progress=False)


def test_corrupt_config(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    (d / "config.json").write_text('{"format": "medusa_rt", "format_version": 1, "hidden_size": ')
    with pytest.raises(ModelFormatError, match="config.json.*invalid JSON"):
        _core_engine(d)


def test_unreadable_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(ModelFormatError, match="broken.gguf"):
        medusa_rt.export_model(f, tmp_path / "out", progress=False)
    f2 = tmp_path / "notgguf.gguf"
    f2.write_bytes(b"hello world, certainly not a gguf file")
    with pytest.raises(ModelFormatError, match="notgguf.gguf"):
        medusa_rt.export_model(f2, tmp_path / "out2", progress=False)


def test_bad_engine_options(tiny_dir):
    with pytest.raises(InvalidArgumentError, match="dtype"):
        medusa_rt.Engine(tiny_dir, dtype="int4")
    with pytest.raises(InvalidArgumentError, match="max_batch_size"):
        medusa_rt.Engine(tiny_dir, max_batch_size=0)
    with pytest.raises(InvalidArgumentError, match="max_position_embeddings"):
        medusa_rt.Engine(tiny_dir, max_seq_len=10**6)
    with pytest.raises(InvalidArgumentError, match="num_threads"):
        medusa_rt.Engine(tiny_dir, num_threads=-1)
    with pytest.raises(InvalidArgumentError, match="max_seq_len must be an integer"):
        medusa_rt.Engine(tiny_dir, max_seq_len="long")


def test_engine_too_big_for_memory(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 2**30
    (d / "config.json").write_text(json.dumps(cfg))
    # A KV cache of 2^30 positions needs hundreds of GiB: refused before anything is allocated.
    with pytest.raises(CapacityError, match=r"needs \d+ MiB.*KV cache \d+ MiB.*max_seq_len=1073741824"):
        _core_engine(d, max_seq_len=2**30)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return medusa_rt.Engine(tiny_dir, dtype="fp32", max_seq_len=64)


def test_prompt_longer_than_max_seq_len(engine):
    with engine.session() as s:
        with pytest.raises(CapacityError, match="prompt has 64 tokens.*max_seq_len is 64"):
            s.generate([1] * 64)
        with pytest.raises(CapacityError, match="max_seq_len"):
            s.forward([1] * 65)
        # The session is still usable afterwards.
        # 63 prompt tokens + the first new token fill the 64 slots; one more token comes from them.
        assert len(s.generate([1] * 63, max_new_tokens=5, ignore_eos=True).tokens) == 2


def test_token_id_out_of_range(engine):
    vocab = engine.info.vocab_size
    with engine.session() as s:
        with pytest.raises(InvalidArgumentError, match=f"token id {vocab} at index 1 is out of range"):
            s.generate([1, vocab, 2])
        with pytest.raises(InvalidArgumentError, match="token id -1"):
            s.generate([-1])
        with pytest.raises(InvalidArgumentError, match="out of range"):
            s.generate([2**40])
        with pytest.raises(InvalidArgumentError, match="out of range"):
            s.forward([vocab + 5])
        with pytest.raises(InvalidArgumentError, match="stop"):
            s.generate([1, 2], stop=[vocab])


def test_negative_max_new_tokens(engine):
    with engine.session() as s:
        with pytest.raises(InvalidArgumentError, match="max_new_tokens must be >= 0, got -1"):
            s.generate([1, 2, 3], max_new_tokens=-1)
        assert s.generate([1, 2, 3], max_new_tokens=0).tokens == []


def test_bad_prompt_types(engine):
    with engine.session() as s:
        with pytest.raises(InvalidArgumentError, match="empty"):
            s.generate([])
        with pytest.raises(InvalidArgumentError, match="prompt must be"):
            s.generate(3.5)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="integer"):
            s.generate([1, "x"])  # type: ignore[list-item]


def test_all_slots_taken(tiny_dir):
    engine = medusa_rt.Engine(tiny_dir, dtype="fp32", max_seq_len=32, max_batch_size=2)
    a, b = engine.session(), engine.session()
    with pytest.raises(CapacityError, match="slots"):
        engine.session()
    b.close()
    c = engine.session()  # the freed slot is reused
    assert c.generate([1, 2], max_new_tokens=2, ignore_eos=True).tokens
    a.close()


def test_closed_session(engine):
    s = engine.session()
    s.close()
    with pytest.raises(InvalidArgumentError, match="closed"):
        s.generate([1])


def test_user_files_untouched_on_error(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "m")
    (d / "config.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(ModelFormatError):
        medusa_rt.Engine(d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
