"""Tokenizer built from GGUF metadata that reproduces llama.cpp's token ids exactly.

Usage (``meta`` maps GGUF keys to values)::

    tok = Tokenizer.from_metadata(meta)
    ids = tok.encode("<|im_start|>user\\nhi<|im_end|>")   # control-token text -> its id
    text = tok.decode(ids)

Everything llama.cpp does around the segmentation itself lives here: reading the vocabulary and
its token types, the special-token defaults per tokenizer model, the text-based detection of
end-of-generation tokens, splitting special-token text out of the input before segmentation, and
turning ids back into bytes. Segmentation is delegated to ``tokenizer_bpe`` (byte-level BPE,
``tokenizer.ggml.model == "gpt2"``) or ``tokenizer_spm`` (SentencePiece-style, ``"llama"``).
"""
from __future__ import annotations

import codecs
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

from .tokenizer_bpe import PRE_TOKENIZERS, BPESegmenter
from .tokenizer_spm import MissingByteToken, SPMSegmenter

_KEY = "tokenizer.ggml."


class TokenizerError(ValueError):
    """Unsupported or malformed tokenizer metadata, or input the tokenizer cannot handle."""


class TokenAttr:
    """llama.cpp's per-token attribute bits (``llama_token_attr``).

    Plain ints rather than an IntFlag: they are tested once per token while building, and enum
    arithmetic would cost a large share of the build time budget.
    """

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    NORMALIZED = 1 << 6
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8
    SINGLE_WORD = 1 << 9


# tokenizer.ggml.token_type values (gguf TokenType) -> attribute.
_TYPE_ATTR: Mapping[int, int] = MappingProxyType({
    1: TokenAttr.NORMAL,
    2: TokenAttr.UNKNOWN,
    3: TokenAttr.CONTROL,
    4: TokenAttr.USER_DEFINED,
    5: TokenAttr.UNUSED,
    6: TokenAttr.BYTE,
})
_SPECIAL = TokenAttr.CONTROL | TokenAttr.USER_DEFINED | TokenAttr.UNKNOWN
_HIDDEN = TokenAttr.CONTROL | TokenAttr.UNKNOWN  # not rendered unless special text is asked for
_C_SPACE = " \t\n\v\f\r"  # C isspace(): what llama.cpp's lstrip/rstrip attributes remove

# Roles llama.cpp fills from token text when the metadata leaves them unset (llama-vocab.cpp);
# the detected token is forced to CONTROL.
_ROLE_TEXTS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
            "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
            "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
})
# Token texts that end generation whatever the metadata says.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
})
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss

# Metadata keys of each special-token role; later keys (deprecated names) win, as in llama.cpp.
_ROLE_KEYS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "bos": ("bos_token_id",), "eos": ("eos_token_id",), "eot": ("eot_token_id",),
    "eom": ("eom_token_id",), "unk": ("unknown_token_id",),
    "fim_pre": ("fim_pre_token_id", "prefix_token_id"),
    "fim_suf": ("fim_suf_token_id", "suffix_token_id"),
    "fim_mid": ("fim_mid_token_id", "middle_token_id"),
    "fim_pad": ("fim_pad_token_id",), "fim_rep": ("fim_rep_token_id",),
    "fim_sep": ("fim_sep_token_id",),
})
# llama.cpp's special ids per tokenizer model when the metadata has none.
_DEFAULT_IDS: Mapping[str, tuple[tuple[str, int], ...]] = MappingProxyType({
    "llama": (("bos", 1), ("eos", 2), ("unk", 0)),
    "gpt2": (("bos", 11), ("eos", 11)),
})


class _Segmenter(Protocol):
    def encode_fragments(self, fragments: Sequence[str | int]) -> list[int]: ...

    def normal_piece(self, text: str) -> bytes: ...


def _array(meta: Mapping[str, Any], key: str) -> list[Any] | None:
    value = meta.get(key)
    if value is None:
        return None
    # ndarray.tolist() yields Python scalars in one C call.
    return value.tolist() if isinstance(value, np.ndarray) else list(value)


