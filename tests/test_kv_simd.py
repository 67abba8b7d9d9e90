"""The attention kernel's in-place row reads (kernels/kv_simd) compute the same bits as decoding
the row to float32 (kvquant.load_row / load_key_codes) and then dot_f32 / axpy_f32."""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from edgelm.kernels.kv_simd import axpy_f16, axpy_value_row, dot_codes
from edgelm.kernels.kvquant import load_key_codes, load_row, row_bytes, store_row
from edgelm.kernels.quant_simd import axpy_f32, dot_f32


@njit(cache=False)
def _dot_then(a, row, n):
    return dot_f32(a, row, n)


@njit(cache=False)
def _axpy_then(p, row, y, n):
    axpy_f32(p, row, y, n)


def _data(seed, head_dim, rows=3):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, head_dim)) * rng.uniform(0.1, 8)).astype(np.float32)
    a = rng.standard_normal((rows, head_dim + 5)).astype(np.float32)  # offsets into a 2-D array
    return rng, x, a


@pytest.mark.parametrize("head_dim", [8, 36, 64, 128])
def test_16_bit_rows(head_dim):
    rng, x, a = _data(head_dim, head_dim)
    cache = x.astype(np.float16).view(np.uint8).copy()  # [rows, 2 hd]
    for r in range(3):
        row = cache[r].view(np.float16).astype(np.float32)
        y, y_ref = a.copy(), a.copy()
        axpy_f16(np.float32(0.3), cache, r * cache.shape[1], y, r * y.shape[1] + 5, head_dim)
        _axpy_then(np.float32(0.3), row, y_ref[r, 5:], head_dim)
        assert np.array_equal(y, y_ref)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_quantized_key_codes(bits, head_dim):
    rng, _, a = _data(bits + head_dim, head_dim)
    row_len = head_dim * bits // 8
    group = rng.integers(0, 256, 32 * row_len + 4 * head_dim, dtype=np.uint8)  # codes, then scales
    codes = np.zeros(head_dim, np.float32)
    for l in (0, 7, 31):
        load_key_codes(group, bits, l, codes, head_dim)
        assert dot_codes(a, a.shape[1] + 5, group, l * row_len, bits, head_dim) == \
            _dot_then(a[1, 5:].copy(), codes, head_dim)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_quantized_value_rows(bits, head_dim):
    rng, x, a = _data(2 * bits + head_dim, head_dim)
    nb = row_bytes(bits, head_dim)
    cache = np.zeros((3, nb), np.uint8)
    for r in range(3):
        store_row(cache[r], bits, x[r], 0, head_dim)
    row = np.zeros(head_dim, np.float32)
    for r in range(3):
        load_row(cache[r], bits, row, head_dim)
        y, y_ref = a.copy(), a.copy()
        p = np.float32(rng.uniform(0, 1))
        axpy_value_row(p, cache, r * nb, bits, y, 2 * y.shape[1] + 5, head_dim)
        _axpy_then(p, row, y_ref[2, 5:], head_dim)
        assert np.array_equal(y, y_ref)
