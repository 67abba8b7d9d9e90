"""Sampler and StopMatcher against independent references: brute-force reimplementations of
each stage (full sorts, plain softmax), hand-computed penalties, llama.cpp's own samplers (through
llama-cpp-python's C API, on arbitrary logits, no model needed) and a chi-square goodness-of-fit test.
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgelm.runtime.sampling import Sampler, SamplingParams, StopMatcher

VOCAB = 49152  # SmolLM2's vocabulary: the size the speed requirement is about
NO_TRUNCATION = dict(top_k=0, top_p=1.0, min_p=0.0)


def _logits(rng: np.random.Generator, n: int, scale: float = 3.0) -> np.ndarray:
    return (rng.normal(size=n) * scale).astype(np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    w = np.exp(z.astype(np.float64) - z.max())
    return w / w.sum()


def _reference_chain(x: np.ndarray, p: SamplingParams) -> dict[int, float]:
    """The chain without any cleverness: full stable sorts and plain softmaxes, in probability space."""
    order = [int(i) for i in np.argsort(-x, kind="stable")]  # all ids, best first, ties by id
    if p.top_k > 0:
        order = order[: p.top_k]
    if p.top_p < 1.0:
        probs = _softmax(x[order])
        kept, mass = [], 0.0
        for i, q in zip(order, probs):
            kept.append(i)
            mass += q
            if mass >= p.top_p:
                break
        order = kept
    if p.min_p > 0.0:
        probs = _softmax(x[order])
        order = [i for i, q in zip(order, probs) if q >= p.min_p * probs.max()]
    return dict(zip(order, _softmax(x[order].astype(np.float64) / p.temperature)))


def _as_dict(ids: np.ndarray, probs: np.ndarray) -> dict[int, float]:
    return dict(zip(ids.tolist(), probs.tolist()))


# --- greedy and top-k ------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_greedy_is_argmax_with_ties_to_lowest_id(temperature: float) -> None:
    rng = np.random.default_rng(1)
    x = _logits(rng, VOCAB)
    x[[777, 31, 40000]] = x.max() + 1.0  # three-way tie for the maximum
    s = Sampler(SamplingParams(temperature=temperature), VOCAB)
    assert s.sample(x) == 31
    ids, probs = s.probs(x)
    assert ids.tolist() == [31] and probs.tolist() == [1.0]
    for _ in range(20):
        y = _logits(rng, VOCAB)
        assert s.sample(y) == int(np.argmax(y))


@pytest.mark.parametrize("temperature", [0.05, 0.7, 1.0, 3.0, 100.0])
def test_top_k_1_equals_greedy_at_any_temperature(temperature: float) -> None:
    rng = np.random.default_rng(2)
    greedy = Sampler(SamplingParams(temperature=0.0), VOCAB)
    top1 = Sampler(SamplingParams(temperature=temperature, top_k=1, seed=3), VOCAB)
    for trial in range(30):
        x = _logits(rng, VOCAB)
        if trial % 3 == 0:
            x[rng.choice(VOCAB, 4, replace=False)] = x.max()  # ties at the top
        assert top1.sample(x) == greedy.sample(x)


def test_top_k_set_breaks_boundary_ties_toward_lower_ids() -> None:
    x = np.zeros(100, dtype=np.float32)
    x[[90, 10]] = 5.0
    x[[70, 20, 50, 30]] = 2.0  # four-way tie across the k = 4 boundary
    s = Sampler(SamplingParams(temperature=1.0, top_k=4, top_p=1.0, min_p=0.0), 100)
    ids, _ = s.probs(x)
    assert ids.tolist() == [10, 90, 20, 30]


# --- top-p, min-p, the whole chain -----------------------------------------------------------------


@pytest.mark.parametrize("vocab", [16, 1000, VOCAB])
def test_candidate_sets_and_probs_match_brute_force(vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    for _ in range(25):
        params = SamplingParams(
            temperature=float(rng.choice([0.3, 0.8, 1.0, 2.5])),
            top_k=int(rng.choice([0, 3, 40, 400])),
            top_p=float(rng.choice([1.0, 0.0, 0.5, 0.9, 0.95, 0.999])),
            min_p=float(rng.choice([0.0, 0.02, 0.05, 0.3])),
        )
        x = _logits(rng, vocab, scale=float(rng.uniform(0.3, 8.0)))
        ids, probs = Sampler(params, vocab).probs(x)
        expected = _reference_chain(x, params)
        assert set(ids.tolist()) == set(expected), params
        np.testing.assert_allclose(probs, [expected[i] for i in ids.tolist()], rtol=1e-9, atol=1e-15)
        assert abs(probs.sum() - 1.0) < 1e-12
        if 0 < params.top_k < vocab or params.top_p < 1.0 or params.min_p > 0.0:
            assert np.all(np.diff(probs) <= 1e-15), "truncated candidates come best-first"
        else:
            assert ids.tolist() == list(range(vocab)), "untruncated: the whole vocabulary in id order"


@pytest.mark.parametrize("top_k", [0, 4])  # the whole-vocabulary path, and top-p after top-k
def test_top_p_keeps_the_token_where_the_mass_reaches_p(top_k: int) -> None:
    # Four equal tokens (and a masked one): cumulative mass 0.25, 0.5, 0.75, 1.0 exactly.
    # llama.cpp's rule keeps up to and including the first token whose cumulative mass is >= p.
    x = np.array([0.0, 0.0, 0.0, 0.0, -np.inf], dtype=np.float32)
    for top_p, n_kept in ((0.5, 2), (0.25, 1), (0.2, 1), (0.0, 1), (0.51, 3), (0.99, 4)):
        params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, min_p=0.0)
        ids, _ = Sampler(params, 5).probs(x)
        assert ids.tolist() == list(range(n_kept)), (top_p, top_k)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_top_p_alone_matches_brute_force_on_the_whole_vocabulary(top_p: float) -> None:
    # top_k disabled: the nucleus is found by growing sorted slices of the full 49152 entries.
    rng = np.random.default_rng(4)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=top_p, min_p=0.0)
    for scale in (0.5, 3.0, 10.0):  # from thousands of candidates down to a handful
        x = _logits(rng, VOCAB, scale)
        ids, _ = Sampler(params, VOCAB).probs(x)
        assert set(ids.tolist()) == set(_reference_chain(x, params))


def test_min_p_alone_keeps_tokens_within_ratio_of_the_best() -> None:
    rng = np.random.default_rng(5)
    for min_p in (0.01, 0.1, 0.5, 1.0):
        x = _logits(rng, VOCAB)
        ids, _ = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=min_p), VOCAB).probs(x)
        p = _softmax(x)
        assert set(ids.tolist()) == set(np.flatnonzero(p >= min_p * p.max()).tolist())


def test_masked_tokens_are_never_candidates() -> None:
    rng = np.random.default_rng(6)
    x = _logits(rng, 64, scale=0.1)
    x[::2] = -np.inf
    s = Sampler(SamplingParams(temperature=1.5, **NO_TRUNCATION, seed=0), 64)
    ids, _ = s.probs(x)
    assert set(ids.tolist()) == set(range(1, 64, 2))
    assert all(s.sample(x) % 2 == 1 for _ in range(500))


# --- penalties ---------------------------------------------------------------------------------------


def test_penalties_match_hand_computed_example() -> None:
    x = np.array([2.0, -1.0, 0.5, 3.0, -2.0, 0.0], dtype=np.float32)
    history = [4, 4, 0, 1, 1, 1, 0, 2, 5]  # window of 6: [1, 1, 1, 0, 2, 5]; tokens 4 fell out
    params = SamplingParams(
        temperature=1.0, **NO_TRUNCATION, repeat_penalty=2.0, repeat_last_n=6,
        presence_penalty=0.25, frequency_penalty=0.5,
    )
    # logit > 0 -> / 2, else * 2; then - 0.5 * count - 0.25 (only for tokens in the window)
    expected = np.array([
        2.0 / 2 - 0.5 * 1 - 0.25,    # token 0: seen once
        -1.0 * 2 - 0.5 * 3 - 0.25,   # token 1: seen 3 times
        0.5 / 2 - 0.5 * 1 - 0.25,    # token 2
        3.0,                         # token 3: never seen
        -2.0,                        # token 4: only outside the window
        0.0 * 2 - 0.5 * 1 - 0.25,    # token 5: a zero logit counts as "not > 0"
    ])
    ids, probs = Sampler(params, 6).probs(x, history)
    np.testing.assert_allclose(probs, _softmax(expected)[ids], rtol=1e-6)
    before = x.copy()
    Sampler(params, 6).sample(x, np.array(history))
    np.testing.assert_array_equal(x, before)  # the caller's logits are not modified


def test_penalty_window_whole_history_and_disabled() -> None:
    x = np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32)
    history = [0, 1, 2]
    common = dict(temperature=1.0, **NO_TRUNCATION, presence_penalty=1.0)

    def logits_after(last_n: int) -> np.ndarray:
        ids, probs = Sampler(SamplingParams(**common, repeat_last_n=last_n), 4).probs(x, history)
        logp = np.log(probs[np.argsort(ids)])
        return logp - logp[3]  # token 3 is never penalized: use it as the zero point

    np.testing.assert_allclose(logits_after(-1), [-1, -1, -1, 0], atol=1e-6)
    np.testing.assert_allclose(logits_after(2), [0, -1, -1, 0], atol=1e-6)
    np.testing.assert_allclose(logits_after(0), [0, 0, 0, 0], atol=1e-6)


# --- llama.cpp as the oracle ------------------------------------------------------------------------


def _llama_cpp_chain(x: np.ndarray, p: SamplingParams, history: np.ndarray) -> dict[int, float]:
    """llama.cpp's penalties -> top_k -> top_p -> min_p -> temp samplers applied to ``x``."""
    L = pytest.importorskip("llama_cpp.llama_cpp")
    token_data = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
    assert token_data.itemsize == ctypes.sizeof(L.llama_token_data)
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    try:
        for smpl in (
            L.llama_sampler_init_penalties(
                len(x), p.repeat_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
            ),
            L.llama_sampler_init_top_k(p.top_k),
            L.llama_sampler_init_top_p(p.top_p, 1),
            L.llama_sampler_init_min_p(p.min_p, 1),
            L.llama_sampler_init_temp(p.temperature),
        ):
            L.llama_sampler_chain_add(chain, smpl)
        for t in history:
            L.llama_sampler_accept(chain, int(t))
        buf = np.zeros(len(x), token_data)
        buf["id"], buf["logit"] = np.arange(len(x)), x
        cur = L.llama_token_data_array(
            data=buf.ctypes.data_as(ctypes.POINTER(L.llama_token_data)),
            size=len(x), selected=-1, sorted=False,
        )
        L.llama_sampler_apply(chain, ctypes.byref(cur))
        raw = ctypes.string_at(ctypes.cast(cur.data, ctypes.c_void_p), cur.size * token_data.itemsize)
        out = np.frombuffer(raw, token_data)
    finally:
        L.llama_sampler_free(chain)
    return dict(zip(out["id"].tolist(), _softmax(out["logit"]).tolist()))


