"""Self-distillation data: the base model answers the training prompts through the engine.

Stage 1 (:func:`generate_answers`) writes ``answers.jsonl`` (one record per prompt: category,
prompt, prompt token ids, the model's greedy answer's token ids), appended as requests finish, so an
interrupted run resumes where it stopped. Stage 2 (:func:`extract_hidden_states`) runs every
prompt + answer through the engine once more and stores the final hidden states that the heads
read at inference (the engine's own numerics, so training sees exactly what the heads will see),
with the answer tokens the heads must predict.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError

ANSWERS = "answers.jsonl"
FEATURES = "features.npz"


def read_answers(path: Path) -> List[dict]:
    """Records of an answers file; a torn last line (an interrupted write) is ignored."""
    out: List[dict] = []
    if not path.exists():
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def rewrite_records(path: Path, records: Sequence[dict]) -> None:
    """Rewrites a JSON-lines file with the records read from it, dropping a torn last line so that
    appends stay line-aligned. Atomic: an interruption leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def generate_answers(engine, prompts: Sequence[Tuple[str, str]], out_dir: Path, *, max_new_tokens: int = 256,
                     chunk: int = 64, progress: bool = True) -> Path:
    """Answers every (category, prompt) with the engine (greedy, chat template, batched over the
    engine's slots) into ``out_dir/answers.jsonl``. Prompts already answered there are skipped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ANSWERS
    records = read_answers(path)
    rewrite_records(path, records)
    done = {r["prompt"] for r in records}
    todo = [(c, p) for c, p in prompts if p not in done]
    tok = engine.tokenizer
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="[medusa_rt] answering prompts",
               unit="prompt", disable=not progress, file=sys.stderr)
    new_tokens = 0
    t0 = time.time()
    with open(path, "a") as f:
        for i in range(0, len(todo), chunk):
            part = todo[i:i + chunk]
            ids = [tok.encode(tok.apply_chat_template(p), add_special_tokens=False) for _, p in part]
            results = engine.generate_batch(ids, max_new_tokens=max_new_tokens, medusa=False)
            for (cat, p), pid, res in zip(part, ids, results):
                f.write(json.dumps({"category": cat, "prompt": p, "prompt_ids": pid, "answer_ids": res.tokens}) + "\n")
                new_tokens += len(res.tokens)
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(part))
            bar.set_postfix_str(f"{new_tokens / max(time.time() - t0, 1e-9):.0f} tok/s")
    bar.close()
    return path


@dataclass
class Features:
    """Training rows: ``hidden[i]`` is the final hidden state at a position whose next token
    starts or continues an answer; ``labels[i, k]`` the token head k must predict there (the one
    k + 2 positions ahead), -1 past the answer's end; ``record[i]`` the answer it came from;
    ``roots[i]`` the token that follows the position (the one the base model emitted there: what
    heads with a root input read besides the hidden state). ``keys[j]`` fingerprints record j (its
    prompt and answer tokens), so that a later run over a grown or reordered set of answers
    reuses the rows it already has. ``taps[i, j]`` (heads with feature layers) is the base
    model's residual stream after decoder layer ``tap_layers[j]`` at the same position."""

    hidden: np.ndarray  # [N, H] float16
    labels: np.ndarray  # [N, K] int32
    record: np.ndarray  # [N] int32
    keys: Optional[np.ndarray] = None  # [R] uint64
    roots: Optional[np.ndarray] = None  # [N] int32
    taps: Optional[np.ndarray] = None  # [N, T, H] float16
    tap_layers: Optional[np.ndarray] = None  # [T] int32

    _OPTIONAL = ("keys", "roots", "taps", "tap_layers")

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp.npz")
        arrays = dict(hidden=self.hidden, labels=self.labels, record=self.record)
        for name in self._OPTIONAL:
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @staticmethod
    def load(path: Path) -> "Features":
        with np.load(path) as z:
            opt = {n: z[n] if n in z.files else None for n in Features._OPTIONAL}
            return Features(z["hidden"], z["labels"], z["record"], **opt)

    @property
    def layers(self) -> Tuple[int, ...]:
        """The decoder layers of ``taps`` (empty without taps)."""
        return () if self.tap_layers is None else tuple(int(x) for x in self.tap_layers)


