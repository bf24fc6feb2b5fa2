"""Training prompts written by the base model itself (Magpie-style self-instruction).

A chat model that was instruction-tuned has learned what users ask: given only its chat template
up to the start of a user turn (the system turn, then ``<|im_start|>user``), it writes a user
request when sampled. Those requests follow the model's own instruction-tuning distribution, which
is much closer to what real users send than any template, and they cost nothing but decoding.
The heads then train on the model's answers to them like on any other prompt.

:func:`generate_self_prompts` samples candidates in batches through the engine
(``Engine.generate_batch`` with ``do_sample``: temperature, then top-k and nucleus truncation,
candidate ``i`` drawn with the seed :func:`candidate_seed`), keeps those that end their turn within
the token budget and pass simple checks (length, printable text, not a duplicate, not an excluded
prompt such as an evaluation prompt), and appends every candidate, kept or not, with its text and
whether it ended its turn, to ``self_prompts.jsonl`` in the work directory. An interrupted run
resumes where it stopped and a run asked for more candidates extends the same list; stored
candidates are decided again on every run, so a resumed run keeps what a fresh one would. The
sampling settings are kept beside the file (``self_prompts.json``) and more candidates are sampled
only with the same ones. The samples follow the engine's logits, so another weight dtype or
kernel set (``info.isa``) can give other prompts from the same seed: to train on the same prompts
elsewhere, copy both files into the work directory (nothing is sampled while the file holds
enough candidates).

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
SAMPLER = "engine"
"""Who draws the tokens, recorded with the settings: the engine's sampling (``do_sample``).
Files from before it record no sampler; they were drawn in NumPy ("numpy"), and are read but not
extended."""
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


def stored_settings(out_dir: Path) -> Optional[dict]:
    """The sampling settings the work directory's candidates were drawn with (None: no settings
    file). Files from before the engine sampled record no sampler: NumPy drew those ("numpy")."""
    path = Path(out_dir) / SELF_PROMPTS_SETTINGS
    return {"sampler": "numpy", **json.loads(path.read_text())} if path.exists() else None


def candidate_seed(seed: int, index: int) -> int:
    """The sampling seed of candidate ``index`` of a run seeded with ``seed``."""
    return (seed << 32) + index


def generate_self_prompts(engine: "Engine", count: int, out_dir: Path, *, seed: int = 0,
                          temperature: float = SAMPLING["temperature"], top_k: int = SAMPLING["top_k"],
                          top_p: float = SAMPLING["top_p"], max_tokens: int = SAMPLING["max_tokens"],
                          exclude: Iterable[str] = (), progress: bool = True) -> List[Tuple[str, str]]:
    """Samples ``count`` candidate user messages from the model (see the module docstring) and
    returns the kept ones as ``("self", prompt)`` pairs, in candidate order. ``exclude``: prompts
    that must not be produced (e.g. evaluation prompts); a candidate equal to one of them, or to an
    earlier kept candidate, after :func:`normalize`, is dropped. Candidates already in the work
    directory are decided again with the current ``exclude`` (what a fresh run would keep); more
    candidates are sampled only with the settings the file was sampled with (else refused)."""
    if count < 0:
        raise InvalidArgumentError(f"self-written prompt count must be >= 0, got {count}")
    if not (temperature > 0 and np.isfinite(temperature)):
        raise InvalidArgumentError(f"temperature must be > 0, got {temperature}")
    if top_k < 1 or not 0 < top_p <= 1:
        raise InvalidArgumentError(f"need top_k >= 1 and top_p in (0, 1], got {top_k}, {top_p}")
    if max_tokens < 8:
        raise InvalidArgumentError(f"max_tokens must be >= 8, got {max_tokens}")
    if not 0 <= seed < 2**31:
        raise InvalidArgumentError(f"seed must be in [0, 2**31), got {seed}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SELF_PROMPTS
    records = read_candidates(path)
    rewrite_records(path, records)
    seen: Set[str] = {normalize(p) for p in exclude}
    kept = [r["text"] for r in records[:count] if _decide(r["text"], r["ended"], seen) is None]
    if len(records) >= count:
        return [(CATEGORY, p) for p in kept]
    settings = {"sampler": SAMPLER, "seed": seed, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                "max_tokens": max_tokens}
    settings_path = out_dir / SELF_PROMPTS_SETTINGS
    if records:
        stored = stored_settings(out_dir)
        if stored != settings:
            raise InvalidArgumentError(f"{path} was sampled with other settings ({settings_path}: {stored}); more "
                                       "candidates need the same ones: use another work directory, or remove both files")
    settings_path.write_text(json.dumps(settings))
    tok = engine.tokenizer
    prefix = user_turn_prefix(tok)
    end_of_turn = tok.token_to_id("<|im_end|>")  # ChatML; other templates end a turn with an EOS id
    budget = min(max_tokens, engine.info.max_seq_len - len(prefix) - 1)
    if budget < 8:
        raise InvalidArgumentError(f"max_seq_len {engine.info.max_seq_len} leaves no room to sample a prompt "
                                   f"after the {len(prefix)}-token chat template prefix")
    # Several batches' worth per call: requests join as others finish, and the records are written
    # (the resume point) after each call.
    chunk = 4 * max(1, engine.info.max_batch_size)
    bar = tqdm(total=count, initial=len(records), desc="[medusa_rt] sampling self-written prompts",
               unit="prompt", disable=not progress, file=sys.stderr)
    t0, sampled = time.time(), 0
    with open(path, "a") as f:
        for i0 in range(len(records), count, chunk):
            n = min(chunk, count - i0)
            # Candidate i0 + j is request j, seeded with candidate_seed(seed, i0) + j.
            results = engine.generate_batch([prefix] * n, max_new_tokens=budget, medusa=False, do_sample=True,
                                            temperature=temperature, top_k=top_k, top_p=top_p,
                                            seed=candidate_seed(seed, i0),
                                            stop=[] if end_of_turn is None else [end_of_turn])
            for j, res in enumerate(results):
                ended = res.finish_reason == "stop"  # the end of turn or an EOS id
                text = tok.decode(res.tokens).strip()
                why = _decide(text, ended, seen)
                if why is None:
                    kept.append(text)
                sampled += len(res.tokens)
                f.write(json.dumps({"index": i0 + j, "text": text, "ended": ended, "tokens": len(res.tokens),
                                    "rejected": why}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(n)
            bar.set_postfix_str(f"kept {len(kept)}, {sampled / max(time.time() - t0, 1e-9):.0f} tok/s")
    bar.close()
    return [(CATEGORY, p) for p in kept]