def _tokens(meta: Mapping[str, Any]) -> list[str]:
    raw = _array(meta, _KEY + "tokens")
    if not raw:
        raise TokenizerError(f"metadata has no {_KEY}tokens")
    return [t if t else f"[EMPTY_{i}]" for i, t in enumerate(raw)]  # llama.cpp's placeholder


def _attributes(meta: Mapping[str, Any], n: int) -> list[int]:
    types = _array(meta, _KEY + "token_type")
    if types is None:
        return [TokenAttr.NORMAL] * n
    if len(types) < n:
        raise TokenizerError(f"{_KEY}token_type has {len(types)} entries for {n} tokens")
    return [_TYPE_ATTR.get(t, TokenAttr.UNDEFINED) for t in types[:n]]


def _special_ids(meta: Mapping[str, Any], model: str, n: int) -> dict[str, int | None]:
    ids: dict[str, int | None] = dict.fromkeys(_ROLE_KEYS)
    for role, default in _DEFAULT_IDS[model]:
        ids[role] = default if default < n else None
    for role, keys in _ROLE_KEYS.items():
        for key in keys:
            value = meta.get(_KEY + key)
            if value is not None and 0 <= int(value) < n:  # out of range: keep the default
                ids[role] = int(value)
    return ids


def _segmenter(meta: Mapping[str, Any], model: str,
               index: Mapping[str, int]) -> tuple[_Segmenter, bool]:
    """The segmenter for ``model`` and llama.cpp's add_bos default that goes with it."""
    if model == "llama":
        scores = _array(meta, _KEY + "scores")
        n = len(index)
        scores = [0.0] * n if scores is None else [float(s) for s in scores[:n]]
        add_space_prefix = bool(meta.get(_KEY + "add_space_prefix", True))
        return SPMSegmenter(index, scores, add_space_prefix), True
    pre = meta.get(_KEY + "pre") or "default"  # llama.cpp treats a missing pre as "default"
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        supported = ", ".join(sorted(PRE_TOKENIZERS))
        raise TokenizerError(f"unsupported BPE pre-tokenizer {pre!r}; supported: {supported}")
    merges = _array(meta, _KEY + "merges")
    if merges is None:
        raise TokenizerError(f"BPE vocabulary without {_KEY}merges")
    return BPESegmenter(index, merges, spec), spec.add_bos_default


def _detect_roles_and_eog(
    tokens: Sequence[str], index: Mapping[str, int], attrs: list[int], ids: dict[str, int | None]
) -> frozenset[int]:
    """Fill unset roles and the end-of-generation set from token text, as llama.cpp does.

    llama.cpp walks a hash map, so when several texts of one role are present its pick is
    arbitrary; the lowest id is taken here. Updates ``attrs`` in place.
    """
    for role, texts in _ROLE_TEXTS.items():
        if ids[role] is None:
            found = sorted(index[t] for t in texts if t in index)
            if found:
                ids[role] = found[0]
                attrs[found[0]] |= TokenAttr.CONTROL
    eog = {ids[r] for r in ("fim_pad", "fim_rep", "fim_sep") if ids[r] is not None}
    for text in _EOG_TEXTS & index.keys():
        eog.add(index[text])
        attrs[index[text]] |= TokenAttr.CONTROL
    for text in _ALWAYS_RENDERED:
        if text in index:
            attrs[index[text]] = TokenAttr.USER_DEFINED
    eog.update(ids[r] for r in ("eos", "eot", "eom") if ids[r] is not None)

    texts = {tokens[i] for i in eog}
    # Harmony-style vocabularies use "<|end|>" as a mere message separator.
    if "<|end|>" in texts and (
        {"<|return|>", "<|call|>"} <= texts or {"<|calls|>", "<|flush|>"} <= texts
    ):
        eog.discard(index["<|end|>"])
        attrs[index["<|end|>"]] = TokenAttr.USER_DEFINED
    # Gemma-4-style vocabularies: "</s>" is ordinary text there.
    if {"<|tool_response>", "</s>"} <= texts:
        eog.discard(index["</s>"])
        attrs[index["</s>"]] = TokenAttr.NORMAL
    return frozenset(eog)


