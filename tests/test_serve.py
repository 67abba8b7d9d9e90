"""``edgelm serve`` driven over real HTTP: the ``openai`` client and raw httpx against real uvicorn
servers (subprocesses on free ports) running the default model.

Like llama.cpp's server suite: streamed and non-streamed output agree for a seed, concurrent
clients are all served, a client that times out frees the worker, every error has its status.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

import edgelm  # noqa: E402

KEY = "sk-test"
ORIGIN = "http://app.example"
PKG_PARENT = str(Path(edgelm.__file__).parent.parent)  # the server imports the same edgelm as the tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``edgelm serve`` in a subprocess; ``url`` once /health answers."""

    def __init__(self, model: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": PKG_PARENT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgelm.apps.cli", "serve", "--model", str(model), "--port", str(self.port),
             "--threads", "2", *flags], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300  # a cold numba cache compiles the kernels first
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not start")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(default_gguf):
    s = Server(default_gguf, "--ctx", "512", "--api-key", KEY, "--cors", ORIGIN, "--max-queue", "4",
               "--max-body", "65536", "--model-id", "smol")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def window_server(default_gguf):
    """No key, no CORS, a StreamingLLM window smaller than the context."""
    s = Server(default_gguf, "--ctx", "128", "--kv-window", "64", "--kv-bits", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, body, headers=None, key: str | None = KEY, **kw) -> httpx.Response:
    h = {"Content-Type": "application/json"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers=h, timeout=60, **kw)


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


CHAT = [{"role": "user", "content": "Name three colours."}]


# ---- endpoints and output ----

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["smol"]
    h = server.health()
    assert h["status"] == "ok" and h["memory"]["rss_bytes"] > h["memory"]["weights_bytes"] > 0
    assert "kv_bytes" in h["memory"] and "cpu_s_per_token" in h["throughput"]
    energy = h["throughput"]["energy"]
    assert (isinstance(energy, str) and energy.startswith("not available")) or "RAPL" in energy["counter"]


def test_stream_matches_non_stream(client):
    kw = dict(model="smol", messages=CHAT, max_tokens=16, seed=7, temperature=0.9)
    full = client.chat.completions.create(**kw)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
              if c.choices]
    assert full.choices[0].message.content == "".join(pieces) != ""
    kw = dict(model="smol", prompt="The capital of France is", max_tokens=12, seed=3, temperature=0.7)
    text = client.completions.create(**kw).choices[0].text
    assert text == "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))


def test_usage_counts(client):
    ids = [1, 504, 3458, 282, 4649, 314]  # token ids: prompt_tokens must be exactly this many
    r = client.completions.create(model="smol", prompt=ids, max_tokens=5, temperature=0)
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.completions.create(model="smol", prompt=ids, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    c = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=4, temperature=0)
    assert c.usage.prompt_tokens > 5 and c.usage.completion_tokens <= 4
    assert c.choices[0].finish_reason in ("stop", "length")


def test_stop_strings_and_unknown_fields(server):
    r = post(server, "/v1/completions", {"prompt": "1, 2, 3, 4,", "max_tokens": 20, "temperature": 0,
                                         "stop": ["7"], "logit_bias": {}, "user": "x", "whatever": [1]})
    body = r.json()
    assert r.status_code == 200 and "7" not in body["choices"][0]["text"]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_prefix_reuse(server, client):
    hits = server.health()["prompt_cache"]["hits"]
    first = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=6, temperature=0)
    turn2 = CHAT + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "And three more?"}]
    second = client.chat.completions.create(model="smol", messages=turn2, max_tokens=4, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert server.health()["prompt_cache"]["hits"] >= hits + 1


def test_unicode(server):
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "héllo 🌍 日本 \u0000"}],
                                              "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 0
    assert_error(post(server, "/v1/completions", b'{"prompt": "\\ud800"}'), 400, "prompt")
    assert_error(post(server, "/v1/completions", b'{"prompt": "\xff\xfe"}'), 400)


# ---- concurrency ----

@pytest.mark.parametrize("n", [2, 4])
def test_concurrent_clients(client, n):
    results: list = [None] * n

    def ask(i: int) -> None:
        results[i] = client.completions.create(model="smol", prompt=f"Count to {i + 3}:", max_tokens=6, seed=i)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None and r.usage.completion_tokens > 0 for r in results)


