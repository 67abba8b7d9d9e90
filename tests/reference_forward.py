"""An exact-arithmetic oracle: the llama-family forward pass in NumPy float64.

Weights come from the ``gguf`` package's dequantizers (not ours), so this checks edgelm's kernels,
attention and RoPE against the mathematics itself rather than against another engine's rounding.
Slow (seconds for a few hundred tokens) and for tests only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


class ReferenceLlama:
    """float64 forward of a llama-architecture GGUF (GGML's interleaved-pair RoPE, GQA, SwiGLU)."""

    def __init__(self, path: Path):
        r = GGUFReader(str(path))

        def field(key: str):
            f = r.fields[key]
            return f.parts[f.data[0]][0]

        arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
        if arch != "llama":
            raise ValueError(f"reference forward covers llama only, not {arch!r}")
        self.w = {t.name: dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
                  .astype(np.float64) for t in r.tensors}
        self.n_layers = int(field("llama.block_count"))
        self.n_heads = int(field("llama.attention.head_count"))
        self.n_kv = int(field("llama.attention.head_count_kv"))
        self.eps = float(field("llama.attention.layer_norm_rms_epsilon"))
        self.base = float(field("llama.rope.freq_base"))
        self.dim = self.w["token_embd.weight"].shape[1]
        self.hd = self.dim // self.n_heads

    def _rms(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def _rope(self, x: np.ndarray) -> np.ndarray:  # x [T, heads, hd]; pairs (2i, 2i+1) rotate
        t = np.arange(x.shape[0], dtype=np.float64)
        theta = t[:, None] * self.base ** (-2 * np.arange(self.hd // 2) / self.hd)
        c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
        out = np.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
        out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
        return out

    def logits(self, ids: list[int]) -> np.ndarray:
        """float64 logits [len(ids), vocab]."""
        w, T, hd = self.w, len(ids), self.hd
        x = w["token_embd.weight"][ids]                                   # [T, dim]
        causal = np.triu(np.full((T, T), -np.inf), 1)
        for layer in range(self.n_layers):
            p = f"blk.{layer}."
            h = self._rms(x, w[p + "attn_norm.weight"])
            q = self._rope((h @ w[p + "attn_q.weight"].T).reshape(T, self.n_heads, hd))
            k = self._rope((h @ w[p + "attn_k.weight"].T).reshape(T, self.n_kv, hd))
            v = (h @ w[p + "attn_v.weight"].T).reshape(T, self.n_kv, hd)
            att = np.empty((T, self.n_heads, hd))
            for head in range(self.n_heads):
                kv = head // (self.n_heads // self.n_kv)
                s = q[:, head] @ k[:, kv].T / np.sqrt(hd) + causal      # [T, T]
                s = np.exp(s - s.max(-1, keepdims=True))
                att[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
            x = x + att.reshape(T, self.dim) @ w[p + "attn_output.weight"].T
            h = self._rms(x, w[p + "ffn_norm.weight"])
            g, u = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
            x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T
        head_w = w.get("output.weight", w["token_embd.weight"])
        return self._rms(x, w["output_norm.weight"]) @ head_w.T
