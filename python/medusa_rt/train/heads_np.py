"""Medusa heads of a runtime heads file applied in NumPy (accuracy tables without torch).

``p_k(h) = softmax(W_k (h + sum-of-blocks)))``: each block is ``x <- x + SiLU(A x + b)``; W_k is the
head's own projection or the base model's lm_head. Heads with a root input start from
``x = h + R_k e`` instead, e the input embedding of the token the base model emits at the row;
heads with a path input also add ``P_kj e_j`` for the tokens at depths j = 1..k of their path.
Heads with a draft layer (format_version 4) read its output over the answer so far in place of h
(:class:`DraftLayerNp`, the definition in ``medusa_rt.train.trainer``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from ..errors import InvalidArgumentError, ModelFormatError, ModelNotFoundError
from ..export.safetensors_io import SafetensorsFile, bf16_bits_to_f32


def _f32(f: SafetensorsFile, name: str) -> np.ndarray:
    arr = f.get(name)
    if f.dtype(name) == "BF16":
        return bf16_bits_to_f32(arr)
    return np.asarray(arr, dtype=np.float32)


def round_to(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Float32 values as the engine holds them in ``dtype`` weights ("bf16", "fp16", "fp32", or
    "int8": per row and group of 32 columns, symmetric int8 with scale max|w| / 127)."""
    from ..export.safetensors_io import f32_to_bf16_bits

    if dtype in ("bf16", "bfloat16"):
        return bf16_bits_to_f32(f32_to_bf16_bits(arr))
    if dtype in ("fp16", "float16"):
        return np.asarray(arr, dtype=np.float16).astype(np.float32)
    if dtype == "int8" and np.ndim(arr) == 2:
        w = np.asarray(arr, dtype=np.float32)
        out = np.empty_like(w)
        for g in range(0, w.shape[1], 32):
            blk = w[:, g:g + 32]
            scale = (np.abs(blk).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
            q = np.clip(np.rint(np.divide(blk, scale, out=np.zeros_like(blk), where=scale > 0)), -127, 127)
            out[:, g:g + 32] = q.astype(np.float32) * scale
        return out
    return np.asarray(arr, dtype=np.float32)


def load_lm_head(model_dir: Union[str, os.PathLike], dtype: str = "fp32") -> np.ndarray:
    """The base model's vocabulary projection ``[vocab, hidden]`` from a runtime model directory,
    rounded to the engine's weight dtype."""
    return _load_model_tensor(model_dir, dtype, lm_head=True)


def load_embedding(model_dir: Union[str, os.PathLike], dtype: str = "fp32") -> np.ndarray:
    """The base model's token embedding table ``[vocab, hidden]`` (what heads with a root input
    read), rounded to the engine's weight dtype."""
    return _load_model_tensor(model_dir, dtype, lm_head=False)


def _load_model_tensor(model_dir: Union[str, os.PathLike], dtype: str, lm_head: bool) -> np.ndarray:
    root = Path(model_dir)
    cfg_path = root / "config.json"
    if not cfg_path.exists():
        raise ModelNotFoundError(f"{root} is not a medusa_rt model directory (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    name = "lm_head.weight" if lm_head and not cfg.get("tie_word_embeddings") else "model.embed_tokens.weight"
    for p in sorted(root.glob("*.safetensors")):
        if p.name.startswith("medusa_heads"):
            continue
        with SafetensorsFile(p) as f:
            if name in f:
                return round_to(_f32(f, name), dtype)
    raise ModelFormatError(f"{root}: tensor {name} not found in the model's safetensors files")


def draft_shape(config: Dict[str, object]) -> Tuple[int, int, float, float]:
    """(heads, head size, RoPE base, RMSNorm epsilon) of a draft layer for the base model whose
    config.json is ``config``: the model's own attention shape, plain RoPE."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    rope = config.get("rope")
    theta = float(rope.get("theta", 10000.0)) if isinstance(rope, dict) else float(config.get("rope_theta", 10000.0))
    return heads, head_dim, theta, float(config.get("rms_norm_eps", 1e-5))


def answer_spans(record: np.ndarray) -> np.ndarray:
    """``[answers, 2]`` (start, end) of the runs of equal ``record`` ids (an answer's rows are
    consecutive positions)."""
    record = np.asarray(record)
    if record.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, record[1:] != record[:-1]])
    return np.stack([starts, np.r_[starts[1:], record.size]], 1)


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + eps).astype(np.float32) * w


@dataclass
class DraftLayerNp:
    """The draft layer of format-4 heads: ``u = h + R e(root)``, ``u += O attn(RoPE(Q, K), V)(norm1(u))``
    causally over one answer from its row 0 (RoPE position = row), ``z = u + D (silu(G) * U)(norm2(u))``;
    the base model's head count, head size, RoPE base and RMSNorm epsilon."""

    root: np.ndarray
    qkv: np.ndarray
    o: np.ndarray
    gate_up: np.ndarray
    down: np.ndarray
    norm1: np.ndarray
    norm2: np.ndarray
    heads: int
    head_dim: int
    theta: float
    eps: float

    def states(self, hidden: np.ndarray, root_emb: np.ndarray) -> np.ndarray:
        """``[T, H]`` states of one answer's rows ``hidden`` ``[T, H]`` with their roots' embeddings."""
        T, H = hidden.shape
        nh, hd, half = self.heads, self.head_dim, self.head_dim // 2
        x = np.asarray(hidden, np.float32) + root_emb @ self.root.T
        qkv = (_rmsnorm(x, self.norm1, self.eps) @ self.qkv.T).reshape(T, 3, nh, hd)
        inv = (1.0 / self.theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd)).astype(np.float32)
        ang = np.arange(T, dtype=np.float32)[:, None] * inv[None]
        c, s_ = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

        def rope(v: np.ndarray) -> np.ndarray:
            a, b = v[..., :half], v[..., half:]
            return np.concatenate([a * c - b * s_, b * c + a * s_], -1)

        q, k, v = rope(qkv[:, 0]), rope(qkv[:, 1]), qkv[:, 2]
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        scores = np.where(np.tril(np.ones((T, T), bool))[None], scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", p, v).reshape(T, H) @ self.o.T
        gu = _rmsnorm(x, self.norm2, self.eps) @ self.gate_up.T
        g, u = np.split(gu, 2, axis=-1)
        return x + (g / (1.0 + np.exp(-g)) * u) @ self.down.T

    def states_by_answer(self, hidden: np.ndarray, root_emb: np.ndarray, record: np.ndarray) -> np.ndarray:
        """:meth:`states` of every answer (rows of an answer consecutive, ``record`` its id per row)."""
        out = np.empty(hidden.shape, dtype=np.float32)
        for a, b in answer_spans(record):
            out[a:b] = self.states(hidden[a:b], root_emb[a:b])
        return out


def _most_frequent(f: SafetensorsFile, path, draft: Optional[np.ndarray], n: int) -> Optional[np.ndarray]:
    """The n most frequent tokens of a heads file's draft vocabulary (by medusa.draft_vocab_count,
    ties to the lower id), increasing; all of them for n = 0 or n >= its size. Refuses what the
    engine's medusa_draft_vocab refuses."""
    if n < 0:
        raise InvalidArgumentError(f"draft_vocab must be >= 0, got {n}")
    if draft is None:
        if n > 0:
            raise InvalidArgumentError(f"{path}: draft_vocab={n}: the file has no draft vocabulary")
        return None
    if "medusa.draft_vocab_count" in f:
        counts = np.array(f.get("medusa.draft_vocab_count"), dtype=np.int64)
        if counts.shape != draft.shape or (counts < 0).any():
            raise ModelFormatError(f"{path}: medusa.draft_vocab_count must hold one count >= 0 per draft token")
    elif 0 < n < draft.size:
        raise InvalidArgumentError(f"{path}: draft_vocab={n} needs medusa.draft_vocab_count")
    if not 0 < n < draft.size:
        return draft
    return np.sort(draft[np.argsort(-counts, kind="stable")[:n]])


@dataclass
class RuntimeHeads:
    blocks: List[List[tuple]]            # [head][layer] -> (weight [H, H], bias [H])
    projections: Optional[List[np.ndarray]]  # per-head [V, H], None when the lm_head is shared
    metadata: Dict[str, str]
    draft_vocab: Optional[np.ndarray] = None  # token ids the heads rank (None: all)
    roots: Optional[List[np.ndarray]] = None  # per-head R_k [H, H] (format_version >= 2), else None
    paths: Optional[List[List[np.ndarray]]] = None  # [head k][j - 1] P_kj [H, H] (format_version 3)
    draft: Optional[DraftLayerNp] = None  # format_version 4
    fuse: Optional[List[np.ndarray]] = None  # F_j [H, H] per feature layer (format_version 5)
    feature_layers: Tuple[int, ...] = ()
    norm_eps: float = 1e-5  # the base model's RMSNorm epsilon (the feature layers' normalisation)

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    @staticmethod
    def load(path: Union[str, os.PathLike], dtype: str = "fp32",
             config: Optional[Dict[str, object]] = None, draft_vocab: int = 0) -> "RuntimeHeads":
        """Heads of a runtime heads file with matrices rounded to ``dtype``; ``config`` (the base
        model's config.json) is needed for heads with a draft layer (its attention shape) or feature
        layers (its RMSNorm epsilon). ``draft_vocab`` > 0 keeps the most frequent of the file's
        draft tokens, as the engine's ``medusa_draft_vocab`` does."""
        with SafetensorsFile(path) as f:
            meta = dict(f.metadata)
            if meta.get("format") != "medusa_rt_heads":
                raise ModelFormatError(f"{path}: not a medusa_rt heads file (metadata format != medusa_rt_heads)")
            K, L = int(meta["num_heads"]), int(meta["num_layers"])
            shared = meta.get("shared_lm_head") == "true"
            blocks = [[(round_to(_f32(f, f"medusa.{k}.{l}.weight"), dtype), _f32(f, f"medusa.{k}.{l}.bias"))
                       for l in range(L)] for k in range(K)]
            proj = None if shared else [round_to(_f32(f, f"medusa.{k}.lm_head.weight"), dtype) for k in range(K)]
            draft = np.array(f.get("medusa.draft_vocab"), dtype=np.int64) if "medusa.draft_vocab" in f else None
            draft = _most_frequent(f, path, draft, draft_vocab)
            version = meta.get("format_version")
            has_path = version == "3" or (version in ("4", "5") and meta.get("path_input") == "true")
            roots = [round_to(_f32(f, f"medusa.{k}.root.weight"), dtype) for k in range(K)] \
                if version in ("2", "3", "4", "5") else None
            fuse, layers, eps = None, (), 1e-5
            if version == "5":
                if config is None:
                    raise InvalidArgumentError(f"{path}: heads with feature layers need the base model's config")
                layers = tuple(int(x) for x in json.loads(meta["feature_layers"]))
                fuse = [round_to(_f32(f, f"medusa.fuse.{j}.weight"), dtype) for j in range(len(layers))]
                eps = float(config["rms_norm_eps"])
            paths = [[round_to(_f32(f, f"medusa.{k}.path.{j}.weight"), dtype) for j in range(1, k + 1)]
                     for k in range(K)] if has_path else None
            layer = None
            if version == "4":
                if config is None:
                    raise InvalidArgumentError(f"{path}: heads with a draft layer need the base model's config")
                nh, hd, theta, eps = draft_shape(config)
                w = {n: round_to(_f32(f, f"medusa.draft.{n}.weight"), dtype)
                     for n in ("root", "qkv", "o", "gate_up", "down")}
                layer = DraftLayerNp(**w, norm1=_f32(f, "medusa.draft.norm1.weight"),
                                     norm2=_f32(f, "medusa.draft.norm2.weight"), heads=nh, head_dim=hd,
                                     theta=theta, eps=eps)
        return RuntimeHeads(blocks, proj, meta, draft, roots, paths, layer, fuse, layers, eps)

    def input_states(self, hidden: np.ndarray, taps: Optional[np.ndarray]) -> np.ndarray:
        """What the heads read: ``hidden + sum_j F_j rmsnorm(taps[:, j])`` with feature layers
        (``taps`` ``[rows, T, H]``), ``hidden`` itself without."""
        if not self.fuse:
            return hidden
        if taps is None or taps.shape[:2] != (hidden.shape[0], len(self.fuse)):
            raise InvalidArgumentError(f"these heads read feature layers {list(self.feature_layers)}: pass each "
                                       f"row's taps [rows, {len(self.fuse)}, H]")
        out = hidden.astype(np.float32)
        for j, w in enumerate(self.fuse):
            t = taps[:, j].astype(np.float32)
            t = t / np.sqrt((t * t).mean(axis=1, keepdims=True) + self.norm_eps)
            out = out + t @ w.T
        return out

    def head_states(self, k: int, hidden: np.ndarray, root_emb: Optional[np.ndarray] = None,
                    path_emb: Optional[List[np.ndarray]] = None) -> np.ndarray:
        """Head k's state before its projection; ``root_emb`` ``[rows, H]``: the embeddings of the
        rows' root tokens (needed, and only read, when the heads have a root input); ``path_emb``:
        the embeddings of the path's tokens at depths 1..k (path input only)."""
        x = np.asarray(hidden, dtype=np.float32)
        if self.roots is not None:
            if root_emb is None:
                raise InvalidArgumentError("these heads have a root input: pass the root tokens' embeddings")
            x = x + root_emb @ self.roots[k].T
        if self.paths is not None and k > 0:
            if path_emb is None or len(path_emb) < k:
                raise InvalidArgumentError("these heads have a path input: pass the path tokens' embeddings")
            for j, p in enumerate(self.paths[k]):
                x = x + path_emb[j] @ p.T
        for w, b in self.blocks[k]:
            z = x @ w.T + b
            x = x + z / (1.0 + np.exp(-z))
        return x

    def top_k(self, hidden: np.ndarray, lm_head: np.ndarray, k_top: int,
              root_emb: Optional[np.ndarray] = None, path_emb: Optional[List[np.ndarray]] = None) -> np.ndarray:
        """Each head's k_top candidates (best first) for every row: ``[heads, rows, k_top]``
        (path-input heads: each row's head k given the path ``path_emb[0..k-1]``)."""
        out = np.empty((self.num_heads, hidden.shape[0], k_top), dtype=np.int64)
        for k in range(self.num_heads):
            w = lm_head if self.projections is None else self.projections[k]
            if self.draft_vocab is not None:
                w = w[self.draft_vocab]
            logits = self.head_states(k, hidden, root_emb, path_emb) @ w.T
            part = np.argpartition(-logits, k_top - 1, axis=1)[:, :k_top]
            order = np.argsort(-np.take_along_axis(logits, part, axis=1), axis=1, kind="stable")
            top = np.take_along_axis(part, order, axis=1)
            out[k] = top if self.draft_vocab is None else self.draft_vocab[top]
        return out


def rank_matrix(heads: RuntimeHeads, hidden: np.ndarray, labels: np.ndarray, lm_head: np.ndarray,
                k_top: int = 10, chunk: int = 1024, roots: Optional[np.ndarray] = None,
                embedding: Optional[np.ndarray] = None, record: Optional[np.ndarray] = None,
                taps: Optional[np.ndarray] = None) -> np.ndarray:
    """``ranks[row, k]``: the rank of the row's label among head k's candidates (0 = best), ``k_top``
    when it is not among the first ``k_top`` (or outside the draft vocabulary), -1 where the row has
    no label for head k (past the answer's end). Heads with a root input need the rows' ``roots``
    (token ids) and the base model's ``embedding`` table. Path-input heads read the true path (the
    labels of the heads before them): a rank given that the path so far is right, which is what
    the acceptance of a tree path needs (see :func:`.tree_fit.fit_tree_empirical`). Heads with a
    draft layer read whole answers: ``record`` is each row's answer id (rows of an answer consecutive
    from its row 0). Heads with feature layers need each row's ``taps`` ([rows, T, H])."""
    K = heads.num_heads
    hidden = heads.input_states(hidden, taps)
    if heads.roots is not None and (roots is None or embedding is None):
        raise InvalidArgumentError("these heads have a root input: pass the rows' root tokens and the embedding table")
    if heads.draft is not None:
        if record is None:
            raise InvalidArgumentError("these heads have a draft layer: pass the rows' answer ids (record)")
        hidden = heads.draft.states_by_answer(hidden, embedding[roots], record)
    ranks = np.empty((hidden.shape[0], K), dtype=np.int64)
    for i in range(0, hidden.shape[0], chunk):
        emb = embedding[roots[i:i + chunk]] if heads.roots is not None else None
        lab = labels[i:i + chunk]
        path = None
        if heads.paths is not None:
            path = [np.where((lab[:, j] >= 0)[:, None], embedding[np.maximum(lab[:, j], 0)], 0.0).astype(np.float32)
                    for j in range(K - 1)]
        top = heads.top_k(hidden[i:i + chunk], lm_head, k_top, emb, path)
        for k in range(K):
            hit = top[k] == lab[:, k][:, None]
            r = np.where(hit.any(axis=1), hit.argmax(axis=1), k_top)
            ranks[i:i + chunk, k] = np.where(lab[:, k] >= 0, r, -1)
    return ranks


def table_from_ranks(ranks: np.ndarray, k_top: int = 10) -> np.ndarray:
    """``table[k][r]``: the fraction of rows with a label for head k whose label is head k's rank-r
    candidate (ranks as :func:`rank_matrix` returns them)."""
    table = np.zeros((ranks.shape[1], k_top))
    for k in range(ranks.shape[1]):
        valid = ranks[:, k] >= 0
        r = ranks[valid, k]
        table[k] = np.bincount(r[r < k_top], minlength=k_top)[:k_top] / max(int(valid.sum()), 1)
    return table


def accuracy_table(heads: RuntimeHeads, hidden: np.ndarray, labels: np.ndarray, lm_head: np.ndarray,
                   k_top: int = 10, chunk: int = 1024, roots: Optional[np.ndarray] = None,
                   embedding: Optional[np.ndarray] = None, record: Optional[np.ndarray] = None,
                   taps: Optional[np.ndarray] = None) -> np.ndarray:
    """``table[k][r]``: the fraction of rows (with a label for head k) whose label is head k's
    rank-r candidate (:func:`rank_matrix` summed per head; the same inputs)."""
    return table_from_ranks(rank_matrix(heads, hidden, labels, lm_head, k_top, chunk, roots, embedding, record,
                                        taps), k_top)
