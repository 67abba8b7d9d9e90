"""Kernels for affine INT4/INT3 group-quantized rows (MLX's layout; see ``runtime/affine.py``).

A row of ``cols`` weights is three pieces, each a C-contiguous uint8 view of the GGUF blob:

  ``w``  packed quants, ``cols * bits / 8`` bytes per row, a little-endian bitstream
         (bits=4: value j in bits 4*(j%8) of word j//8; bits=3: value j at bit 3*j);
  ``s``  f16 scales, ``b`` f16 biases: ``cols / G`` per row (G = group size, 32, 64 or 128),

with weight j = s[j // G] * q_j + b[j // G]. Every group is a whole number of 32-value blocks
(16 bytes at 4 bits, 12 bytes at 3 bits), so the kernels decode one 32-block at a time into an
``i8x32`` of quants in element order and work for any ``cols`` divisible by the group size --
not only multiples of 256, which is what llama.cpp's 3-bit K-quants need.

Numerics, like the legacy kernels (``quant_drivers``):

* matvec and batches of up to ``INT8_MAX_TOKENS`` tokens quantize the activations to int8 per
  32-block with llama.cpp's rounding (``quantize_block_q8``) and compute a group's dot product
  as ``s * sum(q * x) + b * sum(x)``: the first term from exact ``vpmaddubsw`` integer block
  dots (one FMA per block into a vector accumulator), the second from the group's sum of the
  *quantized* activations, computed once per token. Using the quantized sum (as llama.cpp's
  Q4_1 does) makes the result W . x_q exactly, so the error is sum_k W_k (x_k - x_q,k) with
  |.| <= sum_k |W_k| 0.6 d_x; the exact float sum would weight the rounding errors by
  |W_k - b| instead, which is several times larger since b sits at the group's edge.
  Every (row, token) sum is formed in the same order, so a small batch equals per-token matvecs.
* larger batches decode ``TILE_ROWS`` rows to float32 (``s * q + b``, rounded exactly as the
  NumPy reference) and reuse the register-blocked FMA tile kernel ``quant_drivers.gemm_tile``.

Kernel contract (rows [r0, r1); ``gs`` the group size)::

    matvec_affine{4,3}(w, s, b, cols, gs, x, out, r0, r1)         out[r] = W[r] . x
    matmul_affine{4,3}(w, s, b, cols, gs, X, out, r0, r1)         out[i, r] = W[r] . X[i]
    matmul_float_affine{4,3}(...)                                 the same, float32 activations
    dequantize_rows_affine{4,3}(w, s, b, cols, gs, r0, r1, out)   out[r - r0] = W[r]

No fastmath, for the reasons given in ``quant_drivers``.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .quant_drivers import PREFETCH_BYTES, TILE_ROWS, gemm_tile
from .quant_simd import (
    _I8, _I16, _V32B, _bytes_as, _lanes, _ptr, _splat, _splat_const, _vec,
    dot_u8s8, i8x32, load_f16, load_i8x32, prefetch, quantize_block_q8, sfma, vfma, vhsum, vsplat,
    vzero,
)

QK = 32
INT8_MAX_TOKENS = 8  # larger batches take the float tile path (crossover measured by microbench)
A4_BLOCK_BYTES, A3_BLOCK_BYTES = 16, 12  # bytes of 32 packed quants


# ---------------------------------------------------------------------------------------------
# block decoders: 32 packed quants -> i8x32 in element order


@intrinsic
def unpack4(typingctx, w, off):
    """The 32 4-bit quants in the 16 bytes at ``off``: byte k holds q_2k (low) and q_2k+1 (high)."""
    def codegen(context, builder, sig, args):
        b = _bytes_as(builder, context, sig.args[0], args[0], args[1], _I8, 16)
        lo = builder.and_(b, _splat_const(_I8, 16, 0x0F))
        hi = builder.lshr(b, _splat_const(_I8, 16, 4))
        return builder.shuffle_vector(lo, hi, _lanes([k // 2 + 16 * (k % 2) for k in range(32)]))

    return i8x32(w, types.intp), codegen


@intrinsic
def unpack3(typingctx, w, off):
    """The 32 3-bit quants in the 12 bytes at ``off`` (q_j at stream bit 3j).

    q_j lies in the 16-bit window starting at byte 3j // 8: gather each window's two bytes into
    i16 lanes with one byte shuffle, move bit 3j % 8 up to bit 7 by a per-lane constant multiply (one ``vpmullw``;
    x86 has no per-lane 16-bit shift), then shift all lanes right by 7 and mask."""
    def codegen(context, builder, sig, args):
        b = _bytes_as(builder, context, sig.args[0], args[0], args[1], _I8, 12)
        zero = ir.Constant(_vec(_I8, 12), None)
        # little-endian i16 window j = bytes (3j // 8, 3j // 8 + 1); index 12 is a zero byte
        idx = [(3 * j) // 8 + k for j in range(32) for k in (0, 1)]
        v16 = _vec(_I16, 32)
        win = builder.bitcast(builder.shuffle_vector(b, zero, _lanes(idx)), v16)
        up = builder.mul(win, ir.Constant(v16, [1 << (7 - (3 * j) % 8) for j in range(32)]))
        q = builder.and_(builder.lshr(up, _splat_const(_I16, 32, 7)), _splat_const(_I16, 32, 7))
        return builder.trunc(q, _V32B)

    return i8x32(w, types.intp), codegen


@intrinsic
def vstore_affine(typingctx, q, d, m, out, i):
    """out[i:i+32] = d * q + m, rounded twice (multiply, then add) like the NumPy reference."""
    def codegen(context, builder, sig, args):
        q, d, m, out, i = args
        v32f = _vec(ir.FloatType(), 32)
        v = builder.fmul(builder.uitofp(q, v32f), _splat(builder, d, 32))
        v = builder.fadd(v, _splat(builder, m, 32))
        builder.store(v, _ptr(context, builder, sig.args[3], out, i, v32f), align=4)
        return context.get_dummy_value()

    return types.void(i8x32, types.float32, types.float32, out, types.intp), codegen


@njit(nogil=True, inline="always", cache=True)
def _block4(w, o):
    return unpack4(w, o)


@njit(nogil=True, inline="always", cache=True)
def _block3(w, o):
    return unpack3(w, o)


# ---------------------------------------------------------------------------------------------
# int8-activation path


@njit(nogil=True, inline="always", cache=True)
def _check(cols, gs):
    if gs % QK != 0 or gs <= 0 or cols % gs != 0:
        raise ValueError("affine rows need a group size that is a multiple of 32 and divides the row")


@njit(nogil=True, cache=True)
def quantize_activations_affine(X, n, cols, gs, xq, dx, xg):
    """Rows of ``X`` (flat) to int8 ``xq`` with per-32-block scales ``dx`` (llama.cpp's
    ``quantize_row_q8_0``) and each group's sum of the *quantized* activations ``xg``
    (sum of d * sum(quants) over its blocks)."""
    nb, ng, bpg = cols // QK, cols // gs, gs // QK
    for t in range(n):
        for g in range(ng):
            acc = np.float32(0.0)
            for k in range(bpg):
                b = g * bpg + k
                i = t * cols + b * QK
                d, qsum, _ = quantize_block_q8(X, i, xq, i)
                dx[t * nb + b] = d
                acc = sfma(d, qsum, acc)  # explicit: whether `acc + d * qsum` fuses must not vary
            xg[t * ng + g] = acc


@njit(nogil=True, inline="always", cache=True)
def _rows2(block, bpb, w, s, b, r_a, r_b, ng, bpg, xq, q0, dx, d0, xg, g0):
    """W[r_a] . x and W[r_b] . x for one quantized token (quants at xq[q0], block scales at
    dx[d0], group sums at xg[g0]); two rows give two independent FMA chains."""
    rb = ng * bpg * bpb
    oa, ob = r_a * rb, r_b * rb
    sa0, sb0 = r_a * ng * 2, r_b * ng * 2
    acc_a = vzero()
    acc_b = vzero()
    bias_a = np.float32(0.0)
    bias_b = np.float32(0.0)
    for g in range(ng):
        sa = load_f16(s, sa0 + 2 * g)
        sb = load_f16(s, sb0 + 2 * g)
        for k in range(bpg):
            blk = g * bpg + k
            prefetch(w, oa + blk * bpb + PREFETCH_BYTES)
            prefetch(w, ob + blk * bpb + PREFETCH_BYTES)
            y = load_i8x32(xq, q0 + blk * QK)
            dxb = dx[d0 + blk]
            acc_a = vfma(dot_u8s8(block(w, oa + blk * bpb), y), vsplat(sa * dxb), acc_a)
            acc_b = vfma(dot_u8s8(block(w, ob + blk * bpb), y), vsplat(sb * dxb), acc_b)
        bias_a = sfma(load_f16(b, sa0 + 2 * g), xg[g0 + g], bias_a)
        bias_b = sfma(load_f16(b, sb0 + 2 * g), xg[g0 + g], bias_b)
    return vhsum(acc_a) + bias_a, vhsum(acc_b) + bias_b


@njit(nogil=True, inline="always", cache=True)
def _rows_tok1(block, bpb, w, s, b, cols, gs, xq, t, dx, xg, out, r0, r1):
    """out[r] = W[r] . X[t] for r in [r0, r1), two rows at a time (an odd last row is paired
    with itself and stored twice)."""
    ng, bpg = cols // gs, gs // QK
    for r in range(r0, r1, 2):
        r2 = min(r + 1, r1 - 1)
        out[r], out[r2] = _rows2(block, bpb, w, s, b, r, r2, ng, bpg, xq, t * cols, dx, t * (cols // QK), xg, t * ng)


@njit(nogil=True, inline="always", cache=True)
def _matmul_int8(block, bpb, w, s, b, cols, gs, X, n, out, r0, r1):
    """out[t, r] for the first ``n`` rows of X (flat-indexed), int8-activation path."""
    xq = np.empty(n * cols, np.int8)
    dx = np.empty(n * (cols // QK), np.float32)
    xg = np.empty(n * (cols // gs), np.float32)
    quantize_activations_affine(X, n, cols, gs, xq, dx, xg)
    for t in range(n):
        _rows_tok1(block, bpb, w, s, b, cols, gs, xq, t, dx, xg, out[t], r0, r1)


# ---------------------------------------------------------------------------------------------
# float path


@njit(nogil=True, inline="always", cache=True)
def _decode_row(block, bpb, w, s, b, r, cols, gs, dst, d0):
    """dst[d0:d0+cols] = W[r] as float32."""
    ng, bpg = cols // gs, gs // QK
    o, so = r * ng * bpg * bpb, r * ng * 2
    for g in range(ng):
        sc = load_f16(s, so + 2 * g)
        bi = load_f16(b, so + 2 * g)
        for k in range(bpg):
            blk = g * bpg + k
            vstore_affine(block(w, o + blk * bpb), sc, bi, dst, d0 + blk * QK)


@njit(nogil=True, inline="always", cache=True)
def _gemm_tiles(block, bpb, w, s, b, cols, gs, X, out, r0, r1):
    """out[t, r] = W[r] . X[t]: decode TILE_ROWS rows to float32, sweep all tokens over them."""
    tile = np.empty(TILE_ROWS * cols, np.float32)
    for rt in range(r0, r1, TILE_ROWS):
        nr = min(TILE_ROWS, r1 - rt)
        for i in range(nr):
            _decode_row(block, bpb, w, s, b, rt + i, cols, gs, tile, i * cols)
        gemm_tile(tile, nr, cols, X, out, rt)


@njit(nogil=True, inline="always", cache=True)
def _matmul(block, bpb, w, s, b, cols, gs, X, out, r0, r1):
    _check(cols, gs)
    n = X.shape[0]
    if n <= INT8_MAX_TOKENS:
        _matmul_int8(block, bpb, w, s, b, cols, gs, X, n, out, r0, r1)
    else:
        _gemm_tiles(block, bpb, w, s, b, cols, gs, X, out, r0, r1)


@njit(nogil=True, inline="always", cache=True)
def _matvec(block, bpb, w, s, b, cols, gs, x, out, r0, r1):
    _check(cols, gs)
    xq = np.empty(cols, np.int8)
    dx = np.empty(cols // QK, np.float32)
    xg = np.empty(cols // gs, np.float32)
    quantize_activations_affine(x, 1, cols, gs, xq, dx, xg)
    _rows_tok1(block, bpb, w, s, b, cols, gs, xq, 0, dx, xg, out, r0, r1)


@njit(nogil=True, inline="always", cache=True)
def _dequantize(block, bpb, w, s, b, cols, gs, r0, r1, out):
    _check(cols, gs)
    for r in range(r0, r1):
        _decode_row(block, bpb, w, s, b, r, cols, gs, out, (r - r0) * cols)


# ---------------------------------------------------------------------------------------------
# public kernels


@njit(nogil=True, cache=True)
def matvec_affine4(w, s, b, cols, gs, x, out, r0, r1):
    """out[r] = W[r] . x for r in [r0, r1) (4-bit affine rows, group size ``gs``)."""
    _matvec(_block4, A4_BLOCK_BYTES, w, s, b, cols, gs, x, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_affine4(w, s, b, cols, gs, X, out, r0, r1):
    """out[i, r] = W[r] . X[i] for every token i and r in [r0, r1) (4-bit affine)."""
    _matmul(_block4, A4_BLOCK_BYTES, w, s, b, cols, gs, X, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_float_affine4(w, s, b, cols, gs, X, out, r0, r1):
    """``matmul_affine4`` with float32 activations for any number of tokens (decoded tiles)."""
    _check(cols, gs)
    _gemm_tiles(_block4, A4_BLOCK_BYTES, w, s, b, cols, gs, X, out, r0, r1)


@njit(nogil=True, cache=True)
def dequantize_rows_affine4(w, s, b, cols, gs, r0, r1, out):
    """out[r - r0] = W[r] as float32 for r in [r0, r1) (4-bit affine)."""
    _dequantize(_block4, A4_BLOCK_BYTES, w, s, b, cols, gs, r0, r1, out)


@njit(nogil=True, cache=True)
def matvec_affine3(w, s, b, cols, gs, x, out, r0, r1):
    """out[r] = W[r] . x for r in [r0, r1) (3-bit affine rows, group size ``gs``)."""
    _matvec(_block3, A3_BLOCK_BYTES, w, s, b, cols, gs, x, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_affine3(w, s, b, cols, gs, X, out, r0, r1):
    """out[i, r] = W[r] . X[i] for every token i and r in [r0, r1) (3-bit affine)."""
    _matmul(_block3, A3_BLOCK_BYTES, w, s, b, cols, gs, X, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_float_affine3(w, s, b, cols, gs, X, out, r0, r1):
    """``matmul_affine3`` with float32 activations for any number of tokens (decoded tiles)."""
    _check(cols, gs)
    _gemm_tiles(_block3, A3_BLOCK_BYTES, w, s, b, cols, gs, X, out, r0, r1)


@njit(nogil=True, cache=True)
def dequantize_rows_affine3(w, s, b, cols, gs, r0, r1, out):
    """out[r - r0] = W[r] as float32 for r in [r0, r1) (3-bit affine)."""
    _dequantize(_block3, A3_BLOCK_BYTES, w, s, b, cols, gs, r0, r1, out)
