"""Kernels for the legacy 32-weight block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Block layouts (ggml-common.h; every scale is a little-endian IEEE half):

  Q4_0  18 B  d | qs[16]               w_j = d * (q_j - 8)
  Q4_1  20 B  d | m | qs[16]           w_j = d * q_j + m
  Q5_0  22 B  d | qh[4] | qs[16]       w_j = d * (q_j - 16)
  Q5_1  24 B  d | m | qh[4] | qs[16]   w_j = d * q_j + m
  Q8_0  34 B  d | qs[32] (int8)        w_j = d * q_j

where byte j of ``qs`` holds q_j in its low nibble and q_{16+j} in its high nibble, and bit j of
the little-endian uint32 ``qh`` is bit 4 of q_j. Each format is one ``_block_*`` decoder
returning (q, d, m) with w = d * q + m (Q4_0/Q5_0 as signed q - 8 / q - 16 with m = 0, the
integers llama.cpp's dot products use); the row-range drivers in ``quant_drivers`` do the rest.

Numerics (details in ``quant_drivers``): every product quantizes the activations to int8 per
32-block like llama.cpp's ``quantize_row_q8_0/1`` and sums integer block dot products in
llama.cpp's order, so the results equal llama.cpp's ``ggml_vec_dot_*`` bit for bit.

For each type ``t`` (the kernel contract, rows [r0, r1) of a C-contiguous uint8 ``w``)::

    matvec_t(w, cols, x, out, r0, r1)          out[r] = W[r] . x
    matmul_t(w, cols, X, out, r0, r1)          out[i, r] = W[r] . X[i]
    dequantize_rows_t(w, cols, r0, r1, out)    out[r - r0] = W[r]

The kernels are ``@njit(nogil=True, cache=True)`` *without* fastmath: their arithmetic is in
explicit vector intrinsics, and strict IEEE scalar ops keep the results independent of the
function LLVM inlines them into (see ``quant_drivers``).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .quant_drivers import (
    decode_blocks,
    dequantize_with,
    dot_signed,
    dot_unsigned,
    gemm_tiles,
    matmul_blocks,
    matvec_blocks,
)
from .quant_simd import load_f16, load_i8x32, nibbles, nibbles_hbit, sub_i8

QK = 32
Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q8_0_BYTES = 18, 20, 22, 24, 34


# ---------------------------------------------------------------------------------------------
# block decoders: (q: i8x32, d, m) with weight = d * q + m


@njit(nogil=True, inline="always", cache=True)
def _block_q4_0(w, o):
    # signed q - 8 (no m term), as llama.cpp's vec_dot_q4_0_q8_0 forms its integer sums
    return sub_i8(nibbles(w, o + 2), 8), load_f16(w, o), np.float32(0.0)


@njit(nogil=True, inline="always", cache=True)
def _block_q4_1(w, o):
    return nibbles(w, o + 4), load_f16(w, o), load_f16(w, o + 2)


@njit(nogil=True, inline="always", cache=True)
def _block_q5_0(w, o):
    return sub_i8(nibbles_hbit(w, o + 6, o + 2), 16), load_f16(w, o), np.float32(0.0)


@njit(nogil=True, inline="always", cache=True)
def _block_q5_1(w, o):
    return nibbles_hbit(w, o + 8, o + 4), load_f16(w, o), load_f16(w, o + 2)


@njit(nogil=True, inline="always", cache=True)
def _block_q8_0(w, o):
    return load_i8x32(w, o + 2), load_f16(w, o), np.float32(0.0)


# row decoders (float32 rows for the prefill tiles and dequantize_rows)


@njit(nogil=True, inline="always", cache=True)
def _row_q4_0(w, o, cols, dst, d0):
    decode_blocks(_block_q4_0, Q4_0_BYTES, w, o, cols, dst, d0)


@njit(nogil=True, inline="always", cache=True)
def _row_q4_1(w, o, cols, dst, d0):
    decode_blocks(_block_q4_1, Q4_1_BYTES, w, o, cols, dst, d0)


@njit(nogil=True, inline="always", cache=True)
def _row_q5_0(w, o, cols, dst, d0):
    decode_blocks(_block_q5_0, Q5_0_BYTES, w, o, cols, dst, d0)


@njit(nogil=True, inline="always", cache=True)
def _row_q5_1(w, o, cols, dst, d0):
    decode_blocks(_block_q5_1, Q5_1_BYTES, w, o, cols, dst, d0)


@njit(nogil=True, inline="always", cache=True)
def _row_q8_0(w, o, cols, dst, d0):
    decode_blocks(_block_q8_0, Q8_0_BYTES, w, o, cols, dst, d0)


# ---------------------------------------------------------------------------------------------
# public kernels


@njit(nogil=True, cache=True)
def matvec_q4_0(w: np.ndarray, cols: int, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[r] = W[r] . x for r in [r0, r1) (Q4_0 rows of ``cols`` weights)."""
    matvec_blocks(_block_q4_0, dot_signed, Q4_0_BYTES, w, cols, x, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_q4_0(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r] . X[i] for every token i and r in [r0, r1) (Q4_0)."""
    matmul_blocks(_block_q4_0, dot_signed, Q4_0_BYTES, w, cols, X, out, r0, r1)


@njit(nogil=True, cache=True)
def dequantize_rows_q4_0(w: np.ndarray, cols: int, r0: int, r1: int, out: np.ndarray) -> None:
    """out[r - r0] = W[r] as float32 for r in [r0, r1) (Q4_0)."""
    dequantize_with(_row_q4_0, (cols // QK) * Q4_0_BYTES, w, cols, r0, r1, out)


@njit(nogil=True, cache=True)
def matvec_q4_1(w: np.ndarray, cols: int, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[r] = W[r] . x for r in [r0, r1) (Q4_1 rows of ``cols`` weights)."""
    matvec_blocks(_block_q4_1, dot_unsigned, Q4_1_BYTES, w, cols, x, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_q4_1(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r] . X[i] for every token i and r in [r0, r1) (Q4_1)."""
    matmul_blocks(_block_q4_1, dot_unsigned, Q4_1_BYTES, w, cols, X, out, r0, r1)


@njit(nogil=True, cache=True)
def dequantize_rows_q4_1(w: np.ndarray, cols: int, r0: int, r1: int, out: np.ndarray) -> None:
    """out[r - r0] = W[r] as float32 for r in [r0, r1) (Q4_1)."""
    dequantize_with(_row_q4_1, (cols // QK) * Q4_1_BYTES, w, cols, r0, r1, out)


@njit(nogil=True, cache=True)
def matvec_q5_0(w: np.ndarray, cols: int, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[r] = W[r] . x for r in [r0, r1) (Q5_0 rows of ``cols`` weights)."""
    matvec_blocks(_block_q5_0, dot_signed, Q5_0_BYTES, w, cols, x, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_q5_0(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r] . X[i] for every token i and r in [r0, r1) (Q5_0)."""
    matmul_blocks(_block_q5_0, dot_signed, Q5_0_BYTES, w, cols, X, out, r0, r1)


@njit(nogil=True, cache=True)
def dequantize_rows_q5_0(w: np.ndarray, cols: int, r0: int, r1: int, out: np.ndarray) -> None:
    """out[r - r0] = W[r] as float32 for r in [r0, r1) (Q5_0)."""
    dequantize_with(_row_q5_0, (cols // QK) * Q5_0_BYTES, w, cols, r0, r1, out)


@njit(nogil=True, cache=True)
def matvec_q5_1(w: np.ndarray, cols: int, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[r] = W[r] . x for r in [r0, r1) (Q5_1 rows of ``cols`` weights)."""
    matvec_blocks(_block_q5_1, dot_unsigned, Q5_1_BYTES, w, cols, x, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_q5_1(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r] . X[i] for every token i and r in [r0, r1) (Q5_1)."""
    matmul_blocks(_block_q5_1, dot_unsigned, Q5_1_BYTES, w, cols, X, out, r0, r1)


@njit(nogil=True, cache=True)
def dequantize_rows_q5_1(w: np.ndarray, cols: int, r0: int, r1: int, out: np.ndarray) -> None:
    """out[r - r0] = W[r] as float32 for r in [r0, r1) (Q5_1)."""
    dequantize_with(_row_q5_1, (cols // QK) * Q5_1_BYTES, w, cols, r0, r1, out)


@njit(nogil=True, cache=True)
def matvec_q8_0(w: np.ndarray, cols: int, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[r] = W[r] . x for r in [r0, r1) (Q8_0 rows of ``cols`` weights)."""
    matvec_blocks(_block_q8_0, dot_signed, Q8_0_BYTES, w, cols, x, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_q8_0(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r] . X[i] for every token i and r in [r0, r1) (Q8_0)."""
    matmul_blocks(_block_q8_0, dot_signed, Q8_0_BYTES, w, cols, X, out, r0, r1)


@njit(nogil=True, cache=True)
def dequantize_rows_q8_0(w: np.ndarray, cols: int, r0: int, r1: int, out: np.ndarray) -> None:
    """out[r - r0] = W[r] as float32 for r in [r0, r1) (Q8_0)."""
    dequantize_with(_row_q8_0, (cols // QK) * Q8_0_BYTES, w, cols, r0, r1, out)


# float32-activation products (NumbaBackend(activations="float32")): exact weights, float32 sums


@njit(nogil=True, cache=True)
def matmul_float_q4_0(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r] . X[i] with float32 activations (Q4_0 rows decoded in tiles)."""
    gemm_tiles(_row_q4_0, (cols // QK) * Q4_0_BYTES, w, cols, X, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_float_q4_1(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r] . X[i] with float32 activations (Q4_1)."""
    gemm_tiles(_row_q4_1, (cols // QK) * Q4_1_BYTES, w, cols, X, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_float_q5_0(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r] . X[i] with float32 activations (Q5_0)."""
    gemm_tiles(_row_q5_0, (cols // QK) * Q5_0_BYTES, w, cols, X, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_float_q5_1(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r] . X[i] with float32 activations (Q5_1)."""
    gemm_tiles(_row_q5_1, (cols // QK) * Q5_1_BYTES, w, cols, X, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_float_q8_0(w: np.ndarray, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r] . X[i] with float32 activations (Q8_0)."""
    gemm_tiles(_row_q8_0, (cols // QK) * Q8_0_BYTES, w, cols, X, out, r0, r1)
