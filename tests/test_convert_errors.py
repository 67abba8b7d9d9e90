"""Bad input to the converter: one clear error naming the file and the problem, nothing left behind."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from edgelm.apps.cli import main
from edgelm.converters import convert as convert_mod
from edgelm.converters.convert import convert
from edgelm.converters.errors import ConversionError
from edgelm.converters.safetensors import Checkpoint, SafetensorsFile

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 96,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128, "tie_word_embeddings": True,
}


def write_safetensors(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def llama_tensors(cfg: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        })
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def make_folder(tmp_path: Path, cfg: dict | None = None, drop: str | None = None) -> Path:
    from safetensors.numpy import save_file

    folder = tmp_path / "ckpt"
    folder.mkdir()
    cfg = cfg or LLAMA_CONFIG
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = llama_tensors(LLAMA_CONFIG)
    tensors.pop(drop, None)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def assert_clean(directory: Path) -> None:
    left = [p.name for p in directory.iterdir() if ".gguf" in p.name]
    assert left == [], left


# -- safetensors headers ---------------------------------------------------------------------


def convert_bad_file(tmp_path: Path, header: dict, data: bytes, header_len: int | None = None) -> str:
    """Convert a folder whose only safetensors file is malformed; return the error message."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    write_safetensors(tmp_path / "model.safetensors", header, data, header_len)
    with pytest.raises(ConversionError) as err:
        convert(tmp_path, tmp_path / "out.gguf")
    assert_clean(tmp_path)
    return str(err.value)


def test_header_length_beyond_the_file(tmp_path):
    msg = convert_bad_file(tmp_path, {}, b"", header_len=10**6)
    assert re.search(r"model\.safetensors: header length 1000000 goes beyond the end of the file", msg)


def test_offsets_outside_the_data_section(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    msg = convert_bad_file(tmp_path, header, b"\0" * 8)
    assert re.search(r"model\.safetensors: tensor 'w': data_offsets \[0, 16\] lie outside", msg)


def test_overlapping_tensors(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    msg = convert_bad_file(tmp_path, header, b"\0" * 24)
    assert re.search(r"model\.safetensors: tensors 'a' and 'b' overlap", msg)


def test_size_not_matching_dtype_and_shape(tmp_path):
    header = {"w": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 16]}}
    msg = convert_bad_file(tmp_path, header, b"\0" * 16)
    assert re.search(r"model\.safetensors: tensor 'w': data_offsets span 16 bytes but F16 \[2, 3\] needs 12", msg)


def test_unknown_dtype(tmp_path):
    header = {"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 2]}}
    msg = convert_bad_file(tmp_path, header, b"\0" * 2)
    assert re.search(r"model\.safetensors: tensor 'w': unknown or unsupported dtype 'Q9'", msg)


def test_header_not_json(tmp_path):
    path = tmp_path / "f.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(ConversionError, match=r"f\.safetensors: header is not valid JSON"):
        SafetensorsFile(path)


def test_sharded_index_naming_a_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "nope.safetensors"}}))
    with pytest.raises(ConversionError, match=r"index\.json: shard 'nope\.safetensors' does not exist"):
        Checkpoint(tmp_path)


def test_bf16_and_views(tmp_path):
    bits = np.array([0x3F80, 0xC000, 0x0000], dtype="<u2")  # 1.0, -2.0, 0.0
    header = {"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}
    st = SafetensorsFile(write_safetensors(tmp_path / "g.safetensors", header, bits.tobytes()))
    assert st.raw("w").dtype == np.uint16 and not st.raw("w").flags.writeable
    assert st.float32("w").tolist() == [1.0, -2.0, 0.0]


# -- config.json -------------------------------------------------------------------------------


def test_missing_config(tmp_path):
    with pytest.raises(ConversionError, match=r"config\.json: missing"):
        convert(tmp_path, tmp_path / "out.gguf")
    assert_clean(tmp_path)


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match=r"config\.json: malformed"):
        convert(tmp_path, tmp_path / "out.gguf")
    assert_clean(tmp_path)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CONFIG, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConversionError, match=r"unsupported architecture GPT2LMHeadModel; supported: "
                                              r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        convert(tmp_path, tmp_path / "out.gguf")
    assert_clean(tmp_path)


