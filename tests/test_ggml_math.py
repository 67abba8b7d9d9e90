"""kernels/ggml_math.py and the attention/product roundings against llama.cpp itself, op by op.

llama.cpp decodes a prompt token by token with its graph callback capturing every tensor; each
op of ours is then fed llama.cpp's *input* tensor and must return llama.cpp's *output* tensor
bit for bit. (tests/test_vs_llamacpp.py checks the whole forward pass end to end; this test says
which op broke when that one fails.)
"""
from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
from numba import njit

from edgelm.kernels.ggml_math import expf, rmsnorm_scale, rope_pair, rope_table, round_f16, silu
from edgelm.kernels.kv_simd import dot_f16_ggml
from edgelm.kernels.qdispatch import Q4_1, matvec
from edgelm.runtime.gguf import GGUFFile
from ggml_dump import OP_MUL_MAT, OP_ROPE, decode_and_capture

STEP = 9  # the token whose tensors are compared (position 9: ten keys in the cache)


@njit(cache=True)
def _expf_all(x, out):
    for i in range(x.size):
        out[i] = expf(x[i])


@njit(cache=True)
def _rmsnorm(x, w, eps, out):
    scale = rmsnorm_scale(x, x.size, eps)
    for j in range(x.size):
        out[j] = x[j] * scale * w[j]


@njit(cache=True)
def _rope_rows(x, cos, sin, out):
    """Adjacent-pair RoPE (llama) of each row of x (heads x dim) with one position's cos/sin."""
    for h in range(x.shape[0]):
        for j in range(x.shape[1] // 2):
            out[h, 2 * j], out[h, 2 * j + 1] = rope_pair(x[h, 2 * j], x[h, 2 * j + 1], cos[j], sin[j])


@njit(cache=True)
def _swiglu(g, u, out):
    for i in range(g.size):
        out[i] = silu(g[i]) * u[i]


@njit(cache=True)
def _round_f16_all(x, out):
    for i in range(x.size):
        out[i] = round_f16(x[i])


@njit(cache=True)
def _dot16(a, h, n):
    return dot_f16_ggml(a, 0, h, 0, n)


def test_expf_polynomial_is_exp():
    x = np.linspace(-87, 88, 200001).astype(np.float32)  # normal float32 results
    got = np.empty_like(x)
    _expf_all(x, got)
    ref = np.exp(x.astype(np.float64))
    rel = np.abs(got - ref) / ref
    assert rel.max() < 3e-7  # ggml: 1.45 ulp + 0.5 ulp at most
    special = np.array([-np.inf, 0.0, -104.0, 89.0, -87.0], np.float32)
    _expf_all(special, got[:5])
    assert got[0] == 0.0 and got[1] == 1.0 and got[2] == 0.0 and np.isinf(got[3]) and got[4] > 0


def test_rope_table_uses_libm_cosf_sinf():
    libm = ctypes.CDLL("libm.so.6")
    for f in (libm.cosf, libm.sinf):
        f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
    half, scale = 32, np.float32(100000.0) ** (np.float32(-2.0) / np.float32(64))
    pos = np.array([0, 1, 7, 300, 2047], np.int64)
    cos, sin = np.empty((5, half), np.float32), np.empty((5, half), np.float32)
    rope_table(pos, np.float32(scale), np.ones(half, np.float32), cos, sin)
    for i, p in enumerate(pos):
        theta = np.float32(p)
        for j in range(half):
            assert cos[i, j] == np.float32(libm.cosf(float(theta))) and sin[i, j] == np.float32(libm.sinf(float(theta)))
            theta = np.float32(theta * scale)
    assert math.isclose(float(cos[1, 0]), math.cos(1.0), rel_tol=1e-6)


@pytest.fixture(scope="module")
def captured(llama_cpp, default_gguf):
    g = GGUFFile(default_gguf)
    ids = [1, 504, 3575, 282, 4649, 314, 7042, 30, 284, 260, 3575]  # any tokens will do
    tensors = decode_and_capture(llama_cpp, str(default_gguf), ids, STEP)
    yield g, tensors
    g.close()


def _get(tensors, name, op=None):
    hits = [a for n, o, a in tensors if n == name and (op is None or o == op)]
    assert hits, f"llama.cpp computed no tensor {name!r} (op {op}): has its graph changed?"
    return hits[0]


@pytest.mark.parametrize("layer", [0, 17])
def test_ops_equal_llama_cpp_bit_for_bit(captured, layer):
    g, t = captured
    L = layer
    eps = np.float32(g.get("llama.attention.layer_norm_rms_epsilon"))
    # RMSNorm (then MUL by the weight)
    x = (_get(t, f"l_out-{L - 1}") if L else _get(t, "embd")).ravel()
    out = np.empty_like(x)
    _rmsnorm(x, g.tensor(f"blk.{L}.attn_norm.weight"), eps, out)
    np.testing.assert_array_equal(out, _get(t, f"attn_norm-{L}").ravel())
    # Q4_1 x Q8_1 product
    xn = _get(t, f"attn_norm-{L}").ravel()
    q = np.empty(576, np.float32)
    matvec(g.tensor_bytes(f"blk.{L}.attn_q.weight").reshape(-1), Q4_1, 576, xn, q, 0, 576)
    np.testing.assert_array_equal(q, _get(t, f"Qcur-{L}", OP_MUL_MAT).ravel())
    # RoPE at position STEP
    cos, sin = np.empty((1, 32), np.float32), np.empty((1, 32), np.float32)
    scale = np.float32(g.get("llama.rope.freq_base")) ** (np.float32(-2.0) / np.float32(64))
    rope_table(np.array([STEP]), np.float32(scale), np.ones(32, np.float32), cos, sin)
    qr = np.empty((9, 64), np.float32)
    _rope_rows(q.reshape(9, 64), cos[0], sin[0], qr)
    np.testing.assert_array_equal(qr, _get(t, f"Qcur-{L}", OP_ROPE).reshape(9, 64))
    # q.k over the F16 cache, with the query rounded to F16
    keys = _get(t, f"cache_k_l{L} (view) (permuted)").reshape(3, -1, 64)
    q16 = np.empty_like(qr)
    _round_f16_all(qr.ravel(), q16.reshape(-1))
    kq = np.array([[_dot16(q16[h], keys[h // 3, s].view(np.uint8).copy(), 64) for s in range(keys.shape[1])]
                   for h in range(9)], np.float32)
    np.testing.assert_array_equal(kq, _get(t, f"kq-{L}").reshape(9, -1))
    # SwiGLU
    gate, up = _get(t, f"ffn_gate-{L}").ravel(), _get(t, f"ffn_up-{L}").ravel()
    sw = np.empty_like(gate)
    _swiglu(gate, up, sw)
    np.testing.assert_array_equal(sw, _get(t, f"ffn_swiglu-{L}").ravel())
