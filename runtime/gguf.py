"""Memory-mapped, validating reader of GGUF files (format versions 2 and 3).

Layout (little-endian): magic ``GGUF``, u32 version, u64 tensor count, u64 key/value count,
the key/value pairs (string key, u32 value type, value), the tensor infos (string name, u32
n_dims, u64 dims[n_dims], u32 ggml type, u64 offset relative to the data section), padding to
``general.alignment`` (default 32), then the tensor data.

Every length, count, type code and offset read from the file is checked against the file size
and the format before it is used, so a malformed or hostile file fails with a :class:`GGUFError`
that names the field and its byte offset, instead of hanging, allocating gigabytes from a
garbage length, or crashing. Tensor data is never copied: :meth:`GGUFFile.tensor_bytes` returns
views of a read-only ``np.memmap`` of the whole file.
"""
from __future__ import annotations

import enum
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import numpy as np

from . import quants
from .errors import EdgeLMError
from .quants import GGMLType

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# Integer tensors accepted as raw data (``tensor_bytes``; no dequantization): I32 holds the
# packed words of affine INT4/INT3 weights (runtime/affine.py).
RAW_TYPES = (GGMLType.I32,)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 3  # arrays of arrays of arrays; real files use none
_INT64_MAX = (1 << 63) - 1
# Smallest possible encodings, used to reject counts that cannot fit in the file before looping:
# a key/value is an empty key (8) + type (4) + a 1-byte value; a tensor info is an empty name
# (8) + n_dims (4) + one dim (8) + type (4) + offset (8).
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8
_HEADER = struct.Struct("<4sIQQ")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GGUFError(EdgeLMError, ValueError):
    """The file is not a valid GGUF this runtime can read; the message names field and offset."""


def _quote(name: str, limit: int = 80) -> str:
    """A file-supplied name for an error message: quoted, escaped, and cut if very long."""
    return repr(name) if len(name) <= limit else repr(name[:limit]) + f"... ({len(name)} chars)"


class ValueType(enum.IntEnum):
    """GGUF metadata value types (``enum gguf_type``)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct format (standard sizes) of each fixed-size type; arrays use the NumPy equivalent.
_SCALAR_FORMATS = {
    ValueType.UINT8: "B", ValueType.INT8: "b", ValueType.UINT16: "H", ValueType.INT16: "h",
    ValueType.UINT32: "I", ValueType.INT32: "i", ValueType.FLOAT32: "f", ValueType.BOOL: "B",
    ValueType.UINT64: "Q", ValueType.INT64: "q", ValueType.FLOAT64: "d",
}
_SCALAR_STRUCTS = {t: struct.Struct("<" + f) for t, f in _SCALAR_FORMATS.items()}
_NUMERIC_DTYPES = {t: np.dtype("<" + f) for t, f in _SCALAR_FORMATS.items()}
# Bytes an element occupies at least, per element type (strings: their u64 length; arrays: their
# u32 type + u64 count).
_MIN_ELEMENT_BYTES = {ValueType.STRING: 8, ValueType.ARRAY: 12,
                      **{t: dt.itemsize for t, dt in _NUMERIC_DTYPES.items()}}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives in the file and how it is encoded."""

    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] = elements per row (contiguous), shape[1] = rows
    ggml_type: GGMLType
    offset: int  # absolute file offset of the data
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.shape[0]

    @property
    def np_shape(self) -> tuple[int, ...]:
        """NumPy (row-major) shape: the ggml shape reversed."""
        return tuple(reversed(self.shape))


