"""LLVM-level helpers numba does not expose: half-precision conversion and atomics.

numba has no float16 type on the CPU, so f16 data is held as ``uint16`` and converted with
``fpext``/``fptrunc`` on LLVM's ``half`` type; with F16C (every AVX2 CPU) LLVM lowers them to
``vcvtph2ps``/``vcvtps2ph`` and vectorizes loops that use them. Rounding matches NumPy's
``astype(np.float16)`` (round to nearest even).

The atomics implement the spin barrier that lets a whole decode step run inside one compiled
call per worker thread (see ``kernels.threads``) instead of one numba parallel region per
matrix-vector product, whose launch cost (~10-30 us) would dwarf the work at this model size.
"""
from __future__ import annotations

import platform
import sys

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_WINDOWS = sys.platform == "win32"


@intrinsic
def f16_to_f32(typingctx, u):
    """uint16 bit pattern of an IEEE half -> float32 (exact)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def f32_to_f16(typingctx, f):
    """float32 -> uint16 bit pattern of the nearest IEEE half (round to nearest even)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


def _item_ptr(context, builder, aty, arr, idx):
    ary = context.make_array(aty)(context, builder, arr)
    return cgutils.get_item_pointer(context, builder, aty, ary, [idx])


@intrinsic
def atomic_add(typingctx, arr, idx, val):
    """``old = arr[idx]; arr[idx] += val`` atomically (sequentially consistent) on an int64 array."""
    sig = types.int64(arr, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        ptr = _item_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return sig, codegen


@intrinsic
def atomic_load(typingctx, arr, idx):
    """``arr[idx]`` as an acquire load that the optimizer may not hoist out of a spin loop."""
    sig = types.int64(arr, types.intp)

    def codegen(context, builder, signature, args):
        ptr = _item_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


@intrinsic
def atomic_store(typingctx, arr, idx, val):
    """``arr[idx] = val`` as a release store."""
    sig = types.void(arr, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        ptr = _item_ptr(context, builder, signature.args[0], args[0], args[1])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def cpu_relax(typingctx):
    """``pause`` on x86 (eases a spinning hyper-thread's sibling); a no-op elsewhere."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause"
            )
            builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def sched_yield(typingctx):
    """Give up the core to another runnable thread (POSIX ``sched_yield``; a no-op on Windows).

    Declared by symbol name rather than through a ctypes pointer so that functions using it
    stay cacheable on disk: the JIT linker resolves the name in the running process's libc.
    """
    sig = types.void()

    def codegen(context, builder, signature, args):
        if not _WINDOWS:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
            builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


# Spins before a waiting thread starts yielding its core: long enough to cover the usual
# imbalance between workers (microseconds), short enough that a descheduled peer -- a busy
# machine, more threads than free cores -- does not cost a whole time slice of spinning.
SPINS_BEFORE_YIELD = 4000


@njit(nogil=True, inline="always", cache=True)
def spin_barrier(state, nthreads):
    """Block until ``nthreads`` threads have arrived. ``state``: int64[16], zeroed once.

    state[0] counts arrivals, state[8] is the generation (a separate cache line). The last
    thread to arrive resets the count and bumps the generation, which releases the others.
    """
    if nthreads == 1:
        return
    gen = atomic_load(state, 8)
    if atomic_add(state, 0, 1) == nthreads - 1:
        atomic_store(state, 0, 0)
        atomic_add(state, 8, 1)
    else:
        spins = 0
        while atomic_load(state, 8) == gen:
            if spins < SPINS_BEFORE_YIELD:
                cpu_relax()
                spins += 1
            else:
                sched_yield()
