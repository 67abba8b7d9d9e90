"""Qwen2 / Qwen2.5: GGUF architecture ``qwen2``: biases on Q, K and V; NeoX-style RoPE."""
from __future__ import annotations

from typing import Any, Mapping

from .base import ModelArgs, read_llama_family

NAME = "qwen2"
ALIASES = ()


def model_args(meta: Mapping[str, Any], tensor_names: set[str], read_tensor) -> ModelArgs:
    return read_llama_family(NAME, meta, tensor_names, rope_neox=True, qkv_bias=True)
