"""numba kernels on raw Q4_K / Q5_K blocks (and the public names of all four K-quants).

``block_q4_K`` (144 bytes): f16 ``d``, f16 ``dmin``, 12 bytes of packed 6-bit scales and mins,
``qs[128]``. ``block_q5_K`` (176 bytes) inserts ``qh[32]`` before ``qs``. A super-block holds
256 weights in 8 sub-blocks of 32; sub-block ``s`` is ``d*sc[s] * q - dmin*m[s]``. Each 32-byte
run ``j`` of ``qs`` carries sub-block 2j in its low nibbles and 2j+1 in its high nibbles;
Q5_K's ``qh[l]`` holds bit 4 of weight ``l`` of sub-block ``s`` in its bit ``s``.

Both types share one ``values`` function (``fifth`` = 0/1); the matrix-vector, matrix-matrix
and dequantization drivers are in ``quant_k_base``.

Q6_K and Q3_K live in ``quant_k3`` and are re-exported here, so the dispatcher imports all
``matvec_*``, ``matmul_*`` and ``dequantize_rows_*`` of the K-quants from this module.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types

from .quant_k3 import (
    dequantize_rows_q3_k, dequantize_rows_q6_k, matmul_q3_k, matmul_q6_k, matvec_q3_k, matvec_q6_k,
)
from .quant_k_base import (
    SCALES_SIG, VALUES_SIG, dequantize_blocks_rows, dot_rows, matmul_blocks, matvec_blocks,
)
from .quant_k_simd import U8_ARRAYS, load_bytes, load_f16, load_u32, u8x8_to_f32

__all__ = [
    "matvec_q4_k", "matmul_q4_k", "dequantize_rows_q4_k",
    "matvec_q5_k", "matmul_q5_k", "dequantize_rows_q5_k",
    "matvec_q6_k", "matmul_q6_k", "dequantize_rows_q6_k",
    "matvec_q3_k", "matmul_q3_k", "dequantize_rows_q3_k",
]

Q4_K_BYTES = 144
Q5_K_BYTES = 176
_GROUP = 32  # weights per sub-block
_QH = 16  # offset of Q5_K's qh[32]


@njit(SCALES_SIG, nogil=True, cache=True)
def _scales_k45(b, o, sf, mf):
    """sf[s] = d * sc[s], mf[s] = -dmin * m[s] of the Q4_K/Q5_K block at ``b[o:]``.

    The 12 bytes at o+4 pack 8 scales and 8 mins of 6 bits: scales/mins 0-3 are the low 6
    bits of bytes 0-3 / 4-7; scales/mins 4-7 have their low nibble in bytes 8-11 (low / high
    nibble) and their top 2 bits in the top bits of bytes 0-3 / 4-7 (ggml's
    ``get_scale_min_k4``). Unpacked four at a time in 32-bit words, then converted 8 at a time.
    """
    a0 = load_u32(b, o + 4)
    a1 = load_u32(b, o + 8)
    a2 = load_u32(b, o + 12)
    low6 = np.uint32(0x3F3F3F3F)
    low4 = np.uint32(0x0F0F0F0F)
    top2 = np.uint32(0x03030303)
    sc_hi = (a2 & low4) | (((a0 >> np.uint32(6)) & top2) << np.uint32(4))
    mn_hi = ((a2 >> np.uint32(4)) & low4) | (((a1 >> np.uint32(6)) & top2) << np.uint32(4))
    sc = np.uint64(a0 & low6) | (np.uint64(sc_hi) << np.uint64(32))
    mn = np.uint64(a1 & low6) | (np.uint64(mn_hi) << np.uint64(32))
    u8x8_to_f32(sc, np.float32(0.0), load_f16(b, o), sf, 0)
    u8x8_to_f32(mn, np.float32(0.0), -load_f16(b, o + 2), mf, 0)


@njit([types.uint32(u8, *[types.int64] * 5) for u8 in U8_ARRAYS], nogil=True, cache=True)
def _values_k45(b, o, c, p, width, fifth):
    """``values`` (see ``quant_k_base``) of Q4_K (fifth=0) / Q5_K (fifth=1): weight 32c + l
    (sub-block c) has its low 4 bits in the low (c even) or high (c odd) nibble of byte l of
    run c // 2 of ``qs``; Q5_K's fifth bit is bit c of byte l of ``qh``.
    """
    v = load_bytes(b, o + 16 + 32 * fifth + 32 * (c // 2) + p, width)
    q = (v >> np.uint32(4 * (c % 2))) & np.uint32(0x0F0F0F0F)
    if fifth:
        h = load_bytes(b, o + _QH + p, width)
        q |= ((h >> np.uint32(c)) & np.uint32(0x01010101)) << np.uint32(4)
    return np.uint32(q)


@njit(VALUES_SIG, nogil=True, cache=True)
def _values_q4_k(b, o, c, p, width):
    return _values_k45(b, o, c, p, width, 0)


@njit(VALUES_SIG, nogil=True, cache=True)
def _values_q5_k(b, o, c, p, width):
    return _values_k45(b, o, c, p, width, 1)


@njit(nogil=True, cache=True)
def _rows_q4_k(w, cols, XP, XS, out, r0, r1, ntok):
    dot_rows(w, cols, XP, XS, out, r0, r1, Q4_K_BYTES, _GROUP, _scales_k45, _values_q4_k, ntok)


@njit(nogil=True, cache=True)
def matvec_q4_k(w: np.ndarray, cols: int, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[r] = W[r, :] . x for r in [r0, r1); ``w`` holds Q4_K rows of ``cols`` weights."""
    matvec_blocks(w, cols, x, out, r0, r1, _GROUP, _rows_q4_k)


