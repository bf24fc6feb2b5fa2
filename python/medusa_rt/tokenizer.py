"""Tokenizer of a medusa_rt model directory: encoding, decoding, chat templates, streaming decode.

Two backends, chosen by ``config.json``'s ``tokenizer.type``:

* ``"hf"``: a Hugging Face ``tokenizers`` JSON file (``tokenizer.json``);
* ``"sentencepiece"``: a sentencepiece model (``tokenizer.model``). Control pieces such as
  ``<s>`` written in the text are recognized and encoded as their ids (as llama.cpp and HF do);
  the text between them is encoded with sentencepiece, each stretch with its own dummy prefix.

Beginning-of-sequence handling is done here, not by the tokenizer file: ``encode`` prepends
``bos_token_id`` when ``add_special_tokens`` and the model's ``add_bos_token`` are both true.

Chat templates are rendered with a sandboxed jinja2 environment offering the helpers HF templates
expect (``raise_exception``, ``strftime_now``, a ``tojson`` filter that keeps non-ASCII text,
``bos_token``/``eos_token`` variables).
"""

from __future__ import annotations

import json
import operator
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError, ModelFormatError, ModelNotFoundError

__all__ = ["IncrementalDecoder", "Tokenizer"]

_SPIECE_SPACE = "\u2581"
_REPLACEMENT = "\ufffd"


