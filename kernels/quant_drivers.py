"""Row-range drivers of the legacy-quant and float kernels, generic over the weight format.

A block format is described to the drivers by inline njit functions:

* ``block(w, o) -> (q: i8x32, d: float32, m: float32)`` decodes the 32-weight block at byte
  offset ``o``: weight j is ``d * q[j] + m`` (Q4_0 has m = -8 d, Q5_0 m = -16 d, Q8_0 m = 0);
* ``decode_row(w, o, cols, dst, d0)`` writes the float32 weights of the row at byte offset
  ``o`` to ``dst[d0:d0+cols]`` (``dst`` flat-indexed); :func:`decode_blocks` builds it from
  ``block``, and the float formats have their own;

plus a ``dot``: :func:`dot_unsigned` for unsigned quants, :func:`dot_signed` for Q8_0.

Numerics. Products with few activation vectors (``matvec_blocks``; ``matmul_blocks`` up to
``INT8_MAX_TOKENS`` tokens) follow llama.cpp: activations are quantized to int8 per 32-block
(``quantize_block_q8``, bit-identical to ``quantize_row_q8_0``), each block's dot product is
exact integer arithmetic, and sum_b (d_w,b * d_x,b) * isum_b + m_b * (d_x,b * sum(xq_b)) is
accumulated in float32. That runs ~2x faster than decoding the weights to float, at the cost of
the activation rounding: |error| <= sum_k |W_k| * 0.6 d_x,b(k). Each (row, token) sum is
formed by the same inlined function (``_rows2_tok1``, with the same pairing of rows), so a small
batched product equals the per-token matvecs bit for bit: speculative verification sees exactly
the logits of one-token decoding (tests/test_speculative.py checks it on every weight type).

Prefill-sized batches decode a tile of rows to float32 once and run a register-blocked FMA
kernel (``MR`` rows x ``NT`` tokens) over it: exact weights, float32 accumulation.

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
    vfma,
    vhsum,
    vload,
    vsplat,
    vstore_dequant,
    vzero,
)

QK = 32  # weights per block
INT8_MAX_TOKENS = 8  # larger batches take the float tile path (crossover measured by microbench)
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
    with per-block scales ``dx`` and ``xs = dx * sum(block quants)`` (n * cols / 32 each)."""
    nb = cols // QK
    for t in range(n):
        for b in range(nb):
            i = t * cols + b * QK
            d, qsum = quantize_block_q8(X, i, xq, i)
            dx[t * nb + b] = d
            xs[t * nb + b] = d * qsum


@njit(nogil=True, inline="always", cache=True)
def _rows2_tok1(block, dot, bpb, w, o0, o1, nb, xq, q0, dx, xs, s0):
    """Rows at byte offsets o0, o1 times one quantized token (quants at xq[q0], scales at
    dx/xs[s0]). Two rows give two independent FMA chains, which hides the FMA latency."""
    acc0 = vzero()
    acc1 = vzero()
    bias0 = np.float32(0.0)
    bias1 = np.float32(0.0)
    for b in range(nb):
        prefetch(w, o0 + b * bpb + PREFETCH_BYTES)
        prefetch(w, o1 + b * bpb + PREFETCH_BYTES)
        y = load_i8x32(xq, q0 + b * QK)
        qa, da, ma = block(w, o0 + b * bpb)
        qb, db, mb = block(w, o1 + b * bpb)
        acc0 = vfma(dot(qa, y), vsplat(da * dx[s0 + b]), acc0)
        acc1 = vfma(dot(qb, y), vsplat(db * dx[s0 + b]), acc1)
        bias0 = sfma(ma, xs[s0 + b], bias0)
        bias1 = sfma(mb, xs[s0 + b], bias1)
    return vhsum(acc0) + bias0, vhsum(acc1) + bias1


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
def _matmul_int8(block, dot, bpb, w, cols, X, out, r0, r1):
    """out[t, r] = W[r] . X[t] via the int8-activation path (few tokens)."""
    n = X.shape[0]
    nb = cols // QK
    xq = np.empty(n * cols, np.int8)
    dx = np.empty(n * nb, np.float32)
    xs = np.empty(n * nb, np.float32)
    quantize_activations(X, n, cols, xq, dx, xs)
    rb = nb * bpb
    # Each (row pair, token) goes through matvec's own ``_rows2_tok1`` with matvec's pairing of
    # rows: the same instructions in the same order, so every token's result equals its matvec
    # bit for bit -- speculative verification reproduces one-token decoding exactly. (A 4-token
    # kernel sharing the block decoding was ~1.1x faster, but LLVM contracted its float
    # operations differently, so its sums differed from matvec's in the last bit.) The two rows
    # stay in L1 across the tokens: the weights are read from memory once.
    for r in range(r0, r1, 2):
        r2 = min(r + 1, r1 - 1)
        for t in range(n):
            out[t, r], out[t, r2] = _rows2_tok1(block, dot, bpb, w, r * rb, r2 * rb, nb, xq, t * cols, dx, xs,
                                                t * nb)


@njit(nogil=True, inline="always", cache=True)
def matmul_blocks(block, decode_row, dot, bpb, w, cols, X, out, r0, r1):
    """out[t, r] = W[r] . X[t] for all tokens t and r in [r0, r1) (block formats)."""
    _check_blocks(cols)
    if X.shape[0] <= INT8_MAX_TOKENS:
        _matmul_int8(block, dot, bpb, w, cols, X, out, r0, r1)
    else:
        gemm_tiles(decode_row, (cols // QK) * bpb, w, cols, X, out, r0, r1)


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