def test_chain_matches_llama_cpp_samplers() -> None:
    rng = np.random.default_rng(7)
    for _ in range(60):
        vocab = int(rng.choice([50, 1000, VOCAB]))
        params = SamplingParams(
            temperature=float(rng.choice([0.3, 0.8, 1.0, 1.7])),
            top_k=int(rng.choice([0, 1, 5, 40, 200])),
            top_p=float(rng.choice([1.0, 0.5, 0.9, 0.95, 0.99])),
            min_p=float(rng.choice([0.0, 0.01, 0.05, 0.2])),
            repeat_penalty=float(rng.choice([1.0, 1.1, 1.5])),
            repeat_last_n=int(rng.choice([0, 8, 64])),  # llama.cpp's C API has no "-1 = all"
            frequency_penalty=float(rng.choice([0.0, 0.3])),
            presence_penalty=float(rng.choice([0.0, 0.7])),
        )
        x = _logits(rng, vocab, scale=float(rng.uniform(0.5, 6.0)))
        history = rng.integers(0, min(vocab, 60), 100)  # dense repeats among the first ids
        ids, probs = Sampler(params, vocab).probs(x, history)
        expected = _llama_cpp_chain(x, params, history)
        assert set(ids.tolist()) == set(expected), params
        # llama.cpp works in float32 throughout; we soft-max in float64
        np.testing.assert_allclose(probs, [expected[i] for i in ids.tolist()], rtol=1e-4, atol=1e-7)


