"""PEP 517 build backend of medusa_rt: scikit-build-core, plus the CUTLASS headers (the
nvidia-cutlass wheel) as a build requirement when the CUDA backend is requested, e.g.

    pip install . -C cmake.define.MEDUSA_RT_CUDA=ON
    SKBUILD_CMAKE_DEFINE="MEDUSA_RT_CUDA=ON" pip install .

CPU builds do not download it."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Union

from scikit_build_core import build as _skbuild
from scikit_build_core.build import (  # noqa: F401  (the PEP 517 hooks, re-exported)
    build_editable,
    build_sdist,
    build_wheel,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

CUTLASS_REQUIREMENT = "nvidia-cutlass>=3.5"
_ON = {"1", "on", "yes", "true", "y"}

ConfigSettings = Optional[Dict[str, Union[str, List[str]]]]


def wants_cuda(config_settings: ConfigSettings) -> bool:
    """Whether this build asks for MEDUSA_RT_CUDA=ON (config setting or environment)."""
    defines: List[str] = []
    for key, value in (config_settings or {}).items():
        values = value if isinstance(value, list) else [value]
        if key in ("cmake.define.MEDUSA_RT_CUDA", "cmake.define.MEDUSA_RT_CUDA:BOOL"):
            defines += [f"MEDUSA_RT_CUDA={v}" for v in values]
        elif key in ("cmake.define", "cmake.args"):
            defines += [v.lstrip("-D") for v in values]
    defines += os.environ.get("SKBUILD_CMAKE_DEFINE", "").split(";")
    defines += [a[2:] for a in os.environ.get("CMAKE_ARGS", "").split() if a.startswith("-D")]
    for d in defines:
        name, _, value = d.partition("=")
        if name.split(":")[0].strip() == "MEDUSA_RT_CUDA" and value.strip().lower() in _ON:
            return True
    return False


def get_requires_for_build_wheel(config_settings: ConfigSettings = None) -> List[str]:
    reqs = list(_skbuild.get_requires_for_build_wheel(config_settings))
    return reqs + [CUTLASS_REQUIREMENT] if wants_cuda(config_settings) else reqs


def get_requires_for_build_editable(config_settings: ConfigSettings = None) -> List[str]:
    reqs = list(_skbuild.get_requires_for_build_editable(config_settings))
    return reqs + [CUTLASS_REQUIREMENT] if wants_cuda(config_settings) else reqs
