"""Byte-level BPE segmentation (``tokenizer.ggml.model == "gpt2"``), identical to llama.cpp's.

llama.cpp pre-tokenizes each text fragment with a *sequence* of regexes chosen by
``tokenizer.ggml.pre``: every regex splits the pieces left by the previous one, keeping both the
matches and the text between them. HF ``tokenizers`` expresses exactly that as a sequence of
``Split(..., behavior="isolated")`` pre-tokenizers, so the Rust library does the heavy lifting
(the whole 1 MB evaluation text encodes in well under a second) while the regexes stay the ones
llama.cpp uses (its own adapted forms, e.g. ``'[sS]`` instead of the ``(?i:'s)`` group).

After the split, each piece is mapped to GPT-2's printable byte alphabet and merged by rank;
llama.cpp and HF's BPE both apply the lowest-rank pair first, leftmost on ties.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from tokenizers import Regex
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import models, pre_tokenizers

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How llama.cpp pre-processes text for one family of ``tokenizer.ggml.pre`` values."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is itself a vocabulary entry is kept whole
    add_bos_default: bool = False  # llama.cpp's add_bos when the GGUF has no add_bos_token key


_DEFAULT = PreTokenizerSpec(
    (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
)
_GPT2_SPEC = PreTokenizerSpec((_GPT2,))
_SMOLLM = PreTokenizerSpec((r"\p{N}", _GPT2))
_LLAMA3_SPEC = PreTokenizerSpec((_LLAMA3,), ignore_merges=True, add_bos_default=True)
_LLAMA3_REGEX_ONLY = PreTokenizerSpec((_LLAMA3,))
_QWEN2_SPEC = PreTokenizerSpec((_QWEN2,))

# Only names whose llama.cpp handling is fully described by a PreTokenizerSpec (same regexes,
# same flags); aliases follow llama-vocab.cpp's grouping.
PRE_TOKENIZERS: Mapping[str, PreTokenizerSpec] = MappingProxyType({
    "default": _DEFAULT,
    "gpt-2": _GPT2_SPEC,
    "phi-2": _GPT2_SPEC,
    "mpt": _GPT2_SPEC,
    "olmo": _GPT2_SPEC,
    "smollm": _SMOLLM,
    "starcoder": _SMOLLM,
    "refact": _SMOLLM,
    "command-r": _SMOLLM,
    "codeshell": _SMOLLM,
    "exaone": _SMOLLM,
    "llama-bpe": _LLAMA3_SPEC,
    "llama3": _LLAMA3_SPEC,
    "llama-v3": _LLAMA3_SPEC,
    "falcon3": _LLAMA3_SPEC,
    "dbrx": _LLAMA3_REGEX_ONLY,
    "smaug-bpe": _LLAMA3_REGEX_ONLY,
    "qwen2": _QWEN2_SPEC,
    "deepseek-r1-qwen": _QWEN2_SPEC,
    "megrez": _QWEN2_SPEC,
    "stablelm2": _QWEN2_SPEC,
})


def _byte_alphabet() -> Mapping[str, int]:
    """GPT-2's reversible map from printable code points to byte values."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + extra)] = b
            extra += 1
    return MappingProxyType(mapping)


_CHAR_TO_BYTE: Mapping[str, int] = _byte_alphabet()


def _merge_pairs(merges: Sequence[str]) -> list[tuple[str, str]]:
    # llama.cpp splits at the first space after position 0 and keeps the first (lowest) rank of
    # a duplicated pair; dict.fromkeys keeps first occurrences in order.
    pairs = [(m[:i], m[i + 1 :]) for m in merges for i in (m.find(" ", 1),) if i > 0]
    return list(dict.fromkeys(pairs))


class BPESegmenter:
    """Encodes raw text fragments to ids and renders NORMAL tokens back to bytes."""

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[str], spec: PreTokenizerSpec):
        vocab = dict(vocab)
        pairs = _merge_pairs(merges)
        try:
            model = models.BPE(vocab, pairs, ignore_merges=spec.ignore_merges)
        except Exception:
            # HF refuses merges whose parts or result are not vocabulary entries. Such a merge
            # can only build a piece that llama.cpp then re-emits byte by byte, so it never
            # fires usefully in a well-formed file: drop them (slow path, malformed files only).
            pairs = [(a, b) for a, b in pairs if a in vocab and b in vocab and a + b in vocab]
            model = models.BPE(vocab, pairs, ignore_merges=spec.ignore_merges)
        self._hf = _HFTokenizer(model)
        splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in spec.regexes]
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._hf.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])

    def encode_fragments(self, fragments: Sequence[str | int]) -> list[int]:
        """Token ids for a partitioned text: strings are BPE-encoded, ints are special tokens."""
        texts = [f for f in fragments if isinstance(f, str)]
        if len(texts) == 1:
            encoded = [self._hf.encode(texts[0], add_special_tokens=False).ids]
        else:
            encoded = [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        out: list[int] = []
        pieces = iter(encoded)
        for fragment in fragments:
            if isinstance(fragment, str):
                out.extend(next(pieces))
            else:
                out.append(fragment)
        return out

    @staticmethod
    def normal_piece(text: str) -> bytes:
        """Bytes of a NORMAL token: undo the byte-to-printable mapping.

        A code point outside the alphabet (only in malformed vocabularies) is rendered the way
        llama.cpp's ``llama_decode_text`` does, as an ``[UNK_BYTE_0x..]`` marker.
        """
        out = bytearray()
        for ch in text:
            byte = _CHAR_TO_BYTE.get(ch)
            if byte is not None:
                out.append(byte)
            else:
                raw = ch.encode("utf-8")
                out += b"[UNK_BYTE_0x" + raw.hex().encode() + text.encode("utf-8") + b"]"
        return bytes(out)
