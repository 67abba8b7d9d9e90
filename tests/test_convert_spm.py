"""A SentencePiece (``tokenizer.model``) checkpoint: the ``llama`` tokenizer path of the converter.

The tokenizer is trained here on the calibration text (Llama-style settings: BPE, byte
fallback, split digits, identity normalization, dummy prefix); its own ``encode`` and llama.cpp's
tokenizer on the converted file are the oracles.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

import edgelm
from edgelm.converters.convert import convert
from edgelm.runtime.gguf import GGUFFile
from hf_factory import make_tiny

sentencepiece = pytest.importorskip("sentencepiece")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HARD = ["", "Hello world", "  two  spaces", "line\nbreak\ttab", "12345", "naïve café 日本語 🦙", "<s> not special"]


@pytest.fixture(scope="module")
def spm_checkpoint(tmp_path_factory, calib_text):
    root = tmp_path_factory.mktemp("spm")
    tok_dir = root / "tok"
    tok_dir.mkdir()
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(calib_text[:300_000].splitlines()), model_writer=model, vocab_size=1000,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    (tok_dir / "tokenizer.model").write_bytes(model.getvalue())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         # Two chat markers added after the 1000 pieces, as chat fine-tunes of Llama 2 do.
         "added_tokens_decoder": {"1000": {"content": "<|im_start|>", "special": True},
                                  "1001": {"content": "<|im_end|>", "special": True}}}))
    folder = make_tiny(root / "ckpt", "llama", tok_dir, vocab_size=1003)
    out = root / "spm.gguf"
    convert(folder, out, outtype="f32")
    return folder, out


def test_spm_metadata(spm_checkpoint):
    meta = GGUFFile(spm_checkpoint[1]).metadata
    assert meta["tokenizer.ggml.model"] == "llama"
    assert len(meta["tokenizer.ggml.tokens"]) == 1003 and len(meta["tokenizer.ggml.scores"]) == 1003
    types = list(meta["tokenizer.ggml.token_type"])
    assert types[:3] == [2, 3, 3] and types[3:259] == [6] * 256 and types[-3:] == [3, 3, 5]
    assert meta["tokenizer.ggml.tokens"][1000:] == ["<|im_start|>", "<|im_end|>", "[PAD1002]"]
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.bos_token_id"] == 1


def test_spm_tokenizer_matches_sentencepiece_and_llama_cpp(spm_checkpoint, calib_text, eval_text, llama_cpp):
    folder, out = spm_checkpoint
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    model = edgelm.load(str(out), threads=1, n_ctx=64)
    ref = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in [*HARD, calib_text[:20000], eval_text[:20000]]:
        want = [1, *sp.encode(text)]
        assert model.tokenize(text, add_bos=True) == want, text[:60]
        assert ref.tokenize(text.encode(), add_bos=True, special=False) == want, text[:60]
    chat = "<|im_start|>user\nhi<|im_end|>"
    want = [1, 1000, *sp.encode("user\nhi"), 1001]
    assert model.tokenize(chat, add_bos=True, special=True) == want
    assert ref.tokenize(chat.encode(), add_bos=True, special=True) == want
    model.close()
    ref.close()


def test_spm_model_logits_match_transformers(spm_checkpoint):
    folder, out = spm_checkpoint
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = edgelm.load(str(out), threads=2, n_ctx=64)
    ids = [1, 348, 350, 539, 598, 434, 869, 896, 898, 915, 1001]
    got = model.logits(ids)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert np.abs(got - want).max() < 0.05
    model.close()
