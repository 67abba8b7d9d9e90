"""``edgelm convert``: a Hugging Face checkpoint folder -> one GGUF file.

Pipeline: read ``config.json`` (:mod:`hf_config`), open the safetensors (:mod:`safetensors`,
memory-mapped), map and check every tensor (:mod:`arch`), collect the metadata (hyperparameters
here, tokenizer in :mod:`tokenizer_meta`), choose each tensor's type (:mod:`recipe`), then
stream: the GGUF header and tensor table are written first (every tensor's type and size is
known in advance), then each tensor is read, transformed, quantized in row chunks and written
before the next one is touched. Peak memory is one tensor in float32 plus one row chunk of
quantization temporaries, whatever the model size.

The output goes to ``<out>.tmp-<pid>`` and is renamed over ``<out>`` only when complete; any
failure, Ctrl-C included, removes the temporary file.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from ..runtime.quants import GGMLType, row_nbytes
from .arch import PlannedTensor, apply_transform, plan_tensors
from .errors import ConversionError
from .hf_config import HFConfig, read_config
from .quantize_ggml import quantize_rows
from .affine_pack import dequantize_q, pack
from .calibrate import Calibration, calibrate
from .quantize_affine import quantize_gptq, quantize_rtn
from .recipe import (DEFAULT_AFFINE_RECIPE, FILE_TYPES, LLAMA_CPP_PRESETS, OUTTYPES, Affine, TensorSite, affine_type,
                     llama_cpp_type, outtype_type)
from .safetensors import Checkpoint
from .tokenizer_meta import tokenizer_metadata

_CHUNK_ELEMENTS = 1 << 20  # weights quantized at once: bounds the temporaries of the searches


@dataclass(frozen=True)
class ConversionResult:
    path: Path
    seconds: float
    n_tensors: int
    nbytes: int
    types: dict[str, str]  # GGUF tensor name -> ggml type name (or "INT4 g64" for affine ones)
    calib_seconds: float = 0.0


def _layer_of(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("blk.") else None


def model_metadata(cfg: HFConfig) -> dict[str, Any]:
    """The ``{arch}.*`` hyperparameters llama.cpp and edgelm's models/ read."""
    a = cfg.gguf_architecture
    meta: dict[str, Any] = {
        f"{a}.context_length": cfg.context_length,
        f"{a}.embedding_length": cfg.hidden_size,
        f"{a}.block_count": cfg.n_layers,
        f"{a}.feed_forward_length": cfg.intermediate_size,
        f"{a}.attention.head_count": cfg.n_heads,
        f"{a}.attention.head_count_kv": cfg.n_kv_heads,
        f"{a}.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
        f"{a}.rope.freq_base": cfg.rope_theta,
        f"{a}.rope.dimension_count": cfg.head_dim,
        f"{a}.vocab_size": cfg.vocab_size,
    }
    if cfg.head_dim != cfg.hidden_size // cfg.n_heads:
        # Only needed when head_dim is not hidden/heads (e.g. Mistral-Nemo); llama.cpp writes it then.
        meta[f"{a}.attention.key_length"] = cfg.head_dim
        meta[f"{a}.attention.value_length"] = cfg.head_dim
    rs = cfg.rope_scaling
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind in ("linear", "yarn"):
            meta[f"{a}.rope.scaling.type"] = kind
            meta[f"{a}.rope.scaling.factor"] = float(rs["factor"])
            if "original_max_position_embeddings" in rs:
                meta[f"{a}.rope.scaling.original_context_length"] = int(rs["original_max_position_embeddings"])
        elif kind != "llama3":  # llama3 becomes the rope_freqs tensor (see rope_freqs)
            raise ConversionError(f"{cfg.path}: rope scaling type {kind!r} is not supported "
                                  f"(supported: linear, yarn, llama3)")
    return meta