@njit(nogil=True, cache=True)
def matmul_q4_k(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r, :] . X[i, :] for every token i and r in [r0, r1) (Q4_K weights)."""
    matmul_blocks(w, cols, X, out, r0, r1, Q4_K_BYTES, _GROUP, _scales_k45, _values_q4_k, _rows_q4_k)


@njit(nogil=True, cache=True)
def dequantize_rows_q4_k(w: np.ndarray, cols: int, r0: int, r1: int, out: np.ndarray) -> None:
    """out[r - r0, :] = W[r, :] as float32 for r in [r0, r1) (Q4_K weights)."""
    dequantize_blocks_rows(w, cols, r0, r1, out, Q4_K_BYTES, _GROUP, _scales_k45, _values_q4_k)


@njit(nogil=True, cache=True)
def _rows_q5_k(w, cols, XP, XS, out, r0, r1, ntok):
    dot_rows(w, cols, XP, XS, out, r0, r1, Q5_K_BYTES, _GROUP, _scales_k45, _values_q5_k, ntok)


@njit(nogil=True, cache=True)
def matvec_q5_k(w: np.ndarray, cols: int, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[r] = W[r, :] . x for r in [r0, r1); ``w`` holds Q5_K rows of ``cols`` weights."""
    matvec_blocks(w, cols, x, out, r0, r1, _GROUP, _rows_q5_k)


@njit(nogil=True, cache=True)
def matmul_q5_k(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r, :] . X[i, :] for every token i and r in [r0, r1) (Q5_K weights)."""
    matmul_blocks(w, cols, X, out, r0, r1, Q5_K_BYTES, _GROUP, _scales_k45, _values_q5_k, _rows_q5_k)


@njit(nogil=True, cache=True)
def dequantize_rows_q5_k(w: np.ndarray, cols: int, r0: int, r1: int, out: np.ndarray) -> None:
    """out[r - r0, :] = W[r, :] as float32 for r in [r0, r1) (Q5_K weights)."""
    dequantize_blocks_rows(w, cols, r0, r1, out, Q5_K_BYTES, _GROUP, _scales_k45, _values_q5_k)
