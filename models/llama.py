"""Llama 2/3, SmolLM, TinyLlama, Mistral: GGUF architecture ``llama``.

llama.cpp's converter permutes the Q/K rows so that the rotation applies to adjacent pairs
(2i, 2i+1) -- "normal" RoPE. Llama 3.1+ files carry ``rope_freqs.weight``: per-frequency
divisors for long-context rope scaling.
"""
from __future__ import annotations

from typing import Any, Mapping

import dataclasses

from .base import ModelArgs, read_llama_family

NAME = "llama"
ALIASES = ("mistral",)


def model_args(meta: Mapping[str, Any], tensor_names: set[str], read_tensor) -> ModelArgs:
    arch = str(meta.get("general.architecture", NAME))
    args = read_llama_family(arch, meta, tensor_names, rope_neox=False, qkv_bias=False)
    if "rope_freqs.weight" in tensor_names:
        args = dataclasses.replace(args, rope_freq_factors=read_tensor("rope_freqs.weight"))
    return args
