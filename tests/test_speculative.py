"""Self-speculative and prompt-lookup decoding: exact greedy output, exact sampling distribution.

The real model shows greedy identity (20 varied prompts x 128 tokens, 16-bit, 8-bit and
streaming caches); a tiny Markov "model" behind the backend protocol shows, by chi-square
against the exact chain, that the accept/reject rule keeps the sampling distribution.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

import edgelm
from edgelm.runtime.generate import GenerationStats, generate_tokens
from edgelm.runtime.sampling import Sampler, SamplingParams
from edgelm.runtime.spec_calibrate import (
    Calibration, best_draft_len, calibrate, expected_tokens, load_calibration, save_calibration,
)
from edgelm.runtime.speculative import (
    MAX_DRAFT, LookupDrafter, LookupOdds, Pacer, PassCosts, SelfDrafter, Speculator, ThresholdTuner, check_mode,
    lookup_draft_len,
)

PROMPTS = [
    "Write a short poem about the sea.",
    "List three fruits and their colors.",
    "Write a Python function that reverses a string.",
    "What is the capital of France? Answer in one sentence.",
    "Explain photosynthesis to a ten-year-old.",
    "Give me five tips for better sleep, as a numbered list.",
    "Summarize: The quick brown fox jumps over the lazy dog. The dog was lazy because it had eaten "
    "too much. The fox was quick because it was hungry.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Write a haiku about autumn leaves.",
    "What are the main differences between Python lists and tuples?",
    "Write a SQL query that selects all users older than 30 from a table named users.",
    "Tell me a short story about a robot who learns to paint.",
    "How do I make a cup of tea? Give the steps.",
    "Name four planets of the solar system and one fact about each.",
    "Write a JavaScript function that adds two numbers.",
    "Rewrite this sentence more formally: gonna grab some food, brb.",
    "What is 17 times 23? Show your working.",
    "Describe the water cycle in three sentences.",
    "Write a limerick about a cat who loves cheese.",
    "Give me a shopping list for a pasta dinner for four people.",
]


# ---------------------------------------------------------------------------------------------
# pieces


def test_lookup_drafts_what_followed_the_last_ngram():
    d = LookupDrafter(max_ngram=3, min_ngram=2)
    d.reset([1, 2, 3, 4, 5, 9, 2, 3])
    assert d.draft(3) == [4, 5, 9]  # "2 3" last continued with 4 5 9
    d.extend([7])
    assert d.draft(3) == []  # "3 7" and "2 3 7" never occurred before
    d.reset([5, 6, 5, 6])
    assert d.draft(4) == [5, 6]  # the latest earlier match (ending at index 1), not itself
    d.reset([1, 2, 8, 1, 2, 9, 0, 1, 2])
    assert d.draft(2) == [9, 0]  # equally long matches: the most recent occurrence wins
    d.reset([6, 1, 2, 8, 1, 2, 9, 6, 1, 2])
    assert d.match(2) == ([8, 1], 3)  # "6 1 2" agrees for longer than the later "1 2" does
    d.reset([4, 1, 2, 3, 5, 1, 2, 3])
    assert d.draft(1) == [5]  # the longest n-gram ("1 2 3")


def test_lookup_match_length_counts_the_agreeing_tokens_before_the_ngram():
    d = LookupDrafter(max_ngram=3, min_ngram=2)
    d.reset([7, 8, 1, 2, 3, 4, 5, 6, 8, 1, 2, 3])
    assert d.match(2) == ([4, 5], 4)  # "8 1 2 3" agrees; 7 != 6 ends it
    d.reset([9, 2, 3, 4, 1, 2, 3])
    assert d.match(5) == ([4, 1, 2, 3], 2)  # the continuation stops at the text's end
    d.reset([1, 2, 3])
    assert d.match(3) == ([], 0)


def test_lookup_odds_learn_per_match_length():
    o = LookupOdds()
    assert o.p(2) < o.p(5) < o.p(30)  # the priors: longer matches are better hints
    p2, p10 = o.p(2), o.p(10)
    for _ in range(50):
        o.update(2, drafted=3, accepted=0)  # 2-token matches: the first draft always rejected
        o.update(10, drafted=3, accepted=3)  # 10+: all accepted
    assert o.p(2) < 0.1 < p2 and o.p(10) > 0.9 > p10 and o.p(12) > 0.9
    o.update(3, drafted=4, accepted=1)  # evidence: 3 accepted, 4 rejected; nothing on 5, 6
    assert o.tries[o._band(6)] == o.tries[o._band(8)] == LookupOdds.WEIGHT


def test_lookup_draft_len_maximizes_expected_tokens_per_second():
    costs = [1.0 + 0.6 * i for i in range(MAX_DRAFT + 1)]
    assert lookup_draft_len([0.3] * 7, costs) == 0      # a draft token is worth ~0.6 of a step
    assert lookup_draft_len([0.99] * 7, costs) == 7      # a copied passage: draft all of it
    assert lookup_draft_len([0.9, 0.9, 0.1, 0.9], costs) == 2
    assert lookup_draft_len([0.9] * 3, [1.0] * (MAX_DRAFT + 1)) == 3  # free verification
    with pytest.raises(ValueError):
        PassCosts([1.0, 1.5])


def test_lookup_backs_off_on_a_text_whose_drafts_fail():
    spec = Speculator("lookup", None, [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], costs=PassCosts())
    spec.lookup.extend([3])
    assert spec._lookup_drafts(4)[0]  # a 7-token match: worth drafting
    spec._hits, spec._expected = 0.0, 10.0  # this text: ten acceptances predicted, none came
    assert spec._lookup_drafts(4)[0] == []


def test_modes_and_models_errors():
    assert check_mode("auto") == "auto"
    with pytest.raises(ValueError, match="speculative must be one of"):
        check_mode("fast")
    with pytest.raises(ValueError, match="needs a layer-skip drafter"):
        Speculator("self", None, [])


def test_cost_model():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    k, s = best_draft_len(0.9, 0.3, [1.0] + [1.2] * MAX_DRAFT)
    assert k >= 3 and s > 1.5
    assert best_draft_len(0.3, 0.9, [1.0] + [1.5] * MAX_DRAFT) == (0, 1.0)  # never pays


def test_threshold_tuner_follows_acceptance():
    t = ThresholdTuner(threshold=0.5)
    for _ in range(20):
        t.update(4, 0, cost=0.5)
    assert t.threshold > 0.9
    for _ in range(40):
        t.update(4, 4, cost=0.5)
    assert t.threshold < 0.2


def test_pacer_pauses_speculation_that_does_not_pay_and_retries():
    p = Pacer(patience=2, backoff=4)
    p.plain_step(0.01)
    p.plain_step(0.01)
    assert p.speculate
    p.round(0.03, 1)
    p.round(0.03, 1)
    assert not p.speculate and p.paused == 1
    for _ in range(5):
        p.plain_step(0.01)
    assert p.speculate and p.backoff == 8
    p.round(0.01, 3)  # pays: stays on
    assert p.speculate


# ---------------------------------------------------------------------------------------------
# the sampling distribution, on a tiny Markov chain behind the backend protocol


class _Cache:
    def __init__(self, n_ctx):
        self.n_ctx, self.offset = n_ctx, 0

    max_trim = property(lambda self: self.offset)

    def trim(self, n):
        n = min(n, self.offset)
        self.offset -= n
        return n


class _MarkovBackend:
    """logits of the next token depend on the last one: table T (the model) or D (the drafter,
    used when any layer is skipped)."""

    name = "markov"

    def __init__(self, T, D):
        self.T, self.D = T, D

    def new_cache(self, n_ctx, spec=None):
        return _Cache(n_ctx)

    def forward(self, tokens, cache, logits_from=None, skip_layers=frozenset()):
        cache.offset += len(tokens)
        table = self.D if skip_layers else self.T
        rows = np.stack([table[t] for t in tokens])
        return rows[(len(tokens) - 1 if logits_from is None else logits_from):]

    def forward_lazy(self, tokens, cache):
        return self.forward(tokens, cache, logits_from=0)


def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.719: p = 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_sampling_distribution_is_preserved():
    rng = np.random.default_rng(0)
    V = 4
    T = rng.normal(0, 1.2, (V, V)).astype(np.float32)
    D = (T + rng.normal(0, 1.0, (V, V))).astype(np.float32)  # a drafter that is often wrong
    P = np.exp(T - T.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    backend = _MarkovBackend(T, D)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1)
    sampler = Sampler(params, V)
    counts = Counter()
    n = 6000
    for _ in range(n):
        cache = backend.new_cache(64)
        history: list[int] = []
        spec = Speculator("self", SelfDrafter(frozenset({0})), [0], self_draft=3)
        spec.tuner.threshold = 0.0  # always draft: exercise the accept/reject rule hardest
        out = list(generate_tokens(backend, cache, [0], history, sampler, 4, frozenset(), GenerationStats(),
                                   spec))
        counts[tuple(out[1:4])] += 1  # tokens 2-4: produced by drafting rounds
        assert cache.offset == len(history) == 1 + 3  # the cache holds exactly what plain decoding would
    # The first generated token is drawn from P[0]; tokens 2-4 follow the chain from it. Test the
    # joint law of (token 2, token 3) summed over token 1 against the exact chain.
    exact = np.zeros((V, V))
    for t1 in range(V):
        for t2 in range(V):
            for t3 in range(V):
                exact[t2, t3] += P[0, t1] * P[t1, t2] * P[t2, t3]
    observed = np.zeros((V, V))
    for (t2, t3, _), c in counts.items():
        observed[t2, t3] += c
    expected = exact * n
    mask = expected >= 5
    chi2 = float((((observed - expected) ** 2)[mask] / expected[mask]).sum())
    cells = int(mask.sum())
    assert chi2 < _chi2_critical(cells - 1), (chi2, cells, observed, expected)
    assert spec.stats.drafted > 0


def test_lookup_drafts_keep_the_sampling_distribution():
    """Point-mass drafts (prompt lookup): accept with p(d), else draw from p without d."""
    rng = np.random.default_rng(3)
    V = 3
    T = rng.normal(0, 1.0, (V, V)).astype(np.float32)
    P = np.exp(T - T.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    backend = _MarkovBackend(T, T)
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7), V)
    observed = np.zeros((V, V))
    n = 6000
    prompt = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]  # every n-gram recurs: lookup always drafts
    rounds = drafted = accepted = 0
    for _ in range(n):
        cache = backend.new_cache(64)
        # free verification: every match is drafted, to exercise the accept/reject rule
        spec = Speculator("lookup", None, prompt, costs=PassCosts([1.0] * (MAX_DRAFT + 1)))
        out = list(generate_tokens(backend, cache, prompt, [], sampler, 4, frozenset(), GenerationStats(), spec))
        observed[out[1], out[2]] += 1
        rounds += spec.stats.lookup_rounds
        drafted += spec.stats.drafted
        accepted += spec.stats.accepted
    assert rounds > n // 4 and 0 < accepted < drafted
    exact = np.zeros((V, V))
    for t1 in range(V):
        for t2 in range(V):
            for t3 in range(V):
                exact[t2, t3] += P[0, t1] * P[t1, t2] * P[t2, t3]
    expected = exact * n
    mask = expected >= 5
    chi2 = float((((observed - expected) ** 2)[mask] / expected[mask]).sum())
    assert chi2 < _chi2_critical(int(mask.sum()) - 1), (chi2, observed, expected)


# ---------------------------------------------------------------------------------------------
# the real model: verification reproduces decoding bit for bit


def _batch_equals_decode(m, kv_bits=16):
    """Logits of 1..8 tokens evaluated in one pass equal those of one-token passes, at positions
    on both sides of the softmax padding (64) and of a key group (32)."""
    from edgelm.runtime.kv_cache import KVSpec

    be = m.backend
    spec = KVSpec(bits_k=kv_bits, bits_v=kv_bits)
    prompt = m.tokenize("The history of the Roman empire is long and complicated. It begins", add_bos=True)
    for pre in (len(prompt) + 50,):
        filler = list(range(400, 400 + pre - len(prompt)))
        for n in (2, 3, 5, 8):  # the 4-token kernel, and the 2- and 1-token remainders
            cont = list(range(700 + n, 700 + 2 * n))
            caches = []
            for _ in range(2):
                c = be.new_cache(256, spec)
                be.forward(prompt[:-1], c)
                for t in prompt[-1:] + filler:
                    be.forward([t], c)
                caches.append(c)
            single = np.stack([be.forward([t], caches[0])[0] for t in cont])
            batch = be.forward(cont, caches[1], logits_from=0)
            assert np.array_equal(single, batch), (pre, n, np.abs(single - batch).max(axis=1))


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_verification_pass_equals_decoding_bit_for_bit(model, kv_bits):
    _batch_equals_decode(model, kv_bits)


def test_lazy_verification_rows_equal_the_full_pass(model):
    """forward_lazy computes the output head only for rows read, four at a time from the first
    row read, and every row equals the full pass's bit for bit."""
    be = model.backend
    prompt = model.tokenize("Once upon a time, in a small village by the sea,", add_bos=True)
    cont = [be.args.vocab_size - 1 - i * 97 for i in range(6)]
    full_cache, lazy_cache = be.new_cache(64), be.new_cache(64)
    for c in (full_cache, lazy_cache):
        be.forward(prompt, c)
    full = be.forward(cont, full_cache, logits_from=0)
    rows = be.forward_lazy(cont, lazy_cache)
    assert lazy_cache.offset == full_cache.offset and len(rows) == len(cont)
    assert rows.computed == 0
    assert np.array_equal(rows[0], full[0]) and rows.computed == 4
    assert np.array_equal(rows[3], full[3]) and rows.computed == 4
    assert np.array_equal(rows[4], full[4]) and rows.computed == len(cont)
    for j in range(len(cont)):
        assert np.array_equal(rows[j], full[j]), j
    assert np.array_equal(rows[-1], full[-1])
    with pytest.raises(IndexError):
        rows[len(cont)]
    with pytest.raises(ValueError, match="forward_lazy takes"):
        be.forward_lazy([], lazy_cache)


