"""Declarative maps from Hugging Face tensor names to GGUF names, one per architecture.

Each :class:`ArchSpec` lists its tensors as ``(hf name, gguf name, shape, transform)`` rows with
``{i}`` standing for the layer index, like gpt-fast's ``weight_map`` and llama.cpp's
``tensor_mapping.py``. Shapes are NumPy order (rows, columns), computed from the config, and
every checkpoint tensor is checked against them before conversion starts.

RoPE layout: HF llama checkpoints store Q and K rows in the "rotate half" order (pairs ``(i,
i + d/2)``); llama.cpp's GGUF stores them so that pairs are adjacent ``(2i, 2i + 1)``, which is
what its ``llama`` architecture rotates. The ``permute`` transform reorders the rows of every
head exactly as llama.cpp's converter does, so files are interchangeable. Qwen2 keeps the NeoX
(rotate-half) order in GGUF too, so its Q/K are copied as they are.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np

from .errors import ConversionError
from .hf_config import HFConfig
from .safetensors import Checkpoint


class Transform(Enum):
    """What happens to a tensor between the checkpoint and the GGUF."""

    COPY = "copy"
    PERMUTE_Q = "permute_q"    # reorder rows per attention head for adjacent-pair RoPE
    PERMUTE_K = "permute_k"    # the same with the KV head count


@dataclass(frozen=True)
class TensorRow:
    hf: str
    gguf: str
    shape: Callable[[HFConfig], tuple[int, ...]]
    transform: Transform = Transform.COPY
    when: Callable[[HFConfig], bool] = lambda cfg: True


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str
    global_rows: tuple[TensorRow, ...]
    layer_rows: tuple[TensorRow, ...]
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)  # recomputed by every runtime


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor to write: its source, expected shape and transform."""

    hf: str
    gguf: str
    shape: tuple[int, ...]
    transform: Transform


def _q_dim(c: HFConfig) -> int:
    return c.n_heads * c.head_dim


def _kv_dim(c: HFConfig) -> int:
    return c.n_kv_heads * c.head_dim


_GLOBAL = (
    TensorRow("model.embed_tokens.weight", "token_embd.weight", lambda c: (c.vocab_size, c.hidden_size)),
    TensorRow("model.norm.weight", "output_norm.weight", lambda c: (c.hidden_size,)),
    TensorRow("lm_head.weight", "output.weight", lambda c: (c.vocab_size, c.hidden_size),
              when=lambda c: not c.tie_word_embeddings),
)


def _layer(permute: bool, qkv_bias: bool) -> tuple[TensorRow, ...]:
    p = "model.layers.{i}."
    q_t = Transform.PERMUTE_Q if permute else Transform.COPY
    k_t = Transform.PERMUTE_K if permute else Transform.COPY
    rows = [
        TensorRow(p + "input_layernorm.weight", "blk.{i}.attn_norm.weight", lambda c: (c.hidden_size,)),
        TensorRow(p + "self_attn.q_proj.weight", "blk.{i}.attn_q.weight", lambda c: (_q_dim(c), c.hidden_size), q_t),
        TensorRow(p + "self_attn.k_proj.weight", "blk.{i}.attn_k.weight", lambda c: (_kv_dim(c), c.hidden_size), k_t),
        TensorRow(p + "self_attn.v_proj.weight", "blk.{i}.attn_v.weight", lambda c: (_kv_dim(c), c.hidden_size)),
        TensorRow(p + "self_attn.o_proj.weight", "blk.{i}.attn_output.weight", lambda c: (c.hidden_size, _q_dim(c))),
        TensorRow(p + "post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", lambda c: (c.hidden_size,)),
        TensorRow(p + "mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", lambda c: (c.intermediate_size, c.hidden_size)),
        TensorRow(p + "mlp.up_proj.weight", "blk.{i}.ffn_up.weight", lambda c: (c.intermediate_size, c.hidden_size)),
        TensorRow(p + "mlp.down_proj.weight", "blk.{i}.ffn_down.weight", lambda c: (c.hidden_size, c.intermediate_size)),
    ]
    if qkv_bias:
        rows += [
            TensorRow(p + "self_attn.q_proj.bias", "blk.{i}.attn_q.bias", lambda c: (_q_dim(c),)),
            TensorRow(p + "self_attn.k_proj.bias", "blk.{i}.attn_k.bias", lambda c: (_kv_dim(c),)),
            TensorRow(p + "self_attn.v_proj.bias", "blk.{i}.attn_v.bias", lambda c: (_kv_dim(c),)),
        ]
    return tuple(rows)


ARCH_SPECS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec("llama", _GLOBAL, _layer(permute=True, qkv_bias=False)),
    "MistralForCausalLM": ArchSpec("llama", _GLOBAL, _layer(permute=True, qkv_bias=False)),
    "Qwen2ForCausalLM": ArchSpec("qwen2", _GLOBAL, _layer(permute=False, qkv_bias=True)),
}


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from HF's rotate-half order to GGUF's adjacent-pair order.

    Within a head of ``d`` rows, HF's row ``j`` (first half) and ``j + d/2`` (second half) form a
    rotation pair; GGUF wants them at rows ``2j`` and ``2j + 1``. Works for weights and biases.
    """
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2)
             .reshape(w.shape))


def apply_transform(w: np.ndarray, t: Transform, cfg: HFConfig) -> np.ndarray:
    if t is Transform.PERMUTE_Q:
        return permute_rows(w, cfg.n_heads)
    if t is Transform.PERMUTE_K:
        return permute_rows(w, cfg.n_kv_heads)
    return w


def plan_tensors(cfg: HFConfig, ckpt: Checkpoint) -> list[PlannedTensor]:
    """Map every checkpoint tensor to its GGUF name and check names and shapes against the config.

    Raises :class:`ConversionError` for a missing tensor, a tensor whose shape does not match the
    config, or a tensor the architecture does not know (which would otherwise be dropped silently).
    """
    spec = ARCH_SPECS[cfg.hf_architecture]
    if cfg.attention_bias and cfg.gguf_architecture == "llama":
        raise ConversionError(f"{cfg.path}: attention_bias=true is not supported for {cfg.hf_architecture}")
    rows = [(r, r.hf, r.gguf) for r in spec.global_rows]
    rows += [(r, r.hf.format(i=i), r.gguf.format(i=i)) for i in range(cfg.n_layers) for r in spec.layer_rows]
    plan: list[PlannedTensor] = []
    used: set[str] = set()
    for row, hf, gguf in rows:
        if not row.when(cfg):
            used.add(hf)  # e.g. a tied checkpoint that still stores lm_head.weight
            continue
        if hf not in ckpt:
            raise ConversionError(f"{ckpt.folder}: missing tensor {hf!r} (needed for {gguf})")
        entry = ckpt[hf]
        want = row.shape(cfg)
        if entry.shape != want:
            raise ConversionError(f"{entry.file}: tensor {hf!r} has shape {list(entry.shape)} but "
                                  f"config.json implies {list(want)}")
        if entry.dtype not in ("F32", "F16", "BF16"):
            raise ConversionError(f"{entry.file}: tensor {hf!r} has dtype {entry.dtype}; "
                                  f"only F32, F16 and BF16 weights can be converted")
        used.add(hf)
        plan.append(PlannedTensor(hf, gguf, want, row.transform))
    unknown = sorted(n for n in ckpt if n not in used and not n.endswith(spec.ignored_suffixes))
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise ConversionError(f"{ckpt[unknown[0]].file}: tensor(s) {', '.join(map(repr, unknown[:3]))}{more} "
                              f"are not part of {cfg.hf_architecture}")
    return plan
