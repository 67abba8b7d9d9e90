"""The MLX backend's KV cache: the ``KVCache`` protocol over MLX arrays.

It mirrors :class:`runtime.kv_cache.SlotKVCache` (same counters, eviction, ``max_trim``, sink
semantics; read its docstring and ``kernels/attention``'s), with MLX storage:

* every layer keeps keys and values in ``[1, n_kv_heads, slots, head_dim]`` arrays: float16 for a
  16-bit cache; for 8 or 4 bits, ``mx.quantize`` codes plus float16 scales and biases per group of
  ``QUANT_GROUP`` values along ``head_dim`` (each token quantized on its own when written, as in
  mlx-lm's QuantizedKVCache). Attention reads the slots in use back as float32. Unlike the numba
  cache, there are no 16-bit copies of recent tokens (``KVSpec.residual`` is not used here).
* Without a window, the token at position p sits in slot p; storage grows in steps of
  ``GROW_STEP`` slots up to ``n_ctx``. With one, positions below ``n_sink`` take slots
  0 .. n_sink - 1 and the rest go round a ring of ``window + max_batch`` slots (both rounded up
  to 32 for quantized keys), exactly like SlotKVCache, so trimming after a batch of up to
  ``max_batch`` tokens is exact. The one difference: SlotKVCache caps a quantized cache's
  ``max_trim`` at ``max_batch`` (its 16-bit copies of recent tokens); this cache has none.
* Keys are rotated at their position when written; for sink keys a query sits at
  ``min(c, n_sink + window - 1)`` (:meth:`sink_positions`), as in the numba backend.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from .errors import ContextOverflowError
from .kv_cache import UNBOUNDED, KVSpec, SlotBook

QUANT_GROUP = 32  # values of head_dim per scale/bias of a quantized cache
GROW_STEP = 256   # slots added at a time to an unbounded-window cache
_NEG_INF = -np.inf


def _token_bytes(bits: int, head_dim: int) -> int:
    """Bytes one head's key (or value) of one token takes."""
    if bits == 16:
        return 2 * head_dim
    return head_dim * bits // 8 + 2 * 2 * (head_dim // QUANT_GROUP)


