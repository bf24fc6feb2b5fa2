"""`medusa-rt serve`: the OpenAI chat and completions API over an engine (tiny model): the same
answers as the Python API, streaming, prompt caching across requests, concurrency, errors."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request

import pytest

pytest.importorskip("torch")

import medusa_rt  # noqa: E402
from medusa_rt.server import MedusaServer  # noqa: E402

from _tiny_models import build_hf_model, save_and_export  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = save_and_export(build_hf_model("llama-gqa-untied", seed=7), tmp_path_factory.mktemp("serve"), "srv")
    engine = medusa_rt.Engine(d, dtype="fp32", max_seq_len=128, max_batch_size=2)
    server = MedusaServer(engine, port=0, model_name="tiny", slot_wait=20)
    server.start()
    yield engine, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _post(url: str, body: object, raw: bool = False):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
            return r.status, (text if raw else json.loads(text))
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


CHAT = [{"role": "user", "content": "hi there"}]


def test_chat_and_completions_match_the_python_api(served):
    engine, url = served
    want = engine.generate(CHAT, max_new_tokens=12, ignore_eos=True)
    status, r = _post(url + "/v1/chat/completions", {"model": "x", "messages": CHAT, "max_tokens": 12})
    assert status == 200 and r["object"] == "chat.completion" and r["model"] == "tiny"
    msg = r["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": engine.generate(CHAT, max_new_tokens=12).text}
    assert r["usage"]["prompt_tokens"] == want.stats.prompt_tokens
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    # The next turn finds the first one in a slot's cache.
    turn2 = CHAT + [msg, {"role": "user", "content": "and then?"}]
    status, r2 = _post(url + "/v1/chat/completions", {"messages": turn2, "max_tokens": 8})
    assert status == 200 and r2["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert r2["choices"][0]["message"]["content"] == engine.generate(turn2, max_new_tokens=8).text
    status, c = _post(url + "/v1/completions", {"prompt": "hello world", "max_tokens": 10, "stop": ["zz"]})
    assert status == 200 and c["choices"][0]["text"] == engine.generate("hello world", max_new_tokens=10,
                                                                        stop=["zz"]).text
    # Sampling with a seed is reproducible.
    body = {"messages": CHAT, "max_tokens": 10, "temperature": 0.8, "seed": 5}
    assert _post(url + "/v1/chat/completions", body)[1]["choices"] == _post(url + "/v1/chat/completions", body)[1]["choices"]
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as m:
        assert json.loads(m.read())["data"][0]["id"] == "tiny"


def test_streaming(served):
    engine, url = served
    status, text = _post(url + "/v1/chat/completions", {"messages": CHAT, "max_tokens": 12, "stream": True}, raw=True)
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == engine.generate(CHAT, max_new_tokens=12).text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks) and chunks[0]["choices"][0]["delta"]["role"] == "assistant"


def test_concurrent_requests_share_the_slots(served):
    engine, url = served
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(5)]
    want = [engine.generate(p, max_new_tokens=10).text for p in prompts]
    got = [None] * 5

    def ask(i: int) -> None:
        got[i] = _post(url + "/v1/chat/completions", {"messages": prompts[i], "max_tokens": 10})[1]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [g["choices"][0]["message"]["content"] for g in got] == want


def test_bad_requests(served):
    engine, url = served
    chat = url + "/v1/chat/completions"
    for body, match in ((b"{not json", "not JSON"), ([1, 2], "JSON object"), ({"messages": []}, "messages"),
                        ({"messages": CHAT, "max_tokens": "5"}, "max_tokens"),
                        ({"messages": CHAT, "temperature": -1}, "temperature"),
                        ({"messages": CHAT, "stop": [1]}, "stop"), ({"messages": CHAT, "n": 2}, "'n'"),
                        ({"messages": [{"content": "x"}]}, "role"),
                        ({"messages": CHAT, "max_tokens": -3}, "max_new_tokens"),
                        ({"messages": [{"role": "user", "content": "x " * 300}]}, "max_seq_len")):
        status, r = _post(chat, body)
        assert status == 400 and match in r["error"]["message"], (body, r)
    assert _post(url + "/v1/completions", {"prompt": 5})[0] == 400
    assert _post(url + "/v1/nope", {})[0] == 404
    # No slot within the wait: 503.
    server = MedusaServer(engine, port=0, slot_wait=0.05)
    server.start()
    try:
        with engine.session(wait=5), engine.session(wait=5):  # a streamed request may still be closing
            status, r = _post(f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions", {"messages": CHAT})
        assert status == 503 and r["error"]["type"] == "server_busy"
    finally:
        server.shutdown()
        server.server_close()


def test_openai_request_forms(served):
    engine, url = served
    chat = url + "/v1/chat/completions"
    want = engine.generate(CHAT, max_new_tokens=8).text
    # Content as text parts; the defaults of unsupported fields sent explicitly are accepted.
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}]
    status, r = _post(chat, {"messages": parts, "max_tokens": 8, "logprobs": False, "n": 1, "tools": [],
                             "presence_penalty": 0, "frequency_penalty": 0.0, "response_format": {"type": "text"}})
    assert status == 200
    assert r["choices"][0]["message"]["content"] == engine.generate(
        [{"role": "user", "content": "hi\nthere"}], max_new_tokens=8).text
    # Completions take token ids or a list of one text.
    ids = engine.tokenizer.encode("hello world")
    text = engine.generate("hello world", max_new_tokens=6).text
    for prompt in (ids, ["hello world"]):
        status, c = _post(url + "/v1/completions", {"prompt": prompt, "max_tokens": 6})
        assert status == 200 and c["choices"][0]["text"] == text, prompt
    # stream_options.include_usage: a last chunk with the usage and no choices.
    status, raw = _post(chat, {"messages": CHAT, "max_tokens": 8, "stream": True,
                               "stream_options": {"include_usage": True}}, raw=True)
    chunks = [json.loads(e[len("data: "):]) for e in raw.split("\n\n") if e.startswith("data: {")]
    assert status == 200 and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == len(engine.generate(CHAT, max_new_tokens=8).tokens)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == want


def test_unsupported_fields_are_refused(served):
    engine, url = served
    chat = url + "/v1/chat/completions"
    for extra, name in (({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                        ({"logprobs": True}, "logprobs"), ({"logit_bias": {"5": 10}}, "logit_bias"),
                        ({"presence_penalty": 0.5}, "presence_penalty"),
                        ({"response_format": {"type": "json_object"}}, "response_format"),
                        ({"stream_options": 3}, "stream_options")):
        status, r = _post(chat, {"messages": CHAT, **extra})
        assert status == 400 and name in r["error"]["message"], (extra, r)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    status, r = _post(chat, {"messages": image})
    assert status == 400 and "image_url" in r["error"]["message"]
    status, r = _post(chat, {"messages": [{"role": "user", "content": 5}]})
    assert status == 400 and "content" in r["error"]["message"]
    status, r = _post(url + "/v1/completions", {"prompt": "x", "echo": True})
    assert status == 400 and "echo" in r["error"]["message"]
    status, r = _post(chat, {"messages": [1, 2, 3]})  # token ids are not messages
    assert status == 400 and "messages" in r["error"]["message"]
    status, r = _post(chat, b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}')
    assert status == 400 and "finite" in r["error"]["message"]
    status, r = _post(chat, b"[" * 100000 + b"]" * 100000)
    assert status == 400 and "JSON" in r["error"]["message"]
    calls = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                                               "tool_calls": [{"id": "1", "type": "function"}]}]
    status, r = _post(chat, {"messages": calls})
    assert status == 400 and "content" in r["error"]["message"]


def test_a_server_failure_is_a_500_and_the_server_goes_on(served, monkeypatch):
    engine, url = served
    import medusa_rt.server as server_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(server_module, "_encode_prompt", broken)
    status, r = _post(url + "/v1/chat/completions", {"messages": CHAT})
    assert status == 500 and "boom" in r["error"]["message"] and r["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert _post(url + "/v1/chat/completions", {"messages": CHAT, "max_tokens": 4})[0] == 200


def test_a_client_that_leaves_cancels_its_generation(served, monkeypatch):
    import socket

    from medusa_rt.server import _Handler

    class Probe:
        connection = None

    a, b = socket.socketpair()
    Probe.connection = a
    assert not _Handler._client_gone(Probe)
    b.sendall(b"GET")  # a pipelined request is data, not a departure
    assert not _Handler._client_gone(Probe)
    a.recv(3)
    b.close()
    assert _Handler._client_gone(Probe)
    a.close()
    # A non-streamed request whose client is gone stops after its first token block and answers
    # nothing; its slot is free again at once.
    engine, url = served
    cancelled = []
    real = _Handler._generate

    def spy(self, s, prompt, opts):
        r = real(self, s, prompt, opts)
        cancelled.append((r, s.last_result))
        return r

    monkeypatch.setattr(_Handler, "_client_gone", lambda self: True)
    monkeypatch.setattr(_Handler, "_generate", spy)
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        _post(url + "/v1/chat/completions", {"messages": CHAT, "max_tokens": 100})
    assert cancelled[0][0] is None and cancelled[0][1].finish_reason == "cancelled"
    monkeypatch.undo()
    with engine.session(wait=5), engine.session(wait=5):  # both slots are free
        pass


def test_metrics(served):
    engine, url = served

    def scrape() -> dict:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as m:
            assert m.headers["Content-Type"].startswith("text/plain")
            lines = m.read().decode().splitlines()
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if not line.startswith("#"))}

    before = scrape()
    r = _post(url + "/v1/chat/completions", {"messages": CHAT, "max_tokens": 9})[1]
    assert _post(url + "/v1/chat/completions", {"messages": []})[0] == 400
    after = scrape()

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    ok = 'medusa_rt_requests_total{endpoint="/v1/chat/completions",status="200"}'
    bad = 'medusa_rt_requests_total{endpoint="/v1/chat/completions",status="400"}'
    assert grew(ok) == 1 and grew(bad) == 1
    assert grew("medusa_rt_generation_tokens_total") == r["usage"]["completion_tokens"]
    assert grew("medusa_rt_prompt_tokens_total") == r["usage"]["prompt_tokens"]
    assert grew("medusa_rt_decode_steps_total") >= 1 and grew("medusa_rt_decode_seconds_total") > 0
    assert after["medusa_rt_requests_running"] == 0 and after["medusa_rt_slots"] == 2
