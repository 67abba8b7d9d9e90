"""Speculative decoding with no second model: drafts from the model itself or from the text.

A round starts from a sampled token ``t`` that the cache does not hold yet. A drafter proposes
up to ``k`` tokens that may follow it; one batched forward pass evaluates ``[t, d1 .. dk]``
and gives the model's own distribution after each of them; the drafts are accepted left to
right while they agree with the model, the rest are rolled back with the cache's ``trim``, and
the round ends with one token sampled from the model (the correction, or a bonus token when
every draft was accepted). A round yields between 1 and k + 1 tokens for one weight pass.

Two drafters (``SelfDrafter``, ``LookupDrafter``):

* self: the same weights with some layers skipped (``runtime.spec_calibrate`` finds which),
  evaluated token by token into the real cache and trimmed before verification. Drafting stops
  when the drafter's top probability falls below a confidence threshold, which
  ``ThresholdTuner`` moves online from the observed acceptance rate (Draft & Verify's rule).
* lookup: the tokens that followed an earlier occurrence of the text's last n-gram (the one
  agreeing with the text for longest), in the prompt or the output so far (prompt lookup
  decoding): free to draft, and right whenever the output copies the input -- summaries,
  edits, retrieval-augmented answers. Verifying a draft is not free, so a match is drafted
  only as far as it pays: ``LookupOdds`` estimates how likely each draft token is to be
  accepted from the length of the match behind it, ``PassCosts`` what a pass of n tokens
  costs, and ``lookup_draft_len`` picks the length with the most expected tokens per second
  -- often none.

Exactness. Greedy: a draft is accepted iff it is the argmax of the model's logits at its
position, and a verification pass of up to 8 tokens computes every token's logits bit for bit
as one-token decoding does (``Backend.forward``), so the output is identical token for token.
The pass computes the output head only for the rows read (``Backend.forward_lazy``): greedy
verification stops reading at the first rejected draft.
Sampling: draft d drawn from the drafter's distribution q is accepted with probability
min(1, p(d) / q(d)), else the token is drawn from norm(max(0, p - q)) -- the standard rule
(Leviathan et al., Chen et al.), so every token is distributed exactly as plain sampling's. p
and q both come from the full sampling chain (penalties, top-k/top-p/min-p, temperature). A
lookup draft is a point mass (q(d) = 1).

``Pacer`` (``auto`` mode) times self-drafted rounds against plain decoding steps and switches
self drafting off for a while, with backoff, when it does not pay for the current prompt.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .backend import Backend
from .kv_cache import KVCache
from .sampling import Sampler
from .spec_lookup import LookupDrafter, LookupOdds, lookup_draft_len

SPECULATIVE_MODES = ("off", "self", "lookup", "auto")
MAX_DRAFT = 7  # verification batches of up to 8 tokens reproduce one-token decoding exactly


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`SPECULATIVE_MODES`, else a ``ValueError`` naming them."""
    if mode not in SPECULATIVE_MODES:
        raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE_MODES)}, got {mode!r}")
    return mode


@dataclass
class SpecStats:
    """What speculation did during one generate call."""

    rounds: int = 0          # verification passes that checked at least one draft
    drafted: int = 0         # draft tokens proposed
    accepted: int = 0        # of which the model accepted
    self_rounds: int = 0     # rounds drafted by the layer-skipping drafter
    lookup_rounds: int = 0   # rounds drafted by prompt lookup
    plain_steps: int = 0     # one-token decoding steps (nothing to draft, or speculation paused)
    paused: int = 0          # times auto mode switched speculation off because it did not pay

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per verification round."""
        return self.accepted / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": round(self.acceptance_rate, 4), "mean_accepted": round(self.mean_accepted, 3),
                "self_rounds": self.self_rounds, "lookup_rounds": self.lookup_rounds,
                "plain_steps": self.plain_steps, "paused": self.paused}


# ---------------------------------------------------------------------------------------------
# drafters


class SelfDrafter:
    """The model with ``skip`` layers skipped, drafting into the real cache (trimmed after)."""

    def __init__(self, skip: frozenset[int]):
        self.skip = frozenset(skip)

    def draft(self, backend: Backend, cache: KVCache, token: int, history: list[int], sampler: Sampler,
              k: int, threshold: float) -> tuple[list[int], list[tuple[np.ndarray, np.ndarray]]]:
        """Draft up to ``k`` tokens after ``token`` (not in the cache yet); returns them and the
        distribution (ids, q) each was drawn from. Stops early when the drafter's top probability
        falls below ``threshold``; leaves the cache as it found it."""
        drafts: list[int] = []
        dists: list[tuple[np.ndarray, np.ndarray]] = []
        t = token
        evaluated = 0
        ctx = history + [token]
        try:
            for _ in range(k):
                logits = backend.forward([t], cache, skip_layers=self.skip)[0]
                evaluated += 1
                if top_probability(logits) < threshold:
                    break
                ids, q = sampler.probs(logits, ctx)
                d = int(ids[0]) if len(ids) == 1 else sampler.draw(ids, q)
                drafts.append(d)
                dists.append((ids, q))
                ctx.append(d)
                t = d
        finally:
            if cache.trim(evaluated) != evaluated:
                raise RuntimeError("speculative drafting: the cache could not roll back its draft tokens")
        return drafts, dists


def top_probability(logits: np.ndarray) -> float:
    """max softmax(logits): the drafter's confidence in its first choice."""
    m = float(logits.max())
    return 1.0 / float(np.exp(logits - m, dtype=np.float32).sum(dtype=np.float64))


