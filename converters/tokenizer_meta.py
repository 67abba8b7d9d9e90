"""Tokenizer metadata for the GGUF, read from a Hugging Face checkpoint folder.

Two kinds, as in llama.cpp's converter:

* ``gpt2`` (byte-level BPE) from ``tokenizer.json``: tokens by id, token types (added special
  tokens are CONTROL, other added tokens USER_DEFINED, ids the tokenizer lacks up to the model's
  vocab size are ``[PAD{id}]`` UNUSED), merges as ``"a b"`` strings, and ``tokenizer.ggml.pre``.
* ``llama`` (SentencePiece) from ``tokenizer.model``: pieces, scores and types.

``tokenizer.ggml.pre`` names the regex pre-tokenizer llama.cpp must apply. llama.cpp's converter
decides it by hashing the token ids of a fixed test text, which only recognizes the exact
vocabularies it has seen. We decide it from what ``tokenizer.json`` declares instead: its
pre-tokenizer steps (digit splitting, the Split regex, byte-level mapping) are compared with
the signatures of the families edgelm and llama.cpp implement. That is equivalent for those
families (same regexes, so the same splits) and works for any vocabulary that uses them;
anything else is an error rather than a silent mis-tokenization.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ConversionError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The Split regexes of the families we recognize, as tokenizer.json spells them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Pre-tokenizer signature (see _signature) -> tokenizer.ggml.pre.
PRE_SIGNATURES: dict[tuple[str, ...], str] = {
    ("digits:individual", "bytelevel:gpt2-regex"): "smollm",      # SmolLM, StarCoder
    ("split:" + _LLAMA3_SPLIT, "bytelevel"): "llama-bpe",          # Llama 3
    ("split:" + _QWEN2_SPLIT, "bytelevel"): "qwen2",               # Qwen2 / Qwen2.5
    ("bytelevel:gpt2-regex",): "gpt-2",                            # GPT-2 itself
}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: malformed: {exc}") from None


def _signature(pre: Any) -> tuple[str, ...]:
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    sig = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            sig.append("bytelevel:gpt2-regex" if step.get("use_regex", True) else "bytelevel")
        elif kind == "Digits":
            sig.append("digits:individual" if step.get("individual_digits") else "digits:grouped")
        elif kind == "Split" and step.get("behavior", "").lower() == "isolated" and not step.get("invert"):
            pattern = step.get("pattern", {})
            sig.append("split:" + str(pattern.get("Regex", pattern.get("String"))))
        else:
            sig.append(f"{kind}:{json.dumps(step, sort_keys=True)}")
    return tuple(sig)


def detect_pre(tokenizer_json: dict[str, Any], path: Path) -> str:
    """``tokenizer.ggml.pre`` for a byte-level BPE ``tokenizer.json`` (see the module docstring)."""
    sig = _signature(tokenizer_json.get("pre_tokenizer"))
    name = PRE_SIGNATURES.get(sig)
    if name is None:
        raise ConversionError(f"{path}: unrecognized BPE pre-tokenizer {list(sig)}; "
                              f"recognized: {', '.join(sorted(set(PRE_SIGNATURES.values())))}")
    return name


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_ids(folder: Path, index: dict[str, int], cfg: dict[str, Any]) -> dict[str, int]:
    """bos/eos/unk/pad ids: tokenizer_config.json's ``*_token`` texts, else config.json's ``*_token_id``."""
    tc_path = folder / "tokenizer_config.json"
    tc = _read_json(tc_path) if tc_path.exists() else {}
    ids: dict[str, int] = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        text = _token_text(tc.get(f"{role}_token"))
        tid = index.get(text) if text is not None else None
        if tid is None:
            raw = cfg.get(f"{role}_token_id")
            tid = raw[0] if isinstance(raw, list) and raw else raw
        if isinstance(tid, int) and tid >= 0:
            ids[f"tokenizer.ggml.{key}_token_id"] = tid
    return ids


def _add_flags(folder: Path, tok: dict[str, Any] | None, index: dict[str, int],
               ids: dict[str, int]) -> dict[str, bool]:
    """add_bos/add_eos: tokenizer_config.json's flags, else what the post-processor template adds."""
    tc_path = folder / "tokenizer_config.json"
    tc = _read_json(tc_path) if tc_path.exists() else {}
    flags = {k: bool(tc[k]) for k in ("add_bos_token", "add_eos_token") if isinstance(tc.get(k), bool)}
    post = (tok or {}).get("post_processor") or {}
    procs = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    template = next((p for p in procs if p.get("type") == "TemplateProcessing"), None)
    if template is not None:
        single = template.get("single", [])
        def special_id(item: dict[str, Any]) -> int | None:
            sp = item.get("SpecialToken")
            return index.get(sp["id"]) if sp else None
        bos, eos = ids.get("tokenizer.ggml.bos_token_id"), ids.get("tokenizer.ggml.eos_token_id")
        flags.setdefault("add_bos_token", bool(single) and special_id(single[0]) == bos and bos is not None)
        flags.setdefault("add_eos_token", bool(single) and special_id(single[-1]) == eos and eos is not None)
    return {f"tokenizer.ggml.{k}": v for k, v in flags.items()}


