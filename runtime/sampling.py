"""Turning a logits vector into the next token, and cutting the text stream at stop strings.

The sampler is a fixed chain in llama.cpp's default order::

    penalties -> top-k -> top-p -> min-p -> temperature -> draw from the distribution

so top-p and min-p judge the *untempered* distribution (temperature only reshapes what survives),
exactly as ``llama-cli``/``llama-server`` do. Everything runs in NumPy on the host: the model hands
over one float32 vector per step, and the chain touches the full vocabulary only with O(n) passes
(max, ``np.partition``, masks); sorting is confined to the candidates that survive. Results match
llama.cpp's own samplers (see tests/test_sampling.py).

Ties are broken toward the lower token id everywhere (greedy, the top-k boundary, the order of
candidates), so results depend only on the logits, the history and the seed.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np

# First slice of the vocabulary that top-p (without top-k) sorts; grown x8 until it holds mass p.
# Real models usually put 95% of the mass in far fewer tokens, so one partition pass suffices.
_NUCLEUS_FIRST_K = 128


@dataclass(frozen=True)
class SamplingParams:
    """Knobs of the sampling chain; every value is checked on construction (see :meth:`validate`)."""

    temperature: float = 0.8  # <= 0 means greedy (argmax)
    top_k: int = 40  # <= 0 disables
    top_p: float = 0.95  # >= 1 disables; in [0, 1]
    min_p: float = 0.05  # <= 0 disables; in [0, 1]
    # llama.cpp semantics: for every token seen in the last `repeat_last_n` tokens of the history,
    # logit > 0 -> logit / repeat_penalty, else logit * repeat_penalty.
    repeat_penalty: float = 1.0
    # Window of all three penalties (as in llama.cpp): 0 disables penalties, -1 means the whole history.
    repeat_last_n: int = 64
    presence_penalty: float = 0.0  # OpenAI semantics: logit -= presence_penalty if the token was seen
    frequency_penalty: float = 0.0  # logit -= frequency_penalty * (times the token was seen)
    seed: int | None = None  # None: fresh OS entropy

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field: NaN, inf, wrong type or out of range."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("top_k", "repeat_last_n", "seed"):
                if f.name == "seed" and value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise ValueError(f"{f.name} must be an integer, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        for name in ("top_p", "min_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.repeat_penalty <= 0.0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty!r}")
        if self.repeat_last_n < -1:
            raise ValueError(f"repeat_last_n must be >= -1, got {self.repeat_last_n!r}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalized(self) -> bool:
        """Whether the penalty stage can change any logit."""
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )


class Sampler:
    """The sampling chain plus its random generator (PCG64, reproducible for a given seed)."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        self.params = params
        self.vocab_size = int(vocab_size)
        self._all_ids = np.arange(self.vocab_size, dtype=np.int64)  # the candidates when nothing truncates
        self._rng = np.random.Generator(np.random.PCG64(params.seed))

    def reset(self, seed: int | None = None) -> None:
        """Restart the random stream from ``seed``, or from ``params.seed`` when omitted.

        With both ``None`` the generator is reseeded from fresh OS entropy.
        """
        if seed is None:
            seed = self.params.seed
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def probs(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The distribution :meth:`sample` draws from, after the whole chain.

        Returns ``(ids, p)``: int64 token ids and their float64 probabilities, all > 0 and summing
        to 1. After any truncation (top-k/top-p/min-p) the ids are ordered by decreasing
        probability (ties: lower id first); with no truncation they are the whole vocabulary in id
        order. Greedy gives one candidate with p = 1. ``history`` is the token sequence so far
        (prompt and/or output, as the caller chooses), used only by the penalties.
        """
        ids, w = self._weights(logits, history)
        keep = w > 0.0  # -inf logits and underflowed tails are never drawn: not candidates
        if not keep.all():
            ids, w = ids[keep], w[keep]
        return ids, w / w.sum()

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """Draw the next token id (deterministic for a given seed and call sequence)."""
        ids, w = self._weights(logits, history)
        if ids.shape[0] == 1:
            return int(ids[0])  # greedy or a single survivor: no random draw is consumed
        # Inverse CDF on the unnormalized weights. Scaling u by the total instead of normalizing
        # saves a pass; the upper clamp (the last id with nonzero weight) keeps a rounding of
        # u * total up to total from landing on a zero-weight token.
        cdf = np.cumsum(w, out=w)  # w is a fresh array: reuse it
        total = cdf[-1]
        i = int(np.searchsorted(cdf, self._rng.random() * total, side="right"))
        return int(ids[min(i, int(np.searchsorted(cdf, total, side="left")))])

    def random(self) -> float:
        """A uniform draw in [0, 1) from the sampler's stream (speculative acceptance tests)."""
        return float(self._rng.random())

    def draw(self, ids: np.ndarray, p: np.ndarray) -> int:
        """Draw one of ``ids`` with probabilities ``p`` (summing to 1) from the sampler's stream."""
        cdf = np.cumsum(p)
        i = int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"))
        return int(ids[min(i, len(ids) - 1)])

    def _weights(self, logits: np.ndarray, history: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Run the chain: candidate ids and their unnormalized float64 weights ``exp((x - max) / T)``."""
        x = self._penalized_logits(logits, history)
        p = self.params
        if p.greedy:
            return np.array([int(np.argmax(x))], dtype=np.int64), np.ones(1)
        ids: np.ndarray | None = None  # None: the whole vocabulary, in id order
        if 0 < p.top_k < self.vocab_size:
            ids = _top_k(x, p.top_k)
        if p.top_p < 1.0:
            ids = _top_p(x, ids, p.top_p)
        if p.min_p > 0.0:
            ids = _min_p(x, ids, p.min_p)
        # float64 softmax: with small temperatures (x - max) / T spans thousands of units, beyond
        # float32's exp range; subtracting the max keeps every weight in (0, 1]. In place, because
        # each full-vocabulary float64 temporary costs ~100 us of fresh pages.
        w = (x if ids is None else x[ids]).astype(np.float64)
        w -= w.max()
        w /= p.temperature
        np.exp(w, out=w)
        return (self._all_ids if ids is None else ids), w

    def _penalized_logits(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """Validate ``logits`` and apply the penalties (on a copy: the caller's array is untouched)."""
        x = np.asarray(logits, dtype=np.float32)
        if x.shape != (self.vocab_size,):
            raise ValueError(f"logits must have shape ({self.vocab_size},), got {x.shape}")
        p = self.params
        if p.penalized and len(history):
            window = history if p.repeat_last_n < 0 else history[-p.repeat_last_n :]
            tokens = np.asarray(window, dtype=np.int64)
            if tokens.min() < 0 or tokens.max() >= self.vocab_size:
                raise ValueError(f"history holds token ids outside [0, {self.vocab_size})")
            seen, counts = np.unique(tokens, return_counts=True)
            v = x[seen].astype(np.float64)
            v = np.where(v > 0.0, v / p.repeat_penalty, v * p.repeat_penalty)
            v -= counts * p.frequency_penalty + p.presence_penalty
            x = x.copy()
            x[seen] = v
        # One reduction catches NaN (max propagates it), +inf, and a vocabulary that is all -inf.
        top = float(x.max())
        if not math.isfinite(top):
            raise ValueError(f"logits have no finite maximum (max = {top}); NaN, +inf or everything masked")
        return x


# Below this many candidates NumPy's stable argsort is as fast as anything; above it, the
# unique-key sort in `_sort_desc` is ~5x faster (a stable float sort is a merge sort).
_STABLE_SORT_MAX = 1024


def _sort_desc(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``ids`` (ascending) reordered by decreasing ``x``, ties kept in id order."""
    xs = x[ids]
    if ids.shape[0] <= _STABLE_SORT_MAX:
        return ids[np.argsort(-xs, kind="stable")]
    # Pack (descending logit, position) into unique uint64 keys and run one unstable sort: the
    # float32 bits are mapped to an unsigned integer of the same order (flip all bits of
    # negatives, the sign bit of positives), then complemented for descending order.
    # Adding 0.0 turns -0.0 into +0.0 so the two zeros tie as they do in float comparisons.
    bits = (xs + np.float32(0.0)).view(np.uint32)
    ascending = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000))
    keys = (~ascending).astype(np.uint64) << np.uint64(32)
    keys |= np.arange(ids.shape[0], dtype=np.uint64)
    keys.sort()
    return ids[(keys & np.uint64(0xFFFFFFFF)).astype(np.int64)]


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` ids with the largest logits, ties at the boundary going to lower ids, sorted."""
    n = x.shape[0]
    if k >= n:
        return _sort_desc(x, np.arange(n, dtype=np.int64))
    # O(n) selection of the k-th largest value only; membership is then decided by value and id,
    # because (arg)partition picks arbitrarily among equal values.
    kth = np.partition(x, n - k)[n - k]
    ge = np.flatnonzero(x >= kth)
    if ge.shape[0] > k:  # ties at the boundary: drop the highest-id copies of the k-th value
        at_kth = np.flatnonzero(x[ge] == kth)
        ge = np.delete(ge, at_kth[k - ge.shape[0] :])
    return _sort_desc(x, ge)


def _nucleus_len(xs: np.ndarray, p: float, mass: float | None = None) -> int | None:
    """How many of the logits ``xs`` (sorted, decreasing) form the nucleus of mass ``p``.

    ``mass`` is the sum of ``exp(x - xs[0])`` over the whole candidate set when ``xs`` is only its
    top slice (default: ``xs`` is the whole set); returns None if the slice does not reach ``p``.
    llama.cpp's rule: keep tokens up to and including the first one where the cumulative
    probability reaches ``p``, so at least one token is always kept.
    """
    cum = np.cumsum(np.exp(xs.astype(np.float64) - float(xs[0])))
    cum /= cum[-1] if mass is None else mass
    i = int(np.searchsorted(cum, p, side="left"))
    return i + 1 if i < cum.shape[0] else None


def _top_p(x: np.ndarray, ids: np.ndarray | None, p: float) -> np.ndarray:
    """Nucleus filter on ``ids`` (sorted), or on the whole vocabulary when ``ids`` is None."""
    if ids is not None:
        n_keep = _nucleus_len(x[ids], p)
        return ids if n_keep is None else ids[:n_keep]
    # Whole vocabulary: the normalizer needs one exp over every logit (float32 exp, float64 sum:
    # ~3x cheaper than a float64 exp and accurate to ~1e-7 relative, far below any cut that matters),
    # but sorting is limited to a growing top slice until it holds mass p.
    n = x.shape[0]
    shifted = x - x.max()
    mass = float(np.exp(shifted, out=shifted).sum(dtype=np.float64))
    k = min(_NUCLEUS_FIRST_K, n)
    while True:
        cand = _top_k(x, k)
        n_keep = _nucleus_len(x[cand], p, mass)
        if n_keep is not None:
            return cand[:n_keep]
        if k == n:
            return cand  # rounding left the total a hair under p: everything is in the nucleus
        k = min(8 * k, n)


def _min_p(x: np.ndarray, ids: np.ndarray | None, min_p: float) -> np.ndarray:
    """Keep tokens with probability >= ``min_p`` x the top one's.

    Tested in logit space, ``x >= x_max + log(min_p)`` in float32 like llama.cpp, so no softmax is
    needed and the normalization of the candidate set does not matter.
    """
    log_min_p = np.float32(math.log(min_p))
    if ids is None:
        return _sort_desc(x, np.flatnonzero(x >= x.max() + log_min_p))
    # ids are sorted by decreasing logit, so the survivors are a prefix.
    return ids[: int(np.count_nonzero(x[ids] >= x[ids[0]] + log_min_p))]


class StopMatcher:
    """Streams text through a set of stop strings: holds back any tail that could start a stop string.

    OpenAI semantics: the stop string itself and everything after it are never emitted. The
    stream ends where the first stop string is *completed* (ties: the one starting earliest),
    i.e. where a character-by-character stream would end, so the output does not depend on how
    the text is split into pushes. Because every tail that is a prefix of some stop string is held
    back, a stop string split across any number of pushes is still caught.
    """

    def __init__(self, stops: str | Sequence[str]) -> None:
        """``stops``: the stop strings; a lone ``str`` is one stop string, as in OpenAI's API."""
        if isinstance(stops, str):
            stops = [stops]
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")
        self._stops = tuple(dict.fromkeys(stops))  # dedupe, keep order
        self._held = ""
        self._matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self._matched is not None

    @property
    def matched(self) -> str | None:
        """The stop string that ended the stream, or None."""
        return self._matched

    def push(self, text: str) -> tuple[str, bool]:
        """Feed newly decoded text; return ``(text safe to emit now, stopped?)``."""
        if self._matched is not None:
            return "", True
        if not self._stops:
            return text, False
        buf = self._held + text
        hit = self._first_occurrence(buf)
        if hit is not None:
            start, self._matched = hit
            self._held = ""
            return buf[:start], True
        cut = len(buf) - self._partial_tail_len(buf)
        self._held = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        """At the end of generation: the held-back tail (it never completed a stop string)."""
        held, self._held = self._held, ""
        return held

    def _first_occurrence(self, buf: str) -> tuple[int, str] | None:
        """(start, stop) of the occurrence in ``buf`` that ends first; ties go to the earliest start.

        The held-back part of ``buf`` contains no complete stop string (it would have matched on
        an earlier push), so this is also the first completion in the whole stream.
        """
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self._stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        return None if best is None else best[1:]

    def _partial_tail_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of some stop string."""
        longest = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:n]):
                    longest = n
                    break
        return longest


def stream_text(tokens: Iterator[int], decoder, stop: Sequence[str], on_stop) -> Iterator[str]:
    """The text pieces of a token stream: ``decoder`` (a tokenizer's ``stream_decoder()``) holds
    back incomplete UTF-8, and the stream ends at the first stop string (which is not
    yielded), calling ``on_stop()``. Closes ``tokens`` when done or closed early."""
    matcher = StopMatcher(stop)
    try:
        for token in tokens:
            text, stopped = matcher.push(decoder.push(token))
            if text:
                yield text
            if stopped:
                on_stop()
                return
        tail, _ = matcher.push(decoder.flush())
        tail += matcher.flush()
        if tail:
            yield tail
    finally:
        tokens.close()
