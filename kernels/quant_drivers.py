"""Row-range drivers of the legacy-quant and float kernels, generic over the weight format.

A block format is described to the drivers by inline njit functions:

* ``block(w, o) -> (q: i8x32, d: float32, m: float32)`` decodes the 32-weight block at byte
  offset ``o``: weight j is ``d * q[j] + m`` (Q4_0 has m = -8 d, Q5_0 m = -16 d, Q8_0 m = 0);
* ``decode_row(w, o, cols, dst, d0)`` writes the float32 weights of the row at byte offset
  ``o`` to ``dst[d0:d0+cols]`` (``dst`` flat-indexed); :func:`decode_blocks` builds it from
  ``block``, and the float formats have their own;

plus a ``dot``: :func:`dot_unsigned` for unsigned quants, :func:`dot_signed` for Q8_0.

Numerics. Products of the block formats (``matvec_blocks``, ``matmul_blocks`` for any number
of tokens) follow llama.cpp bit for bit: activations are quantized to int8 per 32-block
(``quantize_block_q8``, bit-identical to ``quantize_row_q8_0/1``), each block's dot product is
exact integer arithmetic in 8 lanes of 4 products, and sum_b (d_w,b * d_x,b) * isum_b is
accumulated by lane FMAs and summed as ``hsum_float_8``, plus sum_b m_b * s_b by scalar FMAs
(Q4_1/Q5_1; s_b is Q8_1's float16 block sum) -- ``ggml_vec_dot_q4_1_q8_1`` and friends. The
cost is the activation rounding, |error| <= sum_k |W_k| * 0.6 d_x,b(k), the same as llama.cpp's.
Each (row, token) sum runs the same operations in the same order however many tokens a call
evaluates (``_rows2_tok1``, ``_row_tok4``, ``_row_tok2``): a multi-token kernel only shares a
weight block's decoding among its tokens and does their per-block scale products and m * s
terms in the lanes of one vector instruction, each lane rounded as the scalar operation is.
So prompt evaluation, speculative verification and one-token decoding agree bit for bit
(tests/test_kernels_legacy.py, tests/test_speculative.py)
-- and with llama.cpp, which evaluates prompts of these formats with the same per-token dot
product (tests/test_vs_llamacpp.py).

The float formats (F32/F16/BF16, and the K-quant and affine prefill paths) decode a tile of rows
to float32 once and run a register-blocked FMA kernel (``MR`` rows x ``NT`` tokens) over it.

Compilation notes:

* No ``fastmath``: all the arithmetic that matters is explicit (``quant_simd`` intrinsics,
  strict scalar ops), so a kernel rounds identically wherever LLVM inlines it; with fast-math
  flags the final ``hsum + bias`` got re-associated differently inside the dispatcher.
* Every function taking ``block``/``decode_row``/``dot`` is ``inline="always"``: a function
  value passed to an out-of-line call is a pointer to the Python dispatcher object, which
  numba will not cache. After inlining, the calls are static and the pointer is dead code.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .quant_simd import (
    dot_s8s8,
    dot_u8s8,
    load_i8x32,
    prefetch,
    quantize_block_q8,
    sfma,
    sload,
    vbroadcast4,
    vfirst4,
    vfma,
    vhsum,
    vload,
    vmul,
    vsplat,
    vstore_dequant,
    vzero,
)

QK = 32  # weights per block
MR = 3  # rows per register block of the float kernel
NT = 4  # tokens per register block: MR * NT = 12 accumulators + 3 weight + 1 activation ymm
PREFETCH_BYTES = 2048  # software prefetch distance in a weight row: decode streams weights from DRAM
TILE_ROWS = 24  # rows decoded per tile, a multiple of MR (24 x 1536 floats = 144 KiB, in L2)


# ---------------------------------------------------------------------------------------------
# int8-activation path

# The dot intrinsics wrapped as njit functions: the drivers take them as arguments, and an
# intrinsic cannot be a cached function's argument type.


@njit(nogil=True, inline="always", cache=True)
def dot_unsigned(q, y):
    """``quant_simd.dot_u8s8``: quants 0..127 times signed activations."""
    return dot_u8s8(q, y)


@njit(nogil=True, inline="always", cache=True)
def dot_signed(q, y):
    """``quant_simd.dot_s8s8``: signed quants times signed activations."""
    return dot_s8s8(q, y)


@njit(nogil=True, inline="always", cache=True)
def _check_blocks(cols):
    if cols % QK != 0:
        raise ValueError("a row of a block format must hold a whole number of 32-weight blocks")


@njit(nogil=True, cache=True)
def quantize_activations(X, n, cols, xq, dx, xs):
    """Quantize ``n`` rows of ``cols`` floats (flat-indexed ``X``) to int8 ``xq`` (n * cols)
    with per-block scales ``dx`` and sums ``xs`` (n * cols / 32 each), as llama.cpp's
    ``quantize_row_q8_1``: xs = float16(d * sum(block quants)), d before its float16 rounding."""
    nb = cols // QK
    for t in range(n):
        for b in range(nb):
            i = t * cols + b * QK
            d, _, s = quantize_block_q8(X, i, xq, i)
            dx[t * nb + b] = d
            xs[t * nb + b] = s


@njit(nogil=True, inline="always", cache=True)
def _block_step(dot, qa, da, ma, qb, db, mb, xq, qo, d, s, acc0, acc1, bias0, bias1):
    """One 32-weight block of two rows times one token's quantized block (quants at xq[qo],
    scale d, Q8_1 sum s): the steps every (row, token) sum takes per block, in llama.cpp's
    order. The multi-token kernels take the same steps with the tokens' scale products and
    m * s terms in vector lanes, so their sums agree with these bit for bit."""
    y = load_i8x32(xq, qo)
    return (vfma(dot(qa, y), vsplat(da * d), acc0), vfma(dot(qb, y), vsplat(db * d), acc1),
            sfma(ma, s, bias0), sfma(mb, s, bias1))


@njit(nogil=True, inline="always", cache=True)
def _rows2_tok1(block, dot, bpb, w, o0, o1, nb, xq, q0, dx, xs, s0):
    """Rows at byte offsets o0, o1 times one quantized token (quants at xq[q0], scales at
    dx/xs[s0]). Two rows give two independent FMA chains, which hides the FMA latency."""
    acc0, acc1 = vzero(), vzero()
    bias0, bias1 = np.float32(0.0), np.float32(0.0)
    for b in range(nb):
        prefetch(w, o0 + b * bpb + PREFETCH_BYTES)
        prefetch(w, o1 + b * bpb + PREFETCH_BYTES)
        qa, da, ma = block(w, o0 + b * bpb)
        qb, db, mb = block(w, o1 + b * bpb)
        acc0, acc1, bias0, bias1 = _block_step(dot, qa, da, ma, qb, db, mb, xq, q0 + b * QK, dx[s0 + b],
                                               xs[s0 + b], acc0, acc1, bias0, bias1)
    return vhsum(acc0) + bias0, vhsum(acc1) + bias1


@njit(nogil=True, inline="always", cache=True)
def _row_tok4(block, dot, bpb, w, o, nb, xq, d4, s4, g, t0, t1, t2, t3):
    """One row times four tokens (t0..t3 of group g, repeats allowed): each block of the row is
    decoded once for all four. Every token's sum takes ``_block_step``'s steps, only the four
    tokens' scale products and Q8_1-sum terms share one vector instruction (lane j of
    d4/s4[(g * nb + b) * 4:] is token j's block-b scale/sum, as ``_group_scales`` lays them
    out) -- each lane rounds as the scalar operation does, so the results equal one-token
    decoding's bit for bit. (One row, not two: four accumulators already hide the FMA latency,
    and two rows' eight spill registers.)"""
    a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
    bias = vzero()  # lanes 0..3: the four tokens' m * s sums
    for b in range(nb):
        q, dw, m = block(w, o + b * bpb)
        k = (g * nb + b) * 4
        s0, s1, s2, s3 = vbroadcast4(vmul(vsplat(dw), vload(d4, k)))  # dw * d_j, splat
        a0 = vfma(dot(q, load_i8x32(xq, (t0 * nb + b) * QK)), s0, a0)
        a1 = vfma(dot(q, load_i8x32(xq, (t1 * nb + b) * QK)), s1, a1)
        a2 = vfma(dot(q, load_i8x32(xq, (t2 * nb + b) * QK)), s2, a2)
        a3 = vfma(dot(q, load_i8x32(xq, (t3 * nb + b) * QK)), s3, a3)
        bias = vfma(vsplat(m), vload(s4, k), bias)
    b0, b1, b2, b3 = vfirst4(bias)
    return vhsum(a0) + b0, vhsum(a1) + b1, vhsum(a2) + b2, vhsum(a3) + b3


@njit(nogil=True, inline="always", cache=True)
def _row_tok2(block, dot, bpb, w, o, nb, xq, d4, s4, g, t0, t1):
    """``_row_tok4`` for two tokens, lanes 0 and 1 of group g: a 2-token remainder (a 1-draft
    speculative verification) would otherwise pay for four tokens, or decode the row twice."""
    a0, a1 = vzero(), vzero()
    bias = vzero()
    for b in range(nb):
        q, dw, m = block(w, o + b * bpb)
        k = (g * nb + b) * 4
        s0, s1, _, _ = vbroadcast4(vmul(vsplat(dw), vload(d4, k)))
        a0 = vfma(dot(q, load_i8x32(xq, (t0 * nb + b) * QK)), s0, a0)
        a1 = vfma(dot(q, load_i8x32(xq, (t1 * nb + b) * QK)), s1, a1)
        bias = vfma(vsplat(m), vload(s4, k), bias)
    b0, b1, _, _ = vfirst4(bias)
    return vhsum(a0) + b0, vhsum(a1) + b1


@njit(nogil=True, inline="always", cache=True)
def _group_scales(n, nb, dx, xs, d4, s4):
    """d4/s4[(g * nb + b) * 4 + j] = dx/xs of token min(4g + j, n - 1), block b: the scales
    of a group of four tokens side by side (``_row_tok4``); 8 zeros pad the end, as the
    kernel loads eight lanes."""
    for g in range((n + 3) // 4):
        for j in range(4):
            t = min(4 * g + j, n - 1)
            for b in range(nb):
                d4[(g * nb + b) * 4 + j] = dx[t * nb + b]
                s4[(g * nb + b) * 4 + j] = xs[t * nb + b]
    for i in range((n + 3) // 4 * nb * 4, d4.shape[0]):
        d4[i] = 0.0
        s4[i] = 0.0


@njit(nogil=True, inline="always", cache=True)
def _rows_tok1(block, dot, bpb, w, nb, xq, q0, dx, xs, s0, out, r0, r1):
    """out[r] for r in [r0, r1), one token, two rows at a time (an odd last row is paired
    with itself: the same value is stored twice)."""
    rb = nb * bpb
    for r in range(r0, r1, 2):
        r2 = min(r + 1, r1 - 1)
        out[r], out[r2] = _rows2_tok1(block, dot, bpb, w, r * rb, r2 * rb, nb, xq, q0, dx, xs, s0)


@njit(nogil=True, inline="always", cache=True)
def matvec_blocks(block, dot, bpb, w, cols, x, out, r0, r1):
    """out[r] = W[r] . x for r in [r0, r1), int8-activation path (``bpb``: bytes per block)."""
    _check_blocks(cols)
    nb = cols // QK
    xq = np.empty(cols, np.int8)
    dx = np.empty(nb, np.float32)
    xs = np.empty(nb, np.float32)
    quantize_activations(x, 1, cols, xq, dx, xs)
    _rows_tok1(block, dot, bpb, w, nb, xq, 0, dx, xs, 0, out, r0, r1)


@njit(nogil=True, inline="always", cache=True)
def matmul_blocks(block, dot, bpb, w, cols, X, out, r0, r1):
    """out[t, r] = W[r] . X[t] for all tokens t and r in [r0, r1) (block formats), each equal to
    the token's own matvec bit for bit."""
    _check_blocks(cols)
    n = X.shape[0]
    nb = cols // QK
    xq = np.empty(n * cols, np.int8)
    dx = np.empty(n * nb, np.float32)
    xs = np.empty(n * nb, np.float32)
    quantize_activations(X, n, cols, xq, dx, xs)
    d4 = np.empty((n + 3) // 4 * nb * 4 + 8, np.float32)
    s4 = np.empty_like(d4)
    _group_scales(n, nb, dx, xs, d4, s4)
    rb = nb * bpb
    # Every (row, token) sum takes matvec's per-block steps (``_block_step``), four tokens per
    # pass over each row's blocks: every token's result equals its matvec bit for bit, so
    # prompt evaluation and speculative verification reproduce one-token decoding exactly (and
    # llama.cpp's, whose prompt evaluation of these formats is the same per-token dot product).
    # The row pair stays in L1 across the tokens: the weights are read from memory once.
    # A remainder of 3 tokens runs the 4-token kernel with a token repeated, one of 2 the
    # 2-token kernel, one of 1 matvec's.
    n4 = (n + 1) // 4 * 4
    for r in range(r0, r1, 2):
        r2 = min(r + 1, r1 - 1)
        o0, o1 = r * rb, r2 * rb
        for t in range(0, n4, 4):
            t1, t2, t3 = min(t + 1, n - 1), min(t + 2, n - 1), min(t + 3, n - 1)
            g = t // 4
            out[t, r], out[t1, r], out[t2, r], out[t3, r] = _row_tok4(
                block, dot, bpb, w, o0, nb, xq, d4, s4, g, t, t1, t2, t3)
            if r2 != r:
                out[t, r2], out[t1, r2], out[t2, r2], out[t3, r2] = _row_tok4(
                    block, dot, bpb, w, o1, nb, xq, d4, s4, g, t, t1, t2, t3)
        t = min(n4, n)
        if n - t == 2:
            out[t, r], out[t + 1, r] = _row_tok2(block, dot, bpb, w, o0, nb, xq, d4, s4, t // 4, t, t + 1)
            if r2 != r:
                out[t, r2], out[t + 1, r2] = _row_tok2(block, dot, bpb, w, o1, nb, xq, d4, s4, t // 4, t, t + 1)
            t = n
        while t < n:
            out[t, r], out[t, r2] = _rows2_tok1(block, dot, bpb, w, o0, o1, nb, xq, t * cols, dx, xs, t * nb)
            t += 1


# ---------------------------------------------------------------------------------------------
# float path: decoded tiles and a register-blocked FMA kernel


@njit(nogil=True, inline="always", cache=True)
def decode_blocks(block, bpb, w, o, cols, dst, d0):
    """dst[d0:d0+cols] = the row of blocks at byte offset ``o``, as float32."""
    _check_blocks(cols)
    for b in range(cols // QK):
        q, d, m = block(w, o + b * bpb)
        vstore_dequant(q, d, m, dst, d0 + b * QK)


@njit(nogil=True, inline="always", cache=True)
def _dot_tail(A, a, X, x, k0, cols):
    """Scalar sum of A[a+k] * X[x+k] for k in [k0, cols) (columns past the last multiple of 8)."""
    s = np.float32(0.0)
    for k in range(k0, cols):
        s = sfma(sload(A, a + k), sload(X, x + k), s)  # fixed order: the float matvec matches
    return s


@njit(nogil=True, inline="always", cache=True)
def _fma_3x4(A, a0, a1, a2, X, x0, x1, x2, x3, cols, out, r_0, r_1, r_2, t0, t1, t2, t3):
    """out[t_j, r_i] = A[a_i : a_i+cols] . X[x_j : x_j+cols] for 3 rows x 4 tokens, with all
    12 sums in registers (A, X flat; ``out`` 2-D (tokens, rows))."""
    c00, c01, c02, c03 = vzero(), vzero(), vzero(), vzero()
    c10, c11, c12, c13 = vzero(), vzero(), vzero(), vzero()
    c20, c21, c22, c23 = vzero(), vzero(), vzero(), vzero()
    kv = cols - cols % 8
    for k in range(0, kv, 8):
        w0 = vload(A, a0 + k)
        w1 = vload(A, a1 + k)
        w2 = vload(A, a2 + k)
        v = vload(X, x0 + k)
        c00, c10, c20 = vfma(w0, v, c00), vfma(w1, v, c10), vfma(w2, v, c20)
        v = vload(X, x1 + k)
        c01, c11, c21 = vfma(w0, v, c01), vfma(w1, v, c11), vfma(w2, v, c21)
        v = vload(X, x2 + k)
        c02, c12, c22 = vfma(w0, v, c02), vfma(w1, v, c12), vfma(w2, v, c22)
        v = vload(X, x3 + k)
        c03, c13, c23 = vfma(w0, v, c03), vfma(w1, v, c13), vfma(w2, v, c23)
    out[t0, r_0] = vhsum(c00) + _dot_tail(A, a0, X, x0, kv, cols)
    out[t1, r_0] = vhsum(c01) + _dot_tail(A, a0, X, x1, kv, cols)
    out[t2, r_0] = vhsum(c02) + _dot_tail(A, a0, X, x2, kv, cols)
    out[t3, r_0] = vhsum(c03) + _dot_tail(A, a0, X, x3, kv, cols)
    out[t0, r_1] = vhsum(c10) + _dot_tail(A, a1, X, x0, kv, cols)
    out[t1, r_1] = vhsum(c11) + _dot_tail(A, a1, X, x1, kv, cols)
    out[t2, r_1] = vhsum(c12) + _dot_tail(A, a1, X, x2, kv, cols)
    out[t3, r_1] = vhsum(c13) + _dot_tail(A, a1, X, x3, kv, cols)
    out[t0, r_2] = vhsum(c20) + _dot_tail(A, a2, X, x0, kv, cols)
    out[t1, r_2] = vhsum(c21) + _dot_tail(A, a2, X, x1, kv, cols)
    out[t2, r_2] = vhsum(c22) + _dot_tail(A, a2, X, x2, kv, cols)
    out[t3, r_2] = vhsum(c23) + _dot_tail(A, a2, X, x3, kv, cols)


@njit(nogil=True, cache=True)
def gemm_tile(tile, nr, cols, X, out, rt):
    """out[t, rt + i] = tile[i] . X[t] for the ``nr`` decoded rows of ``tile`` (flat, ``cols``
    floats each) and every token t, in MR x NT register blocks. Short groups at the edges
    repeat their last row/token (the duplicate result is stored to the same place).
    Format-independent, so it is compiled once for all weight types."""
    n = X.shape[0]
    for t in range(0, n, NT):
        t1, t2, t3 = min(t + 1, n - 1), min(t + 2, n - 1), min(t + 3, n - 1)
        for i in range(0, nr, MR):
            i1, i2 = min(i + 1, nr - 1), min(i + 2, nr - 1)
            _fma_3x4(tile, i * cols, i1 * cols, i2 * cols, X, t * cols, t1 * cols, t2 * cols, t3 * cols, cols,
                     out, rt + i, rt + i1, rt + i2, t, t1, t2, t3)


@njit(nogil=True, inline="always", cache=True)
def gemm_tiles(decode_row, row_bytes, w, cols, X, out, r0, r1):
    """out[t, r] = W[r] . X[t] for r in [r0, r1): decode ``TILE_ROWS`` rows at a time to
    float32 and sweep all tokens over each tile with :func:`gemm_tile`."""
    tile = np.empty(TILE_ROWS * cols, np.float32)
    for rt in range(r0, r1, TILE_ROWS):
        nr = min(TILE_ROWS, r1 - rt)
        for i in range(nr):
            decode_row(w, (rt + i) * row_bytes, cols, tile, i * cols)
        gemm_tile(tile, nr, cols, X, out, rt)


@njit(nogil=True, inline="always", cache=True)
def dequantize_with(decode_row, row_bytes, w, cols, r0, r1, out):
    """out[r - r0, :] = W[r] as float32 for r in [r0, r1) (``out`` C-contiguous 2-D)."""
    for r in range(r0, r1):
        decode_row(w, r * row_bytes, cols, out, (r - r0) * cols)
