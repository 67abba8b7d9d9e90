"""Chat templates: exact ChatML output, parity with llama-cpp-python, and the sandbox holding."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import pytest

from edgelm.runtime.chat_template import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError
from edgelm.runtime.tokenizer import Tokenizer

from vocab_factory import read_metadata

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CONVERSATION = (
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And times 3? Answer in <b>bold</b> — ünïcödé welcome."},
)

INJECTIONS = (
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ joiner.__init__.__globals__.os.getcwd() }}",
    "{{ lipsum.__globals__['os'].getcwd() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% set x = messages.append({'role': 'x', 'content': 'y'}) %}",
    "{{ messages[0].update({'role': 'x'}) }}",
)


def chatml(messages: tuple[dict[str, str], ...] | list[dict[str, str]], prompt: bool = True) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if prompt else "")


@pytest.fixture(scope="module")
def smol_meta(default_gguf: Path) -> dict[str, Any]:
    return read_metadata(default_gguf)


@pytest.fixture(scope="module")
def smol_template(smol_meta: dict[str, Any]) -> ChatTemplate:
    return ChatTemplate.from_metadata(smol_meta, Tokenizer.from_metadata(smol_meta))


def test_default_model_renders_chatml_with_default_system(smol_template: ChatTemplate) -> None:
    expected = chatml(({"role": "system", "content": SMOL_SYSTEM}, *CONVERSATION))
    assert smol_template.render(list(CONVERSATION)) == expected
    system = {"role": "system", "content": "Be terse."}
    assert smol_template.render([system, *CONVERSATION]) == chatml((system, *CONVERSATION))
    no_prompt = smol_template.render(list(CONVERSATION), add_generation_prompt=False)
    assert no_prompt == expected.removesuffix("<|im_start|>assistant\n")


def test_default_model_bos_eos_texts(smol_template: ChatTemplate) -> None:
    assert (smol_template.bos_token, smol_template.eos_token) == ("<|im_start|>", "<|im_end|>")


@pytest.mark.parametrize("prompt", [True, False])
def test_matches_llama_cpp_python(smol_meta: dict[str, Any], smol_template: ChatTemplate,
                                  prompt: bool) -> None:
    chat_format = pytest.importorskip("llama_cpp.llama_chat_format")
    reference = chat_format.Jinja2ChatFormatter(
        template=smol_meta["tokenizer.chat_template"], eos_token=smol_template.eos_token,
        bos_token=smol_template.bos_token, add_generation_prompt=prompt)
    conversations = (
        [CONVERSATION[0]],
        list(CONVERSATION),
        [{"role": "system", "content": "sys"}, *CONVERSATION],
        [{"role": "user", "content": ""}],
        [],
    )
    for messages in conversations:
        ours = smol_template.render(messages, add_generation_prompt=prompt)
        assert ours == reference(messages=messages).prompt


def test_hf_features_match_reference_template(smol_template: ChatTemplate) -> None:
    # A template exercising what HF's apply_chat_template environment offers, rendered by
    # llama-cpp-python (which mirrors HF's environment) and by us.
    chat_format = pytest.importorskip("llama_cpp.llama_chat_format")
    source = (
        "{{ bos_token }}\n"
        "{% for m in messages %}\n"
        "  {% if m.role == 'system' %}{% continue %}{% endif %}\n"
        "  [{{ m.role }}] {{ m.content }}{{ eos_token }}\n"
        "  {% if loop.index > 5 %}{% break %}{% endif %}\n"
        "{% endfor %}\n"
        "{% generation %}tools={{ tools | tojson(indent=2, sort_keys=True) }}{% endgeneration %}\n"
        "{{ messages | tojson }}|{{ {'b': 1, 'a': '<é>'} | tojson(separators=(',', ':')) }}\n"
    )
    tools = [{"name": "f", "description": "ünï <x>", "parameters": {"z": 1, "a": 2}}]
    messages = [{"role": "system", "content": "s"}, *CONVERSATION]
    ours = ChatTemplate(source, bos_token="<s>", eos_token="</s>").render(messages, tools=tools)
    reference = chat_format.Jinja2ChatFormatter(template=source, eos_token="</s>", bos_token="<s>")
    assert ours == reference(messages=messages, tools=tools).prompt
    assert json.dumps(tools, ensure_ascii=False, indent=2, sort_keys=True) in ours
    assert "<é>" in ours  # no HTML escaping, no \\u escapes


def test_chatml_default_and_missing_metadata_template(smol_meta: dict[str, Any]) -> None:
    assert ChatTemplate(None).render(list(CONVERSATION)) == chatml(CONVERSATION)
    assert ChatTemplate(None).source == CHATML_TEMPLATE
    meta = {k: v for k, v in smol_meta.items() if k != "tokenizer.chat_template"}
    template = ChatTemplate.from_metadata(meta, Tokenizer.from_metadata(meta))
    assert template.render(list(CONVERSATION)) == chatml(CONVERSATION)


@pytest.mark.parametrize("source", INJECTIONS)
def test_injection_is_refused(source: str) -> None:
    messages = [dict(m) for m in CONVERSATION]
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source).render(messages)
    assert messages == list(CONVERSATION)  # nothing was mutated either


def test_injection_reaches_os_without_sandbox() -> None:
    # The payload is real: plain Jinja hands the template the os module (getcwd is harmless).
    source = "{{ cycler.__init__.__globals__.os.getcwd() }}"
    assert jinja2.Environment().from_string(source).render() == str(Path.cwd())
    with pytest.raises(ChatTemplateError, match="not allowed"):
        ChatTemplate(source).render([])


def test_injection_executes_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payloads = (
        f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}",
        f"{{{{ lipsum.__globals__.os.popen('touch {marker}').read() }}}}",
        "{% for c in ''.__class__.__base__.__subclasses__() %}{% if c.__name__ == 'Popen' %}"
        f"{{{{ c(['touch', '{marker}']) }}}}{{% endif %}}{{% endfor %}}",
    )
    for source in payloads:
        with pytest.raises(ChatTemplateError):
            ChatTemplate(source).render([])
    assert not marker.exists()


def test_raise_exception_message() -> None:
    source = ("{% if messages[0]['role'] != 'system' %}"
              "{{ raise_exception('Conversations must start with a system message') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="Conversations must start with a system message"):
        ChatTemplate(source).render(list(CONVERSATION))


@pytest.mark.parametrize("source", [
    "{{ 'x' * 100000000 }}",
    "{{ [1] * 100000000 }}",
    "{{ 7 ** 100000000 }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}0123456789{% endfor %}{% endfor %}",
])
def test_resource_bombs_are_refused(source: str) -> None:
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source).render([])


def test_output_size_is_bounded() -> None:
    template = ChatTemplate(None, max_output_chars=100)
    with pytest.raises(ChatTemplateError, match="exceeds 100 characters"):
        template.render([{"role": "user", "content": "x" * 200}])
    assert template.render([{"role": "user", "content": "short"}]).startswith("<|im_start|>")


def test_template_errors_become_chat_template_errors() -> None:
    with pytest.raises(ChatTemplateError, match="syntax error"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):
        ChatTemplate("{{ 1 / 0 }}").render([])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages[0].content + 1 }}").render([{"role": "u", "content": "c"}])
    with pytest.raises(ChatTemplateError):
        ChatTemplate(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("messages", [
    "hello",
    {"role": "user", "content": "hi"},
    ["hi"],
    [{"role": "user"}],
    [{"role": None, "content": "hi"}],
    [{"role": "user", "content": ["a", "b"]}],
])
def test_messages_are_validated(messages: Any) -> None:
    with pytest.raises(ChatTemplateError, match="messages"):
        ChatTemplate(None).render(messages)


def test_extra_variables_and_strftime() -> None:
    source = "{{ date_string }}|{{ strftime_now('%Y') | length }}|{{ bos_token }}"
    out = ChatTemplate(source, bos_token="<s>").render([], date_string="26 Jul 2024")
    assert out == "26 Jul 2024|4|<s>"
