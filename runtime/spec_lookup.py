"""Prompt lookup decoding's drafter, and when its drafts are worth verifying.

``LookupDrafter`` proposes the tokens that followed an earlier occurrence of the text's last
n-gram (in the prompt or the output so far), the one that agrees with the text for longest.
Drafting is free, verifying is not: on a CPU where the int8 dot products bound a step, each
verified token costs a good part of a step, and a rejected one buys nothing. ``LookupOdds``
estimates how likely each draft token is to be accepted from the length of the match behind
it, and ``lookup_draft_len`` turns those odds and the pass costs into the draft length with the
most expected tokens per second (often none).
"""
from __future__ import annotations

import bisect
from typing import Sequence

MATCH_CAP = 32  # match lengths are counted up to this; longer ones predict no better


class LookupDrafter:
    """Prompt lookup: continue the last n-gram of the text as it continued before.

    An index maps every n-gram (n = ``min_ngram`` .. ``max_ngram``) of the history to where it
    ended, excluding the history's own last position. Of the latest ``CANDIDATES`` places
    where the text's last n-gram occurred, the one whose earlier tokens agree with the text's
    for longest wins (ties: the latest): in a summary, "the" + "city" may follow many places
    of the source, and the one that also matches the words before is the one being copied
    (its longer match also tells ``LookupOdds`` the draft is a good bet). A lookup is
    O(CANDIDATES * MATCH_CAP); the index grows by O(max_ngram) per token.
    """

    CANDIDATES = 8

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._tokens: list[int] = []
        self._index: dict[tuple[int, ...], list[int]] = {}

    def reset(self, tokens: Sequence[int]) -> None:
        self._tokens = []
        self._index = {}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        h = self._tokens
        for tok in tokens:
            end = len(h) - 1  # the n-grams ending at the old last position become searchable
            if end >= 0:
                for n in range(self.min_ngram, self.max_ngram + 1):
                    if end - n + 1 >= 0:
                        self._index.setdefault(tuple(h[end - n + 1:end + 1]), []).append(end)
            h.append(int(tok))

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the best earlier match of the last n-gram ([] if none)."""
        return self.match(k)[0]

    def match(self, k: int) -> tuple[list[int], int]:
        """``draft(k)`` and the length of the match behind it: the n-gram plus every earlier
        token that also agrees, counted back up to ``MATCH_CAP`` (0 when nothing matched)."""
        h = self._tokens
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(h) < n:
                continue
            ends = self._index.get(tuple(h[len(h) - n:]))
            if not ends:
                continue
            best_len, best_end = -1, -1
            for end in reversed(ends[-self.CANDIDATES:]):
                length, i, j = n, end - n, len(h) - 1 - n
                while length < MATCH_CAP and i >= 0 and h[i] == h[j]:
                    length, i, j = length + 1, i - 1, j - 1
                if length > best_len:
                    best_len, best_end = length, end
            return h[best_end + 1:best_end + 1 + k], best_len
        return [], 0



class LookupOdds:
    """How likely a prompt-lookup draft token is to be accepted, by the length of the match
    behind it (the source n-gram, the earlier tokens that also agree, and the drafts accepted
    before it in the round): a Beta estimate per band of lengths, learned online.

    A 2-token match on common words ("of the") is a weak hint; a 10-token match means the
    output is copying a passage and will likely go on copying it. The priors were measured on
    the default model's chat and summary outputs (``tools/lookup_odds.py``).
    """

    BANDS = (2, 3, 4, 6, 9, 14, 20)            # lower edges of the length bands
    PRIOR = (0.55, 0.65, 0.75, 0.75, 0.8, 0.8, 0.95)  # prior acceptance per band
    WEIGHT = 4.0                                # pseudo-observations behind each prior
    MEMORY = 400.0                              # observations kept per band (older ones fade)

    def __init__(self) -> None:
        self.hits = [p * self.WEIGHT for p in self.PRIOR]
        self.tries = [self.WEIGHT] * len(self.BANDS)

    def _band(self, length: int) -> int:
        return max(0, bisect.bisect_right(self.BANDS, length) - 1)

    def p(self, length: int) -> float:
        b = self._band(length)
        return self.hits[b] / self.tries[b]

    def update(self, length: int, drafted: int, accepted: int) -> tuple[float, float]:
        """A round drafted ``drafted`` tokens from a match of ``length`` and the model accepted
        the first ``accepted``: tokens up to and including the first rejection are evidence.
        Returns (acceptances predicted for that evidence before this update, acceptances seen)."""
        evidence = range(min(drafted, accepted + 1))
        predicted = sum(self.p(length + j) for j in evidence)
        for j in evidence:
            b = self._band(length + j)
            if self.tries[b] >= self.MEMORY:
                self.hits[b] *= 0.5
                self.tries[b] *= 0.5
            self.tries[b] += 1.0
            self.hits[b] += 1.0 if j < accepted else 0.0
        return predicted, float(min(accepted, drafted))


def lookup_draft_len(odds: Sequence[float], costs: Sequence[float]) -> int:
    """The number of drafts k (0 .. len(odds)) that maximizes expected tokens per unit time,
    (1 + sum_{i<=k} prod_{j<=i} odds[j]) / costs[k], when draft i is accepted with probability
    odds[i] given the drafts before it were, and costs[k] is the time of a (k + 1)-token pass
    over a plain step's (costs[0] == 1): k == 0 is plain decoding."""
    best_k, best_rate = 0, 1.0 / costs[0]
    expected, run = 1.0, 1.0
    for k in range(1, min(len(odds), len(costs) - 1) + 1):
        run *= odds[k - 1]
        expected += run
        rate = expected / costs[k]
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k
