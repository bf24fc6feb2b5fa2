"""Minimal safetensors reading and writing in numpy, with bfloat16 support.

``safetensors.numpy`` cannot hold bfloat16 (numpy has no such dtype), so this module reads and
writes the format itself: an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets"}}`` and the raw tensor bytes. bfloat16 data travels as
``uint16`` arrays holding the raw bit patterns.

The writer streams: the header is computed from the tensor shapes before any data is produced, then
each tensor is produced, converted and written in turn, so peak memory is one tensor.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError, ModelFormatError, UnsupportedModelError

__all__ = [
    "ELEMENT_SIZE",
    "RUNTIME_DTYPES",
    "SafetensorsFile",
    "TensorToWrite",
    "bf16_bits_to_f32",
    "convert_for_storage",
    "f32_to_bf16_bits",
    "safetensors_dtype_name",
    "write_safetensors",
]

#: Bytes per element of each safetensors dtype this module understands.
ELEMENT_SIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}

#: Runtime dtype names (config.json ``weight_dtype``) -> safetensors dtype names.
RUNTIME_DTYPES: dict[str, str] = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

_NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}

#: Data starts at a multiple of this many bytes (the header is padded with spaces, as the format allows).
HEADER_ALIGNMENT = 64


def safetensors_dtype_name(runtime_dtype: str) -> str:
    """The safetensors dtype name (``"F32"``, ``"BF16"``, ``"F16"``) of a runtime dtype name."""
    try:
        return RUNTIME_DTYPES[runtime_dtype]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown weight dtype {runtime_dtype!r}; expected one of {sorted(RUNTIME_DTYPES)}"
        ) from None


# --------------------------------------------------------------------------------------------
# bfloat16 <-> float32
# --------------------------------------------------------------------------------------------


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (round to nearest, ties to even); return the uint16 bit patterns.

    NaNs stay NaN (quiet bit set, sign kept); values that round past the largest bfloat16 become
    infinity, as IEEE rounding requires.
    """
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    bits = x32.view(np.uint32)
    # Add 0x7FFF plus the lowest kept bit, then truncate: round-to-nearest-even on the upper half.
    # (uint32 arithmetic wraps only for negative NaNs, which are overwritten below.)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = (bits + (np.uint32(0x7FFF) + lsb)) >> np.uint32(16)
    out = rounded.astype(np.uint16)
    nan = np.isnan(x32)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def convert_for_storage(array: np.ndarray, src_dtype: str, dst_dtype: str, *, what: str) -> np.ndarray:
    """Convert tensor data from safetensors dtype ``src_dtype`` to ``dst_dtype`` (both F32/F16/BF16).

    ``array`` holds float32/float16 values, or uint16 bfloat16 bit patterns when ``src_dtype`` is
    ``"BF16"``. Same-dtype conversion is a no-op (bit exact). Narrowing to float16 raises
    :class:`InvalidArgumentError` when a finite value would overflow to infinity. ``what`` names the
    tensor in error messages.
    """
    if src_dtype == dst_dtype:
        return np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[dst_dtype])
    if src_dtype == "BF16":
        wide = bf16_bits_to_f32(array)
    elif src_dtype in ("F32", "F16", "F64"):
        with np.errstate(over="ignore"):
            wide = np.asarray(array, dtype=np.float32)
    else:
        raise UnsupportedModelError(f"{what}: cannot convert dtype {src_dtype} to {dst_dtype}")
    if dst_dtype == "F32":
        return np.ascontiguousarray(wide, dtype=np.float32)
    if dst_dtype == "BF16":
        return f32_to_bf16_bits(wide)
    if dst_dtype == "F16":
        with np.errstate(over="ignore"):
            narrow = wide.astype(np.float16)
        if (np.isinf(narrow) & np.isfinite(wide)).any():
            raise InvalidArgumentError(
                f"{what}: values exceed the float16 range (max |x| = {float(np.nanmax(np.abs(wide))):.6g}); "
                "export with dtype='bfloat16' or 'float32' instead"
            )
        return narrow
    raise InvalidArgumentError(f"{what}: unknown target dtype {dst_dtype}")


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """A memory-mapped safetensors file: header parsed and validated up front, tensors read lazily.

    An unreadable file or a malformed/truncated header raises :class:`ModelFormatError` naming the file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as exc:
            raise ModelFormatError(f"cannot open safetensors file {self.path}: {exc}") from exc
        try:
            self._entries, self.metadata, self._data_start = self._parse_header()
            size = os.fstat(self._fh.fileno()).st_size
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        except BaseException:
            self._fh.close()
            raise

    def _parse_header(self) -> tuple[dict[str, _Entry], dict[str, str], int]:
        size = os.fstat(self._fh.fileno()).st_size
        raw = self._fh.read(8)
        if len(raw) < 8:
            raise ModelFormatError(f"{self.path}: not a safetensors file (only {size} bytes)")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > size - 8 or hlen > 100 * 1024 * 1024:
            raise ModelFormatError(f"{self.path}: bad safetensors header length {hlen} (file is {size} bytes)")
        try:
            header = json.loads(self._fh.read(hlen).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFormatError(f"{self.path}: corrupt safetensors header: {exc}") from exc
        if not isinstance(header, dict):
            raise ModelFormatError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        data_start = 8 + hlen
        data_len = size - data_start
        metadata = header.pop("__metadata__", None) or {}
        entries: dict[str, _Entry] = {}
        for name, info in header.items():
            try:
                dtype = str(info["dtype"])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(v) for v in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelFormatError(f"{self.path}: corrupt header entry for tensor {name!r}") from exc
            nbytes = int(np.prod(shape, dtype=np.int64)) * ELEMENT_SIZE.get(dtype, 0)
            if dtype not in ELEMENT_SIZE:
                # Keep it: the importer reports unsupported dtypes only for tensors it needs.
                nbytes = end - begin
            if not (0 <= begin <= end <= data_len) or end - begin != nbytes:
                raise ModelFormatError(
                    f"{self.path}: tensor {name!r} has data offsets [{begin}, {end}] inconsistent with "
                    f"dtype {dtype} shape {list(shape)} or the file size ({size} bytes; truncated?)"
                )
            entries[name] = _Entry(dtype, shape, begin, end)
        return entries, dict(metadata), data_start

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> str:
        """The safetensors dtype name of tensor ``name``."""
        return self._entries[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name``."""
        return self._entries[name].shape

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only numpy array (uint16 bit patterns for BF16)."""
        e = self._entries[name]
        if e.dtype not in _NUMPY_DTYPES:
            raise UnsupportedModelError(f"{self.path}: tensor {name!r} has unsupported dtype {e.dtype}")
        count = int(np.prod(e.shape, dtype=np.int64))
        if count == 0 or self._mm is None:
            return np.zeros(e.shape, dtype=_NUMPY_DTYPES[e.dtype])
        return np.frombuffer(self._mm, dtype=_NUMPY_DTYPES[e.dtype], count=count,
                             offset=self._data_start + e.begin).reshape(e.shape)

    def close(self) -> None:
        """Release the mapping and the file handle (arrays from :meth:`get` must be dropped first)."""
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # an array still references the mapping; the GC will release it
                pass
            self._mm = None
        self._fh.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


@dataclass
class TensorToWrite:
    """One tensor of a file to be written: ``produce()`` returns its data already in ``dtype``
    (uint16 bit patterns for BF16) with exactly ``shape``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        """Size of the data in bytes."""
        return int(np.prod(self.shape, dtype=np.int64)) * ELEMENT_SIZE[self.dtype]