def wait_idle(server, within: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < within:
        q = server.health()["queue"]
        if q["running"] == 0 and q["waiting"] == 0:
            return time.perf_counter() - t0
        time.sleep(0.02)
    raise AssertionError(f"worker still busy after {within} s: {server.health()['queue']}")


def test_client_timeout_frees_slot(server, client):
    cancelled = server.health()["requests"]["cancelled"]
    impatient = client.with_options(timeout=0.1)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model="smol", prompt="Once upon a time", max_tokens=400, temperature=0)
    t0 = time.perf_counter()
    print(f"worker free {wait_idle(server, 1.0):.3f} s after the client's timeout")
    assert server.health()["requests"]["cancelled"] == cancelled + 1
    r = client.completions.create(model="smol", prompt="Hi", max_tokens=2)
    assert r.usage.completion_tokens >= 1 and time.perf_counter() - t0 < 5


def test_disconnect_mid_stream_stops_generation(server):
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
    assert any(line.startswith("data: {") for line in got)
    print(f"worker free {wait_idle(server, 1.0):.3f} s after the disconnect")


def test_queue_full_503(server):
    responses: list[httpx.Response] = []

    def ask() -> None:
        responses.append(post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 8}))

    threads = [threading.Thread(target=ask) for _ in range(10)]  # 1 running + 4 waiting fit
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and statuses.count(503) >= 1 and statuses.count(200) >= 5
    assert assert_error(next(r for r in responses if r.status_code == 503), 503)["code"] == "queue_full"
    assert server.health()["requests"]["rejected"] >= 1
    wait_idle(server, 5)


# ---- errors ----

def test_auth_401(server):
    assert_error(post(server, "/v1/completions", {"prompt": "x"}, key=None), 401)
    assert_error(post(server, "/v1/completions", {"prompt": "x"}, key="wrong"), 401)
    assert httpx.get(server.url + "/v1/models", timeout=5).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_not_found_404(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=1)
    assert_error(post(server, "/v1/completions", {"prompt": "x", "model": "gpt-4o"}), 404, "model")
    assert_error(httpx.get(server.url + "/v1/nothing", timeout=5), 404)
    assert_error(httpx.get(server.url + "/v1/completions", timeout=5), 405)


def test_body_limit_413(server):
    big = {"prompt": "x" * 70000}
    assert_error(post(server, "/v1/completions", big), 413)

    def chunked():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(20):
            yield b" " * 8192
        yield b'{"prompt": "x"}'

    r = httpx.post(server.url + "/v1/completions", content=chunked(), timeout=30,
                   headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    assert_error(r, 413)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**30}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 513}, "max_tokens"),
    ({"prompt": "x", "max_completion_tokens": 2.5}, "max_completion_tokens"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "temperature": 10**400}, "temperature"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": [1, -4]}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "stream_options": []}, "stream_options"),
])
def test_bad_completion_bodies_400(server, body, param):
    assert_error(post(server, "/v1/completions", body), 400, param)


@pytest.mark.parametrize("messages", [
    "hi", [], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 5}], [5],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
])
def test_bad_messages_400(server, messages):
    assert_error(post(server, "/v1/chat/completions", {"messages": messages}), 400)


@pytest.mark.parametrize("raw", [b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}',
                                 b'{"prompt": "x", "temperature": 1e999}', b'{"prompt": ', b"[1, 2]", b"",
                                 b"\x00\x01garbage", b"[" * 100000 + b"]" * 100000, b'{"prompt": 1' + b"0" * 5000 + b"}"])
def test_malformed_json_400(server, raw):
    r = post(server, "/v1/completions", raw)
    assert r.status_code in (400, 413), r.text  # the deep nesting one is over the 64 KiB limit
    assert_error(r, r.status_code)


def test_wrong_content_type_400(server):
    r = post(server, "/v1/completions", '{"prompt": "x"}', headers={"Content-Type": "text/plain"})
    assert_error(r, 400)
    r = httpx.post(server.url + "/v1/completions", data={"prompt": "x"}, headers={"Authorization": f"Bearer {KEY}"})
    assert_error(r, 400)


def test_overlong_prompt_400(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smol", prompt="hello " * 600, max_tokens=4)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 600}], "stream": True})
    assert_error(r, 400)  # refused before the stream starts


# ---- safety ----

def test_wrong_host_refused(server):
    for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1:1", "attacker.localhost"):
        assert_error(httpx.get(server.url + "/health", headers={"Host": host}, timeout=5), 403)
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}", "localhost"):
        assert httpx.get(server.url + "/health", headers={"Host": host}, timeout=5).status_code == 200


def test_cors_only_with_flag(server, window_server):
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(server.url + "/v1/chat/completions", headers=pre, timeout=5)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(server.url + "/health", headers={"Origin": "http://evil.example"}, timeout=5)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.options(window_server.url + "/v1/chat/completions", headers=pre, timeout=5)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(window_server.url + "/health", headers={"Origin": ORIGIN}, timeout=5)
    assert "access-control-allow-origin" not in r.headers


