"""NumPy quantizers for the ggml types ``--llama-cpp`` writes that runtime/quants.py cannot.

They follow ggml's reference functions (``quantize_row_q3_K_ref``, ``quantize_row_q4_K_ref``,
``quantize_row_q5_K_ref``, ``quantize_row_q6_K_ref``, ``quantize_row_q5_0_ref``,
``quantize_row_q5_1_ref`` in ``ggml-quants.c``), which is what llama.cpp's own quantizer runs when
it has no importance matrix: the same searches (``make_qkx2_quants`` for Q4_K's and Q5_K's scale and
min per 32 weights, ``make_qx_quants`` for Q6_K's scale per 16), the same round-to-nearest-even
(``nearest_int``), and the same float32 arithmetic, vectorized over all blocks at once instead of
looping per block. Sums are accumulated left to right (``cumsum``) as the C loops do, because
the searches compare errors and a differently rounded sum can pick a different candidate.

Each function maps float32[n_blocks, block_size] to uint8[n_blocks, type_size] and is checked
against ``gguf.quants``' dequantizers and against ggml itself in ``tests/test_convert_quants.py``.
"""
from __future__ import annotations

import numpy as np

from ..runtime.quants import QK_K, GGMLType, row_nbytes
from ..runtime.quants import quantize as _runtime_quantize