# -- tensors against the config ----------------------------------------------------------------


def test_missing_tensor(tmp_path):
    folder = make_folder(tmp_path, drop="model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ConversionError, match=r"ckpt: missing tensor 'model\.layers\.0\.mlp\.up_proj\.weight'"):
        convert(folder, tmp_path / "out.gguf")
    assert_clean(tmp_path)


def test_shape_not_matching_the_config(tmp_path):
    folder = make_folder(tmp_path, cfg={**LLAMA_CONFIG, "intermediate_size": 96})
    with pytest.raises(ConversionError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' "
                                              r"has shape \[128, 64\] but config\.json implies \[96, 64\]"):
        convert(folder, tmp_path / "out.gguf")
    assert_clean(tmp_path)


def test_unknown_tensor(tmp_path):
    from safetensors.numpy import save_file

    folder = make_folder(tmp_path)
    save_file({"model.extra.weight": np.zeros(4, np.float32)}, str(folder / "extra.safetensors"))
    with pytest.raises(ConversionError, match=r"extra\.safetensors: tensor\(s\) 'model\.extra\.weight' are not part"):
        convert(folder, tmp_path / "out.gguf")


# -- output ------------------------------------------------------------------------------------


def test_unwritable_output_fails_before_any_work(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(convert_mod, "read_config", lambda *a: calls.append(a))
    with pytest.raises(ConversionError, match=r"missing-dir/out\.gguf: cannot write: directory .*missing-dir does not exist"):
        convert(tmp_path, tmp_path / "missing-dir" / "out.gguf")
    with pytest.raises(ConversionError, match=r"is a directory"):
        convert(tmp_path, tmp_path)
    assert calls == []


def test_interrupted_conversion_leaves_nothing(smollm2_hf, tmp_path, monkeypatch):
    from hf_factory import make_tiny

    folder = make_tiny(tmp_path / "tiny", "llama", smollm2_hf)
    seen = []

    def interrupt(name: str, nbytes: int) -> None:
        seen.append(name)
        if len(seen) == 5:
            raise KeyboardInterrupt

    out = tmp_path / "out.gguf"
    with pytest.raises(KeyboardInterrupt):
        convert(folder, out, progress=interrupt)
    assert_clean(tmp_path)
    convert(folder, out)  # and the same conversion completes when left alone
    assert out.exists()
    assert [p.name for p in tmp_path.iterdir() if ".gguf" in p.name] == ["out.gguf"]


def test_cli_prints_one_line_and_exits_1(tmp_path, capsys):
    (tmp_path / "config.json").write_text("[]")
    assert main(["convert", str(tmp_path), "-o", str(tmp_path / "out.gguf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgelm: error: ") and "config.json" in err[0]
    assert_clean(tmp_path)


def test_cli_bits_do_not_combine_with_outtype(tmp_path, capsys):
    assert main(["convert", str(tmp_path), "-o", str(tmp_path / "o.gguf"), "--bits", "4", "--outtype", "q8_0"]) == 1
    assert "do not combine" in capsys.readouterr().err


def test_unknown_llama_cpp_preset_is_refused(tmp_path, capsys):
    with pytest.raises(ConversionError, match="unknown llama.cpp preset 'q2_k'"):
        convert(tmp_path, tmp_path / "o.gguf", llama_cpp="q2_k")
    with pytest.raises(SystemExit):  # argparse lists the choices
        main(["convert", str(tmp_path), "-o", str(tmp_path / "o.gguf"), "--llama-cpp", "q2_k"])
    assert "q3_k_m" in capsys.readouterr().err
    assert_clean(tmp_path)
