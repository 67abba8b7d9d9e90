"""Type-independent drivers of the K-quant kernels (``quant_k``, ``quant_k3``).

A K-quant type is described by two functions on its super-block at byte ``o`` of ``b``:

* ``scales(b, o, sf, mf)``: per sub-block ``s`` of ``group`` weights, the float scale
  ``sf[s]`` and the additive term ``mf[s]`` (Q4_K's ``-dmin*m``, Q6_K's ``-32*sf[s]``);
* ``values(b, o, c, p, load)``: the unsigned integer values of the weights ``32c + p``,
  ``32c + p + 1``, ... one per byte of the uint32 it returns, reading the block's bytes with
  ``load`` at offsets ``p`` of its 32-byte runs;

so that weight ``i`` is ``sf[i // group] * value + mf[i // group]``. ggml packs the bit fields
of weight ``32c + l`` at byte ``l`` of 32-byte runs in every K-quant layout, so ``values`` is
SWAR code on bytes (shifts, masks such as 0x0F0F0F0F, ORs) that works the same whether
``load`` reads 4 bytes (:func:`~.quant_k_simd.load_u32`) or one (``load_u8``).

The matrix-vector kernel reads words: for 8 consecutive words that is a vector load, a shift,
an AND and an OR or two per 32 weights, and taking byte ``k`` out of the 8 words is one
shift and one AND, all within 128-bit lanes. The weights come out in *word order* (byte
``k`` of words 0..7, i.e. weights ``32c + 4m + k``); converting bytes in natural order
instead needs a cross-lane ``vpmovzxbd`` per 8 weights, which on Zen 3 costs three times
as much. Dequantization reads bytes, in natural order.

* :func:`matvec_blocks` consumes the weights in that word order and permutes ``x`` once per
  call to match (:func:`permute32`), FMAs them into 16 lane accumulators scaled per sub-block,
  and reduces horizontally once per row. The ``mf`` terms cost one 8-lane FMA per 8
  sub-blocks against precomputed sub-block sums of ``x``, not one add per weight.
* :func:`matmul_blocks` dequantizes a tile of rows (RT rows x KC columns, 64 KiB, L2) to
  float32, then runs a register-blocked FMA kernel (MR=4 rows x NT=3 tokens = 12 ymm
  accumulators), so each weight is decoded once per tile for all ``n`` tokens.
* :func:`dequantize_blocks_rows`.

The drivers are ``inline="always"``: each public kernel gets its own copy specialized on the
literal block geometry and on ``scales``/``values``. (Passing a function to a compiled,
non-inlined callee makes numba embed a pointer to the Python dispatcher, which defeats
caching.) Every kernel computes rows [r0, r1) serially; callers split rows across threads.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .quant_k_simd import bits, fma_f32x8, load_u8, load_u32, stack_array

QK_K = 256  # weights per super-block
RT = 16  # rows per dequantized tile of the matmul driver
KC = 1024  # columns per tile chunk (multiple of QK_K): RT * KC * 4 bytes = 64 KiB
MR = 4  # rows per register block of the FMA kernel
NT = 3  # tokens per register block (MR * NT = 12 ymm accumulators after vectorization)
GEMM_MIN_TOKENS = 8  # fewer tokens: multi-token matrix-vector kernel instead of dequantize + GEMM


@njit(nogil=True, fastmath=True, cache=True)
def permute32(X):
    """Rows of X in word order: XP[i, 32c + 8k + m] = X[i, 32c + 4m + k] (see the module doc)."""
    n, cols = X.shape
    XP = np.empty((n, cols), np.float32)
    for i in range(n):
        for c in range(cols // 32):
            for k in range(4):
                for m in range(8):
                    XP[i, 32 * c + 8 * k + m] = X[i, 32 * c + 4 * m + k]
    return XP


@njit(nogil=True, fastmath=True, cache=True)
def group_sums(X, g):
    """XS[i, j] = sum of X[i, g*j : g*(j+1)]."""
    n, cols = X.shape
    XS = np.empty((n, cols // g), np.float32)
    for i in range(n):
        for j in range(cols // g):
            t = np.float32(0.0)
            for l in range(g):
                t += X[i, g * j + l]
            XS[i, j] = t
    return XS


@njit(nogil=True, fastmath=True, inline="always", cache=True)
def _lane_scales(sf, c, group):
    """Scales of lanes m < 4 and m >= 4 of 32-weight run ``c`` (lane m holds weights 4m..4m+3)."""
    if group == 32:
        return sf[c], sf[c]
    return sf[2 * c], sf[2 * c + 1]


@njit(nogil=True, fastmath=True, inline="always", cache=True)
def _word_dot(b, o, c, m, x, j, values):
    """sum_k (weight 32c + 4m + k) * x[j + 8k]: word m of run c against x in word order.

    (Called once per token with the same word: LLVM merges the repeated decoding. Helpers in
    the vectorized loop return scalars, never tuples, whose struct values stop LLVM from
    vectorizing once several tokens are involved.)
    """
    v = values(b, o, c, 4 * m, load_u32)
    return (np.float32(bits(v, 0, 8)) * x[j] + np.float32(bits(v, 8, 8)) * x[j + 8]
            + np.float32(bits(v, 16, 8)) * x[j + 16] + np.float32(bits(v, 24, 8)) * x[j + 24])


@njit(nogil=True, fastmath=True, inline="always", cache=True)
def _dot_two_runs(b, o, c, xs4, xo, sf, acc, group, values, ntok):
    """acc[16t + 8h + m] += lane scale * (word m of run c + h) . x_t for h = 0, 1 and the
    first ``ntok`` of the four token rows ``xs4`` (word order).

    Two runs go to separate accumulators with constant indices, so that LLVM keeps acc in
    registers; the m loop is what LLVM vectorizes, 8 words per instruction. The tokens are
    written out, not looped over: the m loop must be the innermost loop for LLVM to vectorize
    it (``ntok`` is a literal, so the dead branches are pruned).
    """
    sa0, sb0 = _lane_scales(sf, c, group)
    sa1, sb1 = _lane_scales(sf, c + 1, group)
    for m in range(8):
        j = xo + 32 * c + m
        s0 = sa0 if m < 4 else sb0
        s1 = sa1 if m < 4 else sb1
        acc[m] += s0 * _word_dot(b, o, c, m, xs4[0], j, values)
        acc[8 + m] += s1 * _word_dot(b, o, c + 1, m, xs4[0], j + 32, values)
        if ntok > 1:
            acc[16 + m] += s0 * _word_dot(b, o, c, m, xs4[1], j, values)
            acc[24 + m] += s1 * _word_dot(b, o, c + 1, m, xs4[1], j + 32, values)
        if ntok > 2:
            acc[32 + m] += s0 * _word_dot(b, o, c, m, xs4[2], j, values)
            acc[40 + m] += s1 * _word_dot(b, o, c + 1, m, xs4[2], j + 32, values)
        if ntok > 3:
            acc[48 + m] += s0 * _word_dot(b, o, c, m, xs4[3], j, values)
            acc[56 + m] += s1 * _word_dot(b, o, c + 1, m, xs4[3], j + 32, values)


@njit(nogil=True, fastmath=True, inline="always", cache=True)
def _dot_rows(w, cols, XP, XS, i0, out, r0, r1, block_bytes, group, scales, values, ntok):
    """out[i, r] = W[r, :] . X[i, :] for r in [r0, r1) and tokens i = min(i0 + t, n - 1),
    t < ntok (a literal, at most 4): each block is decoded once for the ntok tokens.

    XP: X in word order (:func:`permute32`), XS: its sub-block sums (:func:`group_sums`).
    """
    n = XP.shape[0]
    nb = cols // QK_K
    ng = QK_K // group
    row_bytes = nb * block_bytes
    sf = stack_array(16, np.float32)
    mf = stack_array(16, np.float32)
    acc = stack_array(64, np.float32)  # 16 lanes per token
    macc = stack_array(32, np.float32)  # 8 lanes per token, for the mf terms
    # the token rows, fixed before the loops (clamped indices need wraparound checks that
    # would otherwise sit inside the vectorized loop and stop LLVM from vectorizing it)
    rows = (min(i0, n - 1), min(i0 + 1, n - 1), min(i0 + 2, n - 1), min(i0 + 3, n - 1))
    xs4 = (XP[rows[0]], XP[rows[1]], XP[rows[2]], XP[rows[3]])
    sums4 = (XS[rows[0]], XS[rows[1]], XS[rows[2]], XS[rows[3]])
    for r in range(r0, r1):
        # Index a per-row view with offsets built from loop counters only: LLVM can then prove
        # them non-negative and drop numba's negative-index wraparound (which blocks vectorizing).
        wr = w[r * row_bytes:(r + 1) * row_bytes]
        for l in range(16 * ntok):
            acc[l] = 0.0
        for l in range(8 * ntok):
            macc[l] = 0.0
        for b in range(nb):
            o = b * block_bytes
            scales(wr, o, sf, mf)
            for t in range(ntok):
                for h in range(ng // 8):
                    fma_f32x8(macc[8 * t:8 * t + 8], mf, 8 * h, sums4[t], ng * b + 8 * h)
            # literal run numbers: the bit positions inside the words become constants
            _dot_two_runs(wr, o, 0, xs4, QK_K * b, sf, acc, group, values, ntok)
            _dot_two_runs(wr, o, 2, xs4, QK_K * b, sf, acc, group, values, ntok)
            _dot_two_runs(wr, o, 4, xs4, QK_K * b, sf, acc, group, values, ntok)
            _dot_two_runs(wr, o, 6, xs4, QK_K * b, sf, acc, group, values, ntok)
        for t in range(ntok):
            total = np.float32(0.0)
            for l in range(16):
                total += acc[16 * t + l]
            for l in range(8):
                total += macc[8 * t + l]
            out[rows[t], r] = total


@njit(nogil=True, fastmath=True, inline="always", cache=True)
def matvec_blocks(w, cols, x, out, r0, r1, block_bytes, group, scales, values):
    """out[r] = W[r, :] . x for r in [r0, r1); see the module doc."""
    X = x.reshape((1, cols))
    _dot_rows(w, cols, permute32(X), group_sums(X, group), 0, out.reshape((1, out.shape[0])),
              r0, r1, block_bytes, group, scales, values, 1)


@njit(nogil=True, fastmath=True, inline="always", cache=True)
def _dequant_block(b, o, y, group, scales, values, sf, mf):
    """y[:256] = the weights of the super-block at byte ``o`` of ``b``, in natural order."""
    scales(b, o, sf, mf)
    # Halves of runs (16 weights, one scale), i outermost: LLVM unrolls the run loop and
    # vectorizes over i (the other way round, the small loops get fully unrolled into
    # scalar code).
    for h in range(2):
        for i in range(16):
            for c in range(QK_K // 32):
                s = (32 * c + 16 * h) // group
                q = np.float32(values(b, o, c, 16 * h + i, load_u8))
                y[32 * c + 16 * h + i] = sf[s] * q + mf[s]


@njit(nogil=True, fastmath=True, cache=True)
def _fma_tile(S, nr, kk, X, k0, out, t0, accumulate):
    """out[i, t0 + r] (+)= S[r, :kk] . X[i, k0:k0+kk] for r < nr and every token i.

    Row and token indices past the end are clamped (the redundant results are not written),
    so a single 4x3 register-blocked loop handles every shape. The k loop vectorizes with one
    ymm accumulator per (row, token) pair, each x load feeds 4 FMAs and each weight 3.
    """
    n = X.shape[0]
    for i0 in range(0, n, NT):
        i1 = min(i0 + 1, n - 1)
        i2 = min(i0 + 2, n - 1)
        x0 = X[i0, k0:k0 + kk]
        x1 = X[i1, k0:k0 + kk]
        x2 = X[i2, k0:k0 + kk]
        for r in range(0, nr, MR):
            s0 = S[r, :kk]
            s1 = S[r + 1, :kk]
            s2 = S[r + 2, :kk]
            s3 = S[r + 3, :kk]
            a00 = a01 = a02 = a10 = a11 = a12 = np.float32(0.0)
            a20 = a21 = a22 = a30 = a31 = a32 = np.float32(0.0)
            for k in range(kk):
                v0 = x0[k]
                v1 = x1[k]
                v2 = x2[k]
                a00 += s0[k] * v0
                a01 += s0[k] * v1
                a02 += s0[k] * v2
                a10 += s1[k] * v0
                a11 += s1[k] * v1
                a12 += s1[k] * v2
                a20 += s2[k] * v0
                a21 += s2[k] * v1
                a22 += s2[k] * v2
                a30 += s3[k] * v0
                a31 += s3[k] * v1
                a32 += s3[k] * v2
            _store3(out, i0, t0 + r, a00, a01, a02, n, accumulate)
            if r + 1 < nr:
                _store3(out, i0, t0 + r + 1, a10, a11, a12, n, accumulate)
            if r + 2 < nr:
                _store3(out, i0, t0 + r + 2, a20, a21, a22, n, accumulate)
            if r + 3 < nr:
                _store3(out, i0, t0 + r + 3, a30, a31, a32, n, accumulate)


@njit(nogil=True, inline="always", cache=True)
def _store3(out, i0, c, v0, v1, v2, n, accumulate):
    """Write (or add) the results of tokens i0, i0+1, i0+2 that exist for output column c."""
    if accumulate:
        out[i0, c] += v0
        if i0 + 1 < n:
            out[i0 + 1, c] += v1
        if i0 + 2 < n:
            out[i0 + 2, c] += v2
    else:
        out[i0, c] = v0
        if i0 + 1 < n:
            out[i0 + 1, c] = v1
        if i0 + 2 < n:
            out[i0 + 2, c] = v2


@njit(nogil=True, fastmath=True, inline="always", cache=True)
def matmul_blocks(w, cols, X, out, r0, r1, block_bytes, group, scales, values, matvec):
    """out[i, r] = W[r, :] . X[i, :] for every token i and r in [r0, r1).

    Few tokens (speculative verification): decode each row once per group of 4 tokens and FMA
    it against all of them (a group of 2-3 repeats its last token, a last single token goes
    to ``matvec``). From GEMM_MIN_TOKENS tokens on, decoding a tile once for all tokens and
    running the register-blocked float32 kernel wins.
    """
    n = X.shape[0]
    if r1 <= r0 or n == 0:
        return
    if n < GEMM_MIN_TOKENS:
        XP = permute32(X)
        XS = group_sums(X, group)
        i0 = 0
        while n - i0 >= 2:
            _dot_rows(w, cols, XP, XS, i0, out, r0, r1, block_bytes, group, scales, values, 4)
            i0 += 4
        if i0 < n:
            matvec(w, cols, X[i0], out[i0], r0, r1)
        return
    row_bytes = cols // QK_K * block_bytes
    kc = min(cols, KC)
    # Zeroed once: clamped rows of a partial tile read stale but finite values, never NaNs
    # or denormals from uninitialized memory (their results are discarded anyway).
    S = np.zeros((RT, kc), np.float32)  # RT is a multiple of MR: clamped blocks stay inside
    sf = stack_array(16, np.float32)
    mf = stack_array(16, np.float32)
    for t0 in range(r0, r1, RT):
        nr = min(RT, r1 - t0)
        for k0 in range(0, cols, kc):
            kk = min(kc, cols - k0)
            nbk = kk // QK_K
            for r in range(nr):
                # a view per (row, chunk), indexed from loop counters only (see _dot_rows)
                o0 = (t0 + r) * row_bytes + k0 // QK_K * block_bytes
                wr = w[o0:o0 + nbk * block_bytes]
                for b in range(nbk):
                    y = S[r, b * QK_K:(b + 1) * QK_K]
                    _dequant_block(wr, b * block_bytes, y, group, scales, values, sf, mf)
            _fma_tile(S, nr, kk, X, k0, out, t0, k0 > 0)


@njit(nogil=True, fastmath=True, inline="always", cache=True)
def dequantize_blocks_rows(w, cols, r0, r1, out, block_bytes, group, scales, values):
    """out[r - r0, :] = W[r, :] as float32 for r in [r0, r1)."""
    row_bytes = cols // QK_K * block_bytes
    sf = stack_array(16, np.float32)
    mf = stack_array(16, np.float32)
    for r in range(r0, r1):
        wr = w[r * row_bytes:(r + 1) * row_bytes]
        for b in range(cols // QK_K):
            y = out[r - r0, b * QK_K:(b + 1) * QK_K]
            _dequant_block(wr, b * block_bytes, y, group, scales, values, sf, mf)
