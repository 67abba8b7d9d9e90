"""The server's generation engine: one worker thread, a bounded FIFO queue, an LRU of prompt caches.

The model is not thread-safe (and on a laptop's few cores one generation already uses them all),
so a single worker thread runs jobs one at a time, in arrival order. Everything that touches the
model -- chat template, tokenizer, KV caches -- runs on that thread; the event loop only validates
requests and moves text. A job reports back through ``emit`` (called on the worker thread, so it
must be thread-safe: the server passes ``loop.call_soon_threadsafe``) and is stopped by setting
``job.cancelled``, which the worker checks between prefill chunks and between tokens.

Prompt caching: a few slots, each a KV cache and the tokens it holds. A request takes the slot
sharing the longest prefix with its prompt if that keeps at least half of the slot's tokens (the
next turn of a conversation re-evaluates only the new messages), else a new slot, else the least
recently used one (still reusing whatever prefix it shares). Slots are dropped,
least recently used first, while their committed memory exceeds ``cache_bytes``.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..runtime.errors import ContextOverflowError
from ..runtime.generate import GenerationStats, generate_tokens
from ..runtime.governor import UsageMeter, rss_bytes
from ..runtime.kv_cache import KVCache, reuse_prefix
from ..runtime.sampling import Sampler, SamplingParams, stream_text
from .serve_schema import APIError, CompletionRequest

if TYPE_CHECKING:
    from ..runtime.model import Model

PREFILL_CHUNK = 128  # prompt tokens per forward call: the granularity of cancelling a long prefill
DEFAULT_MAX_TOKENS = 512


@dataclass
class Job:
    """One request on its way through the queue. ``emit`` receives ``(kind, payload)`` events:
    ``("start", {"prompt_tokens", "cached_tokens"})``, ``("text", str)``, ``("done", usage)`` or
    ``("error", APIError)``."""

    request: CompletionRequest
    emit: Callable[[tuple[str, Any]], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass
class Slot:
    cache: KVCache
    history: list[int] = field(default_factory=list)
    high: int = 0  # most tokens it ever held: its committed pages (lazily mapped, never returned)

    def committed_bytes(self) -> int:
        return min(self.high, self.cache.slots) * self.cache.bytes_per_token


class PromptCache:
    """An LRU of (token history, KV cache) slots, bounded in count and committed bytes."""

    def __init__(self, model: "Model", n_slots: int, max_bytes: int):
        self.model, self.n_slots, self.max_bytes = model, max(1, n_slots), max_bytes
        self.slots: list[Slot] = []  # least recently used first
        self.hits = 0
        self.cached_tokens = 0

    def acquire(self, ids: list[int]) -> tuple[Slot, int]:
        """The slot to run ``ids`` in, trimmed to its longest reusable prefix (returned)."""
        def shared(slot: Slot) -> int:
            n = 0
            for a, b in zip(slot.history, ids):
                if a != b:
                    break
                n += 1
            return n

        # Every chat prompt shares the template's preamble, so "any shared prefix" would put all
        # requests in one slot and each would wipe the previous conversation. Take the best slot
        # only if it keeps at least half of what it holds (a conversation going on keeps all).
        best = max(self.slots, key=shared, default=None)
        if best is not None and shared(best) > 0 and 2 * shared(best) >= len(best.history):
            slot = best
        elif len(self.slots) < self.n_slots:
            slot = Slot(self.model.backend.new_cache(self.model.n_ctx, self.model.kv))
            self.slots.append(slot)
        else:
            slot = self.slots[0]
        self.slots.remove(slot)
        self.slots.append(slot)
        cached = reuse_prefix(slot.cache, slot.history, ids)
        if cached:
            self.hits += 1
            self.cached_tokens += cached
        return slot, cached

    def release(self, slot: Slot) -> None:
        """After a job: account the slot's memory and drop old slots over the byte bound."""
        slot.high = max(slot.high, slot.cache.offset)
        while self.slots and self.nbytes_committed() > self.max_bytes:
            self.slots.pop(0)  # unmapping the cache's pages returns them to the OS

    def nbytes(self) -> int:
        return sum(s.cache.nbytes for s in self.slots)

    def nbytes_committed(self) -> int:
        return sum(s.committed_bytes() for s in self.slots)


