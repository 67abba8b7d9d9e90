"""Causal softmax attention over the KV cache, for a block of queries of one head.

Prefill evaluates hundreds of queries against the same keys, so queries are processed in
blocks: each cached key/value row is fetched once for every query of the block that may see it,
and read where it lies, 8 values per vector instruction, whether it holds 16-bit values or 8/4-bit
codes (``kv_simd``, formats in ``kvquant``) -- the row's memory traffic amortizes over the block,
and no dequantized copy of the cache is ever made.
A decode step is the block of one query.

Which keys a query sees is decided by token *counters* (the position of a token in the whole
sequence), never by where its row sits in the cache: a query at counter c sees the key at
counter k when k <= c and either k < n_sink (an attention sink, kept forever) or k > c - window
(the rolling window). With window = infinity this is plain causal attention.

StreamingLLM positions: a query must see relative distances of positions *within the cache*,
not in the text. Keys are rotated once, at their counter, when written. For window keys the
distance c - k is then already right. For sink keys (stored at positions 0 .. n_sink - 1) the
query must sit at its position within the cache, min(c, n_sink + window - 1): the forward pass
rotates a second copy of each query (``qs``) to that position. Nothing stored is ever rotated
again, so eviction never touches the rows that stay.

A quantized cache (``runtime/kv_cache``) also keeps 16-bit copies of its most recent tokens:
a query at counter c reads the key and value of counter k from the 16-bit copy while
c - end(k) < residual, where end(k) is the last counter of k's key group (so a group is read
quantized only once it is complete), and from the quantized store after that. The choice
depends on (k, c) alone -- never on what was written or trimmed before -- so rolling back
and re-evaluating gives the same logits, and while every key a query sees is recent, it
computes exactly what a 16-bit cache computes, bit for bit.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .kvquant import KV_GROUP, hadamard_groups, key_group_params, key_group_query
from .ggml_math import expf, round_f16
from .kv_simd import axpy_f16, axpy_value_row, dot_codes, dot_f16_ggml, reduce_value_parts
from .quant_simd import max_f32, vhsum, vload

QUERY_BLOCK = 16  # queries per work item: scratch is QUERY_BLOCK x cache slots floats per thread
# The softmax runs over the slots in use rounded up to this many (hidden slots add exact zeros):
# a vectorized sum then splits the nonzero terms into the same lanes whatever the number of
# slots in use, so a query's attention does not depend on how many tokens its pass evaluates
# (speculative verification must reproduce one-token decoding bit for bit).
SOFTMAX_PAD = 64
# 16-bit value rows are summed into this many partial sums by key slot (slot % V_PARTS), then
# reduced in a fixed tree: the order of ggml's ``ggml_vec_dot_f16`` over the keys (kv_simd).
V_PARTS = 32
_HIDDEN = np.float32(-1e30)  # score of a key a query may not see (finite: fastmath assumes no inf)


@njit(nogil=True, inline="always", cache=True)
def padded_slots(n_slots):
    """Slots the softmax runs over: ``n_slots`` rounded up to ``SOFTMAX_PAD``."""
    return (n_slots + SOFTMAX_PAD - 1) // SOFTMAX_PAD * SOFTMAX_PAD


@njit(nogil=True, inline="always", cache=True)
def _visible(ck, c0, i0, i1, n_sink, window):
    """The queries [lo, hi) of the block [i0, i1) that see the key at counter ck (query i has
    counter c0 + i): an empty range for an empty slot (ck < 0)."""
    if ck < 0:
        return i0, i0
    lo = max(i0, ck - c0)
    hi = i1 if ck < n_sink else min(i1, ck + window - c0)
    return lo, hi


@njit(nogil=True, inline="always", cache=True)
def group_end(ck, n_sink):
    """Counter of the last token of the key group of counter ck: sinks form groups of their own
    (slots 0 ..), window tokens groups of 32 from counter n_sink on (the ring is aligned to 32)."""
    if ck < n_sink:
        return min(n_sink - 1, ck // KV_GROUP * KV_GROUP + KV_GROUP - 1)
    return n_sink + (ck - n_sink) // KV_GROUP * KV_GROUP + KV_GROUP - 1


@njit(nogil=True, inline="always", cache=True)
def _recent_until(ck, c0, lo, hi, n_sink, residual):
    """Queries [lo, split) of [lo, hi) read the 16-bit copy of the key at counter ck; the rest
    read the quantized store."""
    return min(hi, max(lo, group_end(ck, n_sink) + residual - c0))


@njit(nogil=True, inline="always", cache=True)
def _row_at(rows, kvh, r):
    """Byte offset of row ``r`` of kv head ``kvh`` in a C-contiguous uint8 [heads, rows, bytes]."""
    return (kvh * rows.shape[1] + r) * rows.shape[2]


@njit(nogil=True, cache=True)
def attend_block(q, qs, att, i0, i1, h, hd, kc, vc, rk, rv, kbits, vbits, kvh, c0, slot_pos, n_slots,
                 n_sink, window, residual, n_recent, S, gaq, gdm, gdone, vacc):
    """att[i, h*hd:(h+1)*hd] = softmax(q_i . K^T / sqrt(hd)) V for queries i in [i0, i1).

    q, qs, att: f32 [n, q_dim]; query i has counter c0 + i; qs is q rotated for the sinks
                (the same array as q when nothing has been evicted).
    kc:     uint8 [n_kv_heads, slots, 2 hd] 16-bit rows, or at kbits < 16
            [n_kv_heads, slots // 32, key group bytes] key groups (kvquant)
    vc:     uint8 [n_kv_heads, slots, row bytes] rows at vbits (Hadamard basis below 16 bits).
    rk, rv: uint8 [n_kv_heads, n_recent, 2 hd] 16-bit copies of recent tokens, the token at
            counter k in row k % n_recent (n_recent == 0: a 16-bit cache, no copies).
    slot_pos: int64 [slots] counter of the token in each slot (-1: empty); slots >= n_slots unused.
    S:      f32 [>= i1 - i0, >= padded_slots(n_slots)] scratch (scores, then probabilities).
    gdm:    f32 [2, hd] a key group's scales and minima; gaq: f32 [QUERY_BLOCK,
            hd + 1] each query folded with them (key_group_query); gdone: int32 [QUERY_BLOCK + 1];
    vacc:   f32 [QUERY_BLOCK, (V_PARTS + 1) hd] scratch: per query, the quantized values' sum,
            then V_PARTS partial sums of the 16-bit value rows.
    """
    # Every inner loop indexes a 1-D view with its own loop counter: LLVM can then prove the
    # index non-negative, drop numba's negative-index wraparound and vectorize the loop.
    # The per-key loops instead pass cache rows and query rows to the kv_simd reads as flat
    # offsets into the whole arrays, written out here rather than in a helper: a view per key,
    # or an inlined helper taking the arrays, makes numba reference-count them per call, which
    # cost 2-3x the arithmetic of a decode step's attention (measured, 64-dim heads). For the
    # same reason the hot 16-bit score loop is written twice rather than picking q or qs by a
    # select (~20% per key, measured); the quantized cache's recent copies take the select.
    qb = h * hd
    qdim = q.shape[1]  # == att.shape[1]
    scale = np.float32(1.0) / np.sqrt(np.float32(hd))
    nq = i1 - i0
    n_pad = padded_slots(n_slots)
    for i in range(nq):
        Si = S[i, :n_pad]
        for t in range(n_pad):
            Si[t] = _HIDDEN

    # ---- scores, one key group (32 slots) at a time: a row is decoded once for all queries ----
    for g in range((n_slots + KV_GROUP - 1) // KV_GROUP):
        for i in range(nq + 1):
            gdone[i] = 0
        for t in range(g * KV_GROUP, min(n_slots, (g + 1) * KV_GROUP)):
            ck = slot_pos[t]
            lo, hi = _visible(ck, c0, i0, i1, n_sink, window)
            if lo >= hi:
                continue
            # a 16-bit cache (see the note above)
            if kbits == 16:
                ro = _row_at(kc, kvh, t)
                if ck < n_sink:
                    for i in range(lo, hi):
                        S[i - i0, t] = dot_f16_ggml(qs, i * qdim + qb, kc, ro, hd) * scale
                else:
                    for i in range(lo, hi):
                        S[i - i0, t] = dot_f16_ggml(q, i * qdim + qb, kc, ro, hd) * scale
                continue
            # a quantized cache: queries [lo, split) read the recent 16-bit copy, the rest the store
            qq = qs if ck < n_sink else q
            split = _recent_until(ck, c0, lo, hi, n_sink, residual)
            ro = _row_at(rk, kvh, ck % n_recent)
            for i in range(lo, split):
                S[i - i0, t] = dot_f16_ggml(qq, i * qdim + qb, rk, ro, hd) * scale
            if hi > split:  # the quantized key group: fold its scales into each query once
                if gdone[nq] == 0:
                    key_group_params(kc[kvh, g], kbits, hd, gdm)
                    gdone[nq] = 1
                for i in range(split, hi):
                    if gdone[i - i0] == 0:
                        gaq[i - i0, hd] = key_group_query(gdm, qq[i], qb, hd, gaq[i - i0])
                        gdone[i - i0] = 1
                co = _row_at(kc, kvh, g) + (t - g * KV_GROUP) * (hd * kbits // 8)  # this token's codes
                for i in range(split, hi):
                    S[i - i0, t] = (dot_codes(gaq, (i - i0) * gaq.shape[1], kc, co, kbits, hd) + gaq[i - i0, hd]) * scale

    # ---- softmax, rounded as ggml's soft_max_f32: exp by ggml's polynomial, the sum in float64
    # over float32 sums of 8 slots, probabilities rounded to float16 for the F16 value product ----
    vw = vacc.shape[1]
    for i in range(nq):
        Si = S[i, :n_pad]
        m = max_f32(Si, n_pad, _HIDDEN)
        for t in range(n_pad):
            # a key the query may not see has probability 0 (and costs no exp)
            Si[t] = expf(Si[t] - m) if Si[t] > _HIDDEN else np.float32(0.0)
        total = 0.0
        for t in range(0, n_pad, 8):
            total += np.float64(vhsum(vload(Si, t)))
        inv = np.float32(1.0 / total)
        for t in range(n_slots):
            Si[t] = round_f16(Si[t] * inv)
        vi = vacc[i]
        for j in range((1 + V_PARTS) * hd):  # all parts: the reduction reads every one
            vi[j] = 0.0

    # ---- values: 16-bit rows into the partial sums of their slot, quantized rows (Hadamard
    # basis) into vacc[:, :hd] ----
    for t in range(n_slots):
        ck = slot_pos[t]
        lo, hi = _visible(ck, c0, i0, i1, n_sink, window)
        if lo >= hi:
            continue
        po = (1 + t % V_PARTS) * hd
        if vbits == 16:
            ro = _row_at(vc, kvh, t)
            for i in range(lo, hi):
                axpy_f16(S[i - i0, t], vc, ro, vacc, (i - i0) * vw + po, hd)
            continue
        split = _recent_until(ck, c0, lo, hi, n_sink, residual)
        ro = _row_at(rv, kvh, ck % n_recent)
        for i in range(lo, split):
            axpy_f16(S[i - i0, t], rv, ro, vacc, (i - i0) * vw + po, hd)
        if hi > split:
            ro = _row_at(vc, kvh, t)
            for i in range(split, hi):
                axpy_value_row(S[i - i0, t], vc, ro, vbits, vacc, (i - i0) * vw, hd)
    for i in range(nq):
        reduce_value_parts(vacc, i * vw + hd, att, (i0 + i) * qdim + qb, hd)
    if vbits != 16:  # rotate the quantized values' share back and add it
        for i in range(nq):
            ai = vacc[i, :hd]
            hadamard_groups(ai, 0, hd)
            out = att[i0 + i, qb:qb + hd]
            for j in range(hd):
                out[j] += ai[j]
