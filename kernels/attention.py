"""Causal softmax attention over the f16 KV cache, for a block of queries of one head.

Prefill evaluates hundreds of queries against the same keys, so queries are processed in
blocks: each cached key/value row is converted from f16 once and used by every query of the
block that may see it (the conversion and the row's memory traffic amortize over the block).
A decode step is the block of one query.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .lowlevel import f16_to_f32

QUERY_BLOCK = 16  # queries per work item: scratch is QUERY_BLOCK x n_ctx floats per thread


@njit(nogil=True, fastmath=True, cache=True)
def attend_block(q, att, i0, i1, h, hd, kc, vc, kvh, pos0, S, row):
    """att[i, h*hd:(h+1)*hd] = softmax(q_i . K^T / sqrt(hd)) V for queries i in [i0, i1).

    q, att: f32 [n, q_dim]; query i sits at position pos0 + i and sees keys 0 .. pos0 + i.
    kc, vc: uint16 (f16) [n_kv_heads, n_ctx, hd] of one layer; kvh: this head's KV head.
    S:      f32 [>= i1 - i0, >= pos0 + i1] scratch (scores, then probabilities).
    row:    f32 [hd] scratch (one key or value row in f32).
    """
    # Every inner loop indexes a 1-D view with its own loop counter: LLVM can then prove the
    # index non-negative, drop numba's negative-index wraparound and vectorize the loop.
    qb = h * hd
    scale = np.float32(1.0) / np.sqrt(np.float32(hd))
    n_keys = pos0 + i1  # the last query's keys; earlier queries see a prefix
    for t in range(n_keys):
        krow = kc[kvh, t]
        for j in range(hd):
            row[j] = f16_to_f32(krow[j])
        for i in range(max(i0, t - pos0), i1):  # queries that may attend to key t
            qi = q[i, qb:qb + hd]
            s = np.float32(0.0)
            for j in range(hd):
                s += qi[j] * row[j]
            S[i - i0, t] = s * scale
    for i in range(i0, i1):
        Si = S[i - i0, :pos0 + i + 1]
        m = np.float32(-np.inf)
        for t in range(Si.shape[0]):
            m = max(m, Si[t])
        total = np.float32(0.0)
        for t in range(Si.shape[0]):
            e = np.exp(Si[t] - m)
            Si[t] = e
            total += e
        inv = np.float32(1.0) / total
        for t in range(Si.shape[0]):
            Si[t] *= inv
        att[i, qb:qb + hd] = 0.0
    for t in range(n_keys):
        vrow = vc[kvh, t]
        for j in range(hd):
            row[j] = f16_to_f32(vrow[j])
        for i in range(max(i0, t - pos0), i1):
            p = S[i - i0, t]
            ai = att[i, qb:qb + hd]
            for j in range(hd):
                ai[j] += p * row[j]
