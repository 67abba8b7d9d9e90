"""``config.json`` of a Hugging Face checkpoint, read into one dataclass and checked.

Only the fields the llama family needs are read; names differ between transformers versions
(``rope_theta`` at the top level before v5, inside ``rope_parameters`` after), so each field
lists the places it may be found.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConversionError

# HF architecture name -> GGUF architecture. Mistral's GGUF architecture is "llama", as in
# llama.cpp's converter: the block is the same (its sliding window is not used by llama.cpp).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class HFConfig:
    """The hyperparameters of a llama-family checkpoint, as ``config.json`` states them."""

    path: Path
    hf_architecture: str
    gguf_architecture: str
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: dict[str, Any] | None = None
    name: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
    return default


def read_config(folder: str | Path) -> HFConfig:
    """Read and validate ``folder/config.json``; raise :class:`ConversionError` naming the problem."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path}: missing (a Hugging Face checkpoint folder needs config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: malformed: {exc}") from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: malformed: not a JSON object")

    archs = cfg.get("architectures")
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if not isinstance(archs, list) or not archs:
        raise ConversionError(f"{path}: no 'architectures' list; supported: {supported}")
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ConversionError(f"{path}: unsupported architecture {', '.join(map(str, archs))}; "
                              f"supported: {supported}")

    def need(*keys: str) -> Any:
        value = _first(cfg, *keys)
        if value is None:
            raise ConversionError(f"{path}: lacks {keys[0]!r}")
        return value

    try:
        hidden = int(need("hidden_size"))
        n_heads = int(need("num_attention_heads"))
        n_kv = int(_first(cfg, "num_key_value_heads", default=n_heads))
        head_dim = int(_first(cfg, "head_dim", default=0) or (hidden // n_heads if n_heads else 0))
        rope_scaling = _first(cfg, "rope_scaling", "rope_parameters")
        if isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None  # transformers v5 always writes rope_parameters, "default" means none
        result = HFConfig(
            path=path,
            hf_architecture=arch,
            gguf_architecture=SUPPORTED_ARCHITECTURES[arch],
            hidden_size=hidden,
            n_layers=int(need("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            intermediate_size=int(need("intermediate_size")),
            vocab_size=int(need("vocab_size")),
            context_length=int(_first(cfg, "max_position_embeddings", default=2048)),
            rms_norm_eps=float(_first(cfg, "rms_norm_eps", default=1e-6)),
            rope_theta=float(_first(cfg, "rope_theta", "rope_parameters.rope_theta", "rope_scaling.rope_theta",
                                    default=10000.0)),
            # LlamaConfig, MistralConfig and Qwen2Config all default to untied heads.
            tie_word_embeddings=bool(_first(cfg, "tie_word_embeddings", default=False)),
            attention_bias=bool(_first(cfg, "attention_bias", default=False)),
            rope_scaling=dict(rope_scaling) if isinstance(rope_scaling, dict) else None,
            name=_first(cfg, "_name_or_path", "_model_name_or_path"),
            raw=cfg,
        )
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{path}: malformed value: {exc}") from None
    for label, value in (("hidden_size", hidden), ("num_attention_heads", n_heads),
                         ("num_key_value_heads", n_kv), ("head_dim", head_dim),
                         ("num_hidden_layers", result.n_layers), ("intermediate_size", result.intermediate_size),
                         ("vocab_size", result.vocab_size)):
        if value <= 0:
            raise ConversionError(f"{path}: {label} must be positive, got {value}")
    if n_heads % n_kv:
        raise ConversionError(f"{path}: num_attention_heads {n_heads} is not a multiple of "
                              f"num_key_value_heads {n_kv}")
    if head_dim % 2:
        raise ConversionError(f"{path}: head_dim {head_dim} must be even for RoPE")
    return result
