"""Affine INT4/INT3 group-quantized weights in GGUF: the format, a NumPy reference, the reader.

Format (shared with the converter; edgelm issue 3). A weight W [rows, cols] (rows = output
features, cols = input features: the NumPy shape of the matrix as edgelm uses it) is quantized
in groups of ``group_size`` consecutive values of a row (32, 64 or 128; cols % group_size == 0),
exactly like MLX's ``mx.quantize(w, group_size, bits)``::

    W[r, g*G + j] ~= scales[r, g] * q[r, g*G + j] + biases[r, g],   q in [0, 2**bits - 1]

Packing is MLX's: ``q`` is a little-endian bitstream per row of uint32 words. bits=4: value j in
bits 4*(j%8) of word j//8; bits=3: 32 values in 3 words, value j at bit offset 3*j of the row's
stream. Rows are independent (each starts on a word boundary: cols*bits/32 words per row).

In the GGUF file, for a tensor normally named ``blk.0.attn_q.weight``:

* ``blk.0.attn_q.weight``: the packed words, GGML type I32 (the int32 bits of the uint32
  words), GGUF shape (ggml order) [cols * bits / 32, rows];
* ``blk.0.attn_q.scales`` and ``blk.0.attn_q.biases``: F16, GGUF shape [cols / group_size, rows].

Metadata: ``edgelm.quantization.method`` (str: "rtn", "awq", "gptq"),
``edgelm.quantization.recipe`` (str), ``edgelm.quantization.group_size`` (u32),
``edgelm.quantization.bits`` (u32, the default bits), and per tensor
``edgelm.quantization.tensor_bits`` (u32 array aligned with ``edgelm.quantization.tensor_names``,
str array) for the tensors stored in the affine format. Tensors not in the affine format keep
their normal GGML types (F16/F32/Q8_0/Q6_K...).

The bit width of a tensor is the per-tensor entry when present, else the default. The group
size then follows from the shapes (cols = 32 * packed_cols / bits, group_size = cols / n_groups)
and must equal one of 32/64/128; a tensor whose shapes disagree with that is rejected with a
:class:`ModelFormatError` naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import ModelFormatError
from .quants import GGMLType

if TYPE_CHECKING:
    from .gguf import GGUFFile

BITS = (3, 4)
GROUP_SIZES = (32, 64, 128)
KEY_PREFIX = "edgelm.quantization."
KEY_METHOD, KEY_RECIPE = KEY_PREFIX + "method", KEY_PREFIX + "recipe"
KEY_GROUP_SIZE, KEY_BITS = KEY_PREFIX + "group_size", KEY_PREFIX + "bits"
KEY_TENSOR_NAMES, KEY_TENSOR_BITS = KEY_PREFIX + "tensor_names", KEY_PREFIX + "tensor_bits"


# ---------------------------------------------------------------------------------------------
# NumPy reference (the definition the kernels and the converter are tested against)


def quantize_rtn_reference(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min-max round-to-nearest, bit-identical to ``mx.quantize`` on float32 input.

    Returns (q uint8 [rows, cols], scales f32 [rows, cols/G], biases f32 [rows, cols/G]).
    Like MLX, the group's edge of larger magnitude is represented exactly (it becomes the bias,
    with the scale's sign chosen so that q stays non-negative), which keeps 0-centred weights'
    largest value lossless.
    """
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    _check_bits_group(bits, group_size, cols)
    n_bins = np.float32(2 ** bits - 1)
    g = w.reshape(rows, cols // group_size, group_size)
    w_max, w_min = g.max(-1), g.min(-1)
    mask = np.abs(w_min) > np.abs(w_max)
    scales = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
    scales = np.where(mask, scales, -scales)
    edge = np.where(mask, w_min, w_max)
    q0 = np.round(edge / scales)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = np.where(q0 != 0, edge / q0, scales).astype(np.float32)
    biases = np.where(q0 == 0, np.float32(0.0), edge).astype(np.float32)
    q = np.clip(np.round((g - biases[..., None]) / scales[..., None]), 0, n_bins)
    return q.astype(np.uint8).reshape(rows, cols), scales, biases


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words [rows, cols*bits//32]: each row's quants as a little-endian bitstream."""
    q = np.asarray(q, dtype=np.uint8)
    rows, cols = q.shape
    if bits not in BITS or (cols * bits) % 32:
        raise ValueError(f"cannot pack {cols} {bits}-bit values per row into whole uint32 words")
    # Value j occupies stream bits [bits*j, bits*j + bits): spread each value's bits, then
    # regroup the stream into little-endian words (np.packbits with bitorder="little").
    stream = ((q[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(rows, cols * bits)
    return np.packbits(stream, axis=1, bitorder="little").view("<u4").astype(np.uint32)


def unpack(words: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Inverse of :func:`pack`: uint8 quants [rows, cols]."""
    words = np.ascontiguousarray(words).astype("<u4", copy=False)
    rows = words.shape[0]
    if words.shape[1] * 32 != cols * bits:
        raise ValueError(f"{words.shape[1]} words per row do not hold {cols} {bits}-bit values")
    stream = np.unpackbits(words.view(np.uint8).reshape(rows, -1), axis=1, bitorder="little")
    stream = stream.reshape(rows, cols, bits).astype(np.uint8)
    return (stream << np.arange(bits, dtype=np.uint8)).sum(-1, dtype=np.uint8)


def dequantize(words: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """float32 W [rows, cols] = scales * q + biases per group (as ``mx.dequantize``)."""
    scales = np.asarray(scales, dtype=np.float32)
    biases = np.asarray(biases, dtype=np.float32)
    rows, n_groups = scales.shape
    cols = n_groups * group_size
    q = unpack(words, bits, cols).reshape(rows, n_groups, group_size).astype(np.float32)
    return (q * scales[..., None] + biases[..., None]).reshape(rows, cols)


def _check_bits_group(bits: int, group_size: int, cols: int) -> None:
    if bits not in BITS:
        raise ValueError(f"affine bits must be one of {BITS}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, got {group_size}")
    if cols % group_size:
        raise ValueError(f"{cols} columns are not a whole number of {group_size}-value groups")


# ---------------------------------------------------------------------------------------------
# reading side


@dataclass(frozen=True)
class AffineTensor:
    """Where the three parts of one affine tensor live in a GGUF file (absolute offsets)."""

    name: str            # the ``.weight`` tensor holding the packed words
    rows: int
    cols: int
    bits: int
    group_size: int
    offset: int          # packed words: rows * cols*bits/8 bytes
    nbytes: int
    scales_offset: int   # f16 [rows, cols / group_size]
    biases_offset: int


def companions(name: str) -> tuple[str, str]:
    """(scales, biases) tensor names of the affine weight ``name`` (``*.weight``)."""
    base = name[: -len(".weight")] if name.endswith(".weight") else name
    return base + ".scales", base + ".biases"


def is_affine(gguf: GGUFFile, name: str) -> bool:
    """True when ``name`` is stored in the affine format (it has a ``.scales`` companion)."""
    return companions(name)[0] in gguf.tensors


def tensor_bits(gguf: GGUFFile) -> dict[str, int]:
    """Per-tensor bits from the metadata (``tensor_names``/``tensor_bits``; may be empty)."""
    names = gguf.get(KEY_TENSOR_NAMES)
    bits = gguf.get(KEY_TENSOR_BITS)
    if names is None and bits is None:
        return {}
    names, bits = list(names if names is not None else []), list(bits if bits is not None else [])
    if len(names) != len(bits):
        raise ModelFormatError(f"{gguf.path.name}: {KEY_TENSOR_NAMES} has {len(names)} entries but "
                               f"{KEY_TENSOR_BITS} has {len(bits)}")
    return {str(n): int(b) for n, b in zip(names, bits)}


def affine_tensor(gguf: GGUFFile, name: str, per_tensor: dict[str, int] | None = None) -> AffineTensor:
    """Locate and validate the affine tensor ``name`` (its ``.weight``); ModelFormatError if bad."""
    where = f"{gguf.path.name}: affine tensor {name!r}"
    s_name, b_name = companions(name)
    info = gguf.tensors.get(name)
    if info is None:
        raise ModelFormatError(f"{where}: packed weights missing")
    for part in (s_name, b_name):
        if part not in gguf.tensors:
            raise ModelFormatError(f"{where}: companion tensor {part!r} missing")
    s, b = gguf.tensors[s_name], gguf.tensors[b_name]
    if info.ggml_type != GGMLType.I32 or len(info.shape) != 2:
        raise ModelFormatError(f"{where}: packed weights must be a 2-D I32 tensor, got "
                               f"{GGMLType(info.ggml_type).name} of shape {tuple(info.shape)}")
    for t in (s, b):
        if t.ggml_type != GGMLType.F16 or tuple(t.shape) != tuple(s.shape) or len(t.shape) != 2:
            raise ModelFormatError(f"{where}: {t.name!r} must be F16 of the shape of {s_name!r}, got "
                                   f"{GGMLType(t.ggml_type).name} {tuple(t.shape)} vs {tuple(s.shape)}")
    packed_cols, rows = int(info.shape[0]), int(info.shape[1])
    n_groups = int(s.shape[0])
    if int(s.shape[1]) != rows:
        raise ModelFormatError(f"{where}: {rows} rows of packed weights but {int(s.shape[1])} rows of scales")
    if per_tensor is None:
        per_tensor = tensor_bits(gguf)
    bits = per_tensor.get(name, gguf.get(KEY_BITS))
    if bits is None:
        raise ModelFormatError(f"{where}: no bit width ({KEY_BITS} / {KEY_TENSOR_BITS} metadata)")
    bits = int(bits)
    if bits not in BITS:
        raise ModelFormatError(f"{where}: {bits} bits; supported: {BITS}")
    cols, rem = divmod(32 * packed_cols, bits)
    group_size = cols // n_groups if n_groups else 0
    if rem or n_groups == 0 or group_size * n_groups != cols or group_size not in GROUP_SIZES:
        raise ModelFormatError(f"{where}: {packed_cols} words x {n_groups} groups per row is not a "
                               f"{bits}-bit row with a group size in {GROUP_SIZES}")
    return AffineTensor(name, rows, cols, bits, group_size, info.offset, info.nbytes, s.offset, b.offset)


def affine_tensors(gguf: GGUFFile) -> dict[str, AffineTensor]:
    """Every affine tensor of ``gguf`` by its ``.weight`` name (validated)."""
    per_tensor = tensor_bits(gguf)
    names = [n[: -len(".scales")] + ".weight" for n in gguf.tensors if n.endswith(".scales")]
    return {n: affine_tensor(gguf, n, per_tensor) for n in names}


def read_dequantized(gguf: GGUFFile, name: str) -> np.ndarray:
    """float32 [rows, cols] of an affine tensor (reference path, for tests and tools)."""
    t = affine_tensor(gguf, name)
    s_name, b_name = companions(name)
    words = gguf.tensor_bytes(name).view("<u4").reshape(t.rows, -1)
    return dequantize(words, gguf.tensor(s_name), gguf.tensor(b_name), t.bits, t.group_size)


# ---------------------------------------------------------------------------------------------
# writing side (gguf-py's GGUFWriter; used by the tests and the reference re-quantizer)


def add_affine_tensor(writer, name: str, w: np.ndarray, bits: int, group_size: int) -> None:
    """Quantize float W [rows, cols] with :func:`quantize_rtn_reference` and add it to a
    ``gguf.GGUFWriter`` as ``name`` (I32 words) + ``.scales`` / ``.biases`` (F16)."""
    q, scales, biases = quantize_rtn_reference(w, bits, group_size)
    add_affine_parts(writer, name, pack(q, bits), scales, biases)


def add_affine_parts(writer, name: str, words: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> None:
    """Add already-quantized parts (uint32 words [rows, cols*bits/32], scales/biases [rows, groups])."""
    s_name, b_name = companions(name)
    writer.add_tensor(name, np.ascontiguousarray(words, dtype=np.uint32).view(np.int32))
    writer.add_tensor(s_name, np.ascontiguousarray(scales, dtype=np.float16))
    writer.add_tensor(b_name, np.ascontiguousarray(biases, dtype=np.float16))


def add_affine_metadata(writer, bits: int, group_size: int, tensor_bits: dict[str, int],
                        method: str = "rtn", recipe: str = "uniform") -> None:
    """The ``edgelm.quantization.*`` keys of the format (``tensor_bits``: affine ``.weight`` names)."""
    from gguf import GGUFValueType

    writer.add_string(KEY_METHOD, method)
    writer.add_string(KEY_RECIPE, recipe)
    writer.add_uint32(KEY_GROUP_SIZE, group_size)
    writer.add_uint32(KEY_BITS, bits)
    names = list(tensor_bits)
    writer.add_key_value(KEY_TENSOR_NAMES, names, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    writer.add_key_value(KEY_TENSOR_BITS, [int(tensor_bits[n]) for n in names], GGUFValueType.ARRAY,
                         sub_type=GGUFValueType.UINT32)
