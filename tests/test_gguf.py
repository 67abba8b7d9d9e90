"""The GGUF reader: agreement with ``gguf.GGUFReader``, one test per malformation, and fuzzing."""
from __future__ import annotations

import os
import struct
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gguf_factory as F
from edgelm.runtime.gguf import GGUFError, GGUFFile
from edgelm.runtime.quants import GGMLType


def _write(tmp_path: Path, data: bytes, name: str = "model.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _ours_as_oracle(value: object) -> object:
    """Our metadata value in the shape ``ReaderField.contents()`` gives (nested arrays flattened)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list) and value and not isinstance(value[0], str):
        return [x for v in value for x in _ours_as_oracle(v)]
    return value


def _assert_matches_oracle(ours: GGUFFile, ref: gguf.GGUFReader) -> None:
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        assert _ours_as_oracle(ours.metadata[key]) == field.contents(), key
    assert ours.version == ref.fields["GGUF.version"].contents()
    assert (ours.alignment, ours.data_offset) == (ref.alignment, ref.data_offset)
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(int(d) for d in t.shape)
        assert int(info.ggml_type) == int(t.tensor_type)
        assert (info.offset, info.nbytes, info.n_elements) == (t.data_offset, t.n_bytes, t.n_elements)
        assert np.array_equal(ours.tensor_bytes(t.name), t.data.reshape(-1).view(np.uint8)), t.name


# ---------------------------------------------------------------------------------------------
# Valid files


@pytest.fixture(scope="module")
def default_pair(default_gguf: Path):
    with GGUFFile(default_gguf) as ours:
        yield ours, gguf.GGUFReader(default_gguf)


def test_default_model_matches_gguf_reader(default_pair) -> None:
    ours, ref = default_pair
    _assert_matches_oracle(ours, ref)
    assert len(ours.get("tokenizer.ggml.tokens")) == 49152
    assert ours.get("tokenizer.ggml.token_type").dtype == np.int32
    assert ours.get("llama.embedding_length") == 576
    assert ours.get("no.such.key", "dflt") == "dflt"
    emb = ours.tensors["token_embd.weight"]
    assert (emb.ggml_type, emb.np_shape, emb.n_rows) == (GGMLType.Q8_0, (49152, 576), 49152)


def test_default_model_opens_fast(default_gguf: Path) -> None:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        GGUFFile(default_gguf).close()
        best = min(best, time.perf_counter() - t0)
    assert best < 0.3, f"open took {best:.3f} s"


def test_tensor_views_are_zero_copy_and_read_only(default_pair) -> None:
    ours, _ = default_pair
    raw = ours.tensor_bytes("blk.0.attn_q.weight")
    assert np.shares_memory(raw, ours.buffer) and not raw.flags.writeable
    norm = ours.tensor("output_norm.weight")
    assert norm.dtype == np.float32 and norm.shape == (576,)


@pytest.mark.parametrize("version", [2, 3])
def test_factory_file_matches_gguf_reader(tmp_path: Path, version: int) -> None:
    path = _write(tmp_path, F.build(F.sample_kvs(), F.sample_tensors(), version=version))
    with GGUFFile(path) as ours:
        _assert_matches_oracle(ours, gguf.GGUFReader(path))
        assert ours.version == version
        assert ours.metadata["test.nested"][1].tolist() == [3]
        assert ours.metadata["tokenizer.ggml.add_bos_token"] is True


def test_reads_gguf_writer_output_with_custom_alignment(tmp_path: Path) -> None:
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_custom_alignment(64)
    writer.add_array("test.strings", ["a", "ünï", ""])
    writer.add_array("test.floats", [0.5, 1.5])
    rng = np.random.default_rng(1)
    writer.add_tensor("a", rng.standard_normal((3, 64)).astype(np.float32))
    halves = rng.standard_normal(7).astype(np.float16)
    writer.add_tensor("b", halves)
    writer.add_tensor("c", gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), QT.Q8_0),
                      raw_dtype=QT.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with GGUFFile(path) as ours:
        _assert_matches_oracle(ours, gguf.GGUFReader(path))
        assert ours.alignment == 64 and all(t.offset % 64 == 0 for t in ours.tensors.values())
        assert np.array_equal(ours.tensor("b"), halves.astype(np.float32))


def test_closed_file_refuses_access(tmp_path: Path) -> None:
    data = F.valid_file()
    ours = GGUFFile(_write(tmp_path, data))
    info = ours.tensors["norm.weight"]
    kept = ours.tensor_bytes("norm.weight")
    ours.close()
    with pytest.raises(ValueError, match="closed"):
        ours.tensor_bytes("norm.weight")
    assert kept.tobytes() == data[info.offset:info.offset + info.nbytes]  # earlier views stay valid


# ---------------------------------------------------------------------------------------------
# One test per malformation. Each builds a bad file from the factory's pieces.

KVS = F.sample_kvs()
T_F32 = F.Tensor("t", (32, 2), QT.F32, bytes(256))


def _kv_file(*kvs: bytes) -> bytes:
    return F.build(list(kvs), [T_F32])


def _tensor_file(*tensors: F.Tensor) -> bytes:
    return F.build(KVS, list(tensors))


def _declared(shape: tuple[int, ...], gtype: int = QT.F32, offset: int | None = None) -> F.Tensor:
    return F.Tensor("blk.0.attn_q.weight", shape, gtype, b"", offset)


def _alignment_kv(vtype: int, value: object) -> bytes:
    return F.kv("general.alignment", vtype, value)


def _nested(depth: int) -> tuple[int, object]:
    value: tuple[int, object] = (VT.UINT8, [1])
    for _ in range(depth - 1):
        value = (VT.ARRAY, [value])
    return value


K = F.string("k")  # a key, for hand-encoded broken values
TWO_F32 = [F.Tensor("t", (8,), QT.F32, bytes(32)), F.Tensor("u", (8,), QT.F32, bytes(32))]

MALFORMED = {
    # header
    "bad_magic": (F.build(KVS, [T_F32], magic=b"GGML"), r"magic \(at offset 0\).*not a GGUF"),
    "version_1": (F.build(KVS, [T_F32], version=1), r"version \(at offset 4\): version 1;"),
    "version_4": (F.build(KVS, [T_F32], version=4), r"version 4;"),
    "big_endian": (F.build(KVS, [T_F32], version=3 << 24), r"big-endian"),
    "kv_count_too_big": (F.build(KVS, [T_F32], n_kv=1 << 60), r"kv_count \(at offset 16\).*cannot fit"),
    "tensor_count_too_big": (F.build(KVS, [T_F32], n_tensors=1 << 40), r"tensor_count.*cannot fit"),
    "header_truncated": (F.valid_file()[:20], r"20 bytes, shorter than the 24-byte GGUF header"),
    "empty": (b"", r"model.gguf: file is 0 bytes"),
    # lengths past the end of the file
    "key_length_beyond_file": (_kv_file(F.u64(1 << 62) + b"abc"),
                               r"key #0 \(at offset 24\): length 4611686018427387904 runs past the end"),
    "string_beyond_file": (_kv_file(K + F.u32(VT.STRING) + F.u64(1 << 40)),
                           r"key 'k' \(at offset \d+\): length 1099511627776 runs past"),
    "numeric_array_beyond_file": (_kv_file(K + F.u32(VT.ARRAY) + F.u32(VT.INT32) + F.u64(1 << 40)),
                                  r"key 'k'.*array of 1099511627776 INT32 cannot fit"),
    "string_array_beyond_file": (_kv_file(K + F.u32(VT.ARRAY) + F.u32(VT.STRING) + F.u64(1 << 61)),
                                 r"array of 2305843009213693952 STRING cannot fit"),
    "string_array_element_beyond_file": (
        _kv_file(K + F.u32(VT.ARRAY) + F.u32(VT.STRING) + F.u64(2) + F.string("ok") + F.u64(1 << 40)),
        r"key 'k'\[1\] \(at offset \d+\): length 1099511627776 runs past"),
    # value types and values
    "unknown_value_type": (_kv_file(K + F.u32(13) + F.u64(0)), r"key 'k' value type.*unknown value type 13"),
    "unknown_element_type": (_kv_file(K + F.u32(VT.ARRAY) + F.u32(99) + F.u64(0)),
                             r"element type.*unknown value type 99"),
    "arrays_nested_too_deep": (_kv_file(F.kv("k", VT.ARRAY, _nested(4))), r"nested deeper than 3"),
    "bool_not_0_or_1": (_kv_file(F.kv("k", VT.BOOL, 2)), r"key 'k'.*bool byte is 2"),
    "bool_array_not_0_or_1": (_kv_file(F.kv("k", VT.ARRAY, (VT.BOOL, [1, 0, 7]))), r"bool array"),
    "invalid_utf8_key": (_kv_file(F.kv(b"bad\xff", VT.UINT8, 1)),
                         r"key #0 \(at offset 24\): invalid UTF-8 at byte 3 of 4"),
    "invalid_utf8_string": (_kv_file(F.kv("k", VT.STRING, b"\xc3(")), r"key 'k'.*invalid UTF-8"),
    "invalid_utf8_in_string_array": (_kv_file(F.kv("k", VT.ARRAY, (VT.STRING, ["ok", b"\xed\xa0\x80"]))),
                                     r"key 'k'\[1\].*invalid UTF-8"),
    "invalid_utf8_tensor_name": (_tensor_file(F.Tensor(b"t\x80", (32,), QT.F32, bytes(128))),
                                 r"tensor #0 name.*invalid UTF-8"),
    "duplicate_key": (_kv_file(F.kv("k", VT.UINT8, 1), F.kv("k", VT.UINT8, 2)),
                      r"key 'k' \(at offset \d+\): duplicate key"),
    # alignment
    "alignment_zero": (_kv_file(_alignment_kv(VT.UINT32, 0)), r"general.alignment.*0 is not a positive power of two"),
    "alignment_not_power_of_two": (_kv_file(_alignment_kv(VT.UINT32, 48)), r"48 is not a positive power of two"),
    "alignment_wrong_type": (_kv_file(_alignment_kv(VT.UINT64, 32)), r"general.alignment.*type UINT64.*UINT32"),
    "alignment_string": (_kv_file(_alignment_kv(VT.STRING, "32")), r"general.alignment.*type STRING"),
    # tensor infos
    "duplicate_tensor": (_tensor_file(T_F32, T_F32), r"tensor 't' \(info at offset \d+\): duplicate tensor name"),
    "n_dims_zero": (_tensor_file(_declared(())),
                    r"model.gguf: tensor 'blk.0.attn_q.weight' \(info at offset \d+\): n_dims 0 not in 1..4$"),
    "n_dims_five": (_tensor_file(_declared((32, 1, 1, 1, 1))), r"n_dims 5 not in 1..4"),
    "zero_dimension": (_tensor_file(_declared((32, 0))), r"dimension 1 is 0"),
    "negative_dimension": (_tensor_file(_declared((32, (1 << 64) - 2))), r"dimension 1 is negative as int64 \(-2\)"),
    "element_count_overflow": (_tensor_file(_declared((1 << 32, 1 << 31, 2))), r"element count .* overflows int64"),
    "row_not_whole_blocks": (_tensor_file(_declared((48, 2), QT.Q8_0)),
                             r"row of 48 weights is not a multiple of the Q8_0 block size 32"),
    "unknown_ggml_type": (_tensor_file(_declared((32,), 99)), r"unknown ggml type 99"),
    "removed_ggml_type": (_tensor_file(_declared((32,), 31)), r"unknown ggml type 31"),
    "unsupported_q2_k": (_tensor_file(_declared((256,), QT.Q2_K)), r"ggml type Q2_K is not supported \(supported: F32"),
    "unsupported_iq2_xxs": (_tensor_file(_declared((256,), QT.IQ2_XXS)), r"IQ2_XXS is not supported"),
    # tensor data placement
    "offset_not_aligned": (_tensor_file(_declared((32,), offset=4)), r"data offset 4 not a multiple of the alignment 32"),
    "alignment_disagrees_with_offsets": (F.build([*KVS, _alignment_kv(VT.UINT32, 64)], TWO_F32),
                                         r"tensor 'u'.*not a multiple of the alignment 64"),
    "offset_past_end": (_tensor_file(_declared((32,), offset=1 << 40)), r"extends past the end of the file"),
    "offset_wraps_u64": (_tensor_file(_declared((32,), offset=(1 << 64) - 32)), r"extends past the end of the file"),
    "data_past_end": (_tensor_file(F.Tensor("t", (32, 64), QT.F32, bytes(64))), r"tensor 't'.*extends past the end"),
    "overlapping_tensors": (_tensor_file(F.Tensor("a", (32, 2), QT.F32, bytes(256)),
                                         F.Tensor("b", (32,), QT.F32, bytes(128), offset=128)),
                            r"tensor 'b'.*overlaps tensor 'a' \[\d+, \d+\)"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_file_is_rejected(tmp_path: Path, name: str) -> None:
    data, message = MALFORMED[name]
    path = _write(tmp_path, data)
    with pytest.raises(GGUFError, match=message) as info:
        GGUFFile(path)
    assert str(info.value).startswith("model.gguf: ")


def test_every_truncation_is_rejected(tmp_path: Path) -> None:
    data = F.valid_file()
    with GGUFFile(_write(tmp_path, data)) as full:
        end_of_data = max(t.offset + t.nbytes for t in full.tensors.values())
    for n in range(len(data)):
        path = _write(tmp_path, data[:n], f"cut{n}.gguf")
        if n < end_of_data:
            with pytest.raises(GGUFError):
                GGUFFile(path)
        else:  # only the trailing padding was cut
            GGUFFile(path).close()
        path.unlink()


def test_directory_and_fifo_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="is a directory"):
        GGUFFile(tmp_path)
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(GGUFError, match="not a regular file"):
        GGUFFile(fifo)
    with pytest.raises(FileNotFoundError):
        GGUFFile(tmp_path / "missing.gguf")


def test_error_names_long_names_briefly(tmp_path: Path) -> None:
    long_key = "k" * 100_000
    path = _write(tmp_path, _kv_file(F.kv(long_key, VT.UINT8, 1), F.kv(long_key, VT.UINT8, 1)))
    with pytest.raises(GGUFError, match=r"\.\.\. \(100000 chars\)") as info:
        GGUFFile(path)
    assert len(str(info.value)) < 300


# ---------------------------------------------------------------------------------------------
# Fuzzing: random corruptions of the valid file must parse or raise GGUFError, nothing else,
# quickly and without large allocations.

_INTERESTING = [0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 31, 32, 99, 255, (1 << 31), (1 << 32) - 1, 1 << 32,
                (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
_words = st.sampled_from(_INTERESTING).flatmap(
    lambda v: st.sampled_from([struct.pack("<Q", v)] + ([struct.pack("<I", v)] if v < (1 << 32) else [])))
_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 4095), st.integers(1, 255)),
    st.tuples(st.just("overwrite"), st.integers(0, 4095), st.one_of(_words, st.binary(min_size=1, max_size=8))),
    st.tuples(st.just("insert"), st.integers(0, 4095), st.one_of(_words, st.binary(min_size=1, max_size=16))),
    st.tuples(st.just("truncate"), st.integers(0, 4095), st.just(b"")),
)


def _mutate(data: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in ops:
        pos %= len(buf) + 1
        if kind == "flip" and pos < len(buf):
            buf[pos] ^= arg
        elif kind == "overwrite":
            buf[pos:pos + len(arg)] = arg
        elif kind == "insert":
            buf[pos:pos] = arg
        elif kind == "truncate":
            del buf[pos:]
    return bytes(buf)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzzed_files_parse_or_raise_gguf_error(fuzz_dir: Path, ops: list[tuple]) -> None:
    path = fuzz_dir / "fuzz.gguf"
    # A fresh inode each time: a mapping still held by an earlier example never sees the file shrink.
    path.unlink(missing_ok=True)
    path.write_bytes(_mutate(F.valid_file(), ops))
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with GGUFFile(path) as f, np.errstate(all="ignore"):  # corrupt scales may give inf/NaN
            for name in f.tensors:
                assert f.tensor(name).shape == f.tensors[name].np_shape
    except GGUFError:
        pass
    finally:
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < 2.0, f"parse took {elapsed:.2f} s"
    assert peak < 16 << 20, f"peak allocation {peak / 2**20:.1f} MiB"
