"""``edgelm serve``: an OpenAI-compatible HTTP server on uvicorn + Starlette.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as server-sent events
ending with ``data: [DONE]``, or not), ``GET /v1/models``, ``GET /health``. Errors use OpenAI's
format and status codes (see ``docs/serve.md``). Generation runs on one worker thread behind a
bounded queue (``apps/serve_engine.py``); request bodies are validated by ``apps/serve_schema.py``.

Safety for a server on a desktop: it binds 127.0.0.1 by default; every request's ``Host`` header
must name the bound address (or a loopback alias), so a web page cannot reach it through DNS
rebinding; CORS is off unless ``--cors ORIGIN``; bodies must be ``application/json`` (which a
page can only send cross-origin after a CORS preflight) and at most ``--max-body`` bytes.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import signal
import socket
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

from .serve_engine import Engine, Job
from .serve_schema import APIError, CompletionRequest, parse_json, parse_request

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request

    from ..runtime.model import Model

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
DEFAULT_MAX_BODY = 4 * 2**20


@dataclass
class ServeConfig:
    """What the app needs to know beyond the model (kept on ``app.state.config``)."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    cors: list[str] = field(default_factory=list)
    max_body: int = DEFAULT_MAX_BODY
    model_id: str = "edgelm"
    model_aliases: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # extra Host names (for a non-loopback --host)


def allowed_host_names(cfg: ServeConfig) -> set[str]:
    """Host header names accepted: the bound host, loopback aliases when bound to one, extras."""
    names = {cfg.host.lower().strip("[]"), *(h.lower() for h in cfg.allowed_hosts)}
    if cfg.host in LOOPBACK_NAMES or cfg.host.startswith("127.") or cfg.host in ("0.0.0.0", "::"):
        names.update(LOOPBACK_NAMES)
    if cfg.host in ("0.0.0.0", "::"):  # all interfaces: the machine's own names
        names.update({socket.gethostname().lower(), socket.getfqdn().lower()})
    return names