class _RawTensor(NamedTuple):
    """A checked tensor info, before the start of the data section is known."""

    name: str
    info_at: int  # file offset of the info, for error messages
    shape: tuple[int, ...]
    gtype: GGMLType
    rel_offset: int  # relative to the data section
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reads over a byte buffer; failures name field and offset."""

    def __init__(self, buf: memoryview, label: str):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.label = label

    def fail(self, what: str, offset: int, problem: str, place: str = "at") -> NoReturn:
        raise GGUFError(f"{self.label}: {what} ({place} offset {offset}): {problem}")

    def take(self, n: int, what: str) -> int:
        """Consume ``n`` bytes; return the offset where they start."""
        if n > self.size - self.pos:
            self.fail(what, self.pos, f"needs {n} bytes but only {self.size - self.pos} remain in the file")
        at = self.pos
        self.pos += n
        return at

    def scalar(self, st: struct.Struct, what: str) -> Any:
        return st.unpack_from(self.buf, self.take(st.size, what))[0]

    def string(self, what: str) -> str:
        at = self.pos
        n = self.scalar(_U64, f"{what} length")
        if n > self.size - self.pos:
            self.fail(what, at, f"length {n} runs past the end of the file ({self.size - self.pos} bytes left)")
        self.pos += n
        try:
            return str(self.buf[at + 8:at + 8 + n], "utf-8")
        except UnicodeDecodeError as e:
            self.fail(what, at, f"invalid UTF-8 at byte {e.start} of {n}")

    def value_type(self, what: str) -> ValueType:
        at = self.pos
        code = self.scalar(_U32, what)
        try:
            return ValueType(code)
        except ValueError:
            self.fail(what, at, f"unknown value type {code}")

    def value(self, vtype: ValueType, what: str) -> Any:
        """One top-level metadata value of type ``vtype`` (already read)."""
        if vtype is ValueType.STRING:
            return self.string(what)
        if vtype is ValueType.ARRAY:
            return self.array(what, depth=1)
        at = self.pos
        v = self.scalar(_SCALAR_STRUCTS[vtype], what)
        if vtype is ValueType.BOOL:
            if v > 1:
                self.fail(what, at, f"bool byte is {v}, not 0 or 1")
            return bool(v)
        return v

    def array(self, what: str, depth: int) -> Any:
        """An array: list[str] of strings, list of nested arrays, else a 1-D ndarray (a copy)."""
        at = self.pos
        if depth > MAX_ARRAY_DEPTH:
            self.fail(what, at, f"arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
        etype = self.value_type(f"{what} element type")
        count = self.scalar(_U64, f"{what} array length")
        remaining = self.size - self.pos
        if count * _MIN_ELEMENT_BYTES[etype] > remaining:
            self.fail(what, at, f"array of {count} {etype.name} cannot fit in the {remaining} bytes left")
        if etype is ValueType.STRING:
            return self.strings(count, what)
        if etype is ValueType.ARRAY:
            return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]
        dtype = _NUMERIC_DTYPES[etype]
        start = self.take(count * dtype.itemsize, what)
        # A native-order copy, so metadata does not pin the mapping; the size was checked above.
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=start).astype(dtype.newbyteorder("="))
        if etype is ValueType.BOOL:
            if count and arr.max() > 1:
                self.fail(what, start, "bool array holds bytes other than 0 and 1")
            return arr.view(np.bool_)
        return arr

    def strings(self, count: int, what: str) -> list[str]:
        """``count`` strings: the hot loop of vocabulary parsing (~0.7 us per string).

        The fast path inlines :meth:`string` with locals instead of attribute lookups (a 49k-token
        vocabulary plus its merges parse in ~0.07 s); any string it cannot take is re-read by
        :meth:`string`, which raises the precise error.
        """
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(count):
            if size - pos >= 8:
                (n,) = unpack(buf, pos)
                if n <= size - pos - 8:
                    try:
                        append(str(buf[pos + 8:pos + 8 + n], "utf-8"))
                        pos += 8 + n
                        continue
                    except UnicodeDecodeError:
                        pass
            self.pos = pos
            append(self.string(f"{what}[{i}]"))
            pos = self.pos
        self.pos = pos
        return out


def _check_alignment(cur: _Cursor, at: int, vtype: ValueType, value: Any) -> None:
    """``general.alignment`` decides where the data starts: a u32 power of two (spec, llama.cpp)."""
    what = f"key {ALIGNMENT_KEY!r}"
    if vtype is not ValueType.UINT32:
        cur.fail(what, at, f"type {vtype.name}, the format requires UINT32")
    if value == 0 or value & (value - 1):
        cur.fail(what, at, f"{value} is not a positive power of two")


class GGUFFile:
    """A validated GGUF file, memory-mapped read-only.

    ``metadata`` maps keys to ``str``/``int``/``float``/``bool``, arrays of strings to
    ``list[str]``, numeric arrays to 1-D ndarrays and arrays of arrays to lists. ``tensors`` maps
    names to :class:`TensorInfo` in file order.

    Raises :class:`GGUFError` for anything wrong with the content (including an empty file or a
    directory); ``FileNotFoundError``/``PermissionError`` pass through for unreadable paths.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        label = self.path.name
        st = os.stat(self.path)
        if not stat.S_ISREG(st.st_mode):
            # Directories cannot be mapped and FIFOs/devices could block forever on read.
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise GGUFError(f"{label}: is {kind}, not a GGUF file")
        if st.st_size < _HEADER.size:
            raise GGUFError(f"{label}: file is {st.st_size} bytes, shorter than the "
                            f"{_HEADER.size}-byte GGUF header")
        try:
            self.buffer: np.ndarray | None = np.memmap(self.path, dtype=np.uint8, mode="r")
        except ValueError as e:  # e.g. the file was emptied after the size check
            raise GGUFError(f"{label}: cannot map the file: {e}") from e
        cur = _Cursor(memoryview(self.buffer), label)
        self.version, n_tensors, n_kv = self._read_header(cur)
        self.metadata: dict[str, Any] = self._read_metadata(cur, n_kv)
        self.alignment: int = self.metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
        infos = self._read_tensor_infos(cur, n_tensors)
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = self._place_tensors(cur, infos)

    # -- parsing steps, in file order ----------------------------------------------------------

    @staticmethod
    def _read_header(cur: _Cursor) -> tuple[int, int, int]:
        """Check magic, version and counts; returns (version, tensor count, key/value count)."""
        magic, version, n_tensors, n_kv = _HEADER.unpack_from(cur.buf, 0)
        if magic != MAGIC:
            cur.fail("magic", 0, f"expected {MAGIC!r}, found {bytes(magic)!r}: not a GGUF file")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            hint = " (a big-endian GGUF, unsupported)" if swapped in SUPPORTED_VERSIONS else ""
            cur.fail("version", 4, f"version {version}{hint}; supported: {SUPPORTED_VERSIONS}")
        cur.pos = _HEADER.size
        remaining = cur.size - cur.pos
        if n_kv * _MIN_KV_BYTES > remaining:
            cur.fail("kv_count", 16, f"{n_kv} key/values cannot fit in the {remaining} bytes left")
        if n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > remaining:
            cur.fail("tensor_count", 8, f"{n_tensors} tensor infos cannot fit in the {remaining} bytes left")
        return version, n_tensors, n_kv

    @staticmethod
    def _read_metadata(cur: _Cursor, n_kv: int) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key_at = cur.pos
            key = cur.string(f"key #{i}")
            what = f"key {_quote(key)}"
            if key in metadata:
                cur.fail(what, key_at, "duplicate key")
            vtype = cur.value_type(f"{what} value type")
            value_at = cur.pos
            metadata[key] = value = cur.value(vtype, what)
            if key == ALIGNMENT_KEY:
                _check_alignment(cur, value_at, vtype, value)
        return metadata

    def _read_tensor_infos(self, cur: _Cursor, n_tensors: int) -> list[_RawTensor]:
        """Parse and check every tensor info (all but the data's place in the file)."""
        infos: list[_RawTensor] = []
        seen: set[str] = set()
        for i in range(n_tensors):
            info_at = cur.pos
            name = cur.string(f"tensor #{i} name")
            what = f"tensor {_quote(name)}"
            if name in seen:
                cur.fail(what, info_at, "duplicate tensor name", place="info at")
            seen.add(name)
            n_dims = cur.scalar(_U32, f"{what} n_dims")
            if not 1 <= n_dims <= MAX_DIMS:
                cur.fail(what, info_at, f"n_dims {n_dims} not in 1..{MAX_DIMS}", place="info at")
            shape = tuple(cur.scalar(_U64, f"{what} dim {d}") for d in range(n_dims))
            self._check_shape(cur, what, info_at, shape)
            gtype = self._check_type(cur, what, info_at, cur.scalar(_U32, f"{what} type"))
            rel_offset = cur.scalar(_U64, f"{what} data offset")
            if rel_offset % self.alignment:
                cur.fail(what, info_at, f"data offset {rel_offset} not a multiple of the alignment "
                         f"{self.alignment}", place="info at")
            try:
                row = quants.row_nbytes(gtype, shape[0])
            except ValueError as e:
                cur.fail(what, info_at, str(e), place="info at")
            infos.append(_RawTensor(name, info_at, shape, gtype, rel_offset, row * (math.prod(shape) // shape[0])))
        return infos

    @staticmethod
    def _check_shape(cur: _Cursor, what: str, info_at: int, shape: tuple[int, ...]) -> None:
        n = 1
        for d, dim in enumerate(shape):
            if dim == 0:
                cur.fail(what, info_at, f"dimension {d} is 0", place="info at")
            if dim > _INT64_MAX:  # ggml reads dims as int64
                cur.fail(what, info_at, f"dimension {d} is negative as int64 ({dim - (1 << 64)})", place="info at")
            n *= dim
            if n > _INT64_MAX:
                cur.fail(what, info_at, f"element count of shape {shape} overflows int64", place="info at")

    @staticmethod
    def _check_type(cur: _Cursor, what: str, info_at: int, code: int) -> GGMLType:
        try:
            gtype = GGMLType(code)
        except ValueError:
            cur.fail(what, info_at, f"unknown ggml type {code}", place="info at")
        if gtype not in quants.QUANT_TYPES and gtype not in RAW_TYPES:
            supported = ", ".join(t.name for t in (*quants.QUANT_TYPES, *RAW_TYPES))
            cur.fail(what, info_at, f"ggml type {gtype.name} is not supported (supported: {supported})",
                     place="info at")
        return gtype

    def _place_tensors(self, cur: _Cursor, infos: list[_RawTensor]) -> dict[str, TensorInfo]:
        """Resolve data offsets; check each tensor lies inside the file and none overlap."""
        for t in infos:
            start = self.data_offset + t.rel_offset
            if start + t.nbytes > cur.size:
                cur.fail(f"tensor {_quote(t.name)}", t.info_at, f"data [{start}, {start + t.nbytes}) extends "
                         f"past the end of the file ({cur.size} bytes)", place="info at")
        ordered = sorted(infos, key=lambda t: t.rel_offset)
        for prev, t in zip(ordered, ordered[1:]):
            if prev.rel_offset + prev.nbytes > t.rel_offset:
                a = self.data_offset + prev.rel_offset
                cur.fail(f"tensor {_quote(t.name)}", t.info_at, f"data at {self.data_offset + t.rel_offset} "
                         f"overlaps tensor {_quote(prev.name)} [{a}, {a + prev.nbytes})", place="info at")
        return {t.name: TensorInfo(t.name, t.shape, t.gtype, self.data_offset + t.rel_offset, t.nbytes)
                for t in infos}

    # -- access -----------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value of ``key``, or ``default``."""
        return self.metadata.get(key, default)

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of tensor ``name``: a read-only uint8 view of the mapping (no copy)."""
        info = self.tensors[name]
        return self._mapped()[info.offset:info.offset + info.nbytes]

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantized to float32 in NumPy order (F32 tensors: a read-only view)."""
        info = self.tensors[name]
        return quants.dequantize(self.tensor_bytes(name), info.ggml_type, info.np_shape)

    def _mapped(self) -> np.ndarray:
        if self.buffer is None:
            raise ValueError(f"{self.path.name}: GGUFFile is closed")
        return self.buffer

    def close(self) -> None:
        """Drop this object's mapping; views already handed out stay valid (they hold it)."""
        self.buffer = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, version={self.version}, "
                f"{len(self.metadata)} keys, {len(self.tensors)} tensors)")
