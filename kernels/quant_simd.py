"""Explicit SIMD building blocks for the legacy-quant kernels, written as LLVM vector IR.

Why not rely on numba's auto-vectorization: numba runs only LLVM's *loop* vectorizer (the
SLP vectorizer is off), and a per-block inner loop of 16 or 32 iterations is fully unrolled
before it runs, so LLVM vectorizes the *block* loop instead and gathers every byte with
``vpinsrb``. The fastest formulation (llama.cpp's: activations quantized to int8 per 32-block,
``vpmaddubsw``/``vpmaddwd`` integer dot products, one FMA per block into a vector accumulator
that is reduced once per row) cannot be expressed as a scalar loop at all. These intrinsics
expose two vector types to numba code and the few operations the kernels need; each call is
inlined IR, so a kernel's inner loop compiles to the same instruction sequence as hand-written
AVX2 (see ``tests/test_kernels_legacy.py::test_matvec_assembly_uses_avx2``).

Types:
  ``f32x8``  eight float32 lanes (``<8 x float>``, one ymm register);
  ``i8x32``  thirty-two int8 lanes (``<32 x i8>``), the 32 weights of one ggml block in
             element order.

Everything is generic LLVM IR except the integer dot products, which use the AVX2 intrinsics
when the host has AVX2 and an equivalent generic sequence otherwise (NEON etc.; LLVM does not
pattern-match the generic form back to ``vpmaddubsw``, hence the explicit choice).

Array arguments are addressed by a flat element index into their data pointer, so they must
be C-contiguous (the kernel contract); no bounds or negative-index checks are made.
"""
from __future__ import annotations

import platform

import llvmlite.binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.extending import intrinsic, models, register_model

_X86 = platform.machine().lower() in ("x86_64", "amd64")


def _host_has_avx2() -> bool:
    """True when numba compiles for this host (no ``NUMBA_CPU_NAME`` override) and it has AVX2."""
    if not _X86 or config.CPU_NAME not in (None, "host"):
        return False
    return bool(llvm_binding.get_host_cpu_features().get("avx2", False))


USE_AVX2: bool = _host_has_avx2()


class F32x8Type(types.Type):
    """numba type of an ``<8 x float>`` register value."""

    def __init__(self) -> None:
        super().__init__(name="f32x8")


class I8x32Type(types.Type):
    """numba type of a ``<32 x i8>`` register value."""

    def __init__(self) -> None:
        super().__init__(name="i8x32")


f32x8 = F32x8Type()
i8x32 = I8x32Type()

_F32 = ir.FloatType()
_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)


def _vec(elem: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(elem, n)


_V8F = _vec(_F32, 8)
_V32B = _vec(_I8, 32)


@register_model(F32x8Type)
class _F32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8F)


@register_model(I8x32Type)
class _I8x32Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V32B)


# ---------------------------------------------------------------------------------------------
# IR helpers (plain Python, run at compile time)


def _lanes(idx: list[int]) -> ir.Constant:
    """Shuffle mask constant."""
    return ir.Constant(_vec(_I32, len(idx)), idx)


def _splat_const(elem: ir.Type, n: int, value) -> ir.Constant:
    return ir.Constant(_vec(elem, n), [value] * n)


def _ptr(context, builder, aty, arr, idx, pointee: ir.Type):
    """Pointer to element ``idx`` (flat) of C-contiguous array ``arr``, cast to ``pointee*``."""
    data = context.make_array(aty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [idx], inbounds=True), pointee.as_pointer())


def _call(builder, name: str, ret: ir.Type, args: list) -> ir.Value:
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _splat(builder, scalar: ir.Value, n: int) -> ir.Value:
    v = builder.insert_element(ir.Constant(_vec(scalar.type, n), ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), _lanes([0] * n))