class Tokenizer:
    """Text <-> token ids for one model. Build it with :meth:`from_model_dir` or :meth:`from_file`."""

    def __init__(self, path: str | os.PathLike, kind: str, *, add_bos_token: bool = False,
                 chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, bos_token_id: int | None = None,
                 eos_token_ids: Sequence[int] | None = None) -> None:
        """Load the tokenizer file ``path`` of type ``kind`` (``"hf"`` or ``"sentencepiece"``).

        Missing ``bos_token_id``/``eos_token_ids`` are looked up from the ``bos_token``/``eos_token``
        strings.
        """
        self.path = Path(path)
        if kind not in ("hf", "sentencepiece"):
            raise InvalidArgumentError(f"unknown tokenizer type {kind!r} for {self.path}; "
                                       "expected 'hf' or 'sentencepiece'")
        if not self.path.is_file():
            raise ModelNotFoundError(f"tokenizer file {self.path} does not exist")
        self.kind = kind
        self.add_bos_token = bool(add_bos_token)
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._hf: Any = None
        self._sp: Any = None
        self._special_re: re.Pattern[str] | None = None
        self._control_ids: frozenset[int] = frozenset()
        try:
            if kind == "hf":
                from tokenizers import Tokenizer as HFTokenizer

                self._hf = HFTokenizer.from_file(str(self.path))
            else:
                import sentencepiece as spm

                self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as exc:  # noqa: BLE001 - both libraries raise plain Exceptions on bad files
            raise ModelFormatError(f"cannot load tokenizer {self.path}: {exc}") from exc
        if self._sp is not None:
            sp = self._sp
            self._control_ids = frozenset(i for i in range(sp.get_piece_size()) if sp.is_control(i))
            specials = sorted({sp.id_to_piece(i) for i in self._control_ids} | {sp.id_to_piece(sp.unk_id())},
                              key=len, reverse=True)
            specials = [s for s in specials if s]
            if specials:
                self._special_re = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")
        self._bos_token_id = bos_token_id if bos_token_id is not None else self.token_to_id(bos_token or "")
        if bos_token is None and self._bos_token_id is not None:
            self.bos_token = self.id_to_token(self._bos_token_id)
        if eos_token_ids:
            self._eos_token_ids = [int(t) for t in eos_token_ids]
        else:
            eos = self.token_to_id(eos_token or "")
            self._eos_token_ids = [eos] if eos is not None else []
        if eos_token is None and self._eos_token_ids:
            self.eos_token = self.id_to_token(self._eos_token_ids[0])
        self._template: Any = None

    # ---------------------------------------------------------------------------------------
    # construction
    # ---------------------------------------------------------------------------------------

    @classmethod
    def from_model_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """The tokenizer of a medusa_rt model directory (its config.json ``tokenizer`` block)."""
        root = Path(path)
        cfg_path = root / "config.json"
        if not cfg_path.is_file():
            raise ModelNotFoundError(f"{cfg_path} does not exist (not a medusa_rt model directory)")
        try:
            with open(cfg_path, encoding="utf-8") as fh:
                cfg = json.load(fh)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFormatError(f"{cfg_path}: cannot parse JSON: {exc}") from exc
        block = cfg.get("tokenizer") if isinstance(cfg, dict) else None
        if not isinstance(block, dict) or not isinstance(block.get("file"), str):
            raise ModelFormatError(f"{cfg_path}: missing or malformed 'tokenizer' block")
        tok_file = root / block["file"]
        if not tok_file.is_file():
            raise ModelFormatError(f"{cfg_path}: tokenizer file {tok_file} does not exist")
        specials = block.get("special_tokens") or {}
        eos_ids = cfg.get("eos_token_ids")
        return cls(
            tok_file,
            str(block.get("type", "hf")),
            add_bos_token=bool(block.get("add_bos_token", False)),
            chat_template=block.get("chat_template"),
            bos_token=specials.get("bos"),
            eos_token=specials.get("eos"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[int(t) for t in eos_ids] if isinstance(eos_ids, list) else None,
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs: Any) -> "Tokenizer":
        """A tokenizer from a bare ``tokenizer.json`` or ``tokenizer.model`` (type from the suffix);
        keyword arguments as for the constructor."""
        p = Path(path)
        kind = "sentencepiece" if p.suffix == ".model" else "hf"
        return cls(p, kind, **kwargs)

    # ---------------------------------------------------------------------------------------
    # properties
    # ---------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows (added tokens included)."""
        if self._hf is not None:
            return int(self._hf.get_vocab_size(with_added_tokens=True))
        return int(self._sp.get_piece_size())

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end generation."""
        return list(self._eos_token_ids)

    @property
    def bos_token_id(self) -> int | None:
        """The beginning-of-sequence id, or None."""
        return self._bos_token_id

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token`` (a vocabulary string), or None when it is not in the vocabulary."""
        if not token:
            return None
        if self._hf is not None:
            tid = self._hf.token_to_id(token)
            return int(tid) if tid is not None else None
        tid = int(self._sp.piece_to_id(token))
        return tid if self._sp.id_to_piece(tid) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of ``token_id``, or None when out of range."""
        if not 0 <= int(token_id) < self.vocab_size:
            return None
        if self._hf is not None:
            return self._hf.id_to_token(int(token_id))
        return str(self._sp.id_to_piece(int(token_id)))

    # ---------------------------------------------------------------------------------------
    # encode / decode
    # ---------------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the BOS id is prepended when the model
        wants one (``add_bos_token``). Special tokens spelled in the text are always recognized."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"encode() needs a str, got {type(text).__name__}")
        if self._hf is not None:
            ids = list(self._hf.encode(text, add_special_tokens=False).ids)
        else:
            ids = self._sp_encode(text)
        if add_special_tokens and self.add_bos_token and self._bos_token_id is not None:
            ids.insert(0, self._bos_token_id)
        return ids

    def _sp_encode(self, text: str) -> list[int]:
        if self._special_re is None:
            return list(self._sp.encode(text))
        ids: list[int] = []
        for k, part in enumerate(self._special_re.split(text)):
            if not part:
                continue
            if k % 2:  # a captured special token
                ids.append(int(self._sp.piece_to_id(part)))
            else:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of the token ids ``ids`` (special tokens kept unless ``skip_special_tokens``)."""
        id_list = [int(i) for i in ids]
        size = self.vocab_size
        for i in id_list:
            if not 0 <= i < size:
                raise InvalidArgumentError(f"token id {i} is outside the vocabulary (size {size}) "
                                           f"of {self.path}")
        if self._hf is not None:
            return str(self._hf.decode(id_list, skip_special_tokens=skip_special_tokens))
        return self._sp_decode(id_list, skip_special_tokens)

    def _sp_decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if not any(i in self._control_ids for i in ids):
            return str(self._sp.decode(ids))
        out: list[str] = []
        run: list[int] = []

        def flush_run() -> None:
            if run:
                text = str(self._sp.decode(run))
                # sentencepiece drops the dummy-prefix space of a stretch's first piece; keep it
                # when the stretch follows something (llama.cpp does the same).
                if out and self._sp.id_to_piece(run[0]).startswith(_SPIECE_SPACE):
                    text = " " + text
                out.append(text)
                run.clear()

        for i in ids:
            if i in self._control_ids:
                flush_run()
                if not skip_special_tokens:
                    out.append(str(self._sp.id_to_piece(i)))
            else:
                run.append(i)
        flush_run()
        return "".join(out)

    def incremental_decoder(self, *, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        """A fresh :class:`IncrementalDecoder` for streaming output."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------------------------------
    # chat
    # ---------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: str | Sequence[Mapping[str, Any]], *,
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render ``messages`` (a list of ``{"role", "content"}`` dicts, or a plain string for one
        user message) with the model's chat template. Extra keyword arguments become template
        variables (e.g. ``tools``). Raises InvalidArgumentError without a template or on a
        template error (including the template's own ``raise_exception``)."""
        if self.chat_template is None:
            raise InvalidArgumentError(f"the model of {self.path} has no chat template")
        msgs = _normalize_messages(messages)
        import jinja2

        if self._template is None:
            try:
                self._template = _chat_environment().from_string(self.chat_template)
            except jinja2.TemplateError as exc:
                raise InvalidArgumentError(f"chat template of {self.path} does not compile: {exc}") from exc
        context: dict[str, Any] = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        context.update(kwargs)
        try:
            return str(self._template.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                             **context))
        except jinja2.TemplateError as exc:
            raise InvalidArgumentError(f"chat template of {self.path} failed: {exc}") from exc
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:  # on odd message data
            raise InvalidArgumentError(f"chat template of {self.path} failed on these messages: "
                                       f"{type(exc).__name__}: {exc}") from exc

    def encode_chat(self, messages: str | Sequence[Mapping[str, Any]], *,
                    add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Token ids of the rendered chat (no extra BOS: templates write their own, as in HF)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                    **kwargs), add_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, kind={self.kind!r}, vocab_size={self.vocab_size})"


