"""Importer for Hugging Face checkpoint directories (Llama, Mistral, Qwen2 families).

Reads ``config.json`` (transformers 4 and 5 layouts), ``generation_config.json``, the safetensors
weights (single file or sharded with ``model.safetensors.index.json``), and the tokenizer
(``tokenizer.json`` preferred, else ``tokenizer.model``) with ``tokenizer_config.json`` /
``chat_template.jinja``. Produces an :class:`~medusa_rt.export.writer.ExportPlan`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from .safetensors_io import RUNTIME_DTYPES, SafetensorsFile, convert_for_storage
from .writer import ExportPlan, ModelConfig, TensorSpec, TokenizerInfo, expected_tensors

__all__ = ["import_hf", "parse_rope"]

_ARCH_BY_CLASS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _load_json(path: Path, *, required: bool = True) -> Any:
    """Parse a JSON file; a missing optional file gives None, a corrupt one ModelFormatError."""
    if not path.is_file():
        if required:
            raise ModelNotFoundError(f"{path} does not exist")
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path}: cannot parse JSON: {exc}") from exc


def _architecture(cfg: dict[str, Any], where: Path) -> str:
    model_type = cfg.get("model_type")
    if model_type in ("llama", "mistral", "qwen2"):
        return str(model_type)
    # The class decides the weight layout: a LlamaForCausalLM checkpoint is Llama-shaped whatever
    # its model_type says (e.g. a fine-tune that renamed it).
    for cls in cfg.get("architectures") or []:
        if cls in _ARCH_BY_CLASS:
            return _ARCH_BY_CLASS[cls]
    shown = model_type if model_type else (cfg.get("architectures") or ["<none>"])[0]
    raise UnsupportedModelError(
        f"{where}: unsupported model_type {shown!r}; supported: llama, mistral, qwen2 "
        "(LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)")


def parse_rope(cfg: dict[str, Any], where: str | Path) -> dict[str, Any]:
    """The runtime ``rope`` block from an HF config (transformers 4 ``rope_theta``/``rope_scaling``
    or transformers 5 ``rope_parameters``).

    Supported types: default, linear (factor), llama3 (factor, low/high_freq_factor,
    original_max_position_embeddings); anything else raises UnsupportedModelError.
    """
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # Per-layer-type parameters ({"full_attention": {...}, ...}): only one kind is supported.
        kinds = list(params.values())
        if any(k != kinds[0] for k in kinds[1:]):
            raise UnsupportedModelError(f"{where}: different RoPE parameters per layer type are not supported")
        params = kinds[0]
    scaling = cfg.get("rope_scaling")
    if isinstance(params, dict) and params:
        spec: dict[str, Any] = dict(params)
        theta = spec.get("rope_theta", cfg.get("rope_theta"))
    else:
        spec = dict(scaling) if isinstance(scaling, dict) else {}
        theta = cfg.get("rope_theta")
    if theta is None:
        theta = 10000.0
    rope_type = spec.get("rope_type") or spec.get("type") or "default"
    partial = spec.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedModelError(f"{where}: partial rotary embeddings (partial_rotary_factor={partial}) "
                                    "are not supported")
    out: dict[str, Any] = {"theta": float(theta), "type": str(rope_type)}

    def need(key: str) -> float:
        if spec.get(key) is None:
            raise ModelFormatError(f"{where}: rope type {rope_type!r} needs {key!r}, which is missing")
        return float(spec[key])

    if rope_type == "default":
        pass
    elif rope_type == "linear":
        out["factor"] = need("factor")
    elif rope_type == "llama3":
        out["factor"] = need("factor")
        out["low_freq_factor"] = need("low_freq_factor")
        out["high_freq_factor"] = need("high_freq_factor")
        out["original_max_position_embeddings"] = int(need("original_max_position_embeddings"))
    else:
        raise UnsupportedModelError(
            f"{where}: unsupported rope type {rope_type!r}; supported: default, linear, llama3")
    return out


def _ids(value: Any) -> list[int]:
    """An int, a list of ints or None as a list of ints."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class _VocabLookup:
    """token <-> id lookups in a tokenizer.json or tokenizer.model, loaded on demand."""

    def __init__(self, tok_file: Path, tok_type: str) -> None:
        self._file, self._type = tok_file, tok_type
        self._to_id: dict[str, int] | None = None

    def _load(self) -> dict[str, int]:
        if self._to_id is None:
            mapping: dict[str, int] = {}
            try:
                if self._type == "hf":
                    from tokenizers import Tokenizer

                    tok = Tokenizer.from_file(str(self._file))
                    mapping = dict(tok.get_vocab(with_added_tokens=True))
                else:
                    import sentencepiece as spm

                    sp = spm.SentencePieceProcessor(model_file=str(self._file))
                    mapping = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
            except Exception as exc:  # noqa: BLE001 - any parse failure is a format problem
                raise ModelFormatError(f"{self._file}: cannot load tokenizer: {exc}") from exc
            self._to_id = mapping
        return self._to_id

    def id_of(self, token: str | None) -> int | None:
        return None if token is None else self._load().get(token)

    def token_of(self, tid: int | None) -> str | None:
        if tid is None:
            return None
        for tok, i in self._load().items():
            if i == tid:
                return tok
        return None

    def post_processor_adds_bos(self) -> bool:
        """Whether tokenizer.json's post-processor prepends a special token to single sequences."""
        try:
            with open(self._file, encoding="utf-8") as fh:
                pp = json.load(fh).get("post_processor")
        except (OSError, ValueError) as exc:
            raise ModelFormatError(f"{self._file}: cannot parse tokenizer JSON: {exc}") from exc

        def adds(node: Any) -> bool:
            if not isinstance(node, dict):
                return False
            if node.get("type") == "TemplateProcessing":
                single = node.get("single") or []
                return bool(single) and isinstance(single[0], dict) and "SpecialToken" in single[0]
            if node.get("type") == "Sequence":
                return any(adds(p) for p in node.get("processors") or [])
            return False

        return adds(pp)


