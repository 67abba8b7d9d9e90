"""GGUF tensors -> MLX weights: affine group-quantized matrices for ``mx.quantized_matmul``.

MLX's affine format (``mx.quantize(w, group_size, bits)``) stores a matrix W [rows, cols] as
codes q in [0, 2**bits - 1] packed little-endian into uint32 words per row, plus one scale and
one bias per group of ``group_size`` consecutive values of a row::

    W[r, g*G + j] = scales[r, g] * q[r, g*G + j] + biases[r, g]

How each GGUF type gets there (G = group size):

* edgelm's affine INT4/INT3 tensors (``runtime/affine``): *as they are* -- the converter writes
  MLX's packing, so the words go to MLX unchanged (tested against ``mx.quantize``); scales
  and biases likewise.
* Q4_0 (32 weights, f16 ``d``, value ``d * (q - 8)``): 4 bits, G = 32, scale ``d``, bias
  ``-8 d``. Exact: ``-8 d`` is an f16 (a power-of-two multiple) and ``d * q + (-8 d)`` is the
  representable ``d * (q - 8)``, so no rounding happens anywhere. Only the nibble order changes
  (GGML keeps weights j and j + 16 in one byte, MLX weights 2k and 2k + 1).
* Q4_1 (``d * q + m``): 4 bits, G = 32, scale ``d``, bias ``m``: exact.
* Q8_0 (int8 ``q``, value ``d * q``): 8 bits, G = 32, code ``q + 128`` (the sign bit flipped),
  scale ``d``, bias ``-128 d``: exact for the same reason as Q4_0.
* Q5_0 / Q5_1: 5 bits, G = 32, bias ``-16 d`` / ``m``: exact.
* Q4_K / Q5_K (sub-blocks of 32 with 6-bit scale ``sc`` and min ``mn`` under f16 ``d``,
  ``dmin``; value ``d sc q - dmin mn``): 4 / 5 bits, G = 32, scale ``d * sc``, bias
  ``-dmin * mn``, both exact in float32 (so scales are kept in float32 for these): exact.
* Q6_K and Q3_K use sub-blocks of 16, and MLX's smallest group is 32: they are dequantized once
  at load and re-quantized by ``mx.quantize`` (Q6_K -> 8 bits, Q3_K -> 6 bits, G = 32): the only
  lossy conversion. Its effect on perplexity is measured in the README.
* F32 / F16 / BF16 matrices stay dense (float32).

Scales and biases are held as float32 (every f16 value converts exactly): MLX's CPU
``quantized_matmul`` with float32 activations is fastest with float32 scales (f16 ones are cast
on every call), at the cost of 1 bit per weight more than f16 at G = 32.

Loading reads each tensor from the memory-mapped file, converts it with NumPy and hands it to
MLX -- one tensor at a time, so the only transient copy is of one tensor, never of the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import mlx.core as mx
import numpy as np

from ..runtime import quants
from ..runtime.quants import GGMLType, QK_K

MLX_BITS = (2, 3, 4, 5, 6, 8)
# Lossy re-quantization targets (bits) of the GGML types whose sub-blocks MLX cannot express.
REQUANT_BITS = {GGMLType.Q6_K: 8, GGMLType.Q3_K: 6}
REQUANT_GROUP = 32
EXACT_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q5_1,
               GGMLType.Q4_K, GGMLType.Q5_K)
DENSE_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


@dataclass
class QuantWeight:
    """An affine group-quantized matrix W [rows, cols] in MLX's format."""

    w: mx.array          # uint32 [rows, cols * bits / 32]
    scales: mx.array     # float32 [rows, cols / group_size]
    biases: mx.array     # like scales
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.w.shape[0]), int(self.w.shape[1]) * 32 // self.bits

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.scales.nbytes + self.biases.nbytes

    def matmul(self, x: mx.array) -> mx.array:
        """x [..., cols] @ W.T -> [..., rows]."""
        return mx.quantized_matmul(x, self.w, self.scales, self.biases, transpose=True,
                                   group_size=self.group_size, bits=self.bits)

    def rows(self, ids: mx.array) -> mx.array:
        """float32 rows ``W[ids]`` (an embedding lookup)."""
        return mx.dequantize(self.w[ids], self.scales[ids], self.biases[ids], group_size=self.group_size,
                             bits=self.bits).astype(mx.float32)

    def dequantize(self) -> mx.array:
        return mx.dequantize(self.w, self.scales, self.biases, group_size=self.group_size,
                             bits=self.bits).astype(mx.float32)


@dataclass
class DenseWeight:
    """A float32 matrix W [rows, cols] (from F32/F16/BF16 tensors)."""

    w: mx.array

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.w.shape[0]), int(self.w.shape[1])

    @property
    def nbytes(self) -> int:
        return self.w.nbytes

    def matmul(self, x: mx.array) -> mx.array:
        return x @ self.w.T

    def rows(self, ids: mx.array) -> mx.array:
        return self.w[ids]

    def dequantize(self) -> mx.array:
        return self.w


Weight = Union[QuantWeight, DenseWeight]


