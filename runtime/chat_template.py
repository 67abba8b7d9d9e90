"""Chat templates (``tokenizer.chat_template``) rendered safely, as HF's apply_chat_template does.

A chat template comes from a downloaded model file, so it is untrusted code: rendering it with a
plain ``jinja2.Environment`` lets ``{{ cycler.__init__.__globals__.os.system(...) }}`` run
arbitrary commands (the published llama-cpp-python CVE). Templates here run in Jinja's
``ImmutableSandboxedEnvironment``, hardened further:

* any access to an unsafe attribute fails at once (Jinja's default returns a poisoned Undefined
  that renders as an empty string until touched again);
* ``*`` and ``**`` refuse to build huge strings, lists or integers;
* the rendered text is streamed and cut off beyond ``max_output_chars``.

The template sees what HF provides: ``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``, ``raise_exception``, ``strftime_now``, a ``tojson`` filter with HF's semantics
(no HTML escaping, ``indent``/``separators``/``sort_keys``), ``trim_blocks``/``lstrip_blocks``,
the loop-controls extension and a pass-through ``{% generation %}`` tag.
"""
from __future__ import annotations

import json
import operator
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# The ChatML layout, used when a model ships no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MAX_OUTPUT_CHARS = 1 << 22  # far above any context window's worth of text
MAX_SOURCE_CHARS = 1 << 20
_MAX_SEQUENCE_LEN = 1 << 22  # longest str/list a template may build with `*`
_MAX_POW_BITS = 1 << 16  # largest integer (in bits) a template may build with `**`


class ChatTemplateError(ValueError):
    """The template is invalid, failed while rendering, or was refused by the sandbox."""


class _RaisedByTemplate(jinja2.TemplateError):
    """What ``raise_exception(msg)`` throws inside a template."""


def _raise_exception(message: str) -> None:
    raise _RaisedByTemplate(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF overrides Jinja's tojson: no HTML escaping, non-ASCII kept, json.dumps options exposed.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (HF's assistant-span marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, failing loudly and bounding what operators may allocate."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} "
                            "object is not allowed in a chat template")

    def call_binop(self, context: jinja2.runtime.Context, op: str, left: Any, right: Any) -> Any:
        if op == "*":
            for seq, count in ((left, right), (right, left)):
                if (isinstance(seq, (str, list, tuple)) and isinstance(count, int)
                        and len(seq) * count > _MAX_SEQUENCE_LEN):
                    raise SecurityError("chat template builds a sequence that is too long")
            return operator.mul(left, right)
        if (isinstance(left, int) and isinstance(right, int)
                and right > 0 and abs(left) > 1 and abs(left).bit_length() * right > _MAX_POW_BITS):
            raise SecurityError("chat template builds an integer that is too large")
        return operator.pow(left, right)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise ChatTemplateError(f"messages must be a list of dicts, not {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be a dict, not {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ChatTemplateError(f"messages[{i}][{key!r}] must be a str")


class ChatTemplate:
    """A compiled, sandboxed chat template.

    ``source=None`` uses ChatML. ``bos_token``/``eos_token`` are the texts the template may
    reference (HF passes the tokenizer's special-token strings).
    """

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "",
                 max_output_chars: int = MAX_OUTPUT_CHARS):
        if source is None:
            source = CHATML_TEMPLATE
        if not isinstance(source, str):
            raise ChatTemplateError(f"chat template must be a str, not {type(source).__name__}")
        if len(source) > MAX_SOURCE_CHARS:
            raise ChatTemplateError(f"chat template longer than {MAX_SOURCE_CHARS} characters")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.max_output_chars = max_output_chars
        env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                       extensions=[loopcontrols, _GenerationTag])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(
                f"chat template syntax error (line {e.lineno}): {e.message}") from None

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], tokenizer: Tokenizer) -> ChatTemplate:
        """The model's ``tokenizer.chat_template`` (ChatML if absent), with its BOS/EOS texts."""

        def text(token_id: int | None) -> str:
            return "" if token_id is None else tokenizer.token_text(token_id)

        return cls(meta.get("tokenizer.chat_template"), bos_token=text(tokenizer.bos_id),
                   eos_token=text(tokenizer.eos_id))

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for ``messages`` (dicts with str ``role`` and ``content``).

        ``extra`` becomes template variables (e.g. ``tools``, ``date_string``) and may override
        ``bos_token``/``eos_token``. Any failure inside the template raises ChatTemplateError.
        """
        _check_messages(messages)
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **extra,
                     "messages": messages, "add_generation_prompt": add_generation_prompt}
        chunks: list[str] = []
        size = 0
        try:
            # Streamed, so a runaway template stops at the limit instead of exhausting memory.
            for chunk in self._template.generate(**variables):
                size += len(chunk)
                if size > self.max_output_chars:
                    raise ChatTemplateError(
                        f"rendered chat exceeds {self.max_output_chars} characters")
                chunks.append(chunk)
        except ChatTemplateError:
            raise
        except _RaisedByTemplate as e:
            raise ChatTemplateError(f"chat template raised an error: {e.message}") from None
        except SecurityError as e:
            raise ChatTemplateError(f"chat template refused by the sandbox: {e}") from None
        except Exception as e:  # anything else thrown by untrusted template code
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
        return "".join(chunks)
