"""Convert models into the medusa_rt runtime format (``docs/FORMAT.md``).

>>> from medusa_rt.export import export_model
>>> export_model("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-rt")      # doctest: +SKIP
>>> export_model("path/to/hf-checkpoint", "llama-rt", dtype="bfloat16")  # doctest: +SKIP

Sources: a ``.gguf`` file (llama architecture) or a Hugging Face checkpoint directory
(``config.json`` + safetensors; Llama, Mistral, Qwen2). Neither path needs torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InvalidArgumentError, ModelFormatError, ModelNotFoundError
from .medusa_heads import export_medusa_heads, find_head_source
from .writer import (
    COMPLETE_MARKER,
    FORMAT_VERSION,
    check_destination,
    is_complete_export,
    is_medusa_export,
    write_export,
)

__all__ = [
    "COMPLETE_MARKER",
    "DTYPES",
    "FORMAT_VERSION",
    "export_medusa_heads",
    "export_model",
    "is_complete_export",
    "is_medusa_export",
]

#: Accepted values of ``export_model(dtype=...)``.
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def export_model(src: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "auto",
                 overwrite: bool = False, progress: bool = True, name: str | None = None,
                 medusa_heads: str | os.PathLike | None = None, tree: object = None) -> Path:
    """Convert ``src`` into a runtime model directory at ``out_dir`` and return its path.

    ``src`` is a ``.gguf`` file or an HF checkpoint directory with ``config.json``. ``dtype``
    ("auto", "float32", "bfloat16", "float16") is the storage dtype of the weight matrices;
    "auto" keeps an HF checkpoint's float dtype and uses float32 for quantized GGUF tensors. Norm
    weights and biases are always float32. An existing non-empty ``out_dir`` is replaced only with
    ``overwrite=True`` and only if it is a medusa_rt export. ``name`` is recorded in
    ``config.json``'s ``source`` block. ``progress`` shows a per-tensor tqdm bar on stderr.

    Medusa heads are exported too (:func:`export_medusa_heads`) from ``medusa_heads`` when given,
    or from the checkpoint itself when it holds ``medusa_head.*`` tensors (Medusa-2 full
    checkpoints); ``tree`` (a built-in name or a list of paths) becomes their default tree.

    Raises ModelNotFoundError, ModelFormatError, UnsupportedModelError or InvalidArgumentError,
    each naming the file at fault.
    """
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    src_path = Path(src).expanduser()
    if not src_path.exists():
        raise ModelNotFoundError(f"model source {src_path} does not exist")
    out_path = Path(out_dir).expanduser().absolute()
    check_destination(out_path, overwrite)  # fail before any heavy work
    if src_path.is_dir():
        if (src_path / "config.json").is_file():
            if src_path.resolve() == out_path.resolve():
                raise InvalidArgumentError(f"export destination {out_path} is the source directory")
            if is_medusa_export(src_path):
                raise InvalidArgumentError(f"{src_path} is already a medusa_rt export")
            from .hf import import_hf

            plan = import_hf(src_path, dtype=dtype, name=name)
        else:
            ggufs = sorted(p.name for p in src_path.glob("*.gguf"))
            hint = f" (it holds {', '.join(ggufs)}: pass the .gguf file itself)" if ggufs else ""
            raise ModelNotFoundError(f"{src_path} has no config.json: not an HF checkpoint directory{hint}")
    elif _is_gguf(src_path):
        from .gguf_import import import_gguf

        plan = import_gguf(src_path, dtype=dtype, name=name)
    else:
        raise ModelFormatError(f"{src_path} is neither a .gguf file nor an HF checkpoint directory")
    if medusa_heads is None and src_path.is_dir():
        try:
            files, kind = find_head_source(src_path)
            if kind == "checkpoint":
                medusa_heads = src_path
        except ModelNotFoundError:
            pass
    if medusa_heads is not None:
        find_head_source(medusa_heads)  # fail before writing anything
    try:
        out = write_export(plan, out_path, overwrite=overwrite, progress=progress)
    finally:
        plan.release()
    if medusa_heads is not None:
        export_medusa_heads(medusa_heads, out, default_tree=tree, progress=progress)
    return out
