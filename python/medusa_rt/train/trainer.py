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

With ``distill`` > 0 the targets are (partly) soft: head k at position t also learns the base
model's own distribution for token t + 2 + k, i.e. the lm_head applied to the stored hidden state
of position t + 1 + k (self-distillation, over the draft vocabulary when there is one).
``CE_k = (1 - distill) * CE(hard label) + distill * CE(teacher distribution)``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..errors import InvalidArgumentError

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

    def validate(self) -> None:
        if self.num_heads < 1 or self.num_layers < 1:
            raise InvalidArgumentError("num_heads and num_layers must be >= 1")
        if not self.epochs > 0 or not self.lr > 0 or self.batch_size < 1:
            raise InvalidArgumentError("epochs and lr must be > 0 and batch_size >= 1")
        if not 0 < self.decay <= 1 or not 0 <= self.warmup < 1:
            raise InvalidArgumentError("decay must be in (0, 1] and warmup in [0, 1)")
        if not 0 < self.draft_coverage <= 1:
            raise InvalidArgumentError("draft_coverage must be in (0, 1]")
        if not 0 <= self.distill <= 1:
            raise InvalidArgumentError("distill must be in [0, 1]")
        if self.path_input and not self.root_input:
            raise InvalidArgumentError("path_input needs root_input (the path starts at the root)")


class MedusaHeads(torch.nn.Module):
    """K heads of L residual blocks over a frozen (shared) or trainable (own) vocabulary projection;
    with an ``embedding`` table (frozen) the heads have a root input, with ``path_input`` also a
    path input."""

    def __init__(self, lm_head: torch.Tensor, num_heads: int, num_layers: int, shared: bool,
                 embedding: Optional[torch.Tensor] = None, path_input: bool = False) -> None:
        super().__init__()
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
        self.proj = None if shared else torch.nn.ParameterList(
            torch.nn.Parameter(lm_head.clone()) for _ in range(num_heads))

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embeddings of token ids, zero rows for -1 (a path past the answer's end)."""
        return self.embedding[tokens.clamp(min=0)] * (tokens >= 0).unsqueeze(-1).to(self.embedding.dtype)

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
        """Logits ``[K, rows, vocab]``; ``roots`` ``[rows]`` token ids (root input only); ``path``
        ``[rows, >= K - 1]`` the tokens at depths 1.. of the path (path input only: in training the
        true continuation, i.e. the rows' labels, -1 past the end)."""
        z = self.states(h, roots, path)
        if self.shared:
            return (torch.cat(z) @ self.lm_head.T).view(len(z), h.shape[0], -1)
        return torch.stack([x @ p.T for x, p in zip(z, self.proj)])

    def layout_tensors(self) -> Dict[str, np.ndarray]:
        """The heads by their published names (``{h}.{l}.linear.*``, ``{h}.{L}.weight``, and
        ``{h}.root.weight`` for a root input, ``{h}.path.{j}.weight`` for a path input)."""
        t: Dict[str, np.ndarray] = {}
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
        hard = F.cross_entropy(logits[k], y, ignore_index=-1) if (y >= 0).any() else logits.new_zeros(())
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


class Trainer:
    """Trains heads on feature rows with checkpoints in ``work_dir`` (resumable)."""

    def __init__(self, cfg: TrainConfig, lm_head: np.ndarray, work_dir: Path, progress: bool = True,
                 draft_vocab: Optional[np.ndarray] = None, embedding: Optional[np.ndarray] = None) -> None:
        """``draft_vocab`` (shared lm_head only): token ids the heads are trained to rank among
        (the softmax runs over those rows of the lm_head: the same ranking the engine does with
        a draft vocabulary, at a fraction of the cost). ``embedding``: the base model's token
        embedding table, needed with ``cfg.root_input``."""
        cfg.validate()
        if cfg.root_input and embedding is None:
            raise InvalidArgumentError("root_input heads need the base model's embedding table")
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
        self.model = MedusaHeads(torch.from_numpy(proj), cfg.num_heads, cfg.num_layers, cfg.shared_lm_head, emb,
                                 cfg.path_input)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.history: List[Dict[str, float]] = []

    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save({"config": asdict(self.cfg), "step": self.step, "model": self.model.state_dict(),
                    "draft_vocab": None if self.draft_vocab is None else self.draft_vocab.tolist(),
                    "opt": self.opt.state_dict(), "history": self.history}, tmp)
        tmp.replace(self.checkpoint_path)

    def try_resume(self) -> bool:
        """Loads the work dir's checkpoint if there is one; refuses one from different settings."""
        if not self.checkpoint_path.exists():
            return False
        ck = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        mine = asdict(self.cfg)
        theirs = ck["config"]
        keys = ("num_heads", "num_layers", "shared_lm_head", "epochs", "lr", "batch_size", "decay", "warmup", "seed",
                "draft_coverage", "distill", "root_input", "path_input")
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

    def fit(self, hidden: np.ndarray, labels: np.ndarray, roots: Optional[np.ndarray] = None) -> None:
        """Trains on all rows for cfg.epochs (continuing from self.step). The rows of an answer must
        be consecutive positions (as :func:`.data.extract_hidden_states` stores them) when
        cfg.distill > 0: the teacher of head k at a row is the row 1 + k further on. ``roots``
        (the rows' root tokens) is needed with cfg.root_input."""
        cfg = self.cfg
        if cfg.root_input and roots is None:
            raise InvalidArgumentError("root_input training needs the rows' root tokens")
        n = hidden.shape[0]
        if n == 0:
            raise InvalidArgumentError("no training rows")
        per_epoch = max(1, math.ceil(n / cfg.batch_size))
        total = max(1, int(round(cfg.epochs * per_epoch)))
        t0 = time.time()
        start = self.step
        run_loss = None
        run_acc = np.zeros(cfg.num_heads)
        self.model.train()
        while self.step < total:
            epoch, i = divmod(self.step, per_epoch)
            perm = np.random.default_rng(cfg.seed + epoch).permutation(n)
            idx = np.sort(perm[i * cfg.batch_size:(i + 1) * cfg.batch_size])
            h = torch.from_numpy(hidden[idx].astype(np.float32))
            y = torch.from_numpy(_map_labels(labels[idx], self.label_map))
            for g in self.opt.param_groups:
                g["lr"] = lr_at(self.step, total, cfg)
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
                 roots: Optional[np.ndarray] = None) -> Dict[str, object]:
        """Held-out metrics (see :func:`evaluate`), over the draft vocabulary if there is one."""
        self.model.eval()
        return evaluate(self.model, hidden, labels, top_k, label_map=self.label_map,
                        roots=roots if self.cfg.root_input else None)
