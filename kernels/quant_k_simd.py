"""LLVM-level building blocks of the K-quant kernels, for code shapes numba cannot express.

numba types every integer expression as int64 and has no vector types, so left alone LLVM
vectorizes bit unpacking in 64-bit lanes (4 weights per instruction plus shuffles) and keeps
small scratch arrays in heap memory. These intrinsics pin down the few operations that
decide the speed of the kernels:

* :func:`stack_array`: a fixed-size array in the function's stack frame. LLVM promotes it to
  registers when it is indexed with constants (after unrolling) or whole-vector, which is what
  makes 8-lane accumulators stay in ymm registers across a row.
* :func:`load_u32` / :func:`load_u64` / :func:`load_f16`: unaligned little-endian loads at a
  byte offset of a ``uint8`` array (ggml blocks are 110, 144, 176 or 210 bytes long, so words
  are not aligned). Consecutive ``load_u32`` in a vectorized loop become one vector load.
  :func:`load_u8` reads one byte into the same uint32 type, so that SWAR code written for
  4 bytes per word also works one byte at a time (:func:`load_bytes` picks either).
* :func:`bits`: ``(v >> shift) & mask`` in 32-bit arithmetic: vectorized, one ``vpsrld`` and
  one ``vpand`` per 8 words.
* :func:`u8x8_to_f32` / :func:`i8x8_to_f32`: eight packed bytes -> eight scaled floats in one
  go (the per-super-block scales); :func:`fma_f32x8`: an 8-lane multiply-add; :func:`fmaf`:
  a fused multiply-add that does not depend on fastmath.

Offsets and sizes are trusted (no bounds checks), like everything inside the kernels.
"""
from __future__ import annotations

from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_F8 = ir.VectorType(ir.FloatType(), 8)


@intrinsic
def _stack_ptr(typingctx, n, dtype):
    """Pointer to ``n`` (a compile-time constant) items of ``dtype`` in an entry-block alloca."""
    if not isinstance(n, types.IntegerLiteral) or not isinstance(dtype, types.NumberClass):
        return None
    size, nbty = n.literal_value, dtype.instance_type

    def codegen(context, builder, signature, args):
        irty = context.get_data_type(nbty)
        arr = cgutils.alloca_once(builder, ir.ArrayType(irty, size))
        return builder.bitcast(arr, irty.as_pointer())

    return types.CPointer(nbty)(n, dtype), codegen


@njit(nogil=True, inline="always", cache=True)
def stack_array(n, dtype):
    """Uninitialized ``dtype[n]`` on the stack; ``n`` must be a literal.

    ``inline="always"`` is what makes this correct: the alloca must belong to the caller's
    frame, not to a callee that returns (the array lives as long as the calling function).
    """
    return carray(_stack_ptr(n, dtype), (n,))


def _contiguous(t, dtype) -> bool:
    """Whether numba type ``t`` is a C-contiguous array of ``dtype`` (the only kind whose
    element addresses these intrinsics compute)."""
    return isinstance(t, types.Array) and t.dtype == dtype and t.layout == "C"


def _element_ptr(context, builder, arrty, arr, idx, irty):
    """``&arr[idx]`` (C-contiguous array, no wraparound or bounds check) cast to ``irty*``."""
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [idx], inbounds=True), irty.as_pointer())


