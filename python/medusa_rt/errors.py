"""Typed exceptions raised by medusa_rt.

Every error the C++ engine raises crosses into Python as exactly one of these classes
(the mapping is one to one with ``include/medusa_rt/errors.h``). The Python-side tools
(export, pull, tokenizer) raise the same classes.
"""

from __future__ import annotations

__all__ = [
    "MedusaError",
    "InvalidArgumentError",
    "ModelNotFoundError",
    "ModelFormatError",
    "UnsupportedModelError",
    "CapacityError",
]


class MedusaError(Exception):
    """Base class of every medusa_rt error."""


class InvalidArgumentError(MedusaError, ValueError):
    """An argument or option is invalid (bad option value, token id out of range, ...)."""


class ModelNotFoundError(MedusaError, FileNotFoundError):
    """A model directory, model file or named model does not exist."""


class ModelFormatError(MedusaError, ValueError):
    """A model file exists but is corrupt, truncated or inconsistent (bad header, shape mismatch, ...)."""


class UnsupportedModelError(MedusaError, ValueError):
    """The model is well formed but uses an architecture or feature medusa_rt does not support."""


class CapacityError(MedusaError, RuntimeError):
    """A request does not fit the engine: prompt longer than max_seq_len, no free sequence slot,
    not enough memory for the requested engine."""
