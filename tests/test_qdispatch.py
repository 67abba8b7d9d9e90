"""The type dispatcher: codes, routing to each type's kernels, and use from compiled code."""
from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader, quants
from gguf import GGMLQuantizationType as GT
from numba import njit

from edgelm.kernels import qdispatch, quant_float, quant_k, quant_k8, quant_legacy
from edgelm.kernels.microbench import main as microbench_main
from edgelm.kernels.microbench import random_weights, type_name

TYPES = sorted(qdispatch.SUPPORTED_TYPES)


def readonly_weights(gtype: int, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid rows, read-only like the engine's memory-mapped GGUF (a distinct numba type)."""
    w = random_weights(gtype, rows, cols, rng)
    w.setflags(write=False)
    return w
MODULES = (quant_legacy, quant_float, quant_k)


def assert_same(gtype: int, out: np.ndarray, ref: np.ndarray, scale: np.ndarray) -> None:
    """A call through the dispatcher computes what the direct call does, up to float32 rounding
    (LLVM may contract or reorder a kernel's scalar tail differently once it is inlined)."""
    assert np.all(np.abs(out - ref) <= 1e-5 * scale)


def direct(op: str, gtype: int):
    """The type's own kernel, e.g. quant_legacy.matvec_q4_1; for Q4_K and Q6_K the Q8_K
    (int8-activation) ones of quant_k8, e.g. quant_k8.matvec_q4_k8."""
    name = f"{op}_{type_name(gtype)}"
    if gtype in (qdispatch.Q4_K, qdispatch.Q6_K):
        return getattr(quant_k8, name + "8")
    return next(getattr(m, name) for m in MODULES if hasattr(m, name))


def test_type_codes_are_ggml_enum():
    for name in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        assert getattr(qdispatch, name) == GT[name].value
    assert qdispatch.SUPPORTED_TYPES == frozenset(GT[n].value for n in (
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))


@pytest.mark.parametrize("gtype", TYPES)
def test_row_nbytes(gtype):
    per_block, nbytes = GGML_QUANT_SIZES[GT(gtype)]
    assert qdispatch.row_nbytes(gtype, 2048) == 2048 // per_block * nbytes
    if per_block > 1:
        with pytest.raises(ValueError):
            qdispatch.row_nbytes(gtype, per_block + 1)


@pytest.mark.parametrize("gtype", TYPES, ids=type_name)
def test_routes_to_the_types_kernels(gtype):
    """Dispatcher output is bit-identical to the type's kernel and close to gguf's dequantization."""
    rng = np.random.default_rng(gtype)
    rows, cols, r0, r1 = 12, 512, 1, 11
    w = readonly_weights(gtype, rows, cols, rng)
    Wd = quants.dequantize(w.reshape(rows, -1), GT(gtype)).astype(np.float64).reshape(rows, cols)
    x = rng.standard_normal(cols).astype(np.float32)
    X = rng.standard_normal((5, cols)).astype(np.float32)

    out, ref = np.zeros(rows, np.float32), np.zeros(rows, np.float32)
    qdispatch.matvec(w, gtype, cols, x, out, r0, r1)
    direct("matvec", gtype)(w, cols, x, ref, r0, r1)
    assert_same(gtype, out, ref, np.abs(Wd) @ np.abs(x))
    # loose check against the oracle (the type's own tests hold the tight ones): a routing
    # mistake would be off by O(1)
    assert np.all(np.abs(out[r0:r1] - Wd[r0:r1] @ x) <= 2e-2 * (np.abs(Wd[r0:r1]) @ np.abs(x)))

    out2, ref2 = np.zeros((5, rows), np.float32), np.zeros((5, rows), np.float32)
    qdispatch.matmul(w, gtype, cols, X, out2, r0, r1)
    direct("matmul", gtype)(w, cols, X, ref2, r0, r1)
    assert_same(gtype, out2, ref2, np.abs(X) @ np.abs(Wd).T)

    emb = np.zeros((3, cols), np.float32)
    qdispatch.dequantize_rows(w, gtype, cols, 4, 7, emb)
    np.testing.assert_allclose(emb, Wd[4:7], rtol=1e-6, atol=1e-7)


def test_unsupported_type_raises():
    w = np.zeros(64, np.uint8)
    with pytest.raises(ValueError):
        qdispatch.matvec(w, 10, 32, np.zeros(32, np.float32), np.zeros(1, np.float32), 0, 1)  # Q2_K


@njit(nogil=True)
def _project_all(blob, table, X, n, out, outs):
    """Mimics the forward pass: weights as slices of one byte blob, described by an int64 table;
    matvec of X[0] into out[i], matmul of X[:n] into outs[i, :n]."""
    for i in range(table.shape[0]):
        off, nbytes, gtype, r0, r1, cols = table[i]  # (r0 from the table: a literal 0 would
        w = blob[off:off + nbytes]                   # make numba compile a second specialization)
        qdispatch.matvec(w, gtype, cols, X[0], out[i], r0, r1)
        qdispatch.matmul(w, gtype, cols, X[:n], outs[i, :n], r0, r1)


def test_called_from_compiled_code_on_a_blob():
    rng = np.random.default_rng(7)
    cols, rows = 256, 6
    parts, table, off = [], [], 0
    for gtype in TYPES:
        w = readonly_weights(gtype, rows, cols, rng)
        parts.append(w)
        table.append((off, w.size, gtype, 0, rows, cols))
        off += w.size
    blob = np.concatenate(parts)
    blob.setflags(write=False)
    X = rng.standard_normal((8, cols)).astype(np.float32)
    out = np.zeros((len(TYPES), rows), np.float32)
    outs = np.zeros((len(TYPES), 8, rows), np.float32)
    _project_all(blob, np.array(table, np.int64), X, 3, out, outs)
    for i, gtype in enumerate(TYPES):
        Wd = quants.dequantize(parts[i].reshape(rows, -1), GT(gtype)).astype(np.float64).reshape(rows, cols)
        ref = np.zeros(rows, np.float32)
        direct("matvec", gtype)(parts[i], cols, X[0], ref, 0, rows)
        assert_same(gtype, out[i], ref, np.abs(Wd) @ np.abs(X[0]))
        ref2 = np.zeros((3, rows), np.float32)
        direct("matmul", gtype)(parts[i], cols, X[:3], ref2, 0, rows)
        assert_same(gtype, outs[i, :3], ref2, np.abs(X[:3]) @ np.abs(Wd).T)
        assert not outs[i, 3:].any()


def test_default_model_types_supported(default_gguf):
    reader = GGUFReader(default_gguf)
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    assert matrices and all(int(t.tensor_type) in qdispatch.SUPPORTED_TYPES for t in matrices)
    t = next(t for t in matrices if t.name == "blk.0.attn_v.weight")
    rows, cols = int(t.shape[1]), int(t.shape[0])
    w = t.data.reshape(-1)  # read-only memmap, as the engine maps the file
    x = np.random.default_rng(0).standard_normal(cols).astype(np.float32)
    out, ref = np.zeros(rows, np.float32), np.zeros(rows, np.float32)
    qdispatch.matvec(w, int(t.tensor_type), cols, x, out, 0, rows)
    direct("matvec", int(t.tensor_type))(w, cols, x, ref, 0, rows)
    np.testing.assert_array_equal(out, ref)


def test_microbench_json(capsys):
    microbench_main(["--types", "q4_1,f16", "--shapes", "64x256", "--n", "3", "--min-time", "0.001", "--json"])
    results = json.loads(capsys.readouterr().out)
    assert [(r["type"], r["op"]) for r in results] == [("q4_1", "matvec"), ("q4_1", "matmul n=3"),
                                                       ("f16", "matvec"), ("f16", "matmul n=3")]
    assert all(r["gflops"] > 0 and r["gbps"] > 0 for r in results)