@pytest.mark.parametrize("kind", ["q8_0", "q4_k_m"])
def test_verification_pass_exact_for_other_weight_types(requantized_gguf, kind):
    m = edgelm.load(requantized_gguf(kind), threads=2, n_ctx=256, speculative="off")
    try:
        _batch_equals_decode(m)
    finally:
        m.close()


# ---------------------------------------------------------------------------------------------
# the real model: greedy identity


@pytest.fixture(scope="module")
def model(default_gguf):
    m = edgelm.load(default_gguf, threads=2, n_ctx=1024, speculative="off")
    yield m
    m.close()


def _greedy(m, prompt: str, mode: str, max_tokens: int = 128) -> tuple[str, dict]:
    text = "".join(m.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0,
                          speculative=mode))
    return text, m.last_stats.spec.as_dict()


# A fixed skip set (the calibration of the default model picks its own; any set must give
# identical output, since verification decides every token).
SKIP = (3, 7, 12, 14, 17)


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_greedy_output_identical_with_speculation(default_gguf, kv_bits):
    m = edgelm.load(default_gguf, threads=2, n_ctx=1024, kv_bits=kv_bits, speculative="off")
    try:
        m._calibration = Calibration(SKIP, 0.8, 0.8, 3, 1.1, (1.0,) * (MAX_DRAFT + 1), m.args.n_layers, 0.0)
        totals = Counter()
        for prompt in PROMPTS:
            plain, _ = _greedy(m, prompt, "off")
            for mode in ("self", "lookup"):
                text, st = _greedy(m, prompt, mode)
                assert text == plain, (mode, prompt)
                totals[mode, "drafted"] += st["drafted"]
                totals[mode, "accepted"] += st["accepted"]
        # both drafters were exercised, and accepted some drafts and rejected others
        for mode in ("self", "lookup"):
            assert 0 < totals[mode, "accepted"] < totals[mode, "drafted"], totals
    finally:
        m.close()


