"""Copies of a GGUF file with its matrices stored as F32, F16, BF16 or Q8_0.

Peers such as llama.cpp read GGUF; to compare them with this engine at the same precision they
need the very weights the engine runs. The engine dequantizes a quantized GGUF to float32 (and
rounds to bf16/fp16 for those dtypes); :func:`retype_gguf` writes the same values back as a GGUF
whose 2-D tensors are F32, F16 or BF16 (1-D tensors, the norms, stay F32, as llama.cpp's own
converter keeps them); "int8" writes them as llama.cpp's Q8_0 (int8 in blocks of 32 with an fp16
scale), the precision class of the engine's ``dtype="int8"``. Metadata, tensor names, order and layout are copied unchanged, except
``general.file_type``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, ModelFormatError, ModelNotFoundError
from .gguf_import import _dequantize, _read_gguf
from .safetensors_io import bf16_bits_to_f32, f32_to_bf16_bits

__all__ = ["GGUF_DTYPES", "retype_gguf"]

#: dtype -> llama.cpp ``general.file_type`` (LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_BF16, MOSTLY_Q8_0).
GGUF_DTYPES = {"fp32": 0, "fp16": 1, "bf16": 32, "int8": 7}


def _as_float32(t: Any, dequantize: Any, qtypes: Any, where: str) -> np.ndarray:
    v = _dequantize(t, dequantize, qtypes, where)
    if v.dtype == np.uint16:  # BF16 bit patterns
        v = bf16_bits_to_f32(v)
    return np.asarray(v, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


def retype_gguf(src: str | os.PathLike, dst: str | os.PathLike, dtype: str) -> Path:
    """Write ``dst``: ``src`` with every 2-D tensor as ``dtype`` ("fp32", "fp16", "bf16", "int8":
    Q8_0).

    The file appears atomically (written under a temporary name, then renamed); an existing
    ``dst`` is replaced only by a complete file. Raises ModelNotFoundError, ModelFormatError,
    UnsupportedModelError (as the GGUF importer) and InvalidArgumentError for a bad dtype.
    """
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize

    if dtype not in GGUF_DTYPES:
        raise InvalidArgumentError(f"GGUF dtype must be one of {sorted(GGUF_DTYPES)}, not {dtype!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ModelNotFoundError(f"GGUF file {src} does not exist")
    reader = _read_gguf(src)
    if "general.architecture" not in reader.fields:
        raise ModelFormatError(f"{src}: missing GGUF metadata key general.architecture")
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(str(tmp), arch)
    try:
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue  # the writer emits the header fields and the architecture itself
            vtype = field.types[0]
            value = GGUF_DTYPES[dtype] if key == "general.file_type" else field.contents()
            sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            writer.add_key_value(key, value, vtype, sub_type=sub)
        if "general.file_type" not in reader.fields:
            writer.add_file_type(GGUF_DTYPES[dtype])
        for t in reader.tensors:
            w = _as_float32(t, dequantize, GGMLQuantizationType, str(src))
            if w.ndim < 2 or dtype == "fp32":
                writer.add_tensor(t.name, w)
            elif dtype == "fp16":
                writer.add_tensor(t.name, w.astype(np.float16))
            elif dtype == "int8":
                writer.add_tensor(t.name, quantize(w, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(t.name, f32_to_bf16_bits(w), raw_shape=w.shape, raw_dtype=GGMLQuantizationType.BF16)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst
