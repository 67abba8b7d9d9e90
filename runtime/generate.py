"""Generation as small functions (as in gpt-fast): prefill, decode_one_token, and a generator.

The forward pass returns logits; the sampler (``runtime.sampling``) picks tokens. Nothing here
knows about text: ``runtime.model`` turns the token stream into streamed, stop-checked text.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .backend import Backend
from .kv_cache import KVCache
from .sampling import Sampler
from .speculative import SpecStats, Speculator


@dataclass
class GenerationStats:
    """Timings of one generate/chat call (filled in as it runs)."""

    prompt_tokens: int = 0      # tokens in the prompt
    cached_tokens: int = 0      # of which were reused from the KV cache (not evaluated again)
    generated_tokens: int = 0   # tokens yielded (an end-of-generation token is not counted)
    decode_steps: int = 0       # tokens evaluated after the prompt (one per step without speculation)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0         # time to first token, from the call
    cpu_s: float = 0.0          # process CPU time over the call
    finish_reason: str = ""     # "stop" (EOG or stop string), "length" (max_tokens or context full)
    spec: SpecStats = field(default_factory=SpecStats)  # what speculative decoding did
    _t0: float = field(default=0.0, repr=False)

    @property
    def prefill_tok_s(self) -> float:
        evaluated = self.prompt_tokens - self.cached_tokens
        return evaluated / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def cpu_s_per_token(self) -> float:
        return self.cpu_s / self.generated_tokens if self.generated_tokens else 0.0


def prefill(backend: Backend, cache: KVCache, tokens: Sequence[int]) -> np.ndarray:
    """Evaluate prompt tokens into the cache; logits of the last one.

    All but the last token go through the batched pass; the last goes alone, as a decode step.
    The two passes round differently (the single-token one quantizes activations to 8 bits, as
    llama.cpp does), so this way the first sampled token does not depend on how much of the
    prompt was already cached: the same request with the same seed gives the same text whether
    it is new or continues a cached conversation.
    """
    if len(tokens) > 1:
        backend.forward(tokens[:-1], cache)
    return decode_one_token(backend, cache, tokens[-1])


def decode_one_token(backend: Backend, cache: KVCache, token: int) -> np.ndarray:
    """Evaluate one token into the cache; its logits."""
    return backend.forward([token], cache)[0]


def generate_tokens(
    backend: Backend,
    cache: KVCache,
    new_tokens: Sequence[int],
    history: list[int],
    sampler: Sampler,
    max_tokens: int,
    eog_ids: frozenset[int],
    stats: GenerationStats,
    speculator: Speculator | None = None,
) -> Iterator[int]:
    """Yield sampled tokens after evaluating ``new_tokens`` (appended to the cached ``history``).

    ``history`` is the token list the cache holds and is kept in step with it, so a caller that
    stops early (closes the generator) still knows exactly what the cache contains.

    With a ``speculator`` each step may evaluate several tokens at once (``runtime.speculative``):
    the accepted drafts wait in ``pending`` -- already in the cache -- and are yielded one by one,
    so the caller sees the same stream, stop handling and cache contents as without one.
    """
    t = time.perf_counter()
    logits = prefill(backend, cache, new_tokens) if len(new_tokens) else None
    history.extend(new_tokens)
    stats.prefill_s = time.perf_counter() - t
    if logits is None:
        raise ValueError("nothing to evaluate: the prompt is empty and already cached")
    if max_tokens <= 0:
        stats.finish_reason = "length"
        return
    pending = deque([sampler.sample(logits, history)])  # next tokens; all but the last are in the cache
    stats.ttft_s = time.perf_counter() - stats._t0
    t_decode = time.perf_counter()
    try:
        while True:
            token = pending.popleft()
            if token in eog_ids:
                stats.finish_reason = "stop"
                return
            stats.generated_tokens += 1
            yield token
            if stats.generated_tokens == max_tokens:
                break
            if pending:  # an accepted draft: already evaluated
                continue
            if cache.offset >= cache.n_ctx:  # context full: end like max_tokens
                break
            if speculator is None:
                logits = decode_one_token(backend, cache, token)
                history.append(token)
                pending.append(sampler.sample(logits, history))
                stats.decode_steps += 1
                continue
            accepted, nxt = speculator.step(backend, cache, token, history, sampler,
                                            budget=max_tokens - stats.generated_tokens)
            cut = next((j for j, d in enumerate(accepted) if d in eog_ids), None)
            if cut is not None:  # an accepted end-of-generation token: keep it out of the cache
                cache.trim(len(accepted) - cut)
                accepted, nxt = accepted[:cut], accepted[cut]
            history.append(token)
            history.extend(accepted)
            pending.extend(accepted)
            pending.append(nxt)
            stats.decode_steps += 1 + len(accepted)
        stats.finish_reason = "length"
    finally:
        stats.decode_s = time.perf_counter() - t_decode