def test_greedy_identical_in_a_streaming_cache(default_gguf, eval_text):
    """Every generated token evicts one (window 64, ring full after the long prompt): trim stays
    exact across evictions."""
    m = edgelm.load(default_gguf, threads=2, n_ctx=512, kv_bits=8, kv_window=64, n_sink=4, speculative="off")
    try:
        m._calibration = Calibration(SKIP, 0.8, 0.8, 3, 1.1, (1.0,) * (MAX_DRAFT + 1), m.args.n_layers, 0.0)
        context = " ".join(eval_text[5000:9000].split()[:250])
        for prompt in PROMPTS[:3]:
            prompt = f"{context}\n\n{prompt}"
            plain, _ = _greedy(m, prompt, "off", 64)
            evicted = m.cache.evicted
            assert evicted > m.last_stats.prompt_tokens - 200
            for mode in ("self", "auto"):
                assert _greedy(m, prompt, mode, 64)[0] == plain, (mode, prompt)
    finally:
        m.close()


def test_sampling_with_speculation_runs_on_the_real_model(model):
    model._calibration = Calibration(SKIP, 0.8, 0.8, 3, 1.1, (1.0,) * (MAX_DRAFT + 1), model.args.n_layers, 0.0)
    text = "".join(model.chat([{"role": "user", "content": PROMPTS[0]}], max_tokens=48, temperature=0.8,
                              seed=3, speculative="self"))
    st = model.last_stats
    assert text and st.spec.rounds > 0 and st.generated_tokens > 0
    # the cache holds exactly the tokens the model's history says
    assert model.cache.offset == len(model._history)


