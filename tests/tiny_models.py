"""Tiny random llama-family GGUF files, for shape and edge-case tests against llama.cpp.

Weights are random but the file is a real model: llama.cpp loads it, so its logits are the
oracle. The tokenizer section is copied from the default model (any valid vocab would do).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from edgelm.runtime import affine
from vocab_factory import TOKENIZER_KEYS, _add_field


@dataclass(frozen=True)
class TinyConfig:
    arch: str = "llama"          # "llama" or "qwen2" (QKV bias, NeoX RoPE)
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden: int = 256
    tied: bool = True
    wtype: str = "F32"           # F32, F16 or Q8_0 for the 2-D weights; "AFFINE": runtime/affine.py
    rope_theta: float = 10000.0
    affine_bits: int = 4         # with wtype="AFFINE": default bits ...
    affine_group: int = 64       # ... group size ...
    affine_bits_by_slot: tuple[tuple[str, int], ...] = ()  # ... and per-slot overrides, ("ffn_down", 4)


def write_tiny_model(path: Path, cfg: TinyConfig, tokenizer_meta: Mapping[str, Any], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    vocab = len(tokenizer_meta["tokenizer.ggml.tokens"])
    hd = cfg.dim // cfg.n_heads
    w = GGUFWriter(str(path), cfg.arch)
    w.add_context_length(512)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(vocab)
    for key, value in tokenizer_meta.items():
        if key.startswith(TOKENIZER_KEYS):
            _add_field(w, key, value)

    tensor_bits: dict[str, int] = {}
    slot_bits = dict(cfg.affine_bits_by_slot)

    def matrix(name: str, rows: int, cols: int, scale: float) -> None:
        a = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        if cfg.wtype == "AFFINE":
            slot = name.split(".")[-2]
            tensor_bits[name] = bits = slot_bits.get(slot, cfg.affine_bits)
            affine.add_affine_tensor(w, name, a, bits, cfg.affine_group)
        elif cfg.wtype == "F32":
            w.add_tensor(name, a)
        elif cfg.wtype == "F16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            qt = GGMLQuantizationType[cfg.wtype]
            w.add_tensor(name, quantize(a, qt), raw_shape=quantize(a, qt).shape, raw_dtype=qt)

    def vector(name: str, n: int, base: float, scale: float) -> None:
        w.add_tensor(name, (base + rng.standard_normal(n) * scale).astype(np.float32))

    matrix("token_embd.weight", vocab, cfg.dim, 1.0)
    for l in range(cfg.n_layers):
        p = f"blk.{l}."
        vector(p + "attn_norm.weight", cfg.dim, 1.0, 0.1)
        matrix(p + "attn_q.weight", cfg.n_heads * hd, cfg.dim, cfg.dim ** -0.5)
        matrix(p + "attn_k.weight", cfg.n_kv_heads * hd, cfg.dim, cfg.dim ** -0.5)
        matrix(p + "attn_v.weight", cfg.n_kv_heads * hd, cfg.dim, cfg.dim ** -0.5)
        if cfg.arch == "qwen2":
            vector(p + "attn_q.bias", cfg.n_heads * hd, 0.0, 0.5)
            vector(p + "attn_k.bias", cfg.n_kv_heads * hd, 0.0, 0.5)
            vector(p + "attn_v.bias", cfg.n_kv_heads * hd, 0.0, 0.5)
        matrix(p + "attn_output.weight", cfg.dim, cfg.n_heads * hd, cfg.dim ** -0.5)
        vector(p + "ffn_norm.weight", cfg.dim, 1.0, 0.1)
        matrix(p + "ffn_gate.weight", cfg.hidden, cfg.dim, cfg.dim ** -0.5)
        matrix(p + "ffn_up.weight", cfg.hidden, cfg.dim, cfg.dim ** -0.5)
        matrix(p + "ffn_down.weight", cfg.dim, cfg.hidden, cfg.hidden ** -0.5)
    vector("output_norm.weight", cfg.dim, 1.0, 0.1)
    if not cfg.tied:
        matrix("output.weight", vocab, cfg.dim, cfg.dim ** -0.5)
    if tensor_bits:
        affine.add_affine_metadata(w, cfg.affine_bits, cfg.affine_group, tensor_bits)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