def _even_odd_sum(builder, v: ir.Value, n: int, widen: ir.Type | None) -> ir.Value:
    """out[i] = v[2i] + v[2i+1] (optionally sign-extended to ``widen`` first)."""
    ev = builder.shuffle_vector(v, v, _lanes(list(range(0, n, 2))))
    od = builder.shuffle_vector(v, v, _lanes(list(range(1, n, 2))))
    if widen is not None:
        ev, od = builder.sext(ev, _vec(widen, n // 2)), builder.sext(od, _vec(widen, n // 2))
    return builder.add(ev, od)


def _dot_u8s8_i32(builder, u: ir.Value, s: ir.Value) -> ir.Value:
    """<8 x i32>: sums of 4 consecutive products u[j] * s[j] (u unsigned, s signed bytes).

    Exact as long as each pair sum fits int16 (true for every use here: |u| <= 128,
    |s| <= 127), which is what ``vpmaddubsw`` requires.
    """
    if USE_AVX2:
        p16 = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), [u, s])
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), [p16, _splat_const(_I16, 16, 1)])
    prod = builder.mul(builder.zext(u, _vec(_I16, 32)), builder.sext(s, _vec(_I16, 32)))
    return _even_odd_sum(builder, _even_odd_sum(builder, prod, 32, None), 16, _I32)


def _hsum8(builder, v: ir.Value) -> ir.Value:
    """Fixed-order tree sum of 8 float lanes (same order everywhere: results are reproducible)."""
    s = builder.fadd(builder.shuffle_vector(v, v, _lanes([0, 1, 2, 3])),
                     builder.shuffle_vector(v, v, _lanes([4, 5, 6, 7])))
    s = builder.fadd(builder.shuffle_vector(s, s, _lanes([0, 1])), builder.shuffle_vector(s, s, _lanes([2, 3])))
    return builder.fadd(builder.extract_element(s, ir.Constant(_I32, 0)),
                        builder.extract_element(s, ir.Constant(_I32, 1)))


# ---------------------------------------------------------------------------------------------
# f32x8 arithmetic


@intrinsic
def vzero(typingctx):
    """f32x8 of zeros."""
    return f32x8(), lambda context, builder, sig, args: ir.Constant(_V8F, None)


@intrinsic
def vsplat(typingctx, s):
    """f32x8 with every lane = ``s`` (float32)."""
    return f32x8(types.float32), lambda context, builder, sig, args: _splat(builder, args[0], 8)


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c, fused, lane-wise."""
    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.fma.v8f32", _V8F, list(args))

    return f32x8(f32x8, f32x8, f32x8), codegen


@intrinsic
def vmul(typingctx, a, b):
    """a * b, lane-wise (each lane rounded as the scalar product is)."""
    return f32x8(f32x8, f32x8), lambda context, builder, sig, args: builder.fmul(args[0], args[1])


@intrinsic
def vbroadcast4(typingctx, a):
    """(splat(a[0]), .., splat(a[3])): four f32x8, each with every lane = one of a's first four."""
    def codegen(context, builder, sig, args):
        v = args[0]
        return context.make_tuple(builder, sig.return_type,
                                  [builder.shuffle_vector(v, v, _lanes([j] * 8)) for j in range(4)])

    return types.UniTuple(f32x8, 4)(f32x8), codegen


@intrinsic
def vfirst4(typingctx, a):
    """(a[0], a[1], a[2], a[3]) as float32 scalars."""
    def codegen(context, builder, sig, args):
        return context.make_tuple(builder, sig.return_type,
                                  [builder.extract_element(args[0], ir.Constant(_I32, j)) for j in range(4)])

    return types.UniTuple(types.float32, 4)(f32x8), codegen


@intrinsic
def vhsum(typingctx, a):
    """Sum of the 8 lanes as float32 (fixed association order)."""
    return types.float32(f32x8), lambda context, builder, sig, args: _hsum8(builder, args[0])


@intrinsic
def vmax(typingctx, a, b):
    """Lane-wise maximum (llvm.maxnum: exact, so any order of maxima gives the same result)."""
    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.maxnum.v8f32", _V8F, list(args))

    return f32x8(f32x8, f32x8), codegen


@intrinsic
def vhmax(typingctx, a):
    """Largest of the 8 lanes as float32."""
    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.vector.reduce.fmax.v8f32", _F32, [args[0]])

    return types.float32(f32x8), codegen


@intrinsic
def sfma(typingctx, a, b, c):
    """Scalar fused a * b + c on float32. Unlike ``a * b + c`` under fastmath, LLVM may not
    reassociate it, so every kernel accumulates in exactly the same order."""
    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.fma.f32", _F32, list(args))

    return types.float32(types.float32, types.float32, types.float32), codegen


# ---------------------------------------------------------------------------------------------
# loads and stores


