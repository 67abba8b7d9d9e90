"""Causal softmax attention over the KV cache, for a block of queries of one head.

Prefill evaluates hundreds of queries against the same keys, so queries are processed in
blocks: each cached key/value row is decoded to float32 once (from 16, 8 or 4 bits, see
``kvquant``) and used by every query of the block that may see it -- the decoding and the row's
memory traffic amortize over the block, and no dequantized copy of the cache is ever made.
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
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .kvquant import hadamard_groups, load_row

QUERY_BLOCK = 16  # queries per work item: scratch is QUERY_BLOCK x cache slots floats per thread
_HIDDEN = np.float32(-1e30)  # score of a key a query may not see (finite: fastmath assumes no inf)


@njit(nogil=True, fastmath=True, cache=True)
def attend_block(q, qs, att, i0, i1, h, hd, kc, vc, kbits, vbits, kvh, c0, slot_pos, n_slots,
                 n_sink, window, S, row):
    """att[i, h*hd:(h+1)*hd] = softmax(q_i . K^T / sqrt(hd)) V for queries i in [i0, i1).

    q, qs, att: f32 [n, q_dim]; query i has counter c0 + i; qs is q rotated for the sinks
                (the same array as q when nothing has been evicted).
    kc, vc: uint8 [n_kv_heads, slots, row bytes] of one layer, rows at kbits / vbits (quantized
            rows hold Hadamard-rotated vectors, and so do q and qs then: see kvquant).
    slot_pos: int64 [slots] counter of the token in each slot (-1: empty); slots >= n_slots unused.
    S:      f32 [>= i1 - i0, >= n_slots] scratch (scores, then probabilities).
    row:    f32 [hd] scratch (one key or value row in f32).
    """
    # Every inner loop indexes a 1-D view with its own loop counter: LLVM can then prove the
    # index non-negative, drop numba's negative-index wraparound and vectorize the loop.
    qb = h * hd
    scale = np.float32(1.0) / np.sqrt(np.float32(hd))
    nq = i1 - i0
    for i in range(nq):
        Si = S[i, :n_slots]
        for t in range(n_slots):
            Si[t] = _HIDDEN
    for t in range(n_slots):
        ck = slot_pos[t]
        if ck < 0:
            continue
        lo = max(i0, ck - c0)
        hi = i1 if ck < n_sink else min(i1, ck + window - c0)
        if lo >= hi:
            continue
        load_row(kc[kvh, t], kbits, row, hd)
        qq = qs if ck < n_sink else q
        for i in range(lo, hi):
            qi = qq[i, qb:qb + hd]
            s = np.float32(0.0)
            for j in range(hd):
                s += qi[j] * row[j]
            S[i - i0, t] = s * scale
    for i in range(nq):
        Si = S[i, :n_slots]
        m = _HIDDEN
        for t in range(n_slots):
            m = max(m, Si[t])
        total = np.float32(0.0)
        for t in range(n_slots):
            e = np.exp(Si[t] - m)
            Si[t] = e
            total += e
        inv = np.float32(1.0) / total
        for t in range(n_slots):
            Si[t] *= inv
        att[i0 + i, qb:qb + hd] = 0.0
    for t in range(n_slots):
        ck = slot_pos[t]
        if ck < 0:
            continue
        lo = max(i0, ck - c0)
        hi = i1 if ck < n_sink else min(i1, ck + window - c0)
        if lo >= hi:
            continue
        load_row(vc[kvh, t], vbits, row, hd)
        for i in range(lo, hi):
            p = S[i - i0, t]
            ai = att[i, qb:qb + hd]
            for j in range(hd):
                ai[j] += p * row[j]
    if vbits != 16:  # quantized values are stored in the Hadamard basis: rotate the sum back
        for i in range(i0, i1):
            hadamard_groups(att[i], qb, hd)