def split_host(header: str) -> tuple[str, int | None]:
    """``"[::1]:8080"`` -> ("::1", 8080); ``"localhost"`` -> ("localhost", None)."""
    header = header.strip().lower()
    if header.startswith("["):
        host, _, rest = header[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    else:
        host, _, port = header.partition(":")
        port = port or None
    return host, int(port) if port and port.isdigit() else (-1 if port else None)


class HostCheck:
    """ASGI middleware: refuse (403) requests whose Host header is not this server (DNS rebinding)."""

    def __init__(self, app: Any, cfg: ServeConfig):
        self.app, self.cfg, self.names = app, cfg, allowed_host_names(cfg)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            host, port = split_host(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.names or (port is not None and port != self.cfg.port):
                err = APIError(403, "Host header does not name this server (DNS rebinding protection); "
                               "use --allow-host to accept another name", code="invalid_host")
                await json_response(err.body(), 403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status, headers=headers)


def error_response(err: APIError):
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return json_response(err.body(), err.status, headers)


# ---- request plumbing ----

def check_auth(request: "Request") -> None:
    key = request.app.state.config.api_key
    if key is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")


async def read_body(request: "Request") -> bytes:
    """The body, refused with 413 past ``max_body`` -- by Content-Length first, then while it streams
    (a chunked upload has no length to check)."""
    limit = request.app.state.config.max_body
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, "bad Content-Length header", code="invalid_request")
        if int(length) > limit:
            raise APIError(413, f"request body of {length} bytes is over the limit of {limit}", code="body_too_large")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(400, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                       code="unsupported_content_type")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def check_model(request: "Request", req: CompletionRequest) -> str:
    cfg = request.app.state.config
    if req.model is not None and req.model not in (cfg.model_id, *cfg.model_aliases):
        raise APIError(404, f"model {req.model[:200]!r} is not served here; GET /v1/models lists {cfg.model_id!r}",
                       "model", "model_not_found")
    return cfg.model_id


async def watch_disconnect(receive: Any, job: Job) -> None:
    """Cancel ``job`` when the client goes away (after the body is read, receive() only returns on
    disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancelled.set()
            job.emit(("gone", None))  # wakes a stream waiting for the job's next event
            return


def start_job(request: "Request", req: CompletionRequest) -> tuple[Job, asyncio.Queue]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(req, emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    request.app.state.engine.submit(job)  # 503 when the queue is full
    return job, events


async def completion(request: "Request", chat: bool):
    """Handler of both completion endpoints."""
    from starlette.responses import Response

    check_auth(request)
    body = parse_json(await read_body(request))
    req = parse_request(body, chat=chat, max_tokens_limit=request.app.state.engine.model.n_ctx)
    model_id = check_model(request, req)
    job, events = start_job(request, req)
    watcher = asyncio.create_task(watch_disconnect(request.receive, job))
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": model_id}
    try:
        first = await next_event(events, watcher)
        if first is None:  # client gone before the job started
            return Response(status_code=499)
        if first[0] == "error":
            raise first[1]
        if req.stream:
            watcher.cancel()  # the SSE response watches for disconnects itself
            return SSEResponse(sse_events(events, job, req, meta), job)
        pieces: list[str] = []
        while True:
            ev = await next_event(events, watcher)
            if ev is None:
                return Response(status_code=499)
            kind, payload = ev
            if kind == "text":
                pieces.append(payload)
            elif kind == "error":
                raise payload
            elif kind == "done":
                return json_response(final_body(req, meta, "".join(pieces), payload),
                                     headers={"X-EdgeLM-Evicted-Tokens": str(payload["evicted_tokens"])})
    except BaseException:
        job.cancelled.set()  # a cancelled handler (shutdown, disconnect) must free the worker
        raise
    finally:
        if not req.stream:
            watcher.cancel()


async def next_event(events: asyncio.Queue, watcher: asyncio.Task) -> tuple[str, Any] | None:
    """The job's next event, or None if the client disconnected first."""
    if watcher.done():
        return None
    getter = asyncio.ensure_future(events.get())
    done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    return None


def usage_of(done: dict[str, Any]) -> dict[str, Any]:
    return {k: done[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens",
                                 "prompt_tokens_details", "evicted_tokens")}


def final_body(req: CompletionRequest, meta: dict, text: str, done: dict[str, Any]) -> dict[str, Any]:
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": done["finish_reason"]}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage_of(done)}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done["finish_reason"]}
    return {**meta, "object": "text_completion", "choices": [choice], "usage": usage_of(done)}


def chunk(req: CompletionRequest, meta: dict, text: str | None, finish: str | None, first: bool = False) -> dict:
    if req.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**meta, "object": "chat.completion.chunk", "choices": [choice]}
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {**meta, "object": "text_completion", "choices": [choice]}


async def sse_events(events: asyncio.Queue, job: Job, req: CompletionRequest, meta: dict) -> AsyncIterator[bytes]:
    def data(obj: Any) -> bytes:
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

    if req.chat:
        yield data(chunk(req, meta, None, None, first=True))
    while True:
        kind, payload = await events.get()
        if kind == "gone":  # the client disconnected: nobody to write to
            return
        if kind == "text":
            yield data(chunk(req, meta, payload, None))
        elif kind == "error":  # headers are sent: the error goes in the stream, as OpenAI does
            yield data(payload.body())
            break
        elif kind == "done":
            last = chunk(req, meta, None, payload["finish_reason"])
            # Evicted tokens ride on the last chunk (non-standard field; clients ignore it).
            last["usage"] = None if req.include_usage else {"evicted_tokens": payload["evicted_tokens"]}
            yield data(last)
            if req.include_usage:
                yield data({**meta, "object": last["object"], "choices": [], "usage": usage_of(payload)})
            break
    yield b"data: [DONE]\n\n"


class SSEResponse:
    """A server-sent-events response that cancels its job as soon as the client disconnects."""

    def __init__(self, body: AsyncIterator[bytes], job: Job):
        self.body, self.job = body, job

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        watcher = asyncio.create_task(watch_disconnect(receive, self.job))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
            async for data in self.body:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away between our check and the write
            pass
        finally:
            self.job.cancelled.set()  # no-op when finished; stops the worker otherwise
            watcher.cancel()


async def models(request: "Request"):
    check_auth(request)
    cfg = request.app.state.config
    return json_response({"object": "list", "data": [
        {"id": cfg.model_id, "object": "model", "created": int(request.app.state.started), "owned_by": "edgelm"}]})


async def health(request: "Request"):
    """Public (no key), like llama-server's: figures only, no text."""
    return json_response(request.app.state.engine.health())


async def chat_completions(request: "Request"):
    return await completion(request, chat=True)