class ThresholdTuner:
    """The draft-confidence threshold, moved after every round toward a target acceptance rate.

    A draft token is worth proposing when the chance that it is accepted exceeds what drafting
    it costs relative to a decoding step (``cost``): below the target the threshold rises, so
    fewer low-confidence tokens are drafted; above it, it falls.
    """

    def __init__(self, threshold: float = 0.6, step: float = 0.05, lo: float = 0.05, hi: float = 0.99):
        self.threshold, self.step, self.lo, self.hi = threshold, step, lo, hi
        self.rate = 0.8  # EMA of the acceptance rate of drafted tokens

    def update(self, drafted: int, accepted: int, cost: float) -> None:
        if drafted == 0:
            # nothing drafted: the threshold was too high to draft even one token
            self.threshold = max(self.lo, self.threshold - self.step)
            return
        self.rate = 0.8 * self.rate + 0.2 * accepted / drafted
        target = min(0.95, max(0.3, cost + 0.1))
        if self.rate < target:
            self.threshold = min(self.hi, self.threshold + self.step)
        else:
            self.threshold = max(self.lo, self.threshold - self.step)


@dataclass
class Pacer:
    """Auto mode's judge: is speculation producing tokens faster than plain decoding?

    Both speeds are exponential moving averages of seconds per token, from plain steps and from
    speculative rounds. After ``patience`` rounds slower than ``margin`` x plain speed,
    speculation pauses for ``backoff`` tokens (doubling each time, up to ``max_backoff``), then
    is tried again -- the text may have changed (a summary starts quoting its source).
    """

    margin: float = 0.98
    patience: int = 3
    backoff: int = 16
    max_backoff: int = 256
    plain_s: float = 0.0      # EMA seconds per token, plain decoding
    spec_s: float = 0.0       # EMA seconds per token, speculative rounds
    _slow: int = 0
    _pause_left: int = 0
    _probe_left: int = 2      # plain steps to time before the first round
    paused: int = field(default=0)

    @property
    def speculate(self) -> bool:
        return self._pause_left == 0 and self._probe_left == 0

    def plain_step(self, seconds: float) -> None:
        self.plain_s = seconds if self.plain_s == 0.0 else 0.7 * self.plain_s + 0.3 * seconds
        if self._probe_left:
            self._probe_left -= 1
        elif self._pause_left:
            self._pause_left -= 1

    def round(self, seconds: float, tokens: int) -> None:
        per = seconds / tokens
        self.spec_s = per if self.spec_s == 0.0 else 0.7 * self.spec_s + 0.3 * per
        if self.plain_s and self.spec_s * self.margin > self.plain_s:
            self._slow += 1
            if self._slow >= self.patience:
                self._pause_left = self.backoff
                self.backoff = min(self.max_backoff, 2 * self.backoff)
                self._slow = 0
                self.spec_s = 0.0
                self.paused += 1
                self._probe_left = 1  # re-time plain decoding on the way
        else:
            self._slow = 0


# ---------------------------------------------------------------------------------------------
# verification


