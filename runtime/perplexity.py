"""Perplexity of a causal LM over a token stream, by llama.cpp's method (``llama-perplexity``).

The method, so that figures are comparable with llama.cpp's published ones:

* the whole text is tokenized once (with BOS if the model adds one) and cut into consecutive,
  non-overlapping chunks of ``n_ctx`` tokens; a trailing partial chunk is dropped;
* when the model adds BOS, the first token of *every* chunk is replaced by BOS (the chunk then
  looks like the start of a document);
* each chunk is evaluated in a fresh context;
* only the second half of each chunk is scored: the logits at positions ``n_ctx/2 .. n_ctx-2``
  predict the tokens at ``n_ctx/2+1 .. n_ctx-1`` (``n_ctx - n_ctx/2 - 1`` tokens per chunk), so every
  scored token sees at least ``n_ctx/2`` tokens of context;
* PPL = exp(mean NLL) and its error is the standard error of the mean NLL propagated through
  exp: ``ppl * sqrt((E[nll^2] - E[nll]^2) / (count - 1))``.

Everything here is a pure function of a ``logits_fn(ids) -> float32 [len(ids), n_vocab]``, so the
same code scores edgelm's logits and llama-cpp-python's (which validates the method itself).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

LogitsFn = Callable[[Sequence[int]], np.ndarray]


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity over the chunks evaluated so far (``chunks``); running or final."""

    ppl: float
    ppl_err: float  # standard error of the estimate
    chunks: int
    ctx: int
    tokens_scored: int
    seconds: float

    def to_dict(self) -> dict:
        """The JSON form printed by ``edgelm perplexity --json``."""
        return asdict(self)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood (float64) of ``targets[i]`` under the softmax of ``logits[i]``.

    Like llama.cpp: the exponentials are taken in float32 after subtracting the row maximum and
    summed in float64, which keeps the sum exact enough over a 50k-150k vocabulary.
    """
    logits = np.asarray(logits, dtype=np.float32)
    row_max = logits.max(axis=1, keepdims=True)
    sum_exp = np.exp(logits - row_max).sum(axis=1, dtype=np.float64)
    target_logit = logits[np.arange(len(targets)), targets].astype(np.float64)
    return row_max[:, 0].astype(np.float64) + np.log(sum_exp) - target_logit


def chunk_tokens(tokens: Sequence[int], n_ctx: int, n_chunks: int | None = None,
                 bos_id: int | None = None) -> list[np.ndarray]:
    """Split ``tokens`` into the chunks llama.cpp evaluates (first token set to ``bos_id`` if given).

    Raises ``ValueError`` when the text holds fewer than two chunks, as llama.cpp does (with one
    chunk the result would rest on ``n_ctx/2`` tokens only).
    """
    if n_ctx < 4:
        raise ValueError(f"context size {n_ctx} is too small for perplexity (need at least 4)")
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) < 2 * n_ctx:
        raise ValueError(
            f"perplexity with a context of {n_ctx} needs at least {2 * n_ctx} tokens; "
            f"the text has only {len(tokens)}"
        )
    available = len(tokens) // n_ctx
    count = available if n_chunks is None or n_chunks <= 0 else min(n_chunks, available)
    chunks = []
    for i in range(count):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
        if bos_id is not None:
            chunk[0] = bos_id
        chunks.append(chunk)
    return chunks


def iter_perplexity(logits_fn: LogitsFn, tokens: Sequence[int], n_ctx: int,
                    n_chunks: int | None = None, bos_id: int | None = None) -> Iterator[PerplexityResult]:
    """Evaluate chunk after chunk, yielding the running result after each one (the last is final).

    ``bos_id`` is the model's BOS id when the model adds BOS (the caller's ``tokens`` then start
    with it), else ``None``. ``n_chunks`` of ``None`` or ``<= 0`` means every full chunk.
    """
    first = n_ctx // 2
    nll_sum = nll2_sum = 0.0
    count = 0
    start = time.perf_counter()
    chunks = chunk_tokens(tokens, n_ctx, n_chunks, bos_id)
    for index, chunk in enumerate(chunks):
        logits = logits_fn(chunk.tolist())
        if logits.shape[0] != n_ctx:
            raise ValueError(f"logits_fn returned {logits.shape[0]} rows for {n_ctx} tokens")
        # Targets are the chunk's own tokens: the BOS substitution only touches position 0,
        # which is never a target.
        nll = token_nll(logits[first:n_ctx - 1], chunk[first + 1:])
        nll_sum += float(nll.sum())
        nll2_sum += float(np.square(nll).sum())
        count += len(nll)
        yield _summarize(nll_sum, nll2_sum, count, index + 1, n_ctx, time.perf_counter() - start)


def perplexity(logits_fn: LogitsFn, tokens: Sequence[int], n_ctx: int,
               n_chunks: int | None = None, bos_id: int | None = None) -> PerplexityResult:
    """Final perplexity over ``n_chunks`` chunks (see :func:`iter_perplexity`)."""
    result = None
    for result in iter_perplexity(logits_fn, tokens, n_ctx, n_chunks, bos_id):
        pass
    assert result is not None  # chunk_tokens guarantees at least one chunk
    return result


def _summarize(nll_sum: float, nll2_sum: float, count: int, chunks: int, n_ctx: int,
               seconds: float) -> PerplexityResult:
    mean = nll_sum / count
    ppl = math.exp(mean)
    variance = nll2_sum / count - mean * mean
    # Same estimator as llama.cpp: standard error of the mean NLL, scaled by d(exp)/dx = ppl.
    # (chunk_tokens guarantees count >= 2; rounding can push a zero variance slightly negative.)
    err = ppl * math.sqrt(max(variance, 0.0) / (count - 1))
    return PerplexityResult(ppl=ppl, ppl_err=err, chunks=chunks, ctx=n_ctx, tokens_scored=count,
                            seconds=seconds)


# ---- streaming: one pass over a long text through a (rolling) KV cache ----

FeedFn = Callable[[Sequence[int]], np.ndarray]


@dataclass(frozen=True)
class StreamingSegment:
    """Perplexity of the tokens predicted in one segment of a streaming pass, and the resources
    in use when it ended (RSS of the process, speed over the segment)."""

    start: int  # index of the first token of the segment
    tokens: int  # tokens predicted in it
    ppl: float
    tok_s: float  # wall-clock tokens per second over the segment
    cpu_tok_s: float  # tokens per CPU-second of this process (robust to other load on the machine)
    rss_mb: float


def iter_streaming_perplexity(feed: FeedFn, tokens: Sequence[int], segment: int = 10000,
                              batch: int = 128, rss_fn: Callable[[], float] | None = None
                              ) -> Iterator[StreamingSegment]:
    """Feed ``tokens`` in order, ``batch`` at a time, scoring every prediction (no chunking).

    ``feed(ids)`` evaluates ``ids`` after everything fed before and returns their logits
    ``[len(ids), vocab]``: the caller's cache decides what the model still sees (a rolling
    window keeps memory flat). The logits of token i score token i + 1; a segment collects the
    predictions of tokens ``start .. start + segment - 1``. ``rss_fn`` returns the RSS in MB.
    """
    if segment < 1 or batch < 1:
        raise ValueError(f"segment and batch must be positive, got {segment} and {batch}")
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) < 2:
        raise ValueError(f"streaming perplexity needs at least 2 tokens, got {len(tokens)}")
    seg_start, nll_sum, count = 0, 0.0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    for b0 in range(0, len(tokens) - 1, batch):
        b1 = min(b0 + batch, len(tokens) - 1)  # the last token is never fed: nothing to score
        logits = feed(tokens[b0:b1].tolist())
        done = []  # segments completed in this batch: (start, count, nll_sum, seconds, cpu)
        i0 = b0
        while i0 < b1:  # the batch's predictions, split at segment boundaries
            i1 = min(b1, (i0 // segment + 1) * segment)
            nll = token_nll(logits[i0 - b0:i1 - b0], tokens[i0 + 1:i1 + 1])
            nll_sum += float(nll.sum())
            count += len(nll)
            if i1 % segment == 0 or i1 == len(tokens) - 1:
                done.append((seg_start, count, nll_sum, time.perf_counter() - t0, time.process_time() - c0))
                seg_start, nll_sum, count = i1, 0.0, 0
                t0, c0 = time.perf_counter(), time.process_time()
            i0 = i1
        del logits  # RSS is sampled without this batch's temporaries
        for start, n, total, seconds, cpu in done:
            yield StreamingSegment(start=start, tokens=n, ppl=math.exp(total / n),
                                   tok_s=n / seconds if seconds > 0 else 0.0,
                                   cpu_tok_s=n / cpu if cpu > 0 else 0.0,
                                   rss_mb=rss_fn() if rss_fn else 0.0)


def combine_segments(segments: Sequence[StreamingSegment]) -> float:
    """Perplexity over all segments (token-weighted mean of their NLLs)."""
    total = sum(s.tokens for s in segments)
    return math.exp(sum(s.tokens * math.log(s.ppl) for s in segments) / total)
