"""The K-quant kernels (Q4_K, Q5_K, Q6_K, Q3_K) against float64 products of the weights as
dequantized by the ``gguf`` package, on random blocks and on real weights quantized by
llama.cpp's own quantizer (``ggml_quantize_chunk`` from llama-cpp-python's libggml)."""
from __future__ import annotations

import ctypes
import glob
import os
import platform

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import GGUFReader
from gguf.quants import dequantize
from numba import njit

from edgelm.kernels import quant_k

QK_K = 256
# type -> (ggml type, bytes per super-block, byte offsets of its f16 scales)
TYPES = {
    "q4_k": (GT.Q4_K, 144, (0, 2)),
    "q5_k": (GT.Q5_K, 176, (0, 2)),
    "q6_k": (GT.Q6_K, 210, (208,)),
    "q3_k": (GT.Q3_K, 110, (108,)),
}
# float32 accumulation over a few thousand terms stays around 1e-7 of sum |w x|; a wrong bit,
# scale or offset for a single weight of a 2048-long row shows up above 1e-5.
RTOL = 1e-5


def kernel(op: str, name: str):
    return getattr(quant_k, f"{op}_{name}")


def random_blocks(name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """uint8[rows, row_bytes]: random (hence valid) quant bits, finite f16 scales of either sign."""
    gtype, nbytes, f16_offsets = TYPES[name]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, cols // QK_K, nbytes), dtype=np.uint8)
    for at in f16_offsets:
        d = rng.uniform(1e-3, 1e-2, (rows, cols // QK_K)) * rng.choice([-1.0, 1.0], (rows, cols // QK_K))
        blocks[:, :, at:at + 2] = d.astype("<f2")[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def reference(name: str, w: np.ndarray) -> np.ndarray:
    """float64[rows, cols] weights as gguf-py dequantizes them."""
    return dequantize(w, TYPES[name][0]).astype(np.float64)


def assert_close(got: np.ndarray, W: np.ndarray, X: np.ndarray) -> None:
    """got[i, r] == sum_k W[r, k] X[i, k] up to float32 rounding (X: float32[n, cols])."""
    X64 = X.astype(np.float64)
    want = X64 @ W.T
    bound = RTOL * (np.abs(X64) @ np.abs(W).T) + 1e-30
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= bound), f"max error {np.max(err / bound) * RTOL:.2e} of sum |w x|"


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("cols", [256, 512, 1536, 2048])
def test_matvec_random_blocks(name, cols):
    rows = 13
    w = random_blocks(name, rows, cols, seed=cols)
    x = np.random.default_rng(1).standard_normal(cols).astype(np.float32)
    out = np.zeros(rows, np.float32)
    kernel("matvec", name)(w.reshape(-1), cols, x, out, 0, rows)
    assert_close(out[None, :], reference(name, w), x[None, :])


@pytest.mark.parametrize("name", TYPES)
def test_matvec_row_ranges(name):
    rows, cols = 9, 512
    w = random_blocks(name, rows, cols, seed=3)
    W = reference(name, w)
    x = np.random.default_rng(4).standard_normal(cols).astype(np.float32)
    for r0, r1 in [(3, 7), (5, 6), (0, 1), (8, 9), (4, 4)]:
        out = np.full(rows, np.nan, np.float32)
        kernel("matvec", name)(w.reshape(-1), cols, x, out, r0, r1)
        assert np.all(np.isnan(out[:r0])) and np.all(np.isnan(out[r1:])), "wrote outside [r0, r1)"
        assert_close(out[None, r0:r1], W[r0:r1], x[None, :])


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("n, cols", [(1, 256), (3, 1536), (17, 2048), (512, 512)])
def test_matmul(name, n, cols):
    # 21 rows: a full 16-row tile plus a partial one; 1536 / 2048 columns: several k-chunks
    rows = 21
    w = random_blocks(name, rows, cols, seed=n)
    W = reference(name, w)
    X = np.random.default_rng(n).standard_normal((n, cols)).astype(np.float32)
    out = np.zeros((n, rows), np.float32)
    kernel("matmul", name)(w.reshape(-1), cols, X, out, 0, rows)
    assert_close(out, W, X)
    r0, r1 = 2, 19
    out = np.full((n, rows), np.nan, np.float32)
    kernel("matmul", name)(w.reshape(-1), cols, X, out, r0, r1)
    assert np.all(np.isnan(out[:, :r0])) and np.all(np.isnan(out[:, r1:])), "wrote outside [r0, r1)"
    assert_close(out[:, r0:r1], W[r0:r1], X)


@pytest.mark.parametrize("name", TYPES)
def test_small_batches_equal_matvec_bitwise(name):
    # batched speculative verification must reproduce one-token decoding exactly:
    # 5 = a group of 4 + a single token, 7 = 4 + a group of 3 (its last token repeated)
    rows, cols = 21, 512
    w = random_blocks(name, rows, cols, seed=9).reshape(-1)
    for n in (2, 5, 7):
        X = np.random.default_rng(n).standard_normal((n, cols)).astype(np.float32)
        batched = np.zeros((n, rows), np.float32)
        kernel("matmul", name)(w, cols, X, batched, 0, rows)
        single = np.zeros((n, rows), np.float32)
        for i in range(n):
            kernel("matvec", name)(w, cols, X[i], single[i], 0, rows)
        np.testing.assert_array_equal(batched, single)


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_rows(name):
    rows, cols = 7, 768
    w = random_blocks(name, rows, cols, seed=5)
    W = reference(name, w)
    out = np.zeros((4, cols), np.float32)
    kernel("dequantize_rows", name)(w.reshape(-1), cols, 2, 6, out)
    # the same float32 formula as ggml up to FMA contraction: within an ulp or two
    np.testing.assert_allclose(out, W[2:6], rtol=3e-7, atol=3e-7 * np.abs(W).max())


def _ggml_quantizer():
    """llama.cpp's ``ggml_quantize_chunk`` from llama-cpp-python's bundled libggml-base."""
    llama_cpp = pytest.importorskip("llama_cpp")
    libs = glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.*"))
    if not libs:
        pytest.skip("libggml-base not found in llama-cpp-python")
    lib = ctypes.CDLL(sorted(libs)[0])
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]

    def quantize(x: np.ndarray, gtype: GT, row_bytes: int) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], row_bytes), np.uint8)
        size = fn(int(gtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        assert size == out.nbytes
        return out

    return quantize


@pytest.fixture(scope="module")
def real_ffn_down(default_gguf) -> np.ndarray:
    """float32[576, 1536]: layer 0's ffn_down of the default model (1536-wide rows)."""
    t = next(t for t in GGUFReader(default_gguf).tensors if t.name == "blk.0.ffn_down.weight")
    return dequantize(np.asarray(t.data), t.tensor_type).reshape(576, 1536)


@pytest.mark.parametrize("name", TYPES)
def test_real_weights_quantized_by_llama_cpp(name, real_ffn_down):
    quantize = _ggml_quantizer()
    gtype, nbytes, _ = TYPES[name]
    rows, cols = real_ffn_down.shape
    w = quantize(real_ffn_down, gtype, cols // QK_K * nbytes)
    W = reference(name, w)
    # sanity: a faithful quantization of the real weights, not noise
    assert np.abs(W - real_ffn_down).mean() < 0.25 * np.abs(real_ffn_down).mean()
    X = np.random.default_rng(7).standard_normal((4, cols)).astype(np.float32)
    out = np.zeros(rows, np.float32)
    kernel("matvec", name)(w.reshape(-1), cols, X[0], out, 0, rows)
    assert_close(out[None, :], W, X[:1])
    outs = np.zeros((4, rows), np.float32)
    kernel("matmul", name)(w.reshape(-1), cols, X, outs, 0, rows)
    assert_close(outs, W, X)
    deq = np.zeros((rows, cols), np.float32)
    kernel("dequantize_rows", name)(w.reshape(-1), cols, 0, rows, deq)
    np.testing.assert_allclose(deq, W, rtol=3e-7, atol=3e-7 * np.abs(W).max())


def _has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@pytest.mark.skipif(not _has_avx2_fma(), reason="needs an x86-64 CPU with AVX2 and FMA")
@pytest.mark.parametrize("name", TYPES)
def test_matvec_uses_ymm_fma(name):
    # a fresh, uncached compilation: numba cannot show the assembly of cached code
    options = {k: v for k, v in kernel("matvec", name).targetoptions.items() if k != "nopython"}
    options["cache"] = False
    fn = njit(**options)(kernel("matvec", name).py_func)
    w = random_blocks(name, 1, QK_K)
    fn(w.reshape(-1), QK_K, np.ones(QK_K, np.float32), np.zeros(1, np.float32), 0, 1)
    asm = fn.inspect_asm(fn.signatures[0])
    assert "ymm" in asm and "vfmadd" in asm