class Engine:
    """Runs jobs from a bounded FIFO queue on one worker thread."""

    def __init__(self, model: "Model", max_queue: int = 8, cache_slots: int = 4,
                 cache_bytes: int = 256 * 2**20):
        self.model = model
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max(1, max_queue))
        self.prompt_cache = PromptCache(model, cache_slots, cache_bytes)
        self.meter = UsageMeter()
        self.running: Job | None = None
        self.served = 0
        self.cancelled = 0
        self.rejected = 0
        self.last_stats: GenerationStats | None = None
        self._thread = threading.Thread(target=self._work, name="edgelm-generation", daemon=True)
        self._stopping = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Refuse new jobs; end queued and running ones with a 503 "shutting down" event, so their
        clients get a complete response (a streamed one ends with the error and ``[DONE]``).
        Safe to call from a signal handler: it only sets flags and emits."""
        self._stopping.set()
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                job.emit(("error", APIError(503, "the server is shutting down", code="shutting_down")))
        job = self.running
        if job is not None and not job.cancelled.is_set():
            job.cancelled.set()
            job.emit(("error", APIError(503, "the server is shutting down", code="shutting_down")))

    def stop(self, timeout: float = 5.0) -> None:
        """:meth:`shutdown`, then join the worker."""
        self.shutdown()
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue ``job``; a 503 APIError if the queue is full or the server is stopping."""
        if self._stopping.is_set():
            raise APIError(503, "the server is shutting down", code="shutting_down")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.rejected += 1
            raise APIError(503, f"the server is busy: {self.queue.maxsize} requests already wait; retry later",
                           code="queue_full") from None

    @property
    def waiting(self) -> int:
        return self.queue.qsize()

    # ---- the worker thread ----
    def _work(self) -> None:
        while not self._stopping.is_set():
            job = self.queue.get()
            if job is None:
                break
            if job.cancelled.is_set():  # the client left while waiting
                self.cancelled += 1
                continue
            self.running = job
            try:
                self._run(job)
            except APIError as exc:
                job.emit(("error", exc))
            except ContextOverflowError as exc:
                job.emit(("error", APIError(400, str(exc), "messages" if job.request.chat else "prompt",
                                            "context_length_exceeded")))
            except Exception as exc:  # a bug must not kill the worker: report it and go on
                job.emit(("error", APIError(500, f"generation failed: {type(exc).__name__}: {exc}",
                                            code="internal_error")))
            finally:
                self.running = None

    def _prompt_ids(self, req: CompletionRequest) -> list[int]:
        m = self.model
        if req.chat:
            try:
                text = m.template.render(req.messages, add_generation_prompt=True)
            except Exception as exc:  # the template's own raise_exception (e.g. roles must alternate)
                raise APIError(400, f"the chat template rejected the messages: {exc}", "messages",
                               "invalid_messages") from None
            return m.tokenize(text, add_bos=True, special=True)
        if isinstance(req.prompt, str):
            return m.tokenize(req.prompt)
        bad = [t for t in req.prompt if not 0 <= t < m.n_vocab]
        if bad:
            raise APIError(400, f"prompt holds token ids outside [0, {m.n_vocab}): {bad[:5]}", "prompt",
                           "invalid_value")
        return list(req.prompt)

    def _run(self, job: Job) -> None:
        m, req = self.model, job.request
        ids = self._prompt_ids(req)
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt", "invalid_value")
        if m.kv.window is None and len(ids) > m.n_ctx:
            raise ContextOverflowError(len(ids), m.n_ctx)
        try:
            params = SamplingParams(**req.sampling)
        except ValueError as exc:
            raise APIError(400, str(exc), None, "invalid_value") from None
        max_tokens = req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS
        stats = GenerationStats(prompt_tokens=len(ids), _t0=time.perf_counter())
        self.meter.begin()
        slot, cached = self.prompt_cache.acquire(ids)
        stats.cached_tokens = cached
        job.emit(("start", {"prompt_tokens": len(ids), "cached_tokens": cached}))
        try:
            self._generate(job, slot, ids[cached:], params, max_tokens, stats)
        finally:
            figures = self.meter.end(stats.generated_tokens, stats.decode_steps, stats.decode_s)
            stats.cpu_s = figures["cpu_s"]
            self.prompt_cache.release(slot)
            self.last_stats = stats
        if job.cancelled.is_set():
            self.cancelled += 1
            return
        self.served += 1
        job.emit(("done", {"prompt_tokens": len(ids), "completion_tokens": stats.generated_tokens,
                           "total_tokens": len(ids) + stats.generated_tokens,
                           "prompt_tokens_details": {"cached_tokens": cached},
                           "evicted_tokens": slot.cache.evicted, "finish_reason": stats.finish_reason,
                           "joules": figures["joules"]}))

    def _generate(self, job: Job, slot: Slot, new: list[int], params: SamplingParams, max_tokens: int,
                  stats: GenerationStats) -> None:
        m = self.model
        # Evaluate the prompt in chunks so a client that leaves stops a long prefill early. The
        # last prompt token always goes alone through generate_tokens: the batched and the
        # single-token forward passes differ slightly (up to ~0.6 in a logit on SmolLM2), so the
        # first token's logits must not depend on how much of the prompt was cached -- otherwise
        # the same request with the same seed samples differently on a prompt-cache hit.
        t = time.perf_counter()
        while len(new) > 1:
            if job.cancelled.is_set():
                return
            chunk = new[:min(PREFILL_CHUNK, len(new) - 1)]
            m.backend.forward(chunk, slot.cache)
            slot.history.extend(chunk)
            new = new[len(chunk):]
        chunks_s = time.perf_counter() - t
        if job.cancelled.is_set():
            return
        tokens = generate_tokens(m.backend, slot.cache, new, slot.history, Sampler(params, m.n_vocab),
                                 max_tokens, m.tokenizer.eog_ids, stats)

        def until_cancelled() -> Iterator[int]:  # checked between tokens, not only between pieces
            for token in tokens:
                if job.cancelled.is_set():
                    return
                yield token

        try:
            for text in stream_text(until_cancelled(), m.tokenizer.stream_decoder(), job.request.stop,
                                    lambda: setattr(stats, "finish_reason", "stop")):
                if job.cancelled.is_set():
                    return
                job.emit(("text", text))
        finally:
            tokens.close()
            stats.prefill_s += chunks_s

    # ---- reports ----
    def health(self) -> dict[str, Any]:
        m, pc = self.model, self.prompt_cache
        last = self.last_stats
        return {
            "status": "ok",
            "model": m.name,
            "queue": {"running": int(self.running is not None), "waiting": self.waiting,
                      "max_queue": self.queue.maxsize},
            "requests": {"served": self.served, "cancelled": self.cancelled, "rejected": self.rejected},
            "memory": {"rss_bytes": rss_bytes(), "weights_bytes": m.backend.weights_nbytes,
                       "kv_bytes": pc.nbytes(), "kv_committed_bytes": pc.nbytes_committed(),
                       "kv_bits": f"{m.kv.bits_k}/{m.kv.bits_v}", "kv_window": m.kv.window, "n_ctx": m.n_ctx},
            "prompt_cache": {"slots": len(pc.slots), "max_slots": pc.n_slots, "max_bytes": pc.max_bytes,
                             "hits": pc.hits, "cached_tokens": pc.cached_tokens},
            "throughput": {**self.meter.report(),
                           "last_decode_tok_s": last.decode_tok_s if last else None,
                           "last_prefill_tok_s": last.prefill_tok_s if last else None},
            "threads": m.threads,
        }