def verify(backend: Backend, cache: KVCache, token: int, drafts: list[int],
           dists: list[tuple[np.ndarray, np.ndarray]] | None, history: list[int],
           sampler: Sampler) -> tuple[int, int]:
    """Evaluate ``[token] + drafts`` in one pass and accept drafts left to right.

    ``dists[j]`` is the distribution draft j was drawn from (None: point masses, as for lookup
    drafts). Returns ``(accepted, next_token)``: the cache keeps ``token`` and the accepted
    drafts, and ``next_token`` (not in the cache) is sampled from the model.
    """
    k = len(drafts)
    # [k + 1][vocab]; rows past the first rejection need not be computed (Backend.forward_lazy)
    rows = backend.forward_lazy([token] + drafts, cache) if k else backend.forward([token], cache)
    ctx = history + [token]
    accepted, nxt = k, -1
    for j in range(k):
        ids, p = sampler.probs(rows[j], ctx)
        d = drafts[j]
        if len(ids) == 1:  # greedy (or a single survivor): accept iff it is the model's choice
            if int(ids[0]) == d:
                ctx.append(d)
                continue
            accepted, nxt = j, int(ids[0])
            break
        pd = _prob_of(ids, p, d)
        if dists is None:
            qd, q_ids, q = 1.0, np.array([d]), np.ones(1)
        else:
            q_ids, q = dists[j]
            qd = _prob_of(q_ids, q, d)
        if qd > 0 and sampler.random() * qd < pd:  # accept with probability min(1, p/q)
            ctx.append(d)
            continue
        accepted, nxt = j, _draw_residual(sampler, ids, p, q_ids, q)
        break
    if nxt < 0:  # every draft accepted: a bonus token from the last row
        nxt = sampler.sample(rows[k], ctx)
    dropped = k - accepted
    if dropped and cache.trim(dropped) != dropped:
        raise RuntimeError("speculative verification: the cache could not roll back rejected drafts")
    return accepted, nxt


def _prob_of(ids: np.ndarray, p: np.ndarray, token: int) -> float:
    hit = np.flatnonzero(ids == token)
    return float(p[hit[0]]) if hit.size else 0.0


def _draw_residual(sampler: Sampler, ids: np.ndarray, p: np.ndarray, q_ids: np.ndarray, q: np.ndarray) -> int:
    """Draw from norm(max(0, p - q)) (p over ``ids``, q over ``q_ids``)."""
    order = np.argsort(q_ids, kind="stable")
    pos = np.searchsorted(q_ids[order], ids)
    pos = np.minimum(pos, len(q_ids) - 1)
    match = q_ids[order][pos] == ids
    qa = np.where(match, q[order][pos], 0.0)
    r = np.maximum(p - qa, 0.0)
    total = r.sum()
    if total <= 0.0:  # p == q on the support (only possible through rounding): draw from p
        return sampler.draw(ids, p)
    return sampler.draw(ids, r / total)


# ---------------------------------------------------------------------------------------------
# the decoder


class PassCosts:
    """The time of an n-token pass over a plain decoding step's, n = 1 .. MAX_DRAFT + 1.

    Starts from a prior -- the calibration's measurement when the model has one, else
    1 + 0.6 (n - 1), what a 2-core CPU gives when the int8 dot products bound a step -- and
    follows the rounds actually timed (moving averages), so it fits the machine and its load.
    """

    def __init__(self, prior: Sequence[float] | None = None):
        if prior is not None and len(prior) != MAX_DRAFT + 1:
            raise ValueError(f"need {MAX_DRAFT + 1} pass costs, got {len(prior)}")
        self.rel = [float(c) for c in prior] if prior is not None else \
            [1.0 + 0.6 * i for i in range(MAX_DRAFT + 1)]
        self.plain_s = 0.0  # EMA seconds of a plain step

    def plain(self, seconds: float) -> None:
        self.plain_s = seconds if self.plain_s == 0.0 else 0.8 * self.plain_s + 0.2 * seconds

    def round(self, n: int, seconds: float) -> None:
        if self.plain_s > 0.0 and n > 1:
            self.rel[n - 1] = 0.8 * self.rel[n - 1] + 0.2 * seconds / self.plain_s


