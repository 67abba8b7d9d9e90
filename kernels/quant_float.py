"""Kernels for unquantized weights: F32, F16, BF16 (little-endian element arrays, i.e. blocks
of one element; ``w`` is still the raw uint8 bytes of the tensor).

The products are plain float32 FMA loops on f32x8 vectors (F16 through ``vcvtph2ps``, BF16 by a
16-bit shift). A row's sum is always formed the same way -- one vector accumulator stepping
through the columns 8 at a time, a fixed-order horizontal sum, then the scalar tail -- by the
matvec below and by the prefill kernel (``quant_drivers.gemm_tiles``) alike, so ``matmul``
equals ``matvec`` per token bit for bit (no fastmath, as in ``quant_legacy``).

Same contract as ``quant_legacy``: ``matvec_<t>``, ``matmul_<t>``, ``dequantize_rows_<t>``.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .quant_drivers import dequantize_with, gemm_tiles
from .quant_simd import (
    load_bf16,
    load_f16,
    load_f32,
    sfma,
    sload,
    sstore,
    vfma,
    vhsum,
    vload,
    vload_bf16,
    vload_f16,
    vload_f32,
    vstore,
    vzero,
)

F32_BYTES, F16_BYTES, BF16_BYTES = 4, 2, 2

# Element loaders as njit functions (the drivers take them as arguments): vector of 8 and
# scalar, at a byte offset.


@njit(nogil=True, inline="always", cache=True)
def _v_f32(w, o):
    return vload_f32(w, o)


@njit(nogil=True, inline="always", cache=True)
def _s_f32(w, o):
    return load_f32(w, o)


@njit(nogil=True, inline="always", cache=True)
def _v_f16(w, o):
    return vload_f16(w, o)


@njit(nogil=True, inline="always", cache=True)
def _s_f16(w, o):
    return load_f16(w, o)


@njit(nogil=True, inline="always", cache=True)
def _v_bf16(w, o):
    return vload_bf16(w, o)


@njit(nogil=True, inline="always", cache=True)
def _s_bf16(w, o):
    return load_bf16(w, o)


# ---------------------------------------------------------------------------------------------
# generic drivers over (vector loader, scalar loader, element size)


@njit(nogil=True, inline="always", cache=True)
def _tail(sld, esz, w, o, x, k0, cols):
    """Scalar sum of W[k] * x[k] over k in [k0, cols), in the order ``gemm_tiles`` uses."""
    s = np.float32(0.0)
    for k in range(k0, cols):
        s = sfma(sld(w, o + k * esz), sload(x, k), s)
    return s


@njit(nogil=True, inline="always", cache=True)
def _rows4(vld, sld, esz, w, o0, o1, o2, o3, cols, x):
    """Four rows (byte offsets o0..o3) dotted with x: four independent FMA chains."""
    a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
    kv = cols - cols % 8
    for k in range(0, kv, 8):
        xv = vload(x, k)
        a0 = vfma(vld(w, o0 + k * esz), xv, a0)
        a1 = vfma(vld(w, o1 + k * esz), xv, a1)
        a2 = vfma(vld(w, o2 + k * esz), xv, a2)
        a3 = vfma(vld(w, o3 + k * esz), xv, a3)
    return (vhsum(a0) + _tail(sld, esz, w, o0, x, kv, cols), vhsum(a1) + _tail(sld, esz, w, o1, x, kv, cols),
            vhsum(a2) + _tail(sld, esz, w, o2, x, kv, cols), vhsum(a3) + _tail(sld, esz, w, o3, x, kv, cols))


@njit(nogil=True, inline="always", cache=True)
def _matvec_float(vld, sld, esz, w, cols, x, out, r0, r1):
    rb = cols * esz
    for r in range(r0, r1, 4):
        # rows past r1 in the last group repeat the last row (same value, same place)
        ra, rb_, rc = min(r + 1, r1 - 1), min(r + 2, r1 - 1), min(r + 3, r1 - 1)
        out[r], out[ra], out[rb_], out[rc] = _rows4(vld, sld, esz, w, r * rb, ra * rb, rb_ * rb, rc * rb, cols, x)


@njit(nogil=True, inline="always", cache=True)
def _decode_float(vld, sld, esz, w, o, cols, dst, d0):
    kv = cols - cols % 8
    for k in range(0, kv, 8):
        vstore(vld(w, o + k * esz), dst, d0 + k)
    for k in range(kv, cols):
        sstore(sld(w, o + k * esz), dst, d0 + k)


# row decoders for gemm_tiles / dequantize_with


@njit(nogil=True, inline="always", cache=True)
def _row_f32(w, o, cols, dst, d0):
    _decode_float(_v_f32, _s_f32, F32_BYTES, w, o, cols, dst, d0)


@njit(nogil=True, inline="always", cache=True)
def _row_f16(w, o, cols, dst, d0):
    _decode_float(_v_f16, _s_f16, F16_BYTES, w, o, cols, dst, d0)


@njit(nogil=True, inline="always", cache=True)
def _row_bf16(w, o, cols, dst, d0):
    _decode_float(_v_bf16, _s_bf16, BF16_BYTES, w, o, cols, dst, d0)


# ---------------------------------------------------------------------------------------------
# public kernels


@njit(nogil=True, cache=True)
def matvec_f32(w: np.ndarray, cols: int, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[r] = W[r] . x for r in [r0, r1) (F32 rows of ``cols`` weights)."""
    _matvec_float(_v_f32, _s_f32, F32_BYTES, w, cols, x, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_f32(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r] . X[i] for every token i and r in [r0, r1) (F32)."""
    gemm_tiles(_row_f32, cols * F32_BYTES, w, cols, X, out, r0, r1)


@njit(nogil=True, cache=True)
def dequantize_rows_f32(w: np.ndarray, cols: int, r0: int, r1: int, out: np.ndarray) -> None:
    """out[r - r0] = W[r] for r in [r0, r1) (F32)."""
    dequantize_with(_row_f32, cols * F32_BYTES, w, cols, r0, r1, out)


@njit(nogil=True, cache=True)
def matvec_f16(w: np.ndarray, cols: int, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[r] = W[r] . x for r in [r0, r1) (F16 rows of ``cols`` weights)."""
    _matvec_float(_v_f16, _s_f16, F16_BYTES, w, cols, x, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_f16(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r] . X[i] for every token i and r in [r0, r1) (F16)."""
    gemm_tiles(_row_f16, cols * F16_BYTES, w, cols, X, out, r0, r1)


@njit(nogil=True, cache=True)
def dequantize_rows_f16(w: np.ndarray, cols: int, r0: int, r1: int, out: np.ndarray) -> None:
    """out[r - r0] = W[r] as float32 for r in [r0, r1) (F16)."""
    dequantize_with(_row_f16, cols * F16_BYTES, w, cols, r0, r1, out)


@njit(nogil=True, cache=True)
def matvec_bf16(w: np.ndarray, cols: int, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[r] = W[r] . x for r in [r0, r1) (BF16 rows of ``cols`` weights)."""
    _matvec_float(_v_bf16, _s_bf16, BF16_BYTES, w, cols, x, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_bf16(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r] . X[i] for every token i and r in [r0, r1) (BF16)."""
    gemm_tiles(_row_bf16, cols * BF16_BYTES, w, cols, X, out, r0, r1)


@njit(nogil=True, cache=True)
def dequantize_rows_bf16(w: np.ndarray, cols: int, r0: int, r1: int, out: np.ndarray) -> None:
    """out[r - r0] = W[r] as float32 for r in [r0, r1) (BF16)."""
    dequantize_with(_row_bf16, cols * BF16_BYTES, w, cols, r0, r1, out)
