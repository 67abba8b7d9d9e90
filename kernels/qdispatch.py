"""Kernel dispatch on the integer ggml type code, for compiled callers.

``matvec``, ``matmul`` and ``dequantize_rows`` are njit functions taking the ggml type code as
a runtime integer; the forward pass (itself compiled) calls them for every weight matrix. The
if/elif chain costs a few predictable compares per call, against tens of microseconds of work.
Each branch calls the type's kernel with the shared contract (``quant_legacy`` for the docs):

    matvec(w, gtype, cols, x, out, r0, r1)       out[r] = W[r] . x,          r in [r0, r1)
    matmul(w, gtype, cols, X, out, r0, r1)       out[i, r] = W[r] . X[i]
    dequantize_rows(w, gtype, cols, r0, r1, out) out[r - r0] = W[r]

An unsupported code raises ``ValueError`` (check ``SUPPORTED_TYPES`` up front instead).

The forward pass calls the *table-row* entry points ``matvec_t``/``matmul_t``/
``dequantize_rows_t``, which take the mapped file ``blob`` and one row of the weight table
(columns ``W_*`` below) and also run the affine INT4/INT3 format (``runtime/affine.py``,
``quant_affine``). An affine tensor is three tensors in the file (packed quants, f16 scales,
f16 biases), so it has no single ggml type: the table gives it a pseudo type code,
``AFFINE_Q4`` (1004) or ``AFFINE_Q3`` (1003) -- 1000 + bits, far outside ggml's enum -- plus
the offsets of its scales and biases and its group size. ``SUPPORTED_TYPES`` lists the ggml
codes the raw-row functions take; ``TABLE_TYPES`` adds the affine codes.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .quant_affine import (
    dequantize_rows_affine3,
    dequantize_rows_affine4,
    matmul_affine3,
    matmul_affine4,
    matmul_float_affine3,
    matmul_float_affine4,
    matvec_affine3,
    matvec_affine4,
)
from .quant_float import (
    dequantize_rows_bf16,
    dequantize_rows_f16,
    dequantize_rows_f32,
    matmul_bf16,
    matmul_f16,
    matmul_f32,
    matvec_bf16,
    matvec_f16,
    matvec_f32,
)
from .quant_k import (
    dequantize_rows_q3_k,
    dequantize_rows_q4_k,
    dequantize_rows_q5_k,
    dequantize_rows_q6_k,
    matmul_q3_k,
    matmul_q4_k,
    matmul_q5_k,
    matmul_q6_k,
    matvec_q3_k,
    matvec_q5_k,
)
from .quant_k8 import matmul_q4_k8, matmul_q6_k8, matvec_q4_k8, matvec_q6_k8
from .quant_legacy import (
    matmul_float_q4_0,
    matmul_float_q4_1,
    matmul_float_q5_0,
    matmul_float_q5_1,
    matmul_float_q8_0,
    dequantize_rows_q4_0,
    dequantize_rows_q4_1,
    dequantize_rows_q5_0,
    dequantize_rows_q5_1,
    dequantize_rows_q8_0,
    matmul_q4_0,
    matmul_q4_1,
    matmul_q5_0,
    matmul_q5_1,
    matmul_q8_0,
    matvec_q4_0,
    matvec_q4_1,
    matvec_q5_0,
    matvec_q5_1,
    matvec_q8_0,
)

# ggml type codes (enum ggml_type; gguf.GGMLQuantizationType)
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q3_K, Q4_K, Q5_K, Q6_K = 11, 12, 13, 14
BF16 = 30

SUPPORTED_TYPES: frozenset[int] = frozenset({F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q3_K, Q4_K, Q5_K, Q6_K})

# Pseudo type codes of affine tensors (1000 + bits; only in weight tables, never in a file).
AFFINE_Q3, AFFINE_Q4 = 1003, 1004
AFFINE_TYPES: frozenset[int] = frozenset({AFFINE_Q3, AFFINE_Q4})
TABLE_TYPES: frozenset[int] = SUPPORTED_TYPES | AFFINE_TYPES

# Columns of a weight-table row (int64): where the tensor is in the blob, its (pseudo) type and
# shape, and for affine tensors where its scales and biases are and its group size (else 0).
W_OFFSET, W_NBYTES, W_TYPE, W_ROWS, W_COLS, W_SCALES, W_BIASES, W_GROUP = range(8)
W_FIELDS = 8

# (weights per block, bytes per block) of each supported type
_BLOCKS: dict[int, tuple[int, int]] = {
    F32: (1, 4), F16: (1, 2), BF16: (1, 2),
    Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24), Q8_0: (32, 34),
    Q3_K: (256, 110), Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210),
}


def row_nbytes(gtype: int, cols: int) -> int:
    """Bytes of one row of ``cols`` weights of type ``gtype`` (``cols`` a whole number of blocks)."""
    per_block, nbytes = _BLOCKS[gtype]
    if cols % per_block:
        raise ValueError(f"{cols} columns are not a whole number of {per_block}-weight blocks (type {gtype})")
    return cols // per_block * nbytes


@njit(nogil=True, cache=True)
def matvec(w: np.ndarray, gtype: int, cols: int, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[r] = W[r] . x for r in [r0, r1); ``w``: raw rows of ggml type ``gtype``."""
    if gtype == Q4_1:
        matvec_q4_1(w, cols, x, out, r0, r1)
    elif gtype == Q4_0:
        matvec_q4_0(w, cols, x, out, r0, r1)
    elif gtype == Q8_0:
        matvec_q8_0(w, cols, x, out, r0, r1)
    elif gtype == Q4_K:
        matvec_q4_k8(w, cols, x, out, r0, r1)
    elif gtype == Q6_K:
        matvec_q6_k8(w, cols, x, out, r0, r1)
    elif gtype == Q5_K:
        matvec_q5_k(w, cols, x, out, r0, r1)
    elif gtype == Q3_K:
        matvec_q3_k(w, cols, x, out, r0, r1)
    elif gtype == Q5_0:
        matvec_q5_0(w, cols, x, out, r0, r1)
    elif gtype == Q5_1:
        matvec_q5_1(w, cols, x, out, r0, r1)
    elif gtype == F16:
        matvec_f16(w, cols, x, out, r0, r1)
    elif gtype == BF16:
        matvec_bf16(w, cols, x, out, r0, r1)
    elif gtype == F32:
        matvec_f32(w, cols, x, out, r0, r1)
    else:
        raise ValueError("matvec: unsupported ggml type")