_F = np.float32
_GROUP_MAX_EPS = _F(1e-15)


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over the last axis (the order of ggml's C loops)."""
    return np.cumsum(a, axis=-1, dtype=np.float32)[..., -1]


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: round half to even (the 1.5 * 2**23 trick), as int32."""
    return np.rint(v).astype(np.int32)


def _f16_round(v: np.ndarray) -> np.ndarray:
    """The float32 value an f16 field will hold (``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))``)."""
    return v.astype(np.float16).astype(np.float32)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype("<f2").reshape(-1, 1).view(np.uint8)


# --------------------------------------------------------------------------------------------
# Q4_K: 8 sub-blocks of 32 with a 6-bit scale and min each, f16 super-scales d and dmin.


def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qkx2_quants`` (squared error) for every row of x: returns (scale, -min, L)."""
    xmin = np.minimum(x.min(axis=1), _F(0))
    xmax = x.max(axis=1)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    flat = xmax == xmin
    rng = np.where(flat, _F(1), xmax - xmin)
    mn = xmin[:, None]

    iscale = (_F(nmax) / rng)[:, None]
    scale = _F(1) / iscale[:, 0]
    L = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax)
    diff = scale[:, None] * L.astype(_F) + mn - x
    best = _seq_sum(w * (diff * diff))
    best_min = xmin.copy()
    for step in range(nstep + 1):
        # As in ggml, later candidates are centred on the best min found so far.
        cur_min = best_min[:, None]
        cur_rng = np.where(flat, _F(1), xmax - best_min)
        iscale = ((_F(rmin) + _F(rdelta) * _F(step) + _F(nmax)) / cur_rng)[:, None]
        with np.errstate(invalid="ignore", over="ignore"):
            laux = np.clip(_nearest_int(iscale * (x - cur_min)), 0, nmax)
        lf = laux.astype(_F)
        wl = w * lf
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * lf), _seq_sum(wl * x)
        d = sum_w * sum_l2 - sum_l * sum_l
        ok = d > 0
        dd = np.where(ok, d, _F(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / dd
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / dd
        pos = this_min > 0
        this_min = np.where(pos, _F(0), this_min)
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        diff = this_scale[:, None] * lf + this_min[:, None] - x
        err = _seq_sum(w * (diff * diff))
        better = ok & (err < best) & ~flat
        L = np.where(better[:, None], laux, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        best_min = np.where(better, this_min, best_min)
    scale = np.where(flat, _F(0), scale)
    L = np.where(flat[:, None], 0, L)
    return scale.astype(_F), (-best_min).astype(_F), L


def _scales_mins_k(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The part Q4_K and Q5_K share (``quantize_row_q{4,5}_K_ref``): per 32 weights a scale and a
    min from ``make_qkx2_quants``, both stored as 6-bit multiples of f16 super-scales, and the
    quants requantized against the stored values.

    float32[n, 256] -> (d, dmin: float32[n]; packed 6-bit scales/mins uint8[n, 12]; L int[n, 8, 32])."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    av_x = np.sqrt(_seq_sum(sub * sub) / _F(32))
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, L = _make_qkx2(sub, weights, nmax, rmin, rdelta, nstep)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.reshape(n, 8, 32)
    # ggml starts both maxima at +0 and only replaces them with larger values: never -0.
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    max_scale = np.where(max_scale > 0, max_scale, _F(0))
    max_min = np.where(max_min > 0, max_min, _F(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _F(63) / max_scale, _F(0))
        inv_min = np.where(max_min > 0, _F(63) / max_min, _F(0))
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales), 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins), 63).astype(np.uint8)
    packed = np.zeros((n, 12), np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    d = (max_scale / _F(63)).astype(_F)
    dmin = (max_min / _F(63)).astype(_F)
    # Requantize against the scales as stored (6-bit, times the f16 super-scales).
    dl = _f16_round(d)[:, None] * ls.astype(_F)
    ml = _f16_round(dmin)[:, None] * lm.astype(_F)
    nz = dl != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = np.clip(_nearest_int((x.reshape(n, 8, 32) + ml[:, :, None]) / dl[:, :, None]), 0, nmax)
    return d, dmin, packed, np.where(nz[:, :, None], lq, L)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32[n, 256] -> Q4_K blocks uint8[n, 144] (``quantize_row_q4_K_ref``)."""
    n = x.shape[0]
    d, dmin, packed, L = _scales_mins_k(x, 15, -1.0, 0.1, 20)
    pairs = L.astype(np.uint8).reshape(n, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qs], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """float32[n, 256] -> Q5_K blocks uint8[n, 176] (``quantize_row_q5_K_ref``): Q4_K's layout
    plus ``qh``, where bit 2c (2c + 1) of byte j is bit 4 of weight 64c + j (64c + 32 + j)."""
    n = x.shape[0]
    d, dmin, packed, L = _scales_mins_k(x, 31, -0.5, 0.1, 15)
    pairs = L.astype(np.uint8).reshape(n, 4, 2, 32)
    qs = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).reshape(n, 128)
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
    qh = np.bitwise_or.reduce(((pairs >> 4) & 1) << shifts, axis=(1, 2)).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qh, qs], axis=1)


# --------------------------------------------------------------------------------------------
# Q6_K: 16 sub-blocks of 16 with an int8 scale each, f16 super-scale d.


def _make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants`` with rmse_type 1 (weights x**2): returns (scale, L + nmax)."""
    idx = np.abs(x).argmax(axis=1)  # first of equal magnitudes, like the C loop's strict '>'
    xmax = np.take_along_axis(x, idx[:, None], axis=1)[:, 0]
    zero = np.abs(xmax) < _GROUP_MAX_EPS
    xmax = np.where(zero, _F(1), xmax)
    w = x * x
    wx = w * x

    def attempt(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        l = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = l.astype(_F)
        return l, _seq_sum(wx * lf), _seq_sum(w * lf * lf)

    L, sumlx, suml2 = attempt(_F(-nmax) / xmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, _F(0)).astype(_F)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, slx, sl2 = attempt(-(_F(nmax) + _F(0.1) * _F(step)) / xmax)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = slx / sl2
        L = np.where(better[:, None], l, L)
        scale = np.where(better, new_scale, scale).astype(_F)
        best = np.where(better, scale * slx, best)
    scale = np.where(zero, _F(0), scale)
    L = np.where(zero[:, None], 0, L + nmax)
    return scale, L


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32[n, 256] -> Q6_K blocks uint8[n, 210] (``quantize_row_q6_K_ref``)."""
    n = x.shape[0]
    scales, L = _make_qx(x.reshape(n * 16, 16), 32)
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
    zero = np.abs(max_scale) < _GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(zero, _F(0), _F(-128) / max_scale).astype(_F)
        d = np.where(zero, _F(0), _F(1) / iscale).astype(_F)
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    dl = _f16_round(d)[:, None] * sc.astype(_F)
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = np.clip(_nearest_int(x.reshape(n, 16, 16) / dl[:, :, None]), -32, 31) + 32
    L = np.where((dl != 0)[:, :, None], lq, L)
    L = np.where(zero[:, None, None], 0, L).astype(np.uint8).reshape(n, 2, 4, 32)
    low, high = L & 0xF, L >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    sc = np.where(zero[:, None], 0, sc).astype(np.int8)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), _f16_bytes(d)], axis=1)


# --------------------------------------------------------------------------------------------
# Q3_K: 16 sub-blocks of 16 with a 6-bit signed scale each, f16 super-scale d.


def _make_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants`` with do_rmse: start from round-to-nearest, then up to 5 passes that
    move one weight at a time to the level that lowers the weighted error (weights x**2)."""
    idx = np.abs(x).argmax(axis=1)
    xmax = np.take_along_axis(x, idx[:, None], axis=1)[:, 0]
    zero = np.abs(xmax) < _GROUP_MAX_EPS
    iscale = _F(-nmax) / np.where(zero, _F(1), xmax)
    L = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = L.astype(_F)
    sumlx, suml2 = _seq_sum(wx * lf), _seq_sum(w * lf * lf)
    for _ in range(5):  # a pass that changes nothing changes nothing the next time either
        for i in range(x.shape[1]):
            li = L[:, i].astype(_F)
            slx = sumlx - wx[:, i] * li
            sl2 = suml2 - w[:, i] * li * li
            with np.errstate(divide="ignore", invalid="ignore"):
                new = np.clip(_nearest_int(np.where(slx > 0, x[:, i] * sl2 / slx, _F(0))), -nmax, nmax - 1)
            nf = new.astype(_F)
            slx2 = slx + wx[:, i] * nf
            sl22 = sl2 + w[:, i] * nf * nf
            take = (slx > 0) & (new != L[:, i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = np.where(take, new, L[:, i])
            sumlx = np.where(take, slx2, sumlx)
            suml2 = np.where(take, sl22, suml2)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / suml2, _F(0)).astype(_F)
    scale = np.where(zero, _F(0), scale)
    L = np.where(zero[:, None], 0, L + nmax)
    return scale, L


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    """float32[n, 256] -> Q3_K blocks uint8[n, 110] (``quantize_row_q3_K_ref``)."""
    n = x.shape[0]
    scales, L = _make_q3(x.reshape(n * 16, 16), 4)
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
    has = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(has, _F(-32) / max_scale, _F(0)).astype(_F)
        d = np.where(has, _F(1) / iscale, _F(0)).astype(_F)
    ls = (np.clip(_nearest_int(iscale[:, None] * scales), -32, 31) + 32).astype(np.uint8)
    ls = np.where(has[:, None], ls, 0).astype(np.uint8)
    packed = np.zeros((n, 12), np.uint8)
    packed[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    hi = (ls >> 4).reshape(n, 4, 4)  # scale j = 4*g + k keeps its top bits in byte 8 + k at bit 2g
    packed[:, 8:] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    dl = _f16_round(d)[:, None] * (ls.astype(np.int16) - 32).astype(_F)
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = np.clip(_nearest_int(x.reshape(n, 16, 16) / dl[:, :, None]), -4, 3) + 4
    L = np.where((dl != 0)[:, :, None], lq, L).astype(np.uint8).reshape(n, 256)
    high = L > 3
    L = np.where(high, L - 4, L)
    hmask = np.packbits(high.reshape(n, 8, 32), axis=1, bitorder="little").reshape(n, 32)
    q = L.reshape(n, 2, 4, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([hmask, qs, packed, _f16_bytes(d)], axis=1)


# --------------------------------------------------------------------------------------------
# Q5_0: llama.cpp's fallback for Q4_K when a row is not a multiple of 256.


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    """float32[n, 32] -> Q5_0 blocks uint8[n, 22] (``quantize_row_q5_0_ref``)."""
    idx = np.abs(x).argmax(axis=1)
    xmax = np.take_along_axis(x, idx[:, None], axis=1)
    d = (xmax / _F(-16)).astype(_F)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, _F(0), _F(1) / d)
    # C: MIN(31, (int8_t)(x*id + 16.5f)) -- truncation toward zero, then saturation.
    q = np.minimum(np.trunc(x * inv + _F(16.5)).astype(np.int8), 31).astype(np.uint8)
    qs = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
    qh_bits = (q >> 4) & 1  # bit j of qh is bit 4 of weight j
    qh = np.packbits(qh_bits, axis=1, bitorder="little")
    return np.concatenate([_f16_bytes(d), qh, qs], axis=1)


def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    """float32[n, 32] -> Q5_1 blocks uint8[n, 24] (``quantize_row_q5_1_ref``): llama.cpp's
    fallback for Q5_K."""
    mn, mx = x.min(axis=1), x.max(axis=1)
    d = ((mx - mn) / _F(31)).astype(_F)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, _F(0), _F(1) / d)
    # C: (uint8_t)((x - min) * id + 0.5f) -- truncation (the operand is >= 0)
    q = np.trunc((x - mn[:, None]) * inv[:, None] + _F(0.5)).astype(np.uint8)
    qs = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)
    qh = np.packbits((q >> 4) & 1, axis=1, bitorder="little")
    return np.concatenate([_f16_bytes(d), _f16_bytes(mn), qh, qs], axis=1)


_K_QUANTIZERS = {GGMLType.Q3_K: quantize_q3_k, GGMLType.Q4_K: quantize_q4_k, GGMLType.Q5_K: quantize_q5_k,
                 GGMLType.Q6_K: quantize_q6_k, GGMLType.Q5_0: quantize_q5_0, GGMLType.Q5_1: quantize_q5_1}
_BLOCK = {GGMLType.Q3_K: QK_K, GGMLType.Q4_K: QK_K, GGMLType.Q5_K: QK_K, GGMLType.Q6_K: QK_K,
          GGMLType.Q5_0: 32, GGMLType.Q5_1: 32}


def quantize_rows(x: np.ndarray, gtype: GGMLType) -> np.ndarray:
    """Quantize float32[rows, n] to uint8[rows, row_nbytes(gtype, n)] with ggml's reference rounding."""
    gtype = GGMLType(gtype)
    if gtype not in _K_QUANTIZERS:
        return _runtime_quantize(x, gtype)
    rows, n = x.shape
    nbytes = row_nbytes(gtype, n)
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, _BLOCK[gtype])
    return _K_QUANTIZERS[gtype](blocks).reshape(rows, nbytes)