def _special_order(tokens: Sequence[str], attrs: Sequence[int]) -> list[int]:
    """Ids split out of the input before segmentation: longest text first (UTF-8 length, as
    llama.cpp sorts its std::strings), ties by id."""
    special = (i for i, a in enumerate(attrs) if a & _SPECIAL)
    return sorted(special, key=lambda i: (-len(tokens[i].encode("utf-8")), i))


def _apply_strip_rules(meta: Mapping[str, Any], index: Mapping[str, int], attrs: list[int],
                       special_order: Sequence[int]) -> None:
    """Per-model whitespace stripping around special tokens (llama.cpp keys it on the name)."""
    name = str(meta.get("general.name", "")).lower()
    if "phi-3" not in name and "phi3" not in name:
        return
    for tid in special_order:
        attrs[tid] |= TokenAttr.RSTRIP
    if "</s>" in index:
        attrs[index["</s>"]] |= TokenAttr.RSTRIP
    for text in ("<unk>", "<s>", "<|endoftext|>"):
        if text in index:
            attrs[index[text]] &= ~TokenAttr.RSTRIP


class Tokenizer:
    """Text <-> token ids for a GGUF vocabulary, matching llama.cpp (``llama_tokenize``).

    Attributes: ``vocab_size``; ``bos_id``/``eos_id`` (None when the model has none);
    ``add_bos``/``add_eos`` (what ``encode(add_special=True)`` adds); ``eog_ids`` (ids that end
    generation). Build with :meth:`from_metadata`.
    """

    def __init__(self, *, tokens: Sequence[str], attrs: Sequence[int],
                 segmenter: _Segmenter, ids: Mapping[str, int | None], add_bos: bool,
                 add_eos: bool, eog_ids: frozenset[int], special_order: Sequence[int]):
        self._tokens = list(tokens)
        self._attrs = list(attrs)
        self._segmenter = segmenter
        self.vocab_size: int = len(self._tokens)
        self.bos_id: int | None = ids["bos"]
        self.eos_id: int | None = ids["eos"]
        self.unk_id: int | None = ids["unk"]
        self.add_bos: bool = add_bos
        self.add_eos: bool = add_eos
        self.eog_ids: frozenset[int] = eog_ids
        self._special_order = list(special_order)
        self._pieces: list[bytes | None] = [None] * self.vocab_size  # filled lazily

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (``tokenizer.ggml.*``; numeric arrays as lists or ndarrays)."""
        model = meta.get(_KEY + "model")
        if model not in _DEFAULT_IDS:
            raise TokenizerError(f"unsupported tokenizer model {model!r}: "
                                 "supported are 'gpt2' (BPE) and 'llama' (SentencePiece)")
        tokens = _tokens(meta)
        n = len(tokens)
        index = {text: i for i, text in enumerate(tokens)}
        if len(index) != n:
            raise TokenizerError("duplicate token text in the vocabulary")
        attrs = _attributes(meta, n)
        ids = _special_ids(meta, model, n)
        segmenter, add_bos_default = _segmenter(meta, model, index)
        add_bos = bool(meta.get(_KEY + "add_bos_token", add_bos_default))
        add_eos = bool(meta.get(_KEY + "add_eos_token", False))
        for flag, role in ((add_bos, "bos"), (add_eos, "eos")):
            if flag and ids[role] is None:
                raise TokenizerError(f"add_{role}_token is set but the model has no {role} token")
        eog = _detect_roles_and_eog(tokens, index, attrs, ids)
        special_order = _special_order(tokens, attrs)
        _apply_strip_rules(meta, index, attrs, special_order)
        return cls(tokens=tokens, attrs=attrs, segmenter=segmenter, ids=ids, add_bos=add_bos,
                   add_eos=add_eos, eog_ids=eog, special_order=special_order)

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        ``add_special`` adds BOS/EOS as the model's metadata asks (``add_bos``/``add_eos``);
        ``parse_special`` turns the text of control tokens (e.g. ``<|im_start|>``) into their ids.
        User-defined tokens are always matched, as in llama.cpp.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes str, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenizerError(f"text is not valid Unicode: {e}") from None
        ids: list[int] = []
        if add_special and self.add_bos:
            ids.append(self.bos_id)  # type: ignore[arg-type]  # checked in from_metadata
        try:
            ids += self._segmenter.encode_fragments(self._partition(text, parse_special))
        except MissingByteToken as e:
            raise TokenizerError(str(e)) from None
        if add_special and self.add_eos:
            ids.append(self.eos_id)  # type: ignore[arg-type]
        return ids

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split special-token text out of ``text``: strings left to segment, ints already ids.

        Like llama.cpp, each special token (longest first) is searched in every remaining text
        fragment in turn, so a longer token wins over a shorter one it contains.
        """
        fragments: list[str | int] = [text] if text else []
        for tid in self._special_order:
            if not parse_special and self._attrs[tid] & _HIDDEN:
                continue
            needle = self._tokens[tid]
            if any(isinstance(f, str) and needle in f for f in fragments):
                fragments = [piece for f in fragments for piece in self._split_at(f, tid, needle)]
        return fragments

    def _split_at(self, fragment: str | int, tid: int, needle: str) -> list[str | int]:
        """``fragment`` with every occurrence of ``needle`` replaced by ``tid``."""
        if isinstance(fragment, int) or needle not in fragment:
            return [fragment]
        lstrip = self._attrs[tid] & TokenAttr.LSTRIP
        rstrip = self._attrs[tid] & TokenAttr.RSTRIP
        out: list[str | int] = []
        pos, end = 0, len(fragment)
        while (match := fragment.find(needle, pos)) >= 0:
            left_end = match
            while lstrip and left_end > pos and fragment[left_end - 1] in _C_SPACE:
                left_end -= 1
            if left_end > pos:
                out.append(fragment[pos:left_end])
            out.append(tid)
            pos = match + len(needle)
            while rstrip and pos < end and fragment[pos] in _C_SPACE:
                pos += 1
        if pos < end:
            out.append(fragment[pos:])
        return out

    # -- decoding ---------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` as stored in the GGUF (e.g. ``"Ġthe"``)."""
        self._check_id(token_id)
        return self._tokens[token_id]

    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        """Raw bytes ``token_id`` contributes to generated text (llama.cpp's token_to_piece).

        With ``special=False`` control and unknown tokens contribute nothing.
        """
        self._check_id(token_id)
        if not special and self._attrs[token_id] & _HIDDEN:
            return b""
        piece = self._pieces[token_id]
        if piece is None:
            piece = self._pieces[token_id] = self._render(token_id)
        return piece

    def _render(self, token_id: int) -> bytes:
        attr, text = self._attrs[token_id], self._tokens[token_id]
        if attr & _SPECIAL:
            return text.encode("utf-8")
        if attr & TokenAttr.NORMAL:
            return self._segmenter.normal_piece(text)
        if attr & TokenAttr.BYTE:
            return bytes([int(text[3:5], 16)])  # "<0xNN>"
        return b""  # unused/undefined tokens render as nothing

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; ``skip_special`` drops control/unknown tokens' text.

        Matches llama-cpp-python's ``Llama.detokenize``: pieces are concatenated and, when the
        sequence starts with BOS, one leading space (SentencePiece's dummy prefix) is removed.
        Invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD.
        """
        ids = list(ids)
        data = b"".join(self.token_bytes(i, special=not skip_special) for i in ids)
        if ids and ids[0] == self.bos_id and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        """An incremental decoder for generated ids (see :class:`StreamDecoder`)."""
        return StreamDecoder(self, skip_special)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} out of range [0, {self.vocab_size})")

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, eog_ids={sorted(self.eog_ids)})")


class StreamDecoder:
    """Turns ids into text one at a time, emitting only complete UTF-8 characters.

    A multi-byte character split across tokens is held back until its last byte arrives, so the
    concatenation of all ``push`` results plus ``flush()`` equals ``Tokenizer.decode`` of the ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._special = not skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False
        self._strip_space = False

    def push(self, token_id: int) -> str:
        """Add one id; returns the text that became complete (possibly empty)."""
        data = self._tokenizer.token_bytes(token_id, special=self._special)
        if not self._started:
            self._started = True
            self._strip_space = token_id == self._tokenizer.bos_id
        if self._strip_space and data:
            # Same rule as decode(): only the very first output byte may be a dropped space.
            self._strip_space = False
            if data.startswith(b" "):
                data = data[1:]
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End of stream: returns held-back bytes (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
