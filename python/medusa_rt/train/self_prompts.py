"""Training prompts written by the base model itself (Magpie-style self-instruction).

A chat model that was instruction-tuned has learned what users ask: given only its chat template
up to the start of a user turn (the system turn, then ``<|im_start|>user``), it writes a user
request when sampled. Those requests follow the model's own instruction-tuning distribution, which
is much closer to what real users send than any template, and they cost nothing but decoding.
The heads then train on the model's answers to them like on any other prompt.

:func:`generate_self_prompts` samples candidates one by one through the engine
(``Session.forward``; temperature, then top-k and nucleus truncation, in NumPy), keeps those that
end their turn within the token budget and pass simple checks (length, printable text, not a
duplicate, not an excluded prompt such as an evaluation prompt), and appends every candidate, kept
or not, with its text and whether it ended its turn, to ``self_prompts.jsonl`` in the work
directory. Candidate ``i`` is sampled from its own seeded generator, so an interrupted run resumes
where it stopped and a run asked for more candidates extends the same list; stored candidates are
decided again on every run, so a resumed run keeps what a fresh one would. The sampling settings
are kept beside the file (``self_prompts.json``) and a run with other settings is refused. The
samples follow the engine's logits, so another weight dtype or kernel set (``info.isa``) can give
other prompts from the same seed.

A turn ends at an EOS id of the model or at ChatML's ``<|im_end|>``; for templates that end a turn
otherwise, candidates are rejected as never ending.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, List, Optional, Set, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError
from .data import rewrite_records

if TYPE_CHECKING:
    from ..engine import Engine
    from ..tokenizer import Tokenizer

SELF_PROMPTS = "self_prompts.jsonl"
SELF_PROMPTS_SETTINGS = "self_prompts.json"
CATEGORY = "self"
SAMPLING = {"temperature": 1.0, "top_k": 200, "top_p": 0.95, "max_tokens": 96}
"""The sampling settings ``train-heads --self-prompts`` uses."""
_MARK = "\u0000MEDUSA_RT_USER\u0000"
_WORD = re.compile(r"[A-Za-z]{2,}")


def user_turn_prefix(tokenizer: "Tokenizer") -> List[int]:
    """Token ids of the chat template up to where a user's message starts (system turn
    included). Raises InvalidArgumentError for a tokenizer without a chat template that renders
    the message verbatim."""
    try:
        text = tokenizer.apply_chat_template(_MARK)
    except Exception as e:  # no template, or one that fails on a plain user message
        raise InvalidArgumentError(f"self-written prompts need the model's chat template: {e}") from e
    if text.count(_MARK) != 1:
        raise InvalidArgumentError("self-written prompts need a chat template that renders the user's message verbatim")
    return tokenizer.encode(text[:text.index(_MARK)], add_special_tokens=False)


def sample_token(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float) -> int:
    """One token from ``softmax(logits / temperature)`` truncated to the ``top_k`` most likely
    tokens and then to the smallest set of them whose probability reaches ``top_p``."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    k = min(top_k, logits.size)
    top = np.argpartition(-logits, k - 1)[:k]
    top = top[np.argsort(-logits[top], kind="stable")]
    z = logits[top] / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = min(int(np.searchsorted(np.cumsum(p), top_p)) + 1, k)  # smallest prefix reaching top_p
    p = p[:keep] / p[:keep].sum()
    return int(top[rng.choice(keep, p=p)])


