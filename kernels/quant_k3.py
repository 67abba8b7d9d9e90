"""numba kernels on raw Q6_K / Q3_K blocks: the K-quants with 16 signed scales per 256 weights.

``block_q6_K`` (210 bytes): ``ql[128]`` (low 4 bits), ``qh[64]`` (high 2 bits), ``scales[16]``
(int8), f16 ``d``. Weight ``128h + 32g + l`` (h = 0, 1; g = 0..3; l < 32) has its low bits in
the low (g = 0, 1) or high (g = 2, 3) nibble of ``ql[64h + 32(g % 2) + l]`` and its top bits in
bits 2g, 2g+1 of ``qh[32h + l]``; its value is ``d * scales[i // 16] * (q - 32)``.

``block_q3_K`` (110 bytes): ``hmask[32]``, ``qs[64]`` (low 2 bits), 12 bytes of packed 6-bit
scales, f16 ``d``. Weight ``128h + 32j + l`` has low bits ``(qs[32h + l] >> 2j) & 3`` and loses
4 unless bit ``4h + j`` of ``hmask[l]`` is set; its value is ``d * (sc[i // 16] - 32) * q``.

The offsets -32 / -4 are applied per sub-block through the drivers' additive term ``mf``
(one multiply-add per 16 weights against sums of ``x``, not one subtraction per weight);
the drivers are in ``quant_k_base``.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .quant_k_base import (
    SCALES_SIG, VALUES_SIG, dequantize_blocks_rows, dot_rows, matmul_blocks, matvec_blocks,
)
from .quant_k_simd import i8x8_to_f32, load_bytes, load_f16, load_u32, load_u64, u8x8_to_f32

Q6_K_BYTES = 210
Q3_K_BYTES = 110
_GROUP = 16  # weights per scale


@njit(SCALES_SIG, nogil=True, cache=True)
def _scales_q6_k(b, o, sf, mf):
    """sf[s] = d * scales[s] (int8) and mf[s] = -32 * sf[s] of the Q6_K block at ``b[o:]``."""
    d = load_f16(b, o + 208)
    for h in range(2):
        v = load_u64(b, o + 192 + 8 * h)
        i8x8_to_f32(v, np.float32(0.0), d, sf, 8 * h)
        i8x8_to_f32(v, np.float32(0.0), d * np.float32(-32.0), mf, 8 * h)


@njit(VALUES_SIG, nogil=True, cache=True)
def _values_q6_k(b, o, c, p, width):
    """``values`` (see ``quant_k_base``) of Q6_K, 0..63 (the weight plus 32).

    Run c is run g = c % 4 of half h = c // 4: weight 32c + l has its low 4 bits in the low
    (g < 2) or high (g >= 2) nibble of ``ql[64h + 32(g % 2) + l]`` and its top 2 bits at bits
    2g, 2g+1 of ``qh[32h + l]``.
    """
    h = c // 4
    g = c % 4
    low = load_bytes(b, o + 64 * h + 32 * (g % 2) + p, width)
    high = load_bytes(b, o + 128 + 32 * h + p, width)
    q = ((low >> np.uint32(4 * (g // 2))) & np.uint32(0x0F0F0F0F)) \
        | (((high >> np.uint32(2 * g)) & np.uint32(0x03030303)) << np.uint32(4))
    return np.uint32(q)


@njit(SCALES_SIG, nogil=True, cache=True)
def _scales_q3_k(b, o, sf, mf):
    """sf[s] = d * (sc[s] - 32) and mf[s] = -4 * sf[s] of the Q3_K block at ``b[o:]``.

    Scale s has its low nibble in byte s % 8 of the 12 packed bytes at o+96 (low nibble for
    s < 8, high for s >= 8) and its top 2 bits in byte 8 + s % 4 at bit 2 * (s // 4);
    unpacked four at a time in 32-bit words as in ggml.
    """
    a0 = load_u32(b, o + 96)
    a1 = load_u32(b, o + 100)
    top = load_u32(b, o + 104)
    low4 = np.uint32(0x0F0F0F0F)
    top2 = np.uint32(0x03030303)
    s0 = (a0 & low4) | ((top & top2) << np.uint32(4))
    s1 = (a1 & low4) | (((top >> np.uint32(2)) & top2) << np.uint32(4))
    s2 = ((a0 >> np.uint32(4)) & low4) | (((top >> np.uint32(4)) & top2) << np.uint32(4))
    s3 = ((a1 >> np.uint32(4)) & low4) | (((top >> np.uint32(6)) & top2) << np.uint32(4))
    d = load_f16(b, o + 108)
    first = np.uint64(s0) | (np.uint64(s1) << np.uint64(32))  # scales 0-7, one per byte
    last = np.uint64(s2) | (np.uint64(s3) << np.uint64(32))  # scales 8-15
    u8x8_to_f32(first, np.float32(-32.0), d, sf, 0)
    u8x8_to_f32(last, np.float32(-32.0), d, sf, 8)
    u8x8_to_f32(first, np.float32(-32.0), d * np.float32(-4.0), mf, 0)
    u8x8_to_f32(last, np.float32(-32.0), d * np.float32(-4.0), mf, 8)


@njit(VALUES_SIG, nogil=True, cache=True)
def _values_q3_k(b, o, c, p, width):
    """``values`` (see ``quant_k_base``) of Q3_K, 0..7 (the weight plus 4).

    Run c is run j = c % 4 of half h = c // 4: weight 32c + l has its low 2 bits at bits 2j,
    2j+1 of ``qs[32h + l]`` and, as bit 2, bit 4h + j of ``hmask[l]``.
    """
    h = c // 4
    j = c % 4
    low = load_bytes(b, o + 32 + 32 * h + p, width)
    high = load_bytes(b, o + p, width)
    q = ((low >> np.uint32(2 * j)) & np.uint32(0x03030303)) \
        | (((high >> np.uint32(4 * h + j)) & np.uint32(0x01010101)) << np.uint32(2))
    return np.uint32(q)


@njit(nogil=True, cache=True)
def _rows_q6_k(w, cols, XP, XS, out, r0, r1, ntok):
    dot_rows(w, cols, XP, XS, out, r0, r1, Q6_K_BYTES, _GROUP, _scales_q6_k, _values_q6_k, ntok)


@njit(nogil=True, cache=True)
def matvec_q6_k(w: np.ndarray, cols: int, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[r] = W[r, :] . x for r in [r0, r1); ``w`` holds Q6_K rows of ``cols`` weights."""
    matvec_blocks(w, cols, x, out, r0, r1, _GROUP, _rows_q6_k)


@njit(nogil=True, cache=True)
def matmul_q6_k(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r, :] . X[i, :] for every token i and r in [r0, r1) (Q6_K weights)."""
    matmul_blocks(w, cols, X, out, r0, r1, Q6_K_BYTES, _GROUP, _scales_q6_k, _values_q6_k, _rows_q6_k)


@njit(nogil=True, cache=True)
def dequantize_rows_q6_k(w: np.ndarray, cols: int, r0: int, r1: int, out: np.ndarray) -> None:
    """out[r - r0, :] = W[r, :] as float32 for r in [r0, r1) (Q6_K weights)."""
    dequantize_blocks_rows(w, cols, r0, r1, out, Q6_K_BYTES, _GROUP, _scales_q6_k, _values_q6_k)


@njit(nogil=True, cache=True)
def _rows_q3_k(w, cols, XP, XS, out, r0, r1, ntok):
    dot_rows(w, cols, XP, XS, out, r0, r1, Q3_K_BYTES, _GROUP, _scales_q3_k, _values_q3_k, ntok)


@njit(nogil=True, cache=True)
def matvec_q3_k(w: np.ndarray, cols: int, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[r] = W[r, :] . x for r in [r0, r1); ``w`` holds Q3_K rows of ``cols`` weights."""
    matvec_blocks(w, cols, x, out, r0, r1, _GROUP, _rows_q3_k)


@njit(nogil=True, cache=True)
def matmul_q3_k(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r, :] . X[i, :] for every token i and r in [r0, r1) (Q3_K weights)."""
    matmul_blocks(w, cols, X, out, r0, r1, Q3_K_BYTES, _GROUP, _scales_q3_k, _values_q3_k, _rows_q3_k)


@njit(nogil=True, cache=True)
def dequantize_rows_q3_k(w: np.ndarray, cols: int, r0: int, r1: int, out: np.ndarray) -> None:
    """out[r - r0, :] = W[r, :] as float32 for r in [r0, r1) (Q3_K weights)."""
    dequantize_blocks_rows(w, cols, r0, r1, out, Q3_K_BYTES, _GROUP, _scales_q3_k, _values_q3_k)
