"""tokenizer.ggml.pre from tokenizer.json's declared pre-tokenizer, checked by tokenizing.

The SmolLM2 vocabulary is given the pre-tokenizers of Llama 3 and Qwen2 exactly as their
tokenizer.json files declare them; the converter must name them "llama-bpe" and "qwen2", and
edgelm's tokenizer built from the converted metadata must then reproduce the HF tokenizer's ids.
"""
from __future__ import annotations

import json
import shutil

import pytest

from edgelm.converters.errors import ConversionError
from edgelm.converters.tokenizer_meta import tokenizer_metadata
from edgelm.runtime.tokenizer import Tokenizer

tokenizers = pytest.importorskip("tokenizers")

_BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
LLAMA3 = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
     "behavior": "Isolated", "invert": False}, _BYTELEVEL]}
QWEN2 = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
     "behavior": "Isolated", "invert": False}, _BYTELEVEL]}
TEXTS = ["In 1987, 12345 of the 6,789 members didn't VOTE.\n\n  Indented\tline", "naïve café — 日本語 🦙 x" * 3]


@pytest.mark.parametrize("pre,name,ignore_merges", [(LLAMA3, "llama-bpe", True), (QWEN2, "qwen2", False)])
def test_pre_tokenizer_detected_and_reproduced(pre, name, ignore_merges, smollm2_hf, tmp_path, eval_text):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_hf / f, tmp_path / f)
    tok = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    tok["pre_tokenizer"] = pre
    tok["model"]["ignore_merges"] = ignore_merges  # as Llama 3's tokenizer.json has it
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")

    meta = tokenizer_metadata(tmp_path, 49152, {})
    assert meta["tokenizer.ggml.pre"] == name
    ours = Tokenizer.from_metadata(meta)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in [*TEXTS, eval_text[:100_000]]:
        assert ours.encode(text, add_special=False) == hf.encode(text, add_special_tokens=False).ids


def test_unrecognized_pre_tokenizer_is_an_error(smollm2_hf, tmp_path):
    tok = json.loads((smollm2_hf / "tokenizer.json").read_text(encoding="utf-8"))
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    with pytest.raises(ConversionError, match=r"tokenizer\.json: unrecognized BPE pre-tokenizer"):
        tokenizer_metadata(tmp_path, 49152, {})