def _normalize_messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, (list, tuple)):
        raise InvalidArgumentError("messages must be a str or a list of {'role', 'content'} dicts, "
                                   f"got {type(messages).__name__}")
    out: list[dict[str, Any]] = []
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise InvalidArgumentError(f"message {k} must be a dict with a string 'role'")
        content = m.get("content")
        if not (content is None or isinstance(content, (str, list, tuple))):
            # A list (content parts) or None (a tool call's message) goes to the template as in HF
            # transformers; anything else would be rendered as its Python repr.
            raise InvalidArgumentError(f"message {k}: 'content' must be a string, a list of content parts "
                                       f"or None, got {type(content).__name__}")
        out.append(dict(m))
    return out


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii)


def _strftime_now(fmt: str) -> str:
    from datetime import datetime

    return datetime.now().strftime(fmt)


def _chat_environment() -> Any:
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols],
                                        undefined=jinja2.Undefined)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class IncrementalDecoder:
    """Turns a stream of token ids into a stream of text pieces.

    :meth:`feed` takes one id or several and returns the text completed by them; text whose decoded
    tail is an incomplete UTF-8 character (it ends in U+FFFD) is held back until the character is
    complete. :meth:`flush` returns whatever is left at the end. The concatenation of all pieces
    equals ``tokenizer.decode(all_ids)``.

    It decodes a short window of recent ids each time (the last emitted boundary onwards), so
    tokenizers that treat a leading space specially (sentencepiece) still produce the right spaces.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # ids from the window start on
        self._prefix_len = 0  # ids of the window already emitted (their text is the prefix)
        self._prefix_text = ""

    def feed(self, ids: int | Iterable[int]) -> str:
        """Add token id(s); return the newly completed text (possibly "")."""
        try:
            new = [operator.index(ids)]  # one id (int or numpy integer)
        except TypeError:
            new = [operator.index(i) for i in ids]  # type: ignore[union-attr]
        if not new:
            return ""
        self._ids.extend(new)
        text = self._tok.decode(self._ids, skip_special_tokens=self._skip)
        if text.endswith(_REPLACEMENT) or len(text) <= len(self._prefix_text) \
                or not text.startswith(self._prefix_text):
            return ""
        piece = text[len(self._prefix_text):]
        # The emitted ids become the new window's prefix: keep only the last emitted chunk's ids.
        self._ids = self._ids[self._prefix_len:]
        self._prefix_len = len(self._ids)
        self._prefix_text = self._tok.decode(self._ids, skip_special_tokens=self._skip)
        return piece

    def flush(self) -> str:
        """Return the text held back (an incomplete character decodes as U+FFFD); reset."""
        text = self._tok.decode(self._ids, skip_special_tokens=self._skip) if self._ids else ""
        piece = text[len(os.path.commonprefix([text, self._prefix_text])):]
        self.reset()
        return piece

    def reset(self) -> None:
        """Forget all state (start a new stream)."""
        self._ids = []
        self._prefix_len = 0
        self._prefix_text = ""
