"""GGUF tensors -> MLX weights (kernels/mlx_weights): packing and exactness of every mapping."""
from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'edgelm[mlx]'; mlx[cpu] on Linux)")

from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

from edgelm.kernels import mlx_weights  # noqa: E402
from edgelm.runtime import affine, quants  # noqa: E402
from edgelm.runtime.quants import GGMLType  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64])
def test_pack_equals_mx_quantize(bits, group, rng):
    w = rng.standard_normal((7, 256)).astype(np.float32)
    words, s, b = mx.quantize(mx.array(w), group_size=group, bits=bits)
    deq = np.array(mx.dequantize(words, s, b, group_size=group, bits=bits))
    s_, b_ = np.repeat(np.array(s), group, 1), np.repeat(np.array(b), group, 1)
    codes = np.clip(np.round((deq - b_) / s_), 0, 2 ** bits - 1).astype(np.uint8)
    np.testing.assert_array_equal(mlx_weights.pack(codes, bits), np.array(words))
    if bits in affine.BITS:  # the converter's packing is the same
        np.testing.assert_array_equal(affine.pack(codes, bits), np.array(words))


def _random_blocks(gtype: GGMLType, n_blocks: int, rng) -> np.ndarray:
    """Random bytes of ``n_blocks`` blocks with finite, moderate f16 scale fields."""
    ts = quants.type_size(gtype)
    raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    halves = (rng.standard_normal((n_blocks, 2)) * 0.01).astype("<f2").view(np.uint8)
    if gtype in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q5_1,
                 GGMLType.Q4_K, GGMLType.Q5_K):
        raw[:, 0:4] = halves  # d (and m / dmin)
    elif gtype == GGMLType.Q6_K:
        raw[:, 208:210] = halves[:, :2]
    elif gtype == GGMLType.Q3_K:
        raw[:, 108:110] = halves[:, :2]
    return raw


EXACT = ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K"]


@pytest.mark.parametrize("name", EXACT)
def test_ggml_types_map_exactly(name, rng):
    """MLX's dequantization of the mapped tensor equals the gguf package's, bit for bit."""
    gtype = GGMLType[name]
    rows, cols = 6, 512
    raw = _random_blocks(gtype, rows * cols // quants.block_size(gtype), rng)
    w = mlx_weights.convert_blocks(raw, gtype, rows, cols)
    assert isinstance(w, mlx_weights.QuantWeight) and w.group_size == 32 and w.shape == (rows, cols)
    want = gguf_dequantize(raw.reshape(rows, -1), GGMLQuantizationType[name]).astype(np.float32)
    np.testing.assert_array_equal(np.array(w.dequantize()), want)
    # and the matrix product uses exactly these weights (up to float32 summation order)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    np.testing.assert_allclose(np.array(w.matmul(mx.array(x))), x @ want.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.array(w.rows(mx.array([4, 1]))), want[[4, 1]])


@pytest.mark.parametrize("name,bits", [("Q6_K", 8), ("Q3_K", 6)])
def test_sub_block_16_types_are_requantized(name, bits, rng):
    gtype = GGMLType[name]
    rows, cols = 8, 1024
    raw = _random_blocks(gtype, rows * cols // 256, rng)
    w = mlx_weights.convert_blocks(raw, gtype, rows, cols)
    assert (w.bits, w.group_size) == (bits, 32)
    want = gguf_dequantize(raw.reshape(rows, -1), GGMLQuantizationType[name]).astype(np.float32)
    rel = np.sqrt(np.mean((np.array(w.dequantize()) - want) ** 2) / np.mean(want ** 2))
    print(f"{name} -> {bits}-bit g32: relative RMS error {rel:.2e}")
    assert rel < (0.01 if bits == 8 else 0.05)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_float_types_stay_dense(name, rng):
    w = rng.standard_normal((5, 64)).astype(np.float32)
    raw = {"F32": w, "F16": w.astype(np.float16),
           "BF16": (w.view(np.uint32) >> 16).astype(np.uint16)}[name].view(np.uint8)
    got = mlx_weights.convert_blocks(raw, GGMLType[name], 5, 64)
    assert isinstance(got, mlx_weights.DenseWeight)
    np.testing.assert_array_equal(np.array(got.dequantize()), quants.dequantize(raw, GGMLType[name], (5, 64)))


def test_unsupported_type_is_refused(rng):
    with pytest.raises(NotImplementedError, match="IQ2_XXS"):
        mlx_weights.convert_blocks(np.zeros(66, np.uint8), GGMLType.IQ2_XXS, 1, 256)
    with pytest.raises(ValueError):
        mlx_weights.pack(np.zeros((1, 33), np.uint8), 4)


@pytest.mark.parametrize("bits", [4, 3])
def test_affine_tensors_go_in_unchanged(bits, rng):
    """The converter's affine tensors are MLX's format: words pass through, and MLX's
    dequantization equals the NumPy reference's."""
    w = (rng.standard_normal((16, 256)) * 0.05).astype(np.float32)
    q, s, b = affine.quantize_rtn_reference(w, bits, 64)
    words = affine.pack(q, bits)
    mw = mlx_weights.convert_affine(words, s.astype(np.float16), b.astype(np.float16), bits, 64)
    np.testing.assert_array_equal(np.array(mw.w), words)
    ref = affine.dequantize(words, s.astype(np.float16), b.astype(np.float16), bits, 64)
    np.testing.assert_array_equal(np.array(mw.dequantize()), ref)
    mq, ms, mb = mx.quantize(mx.array(w), group_size=64, bits=bits)  # and it is what mx.quantize makes
    np.testing.assert_array_equal(np.array(mq), words)