# ---------------------------------------------------------------------------------------------
# packing


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words [rows, cols * bits / 32] of codes q uint8 [rows, cols] in MLX's packing:
    each row a little-endian bitstream, value j at stream bit ``bits * j``."""
    q = np.ascontiguousarray(q, dtype=np.uint8)
    rows, cols = q.shape
    if bits not in MLX_BITS or (cols * bits) % 32:
        raise ValueError(f"cannot pack {cols} {bits}-bit values per row into whole uint32 words")
    if bits == 8:
        return q.view("<u4").astype(np.uint32, copy=False)
    if bits == 4:
        return (q[:, 0::2] | (q[:, 1::2] << np.uint8(4))).view("<u4").astype(np.uint32, copy=False)
    stream = ((q[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(rows, cols * bits)
    return np.packbits(stream, axis=1, bitorder="little").view("<u4").astype(np.uint32, copy=False)


def _quant(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group: int,
           dtype: type = np.float32) -> QuantWeight:
    """A QuantWeight from codes uint8 [rows, cols] and scales/biases [rows, cols / group]."""
    return QuantWeight(mx.array(pack(codes, bits)), mx.array(scales.astype(dtype)),
                       mx.array(biases.astype(dtype)), bits, group)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """float32 [n_blocks] of the little-endian half at byte ``at`` of every block."""
    return blocks[:, at:at + 2].view("<f2")[:, 0].astype(np.float32)


def _legacy_codes(blocks: np.ndarray, high_bit_at: int | None) -> np.ndarray:
    """uint8 [n_blocks, 32] codes of Q4_x/Q5_x blocks in element order (low nibble of byte j is
    weight j, high nibble weight j + 16; the 5-bit types' ``qh`` gives bit 4)."""
    qs = blocks[:, -16:]
    q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=1)
    if high_bit_at is not None:
        q |= np.unpackbits(blocks[:, high_bit_at:high_bit_at + 4], axis=1, bitorder="little") << np.uint8(4)
    return q


def convert_blocks(raw: np.ndarray, gtype: GGMLType, rows: int, cols: int) -> Weight:
    """MLX weight of a GGUF tensor: ``raw`` its bytes (uint8, any shape), [rows, cols] its NumPy shape."""
    gtype = GGMLType(gtype)
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if gtype in DENSE_TYPES:
        return DenseWeight(mx.array(quants.dequantize(raw, gtype, (rows, cols))))
    if gtype in REQUANT_BITS:
        dense = mx.array(quants.dequantize(raw, gtype, (rows, cols)))
        w, s, b = mx.quantize(dense, group_size=REQUANT_GROUP, bits=REQUANT_BITS[gtype])
        del dense
        return QuantWeight(w, s, b, REQUANT_BITS[gtype], REQUANT_GROUP)
    if gtype not in EXACT_TYPES:
        raise NotImplementedError(f"ggml type {gtype.name} is not supported by the MLX backend")
    bs, ts = quants.block_size(gtype), quants.type_size(gtype)
    blocks = raw.reshape(-1, ts)
    if blocks.shape[0] * bs != rows * cols:
        raise ValueError(f"{gtype.name} tensor of {rows} x {cols} needs {rows * cols // bs} blocks, got {blocks.shape[0]}")
    if gtype in (GGMLType.Q4_0, GGMLType.Q5_0):
        d = _f16(blocks, 0)
        bits, mid = (4, 8) if gtype == GGMLType.Q4_0 else (5, 16)
        q = _legacy_codes(blocks, None if bits == 4 else 2)
        return _quant(q.reshape(rows, cols), d.reshape(rows, -1), (-mid * d).reshape(rows, -1), bits, 32)
    if gtype in (GGMLType.Q4_1, GGMLType.Q5_1):
        bits = 4 if gtype == GGMLType.Q4_1 else 5
        q = _legacy_codes(blocks, None if bits == 4 else 4)
        return _quant(q.reshape(rows, cols), _f16(blocks, 0).reshape(rows, -1), _f16(blocks, 2).reshape(rows, -1),
                      bits, 32)
    if gtype == GGMLType.Q8_0:
        d = _f16(blocks, 0)
        q = blocks[:, 2:] ^ np.uint8(0x80)  # int8 q -> q + 128
        return _quant(q.reshape(rows, cols), d.reshape(rows, -1), (-128 * d).reshape(rows, -1), 8, 32)
    # Q4_K / Q5_K: 8 sub-blocks of 32 per 256-weight block.
    n = blocks.shape[0]
    sc, mn = quants._k_scales_mins(blocks[:, 4:16])
    q = quants._split_bits(blocks[:, -QK_K // 2:].reshape(n, 4, 32), 4, 2).reshape(n, 8, 32)
    bits = 4
    if gtype == GGMLType.Q5_K:
        q |= quants._split_bits(blocks[:, 16:16 + QK_K // 8], 1, 8) << np.uint8(4)
        bits = 5
    scales = _f16(blocks, 0)[:, None] * sc
    biases = -(_f16(blocks, 2)[:, None] * mn)
    return _quant(q.reshape(rows, cols), scales.reshape(rows, -1), biases.reshape(rows, -1), bits, 32)


def convert_affine(words: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
                   group_size: int) -> QuantWeight:
    """An affine INT4/INT3 tensor of the converter (``runtime/affine``): MLX's packing already,
    so the words go in unchanged. words uint32 [rows, cols*bits/32]; scales/biases f16 [rows, groups]."""
    return QuantWeight(mx.array(np.ascontiguousarray(words).view(np.uint32)),
                       mx.array(np.asarray(scales, dtype=np.float32)),
                       mx.array(np.asarray(biases, dtype=np.float32)), bits, group_size)
