"""Medusa-1 head training (torch): the base model is frozen, only the heads learn.

Rows are precomputed final hidden states of the base model (see :mod:`.data`). Head k is
``W (h + SiLU(A_k h + b_k))`` (one or more residual blocks), with W the base model's lm_head
(shared, frozen: the heads file stays a few MB) or its own projection initialised from it. Head k at
a position predicts the token k + 2 ahead; the loss is ``sum_k 0.8^k CE_k``. Blocks start as the
identity (zero weight and bias), so before training every head predicts the next token.

With ``root_input`` each head also reads the token k + 1 ahead of its target, the one the base
model emits at the position (the tree's root, known when the heads run): its blocks start from
``h + R_k e`` instead of ``h``, e that token's input embedding (frozen), R_k trained (from zero).

With ``path_input`` (which needs ``root_input``) the heads are conditioned on their tree path
(Hydra-style): head k also reads the tokens at depths 1..k of the path it extends, the tokens 2 ..
k + 1 ahead of the position (in training the true ones, teacher forcing; at inference the candidates
of the path being drafted, which matter only while that path is the true one):
``x = h + R_k e(root) + sum_j P_kj e(path_j)``, P_kj trained from zero. The tree then holds, for
every node with children, its own candidates (heads format_version 3).

With ``draft_layer`` (which needs ``root_input``) the heads read the hidden states through a
context-attending draft layer first (Hydra++ / EAGLE-style; heads format_version 4): a causal
transformer layer over the answer so far, ``u_t = h_t + R e(root_t)``, then attention (the base
model's head count, head size and RoPE) and a SwiGLU MLP, each pre-normed and residual, give
``z_t``, which the heads read in place of ``h_t``. Its keys and values at a position need only that
position's hidden state and root token, so at inference a per-sequence cache of the committed
positions serves it (the draft KV cache). Positions count from the prompt's last token (row 0 of
an answer), as in the engine. Training then takes whole answers per step.

With ``distill`` > 0 the targets are (partly) soft: head k at position t also learns the base
model's own distribution for token t + 2 + k, i.e. the lm_head applied to the stored hidden state
of position t + 1 + k (self-distillation, over the draft vocabulary when there is one).
``CE_k = (1 - distill) * CE(hard label) + distill * CE(teacher distribution)``.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import InvalidArgumentError
from .heads_np import answer_spans, draft_shape

try:
    import torch
    import torch.nn.functional as F
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("medusa_rt.train needs torch: pip install 'medusa_rt[train]'") from exc


@dataclass
class TrainConfig:
    """Hyper-parameters of a head-training run (recorded in checkpoints and the heads file)."""

    num_heads: int = 4
    num_layers: int = 1
    shared_lm_head: bool = True
    epochs: float = 2.0
    lr: float = 1e-3
    batch_size: int = 256
    weight_decay: float = 0.0
    decay: float = 0.8          # loss weight of head k is decay**k
    warmup: float = 0.05        # fraction of steps with a linear warm-up, then cosine to zero
    seed: int = 0
    checkpoint_every: int = 200
    threads: int = 0
    draft_coverage: float = 0.995  # shared lm_head: train and rank over the draft vocabulary (1: all)
    distill: float = 0.0        # weight of the base model's distribution as soft target (0: hard labels)
    root_input: bool = False    # heads also read the embedding of the root token (format_version 2)
    path_input: bool = False    # ... and of their tree path's tokens (format_version 3; needs root_input)
    draft_layer: bool = False   # a context-attending draft layer before the heads (format_version 4)
    draft_intermediate: int = 1536  # the draft layer's MLP width
    feature_layers: Tuple[int, ...] = ()  # base-model layers fused into the heads' input (format_version 5)

    def validate(self) -> None:
        if self.num_heads < 1 or self.num_layers < 1:
            raise InvalidArgumentError("num_heads and num_layers must be >= 1")
        if not self.epochs > 0 or not self.lr > 0 or self.batch_size < 1:
            raise InvalidArgumentError("epochs and lr must be > 0 and batch_size >= 1")
        if not self.weight_decay >= 0:
            raise InvalidArgumentError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.decay <= 1 or not 0 <= self.warmup < 1:
            raise InvalidArgumentError("decay must be in (0, 1] and warmup in [0, 1)")
        if not 0 < self.draft_coverage <= 1:
            raise InvalidArgumentError("draft_coverage must be in (0, 1]")
        if not 0 <= self.distill <= 1:
            raise InvalidArgumentError("distill must be in [0, 1]")
        if self.path_input and not self.root_input:
            raise InvalidArgumentError("path_input needs root_input (the path starts at the root)")
        if self.draft_layer and not self.root_input:
            raise InvalidArgumentError("draft_layer needs root_input (its keys read each position's root token)")
        if self.draft_intermediate < 1:
            raise InvalidArgumentError("draft_intermediate must be >= 1")
        self.feature_layers = tuple(int(x) for x in self.feature_layers)
        layers = list(self.feature_layers)
        if layers and (not self.root_input or self.draft_layer):
            raise InvalidArgumentError("feature_layers need root_input and no draft_layer")
        if len(layers) > 8 or len(set(layers)) != len(layers) or any(int(x) < 1 for x in layers):
            raise InvalidArgumentError(f"feature_layers must be at most 8 distinct decoder layers >= 1, got {layers}")


@dataclass
class DraftShape:
    """What the draft layer takes from the base model: its attention head count and size, RoPE base
    and RMSNorm epsilon (config.json of a runtime model directory)."""

    heads: int
    head_dim: int
    rope_theta: float
    eps: float

    @staticmethod
    def from_config(cfg: Dict[str, object]) -> "DraftShape":
        return DraftShape(*draft_shape(cfg))


def rope_tables(positions: int, head_dim: int, theta: float) -> tuple:
    """cos, sin ``[positions, head_dim / 2]`` (the engine's rotate-half RoPE, fp32)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.arange(positions, dtype=torch.float64)[:, None] * inv[None]
    return ang.cos().float(), ang.sin().float()


class DraftLayer(torch.nn.Module):
    """The context-attending draft layer (see the module docstring): ``u = h + R e(root)``,
    ``u += O attn(RoPE(Q, K), V)(norm1(u))`` causally over the answer, ``u += D (silu(G) * U)(norm2(u))``.
    R, O and D start at zero, so before training it passes the hidden states through."""

    def __init__(self, hidden: int, shape: DraftShape, intermediate: int) -> None:
        super().__init__()
        if shape.heads * shape.head_dim != hidden:
            raise InvalidArgumentError(f"the draft layer needs heads x head_dim == hidden_size "
                                       f"({shape.heads} x {shape.head_dim} != {hidden})")
        self.shape, self.intermediate = shape, intermediate
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
        self.root, self.qkv, self.o = lin(hidden, hidden), lin(hidden, 3 * hidden), lin(hidden, hidden)
        self.gate_up, self.down = lin(hidden, 2 * intermediate), lin(intermediate, hidden)
        self.norm1 = torch.nn.Parameter(torch.ones(hidden))
        self.norm2 = torch.nn.Parameter(torch.ones(hidden))
        for m in (self.root, self.o, self.down):
            torch.nn.init.zeros_(m.weight)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.shape.eps) * w

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    def forward(self, h: torch.Tensor, root_emb: torch.Tensor) -> torch.Tensor:
        """``h`` ``[B, T, H]`` hidden states of B answers from their row 0 (padding after an answer's
        end does not reach its rows: attention is causal), ``root_emb`` ``[B, T, H]`` the embeddings of
        the rows' root tokens. Returns the states the heads read, ``[B, T, H]``."""
        B, T, H = h.shape
        nh, hd = self.shape.heads, self.shape.head_dim
        cos, sin = rope_tables(T, hd, self.shape.rope_theta)
        x = h + self.root(root_emb)
        q, k, v = self.qkv(self._norm(x, self.norm1)).view(B, T, 3, nh, hd).unbind(2)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, H))
        g, u = self.gate_up(self._norm(x, self.norm2)).chunk(2, -1)
        return x + self.down(F.silu(g) * u)

    def layout_tensors(self) -> Dict[str, np.ndarray]:
        """By published name (``draft.{root,qkv,o,gate_up,down,norm1,norm2}.weight``)."""
        t = {f"draft.{n}.weight": getattr(self, n).weight for n in ("root", "qkv", "o", "gate_up", "down")}
        t.update({"draft.norm1.weight": self.norm1, "draft.norm2.weight": self.norm2})
        return {k: v.detach().float().numpy().copy() for k, v in t.items()}


