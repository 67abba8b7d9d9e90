"""Request bodies of the OpenAI-compatible server: parsing, validation and the error format.

Validation is hand-written (no pydantic) and strict about types but lenient about presence:
unknown fields are ignored, as OpenAI's own server does, while a known field of the wrong type,
a NaN/inf number or a value out of range is a 400 naming the field in ``param``. Python's
``json`` accepts ``NaN``/``Infinity`` literals and turns ``1e999`` into ``inf``; both are
refused here because they would otherwise reach the sampler.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

# Roles the chat templates know; "developer" is OpenAI's newer name for "system".
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 16  # OpenAI allows 4; a few more cost nothing
MAX_SEED = 2**63 - 1


class APIError(Exception):
    """An error answered in OpenAI's format: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _ERROR_TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                503: "server_overloaded"}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; a 400 for anything else (bad UTF-8, bad JSON, NaN, depth)."""
    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=no_constant)
    except RecursionError:
        raise bad("JSON nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int too long, NaN literal
        raise bad(f"could not parse the JSON body: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    return body


# ---- field checkers: each takes (name, value) and returns the cleaned value or raises a 400 ----

def _string(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise bad(f"{name} must be a string, got {type(v).__name__}", name, "invalid_type")
    try:
        v.encode("utf-8")  # lone surrogates ("\\ud800") are valid JSON but not text
    except UnicodeEncodeError:
        raise bad(f"{name} is not valid Unicode text (lone surrogate)", name, "invalid_value") from None
    return v


def _number(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[str, Any], float]:
    def check(name: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise bad(f"{name} must be a number, got {type(v).__name__}", name, "invalid_type")
        try:
            x = float(v)
        except OverflowError:  # an integer with hundreds of digits
            x = math.inf
        if not math.isfinite(x):
            raise bad(f"{name} must be a finite number, got {v!r}", name, "invalid_value")
        if (lo is not None and (x < lo or (lo_open and x == lo))) or (hi is not None and x > hi):
            rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise bad(f"{name} must be in {rng}, got {v!r}", name, "invalid_value")
        return x
    return check


def _integer(lo: int | None = None, hi: int | None = None) -> Callable[[str, Any], int]:
    def check(name: str, v: Any) -> int:
        # 5.0 is accepted as 5 (JavaScript clients have no integers); 5.5 is not.
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise bad(f"{name} must be an integer, got {v!r}"[:200], name, "invalid_type")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise bad(f"{name} must be in [{lo}, {hi}], got {v}"[:200], name, "invalid_value")
        return int(v)
    return check


def _boolean(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise bad(f"{name} must be a boolean, got {type(v).__name__}", name, "invalid_type")
    return v


def _stop(name: str, v: Any) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or len(stops) > MAX_STOP:
        raise bad(f"{name} must be a string or a list of at most {MAX_STOP} strings", name, "invalid_type")
    out = [_string(name, s) for s in stops]
    if any(not s for s in out):
        raise bad(f"{name} strings must not be empty", name, "invalid_value")
    return out


def _seed(name: str, v: Any) -> int:
    # OpenAI takes any int64; the sampler's generator wants a non-negative one.
    return _integer(-MAX_SEED - 1, MAX_SEED)(name, v) % 2**64


def _content(name: str, v: Any) -> str:
    """A message's content: a string, null, or a list of ``{"type": "text", "text": ...}`` parts."""
    if v is None:
        return ""
    if isinstance(v, str):
        return _string(name, v)
    if not isinstance(v, list):
        raise bad(f"{name} must be a string or a list of content parts", name, "invalid_type")
    texts = []
    for part in v:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise bad(f"{name}: only text content parts are supported", name, "invalid_value")
        texts.append(_string(f"{name}.text", part.get("text")))
    return "".join(texts)


def _messages(name: str, v: Any) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise bad(f"{name} must be a non-empty list of messages", name, "invalid_type")
    out = []
    for i, m in enumerate(v):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object", where, "invalid_type")
        role = _string(f"{where}.role", m.get("role"))
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}"[:200], f"{where}.role",
                      "invalid_value")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(f"{where}.content", m.get("content"))})
    return out


def _prompt(name: str, v: Any) -> str | list[int]:
    """A string, a list of one string, or a list of token ids (a batch of prompts is not served)."""
    if isinstance(v, str):
        return _string(name, v)
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        return _string(name, v[0])
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return v
    raise bad(f"{name} must be a string or a list of token ids (one prompt per request)", name, "invalid_type")


def _model(name: str, v: Any) -> str:
    return _string(name, v)


# Known fields -> checker. `None` values are treated as absent (OpenAI clients send explicit nulls).
FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "model": _model,
    "max_tokens": _integer(lo=0),
    "max_completion_tokens": _integer(lo=0),
    "temperature": _number(0.0, None),
    "top_p": _number(0.0, 1.0),
    "top_k": _integer(),
    "min_p": _number(0.0, 1.0),
    "seed": _seed,
    "stop": _stop,
    "presence_penalty": _number(-2.0, 2.0),
    "frequency_penalty": _number(-2.0, 2.0),
    "repeat_penalty": _number(0.0, None, lo_open=True),
    "stream": _boolean,
    "n": _integer(1, 1),
}
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                   "frequency_penalty", "repeat_penalty")


@dataclass
class CompletionRequest:
    """A validated chat or text completion request."""

    chat: bool
    model: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # keywords of SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_request(body: dict[str, Any], chat: bool, max_tokens_limit: int) -> CompletionRequest:
    """Validate a ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` body."""
    values = {k: check(k, body[k]) for k, check in FIELDS.items() if body.get(k) is not None}
    req = CompletionRequest(chat=chat, model=values.get("model"), stop=values.get("stop", []),
                            stream=values.get("stream", False),
                            sampling={k: values[k] for k in SAMPLING_FIELDS if k in values})
    if chat:
        if body.get("messages") is None:
            raise bad("messages is required", "messages", "missing_field")
        req.messages = _messages("messages", body["messages"])
    else:
        if body.get("prompt") is None:
            raise bad("prompt is required", "prompt", "missing_field")
        req.prompt = _prompt("prompt", body["prompt"])
    # max_completion_tokens is the newer name; when both are given it wins, as in OpenAI's API.
    name = "max_completion_tokens" if "max_completion_tokens" in values else "max_tokens"
    req.max_tokens = values.get(name)
    if req.max_tokens is not None and req.max_tokens > max_tokens_limit:
        raise bad(f"{name} is {req.max_tokens} but this server generates at most {max_tokens_limit} "
                  f"tokens per request (its context size)", name, "invalid_value")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options must be an object", "stream_options", "invalid_type")
        if options.get("include_usage") is not None:
            req.include_usage = _boolean("stream_options.include_usage", options["include_usage"])
    return req
