"""The llama-family forward pass in MLX: one function for every architecture of ``models/``.

Pre-norm blocks (``mx.fast.rms_norm``), attention with grouped-query heads, RoPE
(``mx.fast.rope``: adjacent pairs for llama files -- ``traditional=True`` -- and NeoX halves for
qwen2; llama3's per-frequency divisors through ``freqs``), optional Q/K/V biases (qwen2), a
SiLU-gated MLP, and the output head, with every matrix product an ``mx.quantized_matmul`` over
the weights of ``kernels/mlx_weights``. Activations are float32 throughout: the numba backend's
prefill is float32 too, and matching its logits is what the tests check.

Attention reads the cache's keys and values (``runtime/mlx_cache``) and runs
``mx.fast.scaled_dot_product_attention`` -- except when a streaming cache's queries sit at a
different position for the sink keys than for the window keys (see ``kernels/attention``): then
the two score blocks are computed separately and share one softmax.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import mlx.core as mx
import numpy as np

from ..models.base import ModelArgs
from .mlx_weights import QuantWeight, Weight


@dataclass
class LayerWeights:
    attn_norm: mx.array  # float32 [dim]
    ffn_norm: mx.array
    q: Weight            # [q_dim, dim]
    k: Weight            # [kv_dim, dim]
    v: Weight
    o: Weight            # [dim, q_dim]
    gate: Weight         # [hidden, dim]
    up: Weight
    down: Weight         # [dim, hidden]
    bias_q: mx.array | None = None  # qwen2
    bias_k: mx.array | None = None
    bias_v: mx.array | None = None


@dataclass
class Weights:
    embed: Weight        # [vocab, dim]
    output: Weight       # [vocab, dim] (the embedding itself when tied)
    norm: mx.array       # float32 [dim]
    layers: list[LayerWeights]

    @property
    def nbytes(self) -> int:
        mats = [self.embed] + ([] if self.output is self.embed else [self.output])
        for lw in self.layers:
            mats += [lw.q, lw.k, lw.v, lw.o, lw.gate, lw.up, lw.down]
        vecs = [self.norm] + [a for lw in self.layers for a in (lw.attn_norm, lw.ffn_norm, lw.bias_q,
                                                                lw.bias_k, lw.bias_v) if a is not None]
        return sum(m.nbytes for m in mats) + sum(v.nbytes for v in vecs)


def rope_freqs(args: ModelArgs) -> mx.array | None:
    """``freqs`` for ``mx.fast.rope`` when the model divides its angles by per-frequency factors
    (llama3 rope scaling), else None (then ``base`` is used). mx.fast.rope's angle for pair i at
    position p is p / freqs[i], so freqs = base ** (2i / d) * factor[i]."""
    if args.rope_freq_factors is None:
        return None
    half = args.rope_dim // 2
    inv = np.float32(args.rope_theta) ** (np.arange(0, args.rope_dim, 2, dtype=np.float32) / np.float32(args.rope_dim))
    return mx.array(inv * np.asarray(args.rope_freq_factors, dtype=np.float32)[:half])


class Rope:
    """RoPE of one model: ``rope(x [B, heads, L, head_dim], offset)``."""

    def __init__(self, args: ModelArgs):
        self.dims, self.traditional = args.rope_dim, not args.rope_neox
        self.freqs = rope_freqs(args)
        self.base = None if self.freqs is not None else float(args.rope_theta)

    def __call__(self, x: mx.array, offset: int | mx.array) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=self.base, scale=1.0,
                            offset=offset, freqs=self.freqs)

    def at(self, x: mx.array, positions: np.ndarray) -> mx.array:
        """x [1, heads, L, head_dim] rotated with query i at ``positions[i]`` (any positions)."""
        per_query = x.transpose(2, 1, 0, 3)  # [L, heads, 1, head_dim]: one batch entry per query
        out = self(per_query, mx.array(positions.astype(np.int32)))
        return out.transpose(2, 1, 0, 3)


def _attention_with_sinks(q: mx.array, qs: mx.array, k: mx.array, v: mx.array, n_sink: int,
                          mask: mx.array, scale: float) -> mx.array:
    """Softmax attention where queries ``qs`` score the first ``n_sink`` slots (the sinks) and
    queries ``q`` the rest. q, qs [1, H, L, D]; k, v [1, Hkv, S, D]; mask [L, S] additive."""
    _, n_heads, n, d = q.shape
    n_kv = k.shape[1]
    rep = n_heads // n_kv
    q5 = q.reshape(1, n_kv, rep, n, d)
    qs5 = qs.reshape(1, n_kv, rep, n, d)
    kt = k[:, :, None].swapaxes(-1, -2)  # [1, Hkv, 1, D, S]
    scores = mx.concatenate([qs5 @ kt[..., :n_sink], q5 @ kt[..., n_sink:]], axis=-1) * scale + mask
    p = mx.softmax(scores, axis=-1, precise=True)
    return (p @ v[:, :, None]).reshape(1, n_heads, n, d)


@lru_cache(maxsize=None)
def _mlp_fn(eps: float, specs: tuple[tuple[int, int] | None, ...]) -> Callable:
    """The compiled MLP block of one weight layout: x + down(silu(gate(h)) * up(h)), h = norm(x).

    ``specs``: (bits, group size) of gate/up/down, or None for a dense matrix; weights are
    inputs, so one compiled function serves every layer of that layout."""

    def mm(x: mx.array, spec: tuple[int, int] | None, parts: tuple[mx.array, ...]) -> mx.array:
        if spec is None:
            return x @ parts[0].T
        return mx.quantized_matmul(x, *parts, transpose=True, group_size=spec[1], bits=spec[0])

    def mlp(x, norm, g0, g1, g2, u0, u1, u2, d0, d1, d2):
        h = mx.fast.rms_norm(x, norm, eps)
        g = mm(h, specs[0], (g0, g1, g2)[:1 if specs[0] is None else 3])
        u = mm(h, specs[1], (u0, u1, u2)[:1 if specs[1] is None else 3])
        return x + mm(nn_silu(g) * u, specs[2], (d0, d1, d2)[:1 if specs[2] is None else 3])

    return mx.compile(mlp)


def nn_silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)


def _parts(w: Weight) -> tuple[tuple[int, int] | None, tuple[mx.array, mx.array, mx.array]]:
    if isinstance(w, QuantWeight):
        return (w.bits, w.group_size), (w.w, w.scales, w.biases)
    return None, (w.w, w.w, w.w)


def _mlp(x: mx.array, lw: LayerWeights, eps: float) -> mx.array:
    specs, arrays = zip(*(_parts(w) for w in (lw.gate, lw.up, lw.down)))
    return _mlp_fn(eps, tuple(specs))(x, lw.ffn_norm, *arrays[0], *arrays[1], *arrays[2])


def forward(weights: Weights, args: ModelArgs, rope: Rope, tokens: mx.array, cache, pos0: int,
            positions: np.ndarray, logits_from: int, skip_layers: frozenset[int] = frozenset()) -> mx.array | None:
    """Logits float32 [n - logits_from, vocab] of ``tokens`` int32 [n] at ``positions``
    (``pos0 ...``), whose cache slots ``cache`` has reserved; writes their keys and values.
    Layers in ``skip_layers`` are left out (self-speculative drafting). None when no logits
    are asked for (logits_from == n: MLX's matrix products do not take 0 rows)."""
    n = tokens.shape[0]
    hd, eps = args.head_dim, args.rms_eps
    scale = hd ** -0.5
    sink_pos = cache.sink_positions(positions)
    mask = cache.mask(positions)
    x = weights.embed.rows(tokens)[None]  # [1, n, dim]
    for l, lw in enumerate(weights.layers):
        if l in skip_layers:
            continue
        h = mx.fast.rms_norm(x, lw.attn_norm, eps)
        q, k, v = lw.q.matmul(h), lw.k.matmul(h), lw.v.matmul(h)
        if lw.bias_q is not None:
            q, k, v = q + lw.bias_q, k + lw.bias_k, v + lw.bias_v
        q = q.reshape(1, n, args.n_heads, hd).transpose(0, 2, 1, 3)      # [1, H, n, D]
        k = k.reshape(1, n, args.n_kv_heads, hd).transpose(0, 2, 1, 3)   # [1, Hkv, n, D]
        v = v.reshape(1, n, args.n_kv_heads, hd).transpose(0, 2, 1, 3)
        qr, k = rope(q, pos0), rope(k, pos0)
        keys, values = cache.write_and_read(l, k, v)                     # [1, Hkv, slots, D]
        if sink_pos is None:
            att = mx.fast.scaled_dot_product_attention(qr, keys, values, scale=scale, mask=mask)
        else:
            att = _attention_with_sinks(qr, rope.at(q, sink_pos), keys, values, cache.n_sink, mask, scale)
        x = x + lw.o.matmul(att.transpose(0, 2, 1, 3).reshape(1, n, args.q_dim))
        x = _mlp(x, lw, eps)
    if logits_from >= n:
        return None
    x = mx.fast.rms_norm(x[0, logits_from:], weights.norm, eps)
    return weights.output.matmul(x).astype(mx.float32)