class MLXKVCache(SlotBook):
    """Keys and values of every layer as MLX arrays, with SlotKVCache's slot bookkeeping."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_ctx: int,
                 spec: KVSpec = KVSpec(), max_batch: int = 128):
        if spec.quantized and head_dim % QUANT_GROUP:
            raise ValueError(f"a quantized KV cache needs head_dim % {QUANT_GROUP} == 0, got {head_dim}")
        self.spec, self.head_dim, self.max_batch = spec, head_dim, max_batch
        self.n_layers, self.n_kv_heads = n_layers, n_kv_heads
        if spec.window is None:
            self.n_ctx, self.n_sink, self.window = n_ctx, 0, UNBOUNDED
            self._ring_start, self._ring, self._max_slots = 0, 0, n_ctx
        else:
            self.n_ctx, self.n_sink, self.window = UNBOUNDED, spec.n_sink, spec.window
            # SlotKVCache's layout: with quantized keys it aligns the ring to its key groups of
            # 32, which changes when tokens are evicted; mirrored so the counters match.
            align = QUANT_GROUP if spec.bits_k != 16 else 1
            self._ring_start = -(-spec.n_sink // align) * align
            self._ring = -(-(spec.window + max_batch) // align) * align
            self._max_slots = self._ring_start + self._ring
        self._bytes_per_token = n_layers * n_kv_heads * (_token_bytes(spec.bits_k, head_dim)
                                                         + _token_bytes(spec.bits_v, head_dim))
        self.keys: list[tuple[mx.array, ...]] = []
        self.values: list[tuple[mx.array, ...]] = []
        self.slot_pos = np.zeros(0, dtype=np.int64)
        self.reset()

    # ---- storage ----
    def _empty(self, bits: int, slots: int) -> tuple[mx.array, ...]:
        shape = (1, self.n_kv_heads, slots)
        if bits == 16:
            return (mx.zeros((*shape, self.head_dim), dtype=mx.float16),)
        groups = self.head_dim // QUANT_GROUP
        return (mx.zeros((*shape, self.head_dim * bits // 32), dtype=mx.uint32),
                mx.zeros((*shape, groups), dtype=mx.float16), mx.zeros((*shape, groups), dtype=mx.float16))

    def _grow(self, slots: int) -> None:
        """Make room for ``slots`` slots in every layer (keeping what is stored)."""
        have = self.slot_pos.shape[0]
        if slots <= have:
            return
        if self.spec.window is None:
            slots = min(self._max_slots, -(-slots // GROW_STEP) * GROW_STEP)
        extra = slots - have
        for store, bits in ((self.keys, self.spec.bits_k), (self.values, self.spec.bits_v)):
            for l in range(self.n_layers):
                new = self._empty(bits, extra)
                store[l] = new if have == 0 else tuple(mx.concatenate([a, b], axis=2) for a, b in zip(store[l], new))
        self.slot_pos = np.concatenate([self.slot_pos, np.full(extra, -1, dtype=np.int64)])

    def reset(self) -> None:
        self.keys = [() for _ in range(self.n_layers)]
        self.values = [() for _ in range(self.n_layers)]
        self.slot_pos = np.zeros(0, dtype=np.int64)
        self._offset = 0
        self._evicted = 0
        self._ring_first = 0  # ring index of the oldest window token held
        self._ring_held = 0
        self._high = 0  # slots [0, _high) may be in use: what attention reads
        self._pending = np.zeros(0, dtype=np.int64)

    # ---- protocol (counters, update, trim, sink_positions: SlotBook) ----
    @property
    def nbytes(self) -> int:
        return self.held * self._bytes_per_token

    @property
    def max_trim(self) -> int:
        if self._evicted:  # the next query must still see the window - 1 tokens before it
            return max(0, self._ring_held - (self.window - 1))
        return self._offset

    def reserve(self, n: int) -> int:
        """Assign slots to the next ``n`` tokens (evicting the oldest window tokens if needed);
        returns the first one's position."""
        pos0 = self._offset
        if self.spec.window is None:
            if pos0 + n > self.n_ctx:
                raise ContextOverflowError(pos0 + n, self.n_ctx)
            self._grow(pos0 + n)
            self._pending = np.arange(pos0, pos0 + n, dtype=np.int64)
            self.slot_pos[pos0:pos0 + n] = self._pending
            self._high = max(self._high, pos0 + n)
            return pos0
        if n > self.max_batch:
            raise ValueError(f"a streaming cache takes at most {self.max_batch} tokens at a time, got {n}")
        self._grow(self._max_slots)
        self._reserve_window(pos0, n)
        return pos0

    # ---- what the forward pass uses (and sink_positions, from SlotBook) ----
    def mask(self, positions: np.ndarray) -> mx.array | str | None:
        """The attention mask of queries at ``positions`` over slots [0, high): None or "causal"
        when slots are positions (no window), else an additive float32 [n, high] mask."""
        if self.spec.window is None:
            return "causal" if len(positions) > 1 else None
        ck = self.slot_pos[:self._high][None, :]
        c = positions[:, None]
        visible = (ck >= 0) & (ck <= c) & ((ck < self.n_sink) | (ck > c - self.window))
        return mx.array(np.where(visible, np.float32(0), np.float32(_NEG_INF)))

    def _runs(self) -> list[tuple[int, int, int]]:
        """The pending slots as runs (first slot, first token index, length)."""
        runs: list[tuple[int, int, int]] = []
        for i, s in enumerate(self._pending.tolist()):
            if runs and runs[-1][0] + runs[-1][2] == s:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((s, i, 1))
        return runs

    def _encode(self, x: mx.array, bits: int) -> tuple[mx.array, ...]:
        if bits == 16:
            return (x.astype(mx.float16),)
        w, s, b = mx.quantize(x, group_size=QUANT_GROUP, bits=bits)
        return w, s.astype(mx.float16), b.astype(mx.float16)

    def _decode(self, parts: tuple[mx.array, ...], bits: int) -> mx.array:
        if bits == 16:
            return parts[0][:, :, :self._high].astype(mx.float32)
        w, s, b = (p[:, :, :self._high] for p in parts)
        return mx.dequantize(w, s, b, group_size=QUANT_GROUP, bits=bits).astype(mx.float32)

    def write_and_read(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store the reserved tokens' keys and values k, v [1, n_kv_heads, n, head_dim] (float32)
        of ``layer``; returns every key and value in slots [0, high) as float32 arrays."""
        runs = self._runs()
        for store, x, bits in ((self.keys, k, self.spec.bits_k), (self.values, v, self.spec.bits_v)):
            enc = self._encode(x, bits)
            parts = list(store[layer])
            for p, e in zip(range(len(parts)), enc):
                for s0, t0, m in runs:
                    parts[p][:, :, s0:s0 + m] = e[:, :, t0:t0 + m]
            store[layer] = tuple(parts)
        return self._decode(self.keys[layer], self.spec.bits_k), self._decode(self.values[layer], self.spec.bits_v)