class MedusaHeads(torch.nn.Module):
    """K heads of L residual blocks over a frozen (shared) or trainable (own) vocabulary projection;
    with an ``embedding`` table (frozen) the heads have a root input, with ``path_input`` also a
    path input."""

    def __init__(self, lm_head: torch.Tensor, num_heads: int, num_layers: int, shared: bool,
                 embedding: Optional[torch.Tensor] = None, path_input: bool = False,
                 draft: Optional[DraftLayer] = None, num_features: int = 0, norm_eps: float = 1e-5) -> None:
        super().__init__()
        if draft is not None and embedding is None:
            raise InvalidArgumentError("a draft layer needs the embedding table (root input)")
        self.draft = draft
        vocab, hidden = lm_head.shape
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(num_layers)) for _ in range(num_heads))
        for head in self.blocks:
            for lin in head:
                torch.nn.init.zeros_(lin.weight)
                torch.nn.init.zeros_(lin.bias)
        self.shared = shared
        self.register_buffer("lm_head", lm_head, persistent=False)
        self.root = None
        if embedding is not None:
            self.register_buffer("embedding", embedding, persistent=False)
            self.root = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(num_heads))
            for lin in self.root:
                torch.nn.init.zeros_(lin.weight)
        self.path = None
        if path_input:
            if embedding is None:
                raise InvalidArgumentError("path_input heads need the embedding table")
            # path[k][j - 1]: P_kj for the token at depth j = 1..k of head k's path
            self.path = torch.nn.ModuleList(
                torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(k))
                for k in range(num_heads))
            for head in self.path:
                for lin in head:
                    torch.nn.init.zeros_(lin.weight)
        # F_j for the feature layers (format_version 5): the heads read h + sum_j F_j rmsnorm(tap_j).
        self.fuse = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden, bias=False) for _ in range(num_features))
        for lin in self.fuse:
            torch.nn.init.zeros_(lin.weight)
        self.norm_eps = norm_eps
        self.proj = None if shared else torch.nn.ParameterList(
            torch.nn.Parameter(lm_head.clone()) for _ in range(num_heads))

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings of token ids, zero rows for -1 (a path past the answer's end)."""
        return self.embedding[tokens.clamp(min=0)] * (tokens >= 0).unsqueeze(-1).to(self.embedding.dtype)

    def fuse_input(self, h: torch.Tensor, taps: Optional[torch.Tensor]) -> torch.Tensor:
        """What the heads read with feature layers: ``h + sum_j F_j rmsnorm(taps[:, j])`` (``taps``
        ``[rows, T, H]``, the residual stream after each feature layer; an RMS norm without weight,
        as the engine does); ``h`` itself without them."""
        if not len(self.fuse):
            return h
        if taps is None or taps.shape[1] != len(self.fuse):
            raise InvalidArgumentError(f"these heads read {len(self.fuse)} feature layers: pass taps [rows, "
                                       f"{len(self.fuse)}, H]")
        x = taps * torch.rsqrt(taps.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        for j, lin in enumerate(self.fuse):
            h = h + lin(x[:, j])
        return h

    def contextualize(self, h: torch.Tensor, roots: torch.Tensor) -> torch.Tensor:
        """The draft layer over B padded answers (``h`` ``[B, T, H]``, ``roots`` ``[B, T]``, padding
        roots any valid id); ``h`` itself without a draft layer."""
        return h if self.draft is None else self.draft(h, self.embedding[roots])

    def states(self, h: torch.Tensor, roots: Optional[torch.Tensor] = None,
               path: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        if self.root is not None and roots is None:
            raise InvalidArgumentError("these heads have a root input: pass the rows' root tokens")
        if self.path is not None and (path is None or path.shape[1] < len(self.blocks) - 1):
            raise InvalidArgumentError("these heads have a path input: pass the rows' path tokens [rows, K - 1]")
        e = self.embedding[roots] if self.root is not None else None
        pe = [self._embed(path[:, j]) for j in range(len(self.blocks) - 1)] if self.path is not None else []
        out = []
        for k, head in enumerate(self.blocks):
            x = h if e is None else h + self.root[k](e)
            if self.path is not None:
                for j, lin in enumerate(self.path[k]):
                    x = x + lin(pe[j])
            for lin in head:
                x = x + F.silu(lin(x))
            out.append(x)
        return out

    def forward(self, h: torch.Tensor, roots: Optional[torch.Tensor] = None,
                path: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[K, rows, vocab]`` of the heads on ``h`` (with a draft layer: its output, see
        :meth:`contextualize`); ``roots`` ``[rows]`` token ids (root input only); ``path``
        ``[rows, >= K - 1]`` the tokens at depths 1.. of the path (path input only: in training the
        true continuation, i.e. the rows' labels, -1 past the end)."""
        z = self.states(h, roots, path)
        if self.shared:
            return (torch.cat(z) @ self.lm_head.T).view(len(z), h.shape[0], -1)
        return torch.stack([x @ p.T for x, p in zip(z, self.proj)])

    def layout_tensors(self) -> Dict[str, np.ndarray]:
        """The heads by their published names (``{h}.{l}.linear.*``, ``{h}.{L}.weight``, and
        ``{h}.root.weight`` for a root input, ``{h}.path.{j}.weight`` for a path input, ``draft.*`` for a
        draft layer)."""
        t: Dict[str, np.ndarray] = {} if self.draft is None else self.draft.layout_tensors()
        for j, lin in enumerate(self.fuse):
            t[f"fuse.{j}.weight"] = lin.weight.detach().float().numpy().copy()
        for k, head in enumerate(self.blocks):
            if self.root is not None:
                t[f"{k}.root.weight"] = self.root[k].weight.detach().float().numpy().copy()
            if self.path is not None:
                for j, lin in enumerate(self.path[k]):
                    t[f"{k}.path.{j + 1}.weight"] = lin.weight.detach().float().numpy().copy()
            for l, lin in enumerate(head):
                t[f"{k}.{l}.linear.weight"] = lin.weight.detach().float().numpy().copy()
                t[f"{k}.{l}.linear.bias"] = lin.bias.detach().float().numpy().copy()
            if self.proj is not None:
                t[f"{k}.{len(head)}.weight"] = self.proj[k].detach().float().numpy().copy()
        return t


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warm = int(total * cfg.warmup)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def head_loss(logits: torch.Tensor, labels: torch.Tensor, decay: float, teacher: Optional[torch.Tensor] = None,
              distill: float = 0.0, valid: Optional[torch.Tensor] = None) -> tuple:
    """Weighted sum of the heads' cross-entropies (rows without a label ignored), and per-head losses.

    ``teacher`` ``[K, rows, vocab]``: the base model's probabilities for each head's token, mixed in
    with weight ``distill`` on the rows where ``valid[:, k]`` (the token exists in the answer)."""
    per = []
    for k in range(logits.shape[0]):
        y = labels[:, k]
        # No label for this head in the batch (e.g. whole answers shorter than k + 2 tokens): a zero
        # that keeps the graph, so that a batch without any label still backpropagates (nothing).
        hard = F.cross_entropy(logits[k], y, ignore_index=-1) if (y >= 0).any() else logits[k].sum() * 0.0
        if teacher is not None and distill > 0 and valid is not None and bool(valid[:, k].any()):
            m = valid[:, k]
            soft = F.cross_entropy(logits[k][m], teacher[k][m])
            hard = (1 - distill) * hard + distill * soft
        per.append(hard)
    total = sum((decay ** k) * l for k, l in enumerate(per))
    return total, [float(l.detach()) for l in per]


def _rows(roots: Optional[np.ndarray], idx) -> Optional[torch.Tensor]:
    return None if roots is None else torch.from_numpy(np.asarray(roots[idx], dtype=np.int64))


def _path(model: "MedusaHeads", raw_labels: np.ndarray) -> Optional[torch.Tensor]:
    """The path tokens of path-input heads in training and evaluation: the true continuation."""
    return None if model.path is None else torch.from_numpy(raw_labels.astype(np.int64))


def _map_labels(labels: np.ndarray, label_map: Optional[np.ndarray]) -> np.ndarray:
    """Labels as indices of the heads' vocabulary (-1: none, or outside a draft vocabulary)."""
    lab = labels.astype(np.int64)
    if label_map is None:
        return lab
    return np.where(lab >= 0, label_map[np.maximum(lab, 0)], -1)


@torch.no_grad()
def evaluate(model: MedusaHeads, hidden: np.ndarray, labels: np.ndarray, top_k: int = 10,
             batch: int = 1024, label_map: Optional[np.ndarray] = None,
             roots: Optional[np.ndarray] = None) -> Dict[str, object]:
    """Per-head loss, top-1 / top-5 accuracy and the rank table ``table[k][r]`` on held-out rows.
    ``label_map`` (token id -> index in the model's vocabulary, -1 outside it) is given when the
    heads rank a draft vocabulary: a label outside it counts as a miss (and not in the loss).
    ``roots``: the rows' root tokens (heads with a root input). Path-input heads are evaluated
    with the true path (teacher forcing): the accuracy of a head given that the path so far is
    right, which is what a tree's acceptance needs."""
    K = len(model.blocks)
    hits = np.zeros((K, top_k), dtype=np.int64)
    count = np.zeros(K, dtype=np.int64)
    loss_sum = np.zeros(K)
    for i in range(0, hidden.shape[0], batch):
        h = torch.from_numpy(hidden[i:i + batch].astype(np.float32))
        lab = labels[i:i + batch]
        y = torch.from_numpy(_map_labels(lab, label_map))
        logits = model(h, _rows(roots, slice(i, i + batch)), _path(model, lab))
        top = logits.topk(top_k, dim=-1).indices
        for k in range(K):
            valid = torch.from_numpy(lab[:, k] >= 0)
            n = int(valid.sum())
            if n == 0:
                continue
            count[k] += n
            inside = y[:, k] >= 0
            if bool(inside.any()):
                loss_sum[k] += float(F.cross_entropy(logits[k][inside], y[inside, k], reduction="sum"))
            hits[k] += (top[k][valid] == y[valid, k][:, None]).sum(0).numpy()
    denom = np.maximum(count, 1)
    table = hits / denom[:, None]
    return {
        "rows": count.tolist(),
        "loss": (loss_sum / denom).tolist(),
        "top1": table[:, 0].tolist(),
        "top5": table[:, :5].sum(1).tolist(),
        "table": table.tolist(),
    }


def rows_fingerprint(labels: np.ndarray, roots: Optional[np.ndarray] = None,
                     record: Optional[np.ndarray] = None) -> str:
    """A fingerprint of training rows (their labels, root tokens and answer ids, in order): a
    checkpoint resumes only on the rows it was trained on. The hidden states themselves are not
    hashed (gigabytes); the labels of other answers, another split or another order differ."""
    h = hashlib.blake2b(digest_size=16)
    for a in (labels, roots, record):
        if a is not None:
            a = np.ascontiguousarray(a, dtype=np.int64)
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        h.update(b"|")
    return h.hexdigest()


class Trainer:
    """Trains heads on feature rows with checkpoints in ``work_dir`` (resumable)."""

    def __init__(self, cfg: TrainConfig, lm_head: np.ndarray, work_dir: Path, progress: bool = True,
                 draft_vocab: Optional[np.ndarray] = None, embedding: Optional[np.ndarray] = None,
                 draft_shape: Optional[DraftShape] = None, norm_eps: float = 1e-5) -> None:
        """``draft_vocab`` (shared lm_head only): token ids the heads are trained to rank among
        (the softmax runs over those rows of the lm_head: the same ranking the engine does with
        a draft vocabulary, at a fraction of the cost). ``embedding``: the base model's token
        embedding table, needed with ``cfg.root_input``. ``draft_shape``: the base model's
        attention shape (:meth:`DraftShape.from_config`), needed with ``cfg.draft_layer``.
        ``norm_eps``: the base model's RMSNorm epsilon (the feature layers' normalisation)."""
        cfg.validate()
        if cfg.root_input and embedding is None:
            raise InvalidArgumentError("root_input heads need the base model's embedding table")
        if cfg.draft_layer and draft_shape is None:
            raise InvalidArgumentError("draft_layer training needs the base model's attention shape (draft_shape)")
        self.cfg, self.work_dir, self.progress = cfg, Path(work_dir), progress
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.draft_vocab = None if draft_vocab is None else np.asarray(draft_vocab, dtype=np.int64)
        self.label_map: Optional[np.ndarray] = None
        proj = np.array(lm_head, dtype=np.float32)
        if self.draft_vocab is not None:
            if not cfg.shared_lm_head:
                raise InvalidArgumentError("a draft vocabulary needs the shared lm_head layout")
            self.label_map = np.full(proj.shape[0], -1, dtype=np.int64)
            self.label_map[self.draft_vocab] = np.arange(self.draft_vocab.size)
            proj = np.ascontiguousarray(proj[self.draft_vocab])
        emb = torch.from_numpy(np.array(embedding, dtype=np.float32)) if cfg.root_input else None
        draft = DraftLayer(proj.shape[1], draft_shape, cfg.draft_intermediate) if cfg.draft_layer else None
        self.model = MedusaHeads(torch.from_numpy(proj), cfg.num_heads, cfg.num_layers, cfg.shared_lm_head, emb,
                                 cfg.path_input, draft, len(cfg.feature_layers), norm_eps)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.history: List[Dict[str, float]] = []
        self.data_fingerprint: Optional[str] = None  # of the rows fit() trains on (kept in checkpoints)
        self._resumed_data: Optional[str] = None  # the resumed checkpoint's, "" if it has none

    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save({"config": asdict(self.cfg), "step": self.step, "model": self.model.state_dict(),
                    "draft_vocab": None if self.draft_vocab is None else self.draft_vocab.tolist(),
                    "opt": self.opt.state_dict(), "history": self.history, "data": self.data_fingerprint}, tmp)
        tmp.replace(self.checkpoint_path)

    def try_resume(self) -> bool:
        """Loads the work dir's checkpoint if there is one; refuses one from different settings."""
        if not self.checkpoint_path.exists():
            return False
        ck = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        mine = asdict(self.cfg)
        theirs = ck["config"]
        keys = ("num_heads", "num_layers", "shared_lm_head", "epochs", "lr", "batch_size", "decay", "warmup", "seed",
                "draft_coverage", "distill", "root_input", "path_input", "draft_layer", "draft_intermediate",
                "feature_layers")
        diff = [k for k in keys if mine[k] != theirs.get(k, TrainConfig.__dataclass_fields__[k].default)]
        mine_vocab = None if self.draft_vocab is None else self.draft_vocab.tolist()
        if ck.get("draft_vocab") != mine_vocab:
            diff.append("draft vocabulary")
        if diff:
            raise InvalidArgumentError(
                f"{self.checkpoint_path} was made with different settings ({', '.join(diff)}); "
                "use another work directory or remove the checkpoint")
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["opt"])
        self.step = int(ck["step"])
        self.history = list(ck.get("history", []))
        self._resumed_data = ck.get("data") or ""
        return True

    @torch.no_grad()
    def _teacher(self, hidden: np.ndarray, idx: np.ndarray, raw_labels: np.ndarray) -> tuple:
        """The base model's distribution over the heads' vocabulary for each head's token:
        softmax(lm_head . hidden[t + 1 + k]). Row t + 1 + k belongs to the same answer exactly where
        the head has a label (``raw_labels`` >= 0, before any draft-vocabulary mapping).
        Returns ([K, rows, vocab] probabilities, [rows, K] valid)."""
        K = self.cfg.num_heads
        rows = np.minimum(idx[None, :] + 1 + np.arange(K)[:, None], hidden.shape[0] - 1)
        h = torch.from_numpy(hidden[rows.ravel()].astype(np.float32))
        teacher = torch.softmax(h @ self.model.lm_head.T, -1).view(K, idx.size, -1)
        return teacher, torch.from_numpy(raw_labels >= 0)

    def _context(self, hidden: np.ndarray, roots: np.ndarray, spans: np.ndarray) -> torch.Tensor:
        """The draft layer's output for the answers ``spans`` (rows [start, end) each), as rows in
        the order of the spans' rows."""
        lens = spans[:, 1] - spans[:, 0]
        T = int(lens.max())
        h = np.zeros((len(spans), T, hidden.shape[1]), dtype=np.float32)
        r = np.zeros((len(spans), T), dtype=np.int64)
        for i, (a, b) in enumerate(spans):
            h[i, :b - a] = hidden[a:b]
            r[i, :b - a] = roots[a:b]
        mask = torch.from_numpy(np.arange(T)[None, :] < lens[:, None])
        return self.model.contextualize(torch.from_numpy(h), torch.from_numpy(r))[mask]

    @torch.no_grad()
    def draft_states(self, hidden: np.ndarray, roots: np.ndarray, record: np.ndarray,
                     answers_per_batch: int = 16) -> np.ndarray:
        """What the heads read for every row: the draft layer's output over each answer (rows of an
        answer consecutive, ``record`` its id per row); ``hidden`` itself without a draft layer."""
        if self.model.draft is None:
            return hidden
        self.model.eval()
        spans = answer_spans(record)
        out = np.empty((hidden.shape[0], hidden.shape[1]), dtype=np.float32)
        for i in range(0, len(spans), answers_per_batch):
            sp = spans[i:i + answers_per_batch]
            out[sp[0, 0]:sp[-1, 1]] = self._context(hidden, roots, sp).numpy()
        return out

    def _taps_needed(self, taps: Optional[np.ndarray], rows: int) -> None:
        T = len(self.cfg.feature_layers)
        if T and (taps is None or taps.shape[:2] != (rows, T)):
            raise InvalidArgumentError(f"heads with feature layers {list(self.cfg.feature_layers)} need each row's "
                                       f"taps [rows, {T}, H] (extract the features with those layers)")

    @torch.no_grad()
    def input_states(self, hidden: np.ndarray, taps: Optional[np.ndarray], chunk: int = 4096) -> np.ndarray:
        """What the heads read for every row with feature layers (``hidden`` fused with ``taps``, see
        :meth:`MedusaHeads.fuse_input`); ``hidden`` itself without them."""
        if not self.cfg.feature_layers:
            return hidden
        self._taps_needed(taps, hidden.shape[0])
        out = np.empty(hidden.shape, dtype=np.float32)
        for a in range(0, hidden.shape[0], chunk):
            h = torch.from_numpy(hidden[a:a + chunk].astype(np.float32))
            out[a:a + chunk] = self.model.fuse_input(h, torch.from_numpy(taps[a:a + chunk].astype(np.float32))).numpy()
        return out

    def fit(self, hidden: np.ndarray, labels: np.ndarray, roots: Optional[np.ndarray] = None,
            record: Optional[np.ndarray] = None, taps: Optional[np.ndarray] = None) -> None:
        """Trains on all rows for cfg.epochs (continuing from self.step). The rows of an answer must
        be consecutive positions (as :func:`.data.extract_hidden_states` stores them) when
        cfg.distill > 0: the teacher of head k at a row is the row 1 + k further on. ``roots``
        (the rows' root tokens) is needed with cfg.root_input. With cfg.draft_layer each step takes
        whole answers (``record``: the answer id of each row, rows of an answer consecutive from its
        row 0), about cfg.batch_size rows. ``taps`` ([rows, T, H]) is needed with cfg.feature_layers."""
        cfg = self.cfg
        self._taps_needed(taps, hidden.shape[0])
        if cfg.root_input and roots is None:
            raise InvalidArgumentError("root_input training needs the rows' root tokens")
        if cfg.draft_layer and (record is None or len(record) != hidden.shape[0]):
            raise InvalidArgumentError("draft_layer training needs each row's answer id (record)")
        n = hidden.shape[0]
        if n == 0:
            raise InvalidArgumentError("no training rows")
        self.data_fingerprint = rows_fingerprint(labels, roots, record)
        if self._resumed_data is not None and self._resumed_data != self.data_fingerprint:
            raise InvalidArgumentError(
                f"{self.checkpoint_path} was trained on other rows ({n} now: other answers, another split or "
                "a different order); use another work directory or remove the checkpoint")
        spans = answer_spans(record) if cfg.draft_layer else None
        units = n if spans is None else len(spans)  # what an epoch permutes: rows, or answers
        per_step = cfg.batch_size if spans is None else max(1, round(cfg.batch_size * len(spans) / n))
        per_epoch = max(1, math.ceil(units / per_step))
        total = max(1, int(round(cfg.epochs * per_epoch)))
        t0 = time.time()
        start = self.step
        run_loss = None
        run_acc = np.zeros(cfg.num_heads)
        self.model.train()
        while self.step < total:
            epoch, i = divmod(self.step, per_epoch)
            perm = np.random.default_rng(cfg.seed + epoch).permutation(units)
            chosen = np.sort(perm[i * per_step:(i + 1) * per_step])
            for g in self.opt.param_groups:
                g["lr"] = lr_at(self.step, total, cfg)
            if spans is None:
                idx = chosen
                h = torch.from_numpy(hidden[idx].astype(np.float32))
                if cfg.feature_layers:
                    h = self.model.fuse_input(h, torch.from_numpy(taps[idx].astype(np.float32)))
            else:
                sp = spans[chosen]
                idx = np.concatenate([np.arange(a, b) for a, b in sp])
                h = self._context(hidden, roots, sp)
            y = torch.from_numpy(_map_labels(labels[idx], self.label_map))
            logits = self.model(h, _rows(roots, idx) if cfg.root_input else None, _path(self.model, labels[idx]))
            teacher = valid = None
            if cfg.distill > 0:
                teacher, valid = self._teacher(hidden, idx, labels[idx])
            loss, per = head_loss(logits, y, cfg.decay, teacher, cfg.distill, valid)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            with torch.no_grad():
                pred = logits.argmax(-1)
                acc = [float(((pred[k] == y[:, k]) & (y[:, k] >= 0)).sum() / max(1, int((y[:, k] >= 0).sum())))
                       for k in range(cfg.num_heads)]
            lval = float(loss.detach())
            run_loss = lval if run_loss is None else 0.95 * run_loss + 0.05 * lval
            run_acc = np.array(acc) if self.step == start else 0.95 * run_acc + 0.05 * np.array(acc)
            self.step += 1
            if self.step % 50 == 0 or self.step == total:
                self.history.append({"step": self.step, "loss": run_loss, **{f"top1_{k}": float(a)
                                                                            for k, a in enumerate(run_acc)}})
            if self.progress and (self.step % 10 == 0 or self.step == total):
                rate = (self.step - start) / max(time.time() - t0, 1e-9)
                eta = (total - self.step) / max(rate, 1e-9)
                accs = " ".join(f"{a:.2f}" for a in run_acc)
                sys.stderr.write(f"\r[medusa_rt] training: step {self.step}/{total} epoch {epoch + 1} "
                                 f"loss {run_loss:.3f} top1/head {accs} ({rate:.2f} steps/s, ETA {eta:.0f} s)   ")
                sys.stderr.flush()
            if self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        self.save_checkpoint()
        if self.progress:
            sys.stderr.write(f"\n[medusa_rt] training done: {total} steps, {time.time() - t0:.0f} s this run\n")
        self.model.eval()

    def evaluate(self, hidden: np.ndarray, labels: np.ndarray, top_k: int = 10,
                 roots: Optional[np.ndarray] = None, record: Optional[np.ndarray] = None,
                 taps: Optional[np.ndarray] = None) -> Dict[str, object]:
        """Held-out metrics (see :func:`evaluate`), over the draft vocabulary if there is one; with a
        draft layer the rows are whole answers (``record`` as in :meth:`fit`); with feature layers
        each row needs its ``taps``."""
        hidden = self.input_states(hidden, taps)
        if self.cfg.draft_layer:
            if record is None or len(record) != hidden.shape[0]:
                raise InvalidArgumentError("heads with a draft layer are evaluated on whole answers: pass record")
            hidden = self.draft_states(hidden, roots, record)
        self.model.eval()
        return evaluate(self.model, hidden, labels, top_k, label_map=self.label_map,
                        roots=roots if self.cfg.root_input else None)
