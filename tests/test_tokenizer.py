"""Tokenizer vs llama.cpp (llama-cpp-python): the same ids, text, pieces and special tokens."""
from __future__ import annotations

import ctypes
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgelm.runtime.tokenizer import Tokenizer, TokenizerError

from vocab_factory import read_metadata, spm_vocab_from_processor, write_vocab_gguf

llama_cpp = pytest.importorskip("llama_cpp")

HARD_STRINGS = (
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "\t\tindented\twith tabs",
    "windows\r\nline\r\nends\r\n",
    "  leading and trailing spaces   ",
    "Hello, world!",
    "don't I'LL we've they're She'd it's O'Neil",
    "1234567890",
    "3.14159 and 1,000,000 and 2024-01-31",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧\u200d👦 flag 🏳️\u200d🌈",
    "日本語のテキストと中文字符",
    "مرحبا بالعالم",
    "combining: e\u0301 n\u0303 A\u030a z̴̛a̵l̶g̷o",
    "nbsp\u00a0em\u2003space\u3000ideographic",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\n\nclass A: pass\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_start|>x<|im_end|><|endoftext|>",
    "a<|endoftext|>b <|im_start",
    "<s>hi</s> a<unk>b <0x41>",
    "$+<=>^~| `@# %&*()[]{}",
    " \n \n  x  \n\n  y\r\n\r\n z",
)
# Character classes whose mixing stresses the pre-tokenizer regexes and the unicode tables:
# unusual whitespace, contraction letters, non-ASCII digits, punctuation/symbols, combining
# marks and case oddities, CJK/Hangul/Thai, emoji sequences, controls/private use/unassigned.
_FUZZ_POOLS = (
    " \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2028\u2029\u202f\u205f\u3000",
    "aZ'sStTlLdDmMvVeErR",
    "0123456789٣३²½Ⅻ",
    "!@#$%^&*()_+-=[]{};:,.<>/?|~`\"\\",
    "éñ\u0303\u0301\u0308ǅßİıſK",
    "日本中文한국어ก่",
    "😀👍🏽\u200d🏳️🌈",
    "\x00\x01\x1f\x7f\u200b\ufeff\ue000\U0001F9FF\U000E0001\u0378\U0010FFFD",
)
_PIECE_BUF = 512


def fuzz_strings(count: int, seed: int = 0) -> list[str]:
    """Seeded random short strings drawn from _FUZZ_POOLS."""
    rng = random.Random(seed)
    return ["".join(rng.choice(rng.choice(_FUZZ_POOLS)) for _ in range(rng.randint(1, 40)))
            for _ in range(count)]


def llama_tokens(llm: Any, text: str, add_special: bool, parse_special: bool) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)


def llama_text(llm: Any, ids: list[int], special: bool) -> str:
    return llm.detokenize(ids, special=special).decode("utf-8", errors="replace")


def llama_piece(llm: Any, token_id: int) -> bytes:
    buf = ctypes.create_string_buffer(_PIECE_BUF)
    n = llama_cpp.llama_token_to_piece(llm._model.vocab, token_id, buf, _PIECE_BUF, 0, True)
    assert 0 <= n <= _PIECE_BUF
    return buf.raw[:n]


def load_llama(path: Path) -> Any:
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def assert_same_ids(tok: Tokenizer, llm: Any, texts: list[str] | tuple[str, ...],
                    add_special: bool = True) -> None:
    for text in texts:
        for parse_special in (True, False):
            ours = tok.encode(text, add_special=add_special, parse_special=parse_special)
            ref = llama_tokens(llm, text, add_special, parse_special)
            assert ours == ref, (text[:200], parse_special)


