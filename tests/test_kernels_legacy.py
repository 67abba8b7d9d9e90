"""Legacy-quant (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and float (F32, F16, BF16) kernels vs real oracles.

Oracles: ``gguf.quants.dequantize`` (weights, in float64) and llama.cpp's own CPU functions
from llama-cpp-python's ``libggml-cpu`` (``quantize_row_q8_0`` and the ``ggml_vec_dot_*``
products). The quant matvecs quantize activations to int8 the way llama.cpp does, so they are
checked (a) exactly against llama.cpp's activation quantization, (b) to float32 rounding
against the float64 product with those quantized activations and against llama.cpp's dot
products, and (c) within the activation-rounding bound against the exact float64 product.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import GGUFReader, quants
from numba import njit

from edgelm.kernels import quant_float, quant_legacy, quant_simd
from edgelm.kernels.quant_drivers import quantize_activations

QUANT = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
FLOAT = ["f32", "f16", "bf16"]
MODULE = {**{t: quant_legacy for t in QUANT}, **{t: quant_float for t in FLOAT}}
RTOL = 1e-5  # float32 accumulation, relative to sum |W| |x|


def kernel(op: str, t: str):
    return getattr(MODULE[t], f"{op}_{t}")


def make_weights(t: str, rows: int, cols: int, rng: np.random.Generator, raw: bool = False):
    """(raw bytes, float64 weights via gguf). ``raw``: random bytes with sane f16 scales instead
    of quantized floats, so every quant value (e.g. Q8_0's -128) occurs."""
    qtype = GT[t.upper()]
    if raw and t in QUANT:
        per_block, nbytes = 32, {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34}[t]
        b = rng.integers(0, 256, size=(rows * cols // per_block, nbytes), dtype=np.uint8)
        scales = 2 if t in ("q4_1", "q5_1") else 1  # d, and m for the _1 types
        b[:, :2 * scales] = rng.uniform(-0.05, 0.05, size=(b.shape[0], scales)).astype(np.float16).view(np.uint8)
        data = b.reshape(rows, -1)
    else:
        data = quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    data = np.ascontiguousarray(data)
    return data.view(np.uint8).reshape(-1), quants.dequantize(data, qtype).astype(np.float64).reshape(rows, cols)


def q8_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy model of llama.cpp's quantize_row_q8_0: (int8 quants, f16-rounded scales, dequantized x)."""
    xb = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(xb).max(axis=1)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax != 0)
    q = np.rint(xb * inv[:, None])
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float64)
    return q.astype(np.int8).reshape(x.shape), d, (q * d[:, None]).reshape(x.shape)


def assert_within(actual, expected, tol) -> None:
    """|actual - expected| <= tol elementwise (tol may be an array)."""
    err = np.abs(np.asarray(actual, np.float64) - expected)
    tol = np.broadcast_to(tol, err.shape)
    bad = np.argwhere(err > tol)
    assert bad.size == 0, f"{len(bad)} errors over tolerance, first at {tuple(bad[0])}: " \
                          f"{err[tuple(bad[0])]:.3g} > {tol[tuple(bad[0])]:.3g}"


def check_matvec(t: str, Wd: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """Compare ``out`` (rows of ``Wd`` times ``x``) with the right oracle for type ``t``."""
    if t in QUANT:
        _, d, xdeq = q8_activations(x)
        tol = RTOL * (np.abs(Wd) @ np.abs(xdeq))
        if t in ("q4_1", "q5_1"):  # m_b times Q8_1's s_b = f16(d * sum(q)), not d16 * sum(q)
            m_bound = np.abs(Wd).reshape(len(Wd), Wd.shape[1] // 32, 32).max(axis=2)  # |m_b| <= max |w|
            tol = tol + m_bound @ np.abs(xdeq.reshape(-1, 32).sum(axis=1)) * 2.0 ** -10
        assert_within(out, Wd @ xdeq, tol)
        # activation rounding bound vs the exact product: |x - xdeq| <= 0.6 d per element
        bound = np.abs(Wd) @ np.repeat(0.6 * d, 32) + RTOL * (np.abs(Wd) @ np.abs(x))
        assert np.all(np.abs(out - Wd @ x) <= bound)
    else:
        assert_within(out, Wd @ x, RTOL * (np.abs(Wd) @ np.abs(x)))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.mark.parametrize("t", QUANT + FLOAT)
@pytest.mark.parametrize("raw", [False, True])
def test_matvec_row_ranges(t, raw, rng):
    rows, cols = 29, 576 if t in QUANT else 200  # 200: float rows with a non-multiple-of-8 tail
    w, Wd = make_weights(t, rows, cols, rng, raw)
    x = rng.standard_normal(cols).astype(np.float32)
    for r0, r1 in [(0, rows), (3, 26), (7, 8), (11, 11)]:
        out = np.zeros(rows, np.float32)
        kernel("matvec", t)(w, cols, x, out, r0, r1)
        assert not out[:r0].any() and not out[r1:].any()
        check_matvec(t, Wd[r0:r1], x, out[r0:r1])


@pytest.mark.parametrize("t", QUANT + FLOAT)
@pytest.mark.parametrize("n", [1, 2, 3, 6, 17, 512])
def test_matmul_matches_reference_and_matvec(t, n, rng):
    rows, cols = 13, 576 if t in QUANT else 104
    w, Wd = make_weights(t, rows, cols, rng)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    out = np.zeros((n, rows), np.float32)
    r0, r1 = 2, 11  # an odd number of rows: the last is not paired
    kernel("matmul", t)(w, cols, X, out, r0, r1)
    assert not out[:, :r0].any() and not out[:, r1:].any()
    one = np.zeros(rows, np.float32)
    for i in range(n):
        kernel("matvec", t)(w, cols, X[i], one, r0, r1)
        # the same sums as matvec for any number of tokens: prompts and batched verification
        # see exactly the logits of one-token decoding
        np.testing.assert_array_equal(out[i], one)
        check_matvec(t, Wd[r0:r1], X[i], one[r0:r1])


@pytest.mark.parametrize("t", QUANT + FLOAT)
def test_dequantize_rows_exact(t, rng):
    rows, cols = 9, 576 if t in QUANT else 100
    w, Wd = make_weights(t, rows, cols, rng, raw=True)
    out = np.zeros((4, cols), np.float32)
    kernel("dequantize_rows", t)(w, cols, 3, 7, out)
    np.testing.assert_array_equal(out.astype(np.float64), Wd[3:7])


# --- llama.cpp as the oracle -------------------------------------------------------------------


def test_activation_quantization_is_llama_cpp(ggml_cpu, rng):
    cols = 1024
    x = rng.standard_normal(cols).astype(np.float32) * rng.uniform(0.01, 100, size=cols).astype(np.float32)
    x[64:96] = 0.0  # an all-zero block
    x[128:160] = np.arange(32) - np.float32(15.5)  # scale 127 / 15.5: no ties, but a known block
    x[160:192] = np.r_[np.float32(127), np.arange(31) + np.float32(0.5)]  # x * 127/amax = k + 0.5: ties
    ref = np.zeros(cols // 32 * 34, np.uint8)
    ggml_cpu.quantize_row_q8_0(x.ctypes.data, ref.ctypes.data, cols)
    ref = ref.reshape(-1, 34)
    xq = np.zeros(cols, np.int8)
    dx = np.zeros(cols // 32, np.float32)
    xs = np.zeros(cols // 32, np.float32)
    quantize_activations(x, 1, cols, xq, dx, xs)
    np.testing.assert_array_equal(xq.reshape(-1, 32), ref[:, 2:].view(np.int8))
    np.testing.assert_array_equal(dx, ref[:, :2].copy().view(np.float16).astype(np.float32).ravel())
    ref1 = np.zeros(cols // 32 * 36, np.uint8)  # Q8_1: d, s = f16(d * sum(q)), qs
    ggml_cpu.quantize_row_q8_1(x.ctypes.data, ref1.ctypes.data, cols)
    np.testing.assert_array_equal(xs, ref1.reshape(-1, 36)[:, 2:4].copy().view(np.float16).astype(np.float32).ravel())


@pytest.mark.parametrize("t", QUANT)
def test_matvec_matches_llama_cpp_vec_dot(ggml_cpu, t, rng):
    rows, cols = 16, 1024
    w, Wd = make_weights(t, rows, cols, rng, raw=True)
    x = rng.standard_normal(cols).astype(np.float32)
    act = "q8_1" if t in ("q4_1", "q5_1") else "q8_0"
    y = np.zeros(cols // 32 * (36 if act == "q8_1" else 34), np.uint8)
    getattr(ggml_cpu, f"quantize_row_{act}")(x.ctypes.data, y.ctypes.data, cols)
    vec_dot = getattr(ggml_cpu, f"ggml_vec_dot_{t}_{act}")
    row_bytes = w.size // rows
    ref = np.zeros(rows, np.float32)
    s = np.zeros(1, np.float32)
    for r in range(rows):
        vec_dot(ctypes.c_int(cols), ctypes.c_void_p(s.ctypes.data), ctypes.c_size_t(0),
                ctypes.c_void_p(w.ctypes.data + r * row_bytes), ctypes.c_size_t(0),
                ctypes.c_void_p(y.ctypes.data), ctypes.c_size_t(0), ctypes.c_int(1))
        ref[r] = s[0]
    out = np.zeros(rows, np.float32)
    kernel("matvec", t)(w, cols, x, out, 0, rows)
    np.testing.assert_array_equal(out, ref)  # bit for bit: the same integer sums, FMAs and lane sums


# --- the default model's own tensors -----------------------------------------------------------


@pytest.fixture(scope="module")
def model_tensors(default_gguf):
    reader = GGUFReader(default_gguf)
    return {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("name, rows_used", [("blk.0.ffn_down.weight", None), ("blk.3.attn_q.weight", None),
                                             ("token_embd.weight", (1000, 1300))])
def test_real_tensors(model_tensors, name, rows_used, rng):
    tensor = model_tensors[name]
    t = tensor.tensor_type.name.lower()
    w = tensor.data.reshape(-1)  # read-only memmap of the file, as the engine maps it
    rows, cols = int(tensor.shape[1]), int(tensor.shape[0])
    r0, r1 = rows_used or (0, rows)
    row_bytes = w.size // rows
    Wd = quants.dequantize(np.asarray(w[r0 * row_bytes:r1 * row_bytes]).reshape(r1 - r0, row_bytes),
                           tensor.tensor_type).astype(np.float64)
    x = rng.standard_normal(cols).astype(np.float32)
    out = np.zeros(rows, np.float32)
    kernel("matvec", t)(w, cols, x, out, r0, r1)
    check_matvec(t, Wd, x, out[r0:r1])
    X = rng.standard_normal((40, cols)).astype(np.float32)
    out2 = np.zeros((40, rows), np.float32)
    kernel("matmul", t)(w, cols, X, out2, r0, r1)
    for i in (0, 13, 39):  # a prompt's rows are its tokens' matvecs, bit for bit
        one = np.zeros(rows, np.float32)
        kernel("matvec", t)(w, cols, X[i], one, r0, r1)
        np.testing.assert_array_equal(out2[i], one)
    emb = np.zeros((3, cols), np.float32)
    kernel("dequantize_rows", t)(w, cols, r0 + 5, r0 + 8, emb)
    np.testing.assert_array_equal(emb.astype(np.float64), Wd[5:8])


# --- SIMD building blocks ----------------------------------------------------------------------


@njit
def _dots(q, y, signed, out):
    a = quant_simd.load_i8x32(q, 0)
    b = quant_simd.load_i8x32(y, 0)
    v = quant_simd.dot_s8s8(a, b) if signed else quant_simd.dot_u8s8(a, b)
    quant_simd.vstore(v, out, 0)


@pytest.mark.parametrize("avx2", [True, False])
def test_integer_dots_both_lowerings(avx2, monkeypatch, rng):
    """The AVX2 and the generic (non-x86) IR of the dot products agree with numpy."""
    if avx2 and not quant_simd.USE_AVX2:
        pytest.skip("no AVX2")
    monkeypatch.setattr(quant_simd, "USE_AVX2", avx2)
    fresh = njit(_dots.py_func)  # compiled now, under the patched lowering choice
    y = rng.integers(-127, 128, size=32).astype(np.int8)
    out = np.zeros(8, np.float32)
    for signed, q in [(False, rng.integers(0, 32, size=32).astype(np.int8)),
                      (True, rng.integers(-128, 128, size=32).astype(np.int8))]:
        fresh(q, y, signed, out)
        expect = (q.astype(np.int64) * y).reshape(8, 4).sum(axis=1)
        np.testing.assert_array_equal(out, expect.astype(np.float32))


def test_five_bit_unpacking(rng):
    @njit
    def unpack(b, out):
        v = quant_simd.nibbles_hbit(b, 4, 0)
        quant_simd.vstore_dequant(v, np.float32(1.0), np.float32(0.0), out, 0)

    b = rng.integers(0, 256, size=20, dtype=np.uint8)
    out = np.zeros(32, np.float32)
    unpack(b, out)
    qh = int.from_bytes(b[:4].tobytes(), "little")
    expect = [(b[4 + j % 16] >> (4 * (j // 16)) & 15) | ((qh >> j) & 1) << 4 for j in range(32)]
    np.testing.assert_array_equal(out, np.array(expect, np.float32))


@pytest.mark.skipif(not quant_simd.USE_AVX2, reason="needs AVX2")
@pytest.mark.parametrize("t", QUANT + FLOAT)
def test_matvec_assembly_uses_avx2(t, rng):
    """The compiled matvec's loops run on ymm registers with FMA (and vpmaddubsw for quants)."""
    fn = njit(nogil=True, fastmath=True)(kernel("matvec", t).py_func)  # uncached: numba hides cached asm
    rows, cols = 4, 64
    w, _ = make_weights(t, rows, cols, rng)
    fn(w, cols, np.zeros(cols, np.float32), np.zeros(rows, np.float32), 0, rows)
    asm = fn.inspect_asm(fn.signatures[0])
    assert "ymm" in asm and "vfmadd" in asm
    if t in QUANT:
        assert "vpmaddubsw" in asm and "vpinsrb" not in asm
    if t == "f16":
        assert "vcvtph2ps" in asm


def test_partial_block_rows_are_rejected():
    w, _ = make_weights("q4_0", 2, 64, np.random.default_rng(0))
    with pytest.raises(ValueError):
        quant_legacy.matvec_q4_0(w, 48, np.zeros(48, np.float32), np.zeros(2, np.float32), 0, 2)