def _byte_load(nbty, irty, convert=None):
    @intrinsic
    def load(typingctx, arr, off):
        if not (_contiguous(arr, types.uint8) and isinstance(off, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            off64 = context.cast(builder, args[1], signature.args[1], types.intp)
            v = builder.load(_element_ptr(context, builder, signature.args[0], args[0], off64, irty), align=1)
            return convert(builder, v) if convert else v

        return nbty(arr, off), codegen

    return load


load_u8 = _byte_load(types.uint32, _I8, lambda builder, v: builder.zext(v, _I32))
load_u32 = _byte_load(types.uint32, _I32)
load_u64 = _byte_load(types.uint64, ir.IntType(64))
# IEEE half -> float32 is exact; with F16C this is one vcvtph2ps.
load_f16 = _byte_load(types.float32, _I16,
                      lambda builder, v: builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType()))
load_u8.__doc__ = "The byte at ``off`` of a uint8 array, zero-extended to uint32 (no wraparound)."
load_u32.__doc__ = "The little-endian uint32 at byte ``off`` of a uint8 array."
load_u64.__doc__ = "The little-endian uint64 at byte ``off`` of a uint8 array."
load_f16.__doc__ = "The little-endian IEEE half at byte ``off`` of a uint8 array, as float32."


# Weight bytes are a read-only view of the memory-mapped model: the declared signatures (these
# kernels are passed as first-class functions, so they are compiled eagerly, at import) list only
# that type -- each listed type costs ~35 ms of every launch to load from numba's cache. A
# writable array (tests) converts to it: numba's mutable -> read-only array conversion is safe.
U8_ARRAYS = (types.Array(types.uint8, 1, "C", readonly=True),)


@njit([types.uint32(u8, types.int64, types.int64) for u8 in U8_ARRAYS], nogil=True, cache=True)
def load_bytes(b, off, width):
    """uint32 from ``width`` (4 or 1) bytes at ``b[off:]``: :func:`load_u32` or :func:`load_u8`."""
    if width == 4:
        return load_u32(b, off)
    return load_u8(b, off)


@intrinsic
def bits(typingctx, v, shift, width):
    """int32 ``(v >> shift) & (2**width - 1)`` of a uint32 ``v``, computed in 32 bits."""
    if v != types.uint32 or not isinstance(shift, types.Integer) or not isinstance(width, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        s = builder.trunc(args[1], _I32) if signature.args[1].bitwidth > 32 else args[1]
        wd = builder.trunc(args[2], _I32) if signature.args[2].bitwidth > 32 else args[2]
        mask = builder.sub(builder.shl(ir.Constant(_I32, 1), wd), ir.Constant(_I32, 1))
        return builder.and_(builder.lshr(args[0], s), mask)

    return types.int32(v, shift, width), codegen


def _splat(builder, x):
    u = builder.insert_element(ir.Constant(_F8, ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(u, u, ir.Constant(ir.VectorType(_I32, 8), [0] * 8))


def _bytes_to_f32x8(signed):
    @intrinsic
    def convert(typingctx, v, bias, scale, dst, pos):
        if v != types.uint64 or not _contiguous(dst, types.float32):
            return None
        sig = types.void(types.uint64, types.float32, types.float32, dst, types.intp)

        def codegen(context, builder, signature, args):
            v8 = builder.bitcast(args[0], ir.VectorType(_I8, 8))
            f = builder.sitofp(v8, _F8) if signed else builder.uitofp(v8, _F8)
            f = builder.fmul(builder.fadd(f, _splat(builder, args[1])), _splat(builder, args[2]))
            ptr = _element_ptr(context, builder, signature.args[3], args[3], args[4], _F8)
            builder.store(f, ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return convert


u8x8_to_f32 = _bytes_to_f32x8(False)
i8x8_to_f32 = _bytes_to_f32x8(True)
u8x8_to_f32.__doc__ = "dst[pos:pos+8] = (float(byte i of v) + bias) * scale, bytes unsigned, little-endian."
i8x8_to_f32.__doc__ = "dst[pos:pos+8] = (float(byte i of v) + bias) * scale, bytes signed, little-endian."


def _fma(builder, a, b, c):
    """The fused multiply-add a * b + c (one rounding), scalar or vector."""
    ty = a.type
    suffix = f"v{ty.count}f32" if isinstance(ty, ir.VectorType) else "f32"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]), f"llvm.fma.{suffix}")
    return builder.call(fn, [a, b, c])


@intrinsic
def fmaf(typingctx, a, b, c):
    """float32 ``a * b + c`` with a single rounding, also outside ``fastmath`` code.

    The K-quant dot products are compiled without fastmath so that every kernel sums each
    (row, token) product in the same order, bit for bit (see ``quant_k_base``); this keeps
    their multiply-adds fused. In a vectorized loop it becomes ``vfmadd``.
    """
    if not all(t == types.float32 for t in (a, b, c)):
        return None
    return types.float32(a, b, c), lambda context, builder, signature, args: _fma(builder, *args)


@intrinsic
def fma_f32x8(typingctx, acc, a, ia, b, ib):
    """acc[0:8] = a[ia:ia+8] * b[ib:ib+8] + acc[0:8] (float32 arrays), fused, 8 lanes at once."""
    if not all(_contiguous(t, types.float32) for t in (acc, a, b)):
        return None
    sig = types.void(acc, a, types.intp, b, types.intp)

    def codegen(context, builder, signature, args):
        zero = ir.Constant(ir.IntType(64), 0)
        pacc = _element_ptr(context, builder, signature.args[0], args[0], zero, _F8)
        va = builder.load(_element_ptr(context, builder, signature.args[1], args[1], args[2], _F8), align=4)
        vb = builder.load(_element_ptr(context, builder, signature.args[3], args[3], args[4], _F8), align=4)
        builder.store(_fma(builder, va, vb, builder.load(pacc, align=4)), pacc, align=4)
        return context.get_dummy_value()

    return sig, codegen