@intrinsic
def sload(typingctx, arr, i):
    """Element ``i`` (flat index) of a C-contiguous float32 array of any dimension."""
    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _F32), align=4)

    return types.float32(arr, types.intp), codegen


@intrinsic
def prefetch(typingctx, arr, i):
    """Hint the cache line of element ``i`` (flat) of ``arr`` into L1 (never faults)."""
    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], _I8)
        _call(builder, "llvm.prefetch.p0", ir.VoidType(), [p, ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                                                           ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.void(arr, types.intp), codegen


@intrinsic
def sstore(typingctx, v, arr, i):
    """Element ``i`` (flat index) of a C-contiguous float32 array = v."""
    def codegen(context, builder, sig, args):
        builder.store(args[0], _ptr(context, builder, sig.args[1], args[1], args[2], _F32), align=4)
        return context.get_dummy_value()

    return types.void(types.float32, arr, types.intp), codegen


@intrinsic
def vload(typingctx, arr, i):
    """arr[i:i+8] of a float32 array as f32x8."""
    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _V8F), align=4)

    return f32x8(arr, types.intp), codegen


@intrinsic
def vstore(typingctx, v, arr, i):
    """arr[i:i+8] = v for a float32 array."""
    def codegen(context, builder, sig, args):
        builder.store(args[0], _ptr(context, builder, sig.args[1], args[1], args[2], _V8F), align=4)
        return context.get_dummy_value()

    return types.void(f32x8, arr, types.intp), codegen


def _bytes_as(builder, context, aty, arr, off, elem: ir.Type, n: int) -> ir.Value:
    """Load ``n`` values of IR type ``elem`` from a uint8 array at byte offset ``off``."""
    return builder.load(_ptr(context, builder, aty, arr, off, _vec(elem, n) if n > 1 else elem), align=1)


@intrinsic
def load_f16(typingctx, b, off):
    """The little-endian IEEE half at byte offset ``off`` of uint8 array ``b``, as float32."""
    def codegen(context, builder, sig, args):
        h = _bytes_as(builder, context, sig.args[0], args[0], args[1], ir.HalfType(), 1)
        return builder.fpext(h, _F32)

    return types.float32(b, types.intp), codegen


@intrinsic
def load_bf16(typingctx, b, off):
    """The little-endian bfloat16 at byte offset ``off`` of uint8 array ``b``, as float32."""
    def codegen(context, builder, sig, args):
        h = _bytes_as(builder, context, sig.args[0], args[0], args[1], _I16, 1)
        return builder.bitcast(builder.shl(builder.zext(h, _I32), ir.Constant(_I32, 16)), _F32)

    return types.float32(b, types.intp), codegen


@intrinsic
def load_f32(typingctx, b, off):
    """The little-endian float32 at byte offset ``off`` of uint8 array ``b``."""
    def codegen(context, builder, sig, args):
        return _bytes_as(builder, context, sig.args[0], args[0], args[1], _F32, 1)

    return types.float32(b, types.intp), codegen


@intrinsic
def vload_f16(typingctx, b, off):
    """8 little-endian halves at byte offset ``off`` of uint8 array ``b`` as f32x8 (vcvtph2ps)."""
    def codegen(context, builder, sig, args):
        return builder.fpext(_bytes_as(builder, context, sig.args[0], args[0], args[1], ir.HalfType(), 8), _V8F)

    return f32x8(b, types.intp), codegen


@intrinsic
def vload_bf16(typingctx, b, off):
    """8 little-endian bfloat16 at byte offset ``off`` of uint8 array ``b`` as f32x8."""
    def codegen(context, builder, sig, args):
        h = _bytes_as(builder, context, sig.args[0], args[0], args[1], _I16, 8)
        wide = builder.shl(builder.zext(h, _vec(_I32, 8)), _splat_const(_I32, 8, 16))
        return builder.bitcast(wide, _V8F)

    return f32x8(b, types.intp), codegen


@intrinsic
def vload_f32(typingctx, b, off):
    """8 little-endian float32 at byte offset ``off`` of uint8 array ``b`` as f32x8."""
    def codegen(context, builder, sig, args):
        return _bytes_as(builder, context, sig.args[0], args[0], args[1], _F32, 8)

    return f32x8(b, types.intp), codegen


# ---------------------------------------------------------------------------------------------
# i8x32: one block of 32 quants