def _tokenizer_info(src: Path, cfg: dict[str, Any]) -> tuple[TokenizerInfo, _VocabLookup]:
    if (src / "tokenizer.json").is_file():
        tok_file, tok_type = src / "tokenizer.json", "hf"
    elif (src / "tokenizer.model").is_file():
        tok_file, tok_type = src / "tokenizer.model", "sentencepiece"
    else:
        raise ModelFormatError(f"{src}: no tokenizer.json or tokenizer.model")
    lookup = _VocabLookup(tok_file, tok_type)
    tcfg = _load_json(src / "tokenizer_config.json", required=False) or {}
    smap = _load_json(src / "special_tokens_map.json", required=False) or {}

    template: str | None = None
    if (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    else:
        raw = tcfg.get("chat_template")
        if raw is None:
            ct = _load_json(src / "chat_template.json", required=False) or {}
            raw = ct.get("chat_template")
        if isinstance(raw, list):  # [{"name": ..., "template": ...}, ...]
            named = {d.get("name"): d.get("template") for d in raw if isinstance(d, dict)}
            raw = named.get("default", next(iter(named.values()), None))
        template = raw if isinstance(raw, str) else None

    if "add_bos_token" in tcfg and tcfg["add_bos_token"] is not None:
        add_bos = bool(tcfg["add_bos_token"])
    elif tok_type == "hf":
        add_bos = lookup.post_processor_adds_bos()
    else:
        add_bos = True  # LlamaTokenizer (sentencepiece) default

    bos = _token_text(tcfg.get("bos_token")) or _token_text(smap.get("bos_token"))
    eos = _token_text(tcfg.get("eos_token")) or _token_text(smap.get("eos_token"))
    if bos is None:
        bos = lookup.token_of(cfg.get("bos_token_id") if isinstance(cfg.get("bos_token_id"), int) else None)
    if eos is None:
        eos_ids = _ids(cfg.get("eos_token_id"))
        eos = lookup.token_of(eos_ids[0] if eos_ids else None)
    info = TokenizerInfo(file=tok_file.name, type=tok_type, add_bos_token=add_bos, chat_template=template,
                         bos_token=bos, eos_token=eos, source=tok_file)
    return info, lookup


def _open_weights(src: Path) -> tuple[dict[str, SafetensorsFile], dict[str, str]]:
    """Open the safetensors files; return (file name -> reader, tensor name -> file name)."""
    index_path = src / "model.safetensors.index.json"
    if index_path.is_file():
        index = _load_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFormatError(f"{index_path}: missing or empty weight_map")
        files = sorted(set(weight_map.values()))
    elif (src / "model.safetensors").is_file():
        files, weight_map = ["model.safetensors"], None
    else:
        others = [p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if others:
            raise UnsupportedModelError(
                f"{src}: only safetensors checkpoints are supported (found {', '.join(sorted(others))})")
        raise ModelFormatError(f"{src}: no model.safetensors or model.safetensors.index.json")
    readers: dict[str, SafetensorsFile] = {}
    try:
        for fname in files:
            path = src / fname
            if not path.is_file():
                raise ModelFormatError(f"{index_path}: shard {fname} does not exist")
            readers[fname] = SafetensorsFile(path)
    except BaseException:
        for r in readers.values():
            r.close()
        raise
    if weight_map is None:
        weight_map = {name: files[0] for name in readers[files[0]].keys()}
    else:
        for name, fname in weight_map.items():
            if name not in readers[fname]:
                for r in readers.values():
                    r.close()
                raise ModelFormatError(f"{src / fname}: tensor {name} listed in the index is missing")
    return readers, {str(k): str(v) for k, v in weight_map.items()}


def import_hf(src: str | Path, *, dtype: str = "auto", name: str | None = None) -> ExportPlan:
    """Read an HF checkpoint directory and plan its export.

    Raises ModelNotFoundError (no directory/config.json), UnsupportedModelError (model type, rope
    type, MLP bias, quantized or non-float weights), ModelFormatError (missing tensor, shape
    mismatch, corrupt files).
    """
    src = Path(src)
    if not src.is_dir():
        raise ModelNotFoundError(f"model directory {src} does not exist")
    cfg_path = src / "config.json"
    cfg = _load_json(cfg_path)
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{cfg_path}: not a JSON object")
    arch = _architecture(cfg, cfg_path)
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?") if isinstance(
            cfg["quantization_config"], dict) else "?"
        raise UnsupportedModelError(f"{cfg_path}: quantized checkpoints ({method}) are not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{cfg_path}: hidden_act {act!r} is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{cfg_path}: mlp_bias=true is not supported")

    def req(key: str) -> int:
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool):
            raise ModelFormatError(f"{cfg_path}: {key} missing or not an integer")
        return int(cfg[key])

    hidden, heads = req("hidden_size"), req("num_attention_heads")
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ModelFormatError(f"{cfg_path}: hidden_size {hidden} not divisible by {heads} heads "
                                   "and no head_dim given")
        head_dim = hidden // heads
    if arch == "qwen2":
        attention_bias = True
    elif arch == "llama":
        attention_bias = bool(cfg.get("attention_bias", False))
    else:
        attention_bias = False
    sliding: int | None = None
    if arch == "mistral":
        sliding = cfg.get("sliding_window")
    elif arch == "qwen2" and cfg.get("use_sliding_window"):
        sliding = cfg.get("sliding_window")
    gen = _load_json(src / "generation_config.json", required=False) or {}
    tokenizer, lookup = _tokenizer_info(src, cfg)

    eos_ids: list[int] = []
    for tid in _ids(cfg.get("eos_token_id")) + _ids(gen.get("eos_token_id")):
        if tid not in eos_ids:
            eos_ids.append(tid)
    if not eos_ids and (tid := lookup.id_of(tokenizer.eos_token)) is not None:
        eos_ids.append(tid)
    bos_id = cfg.get("bos_token_id", gen.get("bos_token_id"))
    if isinstance(bos_id, list):
        bos_id = bos_id[0] if bos_id else None
    if bos_id is None:
        bos_id = lookup.id_of(tokenizer.bos_token)
    pad_id = cfg.get("pad_token_id", gen.get("pad_token_id"))
    if isinstance(pad_id, list):
        pad_id = pad_id[0] if pad_id else None

    model_cfg = ModelConfig(
        architecture=arch,
        hidden_size=hidden,
        intermediate_size=req("intermediate_size"),
        num_hidden_layers=req("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(head_dim),
        vocab_size=req("vocab_size"),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=parse_rope(cfg, cfg_path),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        sliding_window=int(sliding) if sliding is not None else None,
        bos_token_id=int(bos_id) if bos_id is not None else None,
        eos_token_ids=eos_ids,
        pad_token_id=int(pad_id) if pad_id is not None else None,
        tokenizer=tokenizer,
        source={"kind": "hf", "path": str(src.absolute()), "name": name or src.name},
    )
    model_cfg.validate(str(cfg_path))

    readers, weight_map = _open_weights(src)
    try:
        plan = _plan_tensors(src, model_cfg, readers, weight_map, dtype)
    except BaseException:
        for r in readers.values():
            r.close()
        raise
    return plan


def _plan_tensors(src: Path, cfg: ModelConfig, readers: dict[str, SafetensorsFile],
                  weight_map: dict[str, str], dtype: str) -> ExportPlan:
    expected = expected_tensors(cfg)
    specs: list[TensorSpec] = []
    matrix_dtypes: set[str] = set()
    for tname, (shape, kind) in expected.items():
        fname = weight_map.get(tname)
        if fname is None:
            raise ModelFormatError(f"{src}: tensor {tname} is missing (expected shape {list(shape)})")
        reader = readers[fname]
        actual = tuple(reader.shape(tname))
        if actual != shape:
            raise ModelFormatError(
                f"{reader.path}: tensor {tname} has shape {list(actual)}, expected {list(shape)}")
        sdt = reader.dtype(tname)
        if sdt not in _FLOAT_DTYPES:
            raise UnsupportedModelError(f"{reader.path}: tensor {tname} has dtype {sdt}; "
                                        "only F32, BF16 and F16 weights are supported")
        if kind == "matrix":
            matrix_dtypes.add(sdt)
        specs.append(TensorSpec(tname, shape, kind, sdt, (lambda r=reader, n=tname: r.get(n))))

    if cfg.architecture == "llama" and cfg.attention_bias:
        # HF Llama with attention_bias also has an o_proj bias; the runtime has none, so it must be zero.
        for layer in range(cfg.num_hidden_layers):
            bname = f"model.layers.{layer}.self_attn.o_proj.bias"
            if bname in weight_map:
                r = readers[weight_map[bname]]
                values = convert_for_storage(r.get(bname), r.dtype(bname), "F32", what=bname)
                if np.any(values != 0):
                    raise UnsupportedModelError(f"{r.path}: tensor {bname} is nonzero; an o_proj bias "
                                                "is not supported by the runtime")

    if dtype == "auto":
        weight_dtype = _FLOAT_DTYPES[matrix_dtypes.pop()] if len(matrix_dtypes) == 1 else "float32"
    else:
        weight_dtype = dtype
    if weight_dtype not in RUNTIME_DTYPES:
        raise AssertionError(weight_dtype)

    def close() -> None:
        for r in readers.values():
            r.close()

    return ExportPlan(config=cfg, tensors=specs, weight_dtype=weight_dtype, close=close)