def rope_freqs(cfg: HFConfig) -> np.ndarray | None:
    """Llama 3.1's rope scaling as per-frequency divisors (GGUF tensor ``rope_freqs.weight``)."""
    rs = cfg.rope_scaling
    if not rs or rs.get("rope_type", rs.get("type")) != "llama3":
        return None
    factor = float(rs.get("factor", 8.0))
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_ctx / high, 1.0,
                       np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def check_output_path(out: Path) -> Path:
    """Fail before any work if ``out`` cannot be written; return the temporary path to write."""
    out = Path(out)
    if out.is_dir():
        raise ConversionError(f"{out}: is a directory, not a file path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ConversionError(f"{out}: cannot write: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ConversionError(f"{out}: cannot write: permission denied")
    return out.with_name(f"{out.name}.tmp-{os.getpid()}")


def _quantize(w: np.ndarray, t: GGMLType) -> np.ndarray:
    """float32 [rows, n] -> the bytes of type ``t``, in row chunks to bound the temporaries."""
    if t is GGMLType.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if t is GGMLType.F16:
        return w.astype(np.float16)
    if t is GGMLType.BF16:
        # Round to nearest even on the top 16 bits, as gguf-py and torch do (no NaNs in weights).
        bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
        return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    rows, n = w.shape
    out = np.empty((rows, row_nbytes(t, n)), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // n)
    for r in range(0, rows, step):
        out[r:r + step] = quantize_rows(np.ascontiguousarray(w[r:r + step], dtype=np.float32), t)
    return out


def _encode(w: np.ndarray, t: GGMLType) -> np.ndarray:
    """The bytes of tensor ``w`` as type ``t``, flat (a BF16 copy arrives already encoded)."""
    if not (t is GGMLType.BF16 and w.dtype == np.uint16):
        w = _quantize(w.reshape(-1, w.shape[-1]), t)
    return np.ascontiguousarray(w).reshape(-1).view(np.uint8)


def _source(ckpt: Checkpoint, cfg: HFConfig, p: PlannedTensor, t: GGMLType | Affine,
            cal: Calibration | None = None) -> np.ndarray:
    """The tensor as float32 after its transform -- or, for a BF16 copy, its raw bits."""
    if cal is not None and p.hf in cal.weights:  # rescaled by AWQ
        return apply_transform(cal.weights[p.hf], p.transform, cfg)
    entry = ckpt[p.hf]
    if t is GGMLType.BF16 and entry.dtype == "BF16":
        return apply_transform(ckpt.raw(p.hf), p.transform, cfg)  # exact: no round trip
    return apply_transform(ckpt.float32(p.hf), p.transform, cfg)


@dataclass(frozen=True)
class AffineOptions:
    """``--bits`` and friends: the affine INT4/INT3 format (see README, "Converting")."""

    bits: int
    group_size: int = 64
    recipe: str = DEFAULT_AFFINE_RECIPE
    method: str = "rtn"                     # rtn, awq, gptq
    calib: Path | None = None               # calibration text for awq/gptq
    fake_quant: bool = False                # store s*q+b as F16 instead: quality runs on any runtime
    calibration: Calibration | None = None  # precomputed calibration (reused across variants)
    calib_tokens: int | None = None         # None: the method's default (calibrate.DEFAULT_TOKENS)


def _tensor_infos(name: str, shape: tuple[int, ...], t: GGMLType | Affine, fake: bool
                  ) -> list[tuple[str, tuple[int, ...], GGMLType, int]]:
    """(GGUF name, NumPy shape, ggml type, nbytes) of the tensors that store one planned tensor."""
    if not isinstance(t, Affine):
        return [(name, shape, t, int(np.prod(shape[:-1], dtype=np.int64)) * row_nbytes(t, shape[-1]))]
    rows, cols = shape
    if fake:
        return [(name, shape, GGMLType.F16, rows * cols * 2)]
    base = name.removesuffix(".weight")
    groups = cols // t.group_size
    return [(name, (rows, cols * t.bits // 32), GGMLType.I32, rows * cols * t.bits // 8),
            (f"{base}.scales", (rows, groups), GGMLType.F16, rows * groups * 2),
            (f"{base}.biases", (rows, groups), GGMLType.F16, rows * groups * 2)]


def _affine_arrays(w: np.ndarray, t: Affine, hessian: np.ndarray | None, fake: bool) -> list[np.ndarray]:
    """Quantize ``w`` (GPTQ when a Hessian is given, else RTN) -> the arrays to write, in order."""
    if hessian is not None:
        q, scales, biases = quantize_gptq(w, hessian, t.bits, t.group_size)
    else:
        q, scales, biases = quantize_rtn(w, t.bits, t.group_size)
    if fake:
        return [dequantize_q(q, scales, biases, t.group_size).astype(np.float16)]
    return [pack(q, t.bits).view(np.int32), scales, biases]


def _type_name(t: GGMLType | Affine) -> str:
    return f"INT{t.bits} g{t.group_size}" if isinstance(t, Affine) else t.name


def convert(folder: str | os.PathLike[str], out: str | os.PathLike[str], outtype: str = "f16",
            llama_cpp: bool | str = False, progress: Callable[[str, int], None] | None = None,
            on_start: Callable[[int], None] | None = None,
            affine: AffineOptions | None = None) -> ConversionResult:
    """Convert the checkpoint in ``folder`` to the GGUF file ``out``.

    ``outtype`` is one of f32, f16, bf16, q8_0; ``llama_cpp`` instead writes the types of
    llama.cpp's preset of that name (``"q4_k_m"`` or ``"q3_k_m"``; True means q4_k_m); ``affine`` writes the affine INT4/INT3 format with its recipe and method.
    ``on_start(total_bytes)`` and ``progress(tensor_name, nbytes)`` drive a progress bar.
    Raises :class:`ConversionError` for any problem with the input or the output path.
    """
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    preset = "q4_k_m" if llama_cpp is True else (llama_cpp or None)
    if preset is not None and preset not in LLAMA_CPP_PRESETS:
        raise ConversionError(f"unknown llama.cpp preset {preset!r}; choose one of {', '.join(LLAMA_CPP_PRESETS)}")
    if affine is not None and affine.method not in ("rtn", "awq", "gptq"):
        raise ConversionError(f"unknown method {affine.method!r}; choose one of rtn, awq, gptq")
    t0 = time.perf_counter()
    out = Path(out)
    tmp = check_output_path(out)
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: not a directory")
    cfg = read_config(folder)
    ckpt = Checkpoint(folder)
    try:
        plan = plan_tensors(cfg, ckpt)
        types: dict[str, GGMLType | Affine] = {}
        for p in plan:
            site = TensorSite(p.gguf, p.shape, _layer_of(p.gguf), cfg.n_layers, cfg.tie_word_embeddings)
            try:
                if affine is not None:
                    types[p.gguf] = affine_type(site, affine.bits, affine.group_size, affine.recipe)
                else:
                    types[p.gguf] = llama_cpp_type(site, preset) if preset else outtype_type(site, outtype)
            except ValueError as exc:
                raise ConversionError(f"{ckpt[p.hf].file}: {exc}") from None
        tok_meta = tokenizer_metadata(folder, cfg.vocab_size, cfg.raw)
        extra = rope_freqs(cfg)
        cal = _calibration(folder, plan, types, affine)
        fake = affine is not None and affine.fake_quant

        writer = GGUFWriter(None, cfg.gguf_architecture)
        # config.json's _name_or_path is a hub id or a local path: its last part names the model.
        writer.add_name(Path(str(cfg.name)).name if cfg.name else folder.resolve().name)
        writer.add_type("model")
        if affine is None:  # no llama.cpp file type describes the affine format
            writer.add_file_type(FILE_TYPES[preset or outtype])
        writer.add_quantization_version(2)
        for key, value in {**model_metadata(cfg), **tok_meta}.items():
            _add_kv(writer, key, value)
        if affine is not None:
            _add_affine_kv(writer, affine, types)
        if extra is not None:
            writer.add_tensor_info("rope_freqs.weight", extra.shape, np.dtype(np.float32), extra.nbytes)
        total = 0
        for p in plan:
            for name, shape, t, nbytes in _tensor_infos(p.gguf, p.shape, types[p.gguf], fake):
                total += nbytes
                writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes,
                                       raw_dtype=GGMLQuantizationType(int(t)))
        if on_start is not None:
            on_start(total)
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            if extra is not None:
                writer.write_tensor_data(extra)
            for p in plan:
                t = types[p.gguf]
                w = _source(ckpt, cfg, p, t, cal)
                if isinstance(t, Affine):
                    arrays = _affine_arrays(w, t, cal.hessians.get(p.hf) if cal else None, fake)
                else:
                    arrays = [_encode(w, t)]
                for data in arrays:
                    writer.write_tensor_data(np.ascontiguousarray(data))
                if progress is not None:
                    progress(p.gguf, sum(a.nbytes for a in arrays))
                del w, arrays  # one tensor at a time: drop it before reading the next
            writer.close()
            os.replace(tmp, out)
        except BaseException:  # Ctrl-C included: never leave a half-written file behind
            try:
                writer.close()
            finally:
                tmp.unlink(missing_ok=True)
            raise
    finally:
        ckpt.close()
    return ConversionResult(out, time.perf_counter() - t0, len(plan) + (extra is not None),
                            out.stat().st_size, {k: _type_name(v) for k, v in types.items()},
                            cal.seconds if cal else 0.0)


def _calibration(folder: Path, plan: list[PlannedTensor], types: dict[str, GGMLType | Affine],
                 affine: AffineOptions | None) -> Calibration | None:
    """Run (or reuse) the calibration that ``--method awq|gptq`` needs; None for RTN."""
    if affine is None or affine.method == "rtn":
        return None
    if affine.calibration is not None:
        if affine.calibration.method != affine.method:
            raise ConversionError(f"calibration was made for {affine.calibration.method}, not {affine.method}")
        return affine.calibration
    if affine.calib is None:
        raise ConversionError(f"--method {affine.method} needs a calibration text (--calib FILE)")
    quants = {p.hf: (t.bits, t.group_size) for p in plan if isinstance(t := types[p.gguf], Affine)}
    return calibrate(folder, Path(affine.calib), affine.method, quants.get, affine.calib_tokens)


def _add_affine_kv(writer: GGUFWriter, affine: AffineOptions, types: dict[str, GGMLType | Affine]) -> None:
    """The ``edgelm.quantization.*`` keys of the affine format (docs: affine format spec, README)."""
    writer.add_string("edgelm.quantization.method", affine.method)
    writer.add_string("edgelm.quantization.recipe", affine.recipe)
    writer.add_uint32("edgelm.quantization.group_size", affine.group_size)
    writer.add_uint32("edgelm.quantization.bits", affine.bits)
    if affine.fake_quant:
        # The weights are already dequantized F16: no tensor is in the affine format.
        writer.add_bool("edgelm.quantization.fake_quant", True)
        return
    names = [name for name, t in types.items() if isinstance(t, Affine)]
    writer.add_array("edgelm.quantization.tensor_names", names)
    writer.add_key_value("edgelm.quantization.tensor_bits", [types[n].bits for n in names],  # type: ignore[union-attr]
                         GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT32)


def _add_kv(writer: GGUFWriter, key: str, value: Any) -> None:
    """Add one metadata value with the GGUF type llama.cpp expects for it."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        # Token ids and counts are uint32 in llama.cpp's files.
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list) and key.endswith("token_type"):
        writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    elif isinstance(value, list) and key.endswith("scores"):
        writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    elif isinstance(value, list):
        writer.add_array(key, value)  # strings (tokens, merges)
    else:
        raise TypeError(f"metadata {key}: unsupported value {type(value).__name__}")
