"""Vector reads of KV-cache rows for attention: 16-bit rows, 8-bit and 4-bit codes.

Attention touches every cached row of a head on every decode step, so these read a row where it
lies -- by flat offsets into the whole cache array, not through a view per row (numba
reference-counts views it cannot prove short-lived, which cost more than the arithmetic) -- and
convert 8 values at a time. The row reads ``axpy_f16``, ``dot_codes`` and ``axpy_value_row``
compute exactly what decoding the row to float32 first (``kvquant.load_row``/``load_key_codes``)
and then ``dot_f32``/``axpy_f32`` computes, bit for bit: the same products in the same lanes and
order. The 16-bit attention sums instead follow llama.cpp's order: ``dot_f16_ggml`` for q.k,
``reduce_value_parts`` for the per-slot partial sums of the value rows.

Offsets: ``ao``/``yo`` count float32 elements of C-contiguous arrays of any rank, ``ho``/``so``
count bytes of C-contiguous uint8 arrays.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .quant_simd import (_I8, _I32, _V8F, _bytes_as, _lanes, _splat_const, _vec, f32x8, load_f16, sfma, sload,
                         sstore, vfma, vhsum, vload, vload_f16, vsplat, vstore, vzero)
from .kvquant import KV_GROUP, Q4_GROUP_BYTES, Q8_GROUP_BYTES


def _widen(builder, b: object, signed: bool):
    """<8 x i8> -> f32x8, as signed or unsigned integers."""
    wide = builder.sext(b, _vec(_I32, 8)) if signed else builder.zext(b, _vec(_I32, 8))
    return builder.sitofp(wide, _V8F)


@intrinsic
def vload_u8(typingctx, b, off):
    """8 unsigned bytes at byte offset ``off`` of uint8 array ``b`` as f32x8."""
    def codegen(context, builder, sig, args):
        return _widen(builder, _bytes_as(builder, context, sig.args[0], args[0], args[1], _I8, 8), False)

    return f32x8(b, types.intp), codegen


@intrinsic
def vload_i8(typingctx, b, off):
    """8 signed bytes at byte offset ``off`` of uint8 array ``b`` as f32x8."""
    def codegen(context, builder, sig, args):
        return _widen(builder, _bytes_as(builder, context, sig.args[0], args[0], args[1], _I8, 8), True)

    return f32x8(b, types.intp), codegen


@intrinsic
def vload_nibbles(typingctx, b, off, high):
    """The low (``high`` false) or high nibbles of 8 bytes at byte offset ``off`` as f32x8."""
    def codegen(context, builder, sig, args):
        v = _bytes_as(builder, context, sig.args[0], args[0], args[1], _I8, 8)
        lo = builder.and_(v, _splat_const(_I8, 8, 0x0F))
        hi = builder.lshr(v, _splat_const(_I8, 8, 4))
        return _widen(builder, builder.select(args[2], hi, lo), False)

    return f32x8(b, types.intp, types.boolean), codegen


@intrinsic
def vhsum_hadd(typingctx, a):
    """Sum of the 8 lanes in the order of ggml's ``GGML_F32x8_REDUCE`` tail: t_l = a_l + a_{l+4},
    then two ``hadd``s, (t_0 + t_1) + (t_2 + t_3)."""
    def codegen(context, builder, sig, args):
        v = args[0]
        t = builder.fadd(builder.shuffle_vector(v, v, _lanes([0, 1, 2, 3])),
                         builder.shuffle_vector(v, v, _lanes([4, 5, 6, 7])))
        e = [builder.extract_element(t, ir.Constant(_I32, k)) for k in range(4)]
        return builder.fadd(builder.fadd(e[0], e[1]), builder.fadd(e[2], e[3]))

    return types.float32(f32x8), codegen


@intrinsic
def vadd(typingctx, a, b):
    """a + b, lane-wise."""
    return f32x8(f32x8, f32x8), lambda context, builder, sig, args: builder.fadd(args[0], args[1])


@njit(nogil=True, inline="always", cache=True)
def dot_f16_ggml(a, ao, h, ho, n):
    """sum_j a[ao + j] * half(h, ho + 2 j) for j < n in the order of ggml's ``ggml_vec_dot_f16``
    (AVX2): element j goes to lane j % 8 of accumulator (j // 8) % 4, the four are reduced as
    (0 + 2) + (1 + 3) and the lanes by ``vhsum_hadd``; the n % 32 tail is summed in float64.
    ``a`` holds float16 values (ggml converts the query to F16 before this product)."""
    n32 = n - n % 32
    c0, c1, c2, c3 = vzero(), vzero(), vzero(), vzero()
    for j in range(0, n32, 32):
        c0 = vfma(vload(a, ao + j), vload_f16(h, ho + 2 * j), c0)
        c1 = vfma(vload(a, ao + j + 8), vload_f16(h, ho + 2 * j + 16), c1)
        c2 = vfma(vload(a, ao + j + 16), vload_f16(h, ho + 2 * j + 32), c2)
        c3 = vfma(vload(a, ao + j + 24), vload_f16(h, ho + 2 * j + 48), c3)
    s = np.float64(vhsum_hadd(vadd(vadd(c0, c2), vadd(c1, c3))))
    for j in range(n32, n):
        s += np.float64(sload(a, ao + j) * load_f16(h, ho + 2 * j))
    return np.float32(s)


@njit(nogil=True, inline="always", cache=True)
def _value_lane(parts, o, n, lane):
    """Lane ``lane`` of the reduced accumulator, 8 value dimensions at once:
    (acc0 + acc2) + (acc1 + acc3), acc_k being part 8 k + lane."""
    o += lane * n
    return vadd(vadd(vload(parts, o), vload(parts, o + 16 * n)), vadd(vload(parts, o + 8 * n), vload(parts, o + 24 * n)))


@njit(nogil=True, inline="always", cache=True)
def reduce_value_parts(parts, po, y, yo, n):
    """y[yo + j] = the sum over p < 32 of parts[po + p n + j], for j < n (n % 8 == 0), in the
    order ``dot_f16_ggml`` reduces: part p plays lane p % 8 of accumulator p // 8."""
    for j in range(0, n, 8):
        t0 = vadd(_value_lane(parts, po + j, n, 0), _value_lane(parts, po + j, n, 4))
        t1 = vadd(_value_lane(parts, po + j, n, 1), _value_lane(parts, po + j, n, 5))
        t2 = vadd(_value_lane(parts, po + j, n, 2), _value_lane(parts, po + j, n, 6))
        t3 = vadd(_value_lane(parts, po + j, n, 3), _value_lane(parts, po + j, n, 7))
        vstore(vadd(vadd(t0, t1), vadd(t2, t3)), y, yo + j)


@njit(nogil=True, inline="always", cache=True)
def axpy_f16(p, h, ho, y, yo, n):
    """y[yo + j] = fma(p, half(h, ho + 2 j), y[yo + j]) for j < n."""
    n8 = n - n % 8
    pv = vsplat(p)
    for j in range(0, n8, 8):
        vstore(vfma(pv, vload_f16(h, ho + 2 * j), vload(y, yo + j)), y, yo + j)
    for j in range(n8, n):
        sstore(sfma(p, load_f16(h, ho + 2 * j), sload(y, yo + j)), y, yo + j)


@njit(nogil=True, inline="always", cache=True)
def dot_codes(a, ao, c, co, bits, n):
    """sum_j a[ao + j] * code_j of one token's key codes at byte ``co`` of ``c`` (n % 16 == 0):
    at 8 bits code_j is byte j; at 4 bits the low nibbles of the n/2 bytes are codes 0 .. n/2-1
    and their high nibbles codes n/2 .. n-1 (``kvquant.load_key_codes``)."""
    acc = vzero()
    if bits == 8:
        for j in range(0, n, 8):
            acc = vfma(vload(a, ao + j), vload_u8(c, co + j), acc)
    else:
        half = n // 2
        for j in range(0, half, 8):
            acc = vfma(vload(a, ao + j), vload_nibbles(c, co + j, False), acc)
        for j in range(0, half, 8):
            acc = vfma(vload(a, ao + half + j), vload_nibbles(c, co + j, True), acc)
    return vhsum(acc)


@njit(nogil=True, inline="always", cache=True)
def axpy_value_row(p, c, co, bits, y, yo, n):
    """y[yo + j] = fma(p, v_j, y[yo + j]) for the 8- or 4-bit value row at byte ``co`` of ``c``
    (groups of 32: d | int8[32], or d | m | 16 bytes of nibbles; ``kvquant.load_row``).

    v_j = d q_j (+ m) is formed with one FMA: d is a half and q has at most 8 bits, so d q is
    exact and the FMA rounds once, as load_row's separate multiply and add do."""
    pv = vsplat(p)
    if bits == 8:
        for g in range(n // KV_GROUP):
            o = co + g * Q8_GROUP_BYTES
            d, zero = vsplat(load_f16(c, o)), vzero()
            for l in range(0, KV_GROUP, 8):
                v = vfma(d, vload_i8(c, o + 2 + l), zero)
                j = yo + g * KV_GROUP + l
                vstore(vfma(pv, v, vload(y, j)), y, j)
        return
    half = KV_GROUP // 2
    for g in range(n // KV_GROUP):
        o = co + g * Q4_GROUP_BYTES
        d, m = vsplat(load_f16(c, o)), vsplat(load_f16(c, o + 2))
        for h in range(2):
            for l in range(0, half, 8):
                v = vfma(d, vload_nibbles(c, o + 4 + l, h == 1), m)
                j = yo + g * KV_GROUP + h * half + l
                vstore(vfma(pv, v, vload(y, j)), y, j)