# --- randomness: seeds and the distribution actually drawn from -------------------------------------


def test_same_seed_same_sequence_different_seeds_differ() -> None:
    rng = np.random.default_rng(8)
    xs = [_logits(rng, VOCAB, 1.0) for _ in range(50)]
    params = SamplingParams(temperature=1.0, top_k=100, top_p=1.0, min_p=0.0, seed=1234)

    def run(sampler: Sampler) -> list[int]:
        return [sampler.sample(x) for x in xs]

    a = Sampler(params, VOCAB)
    first = run(a)
    assert run(Sampler(params, VOCAB)) == first
    assert run(Sampler(dataclasses.replace(params, seed=1235), VOCAB)) != first
    a.reset()  # back to params.seed
    assert run(a) == first
    a.reset(99)
    assert run(a) == run(Sampler(dataclasses.replace(params, seed=99), VOCAB))
    unseeded = dataclasses.replace(params, seed=None)
    assert run(Sampler(unseeded, VOCAB)) != run(Sampler(unseeded, VOCAB))  # fresh entropy each


def _chi_square_critical(df: int, alpha: float) -> float:
    """Upper ``alpha`` quantile of chi-square(df) by the Wilson-Hilferty cube-root normal approximation
    (the normal quantile itself by bisection on math.erfc); within ~1% for df >= 3."""
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * math.erfc(mid / math.sqrt(2)) > alpha else (lo, mid)
    z = (lo + hi) / 2
    v = 2.0 / (9.0 * df)
    return df * (1.0 - v + z * math.sqrt(v)) ** 3