def assert_same_special_ids(tok: Tokenizer, llm: Any) -> None:
    vocab = llm._model.vocab
    assert tok.vocab_size == llm.n_vocab()
    assert tok.bos_id == llama_cpp.llama_vocab_bos(vocab)
    assert tok.eos_id == llama_cpp.llama_vocab_eos(vocab)
    assert tok.add_bos == llama_cpp.llama_vocab_get_add_bos(vocab)
    assert tok.add_eos == llama_cpp.llama_vocab_get_add_eos(vocab)
    ref_eog = {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert tok.eog_ids == ref_eog


def wikitext_lines(text: str, count: int) -> list[str]:
    return [line for line in text.split("\n") if line.strip()][:count]


# --- the default model (SmolLM2, BPE, pre "smollm") -------------------------------------------


@pytest.fixture(scope="module")
def smol_meta(default_gguf: Path) -> dict[str, Any]:
    return read_metadata(default_gguf)


@pytest.fixture(scope="module")
def smol(smol_meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_metadata(smol_meta)


@pytest.fixture(scope="module")
def smol_llama(default_gguf: Path) -> Any:
    return load_llama(default_gguf)


def test_build_is_fast(smol_meta: dict[str, Any]) -> None:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        Tokenizer.from_metadata(smol_meta)
        best = min(best, time.perf_counter() - start)
    assert best < 0.5, f"building the default tokenizer took {best:.3f} s"


def test_special_tokens_match_llama(smol: Tokenizer, smol_llama: Any) -> None:
    assert_same_special_ids(smol, smol_llama)
    assert smol.eog_ids == {0, 2, 4}  # <|endoftext|>, <|im_end|>, <reponame> (FIM repo)


def test_whole_texts_match_llama(smol: Tokenizer, smol_llama: Any, eval_text: str,
                                 calib_text: str) -> None:
    for text in (eval_text, calib_text):
        start = time.perf_counter()
        ours = smol.encode(text)
        elapsed = time.perf_counter() - start
        assert ours == llama_tokens(smol_llama, text, True, True)
        assert elapsed < 5.0, f"encoding {len(text)} chars took {elapsed:.2f} s"


def test_every_line_and_chunk_matches_llama(smol: Tokenizer, smol_llama: Any, eval_text: str,
                                            calib_text: str) -> None:
    for text in (eval_text, calib_text):
        lines = text.split("\n")
        for line in lines:
            assert smol.encode(line) == llama_tokens(smol_llama, line, True, True), line
        for start in range(0, len(text), len(text) // 7):
            chunk = text[start : start + 8192]
            assert smol.encode(chunk) == llama_tokens(smol_llama, chunk, True, True)


def test_hard_strings_match_llama(smol: Tokenizer, smol_llama: Any) -> None:
    assert_same_ids(smol, smol_llama, HARD_STRINGS)
    assert_same_ids(smol, smol_llama, HARD_STRINGS, add_special=False)
    assert_same_ids(smol, smol_llama, fuzz_strings(1000))


def test_special_token_text_parsing(smol: Tokenizer) -> None:
    chat = "<|im_start|>user\nhi<|im_end|>"
    parsed = smol.encode(chat)
    assert parsed[0] == 1 and parsed[-1] == 2 and len(parsed) == 5
    plain = smol.encode(chat, parse_special=False)
    assert 1 not in plain and 2 not in plain
    assert smol.decode(plain) == chat
    assert smol.encode("") == []


def test_decode_matches_llama(smol: Tokenizer, smol_llama: Any, eval_text: str) -> None:
    texts = (*HARD_STRINGS, eval_text[:50_000])
    for text in texts:
        ids = smol.encode(text)
        assert smol.decode(ids) == text
        assert smol.decode(ids) == llama_text(smol_llama, ids, special=True)
        assert smol.decode(ids, skip_special=True) == llama_text(smol_llama, ids, special=False)


def test_token_bytes_match_llama_pieces(smol: Tokenizer, smol_llama: Any) -> None:
    for token_id in range(smol.vocab_size):
        assert smol.token_bytes(token_id) == llama_piece(smol_llama, token_id), token_id
    assert smol.token_bytes(1, special=False) == b""  # control token hidden on request
    assert smol.token_text(1) == "<|im_start|>"


def _stream(tok: Tokenizer, ids: list[int], skip_special: bool = False) -> list[str]:
    decoder = tok.stream_decoder(skip_special=skip_special)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_decoder_reproduces_text(smol: Tokenizer, eval_text: str) -> None:
    for text in (*HARD_STRINGS, eval_text[:20_000]):
        ids = smol.encode(text)
        assert "".join(_stream(smol, ids)) == text
        assert "".join(_stream(smol, ids, skip_special=True)) == smol.decode(ids, skip_special=True)


def test_stream_decoder_holds_back_split_characters(smol: Tokenizer) -> None:
    text = "👨\u200d👩\u200d👧\u200d👦"
    ids = smol.encode(text)
    pieces = [smol.token_bytes(i) for i in ids]
    # The family emoji is spelled with byte tokens that cut its characters apart...
    assert any(not _is_utf8(p) for p in pieces)
    outputs = _stream(smol, ids)
    # ...yet every emitted chunk is whole characters, never a replacement character.
    assert "".join(outputs) == text and "\ufffd" not in "".join(outputs)
    assert "" in outputs[:-1]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_decode_of_cut_character_uses_replacement(smol: Tokenizer) -> None:
    ids = smol.encode("😀")
    assert smol.decode(ids[:-1]).endswith("\ufffd")
    decoder = smol.stream_decoder()
    assert "".join(decoder.push(i) for i in ids[:-1]) == ""
    assert decoder.flush() == "\ufffd"


def test_errors(smol: Tokenizer, smol_meta: dict[str, Any]) -> None:
    with pytest.raises(TokenizerError, match="llama-bpe"):
        Tokenizer.from_metadata({**smol_meta, "tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(TokenizerError, match="unsupported tokenizer model"):
        Tokenizer.from_metadata({**smol_meta, "tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(TokenizerError, match="out of range"):
        smol.decode([smol.vocab_size])
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        smol.encode("lone \ud800 surrogate")


# --- the other BPE pre-tokenizers, on the default model's vocabulary -------------------------


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "default", "gpt-2", None])
def test_bpe_pre_tokenizers_match_llama(pre: str | None, smol_meta: dict[str, Any],
                                        eval_text: str, tmp_path: Path) -> None:
    # Leave add_bos_token unset so llama.cpp's per-pre-type default (true for llama3) is checked.
    meta = {k: v for k, v in smol_meta.items() if k.startswith("tokenizer.ggml.")
            and k not in ("tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token")}
    if pre is not None:
        meta["tokenizer.ggml.pre"] = pre
    llm = load_llama(write_vocab_gguf(tmp_path / "vocab.gguf", meta))
    tok = Tokenizer.from_metadata(meta)
    assert_same_special_ids(tok, llm)
    assert tok.add_bos == (pre == "llama-bpe")
    assert_same_ids(tok, llm, HARD_STRINGS)
    assert_same_ids(tok, llm, wikitext_lines(eval_text, 300))
    assert_same_ids(tok, llm, fuzz_strings(300, seed=1))
    for text in HARD_STRINGS:
        ids = tok.encode(text)
        assert tok.decode(ids) == llama_text(llm, ids, special=True)


# --- SentencePiece (tokenizer.ggml.model == "llama") -----------------------------------------


@pytest.fixture(scope="module")
def spm_meta(calib_text: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import sentencepiece as spm

    prefix = tmp_path_factory.mktemp("spm") / "tiny"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(calib_text.split("\n")), model_prefix=str(prefix),
        vocab_size=2000, model_type="bpe", byte_fallback=True, minloglevel=2,
    )
    return spm_vocab_from_processor(prefix.with_suffix(".model"))


@pytest.mark.parametrize("add_space_prefix", [None, False])
def test_spm_matches_llama(spm_meta: dict[str, Any], add_space_prefix: bool | None,
                           eval_text: str, tmp_path: Path) -> None:
    meta = dict(spm_meta)
    if add_space_prefix is not None:
        meta["tokenizer.ggml.add_space_prefix"] = add_space_prefix
    llm = load_llama(write_vocab_gguf(tmp_path / "spm.gguf", meta))
    tok = Tokenizer.from_metadata(meta)
    assert_same_special_ids(tok, llm)
    lines = wikitext_lines(eval_text, 200)
    for add_special in (True, False):
        assert_same_ids(tok, llm, HARD_STRINGS, add_special=add_special)
        assert_same_ids(tok, llm, lines, add_special=add_special)
    assert_same_ids(tok, llm, fuzz_strings(300, seed=2))
    for token_id in range(tok.vocab_size):
        assert tok.token_bytes(token_id) == llama_piece(llm, token_id), token_id
    for text in (*HARD_STRINGS, *lines[:50]):
        ids = tok.encode(text)
        for special in (True, False):
            assert tok.decode(ids, skip_special=not special) == llama_text(llm, ids, special)
            assert "".join(_stream(tok, ids, not special)) == tok.decode(ids, not special)


def test_spm_byte_fallback_and_round_trip(spm_meta: dict[str, Any]) -> None:
    tok = Tokenizer.from_metadata(spm_meta)
    byte_ids = {tok.encode(ch, add_special=False)[-1] for ch in "日本😀"}
    assert all(tok.token_text(i).startswith("<0x") for i in byte_ids)
    for text in HARD_STRINGS:
        if "<" not in text:  # special-token text is dropped by skip_special
            assert tok.decode(tok.encode(text), skip_special=True) == text
    assert tok.encode("") == [tok.bos_id]


def test_spm_missing_byte_token_is_an_error(spm_meta: dict[str, Any]) -> None:
    tokens = list(spm_meta["tokenizer.ggml.tokens"])
    tokens[tokens.index("<0xE6>")] = "not-a-byte-token"
    tok = Tokenizer.from_metadata({**spm_meta, "tokenizer.ggml.tokens": tokens,
                                   "tokenizer.ggml.token_type": np.ones(len(tokens), np.int32)})
    with pytest.raises(TokenizerError, match="0xE6"):
        tok.encode("日")


@pytest.mark.parametrize("name", ["Tiny SPM", "Phi-3 Mini Test"])
def test_spm_control_and_user_defined_pieces(name: str, calib_text: str, tmp_path: Path) -> None:
    # Control pieces are parsed only with parse_special, user-defined ones always; a Phi-3 name
    # makes llama.cpp strip whitespace after special tokens (rstrip attribute).
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(calib_text.split("\n")[:400]), model_prefix=str(tmp_path / "sp"),
        vocab_size=1000, model_type="bpe", byte_fallback=True, minloglevel=2,
        control_symbols=["<|user|>", "<|end|>", "<|endoftext|>"], user_defined_symbols=["<|tool|>"],
    )
    meta = {**spm_vocab_from_processor(tmp_path / "sp.model"), "general.name": name}
    tool_id = meta["tokenizer.ggml.tokens"].index("<|tool|>")
    meta["tokenizer.ggml.token_type"][tool_id] = 4  # the processor reports it as normal
    llm = load_llama(write_vocab_gguf(tmp_path / "sp.gguf", meta))
    tok = Tokenizer.from_metadata(meta)
    assert_same_special_ids(tok, llm)
    texts = ("<|user|>\n  hello <|end|>  \n\t<|tool|> x<|tool|>\n<|endoftext|>",
             " <|user|><|user|> <|end|>", "a <|tool|>   b", *HARD_STRINGS)
    for add_special in (True, False):
        assert_same_ids(tok, llm, texts, add_special=add_special)
    assert tool_id in tok.encode("x<|tool|>", parse_special=False)