@intrinsic
def load_i8x32(typingctx, arr, i):
    """arr[i:i+32] of an int8/uint8 array as i8x32 (Q8_0 weights, quantized activations)."""
    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _V32B), align=1)

    return i8x32(arr, types.intp), codegen


def _nibbles(builder, context, aty, arr, off) -> ir.Value:
    """ggml 4-bit packing: byte j holds element j (low nibble) and element 16 + j (high)."""
    b = _bytes_as(builder, context, aty, arr, off, _I8, 16)
    lo = builder.and_(b, _splat_const(_I8, 16, 0x0F))
    hi = builder.lshr(b, _splat_const(_I8, 16, 4))
    return builder.shuffle_vector(lo, hi, _lanes(list(range(32))))


@intrinsic
def nibbles(typingctx, b, off):
    """The 32 unsigned 4-bit quants (0..15) packed in 16 bytes at byte offset ``off``."""
    def codegen(context, builder, sig, args):
        return _nibbles(builder, context, sig.args[0], args[0], args[1])

    return i8x32(b, types.intp), codegen


@intrinsic
def nibbles_hbit(typingctx, b, qs_off, qh_off):
    """The 32 unsigned 5-bit quants (0..31) of Q5_0/Q5_1: nibbles at ``qs_off`` plus bit j of
    the little-endian uint32 at ``qh_off`` as bit 4 of element j."""
    def codegen(context, builder, sig, args):
        aty = sig.args[0]
        low = _nibbles(builder, context, aty, args[0], args[1])
        qh = _bytes_as(builder, context, aty, args[0], args[2], _I8, 4)
        # byte k of the result takes qh byte k // 8, then tests bit k % 8 of it
        spread = builder.shuffle_vector(qh, qh, _lanes([k // 8 for k in range(32)]))
        bit = builder.and_(spread, ir.Constant(_V32B, [1 << (k % 8) for k in range(32)]))
        is_set = builder.icmp_unsigned("!=", bit, ir.Constant(_V32B, None))
        high = builder.select(is_set, _splat_const(_I8, 32, 16), ir.Constant(_V32B, None))
        return builder.or_(low, high)

    return i8x32(b, types.intp, types.intp), codegen


@intrinsic
def sub_i8(typingctx, q, c):
    """q - c in each of the 32 int8 lanes (``c`` an integer: Q4_0/Q5_0's offset 8/16)."""
    def codegen(context, builder, sig, args):
        c8 = builder.trunc(args[1], _I8)
        return builder.sub(args[0], _splat(builder, c8, 32))

    return i8x32(i8x32, types.intp), codegen


@intrinsic
def dot_u8s8(typingctx, q, y):
    """Partial dot products of unsigned quants ``q`` (< 128) and signed ``y``: lane l is the
    float32 sum of q[j] * y[j] over j = 4l .. 4l+3 (exact integer arithmetic)."""
    def codegen(context, builder, sig, args):
        return builder.sitofp(_dot_u8s8_i32(builder, args[0], args[1]), _V8F)

    return f32x8(i8x32, i8x32), codegen


@intrinsic
def dot_s8s8(typingctx, q, y):
    """As ``dot_u8s8`` for signed ``q`` (Q8_0): |q| . (y * sign(q)), llama.cpp's trick for
    feeding a signed x signed product to the unsigned x signed instruction. ``y`` must not
    contain -128 (quantized activations are in [-127, 127])."""
    def codegen(context, builder, sig, args):
        q, y = args
        zero = ir.Constant(_V32B, None)
        absq = _call(builder, "llvm.abs.v32i8", _V32B, [q, ir.Constant(ir.IntType(1), 0)])
        if USE_AVX2:
            ys = _call(builder, "llvm.x86.avx2.psign.b", _V32B, [y, q])
        else:
            ys = builder.select(builder.icmp_signed("<", q, zero), builder.sub(zero, y), y)
        return builder.sitofp(_dot_u8s8_i32(builder, absq, ys), _V8F)

    return f32x8(i8x32, i8x32), codegen


@intrinsic
def vstore_dequant(typingctx, q, d, m, out, i):
    """out[i:i+32] = d * q + m (q read as signed bytes) for a float32 array ``out``."""
    def codegen(context, builder, sig, args):
        q, d, m, out, i = args
        v = builder.sitofp(q, _vec(_F32, 32))
        v = _call(builder, "llvm.fma.v32f32", _vec(_F32, 32), [v, _splat(builder, d, 32), _splat(builder, m, 32)])
        builder.store(v, _ptr(context, builder, sig.args[3], out, i, _vec(_F32, 32)), align=4)
        return context.get_dummy_value()

    return types.void(i8x32, types.float32, types.float32, out, types.intp), codegen


@intrinsic
def quantize_block_q8(typingctx, x, i, xq, j):
    """llama.cpp's activation quantization of one 32-block (``quantize_row_q8_0/1``):
    d = amax / 127, xq[j:j+32] = round-half-even(x[i:i+32] * 127 / amax) (0 if amax == 0).
    Returns (d rounded to float16 as the dot products use it, the sum of the 32 quants, and
    Q8_1's ``s``: float16(d * sum) with the *unrounded* d, as ``quantize_row_q8_1`` stores it)."""
    def codegen(context, builder, sig, args):
        x, i, xq, j = args
        v32f = _vec(_F32, 32)
        xv = builder.load(_ptr(context, builder, sig.args[0], x, i, v32f), align=4)
        amax = _call(builder, "llvm.vector.reduce.fmax.v32f32", _F32, [_call(builder, "llvm.fabs.v32f32", v32f, [xv])])
        nonzero = builder.fcmp_ordered("!=", amax, ir.Constant(_F32, 0.0))
        inv = builder.select(nonzero, builder.fdiv(ir.Constant(_F32, 127.0), amax), ir.Constant(_F32, 0.0))
        r = _call(builder, "llvm.roundeven.v32f32", v32f, [builder.fmul(xv, _splat(builder, inv, 32))])
        qi = builder.fptosi(r, _vec(_I32, 32))
        builder.store(builder.trunc(qi, _V32B), _ptr(context, builder, sig.args[2], xq, j, _V32B), align=1)
        d = builder.fdiv(amax, ir.Constant(_F32, 127.0))
        d16 = builder.fpext(builder.fptrunc(d, ir.HalfType()), _F32)
        qsum = builder.sitofp(_call(builder, "llvm.vector.reduce.add.v32i32", _I32, [qi]), _F32)
        s16 = builder.fpext(builder.fptrunc(builder.fmul(d, qsum), ir.HalfType()), _F32)
        return context.make_tuple(builder, sig.return_type, [d16, qsum, s16])

    return types.UniTuple(types.float32, 3)(x, types.intp, xq, types.intp), codegen


# ---------------------------------------------------------------------------------------------
# reproducible float reductions for the strict (non-fastmath) kernels


@njit(nogil=True, inline="always", cache=True)
def dot_f32(a, b, n):
    """sum_j a[j] * b[j] for j < n (1-D float32 views with unit stride).

    Eight lanes of fused multiply-adds and a fixed-order lane sum, then a scalar tail. A plain
    ``s += a[j] * b[j]`` vectorizes only under fastmath, and fastmath's reassociation depends
    on the code around it: a kernel compiled into its caller in this process and the same
    kernel loaded from numba's disk cache then sum differently. This one rounds the same way
    wherever it is compiled.
    """
    n8 = n - n % 8
    acc = vzero()
    for j in range(0, n8, 8):
        acc = vfma(vload(a, j), vload(b, j), acc)
    s = vhsum(acc)
    for j in range(n8, n):
        s = sfma(a[j], b[j], s)
    return s


@njit(nogil=True, inline="always", cache=True)
def axpy_f32(p, x, y, n):
    """y[j] = fma(p, x[j], y[j]) for j < n (1-D float32 views with unit stride)."""
    n8 = n - n % 8
    pv = vsplat(p)
    for j in range(0, n8, 8):
        vstore(vfma(pv, vload(x, j), vload(y, j)), y, j)
    for j in range(n8, n):
        y[j] = sfma(p, x[j], y[j])


@njit(nogil=True, inline="always", cache=True)
def max_f32(a, n, init):
    """max(init, a[0], ..., a[n-1]) for a 1-D float32 view without NaNs (exact in any order)."""
    n8 = n - n % 8
    acc = vsplat(init)
    for j in range(0, n8, 8):
        acc = vmax(vload(a, j), acc)
    m = vhmax(acc)
    for j in range(n8, n):
        m = max(m, a[j])
    return m