def test_chi_square_critical_value_approximation() -> None:
    # Table values: chi2(0.999; 5) = 20.515, chi2(0.999; 7) = 24.322, chi2(0.99; 10) = 23.209
    assert _chi_square_critical(5, 0.001) == pytest.approx(20.515, rel=0.02)
    assert _chi_square_critical(7, 0.001) == pytest.approx(24.322, rel=0.02)
    assert _chi_square_critical(10, 0.01) == pytest.approx(23.209, rel=0.01)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, **NO_TRUNCATION, seed=11),
        SamplingParams(temperature=0.6, **NO_TRUNCATION, seed=12),
        SamplingParams(temperature=1.3, top_k=6, top_p=0.9, min_p=0.05, seed=13),
        SamplingParams(temperature=0.8, top_k=0, top_p=0.8, min_p=0.1, seed=14),
    ],
)
def test_sampled_frequencies_match_the_chain_distribution(params: SamplingParams) -> None:
    logits = np.array([1.2, 0.3, -0.4, 2.0, 0.9, -1.5, 1.6, 0.0], dtype=np.float32)
    draws = 20_000
    sampler = Sampler(params, len(logits))
    counts = np.bincount([sampler.sample(logits) for _ in range(draws)], minlength=len(logits))

    expected = _reference_chain(logits, params)
    ids, probs = sampler.probs(logits)
    assert abs(probs.sum() - 1.0) < 1e-12
    np.testing.assert_allclose(probs, [expected[i] for i in ids.tolist()], rtol=1e-12)
    outside = np.setdiff1d(np.arange(len(logits)), ids)
    assert counts[outside].sum() == 0, "a token cut by the chain was drawn"
    observed, wanted = counts[ids], probs * draws
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    assert chi2 < _chi_square_critical(len(ids) - 1, alpha=1e-3), (chi2, observed, wanted)


