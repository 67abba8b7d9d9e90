"""ggml tensor types: block geometry and NumPy reference (de)quantization.

Each quantized ggml type stores a row as consecutive fixed-size *blocks* of ``block_size``
weights packed into ``type_size`` bytes (layouts: ``ggml-common.h``; arithmetic:
``dequantize_row_*`` / ``quantize_row_*_ref`` in ``ggml-quants.c``). The classes here are the
readable, vectorized reference the numba kernels are tested against; they work on a whole
``uint8[n_blocks, type_size]`` array at once, never looping per block in Python.

Floating-point operations are done in float32 in the same order as ggml (e.g. ``(d * sc) * q -
dmin * m``), so results are bit-identical to ggml and to ``gguf.quants``.
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar

import numpy as np

QK_K = 256  # weights per super-block of the k-quants


class GGMLType(enum.IntEnum):
    """ggml's tensor type codes (``enum ggml_type`` in ``ggml.h``), as stored in GGUF."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


_T = GGMLType
# (weights per block, bytes per block) for every type ggml defines, so sizes can be computed and
# reported even for types this runtime cannot dequantize.
_GEOMETRY: Mapping[GGMLType, tuple[int, int]] = MappingProxyType({
    _T.F32: (1, 4), _T.F16: (1, 2), _T.BF16: (1, 2), _T.F64: (1, 8),
    _T.I8: (1, 1), _T.I16: (1, 2), _T.I32: (1, 4), _T.I64: (1, 8),
    _T.Q4_0: (32, 2 + 16), _T.Q4_1: (32, 4 + 16), _T.Q5_0: (32, 2 + 4 + 16),
    _T.Q5_1: (32, 4 + 4 + 16), _T.Q8_0: (32, 2 + 32), _T.Q8_1: (32, 4 + 4 + 32),
    _T.Q2_K: (QK_K, 4 + QK_K // 16 + QK_K // 4),
    _T.Q3_K: (QK_K, 2 + QK_K // 4 + QK_K // 8 + 12),
    _T.Q4_K: (QK_K, 4 + 12 + QK_K // 2),
    _T.Q5_K: (QK_K, 4 + 12 + QK_K // 8 + QK_K // 2),
    _T.Q6_K: (QK_K, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
    _T.Q8_K: (QK_K, 4 + QK_K + QK_K // 8),
    _T.IQ2_XXS: (QK_K, 2 + QK_K // 4), _T.IQ2_XS: (QK_K, 2 + QK_K // 4 + QK_K // 32),
    _T.IQ3_XXS: (QK_K, 2 + QK_K // 4 + QK_K // 8), _T.IQ1_S: (QK_K, 2 + QK_K // 8 + QK_K // 16),
    _T.IQ4_NL: (32, 2 + 16), _T.IQ3_S: (QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    _T.IQ2_S: (QK_K, 2 + QK_K // 4 + QK_K // 16), _T.IQ4_XS: (QK_K, 4 + QK_K // 2 + QK_K // 64),
    _T.IQ1_M: (QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),
    _T.TQ1_0: (QK_K, 2 + 4 * 13), _T.TQ2_0: (QK_K, 2 + 64),
    _T.MXFP4: (32, 1 + 16), _T.NVFP4: (64, 4 + 32), _T.Q1_0: (128, 2 + 16),
})


def block_size(t: GGMLType) -> int:
    """Weights per block of type ``t`` (1 for the plain float/int types)."""
    return _GEOMETRY[GGMLType(t)][0]


def type_size(t: GGMLType) -> int:
    """Bytes per block of type ``t``."""
    return _GEOMETRY[GGMLType(t)][1]


def row_nbytes(t: GGMLType, n: int) -> int:
    """Bytes of a row of ``n`` weights of type ``t``; ``n`` must be a whole number of blocks."""
    bs, ts = _GEOMETRY[GGMLType(t)]
    if n < 0 or n % bs:
        raise ValueError(f"row of {n} weights is not a multiple of the {GGMLType(t).name} block size {bs}")
    return n // bs * ts


# ---------------------------------------------------------------------------------------------
# Field access and bit unpacking shared by all layouts.


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The little-endian half at byte ``at`` of every block, as float32[n_blocks, 1] (exact)."""
    return blocks[:, at:at + 2].view("<f2").astype(np.float32)


def _split_bits(x: np.ndarray, width: int, count: int) -> np.ndarray:
    """Unpack ``count`` fields of ``width`` bits from each byte, low bits first.

    uint8[..., L] -> uint8[..., count, L] with ``out[..., f, l] = (x[..., l] >> f*width) & mask``:
    ggml packs consecutive runs of weights into the successive bit fields of the same bytes.
    """
    shifts = (np.arange(count, dtype=np.uint8) * np.uint8(width))[:, None]
    return (x[..., None, :] >> shifts) & np.uint8((1 << width) - 1)


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eight 6-bit scales and eight 6-bit mins of Q4_K/Q5_K from their 12 packed bytes.

    Bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; scales/mins 4-7 keep
    their low nibble in bytes 8-11 and their top 2 bits in the spare top bits of bytes 0-7
    (``get_scale_min_k4``). Returns two float32[n_blocks, 8].
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([a & 63, (c & 0xF) | ((a >> 6) << 4)], axis=1)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# One class per supported type.


class QuantType(ABC):
    """Geometry and reference codec of one ggml type; instances are stateless."""

    gtype: ClassVar[GGMLType]

    @property
    def block_size(self) -> int:
        return block_size(self.gtype)

    @property
    def type_size(self) -> int:
        return type_size(self.gtype)

    @abstractmethod
    def dequantize(self, blocks: np.ndarray) -> np.ndarray:
        """uint8[n_blocks, type_size] -> float32[n_blocks, block_size]."""

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """float32[n_blocks, block_size] -> uint8[n_blocks, type_size] (ggml's reference rounding)."""
        raise NotImplementedError(f"no reference quantizer for {self.gtype.name}")


class F32(QuantType):
    gtype = GGMLType.F32

    def dequantize(self, blocks: np.ndarray) -> np.ndarray:
        # A view, not a copy: F32 tensors are used in place (read-only when memory-mapped).
        return blocks.view("<f4")


class F16(QuantType):
    gtype = GGMLType.F16

    def dequantize(self, blocks: np.ndarray) -> np.ndarray:
        return blocks.view("<f2").astype(np.float32)


class BF16(QuantType):
    gtype = GGMLType.BF16

    def dequantize(self, blocks: np.ndarray) -> np.ndarray:
        # bfloat16 is the top half of a float32.
        return (blocks.view("<u2").astype(np.uint32) << 16).view(np.float32)


class Q8_0(QuantType):
    """32 x int8 times an f16 scale ``d``."""

    gtype = GGMLType.Q8_0

    def dequantize(self, blocks: np.ndarray) -> np.ndarray:
        return blocks[:, 2:].view(np.int8).astype(np.float32) * _f16(blocks, 0)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
        q = _round_half_away(x * _reciprocal(d)).astype(np.int8)
        return np.concatenate([_to_f16_bytes(d), q.view(np.uint8)], axis=1)


class _Legacy32(QuantType):
    """Q4_0/Q4_1/Q5_0/Q5_1: 32 weights, f16 scale ``d``, optional f16 min ``m``, 4-bit low parts.

    Weight ``j < 16`` is the low nibble of ``qs[j]``, weight ``j + 16`` its high nibble; the 5-bit
    types add bit ``j`` of a little-endian uint32 ``qh`` as bit 4. Symmetric types subtract the
    midpoint (8 or 16) and scale; asymmetric ones compute ``q * d + m``.
    """

    has_min: ClassVar[bool]
    high_bit: ClassVar[bool]

    def dequantize(self, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        d = _f16(blocks, 0)
        pos = 4 if self.has_min else 2
        q = _split_bits(blocks[:, -16:], 4, 2).reshape(n, 32)
        if self.high_bit:
            q |= np.unpackbits(blocks[:, pos:pos + 4], axis=1, bitorder="little") << np.uint8(4)
        if self.has_min:
            return q.astype(np.float32) * d + _f16(blocks, 2)
        midpoint = np.int8(16 if self.high_bit else 8)
        return (q.view(np.int8) - midpoint).astype(np.float32) * d


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8[n, 32] of 4-bit values -> uint8[n, 16] in the Q4_0/Q4_1 nibble order."""
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


class Q4_0(_Legacy32):
    gtype = GGMLType.Q4_0
    has_min, high_bit = False, False

    def quantize(self, x: np.ndarray) -> np.ndarray:
        # The scale maps the value of largest magnitude (first one on ties, sign kept) to -8.
        extreme = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
        d = extreme / np.float32(-8)
        q = _trunc_to_nibble(x * _reciprocal(d) + np.float32(8.5))
        return np.concatenate([_to_f16_bytes(d), _pack_nibbles(q)], axis=1)


class Q4_1(_Legacy32):
    gtype = GGMLType.Q4_1
    has_min, high_bit = True, False

    def quantize(self, x: np.ndarray) -> np.ndarray:
        lo = x.min(axis=1, keepdims=True)
        d = (x.max(axis=1, keepdims=True) - lo) / np.float32(15)
        q = _trunc_to_nibble((x - lo) * _reciprocal(d) + np.float32(0.5))
        return np.concatenate([_to_f16_bytes(d), _to_f16_bytes(lo), _pack_nibbles(q)], axis=1)


class Q5_0(_Legacy32):
    gtype = GGMLType.Q5_0
    has_min, high_bit = False, True


class Q5_1(_Legacy32):
    gtype = GGMLType.Q5_1
    has_min, high_bit = True, True


class _KQuant4(QuantType):
    """Q4_K/Q5_K: f16 ``d``/``dmin``, 12 bytes of 6-bit scales/mins, then the weights.

    256 weights in 8 sub-blocks of 32; sub-block ``s`` is ``d*sc[s] * q - dmin*m[s]``. Each
    32-byte run of ``qs`` holds two sub-blocks (low nibbles, then high nibbles); Q5_K's
    ``qh[l]`` gives bit 4 of weight ``l`` of sub-block ``s`` in its bit ``s``.
    """

    high_bit: ClassVar[bool]

    def dequantize(self, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        scales, mins = _k_scales_mins(blocks[:, 4:16])
        q = _split_bits(blocks[:, -QK_K // 2:].reshape(n, 4, 32), 4, 2).reshape(n, 8, 32)
        if self.high_bit:
            q |= _split_bits(blocks[:, 16:16 + QK_K // 8], 1, 8) << np.uint8(4)
        d = (_f16(blocks, 0) * scales)[:, :, None]
        m = (_f16(blocks, 2) * mins)[:, :, None]
        return (d * q.astype(np.float32) - m).reshape(n, QK_K)


class Q4_K(_KQuant4):
    gtype = GGMLType.Q4_K
    high_bit = False


class Q5_K(_KQuant4):
    gtype = GGMLType.Q5_K
    high_bit = True


def _scaled_16s(blocks_d: np.ndarray, scales: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``(d * scale[i]) * q`` for 16 groups of 16 weights: the tail shared by Q3_K and Q6_K."""
    n = q.shape[0]
    dl = (blocks_d * scales.astype(np.float32))[:, :, None]
    return (dl * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


class Q6_K(QuantType):
    """``ql[128] qh[64] scales[16] (int8) d``: 6-bit weights minus 32, 16 scales per 256.

    Each half (128 weights) takes 64 bytes of ``ql`` and 32 of ``qh``: weight ``32*g + l`` has
    its low 4 bits in the low (g = 0, 1) or high (g = 2, 3) nibble of ``ql[32*(g % 2) + l]`` and
    its top 2 bits in bits ``2g, 2g+1`` of ``qh[l]``.
    """

    gtype = GGMLType.Q6_K

    def dequantize(self, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        ql = _split_bits(blocks[:, :128].reshape(n, 2, 64), 4, 2).reshape(n, 2, 4, 32)
        qh = _split_bits(blocks[:, 128:192].reshape(n, 2, 32), 2, 4)
        q = (ql | (qh << np.uint8(4))).view(np.int8) - np.int8(32)
        return _scaled_16s(_f16(blocks, 208), blocks[:, 192:208].view(np.int8), q)


class Q3_K(QuantType):
    """``hmask[32] qs[64] scales[12] d``: 3-bit weights, 16 signed 6-bit scales per 256.

    Weight ``128*h + 32*j + l`` has low bits ``(qs[32*h + l] >> 2j) & 3`` and loses 4 unless bit
    ``4h + j`` of ``hmask[l]`` is set. Scale ``i`` has its low nibble in ``scales[i % 8]``
    (low/high nibble for i < 8 / i >= 8) and its top 2 bits in ``scales[8 + i % 4]`` at bit
    ``2 * (i // 4)``; it is stored offset by 32.
    """

    gtype = GGMLType.Q3_K

    def dequantize(self, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        low = _split_bits(blocks[:, 32:96].reshape(n, 2, 32), 2, 4).reshape(n, 8, 32)
        high = _split_bits(blocks[:, :32], 1, 8)
        q = low.view(np.int8) - ((np.uint8(1) - high) << np.uint8(2)).view(np.int8)
        packed = blocks[:, 96:108]
        sc_lo = _split_bits(packed[:, :8], 4, 2).reshape(n, 16)
        sc_hi = _split_bits(packed[:, 8:], 2, 4).reshape(n, 16)
        scales = (sc_lo | (sc_hi << np.uint8(4))).view(np.int8) - np.int8(32)
        return _scaled_16s(_f16(blocks, 108), scales, q)


# ---------------------------------------------------------------------------------------------
# Reference-rounding helpers of the quantizers (bit-exact with ggml's *_ref functions).


def _reciprocal(d: np.ndarray) -> np.ndarray:
    """``1/d``, or 0 where ``d == 0`` (an all-zero block)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: round half away from zero (NumPy's ``rint`` rounds half to even).

    ``floor(a + 0.5)`` would be wrong for a = 0.49999997 (the sum rounds up to 1.0), so the
    fractional part, which is exact, is compared instead.
    """
    a = np.abs(v)
    whole = np.floor(a)
    return np.copysign(whole + (a - whole >= np.float32(0.5)), v)


def _trunc_to_nibble(v: np.ndarray) -> np.ndarray:
    """C's ``MIN(15, (int8_t)v)`` for ``0 <= v < 17``: truncate toward zero, then saturate.

    Cast before saturating, as ggml does: in a degenerate block (scale so tiny that ``1/d``
    overflows) ``v`` is inf/NaN and the result is whatever the cast gives, in ggml too.
    """
    return np.minimum(np.trunc(v).astype(np.uint8), np.uint8(15))


def _to_f16_bytes(v: np.ndarray) -> np.ndarray:
    """float32[n, 1] -> uint8[n, 2]: little-endian half, round to nearest even."""
    return v.astype("<f2").view(np.uint8)


QUANT_TYPES: Mapping[GGMLType, QuantType] = MappingProxyType({
    q.gtype: q
    for q in (F32(), F16(), BF16(), Q8_0(), Q4_0(), Q4_1(), Q5_0(), Q5_1(),
              Q4_K(), Q5_K(), Q6_K(), Q3_K())
})


def _codec(gtype: GGMLType) -> QuantType:
    try:
        return QUANT_TYPES[GGMLType(gtype)]
    except KeyError:
        raise NotImplementedError(f"ggml type {GGMLType(gtype).name} is not supported") from None


def dequantize(raw: np.ndarray, gtype: GGMLType, shape: Sequence[int]) -> np.ndarray:
    """Dequantize the bytes of a tensor into float32 of ``shape`` (NumPy order: rows last-major).

    ``raw`` must hold exactly the tensor's bytes (any shape; it is flattened without copying).
    F32 tensors come back as a view of ``raw``.
    """
    codec = _codec(gtype)
    shape = tuple(int(s) for s in shape)
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    expected = n_rows * row_nbytes(codec.gtype, shape[-1]) if shape else 0
    raw = raw.reshape(-1).view(np.uint8)
    if not shape or raw.size != expected:
        raise ValueError(f"{codec.gtype.name} tensor of shape {shape} needs {expected} bytes, got {raw.size}")
    return codec.dequantize(raw.reshape(-1, codec.type_size)).reshape(shape)


def quantize(x: np.ndarray, gtype: GGMLType) -> np.ndarray:
    """Quantize float32[..., n] rows to ggml blocks: uint8[..., row_nbytes(gtype, n)]."""
    codec = _codec(gtype)
    x = np.asarray(x, dtype=np.float32)
    nbytes = row_nbytes(codec.gtype, x.shape[-1])
    blocks = codec.quantize(np.ascontiguousarray(x).reshape(-1, codec.block_size))
    return blocks.reshape(*x.shape[:-1], nbytes)
