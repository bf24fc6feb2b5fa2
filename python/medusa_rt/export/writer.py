"""The common half of every importer: the runtime config, the expected tensor set, and the
atomic writer of a runtime model directory (see ``docs/FORMAT.md``).

An importer builds an :class:`ExportPlan` (config + lazily loaded tensors + tokenizer files) and
hands it to :func:`write_export`, which

1. refuses an existing non-empty destination unless ``overwrite=True`` *and* it is a medusa_rt
   export (``config.json`` with ``"format": "medusa_rt"``): user data is never deleted;
2. writes everything into a temporary sibling directory: ``model.safetensors`` (or shards
   ``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json`` past 2 GiB), the
   tokenizer file, ``config.json`` and, last, the ``.medusa_rt_complete`` manifest;
3. renames the temporary directory onto the destination.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, ModelFormatError
from .safetensors_io import (
    ELEMENT_SIZE,
    TensorToWrite,
    convert_for_storage,
    iter_chunks,
    safetensors_dtype_name,
    write_safetensors,
)

__all__ = [
    "COMPLETE_MARKER",
    "FORMAT_VERSION",
    "MAX_SHARD_BYTES",
    "ExportPlan",
    "ModelConfig",
    "TensorSpec",
    "TokenizerInfo",
    "check_destination",
    "expected_tensors",
    "is_complete_export",
    "is_medusa_export",
    "read_manifest",
    "write_export",
]

FORMAT_VERSION = 1
COMPLETE_MARKER = ".medusa_rt_complete"
#: Weights larger than this are sharded into several files (each at most this size, unless a
#: single tensor is larger).
MAX_SHARD_BYTES = 2 * 1024**3
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass
class TokenizerInfo:
    """The ``tokenizer`` block of config.json plus the file content to write.

    ``data`` is the file content as bytes, or ``source`` a file to copy.
    """

    file: str  # "tokenizer.json" | "tokenizer.model"
    type: str  # "hf" | "sentencepiece"
    add_bos_token: bool
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    data: bytes | None = None
    source: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """The config.json ``tokenizer`` block."""
        return {
            "file": self.file,
            "type": self.type,
            "add_bos_token": bool(self.add_bos_token),
            "chat_template": self.chat_template,
            "special_tokens": {"bos": self.bos_token, "eos": self.eos_token},
        }


@dataclass
class ModelConfig:
    """Architecture and dimensions of a Llama-family model, as the runtime format records them."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: dict[str, Any]
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    tokenizer: TokenizerInfo
    source: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        """Check the dimensions are positive and consistent; raise ModelFormatError naming ``where``."""
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelFormatError(f"{where}: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelFormatError(
                f"{where}: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ModelFormatError(f"{where}: head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rms_norm_eps > 0):
            raise ModelFormatError(f"{where}: rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        for tid in [self.bos_token_id, self.pad_token_id, *self.eos_token_ids]:
            if tid is not None and not (0 <= tid < self.vocab_size):
                raise ModelFormatError(f"{where}: special token id {tid} outside the vocabulary "
                                       f"(vocab_size {self.vocab_size})")

    def to_json(self, weight_dtype: str) -> dict[str, Any]:
        """The config.json content, in the key order of docs/FORMAT.md."""
        return {
            "format": "medusa_rt",
            "format_version": FORMAT_VERSION,
            "architecture": self.architecture,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": float(self.rms_norm_eps),
            "rope": self.rope,
            "tie_word_embeddings": bool(self.tie_word_embeddings),
            "attention_bias": bool(self.attention_bias),
            "sliding_window": self.sliding_window,
            "bos_token_id": self.bos_token_id,
            "eos_token_ids": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "weight_dtype": weight_dtype,
            "tokenizer": self.tokenizer.to_json(),
            "source": self.source,
            "medusa": None,
        }


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor the runtime format requires for ``cfg``: name -> (shape, kind).

    kind is ``"matrix"`` (stored in the weight dtype), ``"norm"`` or ``"bias"`` (stored float32).
    """
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "model.embed_tokens.weight": ((cfg.vocab_size, h), "matrix")}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        out[p + "input_layernorm.weight"] = ((h,), "norm")
        out[p + "self_attn.q_proj.weight"] = ((q, h), "matrix")
        out[p + "self_attn.k_proj.weight"] = ((kv, h), "matrix")
        out[p + "self_attn.v_proj.weight"] = ((kv, h), "matrix")
        out[p + "self_attn.o_proj.weight"] = ((h, q), "matrix")
        if cfg.attention_bias:
            out[p + "self_attn.q_proj.bias"] = ((q,), "bias")
            out[p + "self_attn.k_proj.bias"] = ((kv,), "bias")
            out[p + "self_attn.v_proj.bias"] = ((kv,), "bias")
        out[p + "post_attention_layernorm.weight"] = ((h,), "norm")
        out[p + "mlp.gate_proj.weight"] = ((i, h), "matrix")
        out[p + "mlp.up_proj.weight"] = ((i, h), "matrix")
        out[p + "mlp.down_proj.weight"] = ((h, i), "matrix")
    out["model.norm.weight"] = ((h,), "norm")
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ((cfg.vocab_size, h), "matrix")
    return out


@dataclass
class TensorSpec:
    """A tensor to export: ``load()`` returns its data in ``src_dtype`` (uint16 bits for BF16)
    with shape ``shape``; the writer converts it to the storage dtype."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "matrix" | "norm" | "bias"
    src_dtype: str  # "F32" | "F16" | "BF16"
    load: Callable[[], np.ndarray]


@dataclass
class ExportPlan:
    """Everything an importer found: the config, the tensors (lazy) and the tokenizer file."""

    config: ModelConfig
    tensors: list[TensorSpec]
    weight_dtype: str  # resolved runtime dtype: "float32" | "bfloat16" | "float16"
    close: Callable[[], None] | None = None  # releases the importer's open files

    def release(self) -> None:
        """Close whatever the importer left open (idempotent)."""
        if self.close is not None:
            fn, self.close = self.close, None
            fn()


# --------------------------------------------------------------------------------------------
# destination checks
# --------------------------------------------------------------------------------------------


def is_medusa_export(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding a config.json with ``"format": "medusa_rt"``
    (complete or not)."""
    try:
        with open(Path(path) / "config.json", encoding="utf-8") as fh:
            cfg = json.load(fh)
        return isinstance(cfg, dict) and cfg.get("format") == "medusa_rt"
    except (OSError, ValueError):
        return False


def read_manifest(path: str | os.PathLike) -> dict[str, int] | None:
    """The ``{file: size}`` map of a directory's completion manifest, or None if it is absent or unreadable."""
    try:
        with open(Path(path) / COMPLETE_MARKER, encoding="utf-8") as fh:
            manifest = json.load(fh)
        files = manifest["files"]
        if not isinstance(files, dict):
            return None
        return {str(k): int(v) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_in_manifest(path: str | os.PathLike, name: str, size: int) -> None:
    """Adds (or updates) one file of a finished export in its completion manifest (atomically);
    a directory without a manifest is left as it is."""
    root = Path(path)
    manifest = read_manifest(root)
    if manifest is None:
        return
    manifest[name] = int(size)
    tmp = root / (COMPLETE_MARKER + ".tmp")
    tmp.write_text(json.dumps({"files": manifest}, indent=1))
    os.replace(tmp, root / COMPLETE_MARKER)


def is_complete_export(path: str | os.PathLike) -> bool:
    """True when ``path`` is a finished medusa_rt export: the manifest exists, lists config.json
    and a weights file, and every listed file exists with the recorded size."""
    root = Path(path)
    files = read_manifest(root)
    if not files or "config.json" not in files:
        return False
    if "model.safetensors" not in files and "model.safetensors.index.json" not in files:
        return False
    for name, size in files.items():
        p = root / name
        if os.sep in name or name.startswith("..") or not p.is_file():
            return False
        try:
            if p.stat().st_size != size:
                return False
        except OSError:
            return False
    return is_medusa_export(root)


def check_destination(out_dir: Path, overwrite: bool) -> None:
    """Raise InvalidArgumentError when ``out_dir`` may not be (re)written."""
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise InvalidArgumentError(f"export destination {out_dir} exists and is not a directory")
        if not any(out_dir.iterdir()):
            return
        if not overwrite:
            raise InvalidArgumentError(
                f"export destination {out_dir} exists and is not empty; pass overwrite=True to replace "
                "a previous medusa_rt export")
        if not is_medusa_export(out_dir):
            raise InvalidArgumentError(
                f"refusing to overwrite {out_dir}: it is not a medusa_rt export (no config.json with "
                "\"format\": \"medusa_rt\"); remove it yourself or choose another directory")


def _install(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished temporary directory onto ``out_dir`` (checks again just before)."""
    check_destination(out_dir, overwrite)
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if out_dir.exists():
        # overwrite=True and a medusa_rt export: swap it out, then delete the old one.
        trash = out_dir.parent / f".{out_dir.name}.medusa_rt-old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, trash)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            os.rename(trash, out_dir)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)
    _fsync_dir(out_dir.parent)


def _fsync_dir(path: Path) -> None:
    """fsync a directory (best effort) so renames inside it are durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _storage_dtype(spec: TensorSpec, weight_dtype: str) -> str:
    return "F32" if spec.kind in ("norm", "bias") else safetensors_dtype_name(weight_dtype)


def _to_write(spec: TensorSpec, dst: str) -> TensorToWrite:
    def produce() -> np.ndarray:
        data = spec.load()
        if tuple(data.shape) != tuple(spec.shape):
            raise ModelFormatError(
                f"tensor {spec.name}: loaded shape {list(data.shape)} differs from {list(spec.shape)}")
        return convert_for_storage(data, spec.src_dtype, dst, what=spec.name)

    return TensorToWrite(spec.name, dst, tuple(spec.shape), produce)


def write_export(plan: ExportPlan, out_dir: str | os.PathLike, *, overwrite: bool = False,
                 progress: bool = True, max_shard_bytes: int | None = None) -> Path:
    """Write ``plan`` as a runtime model directory at ``out_dir`` (atomically); return its path.

    ``max_shard_bytes`` defaults to :data:`MAX_SHARD_BYTES` (2 GiB).
    """
    from tqdm.auto import tqdm  # imported here: only the writer needs it

    out = Path(out_dir).expanduser().absolute()
    check_destination(out, overwrite)
    limit = MAX_SHARD_BYTES if max_shard_bytes is None else int(max_shard_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.medusa_rt-tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the export is an ordinary directory
        items = [_to_write(s, _storage_dtype(s, plan.weight_dtype)) for s in plan.tensors]
        # 4-byte tensors first, then 2-byte ones: with a 64-byte aligned data start, every tensor
        # starts at a multiple of its element size (contiguity forbids padding between tensors).
        items.sort(key=lambda t: -ELEMENT_SIZE[t.dtype])
        total = sum(t.nbytes for t in items)
        bar = tqdm(total=len(items), desc=f"export {out.name}", unit="tensor",
                   disable=not progress, file=sys.stderr, leave=False)
        try:
            tick: Callable[[str], None] = lambda _name: bar.update(1)  # noqa: E731
            if total <= limit:
                write_safetensors(tmp / "model.safetensors", items, on_tensor=tick)
            else:
                groups = list(iter_chunks(items, limit))
                weight_map: dict[str, str] = {}
                for k, group in enumerate(groups, start=1):
                    fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
                    write_safetensors(tmp / fname, group, on_tensor=tick)
                    weight_map.update({t.name: fname for t in group})
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                _write_text(tmp / "model.safetensors.index.json", json.dumps(index, indent=2))
        finally:
            bar.close()

        tok = plan.config.tokenizer
        if tok.data is not None:
            (tmp / tok.file).write_bytes(tok.data)
        elif tok.source is not None:
            shutil.copyfile(tok.source, tmp / tok.file)
        else:
            raise ModelFormatError(f"no tokenizer for {out}")
        _fsync_file(tmp / tok.file)
        _write_text(tmp / "config.json",
                    json.dumps(plan.config.to_json(plan.weight_dtype), indent=2, ensure_ascii=False))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_text(tmp / COMPLETE_MARKER, json.dumps({"files": files}, indent=2))
        _fsync_dir(tmp)
        _install(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
