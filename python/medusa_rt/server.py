"""``medusa-rt serve``: an HTTP server with the OpenAI chat and completions API over one engine.

Endpoints: ``POST /v1/chat/completions`` (``messages``), ``POST /v1/completions`` (``prompt``,
text), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format: requests by
endpoint and status, requests running, prompt / cached / generated tokens, decode steps and
Medusa tree steps, so tokens per step is ``generation_tokens / decode_steps`` over a window,
prefill and decode seconds). Each request runs on a session of its own in the
server's thread for it, so concurrent requests share the engine's decode steps (up to its
``max_batch_size`` at once; a request waits up to ``slot_wait`` seconds for a free slot, then gets
503). A request takes the free slot whose cache shares the longest start with its prompt, so the
next turn of a conversation prefills only itself (``usage.prompt_tokens_details.cached_tokens``).

Request fields read: ``max_tokens`` / ``max_completion_tokens`` (default 256), ``temperature``
(default 0: greedy; above 0 samples, still lossless with Medusa), ``top_p``, ``top_k``, ``seed``,
``stop`` (a string or a list), ``stream`` (server-sent events, ending with ``data: [DONE]``) and
``stream_options.include_usage`` (a last chunk with ``usage`` and no choices). A completions
``prompt`` is a text, a list of token ids, or a list holding one text. ``model`` and ``user`` are
accepted and ignored (one model per server). Fields that would change the answer in ways this
server does not implement (tools, a JSON ``response_format``, logprobs, logit_bias, presence or
frequency penalties, echo, best_of, suffix, n > 1) are refused rather than ignored. Errors are
JSON ``{"error": {"message", "type"}}``: 400 for a bad request, 503 when no slot came free, 404
for an unknown path, 500 for a failure of the server itself.
"""

from __future__ import annotations

import json
import math
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Optional, Tuple

from .engine import Engine, GenerationResult, _encode_prompt
from .errors import CapacityError, InvalidArgumentError, MedusaError

DEFAULT_MAX_TOKENS = 256
MAX_BODY_BYTES = 8 << 20
_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


class _BadRequest(Exception):
    pass


