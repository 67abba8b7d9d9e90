"""The backend protocol: what the model runtime needs from a compute engine.

The numba backend (``runtime.numba_backend``) implements it on CPUs, the MLX backend
(``runtime.mlx_backend``) on Apple silicon (and MLX's CPU build). A backend owns the weights and evaluates tokens against a KV cache it created;
everything else -- tokenizer, sampling, generation loops, apps -- is shared.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from ..models.base import ModelArgs
from .errors import ContextOverflowError
from .kv_cache import KVCache, KVSpec


class Backend(Protocol):
    name: str
    args: ModelArgs

    def new_cache(self, n_ctx: int, spec: KVSpec = KVSpec()) -> KVCache:
        """An empty KV cache of kind ``spec`` with room for ``n_ctx`` tokens (a streaming
        ``spec`` never runs out of room)."""
        ...

    def forward(self, tokens: Sequence[int], cache: KVCache, logits_from: int | None = None,
                skip_layers: frozenset[int] = frozenset()) -> np.ndarray:
        """Evaluate ``tokens`` at positions ``cache.offset ...`` and append them to the cache.

        Returns float32 logits ``[len(tokens) - logits_from, vocab]`` for the tokens from index
        ``logits_from`` on (default: only the last token). The layers in ``skip_layers`` are
        skipped (the self-speculative drafter); their cache rows for these tokens are left
        unwritten, so such a pass is always rolled back with ``trim``.

        A pass of up to 8 tokens computes each token's logits bit for bit as a pass of that
        token alone would: speculative verification reproduces plain decoding exactly.
        """
        ...

    def forward_lazy(self, tokens: Sequence[int], cache: KVCache) -> Sequence[np.ndarray]:
        """``forward(tokens, cache, logits_from=0)`` for speculative verification: row ``j`` of
        the result is token j's logits, and a backend may compute a row only when it is read
        -- greedy verification stops reading at the first rejected draft, and the output head
        is a large share of a step on a small model. The rows are the same, bit for bit."""
        ...

    @property
    def weights_nbytes(self) -> int: ...

    def close(self) -> None: ...


def check_forward(tokens: Sequence[int], cache: KVCache, logits_from: int | None,
                  vocab_size: int) -> tuple[np.ndarray, int]:
    """The checks every backend's ``forward`` makes: int64 token ids, all in the vocabulary,
    that fit in the cache, and ``logits_from`` (default: the last token) in [0, n]."""
    toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
    n = len(toks)
    if logits_from is None:
        logits_from = max(n - 1, 0)
    if not 0 <= logits_from <= n:
        raise ValueError(f"logits_from={logits_from} outside [0, {n}]")
    if n and (toks.min() < 0 or toks.max() >= vocab_size):
        bad = int(toks[(toks < 0) | (toks >= vocab_size)][0])
        raise ValueError(f"token id {bad} outside the vocabulary [0, {vocab_size})")
    if cache.offset + n > cache.n_ctx:
        raise ContextOverflowError(cache.offset + n, cache.n_ctx)
    return toks, logits_from