@njit(nogil=True, cache=True)
def matmul(w: np.ndarray, gtype: int, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r] . X[i] for every row i of X and r in [r0, r1) (type ``gtype``)."""
    if gtype == Q4_1:
        matmul_q4_1(w, cols, X, out, r0, r1)
    elif gtype == Q4_0:
        matmul_q4_0(w, cols, X, out, r0, r1)
    elif gtype == Q8_0:
        matmul_q8_0(w, cols, X, out, r0, r1)
    elif gtype == Q4_K:
        matmul_q4_k8(w, cols, X, out, r0, r1)
    elif gtype == Q6_K:
        matmul_q6_k8(w, cols, X, out, r0, r1)
    elif gtype == Q5_K:
        matmul_q5_k(w, cols, X, out, r0, r1)
    elif gtype == Q3_K:
        matmul_q3_k(w, cols, X, out, r0, r1)
    elif gtype == Q5_0:
        matmul_q5_0(w, cols, X, out, r0, r1)
    elif gtype == Q5_1:
        matmul_q5_1(w, cols, X, out, r0, r1)
    elif gtype == F16:
        matmul_f16(w, cols, X, out, r0, r1)
    elif gtype == BF16:
        matmul_bf16(w, cols, X, out, r0, r1)
    elif gtype == F32:
        matmul_f32(w, cols, X, out, r0, r1)
    else:
        raise ValueError("matmul: unsupported ggml type")


@njit(nogil=True, cache=True)
def matmul_float(w: np.ndarray, gtype: int, cols: int, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """``matmul`` with float32 activations for every number of tokens: the legacy block formats
    take their float tile path instead of the int8 one (exact weights, float32 sums); the other
    types are ``matmul``'s. Q4_K and Q6_K take
    ``quant_k``'s float kernels instead of ``quant_k8``'s Q8_K ones."""
    if gtype == Q4_1:
        matmul_float_q4_1(w, cols, X, out, r0, r1)
    elif gtype == Q4_0:
        matmul_float_q4_0(w, cols, X, out, r0, r1)
    elif gtype == Q8_0:
        matmul_float_q8_0(w, cols, X, out, r0, r1)
    elif gtype == Q5_0:
        matmul_float_q5_0(w, cols, X, out, r0, r1)
    elif gtype == Q5_1:
        matmul_float_q5_1(w, cols, X, out, r0, r1)
    elif gtype == Q4_K:
        matmul_q4_k(w, cols, X, out, r0, r1)
    elif gtype == Q6_K:
        matmul_q6_k(w, cols, X, out, r0, r1)
    else:
        matmul(w, gtype, cols, X, out, r0, r1)


@njit(nogil=True, cache=True)
def dequantize_rows(w: np.ndarray, gtype: int, cols: int, r0: int, r1: int, out: np.ndarray) -> None:
    """out[r - r0] = W[r] as float32 for r in [r0, r1) (type ``gtype``)."""
    if gtype == Q4_1:
        dequantize_rows_q4_1(w, cols, r0, r1, out)
    elif gtype == Q4_0:
        dequantize_rows_q4_0(w, cols, r0, r1, out)
    elif gtype == Q8_0:
        dequantize_rows_q8_0(w, cols, r0, r1, out)
    elif gtype == Q4_K:
        dequantize_rows_q4_k(w, cols, r0, r1, out)
    elif gtype == Q6_K:
        dequantize_rows_q6_k(w, cols, r0, r1, out)
    elif gtype == Q5_K:
        dequantize_rows_q5_k(w, cols, r0, r1, out)
    elif gtype == Q3_K:
        dequantize_rows_q3_k(w, cols, r0, r1, out)
    elif gtype == Q5_0:
        dequantize_rows_q5_0(w, cols, r0, r1, out)
    elif gtype == Q5_1:
        dequantize_rows_q5_1(w, cols, r0, r1, out)
    elif gtype == F16:
        dequantize_rows_f16(w, cols, r0, r1, out)
    elif gtype == BF16:
        dequantize_rows_bf16(w, cols, r0, r1, out)
    elif gtype == F32:
        dequantize_rows_f32(w, cols, r0, r1, out)
    else:
        raise ValueError("dequantize_rows: unsupported ggml type")


# ---------------------------------------------------------------------------------------------
# table-row entry points (ggml types and affine pseudo types)


@njit(nogil=True, inline="always", cache=True)
def _affine_parts(blob, wt):
    """(packed quants, scales, biases) byte views of the affine tensor of table row ``wt``."""
    rows, ng = wt[W_ROWS], wt[W_COLS] // wt[W_GROUP]
    w = blob[wt[W_OFFSET]: wt[W_OFFSET] + wt[W_NBYTES]]
    s = blob[wt[W_SCALES]: wt[W_SCALES] + 2 * rows * ng]
    b = blob[wt[W_BIASES]: wt[W_BIASES] + 2 * rows * ng]
    return w, s, b


@njit(nogil=True, cache=True)
def matvec_t(blob: np.ndarray, wt: np.ndarray, x: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[r] = W[r] . x for r in [r0, r1); W described by weight-table row ``wt``."""
    gtype, cols = wt[W_TYPE], wt[W_COLS]
    if gtype == AFFINE_Q4:
        w, s, b = _affine_parts(blob, wt)
        matvec_affine4(w, s, b, cols, wt[W_GROUP], x, out, r0, r1)
    elif gtype == AFFINE_Q3:
        w, s, b = _affine_parts(blob, wt)
        matvec_affine3(w, s, b, cols, wt[W_GROUP], x, out, r0, r1)
    else:
        matvec(blob[wt[W_OFFSET]: wt[W_OFFSET] + wt[W_NBYTES]], gtype, cols, x, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_t(blob: np.ndarray, wt: np.ndarray, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """out[i, r] = W[r] . X[i] for every row i of X and r in [r0, r1) (table row ``wt``)."""
    gtype, cols = wt[W_TYPE], wt[W_COLS]
    if gtype == AFFINE_Q4:
        w, s, b = _affine_parts(blob, wt)
        matmul_affine4(w, s, b, cols, wt[W_GROUP], X, out, r0, r1)
    elif gtype == AFFINE_Q3:
        w, s, b = _affine_parts(blob, wt)
        matmul_affine3(w, s, b, cols, wt[W_GROUP], X, out, r0, r1)
    else:
        matmul(blob[wt[W_OFFSET]: wt[W_OFFSET] + wt[W_NBYTES]], gtype, cols, X, out, r0, r1)


@njit(nogil=True, cache=True)
def matmul_float_t(blob: np.ndarray, wt: np.ndarray, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """``matmul_t`` with float32 activations where a type has that path (``matmul_float``,
    and the affine types' float tiles)."""
    gtype, cols = wt[W_TYPE], wt[W_COLS]
    if gtype == AFFINE_Q4:
        w, s, b = _affine_parts(blob, wt)
        matmul_float_affine4(w, s, b, cols, wt[W_GROUP], X, out, r0, r1)
    elif gtype == AFFINE_Q3:
        w, s, b = _affine_parts(blob, wt)
        matmul_float_affine3(w, s, b, cols, wt[W_GROUP], X, out, r0, r1)
    else:
        matmul_float(blob[wt[W_OFFSET]: wt[W_OFFSET] + wt[W_NBYTES]], gtype, wt[W_COLS], X, out, r0, r1)


@njit(nogil=True, cache=True)
def dequantize_rows_t(blob: np.ndarray, wt: np.ndarray, r0: int, r1: int, out: np.ndarray) -> None:
    """out[r - r0] = W[r] as float32 for r in [r0, r1) (table row ``wt``)."""
    gtype, cols = wt[W_TYPE], wt[W_COLS]
    if gtype == AFFINE_Q4:
        w, s, b = _affine_parts(blob, wt)
        dequantize_rows_affine4(w, s, b, cols, wt[W_GROUP], r0, r1, out)
    elif gtype == AFFINE_Q3:
        w, s, b = _affine_parts(blob, wt)
        dequantize_rows_affine3(w, s, b, cols, wt[W_GROUP], r0, r1, out)
    else:
        dequantize_rows(blob[wt[W_OFFSET]: wt[W_OFFSET] + wt[W_NBYTES]], gtype, cols, r0, r1, out)
