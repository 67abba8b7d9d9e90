"""KV caches: the protocol every backend and cache kind implements, and the 16-bit cache.

Like mlx-lm's cache objects they are small: storage, an ``offset`` (tokens held), ``trim`` to
roll back (speculative decoding), ``nbytes``. The compiled forward pass writes keys and values
in place at ``offset`` -- ``reserve(n)`` checks room first, ``update(n)`` then accounts for them.
"""
from __future__ import annotations

import mmap
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import ContextOverflowError


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

    n_ctx: int

    @property
    def offset(self) -> int: ...  # tokens currently held (= position of the next token)

    @property
    def nbytes(self) -> int: ...  # bytes of the keys and values held

    def reserve(self, n: int) -> int: ...  # room for n more tokens? returns their first position

    def update(self, n: int) -> None: ...  # the backend wrote n tokens at offset

    def trim(self, n: int) -> int: ...  # drop the last n tokens; returns how many were dropped

    def reset(self) -> None: ...


class F16KVCache:
    """Keys and values in IEEE half precision (as uint16 bit patterns for numba).

    k, v: uint16 [n_layers, n_kv_heads, n_ctx, head_dim], on lazily committed pages
    (:func:`lazy_zeros`): memory grows with the tokens written, not with ``n_ctx``.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_ctx: int):
        self.n_ctx = n_ctx
        shape = (n_layers, n_kv_heads, n_ctx, head_dim)
        self.k = lazy_zeros(shape, np.uint16)
        self.v = lazy_zeros(shape, np.uint16)
        self._bytes_per_token = 2 * 2 * n_layers * n_kv_heads * head_dim
        self._offset = 0

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def bytes_per_token(self) -> int:
        return self._bytes_per_token

    @property
    def nbytes(self) -> int:
        return self._offset * self._bytes_per_token

    def reserve(self, n: int) -> int:
        if self._offset + n > self.n_ctx:
            raise ContextOverflowError(self._offset + n, self.n_ctx)
        return self._offset

    def update(self, n: int) -> None:
        self.reserve(n)
        self._offset += n

    def trim(self, n: int) -> int:
        n = max(0, min(n, self._offset))
        self._offset -= n
        return n

    def reset(self) -> None:
        self._offset = 0
