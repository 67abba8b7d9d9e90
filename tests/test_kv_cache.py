"""The KV cache kinds: 8/4-bit rows (bit-exact against gguf's Q8_0/Q4_1 blocks), slot bookkeeping
of the StreamingLLM cache, and the streaming model against the paper's semantics in float64."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

import edgelm
from edgelm.kernels.kvquant import KV_BITS, load_row, row_bytes, store_row
from edgelm.runtime.errors import ContextOverflowError
from edgelm.runtime.kv_cache import KVSpec, SlotKVCache
from reference_forward import ReferenceLlama, streaming_reference_logits

GGML_OF_BITS = {8: GGMLQuantizationType.Q8_0, 4: GGMLQuantizationType.Q4_1}


# ---------------------------------------------------------------- rows


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_quantized_rows_are_ggml_blocks(bits, head_dim):
    """An 8-bit row is a run of Q8_0 blocks, a 4-bit row of Q4_1 blocks: gguf decodes them."""
    rng = np.random.default_rng(bits * head_dim)
    x = (rng.standard_normal(head_dim) * rng.uniform(0.1, 8) + rng.uniform(-2, 2)).astype(np.float32)
    x[rng.integers(head_dim)] *= 10  # an outlier channel, as keys have
    row = np.zeros(row_bytes(bits, head_dim), np.uint8)
    store_row(row, bits, x, 0, head_dim)
    want = quantize(x[None], GGML_OF_BITS[bits]).reshape(-1)
    assert np.array_equal(row, want)
    out = np.zeros(head_dim, np.float32)
    load_row(row, bits, out, head_dim)
    assert np.array_equal(out, dequantize(row, GGML_OF_BITS[bits]).reshape(-1))


@pytest.mark.parametrize("bits", KV_BITS)
def test_row_round_trip_error(bits):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(256).astype(np.float32)
    row = np.zeros(row_bytes(bits, 256), np.uint8)
    store_row(row, bits, np.concatenate([np.zeros(7, np.float32), x]), 7, 256)  # at an offset
    out = np.zeros(256, np.float32)
    load_row(row, bits, out, 256)
    bound = {16: 1e-3, 8: 0.02, 4: 0.25}[bits]
    assert np.abs(out - x).max() < bound


def test_rows_of_zeros_and_constants():
    for bits in (8, 4):
        for value in (0.0, 3.5):
            row = np.zeros(row_bytes(bits, 32), np.uint8)
            store_row(row, bits, np.full(32, value, np.float32), 0, 32)
            out = np.empty(32, np.float32)
            load_row(row, bits, out, 32)
            assert np.allclose(out, value, atol=1e-2)


def test_bad_bits_and_head_dims():
    with pytest.raises(ValueError, match="one of"):
        row_bytes(6, 64)
    with pytest.raises(ValueError, match="divisible by 32"):
        row_bytes(4, 48)
    assert row_bytes(16, 48) == 96
    with pytest.raises(ValueError, match="kv_bits_k"):
        KVSpec(bits_k=2)
    with pytest.raises(ValueError, match="kv_window"):
        KVSpec(window=0)


# ---------------------------------------------------------------- slots


def test_plain_cache_overflows_and_trims():
    c = SlotKVCache(2, 1, 32, 10)
    assert c.reserve(6) == 0 and list(c.pending_slots) == list(range(6))
    c.update(6)
    assert (c.offset, c.held, c.evicted, c.max_trim) == (6, 6, 0, 6)
    with pytest.raises(ContextOverflowError):
        c.reserve(5)
    assert c.trim(2) == 2 and c.offset == 4 and list(c.slot_pos[:6]) == [0, 1, 2, 3, -1, -1]
    assert c.nbytes == 4 * c.bytes_per_token == 4 * 2 * 1 * (64 + 64)


def test_streaming_cache_evicts_oldest_window_tokens_and_keeps_sinks():
    c = SlotKVCache(1, 1, 32, 0, KVSpec(window=5, n_sink=2), max_batch=3)
    assert c.slots == 2 + 5 + 3 and c.n_ctx > 10**15
    for n in (3, 3, 3, 2, 1):
        c.reserve(n)
        c.update(n)
    held = sorted(p for p in c.slot_pos if p >= 0)
    assert c.offset == 12 and c.evicted == 2 and c.held == 10
    assert held == [0, 1] + list(range(4, 12))  # sinks, then the 8 newest (window 5 + batch room 3)
    assert c.max_trim == 8 - 4  # the next query must still see the 4 tokens before it
    assert c.trim(10) == 4 and c.offset == 8 and c.held == 6
    c.reserve(1)
    assert c.pending_slots[0] not in [s for s, p in enumerate(c.slot_pos) if 0 <= p < 8]
    with pytest.raises(ValueError, match="at most 3"):
        c.reserve(4)
    c.reset()
    assert (c.offset, c.held, c.evicted) == (0, 0, 0) and (c.slot_pos == -1).all()


def test_sink_positions():
    c = SlotKVCache(1, 1, 32, 0, KVSpec(window=5, n_sink=2), max_batch=3)
    assert c.sink_positions(np.arange(0, 6)) is None  # no query past the window yet
    assert list(c.sink_positions(np.arange(5, 9))) == [5, 6, 6, 6]
    assert SlotKVCache(1, 1, 32, 0, KVSpec(window=5, n_sink=0)).sink_positions(np.arange(9, 12)) is None


# ---------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def reference(default_gguf):
    return ReferenceLlama(default_gguf)


@pytest.mark.parametrize("n_sink", [4, 0])
def test_streaming_logits_follow_the_paper(default_gguf, eval_text, reference, n_sink):
    """Batched prefill through a window of 24 (+ sinks): 180 tokens, 28+ evicted, equals the
    float64 model that keeps sinks + window and rotates by position within the cache."""
    window, n = 24, 180
    model = edgelm.load(default_gguf, threads=2, kv_window=window, n_sink=n_sink)
    ids = model.tokenize(eval_text[:3000])[:n]
    cache = model.backend.new_cache(1, model.kv)
    got = np.concatenate([model.backend.forward(ids[i:i + 100], cache, logits_from=0) for i in (0, 100)])
    model.close()
    assert cache.evicted == n - n_sink - cache._ring  # the ring of window + 128 slots filled up
    want = streaming_reference_logits(reference, ids, window, n_sink)
    err = np.abs(got - want)
    print(f"n_sink={n_sink}: top-1 {np.mean(got.argmax(-1) == want.argmax(-1)):.3f}, "
          f"mean |d| {err.mean():.4f}, max {err.max():.3f}")
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.99
    assert err.mean() < 0.01


def test_streaming_trim_is_exact(default_gguf, eval_text):
    """Rolling back through trim and re-evaluating gives the same logits, even after evictions
    (what speculative decoding relies on)."""
    model = edgelm.load(default_gguf, threads=2, kv_window=16, n_sink=4)
    ids = model.tokenize(eval_text[:4000])[:200]
    straight = model.backend.new_cache(1, model.kv)
    a = model.backend.forward(ids, straight, logits_from=0)
    c = model.backend.new_cache(1, model.kv)
    model.backend.forward(ids[:190], c)
    model.backend.forward([1, 2, 3, 4, 5, 6], c)  # a rejected draft
    assert c.evicted > 0 and c.max_trim >= 6
    assert c.trim(6) == 6
    b = model.backend.forward(ids[190:], c, logits_from=0)
    model.close()
    assert np.array_equal(a[190:], b)


def test_quantized_cache_logits_and_greedy_text(default_gguf, eval_text):
    """8-bit cache, no eviction, against the 16-bit cache.

    Prefill (float32 activations) shows the cache's own error: top-1 equal almost everywhere.
    Greedy decoding rounds activations to 8 bits like llama.cpp, which turns any perturbation,
    however small, into logit noise of ~0.16 (the 16-bit cache's own decode and prefill logits
    differ that much): continuations share their openings and split at a near-tie.
    """
    model = edgelm.load(default_gguf, threads=2, n_ctx=512)
    ids = model.tokenize(eval_text[:3000])[:256]
    b = model.backend
    ref = b.forward(ids, b.new_cache(512), logits_from=0)
    q8 = b.forward(ids, b.new_cache(512, KVSpec(bits_k=8, bits_v=8)), logits_from=0)
    top1, err = np.mean(ref.argmax(-1) == q8.argmax(-1)), np.abs(ref - q8).mean()
    print(f"8-bit vs 16-bit cache, prefill: top-1 {top1:.3f}, mean |dlogit| {err:.4f}")
    assert top1 >= 0.98 and err < 0.06
    prompts = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time,",
               "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
               "1. Apples\n2. Bananas\n3."]
    outs = {}
    for bits in (16, 8):
        m = edgelm.load(default_gguf, threads=2, n_ctx=256, kv_bits=bits)
        outs[bits] = ["".join(m.generate(p, max_tokens=32, temperature=0.0)) for p in prompts]
        m.close()
    model.close()
    same = sum(a == c for a, c in zip(outs[16], outs[8]))
    shared = [next((i for i, (x, y) in enumerate(zip(a, c)) if x != y), min(len(a), len(c)))
              for a, c in zip(outs[16], outs[8])]
    print(f"8-bit vs 16-bit cache: {same}/5 greedy continuations identical over 32 tokens; "
          f"characters in common: {shared}")
    assert sum(p >= 8 for p in shared) >= 4


def test_generation_goes_past_the_context_with_a_window(default_gguf, eval_text):
    model = edgelm.load(default_gguf, threads=2, n_ctx=64, kv_window=32, kv_bits=8)
    prompt = model.tokenize(eval_text[:2000])[:200]  # three times the context
    text = "".join(model.generate(prompt, max_tokens=40, temperature=0.7, seed=1))
    stats = model.memory_stats()
    assert text and stats["tokens"] > 200
    assert stats["kv_evicted"] > 0 and stats["kv_tokens"] <= 4 + 32 + 128
    # the conversation continues: the next prompt extends what is cached and reuses it
    more = prompt + model.tokenize(text, add_bos=False) + model.tokenize(" And then", add_bos=False)
    "".join(model.generate(more, max_tokens=5, temperature=0.0))
    model.close()
    plain = edgelm.load(default_gguf, threads=2, n_ctx=64)
    with pytest.raises(ContextOverflowError, match="kv_window"):
        plain.generate("word " * 100, max_tokens=1)
    plain.close()


def test_chat_session_outlives_the_context_with_a_window(default_gguf):
    model = edgelm.load(default_gguf, threads=2, n_ctx=96, kv_window=48, kv_bits=8)
    session = model.chat_session(system="You are brief.")
    for turn in ("Hello!", "Tell me about dragons.", "And about castles?", "What about knights?",
                 "Write a short poem.", "Thanks, bye."):
        reply = "".join(session.send(turn, max_tokens=40, temperature=0.0))
        assert isinstance(reply, str)
    stats = model.memory_stats()
    assert stats["tokens"] > 4 + 48 + 128 and stats["kv_evicted"] > 0  # past the context and the ring
    assert stats["kv_tokens"] <= 4 + 48 + 128  # memory bounded
    assert model.last_stats.cached_tokens > 0  # later turns reuse the cache, not re-read history
    model.close()
