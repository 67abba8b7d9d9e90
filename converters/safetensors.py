"""A small reader of safetensors checkpoints: zero-copy, memory-mapped, validated.

Format: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data
section that follows the header), then the data. Nothing in the header is trusted: lengths,
offsets, overlaps and dtype sizes are checked before any tensor is handed out, so a corrupt or
truncated file fails with a :class:`ConversionError` naming the file and the problem instead of
a crash or silently wrong weights.

Sharded checkpoints come with ``model.safetensors.index.json`` (``weight_map``: tensor name ->
shard file); :class:`Checkpoint` presents all shards as one name -> tensor mapping.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import NoReturn

import numpy as np

from .errors import ConversionError

# safetensors dtype -> NumPy dtype. BF16 has no NumPy dtype: it is read as its uint16 bits.
DTYPES: Mapping[str, np.dtype] = MappingProxyType({
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
})
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype name, shape and byte range in the data section."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly (bf16 is the top half of an f32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """One ``.safetensors`` file, memory-mapped; tensors are read-only views of the map."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    self._fail(f"file is {size} bytes, too short for the 8-byte header length")
                n = int.from_bytes(head, "little")
                if n > size - 8:
                    self._fail(f"header length {n} goes beyond the end of the file ({size} bytes)")
                if n > _MAX_HEADER:
                    self._fail(f"header length {n} is larger than the {_MAX_HEADER}-byte limit")
                raw = f.read(n)
        except OSError as exc:
            raise ConversionError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._fail(f"header is not valid JSON ({exc})")
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._data_len = size - self._data_start
        self.entries: dict[str, TensorEntry] = {
            name: self._entry(name, info) for name, info in header.items()
        }
        self._check_overlaps()
        self._map: np.memmap | None = None

    def _fail(self, problem: str) -> NoReturn:
        raise ConversionError(f"{self.path}: {problem}")

    def _entry(self, name: str, info: object) -> TensorEntry:
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            self._fail(f"tensor {name!r}: entry lacks dtype, shape or data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            self._fail(f"tensor {name!r}: unknown or unsupported dtype {dtype!r} "
                       f"(supported: {', '.join(DTYPES)})")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            self._fail(f"tensor {name!r}: malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            self._fail(f"tensor {name!r}: malformed data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= self._data_len:
            self._fail(f"tensor {name!r}: data_offsets [{begin}, {end}] lie outside the data section "
                       f"of {self._data_len} bytes")
        need = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if end - begin != need:
            self._fail(f"tensor {name!r}: data_offsets span {end - begin} bytes but {dtype} {shape} "
                       f"needs {need}")
        return TensorEntry(self.path, name, dtype, tuple(shape), begin, end)

    def _check_overlaps(self) -> None:
        spans = sorted((e.begin, e.end, e.name) for e in self.entries.values() if e.end > e.begin)
        for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
            if begin < prev_end:
                self._fail(f"tensors {prev!r} and {name!r} overlap in the data section")

    def _mapped(self) -> np.ndarray:
        if self._map is None:
            # One read-only map of the whole file; every tensor is a view into it, so nothing is
            # copied until a conversion step needs float32.
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (BF16 as uint16 bits), a read-only view of the map."""
        e = self.entries[name]
        start = self._data_start + e.begin
        data = self._mapped()[start:self._data_start + e.end]
        return data.view(DTYPES[e.dtype]).reshape(e.shape)

    def float32(self, name: str) -> np.ndarray:
        """The tensor converted to float32 (a view when it is stored as F32)."""
        e = self.entries[name]
        raw = self.raw(name)
        if e.dtype == "BF16":
            return bf16_to_f32(raw)
        if e.dtype == "F32":
            return raw
        return raw.astype(np.float32)

    def close(self) -> None:
        self._map = None


class Checkpoint(Mapping[str, TensorEntry]):
    """All tensors of a Hugging Face checkpoint folder, single-file or sharded."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self.files: dict[Path, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        index = self.folder / INDEX_NAME
        if index.exists():
            self._read_index(index)
        else:
            paths = sorted(self.folder.glob("*.safetensors"))
            if not paths:
                raise ConversionError(f"{self.folder}: no *.safetensors file (and no {INDEX_NAME})")
            for p in paths:
                self._add_file(p)

    def _add_file(self, path: Path, only: set[str] | None = None) -> None:
        st = self.files.get(path) or SafetensorsFile(path)
        self.files[path] = st
        for name in st.entries if only is None else only:
            if name not in st.entries:
                raise ConversionError(f"{path}: lacks tensor {name!r} that {INDEX_NAME} places there")
            if name in self._where and self._where[name] is not st:
                raise ConversionError(f"{path}: tensor {name!r} also appears in {self._where[name].path}")
            self._where[name] = st

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConversionError(f"{index}: malformed index ({exc})") from None
        by_file: dict[str, set[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(str(fname), set()).add(name)
        for fname, names in sorted(by_file.items()):
            path = self.folder / fname
            if Path(fname).name != fname or not path.is_file():
                raise ConversionError(f"{index}: shard {fname!r} does not exist in {self.folder}")
            self._add_file(path, names)

    def __getitem__(self, name: str) -> TensorEntry:
        return self._where[name].entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def raw(self, name: str) -> np.ndarray:
        return self._where[name].raw(name)

    def float32(self, name: str) -> np.ndarray:
        return self._where[name].float32(name)

    def close(self) -> None:
        for st in self.files.values():
            st.close()
