"""Rows of the KV cache at 16, 8 or 4 bits: one key or value vector of one head and one token.

Every cache kind stores a row as ``row_bytes(bits, head_dim)`` bytes, so the compiled forward pass
has one signature whatever the cache holds and picks the format with a runtime integer:

* 16: IEEE half precision, ``2 * head_dim`` bytes.
* 8:  llama.cpp's q8_0 per 32 values: an f16 scale ``d`` and 32 int8, ``x = d * q``
      (34 bytes per group).
* 4:  llama.cpp's q4_1 per 32 values: f16 scale ``d`` and minimum ``m``, then 32 nibbles
      (value ``l`` in the low nibble of byte ``l`` for l < 16, in the high nibble of byte
      ``l - 16`` otherwise), ``x = d * q + m`` (20 bytes per group). The offset matters:
      rows of keys are rarely centred on zero.

Groups run along ``head_dim`` within one token, so a row never changes once written: evicting or
trimming other tokens never dequantizes and re-quantizes what stays (KIVI-style per-channel keys
would have to). ``head_dim`` must be a multiple of 32 for the quantized kinds.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .lowlevel import f16_to_f32, f32_to_f16

KV_GROUP = 32
KV_BITS = (16, 8, 4)
_Q8_BYTES = 2 + KV_GROUP
_Q4_BYTES = 4 + KV_GROUP // 2


def row_bytes(bits: int, head_dim: int) -> int:
    """Bytes of one cached row of ``head_dim`` values at ``bits`` (16, 8 or 4)."""
    if bits not in KV_BITS:
        raise ValueError(f"KV cache bits must be one of {KV_BITS}, got {bits!r}")
    if bits != 16 and head_dim % KV_GROUP:
        raise ValueError(f"a {bits}-bit KV cache needs head_dim divisible by {KV_GROUP}, got {head_dim}")
    if bits == 16:
        return 2 * head_dim
    if bits == 8:
        return head_dim // KV_GROUP * _Q8_BYTES
    return head_dim // KV_GROUP * _Q4_BYTES


@njit(nogil=True, inline="always", cache=True)
def _put_f16(dst, o, x):
    h = f32_to_f16(x)
    dst[o] = np.uint8(h & np.uint16(0xFF))
    dst[o + 1] = np.uint8(h >> np.uint16(8))


@njit(nogil=True, inline="always", cache=True)
def _get_f16(src, o):
    return f16_to_f32(np.uint16(src[o]) | (np.uint16(src[o + 1]) << np.uint16(8)))


@njit(nogil=True, fastmath=True, cache=True)
def store_row(dst, bits, x, x0, head_dim):
    """dst[:row_bytes] = the row x[x0 : x0 + head_dim] encoded at ``bits``."""
    if bits == 16:
        h = dst.view(np.uint16)
        for j in range(head_dim):
            h[j] = f32_to_f16(x[x0 + j])
        return
    for g in range(head_dim // KV_GROUP):
        xs = x[x0 + g * KV_GROUP: x0 + (g + 1) * KV_GROUP]
        if bits == 8:
            o = g * _Q8_BYTES
            amax = np.float32(0.0)
            for l in range(KV_GROUP):
                amax = max(amax, abs(xs[l]))
            d = amax / np.float32(127.0)
            _put_f16(dst, o, d)
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            q = dst[o + 2: o + 2 + KV_GROUP].view(np.int8)
            for l in range(KV_GROUP):
                q[l] = np.int8(np.rint(xs[l] * inv))
        else:
            o = g * _Q4_BYTES
            lo, hi = xs[0], xs[0]
            for l in range(KV_GROUP):
                lo = min(lo, xs[l])
                hi = max(hi, xs[l])
            d = (hi - lo) / np.float32(15.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            _put_f16(dst, o, d)
            _put_f16(dst, o + 2, lo)
            half = KV_GROUP // 2
            for l in range(half):
                # trunc(x + 0.5) as ggml's q4_1 reference (and gguf-py) round
                a = min(np.int32(15), np.int32((xs[l] - lo) * inv + np.float32(0.5)))
                b = min(np.int32(15), np.int32((xs[l + half] - lo) * inv + np.float32(0.5)))
                dst[o + 4 + l] = np.uint8(a | (b << 4))


@njit(nogil=True, fastmath=True, cache=True)
def load_row(src, bits, out, head_dim):
    """out[:head_dim] = the row encoded in src, as float32."""
    if bits == 16:
        h = src.view(np.uint16)
        for j in range(head_dim):
            out[j] = f16_to_f32(h[j])
        return
    for g in range(head_dim // KV_GROUP):
        ys = out[g * KV_GROUP: (g + 1) * KV_GROUP]
        if bits == 8:
            o = g * _Q8_BYTES
            d = _get_f16(src, o)
            q = src[o + 2: o + 2 + KV_GROUP].view(np.int8)
            for l in range(KV_GROUP):
                ys[l] = d * np.float32(q[l])
        else:
            o = g * _Q4_BYTES
            d = _get_f16(src, o)
            m = _get_f16(src, o + 2)
            half = KV_GROUP // 2
            qs = src[o + 4: o + 4 + half]
            for l in range(half):
                ys[l] = d * np.float32(qs[l] & np.uint8(0x0F)) + m
                ys[l + half] = d * np.float32(qs[l] >> np.uint8(4)) + m


@njit(nogil=True, fastmath=True, cache=True)
def hadamard_groups(x, x0, head_dim):
    """x[x0 : x0 + head_dim] <- H x, with H the orthonormal 32-point Walsh-Hadamard transform on
    each group of 32 (H is symmetric and its own inverse).

    Why: keys have outlier channels, and one outlier sets the scale of its whole group, leaving
    the other 31 values a few levels (QuaRot, SpinQuant). Rotating keys *and* queries by the same
    orthogonal H leaves every q.k unchanged but spreads each outlier over the group; rotating
    values and, after attention, the output back does the same for values. Groups of 32 keep it
    exact for any head_dim the quantized cache accepts, and each group keeps its own scale.
    """
    norm = np.float32(1.0 / np.sqrt(KV_GROUP))
    for g in range(head_dim // KV_GROUP):
        v = x[x0 + g * KV_GROUP: x0 + (g + 1) * KV_GROUP]
        h = 1
        while h < KV_GROUP:
            for i in range(0, KV_GROUP, 2 * h):
                for j in range(i, i + h):
                    a = v[j]
                    b = v[j + h]
                    v[j] = a + b
                    v[j + h] = a - b
            h *= 2
        for j in range(KV_GROUP):
            v[j] *= norm
