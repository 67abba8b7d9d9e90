"""Type-independent drivers of the K-quant kernels (``quant_k``, ``quant_k3``).

A K-quant type is described by two functions on its super-block at byte ``o`` of ``b``:

* ``scales(b, o, sf, mf)``: per sub-block ``s`` of ``group`` weights, the float scale
  ``sf[s]`` and the additive term ``mf[s]`` (Q4_K's ``-dmin*m``, Q6_K's ``-32*sf[s]``);
* ``values(b, o, c, p, width)``: the unsigned integer values of the weights ``32c + p``, ...
  ``32c + p + width - 1``, one per byte of the uint32 it returns, reading ``width`` (4 or 1)
  bytes at offset ``p`` of the block's 32-byte runs (:func:`~.quant_k_simd.load_bytes`);

so that weight ``i`` is ``sf[i // group] * value + mf[i // group]``. ggml packs the bit fields
of weight ``32c + l`` at byte ``l`` of 32-byte runs in every K-quant layout, so ``values`` is
SWAR code on bytes (shifts, masks such as 0x0F0F0F0F, ORs) that works the same on 4 bytes
as on one.

The matrix-vector kernels read words: for 8 consecutive words that is a vector load, a
shift, an AND and an OR or two per 32 weights, and taking byte ``k`` out of the 8 words is
one shift and one AND, all within 128-bit lanes. The weights come out in *word order* (byte
``k`` of words 0..7, i.e. weights ``32c + 4m + k``), so ``x`` is permuted to match once per
call (:func:`permute32`); converting bytes in natural order instead needs a cross-lane
``vpmovzxbd`` per 8 weights, which on Zen 3 costs three times as much. Dequantization reads
single bytes, in natural order.

* :func:`dot_rows` (matrix-vector, and matrix-matrix for few tokens): per super-block, FMA
  the converted words into 16 lane accumulators per token, scaled per sub-block, and reduce
  horizontally once per row; up to 4 tokens share each decoded word. The ``mf`` terms cost
  one 8-lane FMA per 8 sub-blocks against precomputed sub-block sums of ``x``.
* :func:`matmul_blocks` from GEMM_MIN_TOKENS tokens: dequantize a tile of RT rows to float32,
  then run the legacy types' register-blocked FMA kernel (``quant_drivers.gemm_tile``) over
  it, so each weight is decoded once per tile for all tokens.
* :func:`dequantize_blocks_rows`.

Numerics. Weights are ggml's (float32 scale times small integer, plus the additive term);
products accumulate in float32. The dot products are compiled *without* fastmath, with
explicit fused multiply-adds (:func:`~.quant_k_simd.fmaf`); below GEMM_MIN_TOKENS,
``matmul`` runs each token through the same one-token :func:`dot_rows` as ``matvec`` and equals
it bit for bit, so speculative verification sees exactly the logits of one-token decoding. (With fastmath, LLVM rounds the
same code differently depending on the caller it is inlined into; that is also why the
public kernels are not fastmath.) The GEMM path for larger batches (prefill) sums in tile
order: same accuracy, different last bits.

Generic code that receives ``scales``/``values`` is ``inline="always"``, so that each type's
kernels get their own copy: passing a function to a compiled, non-inlined callee makes numba
embed a pointer to the Python dispatcher, which defeats caching. Everything else is left to
LLVM to inline (numba's own inlining re-types the inlined code and is slow to compile).
LLVM vectorizes the loops noted below only in the exact shapes they have; several comments
say why a shape was chosen. Every kernel computes rows [r0, r1) serially; callers split
rows across threads. ``cols`` must be a multiple of 256 (the dispatcher checks).
"""
from __future__ import annotations

import numpy as np
from numba import njit, types

from .quant_k_simd import U8_ARRAYS, bits, fma_f32x8, fmaf, stack_array
from .quant_drivers import gemm_tile

QK_K = 256  # weights per super-block
RT = 16  # rows per dequantized tile of the matmul driver
GEMM_MIN_TOKENS = 16  # fewer tokens: multi-token dot_rows (measured crossover)
WORD, BYTE = 4, 1  # ``width`` of values()
# Signatures of a type's ``scales`` and ``values``: declared, so that numba compiles each once
# instead of once per combination of literal arguments (LLVM inlines them anyway).
_F32 = types.Array(types.float32, 1, "C")
SCALES_SIG = [types.void(u8, types.int64, _F32, _F32) for u8 in U8_ARRAYS]
VALUES_SIG = [types.uint32(u8, types.int64, types.int64, types.int64, types.int64) for u8 in U8_ARRAYS]


