"""medusa_rt: an inference runtime for Medusa speculative decoding.

The C++ engine (``medusa_rt._core``) owns the model, the KV cache and decoding; this package
adds tokenization, model conversion (:mod:`medusa_rt.export`), the model registry
(:func:`pull`) and the ``medusa-rt`` command line.

Quick start::

    import medusa_rt
    engine = medusa_rt.Engine("smollm2-135m")          # pulled and converted on first use
    with engine.session() as s:
        print(s.generate("What is the capital of France?", chat=True).text)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    CapacityError,
    InvalidArgumentError,
    MedusaError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
)

__version__ = "0.1.0"


def cmake_dir() -> "Path":
    """The directory of the installed CMake package (``medusa_rtConfig.cmake``), for C++ programs:
    ``cmake -Dmedusa_rt_DIR=$(python -c "import medusa_rt; print(medusa_rt.cmake_dir())")``.

    Raises FileNotFoundError when this installation has no C++ SDK (a development build run from
    the source tree; ``pip install .`` installs it)."""
    d = Path(__file__).resolve().parent / "lib" / "cmake" / "medusa_rt"
    if not (d / "medusa_rtConfig.cmake").is_file():
        raise FileNotFoundError(f"no medusa_rt CMake package at {d}: install the package with pip to get the C++ SDK")
    return d

__all__ = [
    "Engine",
    "Session",
    "GenerationResult",
    "GenerationStats",
    "TreeSpec",
    "pull",
    "export_model",
    "MedusaError",
    "InvalidArgumentError",
    "ModelNotFoundError",
    "ModelFormatError",
    "UnsupportedModelError",
    "CapacityError",
    "cmake_dir",
    "cuda_device_count",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine, GenerationResult, GenerationStats, Session, TreeSpec, cuda_device_count
    from .export import export_model
    from .registry import pull

_LAZY = {
    "Engine": ("engine", "Engine"),
    "Session": ("engine", "Session"),
    "GenerationResult": ("engine", "GenerationResult"),
    "GenerationStats": ("engine", "GenerationStats"),
    "TreeSpec": ("engine", "TreeSpec"),
    "cuda_device_count": ("engine", "cuda_device_count"),
    "pull": ("registry", "pull"),
    "export_model": ("export", "export_model"),
}


def __getattr__(name: str) -> Any:
    # Lazy imports keep `import medusa_rt.export` usable without loading the C++ extension.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medusa_rt' has no attribute {name!r}")
