"""KV caches: the protocol every backend and cache kind implements, and the numba backend's cache.

Like mlx-lm's cache objects they are small: storage, an ``offset`` (the position of the next
token), ``trim`` to roll back (speculative decoding), ``nbytes``. The compiled forward pass
writes keys and values in place -- ``reserve(n)`` finds room first (evicting if the cache
streams), ``update(n)`` then accounts for the tokens written.

One class covers every kind the issue asks for, because they compose: keys and values each at
16, 8 or 4 bits (``kernels/kvquant``), and optionally StreamingLLM eviction: ``n_sink`` attention
sinks kept forever plus a rolling ``window`` of the most recent tokens. How attention sees
positions within the cache is explained in ``kernels/attention``.

A quantized cache follows KIVI: keys per channel in groups of 32 tokens, values per token, and
the most recent tokens also at 16 bits -- every token until its key group is complete, then
``residual`` tokens more -- which attention reads instead of the quantized store.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from ..kernels.kvquant import KV_BITS, KV_GROUP, key_group_bytes, row_bytes
from .errors import ContextOverflowError

UNBOUNDED = 2**62  # n_ctx / window of a cache that never runs out of positions
DEFAULT_RESIDUAL = 32  # see KVSpec.residual


def lazy_zeros(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A zero-filled array on fresh anonymous pages, committed (and counted in RSS) only as they
    are written.

    ``np.zeros`` is not enough: once the process has freed a block this large, glibc raises its
    mmap threshold and serves the next ``calloc`` from the heap, which it must memset -- every
    page of a cache sized for the whole context would then be resident from the start.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).reshape(shape)


@runtime_checkable
class KVCache(Protocol):
    """What the model code needs from a KV cache, whatever its storage."""

    n_ctx: int  # positions the sequence may reach (UNBOUNDED when the cache streams)

    @property
    def offset(self) -> int: ...  # position of the next token (evicted tokens included)

    @property
    def held(self) -> int: ...  # tokens whose keys and values are in memory

    @property
    def evicted(self) -> int: ...  # tokens dropped by the rolling window so far

    @property
    def nbytes(self) -> int: ...  # bytes of the keys and values held

    @property
    def max_trim(self) -> int: ...  # how many of the last tokens trim() can roll back exactly

    def reserve(self, n: int) -> int: ...  # room for n more tokens? returns their first position

    def update(self, n: int) -> None: ...  # the backend wrote the n reserved tokens

    def trim(self, n: int) -> int: ...  # drop the last n tokens; returns how many were dropped

    def reset(self) -> None: ...


@dataclass(frozen=True)
class KVSpec:
    """The kind of cache: bits of keys and values; a rolling window with sinks, or none."""

    bits_k: int = 16
    bits_v: int = 16
    window: int | None = None  # None: keep everything (the context length bounds the sequence)
    n_sink: int = 4
    residual: int = DEFAULT_RESIDUAL  # quantized caches: tokens kept at 16 bits after their key group completes

    def __post_init__(self) -> None:
        for name, bits in (("kv_bits_k", self.bits_k), ("kv_bits_v", self.bits_v)):
            if bits not in KV_BITS:
                raise ValueError(f"{name} must be one of {KV_BITS}, got {bits!r}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"kv_window must be a positive number of tokens, got {self.window}")
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if self.residual < 0:
            raise ValueError(f"kv_residual must be >= 0, got {self.residual}")

    @property
    def quantized(self) -> bool:
        return self.bits_k != 16 or self.bits_v != 16


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class _Layout:
    """Sizes of a SlotKVCache (see its docstring): bytes of a token's key and value per head,
    where the ring starts and how long it is, slots, and rows of 16-bit recent copies."""

    key_bytes: int
    value_bytes: int
    ring_start: int
    ring: int
    slots: int
    n_recent: int

    @classmethod
    def of(cls, head_dim: int, n_ctx: int, spec: KVSpec, max_batch: int) -> "_Layout":
        row16 = row_bytes(16, head_dim)
        kb = row16 if spec.bits_k == 16 else key_group_bytes(spec.bits_k, head_dim) // KV_GROUP
        align = KV_GROUP if spec.bits_k != 16 else 1  # key groups take whole runs of 32 slots
        if spec.window is None:
            ring_start, ring, slots = 0, 0, _round_up(n_ctx, align)
        else:
            ring_start, ring = _round_up(spec.n_sink, align), _round_up(spec.window + max_batch, align)
            slots = ring_start + ring
        # Recent rows: a query reads them for keys up to residual + 31 positions back, while a
        # batch of max_batch writes ahead of it (see kernels/attention).
        n_recent = _round_up(spec.residual + KV_GROUP + max_batch, KV_GROUP) if spec.quantized else 0
        return cls(kb, row_bytes(spec.bits_v, head_dim), ring_start, ring, slots, n_recent)


def cache_footprint(n_layers: int, n_kv_heads: int, head_dim: int, n_ctx: int, spec: KVSpec,
                    max_batch: int = 128) -> tuple[int, int, int]:
    """(bytes per token, tokens a full cache holds, fixed bytes of 16-bit recent copies) of a
    :class:`SlotKVCache` of kind ``spec`` -- what it commits at most, for the memory governor."""
    lay = _Layout.of(head_dim, n_ctx, spec, max_batch)
    heads = n_layers * n_kv_heads
    return (heads * (lay.key_bytes + lay.value_bytes), lay.slots,
            min(lay.n_recent, lay.slots) * heads * 2 * row_bytes(16, head_dim))


class SlotBook:
    """Slot bookkeeping shared by the backends' caches: counters, the sinks + ring layout of a
    streaming window, ``trim``. A subclass sets ``spec``, ``n_sink``, ``window``, ``slot_pos``,
    ``_ring_start``, ``_ring``, ``_bytes_per_token`` and the counters (see ``reset``), and
    assigns slots in ``reserve``."""

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def held(self) -> int:
        return self._offset - self._evicted

    @property
    def evicted(self) -> int:
        return self._evicted

    @property
    def bytes_per_token(self) -> int:
        return self._bytes_per_token

    @property
    def slots(self) -> int:
        return self.slot_pos.shape[0]

    def _slot(self, ring_index: int) -> int:
        return self._ring_start + ring_index % self._ring

    def sink_positions(self, positions: np.ndarray) -> np.ndarray | None:
        """Where queries at ``positions`` sit for the sink keys (their position within the
        cache), or None when that is their own position for every query (``kernels/attention``)."""
        if self.spec.window is None or self.n_sink == 0:
            return None
        last = self.n_sink + self.window - 1
        if positions[-1] <= last:
            return None
        return np.minimum(positions, last)

    def _reserve_window(self, pos0: int, n: int) -> None:
        """Slots for tokens pos0 .. pos0 + n - 1 of a streaming cache: sinks keep their own,
        window tokens go round the ring, evicting the oldest when it is full."""
        pending = np.empty(n, dtype=np.int64)
        for i in range(n):
            pos = pos0 + i
            if pos < self.n_sink:
                slot = pos
            else:
                if self._ring_held == self._ring:  # evict the oldest window token
                    self.slot_pos[self._slot(self._ring_first)] = -1
                    self._ring_first += 1
                    self._ring_held -= 1
                    self._evicted += 1
                slot = self._slot(self._ring_first + self._ring_held)
                self._ring_held += 1
            self.slot_pos[slot] = pos
            pending[i] = slot
            self._high = max(self._high, slot + 1)
        self._pending = pending

    def update(self, n: int) -> None:
        if n != len(self._pending):
            raise ValueError(f"update({n}) after reserving {len(self._pending)} tokens")
        self._offset += n
        self._pending = self._pending[:0]

    def trim(self, n: int) -> int:
        """Drop the last ``n`` tokens (at most :attr:`max_trim`); returns how many were dropped."""
        n = max(0, min(n, self.max_trim))
        for _ in range(n):
            self._offset -= 1
            pos = self._offset
            if pos < self.n_sink or self.spec.window is None:
                self.slot_pos[pos] = -1
            else:
                self._ring_held -= 1
                self.slot_pos[self._slot(self._ring_first + self._ring_held)] = -1
        if self.spec.window is None:
            self._high = self._offset
        return n


class SlotKVCache(SlotBook):
    """Keys and values of every layer in slots of fixed-size rows (the numba backend's cache).

    k: uint8 [n_layers, n_kv_heads, slots, 2 head_dim] 16-bit rows, or for quantized keys
       [n_layers, n_kv_heads, slots // 32, key group bytes] groups of 32 slots (kvquant);
    v: uint8 [n_layers, n_kv_heads, slots, row bytes];
    rk, rv: uint8 [n_layers, n_kv_heads, n_recent, 2 head_dim] 16-bit copies of the most recent
       tokens of a quantized cache, the token at position p in row p % n_recent (n_recent = 0
       for a 16-bit cache). All on lazily committed pages (:func:`lazy_zeros`): memory grows
       with the tokens written, not with the slot count.
    slot_pos: int64 [slots], the position of the token in each slot (-1: empty).

    Without a window, the token at position p sits in slot p. With one, positions below
    ``n_sink`` take slots 0 .. n_sink - 1 and the rest go round a ring of ``window + max_batch``
    slots (for quantized keys, whole key groups starting at a multiple of 32): a batch of up to
    ``max_batch`` tokens fits without evicting anything one of its queries still sees, and
    ``trim`` can roll back that many tokens exactly (speculative decoding gets the same output
    with and without eviction).
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_ctx: int,
                 spec: KVSpec = KVSpec(), max_batch: int = 128):
        self.spec = spec
        self.head_dim = head_dim
        self.max_batch = max_batch
        lay = _Layout.of(head_dim, n_ctx, spec, max_batch)
        if spec.window is None:
            self.n_ctx, self.n_sink, self.window = n_ctx, 0, UNBOUNDED
        else:
            self.n_ctx, self.n_sink, self.window = UNBOUNDED, spec.n_sink, spec.window
        self._ring, self._ring_start, slots = lay.ring, lay.ring_start, lay.slots
        kb, vb, row16 = lay.key_bytes, lay.value_bytes, row_bytes(16, head_dim)
        if spec.bits_k == 16:
            self.k = lazy_zeros((n_layers, n_kv_heads, slots, kb), np.uint8)
        else:
            self.k = lazy_zeros((n_layers, n_kv_heads, slots // KV_GROUP, kb * KV_GROUP), np.uint8)
        self.v = lazy_zeros((n_layers, n_kv_heads, slots, vb), np.uint8)
        self.n_recent = lay.n_recent
        self.rk = lazy_zeros((n_layers, n_kv_heads, self.n_recent, row16), np.uint8)
        self.rv = lazy_zeros((n_layers, n_kv_heads, self.n_recent, row16), np.uint8)
        self._recent_bytes_per_token = n_layers * n_kv_heads * 2 * row16 if spec.quantized else 0
        self.slot_pos = np.full(slots, -1, dtype=np.int64)
        self._bytes_per_token = n_layers * n_kv_heads * (kb + vb)
        self._pending = np.zeros(0, dtype=np.int64)
        self._kvcfg = np.array([spec.bits_k, spec.bits_v, self.n_sink, self.window, 0, 0,
                                spec.residual, self.n_recent], dtype=np.int64)
        self.reset()

    # ---- state ----
    def reset(self) -> None:
        self.slot_pos[:] = -1
        self._offset = 0
        self._evicted = 0
        self._ring_first = 0  # ring index of the oldest window token held
        self._ring_held = 0
        self._high = 0  # slots [0, _high) may be in use: what attention scans

    @property
    def nbytes(self) -> int:
        """Bytes of the tokens held, plus their 16-bit copies in a quantized cache."""
        recent = min(self._offset, self.n_recent) * self._recent_bytes_per_token
        return self.held * self._bytes_per_token + recent

    @property
    def max_trim(self) -> int:
        n = self._offset
        if self._evicted:
            # The next query must still see the window - 1 tokens before it.
            n = max(0, self._ring_held - (self.window - 1))
        if self.n_recent:
            # ... and the 16-bit copies of its recent tokens, which later writes overwrite.
            n = min(n, self.max_batch)
        return n

    # ---- writing ----
    def reserve(self, n: int) -> int:
        """Assign slots to the next ``n`` tokens (evicting the oldest window tokens if needed);
        returns the first one's position. The slots are in :attr:`pending_slots`."""
        pos0 = self._offset
        if self.spec.window is None:
            if pos0 + n > self.n_ctx:
                raise ContextOverflowError(pos0 + n, self.n_ctx)
            self._pending = np.arange(pos0, pos0 + n, dtype=np.int64)
            self.slot_pos[pos0:pos0 + n] = self._pending
            self._high = max(self._high, pos0 + n)
            return pos0
        if n > self.max_batch:
            raise ValueError(f"a streaming cache takes at most {self.max_batch} tokens at a time, got {n}")
        self._reserve_window(pos0, n)
        return pos0

    @property
    def pending_slots(self) -> np.ndarray:
        """int64 [n]: the slots :meth:`reserve` gave the tokens being written."""
        return self._pending

    def kvcfg(self, sink_queries: bool) -> np.ndarray:
        """The int64 description the compiled forward pass reads (``kernels.forward.K_*``);
        one array per cache, updated in place (a decode step allocates nothing here)."""
        self._kvcfg[4], self._kvcfg[5] = self._high, int(sink_queries)
        return self._kvcfg


def reuse_prefix(cache: KVCache, history: list[int], ids: Sequence[int]) -> int:
    """Trim ``cache`` (which holds the tokens ``history``) to the longest prefix it shares with
    ``ids``; returns that prefix's length. ``history`` is cut to match, in place.

    At least one token of ``ids`` is left to evaluate (the next token needs its logits), and a
    prefix that has rolled out of a streaming window cannot be trimmed back to: then the cache
    starts over. Shared by ``Model`` and the server's prompt-cache slots.
    """
    common = 0
    for a, b in zip(history, ids):
        if a != b:
            break
        common += 1
    common = min(common, len(ids) - 1)
    if len(history) - common > cache.max_trim:  # rolled out of a streaming window
        common = 0
        cache.reset()
    cache.trim(len(history) - common)
    del history[common:]
    return common