@njit(nogil=True, cache=True)
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


@njit(nogil=True, cache=True)
def group_sums(X, g):
    """XS[i, j] = sum of X[i, g*j : g*(j+1)] (g a multiple of 4), in a fixed order.

    Not fastmath: a reassociated sum could come out differently depending on where LLVM
    inlines this, and the kernels must give bit-identical results (see the module doc).
    Four interleaved partial sums keep it off the add-latency bound.
    """
    n, cols = X.shape
    XS = np.empty((n, cols // g), np.float32)
    for i in range(n):
        for j in range(cols // g):
            t0 = t1 = t2 = t3 = np.float32(0.0)
            for l in range(0, g, 4):
                t0 += X[i, g * j + l]
                t1 += X[i, g * j + l + 1]
                t2 += X[i, g * j + l + 2]
                t3 += X[i, g * j + l + 3]
            XS[i, j] = (t0 + t1) + (t2 + t3)
    return XS


@njit("UniTuple(float32, 2)(float32[::1], int64, int64)", nogil=True, cache=True)
def _lane_scales(sf, c, group):
    """Scales of lanes m < 4 and m >= 4 of 32-weight run ``c`` (lane m holds weights 4m..4m+3)."""
    if group == 32:
        return sf[c], sf[c]
    return sf[2 * c], sf[2 * c + 1]


@njit("float32(uint32, float32[:, ::1], uint64, int64)", nogil=True, cache=True)
def _word_dot(v, X, i, j):
    """sum_k (byte k of v) * X[i, j + 8k]: one word against a token row in word order.

    Returns a scalar: helpers used in the vectorized loops never return tuples, whose struct
    values stop LLVM from vectorizing once several tokens are involved.
    """
    t = np.float32(bits(v, 0, 8)) * X[i, j]
    t = fmaf(np.float32(bits(v, 8, 8)), X[i, j + 8], t)
    t = fmaf(np.float32(bits(v, 16, 8)), X[i, j + 16], t)
    return fmaf(np.float32(bits(v, 24, 8)), X[i, j + 24], t)


@njit(nogil=True, inline="always", cache=True)
def _dot_two_runs(b, o, c, XP, rows, xo, sf, acc, group, values, ntok):
    """acc[16t + 8h + m] += lane scale * (word m of run c + h) . x_t for h = 0, 1 and tokens
    t < ntok (rows ``rows[t]`` of XP, in word order).

    The words are decoded once for all tokens. Two runs go to separate accumulators with
    constant indices, so that LLVM keeps acc in registers; the m loop is what LLVM vectorizes,
    8 words per instruction. The tokens are written out, not looped over, because the m loop
    must be the innermost loop for LLVM to vectorize it (``ntok`` is a literal, so the dead
    branches are pruned).
    """
    sa0, sb0 = _lane_scales(sf, c, group)
    sa1, sb1 = _lane_scales(sf, c + 1, group)
    for m in range(8):
        v0 = values(b, o, c, 4 * m, WORD)
        v1 = values(b, o, c + 1, 4 * m, WORD)
        j = xo + 32 * c + m
        s0 = sa0 if m < 4 else sb0
        s1 = sa1 if m < 4 else sb1
        acc[m] = fmaf(s0, _word_dot(v0, XP, rows[0], j), acc[m])
        acc[8 + m] = fmaf(s1, _word_dot(v1, XP, rows[0], j + 32), acc[8 + m])
        if ntok > 1:
            acc[16 + m] = fmaf(s0, _word_dot(v0, XP, rows[1], j), acc[16 + m])
            acc[24 + m] = fmaf(s1, _word_dot(v1, XP, rows[1], j + 32), acc[24 + m])
        if ntok > 2:
            acc[32 + m] = fmaf(s0, _word_dot(v0, XP, rows[2], j), acc[32 + m])
            acc[40 + m] = fmaf(s1, _word_dot(v1, XP, rows[2], j + 32), acc[40 + m])
        if ntok > 3:
            acc[48 + m] = fmaf(s0, _word_dot(v0, XP, rows[3], j), acc[48 + m])
            acc[56 + m] = fmaf(s1, _word_dot(v1, XP, rows[3], j + 32), acc[56 + m])


@njit(nogil=True, inline="always", cache=True)
def dot_rows(w, cols, XP, XS, out, r0, r1, block_bytes, group, scales, values, ntok):
    """out[t', r] = W[r, :] . X[t', :] for r in [r0, r1) and the first ``ntok`` tokens (a
    literal, at most 4; t' = min(t, n - 1), so fewer tokens repeat the last one). Each block
    is decoded once for all of them.

    XP: X in word order (:func:`permute32`), XS: its sub-block sums (:func:`group_sums`).
    A type wraps this in a compiled function of its own, which matmul_blocks calls with the
    token groups' slices: with XP arriving as an argument, LLVM knows it cannot alias the
    stack accumulators; computed in the same function (a fresh allocation), it would want
    runtime alias checks, which it does not do for loops as short as 8 iterations.
    """
    n = XP.shape[0]
    nb = cols // QK_K
    ng = QK_K // group
    row_bytes = nb * block_bytes
    sf = stack_array(16, np.float32)
    mf = stack_array(16, np.float32)
    acc = stack_array(64, np.float32)  # 16 lanes per token
    macc = stack_array(32, np.float32)  # 8 lanes per token, for the mf terms
    # Token rows fixed before the loops, unsigned: a signed index gets numba's negative-index
    # wraparound, which inside the vectorized loop would stop LLVM from vectorizing it.
    rows = (np.uint64(0), np.uint64(min(1, n - 1)), np.uint64(min(2, n - 1)), np.uint64(min(3, n - 1)))
    for r in range(r0, r1):
        # A per-row view indexed with offsets built from loop counters only, which LLVM can
        # prove non-negative (same reason).
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
                    fma_f32x8(macc[8 * t:8 * t + 8], mf, 8 * h, XS[rows[t]], ng * b + 8 * h)
            # literal run numbers: the bit positions inside the words become constants
            _dot_two_runs(wr, o, 0, XP, rows, QK_K * b, sf, acc, group, values, ntok)
            _dot_two_runs(wr, o, 2, XP, rows, QK_K * b, sf, acc, group, values, ntok)
            _dot_two_runs(wr, o, 4, XP, rows, QK_K * b, sf, acc, group, values, ntok)
            _dot_two_runs(wr, o, 6, XP, rows, QK_K * b, sf, acc, group, values, ntok)
        for t in range(ntok):
            total = np.float32(0.0)
            for l in range(16):
                total += acc[16 * t + l]
            for l in range(8):
                total += macc[8 * t + l]
            out[rows[t], r] = total


@njit(nogil=True, inline="always", cache=True)
def matvec_blocks(w, cols, x, out, r0, r1, group, rows_kernel):
    """out[r] = W[r, :] . x for r in [r0, r1), with the type's :func:`dot_rows` wrapper."""
    X = x.reshape((1, cols))
    rows_kernel(w, cols, permute32(X), group_sums(X, group), out.reshape((1, out.shape[0])), r0, r1, 1)


@njit(nogil=True, inline="always", cache=True)
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
                q = np.float32(values(b, o, c, 16 * h + i, BYTE))
                y[32 * c + 16 * h + i] = sf[s] * q + mf[s]


@njit(nogil=True, inline="always", cache=True)
def matmul_blocks(w, cols, X, out, r0, r1, block_bytes, group, scales, values, rows_kernel):
    """out[i, r] = W[r, :] . X[i, :] for every token i and r in [r0, r1).

    Fewer than GEMM_MIN_TOKENS tokens (speculative verification): ``rows_kernel`` (the type's
    :func:`dot_rows`) one token at a time over tiles of RT rows, exactly as matvec computes
    each token. More: dequantize tiles once for all tokens and run the register-blocked
    float32 kernel.
    """
    n = X.shape[0]
    if r1 <= r0 or n == 0:
        return
    if n < GEMM_MIN_TOKENS:
        XP = permute32(X)
        XS = group_sums(X, group)
        # Tiles of rows, each token through the one-token kernel matvec uses: its sums equal
        # matvec's bit for bit (the 4-token variant was rounded differently by LLVM), and a
        # tile's weights stay in cache across the tokens.
        for t0 in range(r0, r1, RT):
            t1 = min(r1, t0 + RT)
            for i in range(n):
                rows_kernel(w, cols, XP[i:], XS[i:], out[i:], t0, t1, 1)
        return
    tile = np.empty((RT, cols), np.float32)
    flat = tile.reshape(RT * cols)
    for t0 in range(r0, r1, RT):
        nr = min(RT, r1 - t0)
        dequantize_blocks_rows(w, cols, t0, t0 + nr, tile, block_bytes, group, scales, values)
        gemm_tile(flat, nr, cols, X, out, t0)  # the legacy types' register-blocked FMA kernel


@njit(nogil=True, inline="always", cache=True)
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
