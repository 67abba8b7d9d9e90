"""Test helpers: GGUF metadata as a plain mapping, and vocab-only GGUF files llama.cpp can load.

``read_metadata`` uses the reference ``gguf`` package (not the project's reader) so tokenizer tests
check our code against an independent parse of the file.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

TOKENIZER_KEYS = "tokenizer."


def read_metadata(path: Path | str) -> dict[str, Any]:
    """All key/value fields: str, int, float, bool; list[str] for string arrays, else ndarray."""
    reader = GGUFReader(str(path))
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # header pseudo-fields (version, counts)
        value = field.contents()
        is_array = field.types and field.types[0] == GGUFValueType.ARRAY
        if is_array and len(field.types) > 1 and field.types[1] != GGUFValueType.STRING:
            value = np.asarray(value)
        meta[key] = value
    return meta


def write_vocab_gguf(path: Path, meta: Mapping[str, Any]) -> Path:
    """Write a vocab-only llama-architecture GGUF holding the ``tokenizer.*`` entries of ``meta``.

    Besides the tokenizer, llama.cpp needs the architecture's hyper-parameters to open the file
    (even with ``vocab_only=True``); small dummy values are written for them.
    """
    writer = GGUFWriter(str(path), "llama")
    n_vocab = len(meta["tokenizer.ggml.tokens"])
    writer.add_context_length(2048)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    if "general.name" in meta:
        writer.add_name(str(meta["general.name"]))
    for key, value in meta.items():
        if key.startswith(TOKENIZER_KEYS):
            _add_field(writer, key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_field(writer: GGUFWriter, key: str, value: Any) -> None:
    # Types follow what llama.cpp's loader expects for each tokenizer key.
    if isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, (int, np.integer)):
        writer.add_uint32(key, int(value))
    elif isinstance(value, np.ndarray):
        writer.add_array(key, value.tolist())  # python int -> INT32, float -> FLOAT32 elements
    elif isinstance(value, Sequence):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"cannot write {key}: {type(value).__name__}")


def spm_vocab_from_processor(model_file: Path) -> dict[str, Any]:
    """``tokenizer.ggml.*`` entries for a trained SentencePiece model, as convert_hf_to_gguf makes.

    Uses only the processor's public queries, so the protobuf package is not needed.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_unused(i):
            types.append(5)
        elif sp.is_byte(i):
            types.append(6)
        else:
            types.append(1)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.asarray(scores, dtype=np.float32),
        "tokenizer.ggml.token_type": np.asarray(types, dtype=np.int32),
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
