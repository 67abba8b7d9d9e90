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

These row formats hold *values* (groups along ``head_dim``, in a Hadamard basis) and 16-bit
keys. Quantized *keys* are stored per channel instead, as KIVI does: keys have outlier channels
with a steady offset, which a group along ``head_dim`` cannot absorb but a group along tokens
can (on the default model, 4-bit keys cost +4.9% perplexity per token and +0.6% per channel).
A key group holds 32 consecutive tokens of one head:

* codes: 32 tokens x ``head_dim`` channels at ``bits``, token-major (4: channel ``j`` of a
  token in the low nibble of its byte ``j``, channel ``j + head_dim / 2`` in the high nibble;
  8: one byte per channel), so that a query meets each token's codes as one contiguous row;
* then an f16 scale ``d`` per channel and an f16 minimum ``m`` per channel: ``x = d * q + m``.

A group is written once, when its last token arrives, from 16-bit copies of its tokens (the
cache keeps the most recent tokens at 16 bits anyway, see ``runtime/kv_cache``); evicting
tokens later never rewrites it. ``head_dim`` must be a multiple of 32 for the quantized kinds.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .lowlevel import f16_to_f32, f32_to_f16
from .quant_simd import dot_f32, vload_f16, vstore

KV_GROUP = 32
KV_BITS = (16, 8, 4)
Q8_GROUP_BYTES = 2 + KV_GROUP  # a value group at 8 bits: d | int8[32]
Q4_GROUP_BYTES = 4 + KV_GROUP // 2  # at 4 bits: d | m | 16 bytes of nibbles


def key_group_bytes(bits: int, head_dim: int) -> int:
    """Bytes of one quantized key group: 32 tokens of ``head_dim`` channels at ``bits`` (8 or 4)."""
    row_bytes(bits, head_dim)  # validates
    return head_dim * KV_GROUP * bits // 8 + 4 * head_dim


def row_bytes(bits: int, head_dim: int) -> int:
    """Bytes of one cached row of ``head_dim`` values at ``bits`` (16, 8 or 4)."""
    if bits not in KV_BITS:
        raise ValueError(f"KV cache bits must be one of {KV_BITS}, got {bits!r}")
    if bits != 16 and head_dim % KV_GROUP:
        raise ValueError(f"a {bits}-bit KV cache needs head_dim divisible by {KV_GROUP}, got {head_dim}")
    if bits == 16:
        return 2 * head_dim
    if bits == 8:
        return head_dim // KV_GROUP * Q8_GROUP_BYTES
    return head_dim // KV_GROUP * Q4_GROUP_BYTES


@njit(nogil=True, inline="always", cache=True)
def _put_f16(dst, o, x):
    h = f32_to_f16(x)
    dst[o] = np.uint8(h & np.uint16(0xFF))
    dst[o + 1] = np.uint8(h >> np.uint16(8))


@njit(nogil=True, inline="always", cache=True)
def _get_f16(src, o):
    return f16_to_f32(np.uint16(src[o]) | (np.uint16(src[o + 1]) << np.uint16(8)))


@njit(nogil=True, cache=True)
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
            o = g * Q8_GROUP_BYTES
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
            o = g * Q4_GROUP_BYTES
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


