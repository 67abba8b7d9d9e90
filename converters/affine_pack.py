"""Bit packing of the affine INT4/INT3 format, identical to MLX's ``mx.quantize`` layout.

Each row of quantized values ``q`` (uint8, ``0 <= q < 2**bits``) becomes a little-endian
bitstream of uint32 words: value ``j`` occupies bits ``bits*j .. bits*j + bits - 1`` of the
row's stream. For 4 bits that is "value j in bits 4*(j%8) of word j//8"; for 3 bits, 32 values
fill exactly 3 words. ``np.packbits(..., bitorder="little")`` builds exactly this stream, so one
routine serves every bit width.

This is the converter's own copy; ``runtime/affine.py`` (branch ``affine``) holds the runtime's
reference with the same contract and the two are meant to be reconciled.
"""
from __future__ import annotations

import numpy as np


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values ``q`` [rows, cols] -> uint32 words [rows, cols * bits // 32]."""
    rows, cols = q.shape
    if (cols * bits) % 32:
        raise ValueError(f"rows of {cols} values at {bits} bits do not fill whole uint32 words")
    # LSB-first bits of every value, laid end to end per row: the row's bitstream.
    stream = ((q.astype(np.uint8)[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(rows, cols * bits)
    packed = np.packbits(stream, axis=-1, bitorder="little")  # bytes, little-endian within words
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32, copy=False).reshape(rows, cols * bits // 32)


def unpack(words: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """uint32 words [rows, cols * bits // 32] -> uint8 values [rows, cols]."""
    rows = words.shape[0]
    stream = np.unpackbits(np.ascontiguousarray(words, dtype="<u4").view(np.uint8).reshape(rows, -1),
                           axis=-1, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return (stream.reshape(rows, cols, bits) * weights).sum(axis=-1, dtype=np.uint8)


def dequantize_q(q: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int) -> np.ndarray:
    """``scales * q + biases`` per group, float32 [rows, cols] (scales/biases [rows, cols/group])."""
    rows, cols = q.shape
    s = scales.astype(np.float32)[:, :, None]
    b = biases.astype(np.float32)[:, :, None]
    return (q.reshape(rows, cols // group_size, group_size).astype(np.float32) * s + b).reshape(rows, cols)


def dequantize(words: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
               group_size: int) -> np.ndarray:
    """Packed words + per-group scales/biases -> float32 weights [rows, cols]."""
    cols = scales.shape[1] * group_size
    return dequantize_q(unpack(words, bits, cols), scales, biases, group_size)
