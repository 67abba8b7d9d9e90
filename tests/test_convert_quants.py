"""The converter's ggml quantizers against ggml itself (bit-exact) and gguf-py's dequantizers."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from edgelm.converters.quantize_ggml import quantize_rows
from edgelm.converters.recipe import TensorSite, llama_cpp_type, use_more_bits
from edgelm.runtime.quants import GGMLType, dequantize, row_nbytes

TYPES = [GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q5_1]


def weights(rows: int, n: int, seed: int = 0) -> np.ndarray:
    """Gaussian rows at several scales, plus the degenerate blocks the searches special-case."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x *= np.geomspace(1e-4, 10, rows, dtype=np.float32)[:, None]
    x[0, :256] = 0.0                       # all-zero block
    x[1, :256] = 0.5                       # constant block
    x[2, :256] = np.abs(x[2, :256])        # all positive (min clamps to 0)
    x[3, :256] = -np.abs(x[3, :256])       # all negative
    x[4, 7] = 1000.0                       # one outlier
    return x


@pytest.fixture(scope="module")
def ggml_quantize(llama_cpp):
    """ggml_quantize_chunk from the libggml that llama-cpp-python ships (no importance matrix)."""
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]

    def run(x: np.ndarray, t: GGMLType) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], row_nbytes(t, x.shape[1])), np.uint8)
        fn(int(t), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        return out

    return run


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_bit_exact_with_ggml(t, ggml_quantize):
    x = weights(96, 1536)
    ours, theirs = quantize_rows(x, t), ggml_quantize(x, t)
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_round_trip_through_gguf_py(t):
    x = weights(64, 512, seed=1)[32:]  # ordinary rows (tiny scales underflow the f16 super-scale)
    q = quantize_rows(x, t)
    back = gguf_dequantize(q, GGMLQuantizationType(int(t)))
    assert np.array_equal(back, dequantize(q, t, x.shape))  # our reader agrees with gguf-py's
    rel = np.sqrt(((back - x) ** 2).mean(axis=1) / (x ** 2).mean(axis=1))
    bound = {GGMLType.Q3_K: 0.25, GGMLType.Q4_K: 0.12, GGMLType.Q5_K: 0.06, GGMLType.Q6_K: 0.03,
             GGMLType.Q4_0: 0.12, GGMLType.Q5_0: 0.06, GGMLType.Q5_1: 0.06}[t]
    assert rel.max() < bound, rel.max()


def test_use_more_bits_matches_llama_cpp_for_30_layers():
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


@pytest.mark.parametrize("name,shape,tied,want", [
    ("output.weight", (49152, 576), False, GGMLType.Q8_0),
    ("output.weight", (32000, 4096), False, GGMLType.Q6_K),
    ("token_embd.weight", (49152, 576), True, GGMLType.Q8_0),
    ("token_embd.weight", (32000, 4096), False, GGMLType.Q4_K),
    ("blk.0.attn_v.weight", (192, 576), True, GGMLType.Q8_0),     # Q6_K falls back to Q8_0
    ("blk.3.attn_v.weight", (192, 576), True, GGMLType.Q5_0),     # Q4_K falls back to Q5_0
    ("blk.3.ffn_down.weight", (576, 1536), True, GGMLType.Q4_K),
    ("blk.5.ffn_down.weight", (576, 1536), True, GGMLType.Q6_K),
    ("blk.5.attn_norm.weight", (576,), True, GGMLType.F32),
])
def test_llama_cpp_recipe(name, shape, tied, want):
    layer = int(name.split(".")[1]) if name.startswith("blk.") else None
    assert llama_cpp_type(TensorSite(name, shape, layer, 30, tied)) is want


@pytest.mark.parametrize("name,shape,want", [
    ("output.weight", (32000, 4096), GGMLType.Q6_K),
    ("token_embd.weight", (32000, 4096), GGMLType.Q3_K),
    ("blk.0.attn_q.weight", (4096, 4096), GGMLType.Q3_K),
    ("blk.1.attn_v.weight", (1024, 4096), GGMLType.Q5_K),   # the first two attn_v
    ("blk.2.attn_v.weight", (1024, 4096), GGMLType.Q4_K),
    ("blk.1.ffn_down.weight", (4096, 14336), GGMLType.Q5_K),  # the first n_layers / 16 = 2 layers
    ("blk.2.ffn_down.weight", (4096, 14336), GGMLType.Q4_K),
    ("blk.9.attn_output.weight", (4096, 4096), GGMLType.Q4_K),
    ("blk.9.ffn_up.weight", (14336, 4096), GGMLType.Q3_K),
    ("blk.9.ffn_up.weight", (1536, 576), GGMLType.Q4_0),      # fallbacks on rows of 576
    ("blk.0.attn_v.weight", (192, 576), GGMLType.Q5_1),
    ("blk.9.attn_output.weight", (576, 576), GGMLType.Q5_0),
])
def test_llama_cpp_q3_k_m_recipe(name, shape, want):
    site = TensorSite(name, shape, int(name.split(".")[1]) if name.startswith("blk.") else None, 32, False)
    assert llama_cpp_type(site, "q3_k_m") is want