@njit(nogil=True, cache=True)
def load_row(src, bits, out, head_dim):
    """out[:head_dim] = the row encoded in src, as float32."""
    if bits == 16:
        # 8 halves per vcvtph2ps (a scalar loop of fpext(half) is several times slower)
        n8 = head_dim - head_dim % 8
        for j in range(0, n8, 8):
            vstore(vload_f16(src, 2 * j), out, j)
        h = src.view(np.uint16)
        for j in range(n8, head_dim):
            out[j] = f16_to_f32(h[j])
        return
    for g in range(head_dim // KV_GROUP):
        ys = out[g * KV_GROUP: (g + 1) * KV_GROUP]
        if bits == 8:
            o = g * Q8_GROUP_BYTES
            d = _get_f16(src, o)
            q = src[o + 2: o + 2 + KV_GROUP].view(np.int8)
            for l in range(KV_GROUP):
                ys[l] = d * np.float32(q[l])
        else:
            o = g * Q4_GROUP_BYTES
            d = _get_f16(src, o)
            m = _get_f16(src, o + 2)
            half = KV_GROUP // 2
            qs = src[o + 4: o + 4 + half]
            for l in range(half):
                ys[l] = d * np.float32(qs[l] & np.uint8(0x0F)) + m
                ys[l + half] = d * np.float32(qs[l] >> np.uint8(4)) + m


@njit(nogil=True, cache=True)
def hadamard_groups(x, x0, head_dim):
    """x[x0 : x0 + head_dim] <- H x, with H the orthonormal 32-point Walsh-Hadamard transform on
    each group of 32 (H is symmetric and its own inverse).

    Why: one outlier sets the scale of its whole group, leaving the other 31 values a few
    levels (QuaRot, SpinQuant). Value rows are stored rotated by the orthogonal H, which spreads
    each outlier over the group, and attention rotates its output back (sum_t p_t H v_t =
    H sum_t p_t v_t). Groups of 32 keep it exact for any head_dim the quantized cache accepts.
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


@njit(nogil=True, cache=True)
def store_key_group(dst, bits, rows, first, count, n_rows, head_dim):
    """dst[:key_group_bytes] = the key group of tokens first .. first + count - 1 (count <= 32),
    read from the 16-bit rows ``rows[token % n_rows]`` (uint8 [n_rows, 2 * head_dim])."""
    levels = np.float32(15.0) if bits == 4 else np.float32(255.0)
    x = np.zeros((KV_GROUP, head_dim), dtype=np.float32)  # the group's keys, token-major
    for r in range(count):
        load_row(rows[(first + r) % n_rows], 16, x[r], head_dim)
    codes = head_dim * KV_GROUP * bits // 8
    dm = np.empty((2, head_dim), dtype=np.float32)  # scale and 1 / scale, per channel
    for j in range(head_dim):
        lo, hi = x[0, j], x[0, j]
        for r in range(1, count):
            lo = min(lo, x[r, j])
            hi = max(hi, x[r, j])
        _put_f16(dst, codes + 2 * j, (hi - lo) / levels)
        _put_f16(dst, codes + 2 * head_dim + 2 * j, lo)
        # Codes against the stored (f16-rounded) scale and minimum, so that decoding is unbiased.
        d = _get_f16(dst, codes + 2 * j)
        dm[0, j] = _get_f16(dst, codes + 2 * head_dim + 2 * j)
        dm[1, j] = np.float32(1.0) / d if d > 0 else np.float32(0.0)
    row_len = head_dim * bits // 8
    half = head_dim // 2
    for r in range(KV_GROUP):
        out = dst[r * row_len:(r + 1) * row_len]
        if bits == 4:
            for j in range(half):
                a = _code(x[r, j], dm[0, j], dm[1, j], levels)
                b = _code(x[r, j + half], dm[0, j + half], dm[1, j + half], levels)
                out[j] = np.uint8(a | (b << 4))
        else:
            for j in range(head_dim):
                out[j] = np.uint8(_code(x[r, j], dm[0, j], dm[1, j], levels))


@njit(nogil=True, inline="always", cache=True)
def _code(x, m, inv, levels):
    return np.int32(min(levels, max(np.float32(0.0), (x - m) * inv + np.float32(0.5))))


@njit(nogil=True, cache=True)
def key_group_params(src, bits, head_dim, dm):
    """dm[0, j], dm[1, j] = scale and minimum of channel j of the key group in src (float32)."""
    codes = head_dim * KV_GROUP * bits // 8
    for j in range(head_dim):
        dm[0, j] = _get_f16(src, codes + 2 * j)
        dm[1, j] = _get_f16(src, codes + 2 * head_dim + 2 * j)


@njit(nogil=True, cache=True)
def key_group_query(dm, q, q0, head_dim, aq):
    """Fold a group's scales into a query: aq[j] = q_j d_j, and return sum_j q_j m_j.

    Then q . key_l = aq . codes_l + that sum: each token costs one dot product with its codes.
    """
    for j in range(head_dim):
        aq[j] = q[q0 + j] * dm[0, j]
    return dot_f32(q[q0:q0 + head_dim], dm[1], head_dim)


@njit(nogil=True, cache=True)
def load_key_codes(src, bits, l, out, head_dim):
    """out[:head_dim] = the codes of token l of the key group in src, as float32."""
    row_len = head_dim * bits // 8
    c = src[l * row_len:(l + 1) * row_len]
    if bits == 4:
        half = head_dim // 2
        hi = out[half:]
        for j in range(half):
            out[j] = np.float32(c[j] & np.uint8(0x0F))
        for j in range(half):
            hi[j] = np.float32(c[j] >> np.uint8(4))
    else:
        for j in range(head_dim):
            out[j] = np.float32(c[j])
