"""Q4_K and Q6_K products with int8 activations, computed as llama.cpp computes them on AVX2.

llama.cpp multiplies K-quant weights by activations quantized to ``block_q8_K``: per 256
values one float32 scale ``d`` and int8 quants (``quantize_row_q8_K_ref``; :func:`quantize_q8k`
here, bit for bit), plus ``bsums``, the sums of each 16 quants. Each super-block's product is
exact integer arithmetic; what decides the last bits of the result is how the per-super-block
integers are turned into floats and summed, which these kernels copy:

* **Q4_K** weights are repacked 8 rows at a time on AVX2 (``repack.cpp``: ``q4_K_8x8_q8_K``),
  and a token is multiplied by ``ggml_gemv_q4_K_8x8_q8_K``. Per row and super-block it forms
  ``isum = sum_s sc[s] * (q4_s . q8_s)`` and ``imin = sum_s m[s] * bsum32[s]`` (s: the eight
  32-weight sub-blocks) and accumulates two float32 sums with FMAs,
  ``acc += float(isum) * (d * dy)`` and ``accm += float(imin) * (dmin * dy)``; the row's
  result is ``acc - accm``.
* **Q6_K** is not repacked on x86: ``ggml_vec_dot_q6_K_q8_K`` keeps 8 int32 lanes per
  super-block (lane k: the products of bytes 4k..4k+3 of each 32-weight run, times their
  scale, minus ``32 * (bsums[2k] sc[2k] + bsums[2k+1] sc[2k+1])``), FMAs them into 8 float
  lanes with ``dy * d`` and reduces the lanes once per row (``hsum_float_8``).

The integer work of a super-block is one intrinsic (:func:`isum_q4k`, :func:`lanes_q6k`),
``vpmaddubsw``/``vpmaddwd`` on AVX2 and generic LLVM vector code elsewhere; the float steps are
explicit fused multiply-adds, so a result does not depend on where LLVM inlines the code.
Every (row, token) product runs the same steps however many tokens a call has, so prompt
evaluation, speculative verification and one-token decoding agree bit for bit.

The other K-quants (Q5_K, Q3_K) and the float32-activation mode use the float kernels of
``quant_k``; so does anything whose row length is not a multiple of 256 (impossible for
these types).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .quant_simd import USE_AVX2, _V8F, _V32B, _I16, _I32, _call, _even_odd_sum, _ptr, _splat, _splat_const, _vec, \
    f32x8, load_f16, sfma, vfma, vhsum, vsplat, vzero
from .quant_k_simd import load_u32

QK_K = 256
Q4_K_BYTES = 144
Q6_K_BYTES = 210
_V16S = _vec(_I16, 16)
_V8I = _vec(_I32, 8)


# ---------------------------------------------------------------------------------------------
# activations: block_q8_K


@njit(nogil=True, cache=True)
def quantize_q8k(X, n, cols, xq, xd, xb):
    """Quantize ``n`` rows of ``cols`` floats (2-D ``X``) as llama.cpp's ``quantize_row_q8_K_ref``.

    Per 256-block: ``max`` is the first value of largest magnitude, ``iscale = -127 / max``,
    quants ``min(127, round_half_even(iscale * x))`` into ``xq`` (n * cols), ``d = 1 / iscale``
    into ``xd`` and the sums of each 16 quants into ``xb`` (int16, n * cols / 16). An all-zero
    block gets d = 0 and zero quants.
    """
    nb = cols // QK_K
    for t in range(n):
        for b in range(nb):
            c0 = b * QK_K
            q0 = t * cols + c0
            # largest magnitude (exact, any order), then the first value that has it: the
            # value ggml's strictly-greater scan keeps
            amax = np.float32(0.0)
            for j in range(QK_K):
                amax = max(amax, abs(X[t, c0 + j]))
            if amax == 0:
                xd[t * nb + b] = 0.0
                for j in range(QK_K):
                    xq[q0 + j] = 0
                for j in range(QK_K // 16):
                    xb[(t * nb + b) * 16 + j] = 0
                continue
            mx = np.float32(0.0)
            for j in range(QK_K):
                if abs(X[t, c0 + j]) == amax:
                    mx = X[t, c0 + j]
                    break
            iscale = np.float32(-127.0) / mx
            for j in range(QK_K):
                xq[q0 + j] = min(127, np.int32(np.rint(iscale * X[t, c0 + j])))
            for j in range(QK_K // 16):
                s = 0
                for i in range(16):
                    s += xq[q0 + 16 * j + i]
                xb[(t * nb + b) * 16 + j] = s
            xd[t * nb + b] = np.float32(1.0) / iscale


# ---------------------------------------------------------------------------------------------
# integer products of one super-block (LLVM IR)


def _maddubs(builder, u, s):
    """<16 x i16>: u[2i] * s[2i] + u[2i+1] * s[2i+1] (u unsigned, s signed bytes). No pair sum
    here reaches int16 saturation (|u| <= 63, |s| <= 127), so the generic form is the same."""
    if USE_AVX2:
        return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16S, [u, s])
    return _even_odd_sum(builder, builder.mul(builder.zext(u, _vec(_I16, 32)), builder.sext(s, _vec(_I16, 32))), 32,
                         None)


def _madd(builder, a, b):
    """<8 x i32>: a[2i] * b[2i] + a[2i+1] * b[2i+1] of two <16 x i16> (``vpmaddwd``)."""
    if USE_AVX2:
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I, [a, b])
    return _even_odd_sum(builder, builder.mul(builder.sext(a, _vec(_I32, 16)), builder.sext(b, _vec(_I32, 16))), 16,
                         None)


def _byte_i16(builder, packed, k):
    """Byte ``k`` of an i64 (unsigned) as i16."""
    v = builder.lshr(packed, ir.Constant(packed.type, 8 * k)) if k else packed
    return builder.zext(builder.trunc(v, ir.IntType(8)), _I16)


@intrinsic
def isum_q4k(typingctx, w, qs, xq, xo, sc):
    """sum_s sc[s] * (q4_s . q8_s) over the 8 sub-blocks of a Q4_K super-block: ``qs`` is the
    byte offset of its 128 quant bytes in ``w``, ``xq[xo:xo+256]`` the activation quants and
    ``sc`` its eight 6-bit scales, byte s = sub-block s (int32, exact)."""
    def codegen(context, builder, sig, args):
        w, qs, xq, xo, sc = args
        acc = ir.Constant(_V8I, None)
        for c in range(4):  # run c: sub-block 2c in the low nibbles, 2c + 1 in the high ones
            off = builder.add(qs, ir.Constant(qs.type, 32 * c))
            raw = builder.load(_ptr(context, builder, sig.args[0], w, off, _V32B), align=1)
            for h, q in enumerate((builder.and_(raw, _splat_const(ir.IntType(8), 32, 0x0F)),
                                   builder.lshr(raw, _splat_const(ir.IntType(8), 32, 4)))):
                yo = builder.add(xo, ir.Constant(xo.type, 64 * c + 32 * h))
                y = builder.load(_ptr(context, builder, sig.args[2], xq, yo, _V32B), align=1)
                s16 = _splat(builder, _byte_i16(builder, sc, 2 * c + h), 16)
                acc = builder.add(acc, _madd(builder, _maddubs(builder, q, y), s16))
        return _call(builder, "llvm.vector.reduce.add.v8i32", _I32, [acc])

    return types.int32(w, types.intp, xq, types.intp, types.uint64), codegen


@intrinsic
def lanes_q6k(typingctx, w, o, xq, xo, xb, bo):
    """The 8 int32 lanes of ``ggml_vec_dot_q6_K_q8_K`` for the Q6_K super-block at byte ``o`` of
    ``w`` and the activation block ``xq[xo:xo+256]`` with 16-sums ``xb[bo:bo+16]``, as float32
    (``_mm256_cvtepi32_ps``). Lane k: sum over the 8 runs of 32 weights of scale * (products of
    the run's bytes 4k..4k+3), minus 32 * (bsums[2k] sc[2k] + bsums[2k+1] sc[2k+1])."""
    def codegen(context, builder, sig, args):
        w, o, xq, xo, xb, bo = args
        i8 = ir.IntType(8)
        wty = sig.args[0]

        def wload(off):
            return builder.load(_ptr(context, builder, wty, w, builder.add(o, ir.Constant(o.type, off)), _V32B),
                                align=1)

        scales = builder.load(_ptr(context, builder, wty, w, builder.add(o, ir.Constant(o.type, 192)),
                                   _vec(i8, 16)), align=1)
        scales16 = builder.sext(scales, _V16S)
        sumi = ir.Constant(_V8I, None)
        for j in range(2):  # halves of 128 weights
            low1, low2, high = wload(64 * j), wload(64 * j + 32), wload(128 + 32 * j)

            def bits(v, mask, shift):
                m = builder.and_(v, _splat_const(i8, 32, mask))
                if shift > 0:
                    return builder.shl(m, _splat_const(i8, 32, shift))
                return builder.lshr(m, _splat_const(i8, 32, -shift)) if shift < 0 else m

            nib = _splat_const(i8, 32, 0x0F)
            q = (builder.or_(builder.and_(low1, nib), bits(high, 0x03, 4)),
                 builder.or_(builder.and_(low2, nib), bits(high, 0x0C, 2)),
                 builder.or_(builder.lshr(low1, _splat_const(i8, 32, 4)), bits(high, 0x30, 0)),
                 builder.or_(builder.lshr(low2, _splat_const(i8, 32, 4)), bits(high, 0xC0, -2)))
            for g in range(4):
                yo = builder.add(xo, ir.Constant(xo.type, 128 * j + 32 * g))
                y = builder.load(_ptr(context, builder, sig.args[2], xq, yo, _V32B), align=1)
                s = 8 * j + 2 * g  # 16-bit lanes 0-7 take scale s, lanes 8-15 scale s + 1
                sc = builder.shuffle_vector(scales16, scales16, ir.Constant(_vec(_I32, 16), [s] * 8 + [s + 1] * 8))
                sumi = builder.add(sumi, _madd(builder, _maddubs(builder, q[g], y), sc))
        bsums = builder.load(_ptr(context, builder, sig.args[4], xb, bo, _V16S), align=2)
        corr = builder.shl(_madd(builder, bsums, scales16), _splat_const(_I32, 8, 5))
        return builder.sitofp(builder.sub(sumi, corr), _V8F)

    return f32x8(w, types.intp, xq, types.intp, xb, types.intp), codegen


# ---------------------------------------------------------------------------------------------
# rows


@njit(nogil=True, inline="always", cache=True)
def _scales_mins_q4k(w, o):
    """The 8 scales and 8 mins (6 bits each) of the Q4_K block at byte ``o``, one per byte of
    two uint64 (ggml's ``get_scale_min_k4``, four at a time in 32-bit words)."""
    a0 = load_u32(w, o + 4)
    a1 = load_u32(w, o + 8)
    a2 = load_u32(w, o + 12)
    low6, low4, top2 = np.uint32(0x3F3F3F3F), np.uint32(0x0F0F0F0F), np.uint32(0x03030303)
    sc_hi = (a2 & low4) | (((a0 >> np.uint32(6)) & top2) << np.uint32(4))
    mn_hi = ((a2 >> np.uint32(4)) & low4) | (((a1 >> np.uint32(6)) & top2) << np.uint32(4))
    sc = np.uint64(a0 & low6) | (np.uint64(sc_hi) << np.uint64(32))
    mn = np.uint64(a1 & low6) | (np.uint64(mn_hi) << np.uint64(32))
    return sc, mn


@njit(nogil=True, inline="always", cache=True)
def _row_q4k(w, o, nb, xq, xo, xd, xb, bi):
    """One Q4_K row (byte offset ``o``, ``nb`` super-blocks) times one Q8_K token (quants at
    xq[xo], block scales/sums from block index ``bi``), as ``ggml_gemv_q4_K_8x8_q8_K``."""
    acc = np.float32(0.0)
    accm = np.float32(0.0)
    for b in range(nb):
        ob = o + b * Q4_K_BYTES
        sc, mn = _scales_mins_q4k(w, ob)
        isum = isum_q4k(w, ob + 16, xq, xo + b * QK_K, sc)
        imin = 0
        k = (bi + b) * 16
        for s in range(8):
            m = np.int64((mn >> np.uint64(8 * s)) & np.uint64(0xFF))
            imin += m * (np.int64(xb[k + 2 * s]) + np.int64(xb[k + 2 * s + 1]))
        dy = xd[bi + b]
        acc = sfma(np.float32(isum), load_f16(w, ob) * dy, acc)
        accm = sfma(np.float32(np.int32(imin)), load_f16(w, ob + 2) * dy, accm)
    return acc - accm


@njit(nogil=True, inline="always", cache=True)
def _row_q6k(w, o, nb, xq, xo, xd, xb, bi):
    """One Q6_K row times one Q8_K token, as ``ggml_vec_dot_q6_K_q8_K`` (arguments as
    :func:`_row_q4k`)."""
    acc = vzero()
    for b in range(nb):
        ob = o + b * Q6_K_BYTES
        d = xd[bi + b] * load_f16(w, ob + 208)
        acc = vfma(vsplat(d), lanes_q6k(w, ob, xq, xo + b * QK_K, xb, (bi + b) * 16), acc)
    return vhsum(acc)


@njit(nogil=True, inline="always", cache=True)
def _rows(row, bpb, w, cols, X, out, r0, r1):
    """out[t, r] = W[r] . X[t] for every token t and r in [r0, r1), each (row, token) through
    ``row`` (a row stays in L1 across the tokens)."""
    n = X.shape[0]
    nb = cols // QK_K
    xq = np.empty(n * cols, np.int8)
    xd = np.empty(n * nb, np.float32)
    xb = np.empty(n * nb * 16, np.int16)
    quantize_q8k(X, n, cols, xq, xd, xb)
    rb = nb * bpb
    for r in range(r0, r1):
        for t in range(n):
            out[t, r] = row(w, r * rb, nb, xq, t * cols, xd, xb, t * nb)


@njit(nogil=True, cache=True)
def matmul_q4_k8(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[t, r] = W[r] . X[t] (Q4_K rows, Q8_K activations), r in [r0, r1)."""
    _rows(_row_q4k, Q4_K_BYTES, w, cols, X, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_q6_k8(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[t, r] = W[r] . X[t] (Q6_K rows, Q8_K activations), r in [r0, r1)."""
    _rows(_row_q6k, Q6_K_BYTES, w, cols, X, out, r0, r1)


@njit(nogil=True, cache=True)
def matvec_q4_k8(w: np.ndarray, cols: int, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[r] = W[r] . x (Q4_K rows, Q8_K activations), r in [r0, r1)."""
    _rows(_row_q4k, Q4_K_BYTES, w, cols, x.reshape((1, cols)), out.reshape((1, out.shape[0])), r0, r1)


@njit(nogil=True, cache=True)
def matvec_q6_k8(w: np.ndarray, cols: int, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[r] = W[r] . x (Q6_K rows, Q8_K activations), r in [r0, r1)."""
    _rows(_row_q6k, Q6_K_BYTES, w, cols, x.reshape((1, cols)), out.reshape((1, out.shape[0])), r0, r1)