def normalize(text: str) -> str:
    """The form used to recognise duplicates: lower case, words and numbers only, apostrophes
    dropped."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower().replace("'", "").replace("\u2019", "")))


def check_prompt(text: str, min_chars: int = 20, max_chars: int = 600) -> Optional[str]:
    """Why a sampled user message is not kept as a prompt, or None to keep it."""
    if not min_chars <= len(text) <= max_chars:
        return "length"
    if "<|" in text or "|>" in text:
        return "special"
    if any(not c.isprintable() and c not in "\n\t" for c in text):
        return "unprintable"
    letters = sum(c.isascii() and c.isalpha() for c in text)
    if letters < 0.6 * len(text.replace(" ", "").replace("\n", "")):
        return "not text"
    if len(_WORD.findall(text)) < 4:
        return "too few words"
    return None


def read_candidates(path: Path) -> List[dict]:
    """Candidate records of a self-prompts file in index order; reading stops at the first line
    that is not one (a torn last line, or anything else that is not the next candidate)."""
    out: List[dict] = []
    if path.exists():
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break
                if not (isinstance(rec, dict) and rec.get("index") == len(out) and isinstance(rec.get("text"), str)
                        and isinstance(rec.get("ended"), bool)):
                    break
                out.append(rec)
    return out


def _decide(text: str, ended: bool, seen: Set[str]) -> Optional[str]:
    """Why a candidate is rejected, or None to keep it (then its normalized form joins ``seen``)."""
    why = check_prompt(text) if ended else "no end of turn"
    if why is None and normalize(text) in seen:
        why = "duplicate"
    if why is None:
        seen.add(normalize(text))
    return why


def generate_self_prompts(engine: "Engine", count: int, out_dir: Path, *, seed: int = 0,
                          temperature: float = SAMPLING["temperature"], top_k: int = SAMPLING["top_k"],
                          top_p: float = SAMPLING["top_p"], max_tokens: int = SAMPLING["max_tokens"],
                          exclude: Iterable[str] = (), progress: bool = True) -> List[Tuple[str, str]]:
    """Samples ``count`` candidate user messages from the model (see the module docstring) and
    returns the kept ones as ``("self", prompt)`` pairs, in candidate order. ``exclude``: prompts
    that must not be produced (e.g. evaluation prompts); a candidate equal to one of them, or to an
    earlier kept candidate, after :func:`normalize`, is dropped. Candidates already in the work
    directory are decided again with the current ``exclude`` (what a fresh run would keep); a
    file sampled with other settings is refused."""
    if count < 0:
        raise InvalidArgumentError(f"self-written prompt count must be >= 0, got {count}")
    if not (temperature > 0 and np.isfinite(temperature)):
        raise InvalidArgumentError(f"temperature must be > 0, got {temperature}")
    if top_k < 1 or not 0 < top_p <= 1:
        raise InvalidArgumentError(f"need top_k >= 1 and top_p in (0, 1], got {top_k}, {top_p}")
    if max_tokens < 8:
        raise InvalidArgumentError(f"max_tokens must be >= 8, got {max_tokens}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SELF_PROMPTS
    settings = {"seed": seed, "temperature": temperature, "top_k": top_k, "top_p": top_p, "max_tokens": max_tokens}
    settings_path = out_dir / SELF_PROMPTS_SETTINGS
    if path.exists() and settings_path.exists() and json.loads(settings_path.read_text()) != settings:
        raise InvalidArgumentError(f"{path} was sampled with other settings ({settings_path}); use another work "
                                   "directory or remove both files")
    settings_path.write_text(json.dumps(settings))
    records = read_candidates(path)
    rewrite_records(path, records)
    seen: Set[str] = {normalize(p) for p in exclude}
    kept = [r["text"] for r in records[:count] if _decide(r["text"], r["ended"], seen) is None]
    if len(records) >= count:
        return [(CATEGORY, p) for p in kept]
    tok = engine.tokenizer
    prefix = user_turn_prefix(tok)
    end_ids = set(engine.info.eos_token_ids)
    end_of_turn = tok.token_to_id("<|im_end|>")  # ChatML; other templates end a turn with an EOS id
    if end_of_turn is not None:
        end_ids.add(end_of_turn)
    budget = min(max_tokens, engine.info.max_seq_len - len(prefix) - 1)
    if budget < 8:
        raise InvalidArgumentError(f"max_seq_len {engine.info.max_seq_len} leaves no room to sample a prompt "
                                   f"after the {len(prefix)}-token chat template prefix")
    bar = tqdm(total=count, initial=len(records), desc="[medusa_rt] sampling self-written prompts",
               unit="prompt", disable=not progress, file=sys.stderr)
    t0, sampled = time.time(), 0
    with engine.session() as s, open(path, "a") as f:
        for i in range(len(records), count):
            rng = np.random.default_rng([seed, i])
            s.reset()
            logits = s.forward(prefix)[0]
            ids: List[int] = []
            ended = False
            while True:
                t = sample_token(logits, rng, temperature, top_k, top_p)
                if t in end_ids:
                    ended = True
                    break
                ids.append(t)
                if len(ids) == budget:
                    break
                logits = s.forward([t])[0]
            sampled += len(ids)
            text = tok.decode(ids).strip()
            why = _decide(text, ended, seen)
            if why is None:
                kept.append(text)
            f.write(json.dumps({"index": i, "text": text, "ended": ended, "tokens": len(ids), "rejected": why}) + "\n")
            f.flush()
            if i % 32 == 31:
                os.fsync(f.fileno())
            bar.update(1)
            bar.set_postfix_str(f"kept {len(kept)}, {sampled / max(time.time() - t0, 1e-9):.0f} tok/s")
    bar.close()
    return [(CATEGORY, p) for p in kept]