def record_key(record: dict) -> int:
    """A 64-bit fingerprint of one answer record's prompt and answer token ids."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray(record["prompt_ids"], dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(record["answer_ids"], dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


def head_labels(answer: Sequence[int], num_heads: int) -> np.ndarray:
    """Labels for the rows of one answer of n tokens: row j is the position of token j - 1 of the
    answer (j = 0: the prompt's last token), whose head k predicts answer token j + 1 + k."""
    n = len(answer)
    a = np.asarray(answer, dtype=np.int32)
    out = np.full((n, num_heads), -1, dtype=np.int32)
    for k in range(num_heads):
        m = n - (1 + k)
        if m > 0:
            out[:m, k] = a[1 + k:]
    return out


def _reusable_rows(path: Path, num_heads: int, hidden_size: int,
                   layers: Tuple[int, ...]) -> Dict[int, Tuple[np.ndarray, Optional[np.ndarray]]]:
    """(hidden, taps) row blocks of an earlier features file by record fingerprint (empty when there
    is none, it predates fingerprints, or it was made for another number of heads, hidden size or
    set of tap layers)."""
    if not path.exists():
        return {}
    old = Features.load(path)
    if (old.keys is None or old.labels.shape[1] != num_heads or old.hidden.shape[1] != hidden_size
            or old.layers != tuple(layers)):
        return {}
    # Rows of one record are consecutive (see extract_hidden_states).
    starts = np.flatnonzero(np.r_[True, old.record[1:] != old.record[:-1]])
    ends = np.r_[starts[1:], old.record.size]
    return {int(old.keys[old.record[a]]): (old.hidden[a:b], None if old.taps is None else old.taps[a:b])
            for a, b in zip(starts, ends)}


def extract_hidden_states(engine, records: Sequence[dict], num_heads: int, out_path: Path, *,
                          layers: Sequence[int] = (), progress: bool = True, save_every_s: float = 600.0) -> Features:
    """Final hidden states of every prompt + answer (rows from the prompt's last token on) and the
    heads' labels, stored in ``out_path``; with ``layers``, also the residual stream after those
    decoder layers (``taps``, for heads with feature layers). Answers already there (same prompt
    and answer tokens, same layers) are reused, whatever their order, so a grown answer set costs
    only its new answers; the file is also saved every ``save_every_s`` seconds, so an interrupted
    run resumes."""
    H = engine.info.hidden_size
    layers = tuple(int(x) for x in layers)
    T = len(layers)
    keys = np.array([record_key(r) for r in records], dtype=np.uint64)
    known = _reusable_rows(out_path, num_heads, H, layers)
    total = sum(len(r["answer_ids"]) for r in records)
    hidden = np.empty((total, H), dtype=np.float16)
    taps = np.empty((total, T, H), dtype=np.float16) if T else None
    tap_layers = np.asarray(layers, dtype=np.int32) if T else None
    labels = np.empty((total, num_heads), dtype=np.int32)
    rec = np.empty(total, dtype=np.int32)
    roots = np.empty(total, dtype=np.int32)
    todo_rows = sum(len(r["answer_ids"]) for r, k in zip(records, keys) if int(k) not in known)
    bar = tqdm(total=todo_rows, desc="[medusa_rt] hidden states", unit="tok", unit_scale=True, disable=not progress,
               file=sys.stderr)
    if known and progress:
        print(f"[medusa_rt] reusing the hidden states of {total - todo_rows} answer tokens from {out_path}",
              file=sys.stderr)
    row = 0
    last_save = time.time()
    with engine.session() as s:
        for i, r in enumerate(records):
            p, a = r["prompt_ids"], r["answer_ids"]
            n = len(a)
            if not n:
                continue
            h, t = known.get(int(keys[i]), (None, None))
            if h is None or h.shape[0] != n:
                s.reset()
                ids = list(p) + list(a[:-1])
                if T:
                    out = s.hidden_states(ids, layers)[len(p) - 1:]
                    h, t = out[:, 0], out[:, 1:]
                else:
                    h = s.hidden_states(ids)[len(p) - 1:]
                bar.update(n)
            hidden[row:row + n] = h
            if T:
                taps[row:row + n] = t
            labels[row:row + n] = head_labels(a, num_heads)
            roots[row:row + n] = a
            rec[row:row + n] = i
            row += n
            if time.time() - last_save > save_every_s:  # a partial file: the records done so far
                Features(hidden[:row], labels[:row], rec[:row], keys, roots[:row],
                         None if taps is None else taps[:row], tap_layers).save(out_path)
                last_save = time.time()
    bar.close()
    f = Features(hidden[:row], labels[:row], rec[:row], keys, roots[:row], None if taps is None else taps[:row],
                 tap_layers)
    f.save(out_path)
    return f


def split_records(n: int, held_out: float, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Record indices for training and validation (a held-out fraction of whole answers)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = max(1, int(round(n * held_out))) if n > 1 and held_out > 0 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def answer_token_counts(records: Sequence[dict]) -> Dict[int, int]:
    """How often each token occurs in the records' answers."""
    counts: Dict[int, int] = {}
    for r in records:
        for t in r["answer_ids"]:
            counts[t] = counts.get(t, 0) + 1
    return counts


def draft_vocabulary(records: Sequence[dict], coverage: float, minimum: int = 64) -> Optional[np.ndarray]:
    """The most frequent answer tokens covering ``coverage`` of all answer tokens (at least
    ``minimum`` of them), as increasing ids: the heads' draft vocabulary. None for coverage >= 1."""
    if coverage >= 1.0:
        return None
    if not 0 < coverage:
        raise InvalidArgumentError(f"draft vocabulary coverage must be in (0, 1], got {coverage}")
    counts = answer_token_counts(records)
    if not counts:
        return None
    order = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    total = sum(counts.values())
    run, n = 0, 0
    for n, (_, c) in enumerate(order, 1):
        run += c
        if run >= coverage * total and n >= minimum:
            break
    return np.array(sorted(t for t, _ in order[:n]), dtype=np.int64)