# --- validation and speed -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "hot"),
        ("top_k", 2.5), ("top_k", True), ("top_p", -0.1), ("top_p", 1.5), ("top_p", float("nan")),
        ("min_p", 1.01), ("min_p", -1e-9), ("repeat_penalty", 0.0), ("repeat_penalty", -1.0),
        ("repeat_penalty", float("inf")), ("repeat_last_n", -2), ("presence_penalty", float("-inf")),
        ("frequency_penalty", float("nan")), ("seed", -1), ("seed", 1.5),
    ],
)
def test_invalid_params_raise_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_invalid_inputs_raise() -> None:
    s = Sampler(SamplingParams(repeat_penalty=1.1, seed=0), 10)
    x = np.zeros(10, dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        s.sample(np.zeros(11, dtype=np.float32))
    for bad in (np.nan, np.inf):
        y = x.copy()
        y[3] = bad
        with pytest.raises(ValueError, match="finite"):
            s.sample(y)
    with pytest.raises(ValueError, match="finite"):
        s.sample(np.full(10, -np.inf, dtype=np.float32))
    with pytest.raises(ValueError, match="history"):
        s.sample(x, [3, 10])
    with pytest.raises(ValueError, match="vocab_size"):
        Sampler(SamplingParams(), 0)
    with pytest.raises(ValueError, match="seed"):
        s.reset(-5)


def test_sample_is_well_under_a_millisecond_on_the_full_vocabulary() -> None:
    rng = np.random.default_rng(9)
    x = _logits(rng, VOCAB)
    history = rng.integers(0, VOCAB, 64).tolist()
    for params in (SamplingParams(seed=0), SamplingParams(repeat_penalty=1.1, presence_penalty=0.3, seed=0)):
        s = Sampler(params, VOCAB)
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            s.sample(x, history)
            times.append(time.perf_counter() - t0)
        median = sorted(times)[len(times) // 2]
        assert median < 1e-3, f"median {median * 1e6:.0f} us with {params}"


# --- StopMatcher ------------------------------------------------------------------------------------


def _stream(stops: list[str], chunks: list[str]) -> tuple[list[str], bool, str]:
    m = StopMatcher(stops)
    emitted, stopped = [], False
    for chunk in chunks:
        out, stopped = m.push(chunk)
        emitted.append(out)
    return emitted, stopped, m.flush()


def test_stop_split_across_pushes() -> None:
    emitted, stopped, rest = _stream(["lo w"], ["Hel", "lo wor", "ld"])
    assert emitted == ["He", "l", ""]  # "l" is held back until "lo w" is ruled in or out
    assert stopped and rest == ""


def test_text_is_held_back_only_while_it_can_start_a_stop() -> None:
    m = StopMatcher(["world"])
    assert m.push("Hello wo") == ("Hello ", False)
    assert m.push("rk") == ("work", False)
    assert m.push(" wor") == (" ", False)
    assert m.flush() == "wor" and not m.stopped


def test_overlapping_and_multiple_stops_first_completed_wins() -> None:
    # "abce" is still possible when "bcd" completes: the earlier start of "bcd" decides.
    emitted, stopped, _ = _stream(["abce", "bcd"], list("xxabcd"))
    assert "".join(emitted) == "xxa" and stopped
    m = StopMatcher(["END", "\n\n", "D"])
    assert m.push("one\n") == ("one", False)
    assert m.push("\nEND") == ("", True)
    assert m.matched == "\n\n"
    assert m.push("more") == ("", True)  # nothing after a stop is ever emitted
    # A stop containing another: the stream ends where the first one completes, as it would if
    # the text arrived one character at a time; of two ending together, the longer is cut.
    emitted, stopped, _ = _stream(["hello world", "lo"], ["hel", "lo world"])
    assert emitted == ["", "hel"] and stopped
    m = StopMatcher(["o w", "lo w"])
    assert m.push("hello world") == ("hel", True) and m.matched == "lo w"


def test_stop_at_the_very_start() -> None:
    m = StopMatcher(["<|im_end|>"])
    assert m.push("<|im_") == ("", False)
    assert m.push("end|>trailing") == ("", True)
    assert m.flush() == ""


def test_no_stops_is_pass_through() -> None:
    m = StopMatcher([])
    for chunk in ("Hello", " wor", "ld", ""):
        assert m.push(chunk) == (chunk, False)
    assert m.flush() == ""


def test_unicode_stops() -> None:
    emitted, stopped, _ = _stream(["世界", "🙂"], list("你好世") + ["界!"])
    assert "".join(emitted) == "你好" and stopped
    emitted, stopped, rest = _stream(["🙂👍"], ["café 🙂", "🙂", "👍 no"])
    assert "".join(emitted) == "café 🙂" and stopped and rest == ""
    emitted, stopped, rest = _stream(["é"], ["cafe\u0301"])  # decomposed é is a different string
    assert emitted == ["cafe\u0301"] and not stopped


@pytest.mark.parametrize("stops", [["ok", ""], "", [None]])
def test_invalid_stops_raise(stops: object) -> None:
    with pytest.raises(ValueError):
        StopMatcher(stops)  # type: ignore[arg-type]


def test_a_lone_string_is_one_stop_string() -> None:
    assert StopMatcher("stop").push("a stop sign") == ("a ", True)  # not the letters s, t, o, p


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab\n😀", max_size=40),
    stops=st.lists(st.text(alphabet="ab\n😀", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_stop_matcher_is_independent_of_chunking(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    emitted, stopped, rest = _stream(stops, chunks)
    # Reference: the occurrence that ends first (ties: starts first), found on the whole text.
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    assert "".join(emitted) + rest == (text[: min(hits)[1]] if hits else text)
    assert stopped == bool(hits)
