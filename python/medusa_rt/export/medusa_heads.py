"""Medusa head checkpoints -> ``medusa_heads.safetensors`` of a runtime model directory.

Three published layouts are read (see docs/FORMAT.md and the Medusa reference):

1. heads-only, per-head vocabulary projection (Medusa-1 release): ``medusa_lm_head.pt`` or
   ``.safetensors`` with ``{h}.{l}.linear.weight`` ``[d, d]``, ``{h}.{l}.linear.bias`` ``[d]`` and
   ``{h}.{L}.weight`` ``[V, d]``;
2. a full checkpoint (Medusa-2 release): an HF checkpoint directory whose tensors include
   ``medusa_head.{h}.{l}.linear.*`` and ``medusa_head.{h}.{L}.weight``, its config
   ``medusa_num_heads`` / ``medusa_num_layers``;
3. "version 2", shared lm_head: ``medusa_lm_head.safetensors`` with only ``{h}.{l}.linear.*``; the
   heads' outputs go through the base model's lm_head.

The number of heads and layers is read from the tensors (the published configs of layout 1 are
known to be wrong). Shapes are checked against the base model. A ResBlock without a bias (some
conversions drop it) gets a zero bias.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InvalidArgumentError, ModelFormatError, ModelNotFoundError, UnsupportedModelError
from .safetensors_io import (
    SafetensorsFile,
    TensorToWrite,
    bf16_bits_to_f32,
    convert_for_storage,
    safetensors_dtype_name,
    write_safetensors,
)
from .writer import is_medusa_export, record_in_manifest

__all__ = ["HEADS_FILE", "export_medusa_heads", "find_head_source", "load_head_tensors", "write_heads_file"]

HEADS_FILE = "medusa_heads.safetensors"
_KEY = re.compile(r"^(?:medusa_head\.)?(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")
# Heads with a root input (trained by medusa-rt train-heads --root-input): R_k, [d, d].
_ROOT_KEY = re.compile(r"^(\d+)\.root\.weight$")
# Heads with a path input (train-heads --path-input): P_kj for the path's token at depth j = 1..k.
_PATH_KEY = re.compile(r"^(\d+)\.path\.(\d+)\.weight$")

# Heads with a draft layer (train-heads --draft-layer): draft.{name}.weight, shapes given hidden H
# and the MLP width I (read from gate_up).
_DRAFT_KEY = re.compile(r"^draft\.(root|qkv|o|gate_up|down|norm1|norm2)\.weight$")
_DRAFT_SHAPES = {"root": lambda H, I: (H, H), "qkv": lambda H, I: (3 * H, H), "o": lambda H, I: (H, H),
                 "gate_up": lambda H, I: (2 * I, H), "down": lambda H, I: (H, I), "norm1": lambda H, I: (H,),
                 "norm2": lambda H, I: (H,)}

TreeArg = Union[None, str, Sequence[Sequence[int]]]


def _to_f32(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_bits_to_f32(arr)
    return np.asarray(arr, dtype=np.float32)


def _read_safetensors(paths: List[Path], only_heads: bool) -> Dict[str, np.ndarray]:
    out: Dict[str, np.ndarray] = {}
    for p in paths:
        with SafetensorsFile(p) as f:
            for name in f.keys():
                if only_heads and not name.startswith("medusa_head."):
                    continue
                out[name] = np.array(_to_f32(f.get(name), f.dtype(name)))
    return out


def _read_pt(path: Path) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as exc:
        raise UnsupportedModelError(
            f"{path} is a torch pickle; reading it needs torch (pip install torch), "
            "or convert it to medusa_lm_head.safetensors first") from exc
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types on corrupt files
        raise ModelFormatError(f"cannot read Medusa head checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise ModelFormatError(f"{path} does not hold a state dict")
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


def find_head_source(src: Union[str, os.PathLike]) -> Tuple[List[Path], str]:
    """Locates the head tensors of ``src``: (files, kind) with kind "safetensors", "pt" or
    "checkpoint" (a full HF checkpoint with medusa_head.* tensors)."""
    p = Path(src).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"Medusa head source {p} does not exist")
    if p.is_file():
        if p.suffix == ".pt" or p.suffix == ".bin":
            return [p], "pt"
        if p.suffix == ".safetensors":
            return [p], "safetensors"
        raise ModelFormatError(f"{p}: expected a .safetensors or .pt Medusa head file")
    for name in ("medusa_lm_head.safetensors", "medusa_lm_head.pt"):
        if (p / name).is_file():
            return [p / name], "safetensors" if name.endswith("safetensors") else "pt"
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFormatError(f"{index}: cannot read the shard index: {exc}") from exc
        files = sorted({p / f for k, f in weight_map.items() if k.startswith("medusa_head.")})
        if files:
            return files, "checkpoint"
    elif (p / "model.safetensors").is_file():
        with SafetensorsFile(p / "model.safetensors") as f:
            if any(k.startswith("medusa_head.") for k in f.keys()):
                return [p / "model.safetensors"], "checkpoint"
    raise ModelNotFoundError(
        f"no Medusa heads in {p}: expected medusa_lm_head.safetensors / medusa_lm_head.pt, or a checkpoint "
        "with medusa_head.* tensors")


def load_head_tensors(src: Union[str, os.PathLike]) -> Dict[str, np.ndarray]:
    """The head tensors of ``src`` as float32 arrays, keys without the ``medusa_head.`` prefix."""
    files, kind = find_head_source(src)
    raw = _read_pt(files[0]) if kind == "pt" else _read_safetensors(files, only_heads=kind == "checkpoint")
    out = {}
    for k, v in raw.items():
        k2 = k[len("medusa_head."):] if k.startswith("medusa_head.") else k
        if _KEY.match(k2) or _ROOT_KEY.match(k2) or _PATH_KEY.match(k2) or _DRAFT_KEY.match(k2):
            out[k2] = v
    if not out:
        raise ModelFormatError(f"{files[0]}: no Medusa head tensors ({{h}}.{{l}}.linear.weight ...) found")
    return out


def _structure(t: Dict[str, np.ndarray], where: str) -> Tuple[int, int, bool, bool, bool]:
    """(heads, blocks per head, shared lm_head, root input, path input) of heads given by published
    names."""
    heads: Dict[int, Dict[str, set]] = {}
    roots = {int(m.group(1)) for m in map(_ROOT_KEY.match, t) if m}
    paths = {(int(m.group(1)), int(m.group(2))) for m in map(_PATH_KEY.match, t) if m}
    for k in t:
        if _ROOT_KEY.match(k) or _PATH_KEY.match(k):
            continue
        m = _KEY.match(k)
        if not m:
            raise ModelFormatError(f"{where}: unexpected tensor {k} among the Medusa heads")
        h, l, kind = int(m.group(1)), int(m.group(2)), m.group(3)
        heads.setdefault(h, {"linear": set(), "proj": set()})
        heads[h]["linear" if kind.startswith("linear") else "proj"].add(l)
    num_heads = max(heads) + 1
    if sorted(heads) != list(range(num_heads)):
        raise ModelFormatError(f"{where}: Medusa heads are not numbered 0..{num_heads - 1}: {sorted(heads)}")
    layers = heads[0]["linear"]
    num_layers = len(layers)
    if layers != set(range(num_layers)):
        raise ModelFormatError(f"{where}: head 0's blocks are not numbered 0..{num_layers - 1}")
    shared = not heads[0]["proj"]
    for h, parts in heads.items():
        if parts["linear"] != layers:
            raise ModelFormatError(f"{where}: head {h} has blocks {sorted(parts['linear'])}, head 0 has {sorted(layers)}")
        want_proj = set() if shared else {num_layers}
        if parts["proj"] != want_proj:
            raise ModelFormatError(
                f"{where}: head {h} has vocabulary projection(s) {sorted(parts['proj'])}; expected "
                f"{'none (shared lm_head)' if shared else '{h}.' + str(num_layers) + '.weight'} as head 0")
        for l in range(num_layers):
            if f"{h}.{l}.linear.weight" not in t:
                raise ModelFormatError(f"{where}: {h}.{l}.linear.weight is missing")
    if roots and roots != set(range(num_heads)):
        raise ModelFormatError(f"{where}: root inputs ({{h}}.root.weight) for heads {sorted(roots)}; "
                               f"heads with a root input need one for every head 0..{num_heads - 1}")
    want_paths = {(h, j) for h in range(num_heads) for j in range(1, h + 1)}
    if paths and (paths != want_paths or not roots):
        raise ModelFormatError(f"{where}: path inputs ({{h}}.path.{{j}}.weight) {sorted(paths)}; heads with a path "
                               f"input need a root input and {{h}}.path.{{j}}.weight for every head h and "
                               f"j = 1..h")
    return num_heads, num_layers, shared, bool(roots), bool(paths)


def export_medusa_heads(
    src: Union[str, os.PathLike],
    model_dir: Union[str, os.PathLike],
    *,
    dtype: str = "auto",
    default_tree: TreeArg = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Converts the Medusa heads at ``src`` (any of the three layouts) into
    ``<model_dir>/medusa_heads.safetensors`` of an existing runtime model directory.

    ``dtype`` ("auto" = the model's weight_dtype, "float32", "bfloat16", "float16") is the storage
    dtype of the head matrices. ``default_tree`` (a built-in tree name or a list of paths) is
    recorded as the tree the engine uses with these heads unless told otherwise. An existing heads
    file is replaced only with ``overwrite=True``. Returns the written file's path.

    Raises ModelNotFoundError, ModelFormatError (shapes that do not fit the base model, broken
    files), UnsupportedModelError, InvalidArgumentError.
    """
    root = Path(model_dir).expanduser()
    if not is_medusa_export(root):
        raise ModelNotFoundError(f"{root} is not a medusa_rt model directory (export the base model first)")
    cfg = json.loads((root / "config.json").read_text())
    hidden, vocab = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    if dtype == "auto":
        dtype = str(cfg.get("weight_dtype", "float32"))
    safetensors_dtype_name(dtype)  # validates dtype
    out = root / HEADS_FILE
    if out.exists() and not overwrite:
        raise InvalidArgumentError(f"{out} exists; pass overwrite=True to replace it")
    size = write_heads_file(load_head_tensors(src), out, hidden=hidden, vocab=vocab, dtype=dtype,
                            default_tree=default_tree, source=str(Path(src).expanduser().absolute()),
                            where=str(src), progress=progress)
    record_in_manifest(root, HEADS_FILE, size)  # keep the completion manifest in step with the files
    return out


