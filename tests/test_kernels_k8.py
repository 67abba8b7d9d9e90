"""Q4_K / Q6_K products with Q8_K activations (kernels/quant_k8.py) against llama.cpp itself.

Oracles, from llama-cpp-python's ``libggml-cpu``: ``quantize_row_q8_K`` (the activation
blocks, byte for byte), ``ggml_gemv_q4_K_8x8_q8_K`` on Q4_K rows repacked as llama.cpp repacks
them on AVX2 (``make_block_q4_Kx8``, re-implemented here in NumPy), and
``ggml_vec_dot_q6_K_q8_K``: the kernels must equal them bit for bit. ``gguf.quants.dequantize``
bounds the error against the float product.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import quants
from llvmlite import binding as llvm_binding
from numba import njit

from edgelm.kernels import qdispatch, quant_k8, quant_simd
from edgelm.kernels.microbench import random_weights

Q8K_BYTES = 292  # block_q8_K: float d, int8 qs[256], int16 bsums[16]
# ggml takes other kernels on AVX-512 hosts; edgelm reproduces the AVX2 ones
AVX2_HOST = quant_k8.USE_AVX2 and not llvm_binding.get_host_cpu_features().get("avx512f", False)
KERNELS = {"q4_k": (GT.Q4_K, quant_k8.matvec_q4_k8, quant_k8.matmul_q4_k8),
           "q6_k": (GT.Q6_K, quant_k8.matvec_q6_k8, quant_k8.matmul_q6_k8)}


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def activations(rng, cols):
    """Values over four orders of magnitude, an all-zero block and a block led by a negative max."""
    x = (rng.standard_normal(cols) * rng.uniform(0.01, 100, size=cols)).astype(np.float32)
    x[256:512] = 0.0
    x[512] = -1e4
    return x


def ggml_q8k(ggml_cpu, x):
    """(quants, d, bsums) of llama.cpp's quantize_row_q8_K."""
    raw = np.zeros(x.size // 256 * Q8K_BYTES, np.uint8)
    ggml_cpu.quantize_row_q8_K(x.ctypes.data, raw.ctypes.data, x.size)
    blocks = raw.reshape(-1, Q8K_BYTES)
    return (blocks[:, 4:260].copy().view(np.int8).ravel(), blocks[:, :4].copy().view(np.float32).ravel(),
            blocks[:, 260:].copy().view(np.int16).ravel(), raw)


def test_activation_blocks_are_llama_cpps(ggml_cpu, rng):
    cols = 2048
    x = activations(rng, cols)
    x[1024:1280] = np.float32(0.5) * np.arange(256, dtype=np.float32) - 64  # ties at k + 0.5
    xq, xd, xb = np.empty(cols, np.int8), np.empty(cols // 256, np.float32), np.empty(cols // 16, np.int16)
    quant_k8.quantize_q8k(x.reshape(1, -1), 1, cols, xq, xd, xb)
    q, d, b, _ = ggml_q8k(ggml_cpu, x)
    np.testing.assert_array_equal(xq, q)
    np.testing.assert_array_equal(xd, d)
    np.testing.assert_array_equal(xb, b)


def _scales_mins(blocks):
    """ggml's get_scale_min_k4 for every Q4_K block: (scales, mins), each [..., 8]."""
    s = blocks[..., 4:16].astype(np.int64)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], -1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    return sc, mn


def repack_q4_k_8x8(w, rows, nb):
    """Q4_K rows in llama.cpp's AVX2 layout (repack.cpp, ``make_block_q4_Kx8`` with interleave 8):
    per group of 8 rows and super-block, d[8], dmin[8], 8 x 12 bytes of scales/mins (sub-block
    s of all 8 rows at 12 s) and the 8 rows' quants interleaved 8 bytes at a time."""
    blocks = w.reshape(rows // 8, 8, nb, 144).transpose(0, 2, 1, 3)  # [group, super-block, row, byte]
    out = np.zeros((rows // 8, nb, 1152), np.uint8)
    out[..., 0:16] = blocks[..., 0:2].reshape(rows // 8, nb, 16)
    out[..., 16:32] = blocks[..., 2:4].reshape(rows // 8, nb, 16)
    sc, mn = _scales_mins(blocks)  # [group, super-block, row, sub-block]
    for s in range(8):
        a, m = sc[..., s], mn[..., s]  # [group, super-block, row]
        packed = np.concatenate([(a[..., 0:4] & 63) + ((a[..., 4:8] & 48) << 2),
                                 (m[..., 0:4] & 63) + ((m[..., 4:8] & 48) << 2),
                                 (a[..., 4:8] & 15) + ((m[..., 4:8] & 15) << 4)], -1)
        out[..., 32 + 12 * s: 44 + 12 * s] = packed
    qs = blocks[..., 16:144].reshape(rows // 8, nb, 8, 16, 8)  # [.., row, 8-byte chunk, byte]
    out[..., 128:] = qs.transpose(0, 1, 3, 2, 4).reshape(rows // 8, nb, 1024)
    return np.ascontiguousarray(out)


def llama_cpp_products(ggml_cpu, kind, w, rows, cols, x):
    """llama.cpp's products of the rows with x: the repacked gemv (Q4_K), the vec_dot (Q6_K)."""
    *_, y = ggml_q8k(ggml_cpu, x)
    ref = np.zeros(rows, np.float32)
    if kind == "q4_k":
        vx = repack_q4_k_8x8(w, rows, cols // 256)
        ggml_cpu.ggml_gemv_q4_K_8x8_q8_K(ctypes.c_int(cols), ctypes.c_void_p(ref.ctypes.data), ctypes.c_size_t(0),
                                         ctypes.c_void_p(vx.ctypes.data), ctypes.c_void_p(y.ctypes.data),
                                         ctypes.c_int(1), ctypes.c_int(rows))
        return ref
    s = np.zeros(1, np.float32)
    row_bytes = w.size // rows
    for r in range(rows):
        ggml_cpu.ggml_vec_dot_q6_K_q8_K(ctypes.c_int(cols), ctypes.c_void_p(s.ctypes.data), ctypes.c_size_t(0),
                                        ctypes.c_void_p(w.ctypes.data + r * row_bytes), ctypes.c_size_t(0),
                                        ctypes.c_void_p(y.ctypes.data), ctypes.c_size_t(0), ctypes.c_int(1))
        ref[r] = s[0]
    return ref


@pytest.mark.skipif(not AVX2_HOST, reason="llama.cpp takes its AVX2 kernels only on AVX2 hosts without AVX-512")
@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_matvec_is_llama_cpps_product(ggml_cpu, kind, rng):
    gtype, matvec, _ = KERNELS[kind]
    rows, cols = 16, 1536
    w = random_weights(gtype.value, rows, cols, rng)
    x = activations(rng, cols)
    out = np.zeros(rows, np.float32)
    matvec(w, cols, x, out, 0, rows)
    np.testing.assert_array_equal(out, llama_cpp_products(ggml_cpu, kind, w, rows, cols, x))


@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_close_to_the_float_product(kind, rng):
    """Within the activation rounding: each quant is off by at most half a step, d_x / 2."""
    gtype, matvec, _ = KERNELS[kind]
    rows, cols = 12, 1024
    w = random_weights(gtype.value, rows, cols, rng)
    Wd = quants.dequantize(w.reshape(rows, -1), gtype).astype(np.float64)
    x = activations(rng, cols)
    out = np.zeros(rows, np.float32)
    matvec(w, cols, x, out, 2, 10)
    xd = np.abs(x.reshape(-1, 256)).max(1) / 127
    bound = np.abs(Wd).reshape(rows, -1, 256).sum(-1) @ (0.5 * xd) * 1.01 + 1e-4 * (np.abs(Wd) @ np.abs(x))
    assert np.all(np.abs(out[2:10] - Wd[2:10] @ x) <= bound[2:10])
    assert not out[:2].any() and not out[10:].any()


@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_matmul_is_matvec_per_token(kind, rng):
    """Prompt evaluation and speculative verification reproduce one-token decoding exactly."""
    gtype, matvec, matmul = KERNELS[kind]
    rows, cols, n = 10, 512, 7
    w = random_weights(gtype.value, rows, cols, rng)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    out = np.zeros((n, rows), np.float32)
    matmul(w, cols, X, out, 1, 9)
    for t in range(n):
        one = np.zeros(rows, np.float32)
        matvec(w, cols, X[t], one, 1, 9)
        np.testing.assert_array_equal(out[t], one)
    # through the dispatcher, with the engine's read-only weights
    w.setflags(write=False)
    out2 = np.zeros((n, rows), np.float32)
    qdispatch.matmul(w, gtype.value, cols, X, out2, 1, 9)
    np.testing.assert_array_equal(out2, out)


@njit
def _super_block(w, xq, xb, out):
    out[0] = np.float32(quant_k8.isum_q4k(w, 16, xq, 0, np.uint64(0x0807060504030201)))
    from_q6 = quant_k8.lanes_q6k(w, 144, xq, 0, xb, 0)
    for k in range(8):
        out[1 + k] = 0.0
    quant_simd.vstore(from_q6, out, 1)


@pytest.mark.parametrize("avx2", [True, False])
def test_integer_products_both_lowerings(avx2, monkeypatch, rng):
    """The AVX2 and the generic (non-x86) IR of the super-block integer products agree with NumPy."""
    if avx2 and not quant_k8.USE_AVX2:
        pytest.skip("no AVX2")
    monkeypatch.setattr(quant_k8, "USE_AVX2", avx2)
    fresh = njit(_super_block.py_func)  # compiled now, under the patched lowering choice
    w = rng.integers(0, 256, size=144 + 210, dtype=np.uint8)
    xq = rng.integers(-127, 128, size=256).astype(np.int8)
    xb = xq.reshape(16, 16).astype(np.int16).sum(1).astype(np.int16)
    out = np.zeros(9, np.float32)
    fresh(w, xq, xb, out)
    q4 = np.concatenate([[w[16 + 32 * c: 48 + 32 * c] & 15, w[16 + 32 * c: 48 + 32 * c] >> 4] for c in range(4)])
    q4 = q4.reshape(8, 32).astype(np.int64)
    assert out[0] == sum((s + 1) * int(q4[s] @ xq[32 * s: 32 * s + 32]) for s in range(8))
    b6 = w[144:]
    ql, qh, sc = b6[:128].astype(np.int64), b6[128:192].astype(np.int64), b6[192:208].view(np.int8).astype(np.int64)
    q6 = np.zeros(256, np.int64)
    for j in range(2):
        h = qh[32 * j: 32 * j + 32]
        q6[128 * j: 128 * j + 32] = (ql[64 * j: 64 * j + 32] & 15) | ((h & 3) << 4)
        q6[128 * j + 32: 128 * j + 64] = (ql[64 * j + 32: 64 * j + 64] & 15) | (((h >> 2) & 3) << 4)
        q6[128 * j + 64: 128 * j + 96] = (ql[64 * j: 64 * j + 32] >> 4) | (((h >> 4) & 3) << 4)
        q6[128 * j + 96: 128 * j + 128] = (ql[64 * j + 32: 64 * j + 64] >> 4) | (((h >> 6) & 3) << 4)
    prod = q6 * xq * sc[np.arange(256) // 16]
    lanes = prod.reshape(8, 8, 4).sum(axis=(0, 2))  # run, lane k, byte: lane k takes bytes 4k..4k+3
    lanes -= 32 * (xb.astype(np.int64) * sc).reshape(8, 2).sum(1)
    np.testing.assert_array_equal(out[1:], lanes.astype(np.float32))


@pytest.mark.skipif(not quant_k8.USE_AVX2, reason="needs AVX2")
def test_assembly_uses_avx2_integer_products(rng):
    fn = njit(nogil=True)(quant_k8.matvec_q6_k8.py_func)  # uncached: numba hides cached asm
    w = random_weights(GT.Q6_K.value, 2, 256, rng)
    fn(w, 256, np.ones(256, np.float32), np.zeros(2, np.float32), 0, 2)
    asm = fn.inspect_asm(fn.signatures[0])
    assert "vpmaddubsw" in asm and "vpmaddwd" in asm and "vfmadd" in asm