class Metrics:
    """The server's counters, exported at ``GET /metrics`` in the Prometheus text format."""

    _TOTALS = (  # (metric, GenerationStats field, help)
        ("prompt_tokens", "prompt_tokens", "prompt tokens of finished requests"),
        ("cached_prompt_tokens", "cached_prompt_tokens", "prompt tokens taken from a slot's cache, not prefilled"),
        ("generation_tokens", "new_tokens", "tokens generated"),
        ("decode_steps", "steps", "decode steps (generation_tokens / decode_steps: tokens per step)"),
        ("tree_steps", "tree_steps", "decode steps that verified a Medusa tree"),
        ("lookup_tokens", "lookup_tokens", "accepted tokens found by prompt lookup"),
        ("prefill_seconds", "prefill_seconds", "seconds spent prefilling"),
        ("decode_seconds", "decode_seconds", "seconds spent decoding"),
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Dict[Tuple[str, int], int] = {}
        self.running = 0
        self.totals: Dict[str, float] = {name: 0 for name, _, _ in self._TOTALS}

    def response(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def started(self) -> None:
        with self._lock:
            self.running += 1

    def finished(self, r: Optional[GenerationResult]) -> None:
        """A generation ended; r is its result (None when it failed before one existed)."""
        with self._lock:
            self.running -= 1
            for name, attr, _ in self._TOTALS if r is not None else ():
                self.totals[name] += getattr(r.stats, attr)

    def render(self, slots: int) -> str:
        with self._lock:
            out = ["# HELP medusa_rt_requests_total HTTP responses by endpoint and status",
                   "# TYPE medusa_rt_requests_total counter"]
            out += [f'medusa_rt_requests_total{{endpoint="{e}",status="{c}"}} {n}'
                    for (e, c), n in sorted(self.requests.items())]
            out += ["# HELP medusa_rt_requests_running generations in progress",
                    "# TYPE medusa_rt_requests_running gauge", f"medusa_rt_requests_running {self.running}",
                    "# HELP medusa_rt_slots sequence slots (requests served at once)",
                    "# TYPE medusa_rt_slots gauge", f"medusa_rt_slots {slots}"]
            for name, _, help_text in self._TOTALS:
                value = self.totals[name]
                out += [f"# HELP medusa_rt_{name}_total {help_text}", f"# TYPE medusa_rt_{name}_total counter",
                        f"medusa_rt_{name}_total {value:.6f}" if isinstance(value, float) else
                        f"medusa_rt_{name}_total {value}"]
        return "\n".join(out) + "\n"


def _field(body: Dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise _BadRequest(f"'{name}' must be {kind.__name__}, got {type(value).__name__}")
    if kind is float and not math.isfinite(value):
        raise _BadRequest(f"'{name}' must be a finite number, got {value}")
    return value


# Request fields this server does not implement, with the value each may take when it asks for
# nothing (clients often send the defaults explicitly).
_UNSUPPORTED: Dict[str, Tuple[Any, ...]] = {
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"), "function_call": (None, "none"),
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "echo": (None, False),
    "best_of": (None, 1), "suffix": (None, ""), "n": (None, 1),
}


def _refuse_unsupported(body: Dict[str, Any]) -> None:
    for name, neutral in _UNSUPPORTED.items():
        value = body.get(name)
        if not any(value == v and type(value) is type(v) for v in neutral):
            raise _BadRequest(f"'{name}' is not supported by this server (got {json.dumps(value)[:80]})")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _BadRequest("only response_format {'type': 'text'} is supported by this server")


def _chat_message(k: int, m: Dict[str, Any]) -> Dict[str, Any]:
    """An OpenAI chat message with its content as text: text parts are joined with newlines;
    other parts (images, audio) and tool calls are refused."""
    content = m.get("content")
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _BadRequest(f"message {k}: only text content parts are supported, got {kind!r}")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise _BadRequest(f"message {k} needs a 'content' string or a list of text parts "
                          f"(got {json.dumps(content)[:80]})")
    if m.get("tool_calls"):
        raise _BadRequest(f"message {k}: 'tool_calls' is not supported by this server")
    return {**m, "content": content}


def _options(body: Dict[str, Any]) -> Dict[str, Any]:
    """Session.generate keyword arguments from an OpenAI request body."""
    max_tokens = _field(body, "max_completion_tokens", int, None)
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", int, DEFAULT_MAX_TOKENS)
    temperature = _field(body, "temperature", float, 0.0)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(x, str) for x in stop)):
        raise _BadRequest("'stop' must be a string or a list of strings")
    opts: Dict[str, Any] = dict(max_new_tokens=max_tokens, stop=stop)
    if temperature > 0:
        opts.update(do_sample=True, temperature=temperature, top_p=_field(body, "top_p", float, 1.0),
                    top_k=_field(body, "top_k", int, 0), seed=_field(body, "seed", int, -1))
    elif temperature < 0:
        raise _BadRequest(f"'temperature' must be >= 0, got {temperature}")
    return opts


class _Handler(BaseHTTPRequestHandler):
    server: "MedusaServer"
    protocol_version = "HTTP/1.1"
    _headers_sent = False  # a streamed response's headers went out: errors can no longer be a status
    _rid = ""  # the id of the streamed response

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet unless asked
        if self.server.verbose:
            sys.stderr.write(f"[medusa_rt serve] {self.address_string()} {fmt % args}\n")

    def send_response(self, code: int, message: Optional[str] = None) -> None:
        path = getattr(self, "path", "")  # unset when the request line itself was bad
        endpoint = path if path in _ENDPOINTS else "other"
        self.server.metrics.response(endpoint, code)
        super().send_response(code, message)

    def _send_json(self, status: int, obj: Dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str) -> None:
        self.close_connection = True  # the request's body may be unread
        self._send_json(status, {"error": {"message": message, "type": kind}})

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send_json(200, {"status": "ok"})
        elif self.path == "/metrics":
            data = self.server.metrics.render(self.server.engine.info.max_batch_size).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "owned_by": "medusa_rt"}]})
        else:
            self._error(404, f"no such path: {self.path}", "not_found_error")

    def do_POST(self) -> None:
        chat = self.path == "/v1/chat/completions"
        if not chat and self.path != "/v1/completions":
            self._error(404, f"no such path: {self.path}", "not_found_error")
            return
        try:
            self._post(chat)
        except (BrokenPipeError, ConnectionResetError):  # the client left; its generation is cancelled
            self.close_connection = True
        except Exception as exc:  # a failure of the server itself: reported, and the server goes on
            self.close_connection = True
            if self.server.verbose:
                traceback.print_exc()
            if not self._headers_sent:
                self._error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    def _post(self, chat: bool) -> None:
        self._headers_sent = False
        try:
            prompt, opts, stream, usage = self._request(chat)
        except _BadRequest as exc:
            self._error(400, str(exc), "invalid_request_error")
            return
        engine = self.server.engine
        try:
            ids = _encode_prompt(engine, prompt, False)  # messages go through the chat template
        except MedusaError as exc:  # e.g. messages the chat template refuses
            self._error(400, str(exc), "invalid_request_error")
            return
        try:
            session = engine.session(wait=self.server.slot_wait, prompt=ids)
        except CapacityError as exc:  # no slot came free in time
            self._error(503, str(exc), "server_busy")
            return
        metrics = self.server.metrics
        metrics.started()
        try:
            with session as s:
                try:
                    r = self._stream(s, ids, opts, chat) if stream else self._generate(s, ids, opts)
                finally:
                    metrics.finished(s.last_result)
        except MedusaError as exc:  # bad options, a prompt longer than the engine's max_seq_len, ...
            if self._headers_sent:
                raise
            self._error(400, str(exc), "invalid_request_error")
            return
        if r is None:  # the client left, or the stream reported its error
            return
        if stream:  # the end of the stream goes out once the slot is free again
            self._end_stream(r, chat, usage)
        else:  # so does the answer
            self._send_json(200, self._response(r, chat))

    def _request(self, chat: bool) -> Tuple[Any, Dict[str, Any], bool, bool]:
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise _BadRequest("bad Content-Length") from None
        if n <= 0 or n > MAX_BODY_BYTES:
            raise _BadRequest(f"the request needs a JSON body of at most {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(self.rfile.read(n))
        except (ValueError, RecursionError) as exc:
            raise _BadRequest(f"the body is not JSON (or nested too deeply): {exc}") from None
        if not isinstance(body, dict):
            raise _BadRequest("the body must be a JSON object")
        _refuse_unsupported(body)
        if chat:
            prompt = body.get("messages")
            if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
                raise _BadRequest("'messages' must be a non-empty list of {'role', 'content'} objects")
            prompt = [_chat_message(k, m) for k, m in enumerate(prompt)]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
            if not (isinstance(prompt, str) or ids) or not prompt:
                raise _BadRequest("'prompt' must be a non-empty text, a list of token ids or a list of one text")
        stream_options = _field(body, "stream_options", dict, {})
        usage = _field(stream_options, "include_usage", bool, False)
        return prompt, _options(body), _field(body, "stream", bool, False), usage

    def _chunk(self, rid: str, chat: bool, text: Optional[str], finish: Optional[str],
               first: bool = False) -> Dict[str, Any]:
        choice: Dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["delta"] = ({"role": "assistant"} if first else {}) | ({} if text is None else {"content": text})
        else:
            choice["text"] = text or ""
        return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.server.model_name, "choices": [choice]}

    def _generate(self, s: Any, prompt: Any, opts: Dict[str, Any]) -> Optional[GenerationResult]:
        """The whole answer, or None when the client left first (its generation is then cancelled
        at the next token block rather than holding a slot to the end)."""
        r = s.generate(prompt, cancel=self._client_gone, **opts)
        if r.finish_reason == "cancelled":
            self.close_connection = True
            return None
        return r

    def _client_gone(self) -> bool:
        """Whether the client closed its connection (readable with nothing to read: EOF; a
        pipelined next request is data, not EOF). A client that shuts down only its sending side
        and still reads looks the same, and is taken for gone."""
        try:
            poller = select.poll()
            poller.register(self.connection, select.POLLIN)
            return bool(poller.poll(0)) and self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except ConnectionError:  # reset
            return True
        except OSError:  # unknown: keep going
            return False

    def _stream(self, s: Any, prompt: Any, opts: Dict[str, Any], chat: bool) -> Optional[GenerationResult]:
        """Sends the headers and the text as it comes; returns the result (None after an error,
        reported as an event) for :meth:`_end_stream`."""
        pieces = s.stream(prompt, **opts)
        first = next(pieces, None)  # errors in the request surface here, before any header is sent
        self._headers_sent = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self._rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        try:
            self._event(self._chunk(self._rid, chat, first, None, first=True))
            for piece in pieces:
                self._event(self._chunk(self._rid, chat, piece, None))
        except MedusaError as exc:  # after the headers: reported as an event
            self._event({"error": {"message": str(exc), "type": "server_error"}})
            return None
        finally:
            pieces.close()  # a client that left cancels the generation
        return s.last_result

    def _end_stream(self, r: GenerationResult, chat: bool, usage: bool) -> None:
        self._event(self._chunk(self._rid, chat, None, _finish(r)))
        if usage:
            self._event({**self._chunk(self._rid, chat, None, None), "choices": [], "usage": _usage(r)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, obj: Dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    def _response(self, r: GenerationResult, chat: bool) -> Dict[str, Any]:
        choice: Dict[str, Any] = {"index": 0, "finish_reason": _finish(r)}
        if chat:
            choice["message"] = {"role": "assistant", "content": r.text}
        else:
            choice["text"] = r.text
        return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.server.model_name, "choices": [choice], "usage": _usage(r)}


def _usage(r: GenerationResult) -> Dict[str, Any]:
    st = r.stats
    return {"prompt_tokens": st.prompt_tokens, "completion_tokens": len(r.tokens),
            "total_tokens": st.prompt_tokens + len(r.tokens),
            "prompt_tokens_details": {"cached_tokens": st.cached_prompt_tokens}}


def _finish(r: Optional[GenerationResult]) -> str:
    return "length" if r is None or r.finish_reason != "stop" else "stop"


class MedusaServer(ThreadingHTTPServer):
    """The HTTP server of :func:`serve` (``server_address`` holds the bound host and port)."""

    daemon_threads = True

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000, *, model_name: str = "",
                 slot_wait: float = 30.0, verbose: bool = False) -> None:
        if engine.tokenizer.chat_template is None:
            raise InvalidArgumentError(f"the model at {engine.model_dir} has no chat template to serve chats with")
        super().__init__((host, port), _Handler)
        self.engine = engine
        self.model_name = model_name or engine.model_dir.name
        self.slot_wait = float(slot_wait)
        self.verbose = verbose
        self.metrics = Metrics()

    def start(self) -> threading.Thread:
        """Serves in a daemon thread (for embedding and tests); ``shutdown()`` stops it."""
        t = threading.Thread(target=self.serve_forever, name="medusa_rt-serve", daemon=True)
        t.start()
        return t


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    """Serves the engine until interrupted (see the module's docstring for the API)."""
    server = MedusaServer(engine, host, port, **kwargs)
    print(f"[medusa_rt] serving {server.model_name} on http://{server.server_address[0]}:{server.server_address[1]}/v1 "
          f"({engine.info.max_batch_size} sequence slots)", file=sys.stderr)
    try:
        server.serve_forever()
    finally:
        server.server_close()
