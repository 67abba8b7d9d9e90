"""Build small GGUF files byte by byte, valid or deliberately broken, for the reader's tests.

Independent of ``edgelm.runtime.gguf`` (type codes come from the ``gguf`` package) so the tests
do not grade the reader with its own encoder. Every piece can be overridden: counts, version,
magic, tensor offsets, raw key/value or tensor-info bytes.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

_SCALAR_FORMATS = {
    VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I",
    VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<B", VT.UINT64: "<Q", VT.INT64: "<q",
    VT.FLOAT64: "<d",
}


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def string(s: str | bytes) -> bytes:
    """GGUF string: u64 byte length, then the bytes (raw bytes allow invalid UTF-8)."""
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b)) + b


def value(vtype: int, v: Any) -> bytes:
    """Encode a value of ``vtype``; an ARRAY value is ``(element_type, items)``."""
    if vtype == VT.STRING:
        return string(v)
    if vtype == VT.ARRAY:
        etype, items = v
        return u32(etype) + u64(len(items)) + b"".join(value(etype, x) for x in items)
    return struct.pack(_SCALAR_FORMATS[VT(vtype)], v)


def kv(key: str | bytes, vtype: int, v: Any) -> bytes:
    """One encoded key/value pair."""
    return string(key) + u32(vtype) + value(vtype, v)


@dataclass
class Tensor:
    """A tensor to store: ``shape`` in ggml order; ``offset`` relative to the data section
    (None: next aligned position after the previous tensor). Empty ``data`` declares the tensor
    without storing anything, for infos that are broken on purpose."""

    name: str | bytes
    shape: Sequence[int]
    gtype: int
    data: bytes
    offset: int | None = None


def tensor_info(name: str | bytes, shape: Sequence[int], gtype: int, offset: int) -> bytes:
    return string(name) + u32(len(shape)) + b"".join(u64(d) for d in shape) + u32(gtype) + u64(offset)


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def build(
    kvs: Sequence[bytes],
    tensors: Sequence[Tensor],
    *,
    alignment: int = 32,
    magic: bytes = b"GGUF",
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
) -> bytes:
    """A whole file. ``alignment`` only drives the layout: a non-default one also needs its kv."""
    offsets, pos = [], 0
    for t in tensors:
        off = _align(pos, alignment) if t.offset is None else t.offset
        offsets.append(off)
        if t.data:  # declared-only tensors (empty data) may point anywhere, even past the file
            pos = max(pos, off + len(t.data))
    header = magic + u32(version)
    header += u64(len(tensors) if n_tensors is None else n_tensors)
    header += u64(len(kvs) if n_kv is None else n_kv)
    meta = header + b"".join(kvs)
    meta += b"".join(tensor_info(t.name, t.shape, t.gtype, o) for t, o in zip(tensors, offsets))
    if not tensors:
        return meta
    data = bytearray(_align(pos, alignment))
    for t, o in zip(tensors, offsets):
        if t.data:
            data[o:o + len(t.data)] = t.data
    return meta + bytes(_align(len(meta), alignment) - len(meta)) + bytes(data)


def _halves(rng: np.random.Generator, n: int) -> np.ndarray:
    return (rng.standard_normal(n) * 0.05).astype("<f2").view(np.uint8).reshape(n, 2)


def sample_tensors(seed: int = 0) -> list[Tensor]:
    """An F32 norm, a Q8_0 and a Q4_1 matrix with finite f16 scales."""
    rng = np.random.default_rng(seed)
    q8 = rng.integers(0, 256, (6, 34), dtype=np.uint8)
    q8[:, :2] = _halves(rng, 6)
    q41 = rng.integers(0, 256, (2, 20), dtype=np.uint8)
    q41[:, :2], q41[:, 2:4] = _halves(rng, 2), _halves(rng, 2)
    return [
        Tensor("norm.weight", (32,), QT.F32, rng.standard_normal(32).astype("<f4").tobytes()),
        Tensor("blk.0.attn_q.weight", (64, 3), QT.Q8_0, q8.tobytes()),
        Tensor("blk.0.ffn_up.weight", (32, 2), QT.Q4_1, q41.tobytes()),
    ]


def sample_kvs() -> list[bytes]:
    """Metadata using every value type, string and numeric arrays, and one nested array."""
    return [
        kv("general.architecture", VT.STRING, "llama"),
        kv("general.name", VT.STRING, "tiny ünïcode ✓"),
        kv("llama.block_count", VT.UINT32, 1),
        kv("test.u8", VT.UINT8, 200), kv("test.i8", VT.INT8, -5),
        kv("test.u16", VT.UINT16, 60000), kv("test.i16", VT.INT16, -300),
        kv("test.i32", VT.INT32, -70000), kv("test.u64", VT.UINT64, 1 << 40),
        kv("test.i64", VT.INT64, -(1 << 40)), kv("test.f64", VT.FLOAT64, 0.1),
        kv("llama.rope.freq_base", VT.FLOAT32, 10000.0),
        kv("tokenizer.ggml.add_bos_token", VT.BOOL, 1),
        kv("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, ["<s>", "</s>", "é", "", "Ġthe"])),
        kv("tokenizer.ggml.scores", VT.ARRAY, (VT.FLOAT32, [0.0, -1.5, 2.25, 3.0, 4.0])),
        kv("tokenizer.ggml.token_type", VT.ARRAY, (VT.INT32, [3, 3, 1, 1, 1])),
        kv("test.nested", VT.ARRAY, (VT.ARRAY, [(VT.UINT8, [1, 2]), (VT.UINT8, [3])])),
    ]


def valid_file() -> bytes:
    """The small valid file the malformation and fuzz tests start from."""
    return build(sample_kvs(), sample_tensors())
