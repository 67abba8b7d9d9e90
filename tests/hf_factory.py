"""Hugging Face checkpoints for the converter tests, made offline with transformers.

* ``smollm2_hf``: the real SmolLM2-135M-Instruct as a bf16 HF folder. transformers reads the
  default Q4_1 GGUF (dequantizing it and undoing llama.cpp's Q/K row permutation), the state
  dict is copied into a fresh ``LlamaForCausalLM`` and saved as safetensors with the tokenizer
  and chat template. transformers' GGUF tokenizer loader writes a generic GPT-2 pre-tokenizer,
  so the one the original SmolLM2 ``tokenizer.json`` has (single digits, then GPT-2's byte-level
  regex) is put back: that is what makes it tokenize like the real checkpoint and like llama.cpp.
  Built once into ``$EDGELM_HOME/test-models/smollm2-hf`` (in a temp dir, renamed when complete).
* ``make_tiny``: random llama/mistral/qwen2 checkpoints from transformers configs, reusing the
  SmolLM2 tokenizer files.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja")
SMOLLM2_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def set_pre_tokenizer(folder: Path, pre: dict[str, Any], normalizer: dict[str, Any] | None = None) -> None:
    path = folder / "tokenizer.json"
    tok = json.loads(path.read_text(encoding="utf-8"))
    tok["pre_tokenizer"] = pre
    tok["normalizer"] = normalizer
    path.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")


def build_smollm2_hf(gguf_path: Path, dest: Path) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=dest.name + ".tmp-") as tmp:
        work = Path(tmp) / "out"
        src = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        config = src.config
        config.__dict__.pop("quantization_config", None)  # read from a GGUF; the saved folder is plain bf16
        fresh = transformers.LlamaForCausalLM(config)
        fresh.load_state_dict(src.state_dict())
        fresh.to(torch.bfloat16).save_pretrained(work, safe_serialization=True)
        tok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tok.save_pretrained(work)
        set_pre_tokenizer(work, SMOLLM2_PRE_TOKENIZER)
        if not dest.exists():
            os.replace(work, dest)  # atomic: an interrupted build leaves no half-made cache
    return dest


def make_tiny(dest: Path, arch: str, tokenizer_from: Path, seed: int = 0, max_shard_size: str | None = None,
              **overrides: Any) -> Path:
    """A random ``arch`` checkpoint ("llama", "mistral", "qwen2") saved as bf16 safetensors."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    kwargs: dict[str, Any] = dict(
        vocab_size=49152, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-5, initializer_range=0.08, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs))
    with torch.no_grad():  # norms and biases away from their 1/0 init, so a swap would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    save = {"safe_serialization": True}
    if max_shard_size:
        save["max_shard_size"] = max_shard_size
    model.to(torch.bfloat16).save_pretrained(dest, **save)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, dest / name)
    return dest