def write_heads_file(
    tensors: Dict[str, np.ndarray],
    out: Path,
    *,
    hidden: int,
    vocab: int,
    dtype: str,
    default_tree: TreeArg = None,
    extra_metadata: Optional[Dict[str, str]] = None,
    draft_vocab: Optional[np.ndarray] = None,
    draft_counts: Optional[np.ndarray] = None,
    feature_layers: Sequence[int] = (),
    source: str = "",
    where: str = "",
    progress: bool = True,
) -> int:
    """Writes heads given by name in the published layouts (``{h}.{l}.linear.weight`` / ``.bias``,
    optional ``{h}.{L}.weight``; ``{h}.root.weight`` for heads with a root input, written as
    format_version 2; with ``{h}.path.{j}.weight`` (j = 1..h) for a path input, format_version 3;
    with ``draft.{root,qkv,o,gate_up,down,norm1,norm2}.weight`` a draft layer, format_version 4;
    with ``fuse.{j}.weight`` for each of ``feature_layers`` (the base model's decoder layers whose
    output the heads also read), format_version 5) as a runtime heads file at ``out``
    (atomically), checking shapes
    against ``hidden`` / ``vocab``. ``draft_vocab`` (increasing token ids; shared lm_head only) is
    the sub-vocabulary the heads rank; ``draft_counts`` (optional, one per draft token, >= 0) its
    tokens' counts in the training answers, so that an engine can keep only the most frequent
    (``medusa_draft_vocab``). Returns the file's size in bytes."""
    where = where or str(out)
    safetensors_dtype_name(dtype)  # validates dtype
    tree_meta = ""
    if default_tree is not None:
        tree_meta = default_tree if isinstance(default_tree, str) else json.dumps(
            [[int(r) for r in p] for p in default_tree])
    draft = {k[len("draft."):-len(".weight")]: v for k, v in tensors.items() if k.startswith("draft.")}
    fuse = sorted(k for k in tensors if k.startswith("fuse."))
    num_heads, num_layers, shared, root_input, path_input = _structure(
        {k: v for k, v in tensors.items() if not k.startswith(("draft.", "fuse."))}, where)
    feature_layers = [int(x) for x in feature_layers]
    if fuse or feature_layers:
        if set(fuse) != {f"fuse.{j}.weight" for j in range(len(feature_layers))} or not feature_layers:
            raise ModelFormatError(f"{where}: heads with feature layers need fuse.{{j}}.weight for each of the "
                                   f"feature_layers {feature_layers}; got {fuse}")
        if not root_input or draft:
            raise ModelFormatError(f"{where}: feature layers need heads with a root input and no draft layer")
    if num_layers < 1:
        raise ModelFormatError(f"{where}: Medusa heads without residual blocks are not supported")
    if draft:
        if set(draft) != set(_DRAFT_SHAPES) or not root_input:
            raise ModelFormatError(f"{where}: a draft layer needs draft.{{{','.join(_DRAFT_SHAPES)}}}.weight and "
                                   f"heads with a root input; got draft.{sorted(draft)}")
        width = int(np.shape(draft["gate_up"])[0]) // 2

    def check(name: str, shape: Tuple[int, ...]) -> np.ndarray:
        arr = tensors[name]
        if tuple(arr.shape) != shape:
            raise ModelFormatError(
                f"{where}: tensor {name} has shape {list(arr.shape)} but the base model (hidden_size {hidden}, "
                f"vocab_size {vocab}) needs {list(shape)}")
        return arr

    items: List[TensorToWrite] = []

    def add(name: str, arr: np.ndarray, store: str) -> None:
        st = safetensors_dtype_name(store)
        data = convert_for_storage(np.ascontiguousarray(arr, dtype=np.float32), "F32", st, what=name)
        items.append(TensorToWrite(name, st, tuple(arr.shape), lambda d=data: d))

    for h in range(num_heads):
        for l in range(num_layers):
            w = check(f"{h}.{l}.linear.weight", (hidden, hidden))
            b_name = f"{h}.{l}.linear.bias"
            b = check(b_name, (hidden,)) if b_name in tensors else np.zeros(hidden, np.float32)
            add(f"medusa.{h}.{l}.weight", w, dtype)
            add(f"medusa.{h}.{l}.bias", b, "float32")
        if root_input:
            add(f"medusa.{h}.root.weight", check(f"{h}.root.weight", (hidden, hidden)), dtype)
        for j in range(1, h + 1 if path_input else 1):
            add(f"medusa.{h}.path.{j}.weight", check(f"{h}.path.{j}.weight", (hidden, hidden)), dtype)
        if not shared:
            add(f"medusa.{h}.lm_head.weight", check(f"{h}.{num_layers}.weight", (vocab, hidden)), dtype)

    for name, shape in _DRAFT_SHAPES.items() if draft else ():
        add(f"medusa.draft.{name}.weight", check(f"draft.{name}.weight", shape(hidden, width)),
            "float32" if name.startswith("norm") else dtype)

    for j in range(len(feature_layers)):
        add(f"medusa.fuse.{j}.weight", check(f"fuse.{j}.weight", (hidden, hidden)), dtype)

    if draft_vocab is not None:
        ids = np.asarray(draft_vocab, dtype=np.int64)
        if not shared or ids.ndim != 1 or ids.size < 1 or ids.min() < 0 or ids.max() >= vocab or \
                np.any(np.diff(ids) <= 0):
            raise InvalidArgumentError(f"{where}: a draft vocabulary must be increasing token ids in [0, {vocab}) "
                                       "and needs a shared lm_head")
        ids32 = ids.astype("<i4")
        items.append(TensorToWrite("medusa.draft_vocab", "I32", (int(ids32.size),), lambda: ids32))
        if draft_counts is not None:
            counts = np.asarray(draft_counts, dtype=np.int64)
            if counts.shape != ids.shape or counts.min() < 0 or counts.max() >= 2 ** 31:
                raise InvalidArgumentError(f"{where}: draft_counts must be one count in [0, 2^31) per draft token")
            counts32 = counts.astype("<i4")
            items.append(TensorToWrite("medusa.draft_vocab_count", "I32", (int(counts32.size),), lambda: counts32))
    elif draft_counts is not None:
        raise InvalidArgumentError(f"{where}: draft_counts needs a draft_vocab")

    metadata = {
        "format": "medusa_rt_heads",
        "format_version": "5" if feature_layers else "4" if draft else "3" if path_input else "2" if root_input
        else "1",
        "num_heads": str(num_heads),
        "num_layers": str(num_layers),
        "shared_lm_head": "true" if shared else "false",
        "hidden_size": str(hidden),
        "vocab_size": str(vocab),
        "default_tree": tree_meta,
        "source": source,
    }
    if draft:  # format 4: the inputs are named, the draft layer's attention is the base model's shape
        metadata.update(root_input="true", path_input="true" if path_input else "false", draft_layer="true")
    if feature_layers:  # format 5: named inputs, the base model's layers the heads read
        metadata.update(root_input="true", path_input="true" if path_input else "false",
                        feature_layers=json.dumps(feature_layers))
    metadata.update(extra_metadata or {})
    tmp = out.with_name(out.name + ".tmp")
    try:
        size = write_safetensors(tmp, items, metadata=metadata)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    if progress:
        import sys

        print(f"[medusa_rt] wrote {num_heads} Medusa heads ({num_layers} block(s) each, "
              f"{'shared' if shared else 'own'} lm_head{', path input' if path_input else ', root input' if root_input else ''}"
              f"{', draft layer' if draft else ''}"
              f"{', feature layers ' + str(feature_layers) if feature_layers else ''}) "
              f"to {out}",
              file=sys.stderr)
    return size


def update_heads_metadata(path: Union[str, os.PathLike], updates: Dict[str, str]) -> None:
    """Rewrites a runtime heads file with some metadata entries replaced (atomically; tensors
    unchanged)."""
    path = Path(path)
    with SafetensorsFile(path) as f:
        meta = dict(f.metadata)
        if meta.get("format") != "medusa_rt_heads":
            raise ModelFormatError(f"{path}: not a medusa_rt heads file")
        items = [TensorToWrite(n, f.dtype(n), tuple(f.shape(n)), lambda a=np.array(f.get(n)): a) for n in f.keys()]
    meta.update({k: str(v) for k, v in updates.items()})
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_safetensors(tmp, items, metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