def write_safetensors(path: str | os.PathLike, tensors: Iterable[TensorToWrite], *,
                      metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[str], None] | None = None) -> int:
    """Stream ``tensors`` into a safetensors file at ``path``; return the file size in bytes.

    Tensors are laid out in the given order. The header is padded with spaces so that the data
    section starts at a multiple of 64 bytes. ``on_tensor(name)`` is called after each tensor
    (progress reporting).
    """
    items = list(tensors)
    header: dict[str, object] = {}
    offset = 0
    for t in items:
        if t.name in header:
            raise InvalidArgumentError(f"duplicate tensor name {t.name!r} for {path}")
        header[t.name] = {"dtype": t.dtype, "shape": [int(d) for d in t.shape],
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * ((-(8 + len(blob))) % HEADER_ALIGNMENT)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for t in items:
            data = t.produce()
            want = _NUMPY_DTYPES[t.dtype]
            if data.dtype != want or tuple(data.shape) != tuple(t.shape):
                raise AssertionError(  # programming error in an importer, not a user error
                    f"tensor {t.name}: produced {data.dtype}{list(data.shape)}, "
                    f"expected {want}{list(t.shape)}")
            fh.write(np.ascontiguousarray(data).tobytes(order="C"))
            del data
            if on_tensor is not None:
                on_tensor(t.name)
        fh.flush()
        os.fsync(fh.fileno())
        return fh.tell()


def iter_chunks(items: list[TensorToWrite], max_bytes: int) -> Iterator[list[TensorToWrite]]:
    """Split ``items`` into consecutive groups whose data size stays within ``max_bytes``
    (a single tensor larger than ``max_bytes`` gets a group of its own)."""
    group: list[TensorToWrite] = []
    size = 0
    for t in items:
        if group and size + t.nbytes > max_bytes:
            yield group
            group, size = [], 0
        group.append(t)
        size += t.nbytes
    if group:
        yield group