def test_max_tokens_and_eog_inside_accepted_drafts(model):
    model._calibration = Calibration(SKIP, 0.8, 0.8, 3, 1.1, (1.0,) * (MAX_DRAFT + 1), model.args.n_layers, 0.0)
    for n in (1, 2, 5, 13):
        text_plain, _ = _greedy(model, PROMPTS[1], "off", n)
        plain_tokens = model.last_stats.generated_tokens
        text, _ = _greedy(model, PROMPTS[1], "self", n)
        assert text == text_plain and model.last_stats.generated_tokens == plain_tokens == n
        assert model.cache.offset == len(model._history)
    # a reply that ends by itself: the end-of-generation token is never left in the cache
    plain, _ = _greedy(model, "Say just the word yes.", "off", 64)
    assert model.last_stats.finish_reason == "stop"
    offset_plain = model.cache.offset
    text, _ = _greedy(model, "Say just the word yes.", "self", 64)
    assert text == plain and model.last_stats.finish_reason == "stop" and model.cache.offset == offset_plain


# ---------------------------------------------------------------------------------------------
# calibration


def test_calibration_runs_once_and_is_cached(tmp_path, monkeypatch, default_gguf):
    """The search on a tiny random model: a valid result, written atomically, found again."""
    from tiny_models import TinyConfig, write_tiny_model
    from vocab_factory import read_metadata

    monkeypatch.setenv("EDGELM_HOME", str(tmp_path / "home"))
    path = write_tiny_model(tmp_path / "tiny.gguf", TinyConfig(n_layers=6), read_metadata(default_gguf))
    m = edgelm.load(path, threads=1, n_ctx=256, speculative="off")
    try:
        assert load_calibration(path) is None and m.calibration() is None
        cal = m.calibration(create=True)
        assert 1 <= len(cal.skip) <= 3 and all(0 <= l < 6 for l in cal.skip)
        assert 0.0 <= cal.agreement <= 1.0 and 0 < cal.draft_cost <= 1.0  # measured: 1.0 when the head is all
        assert 0 <= cal.draft_len <= MAX_DRAFT and len(cal.verify_cost) == MAX_DRAFT + 1
        files = list((tmp_path / "home" / "speculative").iterdir())
        assert [f.suffix for f in files] == [".json"]  # no temp file left behind
        assert load_calibration(path) == cal
        files[0].write_text("{not json")  # a damaged file is ignored, not fatal
        assert load_calibration(path) is None
        save_calibration(path, cal)
        assert load_calibration(path) == cal
        # a "self" run uses it (no new search), whatever its predicted speedup
        text = "".join(m.generate("Hello", max_tokens=8, temperature=0.0, speculative="self"))
        assert m.last_stats.spec.self_rounds + m.last_stats.spec.plain_steps > 0 and isinstance(text, str)
    finally:
        m.close()