# ---- the windowed server and shutdown ----

def test_window_reports_evicted_tokens(window_server):
    r = post(window_server, "/v1/completions", {"prompt": "one two three " * 120, "max_tokens": 3}, key=None)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    # the window keeps 4 sinks + 64 tokens + a 128-token ring for batches: past 196, tokens go
    assert usage["prompt_tokens"] > 300 and usage["evicted_tokens"] >= usage["prompt_tokens"] - 196
    assert int(r.headers["x-edgelm-evicted-tokens"]) == usage["evicted_tokens"]
    assert_error(post(window_server, "/v1/completions", {"prompt": "x", "max_tokens": 129}, key=None), 400)


def test_sigterm_shuts_down_with_request_in_flight(window_server):
    body = {"prompt": "Once upon a time", "max_tokens": 128, "stream": True}
    with httpx.stream("POST", window_server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        t0 = time.perf_counter()
        window_server.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert window_server.proc.wait(15) == 0
    assert time.perf_counter() - t0 < 5
    # the stream ends properly: the shutdown error as a last event, then [DONE]
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["error"]["code"] == "shutting_down"


def test_health_reports_figures_after_generating(server, client):
    client.completions.create(model="smol", prompt="Hello", max_tokens=3, temperature=0)
    h = server.health()
    t = h["throughput"]
    assert t["tokens"] > 0 and t["cpu_s_per_token"] > 0 and t["decode_tok_s"] > 0
    assert h["memory"]["kv_bytes"] > 0 and h["prompt_cache"]["slots"] >= 1


# ---- the prompt-cache LRU, in-process on small real caches ----

def fake_model(n_ctx: int = 64):
    from types import SimpleNamespace

    from edgelm.runtime.kv_cache import KVSpec, SlotKVCache

    backend = SimpleNamespace(new_cache=lambda n, spec: SlotKVCache(2, 1, 32, n, spec))
    return SimpleNamespace(backend=backend, n_ctx=n_ctx, kv=KVSpec())


def fill(pc, ids: list[int]) -> int:
    """Acquire a slot for ``ids``, 'evaluate' the new tokens, release; returns the cached count."""
    slot, cached = pc.acquire(ids)
    n = len(ids) - cached
    slot.cache.reserve(n)
    slot.cache.update(n)
    slot.history.extend(ids[cached:])
    pc.release(slot)
    return cached


def test_prompt_cache_lru_reuses_the_longest_prefix_and_stays_bounded():
    from edgelm.apps.serve_engine import PromptCache

    per_token = 2 * 1 * 2 * 64  # layers x heads x (k + v) x 64-byte f16 rows
    pc = PromptCache(fake_model(), n_slots=3, max_bytes=50 * per_token)
    a, b = list(range(10, 30)), list(range(100, 120))
    assert fill(pc, a) == 0 and fill(pc, b) == 0 and len(pc.slots) == 2
    assert fill(pc, a + [5, 6]) == 20  # the conversation of `a` goes on in its own slot
    assert fill(pc, b[:3] + [1]) == 0  # a short shared prefix (a chat preamble) does not wipe b:
    assert len(pc.slots) == 3 and fill(pc, b + [7]) == 20  # it took a new slot
    assert fill(pc, b[:15] + [2]) == 15  # trimming a slot to half or more of its tokens is fine
    assert fill(pc, a + [5, 6, 1]) == 22
    assert fill(pc, [7, 8, 9]) == 0 and len(pc.slots) == 3  # full: the LRU slot (b[:3]'s) goes
    assert fill(pc, b[:15] + [2, 3]) == 16  # and a's and b's stay
    fill(pc, list(range(200, 260)))  # 60 tokens alone exceed 50 tokens' bytes: slots are dropped
    assert pc.nbytes_committed() <= 50 * per_token and pc.hits == 5


# ---- validation never fails with anything but a 400 (in-process, no server) ----

def test_validation_fuzz():
    from hypothesis import given, settings, strategies as st

    from edgelm.apps.serve_schema import FIELDS, APIError, parse_json, parse_request

    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8))
    values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                       st.dictionaries(st.text(max_size=5), c, max_size=3)), max_leaves=8)
    keys = st.sampled_from([*FIELDS, "messages", "prompt", "stream_options", "role", "content", "x"])

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(keys, values, max_size=6), st.booleans(), st.binary(max_size=40))
    def check(body: dict, chat: bool, raw: bytes) -> None:
        for b in (body, raw):
            try:
                parsed = parse_json(b) if isinstance(b, bytes) else b
                parse_request(parsed, chat=chat, max_tokens_limit=512)
            except APIError as e:
                assert e.status == 400 and e.body()["error"]["message"]

    check()
