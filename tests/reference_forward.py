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

from edgelm.runtime import affine


def _affine_bits(r: GGUFReader, name: str) -> int:
    """Bits of affine tensor ``name``: its edgelm.quantization.tensor_bits entry, else the default."""
    def values(key: str) -> list:
        f = r.fields.get(key)
        if f is None:
            return []
        return [f.parts[i] for i in f.data]

    names = [bytes(v).decode() for v in values(affine.KEY_TENSOR_NAMES)]
    bits = [int(v[0]) for v in values(affine.KEY_TENSOR_BITS)]
    if name in names:
        return bits[names.index(name)]
    return int(values(affine.KEY_BITS)[0][0])


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
        tensors = {t.name: t for t in r.tensors}
        self.w = {}
        for t in r.tensors:
            if t.name.endswith((".scales", ".biases")):
                continue
            scales = tensors.get(t.name[: -len(".weight")] + ".scales") if t.name.endswith(".weight") else None
            if scales is not None:  # affine INT4/INT3 (runtime/affine.py), by the NumPy reference
                biases = tensors[t.name[: -len(".weight")] + ".biases"]
                words = np.asarray(t.data).view(np.uint32).reshape(int(t.shape[1]), int(t.shape[0]))
                s = np.asarray(scales.data).reshape(int(scales.shape[1]), int(scales.shape[0]))
                b = np.asarray(biases.data).reshape(s.shape)
                bits = _affine_bits(r, t.name)
                cols = words.shape[1] * 32 // bits
                self.w[t.name] = affine.dequantize(words, s, b, bits, cols // s.shape[1]).astype(np.float64)
                continue
            self.w[t.name] = (dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
                              .astype(np.float64))
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


def streaming_reference_logits(ref: ReferenceLlama, ids: list[int], window: int, n_sink: int) -> np.ndarray:
    """float64 logits of ``ids`` fed one at a time through a StreamingLLM cache, by the paper.

    The cache keeps the first ``n_sink`` tokens and the ``window`` most recent ones (the current
    token included) as keys *before* RoPE; every step rotates them by their index in the cache,
    and the query by its own index, so distances are positions within the cache.
    """
    w, hd = ref.w, ref.hd
    keys: list[list[np.ndarray]] = [[] for _ in range(ref.n_layers)]    # [held][n_kv, hd] pre-RoPE
    values: list[list[np.ndarray]] = [[] for _ in range(ref.n_layers)]
    out = []
    for tok in ids:
        x = w["token_embd.weight"][tok][None]                         # [1, dim]
        for layer in range(ref.n_layers):
            p = f"blk.{layer}."
            h = ref._rms(x, w[p + "attn_norm.weight"])
            keys[layer].append((h @ w[p + "attn_k.weight"].T).reshape(ref.n_kv, hd))
            values[layer].append((h @ w[p + "attn_v.weight"].T).reshape(ref.n_kv, hd))
            if len(keys[layer]) > n_sink + window:                    # evict the oldest non-sink
                del keys[layer][n_sink], values[layer][n_sink]
            held = len(keys[layer])
            k = ref._rope(np.stack(keys[layer]))                      # [held, n_kv, hd] at 0..held-1
            v = np.stack(values[layer])
            q = (h @ w[p + "attn_q.weight"].T).reshape(1, ref.n_heads, hd)
            q = ref._rope(np.concatenate([np.zeros((held - 1, ref.n_heads, hd)), q]))[-1]  # at held-1
            att = np.empty((ref.n_heads, hd))
            for head in range(ref.n_heads):
                kv = head // (ref.n_heads // ref.n_kv)
                s = k[:, kv] @ q[head] / np.sqrt(hd)
                s = np.exp(s - s.max())
                att[head] = (s / s.sum()) @ v[:, kv]
            x = x + att.reshape(1, ref.dim) @ w[p + "attn_output.weight"].T
            h = ref._rms(x, w[p + "ffn_norm.weight"])
            g, u = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
            x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T
        head_w = w.get("output.weight", w["token_embd.weight"])
        out.append((ref._rms(x, w["output_norm.weight"]) @ head_w.T)[0])
    return np.stack(out)