def test_calibration_search_on_the_real_model(default_gguf, calib_text, model):
    """A short search (one snippet) finds layers whose skipping keeps most greedy tokens."""
    cal = calibrate(model.backend, lambda t: model.tokenize(t), calib_text[:20000], snippets=1,
                    prompt_len=32, gen_len=32, progress=False)
    assert cal.skip and cal.agreement > 0.5 and cal.draft_cost < 1.0
    assert 0 not in cal.skip  # the first layer is never dispensable


def test_spec_bound_oracle_plans_the_fastest_rounds():
    """tools/spec_bound.py's oracle (the README's ceiling): the least time over plain steps and
    passes, given how many drafts would be accepted at each position."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "spec_bound.py"
    spec = importlib.util.spec_from_file_location("spec_bound", path)
    sb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sb)
    free = lambda k: 1.0  # noqa: E731  a pass costs one step, whatever its size
    assert sb.oracle_time(([0] * 5, free)) == 5.0  # nothing to draft: five plain steps
    assert sb.oracle_time(([4, 3, 2, 1, 0], free)) == 1.0  # one pass yields all five tokens
    assert sb.oracle_time(([4, 3, 2, 1, 0], lambda k: 1.0 + 0.6 * k)) == 3.4  # 4 drafts still pay
    assert sb.oracle_time(([4, 3, 2, 1, 0], lambda k: 1.0 + 1.2 * k)) == 5.0  # dearer than plain
    assert sb.oracle_time(([1, 0, 1, 0], lambda k: 1.5)) == 3.0  # two 1-draft passes
    # two drafters: the cheap one where it has drafts, the other where only it has
    assert sb.oracle_time(([1, 0, 0, 0], free), ([0, 0, 1, 0], lambda k: 1.5)) == 2.5
    assert sb.right_run([7, 8, 9], [1, 7, 8, 5], 1) == 2
    # out[0]: the text ends in 4, never seen before; out[1]: it ends in 2, and "2 4" occurred
    # (4 right, then 2 != 6); out[2]: it ends in 4, earlier followed by 2, not 6
    assert sb.lookup_any_runs([1, 2, 3, 9, 2, 4], [2, 4, 6]) == [0, 1, 0]
    assert sb.runs_of(np.array([True, True, False, True])) == [2, 1, 0, 1]