class Speculator:
    """Runs rounds of drafting and verification for one generation (see the module docstring).

    ``mode``: "self" (layer-skip drafts), "lookup" (prompt lookup), or "auto" (lookup when the
    text has a match worth drafting, else self drafting when the model's calibration says it
    pays and the ``Pacer`` has not found it slower than plain decoding on this text).

    A lookup match is drafted only as far as it is expected to pay: ``odds`` (per match
    length) and ``costs`` (per pass size) give the draft length with the most tokens per
    second (``lookup_draft_len``), often none at all. Both learn as rounds go; pass the same
    objects to the next generation to keep what they learned.
    """

    def __init__(self, mode: str, drafter: SelfDrafter | None, history: Sequence[int],
                 self_draft: int = 4, stats: SpecStats | None = None,
                 odds: LookupOdds | None = None, costs: PassCosts | None = None):
        self.mode = check_mode(mode)
        if mode == "off":
            raise ValueError("speculative='off' decodes without a Speculator")
        if mode == "self" and drafter is None:
            raise ValueError("speculative='self' needs a layer-skip drafter (calibration)")
        self.drafter = drafter if mode in ("self", "auto") else None
        self.lookup = LookupDrafter() if mode in ("lookup", "auto") else None
        if self.lookup is not None:
            self.lookup.reset(history)
        self.self_draft = max(1, min(MAX_DRAFT, self_draft))
        self.odds = odds if odds is not None else LookupOdds()
        self.costs = costs if costs is not None else PassCosts()
        self.tuner = ThresholdTuner()
        self.pacer = Pacer() if mode == "auto" else None
        self.stats = stats if stats is not None else SpecStats()
        self._draft_cost = 0.5  # a draft step's time relative to a plain step (measured as we go)
        self._hits = self._expected = 0.0  # this text's accepted lookup drafts, and as predicted

    def _lookup_drafts(self, k: int) -> tuple[list[int], int]:
        """The lookup drafts worth verifying (at most ``k``) and their match length."""
        cont, length = self.lookup.match(k)
        if not cont:
            return [], 0
        # The model-wide odds, scaled by how this text's drafts have fared against them so far
        # (a text whose matches keep being wrong -- a list of similar items -- backs off fast).
        f = (self._hits + 2.0) / (self._expected + 2.0)
        n = lookup_draft_len([min(1.0, f * self.odds.p(length + j)) for j in range(len(cont))], self.costs.rel)
        return cont[:n], length

    def step(self, backend: Backend, cache: KVCache, token: int, history: list[int], sampler: Sampler,
             budget: int) -> tuple[list[int], int]:
        """Evaluate ``token`` (plus accepted drafts) into the cache; returns the accepted drafts
        and the next sampled token. ``history`` (what the cache held before) is not modified.
        At most ``budget`` tokens are returned in all (accepted drafts + the next token)."""
        k = min(MAX_DRAFT, budget - 1)
        if cache.n_ctx - cache.offset - 1 < k:  # a bounded cache: stay inside the context
            k = max(0, cache.n_ctx - cache.offset - 1)
        t0 = time.perf_counter()
        drafts: list[int] = []
        dists = None
        source, match_len = "", 0
        if self.lookup is not None:
            self.lookup.extend([token])
        if k > 0 and self.lookup is not None:
            drafts, match_len = self._lookup_drafts(k)
            source = "lookup" if drafts else ""
        # The pacer judges only the self drafter: a lookup draft already pays by its own
        # estimate (odds x pass costs, both learned from timed rounds), and pausing it would
        # stop drafting in the middle of a copied passage.
        if k > 0 and not drafts and self.drafter is not None and (self.pacer is None or self.pacer.speculate):
            t_draft = time.perf_counter()
            drafts, dists = self.drafter.draft(backend, cache, token, history, sampler, min(k, self.self_draft),
                                               self.tuner.threshold)
            source = "self"
            if self.pacer is not None and self.pacer.plain_s and drafts:
                per_step = (time.perf_counter() - t_draft) / max(1, len(drafts))
                self._draft_cost = 0.8 * self._draft_cost + 0.2 * per_step / self.pacer.plain_s
        if not drafts:
            accepted, nxt = verify(backend, cache, token, [], None, history, sampler)
            self.stats.plain_steps += 1
            seconds = time.perf_counter() - t0
            self.costs.plain(seconds)
            if self.pacer is not None:
                self.pacer.plain_step(seconds)
        else:
            accepted, nxt = verify(backend, cache, token, drafts, dists, history, sampler)
            seconds = time.perf_counter() - t0
            st = self.stats
            st.rounds += 1
            st.drafted += len(drafts)
            st.accepted += accepted
            if source == "self":
                st.self_rounds += 1
                self.tuner.update(len(drafts), accepted, self._draft_cost)
            else:
                st.lookup_rounds += 1
                predicted, seen = self.odds.update(match_len, len(drafts), accepted)
                self._expected += predicted
                self._hits += seen
                self.costs.round(len(drafts) + 1, seconds)
            if self.pacer is not None and source == "self":
                self.pacer.round(seconds, accepted + 1)
                st.paused = self.pacer.paused
        out = drafts[:accepted]
        if self.lookup is not None:
            self.lookup.extend(out)
        return out, nxt