def chat_template(folder: Path) -> str | None:
    """The chat template: tokenizer_config.json's ``chat_template`` or ``chat_template.jinja``."""
    tc_path = folder / "tokenizer_config.json"
    tmpl = _read_json(tc_path).get("chat_template") if tc_path.exists() else None
    if isinstance(tmpl, list):  # named templates: llama.cpp takes the default one
        tmpl = next((t.get("template") for t in tmpl if t.get("name") == "default"), None)
    jinja = folder / "chat_template.jinja"
    if tmpl is None and jinja.exists():
        tmpl = jinja.read_text(encoding="utf-8")
    return tmpl if isinstance(tmpl, str) else None


def _bpe(folder: Path, vocab_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    path = folder / "tokenizer.json"
    tok = _read_json(path)
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConversionError(f"{path}: model type {model.get('type')!r} is not a byte-level BPE")
    index: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    for tid, t in added.items():
        index[t["content"]] = tid
    if index and max(index.values()) >= vocab_size:
        raise ConversionError(f"{path}: token id {max(index.values())} does not fit the model's "
                              f"vocab_size {vocab_size}")
    by_id = {tid: text for text, tid in index.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(by_id[i])
            types.append((CONTROL if added[i].get("special") else USER_DEFINED) if i in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = _special_ids(folder, index, cfg)
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": detect_pre(tok, path),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        **ids,
        **_add_flags(folder, tok, index, ids),
    }
    return meta


def _spm(folder: Path, vocab_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    import sentencepiece

    path = folder / "tokenizer.model"
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as exc:
        raise ConversionError(f"{path}: not a SentencePiece model ({exc})") from None
    n = sp.GetPieceSize()
    if n > vocab_size:
        raise ConversionError(f"{path}: {n} pieces do not fit the model's vocab_size {vocab_size}")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        if i >= n:
            tokens.append(f"[PAD{i}]"); scores.append(-1000.0); types.append(UNUSED)
            continue
        tokens.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        types.append(UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else
                     UNUSED if sp.IsUnused(i) else BYTE if sp.IsByte(i) else NORMAL)
    _apply_added_tokens(folder, tokens, types)
    index = {t: i for i, t in enumerate(tokens)}
    ids = _special_ids(folder, index, cfg)
    for key, tid in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unknown", sp.unk_id())):
        if tid >= 0:
            ids.setdefault(f"tokenizer.ggml.{key}_token_id", tid)
    # Without protobuf the normalizer spec is not readable; a dummy prefix shows in the pieces.
    add_space = sp.EncodeAsPieces("a")[:1] == ["\u2581a"] or sp.EncodeAsPieces("a")[:1] == ["\u2581"]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_space_prefix": add_space,
        **ids,
        **_add_flags(folder, None, index, ids),
    }


def _apply_added_tokens(folder: Path, tokens: list[str], types: list[int]) -> None:
    """Tokens added on top of a SentencePiece model (chat markers and the like), as llama.cpp does:
    ``added_tokens.json`` (text -> id) and ``tokenizer_config.json``'s ``added_tokens_decoder``
    (id -> {content, special}); special ones are CONTROL, the others USER_DEFINED."""
    added: dict[int, tuple[str, bool]] = {}
    path = folder / "added_tokens.json"
    if path.exists():
        for text, tid in _read_json(path).items():
            added[int(tid)] = (str(text), True)
    path = folder / "tokenizer_config.json"
    decoder = _read_json(path).get("added_tokens_decoder", {}) if path.exists() else {}
    for tid, info in decoder.items():
        added[int(tid)] = (str(info["content"]), bool(info.get("special", False)))
    for tid, (text, special) in sorted(added.items()):
        if not 0 <= tid < len(tokens):
            raise ConversionError(f"{folder}: added token {text!r} has id {tid} outside the vocab of {len(tokens)}")
        if types[tid] in (UNKNOWN, CONTROL, BYTE) and tokens[tid] == text:
            continue  # the model's own <unk>/<s>/</s>/<0x..> pieces keep their types
        tokens[tid] = text
        types[tid] = CONTROL if special else USER_DEFINED


def tokenizer_metadata(folder: str | Path, vocab_size: int, config: dict[str, Any]) -> dict[str, Any]:
    """All ``tokenizer.*`` GGUF keys for the checkpoint in ``folder``.

    ``tokenizer.model`` (SentencePiece) wins over ``tokenizer.json``, as in llama.cpp's converter
    for llama models.
    """
    folder = Path(folder)
    if (folder / "tokenizer.model").exists():
        meta = _spm(folder, vocab_size, config)
    elif (folder / "tokenizer.json").exists():
        meta = _bpe(folder, vocab_size, config)
    else:
        raise ConversionError(f"{folder}: no tokenizer.json or tokenizer.model")
    tmpl = chat_template(folder)
    if tmpl is not None:
        meta["tokenizer.chat_template"] = tmpl
    return meta
