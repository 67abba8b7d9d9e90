"""Reference quant types, bit-exact against the ``gguf`` package's NumPy implementation."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgelm.runtime import quants
from edgelm.runtime.gguf import GGUFFile
from edgelm.runtime.quants import QUANT_TYPES, GGMLType

# Byte offsets of the f16 scale/min fields inside one block (ggml-common.h). The other bytes are
# quant bits, for which every value is valid; the scales are set to finite, sane halves.
F16_FIELDS = {
    GGMLType.Q8_0: (0,), GGMLType.Q4_0: (0,), GGMLType.Q5_0: (0,),
    GGMLType.Q4_1: (0, 2), GGMLType.Q5_1: (0, 2), GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,), GGMLType.Q3_K: (108,),
}
FLOAT_TYPES = {GGMLType.F32: "<f4", GGMLType.F16: "<f2", GGMLType.BF16: "<f4"}


def _oracle(raw: np.ndarray, gtype: GGMLType, shape: tuple[int, int]) -> np.ndarray:
    return gguf.quants.dequantize(raw.reshape(shape[0], -1), QT(int(gtype)))


def _random_blocks(gtype: GGMLType, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """uint8[n_blocks, type_size] that decode to finite values."""
    if gtype in FLOAT_TYPES:
        values = rng.standard_normal(n_blocks).astype(FLOAT_TYPES[gtype])
        if gtype == GGMLType.BF16:  # keep the top half of each float32
            return (values.view("<u4") >> 16).astype("<u2").view(np.uint8).reshape(n_blocks, 2)
        return values.view(np.uint8).reshape(n_blocks, -1)
    blocks = rng.integers(0, 256, (n_blocks, quants.type_size(gtype)), dtype=np.uint8)
    for at in F16_FIELDS[gtype]:
        scale = rng.standard_normal(n_blocks) * 10.0 ** rng.integers(-6, 1, n_blocks)
        scale[:3] = [0.0, -0.0, 6e-8]  # zero, negative zero, an f16 subnormal
        blocks[:, at:at + 2] = scale.astype("<f2").view(np.uint8).reshape(n_blocks, 2)
    return blocks


def test_every_supported_type_is_covered() -> None:
    assert set(QUANT_TYPES) == set(F16_FIELDS) | set(FLOAT_TYPES)


def test_type_codes_and_geometry_match_ggml() -> None:
    assert {t.name: int(t) for t in GGMLType} == {t.name: int(t) for t in QT}
    for t in GGMLType:
        assert (quants.block_size(t), quants.type_size(t)) == GGML_QUANT_SIZES[QT(int(t))], t.name
    assert quants.row_nbytes(GGMLType.Q4_K, 512) == 2 * 144
    with pytest.raises(ValueError, match="not a multiple of the Q4_0 block size 32"):
        quants.row_nbytes(GGMLType.Q4_0, 48)


@pytest.mark.parametrize("gtype", list(QUANT_TYPES), ids=lambda t: t.name)
def test_dequantize_random_blocks_bit_exact(gtype: GGMLType) -> None:
    rng = np.random.default_rng(int(gtype))
    codec = QUANT_TYPES[gtype]
    n_rows, blocks_per_row = 7, 12
    blocks = _random_blocks(gtype, n_rows * blocks_per_row, rng)
    out = codec.dequantize(blocks)
    assert out.shape == (len(blocks), codec.block_size) and out.dtype == np.float32
    shape = (n_rows, blocks_per_row * codec.block_size)
    ours = quants.dequantize(blocks.reshape(-1), gtype, shape)
    ref = _oracle(blocks, gtype, shape)
    assert not np.isnan(ref).any()
    assert ours.shape == shape and np.array_equal(ours, ref)


@pytest.fixture(scope="module")
def model(default_gguf: Path):
    with GGUFFile(default_gguf) as f:
        yield f


@pytest.mark.parametrize("name, gtype", [
    ("token_embd.weight", GGMLType.Q8_0),
    ("blk.0.attn_q.weight", GGMLType.Q4_1),
    ("blk.0.ffn_down.weight", GGMLType.Q4_1),
    ("blk.29.ffn_gate.weight", GGMLType.Q4_1),
    ("blk.0.attn_norm.weight", GGMLType.F32),
    ("output_norm.weight", GGMLType.F32),
])
def test_dequantize_model_tensors_bit_exact(model: GGUFFile, name: str, gtype: GGMLType) -> None:
    info = model.tensors[name]
    assert info.ggml_type == gtype
    ours = model.tensor(name)
    ref = gguf.quants.dequantize(model.tensor_bytes(name).reshape(info.n_rows, -1), QT(int(gtype)))
    assert ours.shape == info.np_shape
    assert np.array_equal(ours, ref.reshape(info.np_shape))


def test_dequantize_rejects_wrong_sizes_and_unsupported_types() -> None:
    raw = np.zeros(2 * 34, np.uint8)
    with pytest.raises(ValueError, match="needs 102 bytes, got 68"):
        quants.dequantize(raw, GGMLType.Q8_0, (3, 32))
    with pytest.raises(NotImplementedError, match="Q2_K"):
        quants.dequantize(np.zeros(84, np.uint8), GGMLType.Q2_K, (1, 256))


QUANTIZABLE = [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1]


def _edge_rows() -> np.ndarray:
    """Blocks that exercise the rounding rules: zeros, constants, exact .5 ties, sign of the
    extreme, large and tiny magnitudes."""
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((10, 32)).astype(np.float32)
    rows[0] = 0
    rows[1] = 3.25
    rows[2] = np.arange(32) - 15.5  # Q8_0: amax 16.5 -> many exact halves after scaling
    rows[3, 0] = 127.0  # Q8_0 scale 1 exactly: x.5 values tie
    rows[3, 1:] = np.arange(31) * 0.5 - 7.5
    rows[4] *= 3e4  # near the top of the f16 range of the scale
    rows[5] *= 1e-6  # scales become f16 subnormals
    rows[6, 5] = -50.0  # a negative extreme: Q4_0's scale is negative
    rows[7] = -np.abs(rows[7])
    rows[8, :16] = 0.0
    return rows


@pytest.mark.parametrize("gtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantize_bit_exact(gtype: GGMLType) -> None:
    rng = np.random.default_rng(3)
    x = np.concatenate([_edge_rows(), rng.standard_normal((6, 32)).astype(np.float32) * 3])
    x = x.reshape(2, 4, 64)  # leading dims are kept: (..., n) -> (..., row bytes)
    ours = quants.quantize(x, gtype)
    assert ours.shape == (2, 4, quants.row_nbytes(gtype, 64)) and ours.dtype == np.uint8
    assert np.array_equal(ours, gguf.quants.quantize(x, QT(int(gtype))))
    back = quants.dequantize(ours, gtype, (8, 64)).reshape(x.shape)
    # Round trip: within one quantization step (scale or range / 15) of the input.
    step = np.abs(x.reshape(-1, 32)).max(axis=1) / (127 if gtype == GGMLType.Q8_0 else 7)
    assert (np.abs(back - x).reshape(-1, 32).max(axis=1) <= step * 1.01 + 1e-5).all()


# Nonzero magnitudes below 1e-30 are left out: there 1/d overflows to inf and ggml (and the gguf
# package) cast inf/NaN to int, which C leaves undefined and CPUs answer differently.
_weights = st.floats(-1e4, 1e4, width=32).map(lambda v: v if abs(v) >= 1e-30 else 0.0)


@settings(max_examples=150, deadline=None)
@given(x=hnp.arrays(np.float32, (3, 32), elements=_weights), gtype=st.sampled_from(QUANTIZABLE))
def test_quantize_bit_exact_property(x: np.ndarray, gtype: GGMLType) -> None:
    assert np.array_equal(quants.quantize(x, gtype), gguf.quants.quantize(x, QT(int(gtype))))