async def completions(request: "Request"):
    return await completion(request, chat=False)


def create_app(model: "Model", cfg: ServeConfig, max_queue: int = 8, cache_slots: int = 4,
               cache_bytes: int = 256 * 2**20) -> "Starlette":
    """The ASGI app serving ``model``; its engine starts and stops with the app's lifespan."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.routing import Route

    engine = Engine(model, max_queue=max_queue, cache_slots=cache_slots, cache_bytes=cache_bytes)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    async def on_api_error(request: Any, exc: Exception):
        return error_response(exc)  # type: ignore[arg-type]

    async def on_http_error(request: Any, exc: Exception):
        status = getattr(exc, "status_code", 500)
        message = {404: "no such endpoint", 405: "method not allowed"}.get(status, str(getattr(exc, "detail", exc)))
        return error_response(APIError(status, f"{message}: {request.method} {request.url.path}"))

    async def on_error(request: Any, exc: Exception):
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))

    middleware = [Middleware(HostCheck, cfg=cfg)]
    if cfg.cors:
        middleware.append(Middleware(CORSMiddleware, allow_origins=cfg.cors, allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type"]))
    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_error})
    app.state.engine, app.state.config, app.state.started = engine, cfg, time.time()
    return app


# ---- the command ----

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` flags (model, KV cache, threads and governor flags come from the CLI's parents)."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; default: CORS off)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also accept this Host header name (default: the bound host and loopback names)")
    p.add_argument("--max-queue", type=int, default=8, help="requests that may wait; more get 503 (default: %(default)s)")
    p.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY, help="largest request body in bytes (default: %(default)s)")
    p.add_argument("--ctx", type=int, default=None, help="context size in tokens (default: the runtime's)")
    p.add_argument("--cache-slots", type=int, default=4, help="prompt caches kept for reuse (default: %(default)s)")
    p.add_argument("--cache-bytes", default="256MiB", help="memory bound of the prompt caches (default: %(default)s)")
    p.add_argument("--shutdown-timeout", type=float, default=3.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM (default: %(default)s)")
    p.add_argument("--model-id", default=None, help="model name clients send (default: --model)")


def cmd_serve(args: argparse.Namespace) -> int:
    """Handler of ``edgelm serve``: load the model, serve until SIGINT/SIGTERM."""
    import uvicorn

    from ..runtime.governor import parse_bytes
    from .cli import load_model

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    cache_bytes = parse_bytes(args.cache_bytes)
    model = load_model(args, n_ctx=args.ctx, kv_caches=args.cache_slots)
    model_id = args.model_id or str(args.model)
    aliases = (model.name, model.path.name, model.path.stem, str(model.path))
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))  # bound here so that --port 0 knows its port for the Host check
    port = sock.getsockname()[1]
    cfg = ServeConfig(host=args.host, port=port, api_key=args.api_key, cors=args.cors, max_body=args.max_body,
                      model_id=model_id, model_aliases=aliases, allowed_hosts=tuple(args.allow_host))
    app = create_app(model, cfg, max_queue=args.max_queue, cache_slots=args.cache_slots, cache_bytes=cache_bytes)
    print(f"edgelm: serving {model_id} on http://{args.host}:{port}/v1 "
          f"({model.threads} threads, KV {model.kv.bits_k}/{model.kv.bits_v}-bit"
          f"{f', window {model.kv.window}' if model.kv.window else ''}, context {model.n_ctx})",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.shutdown_timeout,
                            access_log=False)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # End in-flight generations at once (their clients get a complete 503 / stream end),
            # so the graceful shutdown does not wait for replies nobody will read.
            app.state.engine.shutdown()
            super().handle_exit(sig, frame)

    # After its graceful shutdown uvicorn re-raises the signal it caught, to the handler that was
    # there before it: make that an exception for SIGTERM (SIGINT's is KeyboardInterrupt already),
    # so both end here, and the command exits 0 after a clean stop.
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        Server(config).run(sockets=[sock])
    except (KeyboardInterrupt, _Stopped):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        model.close()
    print("edgelm: server stopped", file=sys.stderr, flush=True)
    return 0


class _Stopped(BaseException):
    """SIGTERM, re-raised by uvicorn after its graceful shutdown."""


def _raise_stopped(sig: int, frame: Any) -> None:
    raise _Stopped()
