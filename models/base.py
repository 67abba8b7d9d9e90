"""The llama-family transformer block shared by every supported architecture.

Each architecture module (``llama.py``, ``qwen2.py``) is a small declaration of how its GGUF
metadata and tensor names map onto :class:`ModelArgs`; the compute lives in the backends, which
implement this one block shape (pre-norm attention with GQA and RoPE, SiLU-gated MLP).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..runtime.errors import ModelFormatError

# Per-layer tensor slots, in the order the backends' weight tables use.
LAYER_SLOTS = (
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
    "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
)
BIAS_SLOTS = ("attn_q", "attn_k", "attn_v")


@dataclass(frozen=True)
class ModelArgs:
    """Hyperparameters of a llama-family model, read from GGUF metadata."""

    arch: str
    dim: int                 # embedding width
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int          # MLP width
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_theta: float
    rope_dim: int            # rotated dims per head (<= head_dim)
    rope_neox: bool          # NeoX pairs (i, i + d/2) instead of adjacent pairs (2i, 2i + 1)
    qkv_bias: bool
    tied_output: bool        # output head shares token_embd
    rope_freq_factors: np.ndarray | None = field(default=None, compare=False)  # llama3 rope scaling

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def _req(meta: Mapping[str, Any], key: str) -> Any:
    if key not in meta:
        raise ModelFormatError(f"GGUF metadata lacks {key!r}")
    return meta[key]


def read_llama_family(
    arch: str, meta: Mapping[str, Any], tensor_names: set[str], *, rope_neox: bool, qkv_bias: bool
) -> ModelArgs:
    """Read the hyperparameters every llama-family GGUF stores under ``{arch}.*``."""
    p = arch + "."
    dim = int(_req(meta, p + "embedding_length"))
    n_heads = int(_req(meta, p + "attention.head_count"))
    n_kv = meta.get(p + "attention.head_count_kv", n_heads)
    n_kv = int(n_kv if np.ndim(n_kv) == 0 else np.asarray(n_kv).max())
    head_dim = int(meta.get(p + "attention.key_length", dim // n_heads))
    if "token_embd.weight" not in tensor_names:
        raise ModelFormatError("GGUF lacks tensor 'token_embd.weight'")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(meta.get(p + "vocab_size", len(tokens) if tokens is not None else 0))
    if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv:
        raise ModelFormatError(f"head counts {n_heads}/{n_kv}: heads must be a multiple of kv heads")
    return ModelArgs(
        arch=arch,
        dim=dim,
        n_layers=int(_req(meta, p + "block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        hidden_dim=int(_req(meta, p + "feed_forward_length")),
        vocab_size=vocab,
        context_length=int(meta.get(p + "context_length", 2048)),
        rms_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
        rope_dim=int(meta.get(p + "rope.dimension_count", head_dim)),
        rope_neox=rope_neox,
        qkv_bias=qkv_bias,
        tied_output="output.weight" not in tensor_names,
    )


def layer_tensor_name(layer: int, slot: str, kind: str = "weight") -> str:
    return f"blk.{layer}.{slot}.{kind}"
