"""The affine INT4/INT3 format as the converter uses it: packing and dequantizing come from the
runtime's reference (``runtime/affine.py``, bit-exact with MLX's ``mx.quantize`` layout), so the
files the converter writes and the kernels that read them share one definition."""
from __future__ import annotations

import numpy as np

from ..runtime.affine import dequantize, pack, unpack

__all__ = ["dequantize", "dequantize_q", "pack", "unpack"]


def dequantize_q(q: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int) -> np.ndarray:
    """``scales * q + biases`` per group, float32 [rows, cols] (scales/biases [rows, cols/group])."""
    rows, cols = q.shape
    s = scales.astype(np.float32)[:, :, None]
    b = biases.astype(np.float32)[:, :, None]
    return (q.reshape(rows, cols // group_size, group_size).astype(np.float32) * s + b).reshape(rows, cols)
