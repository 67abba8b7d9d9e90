"""Tiny random Llama / Mistral / Qwen2 checkpoints: converted logits against transformers'.

Each checkpoint exercises a different corner: GQA ratios 1, 2 and 4, a head_dim that is not
hidden/heads, tied and untied heads, a vocab size that is not a multiple of 32 (the tokenizer is
padded with [PAD] tokens), a sharded checkpoint with an index, and Llama 3.1 rope scaling
(written as the rope_freqs tensor).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgelm
from edgelm.converters.convert import convert
from edgelm.runtime.gguf import GGUFFile
from hf_factory import make_tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CASES = {
    "llama-tied-gqa2": dict(arch="llama", tie_word_embeddings=True, vocab_size=49159),
    "llama-headdim-rope3": dict(arch="llama", hidden_size=96, num_attention_heads=2, num_key_value_heads=1,
                                head_dim=64, rope_theta=500000.0,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral-gqa4-sharded": dict(arch="mistral", num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                 vocab_size=49170, max_shard_size="5MB"),
    "qwen2-mha-tied": dict(arch="qwen2", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                           vocab_size=49155, num_hidden_layers=3),
    # rows of 256 and 512: llama.cpp's presets write real K-quants here, no fallbacks
    "llama-rows256": dict(arch="llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=2),
}
PROMPTS = ["The capital of France is", "def f(x):\n    return x * 2\n", "In 1987, 12 of 345 members"]


@pytest.fixture(scope="module")
def tiny(smollm2_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")

    def make(name: str) -> Path:
        dest = root / name
        if not dest.exists():
            kwargs = dict(CASES[name])
            make_tiny(dest, kwargs.pop("arch"), smollm2_hf, **kwargs)
        return dest

    return make


@pytest.mark.parametrize("outtype", ["f32", "f16"])
@pytest.mark.parametrize("name", list(CASES))
def test_tiny_logits_match_transformers(name, outtype, tiny, tmp_path):
    folder = tiny(name)
    out = tmp_path / f"{name}.{outtype}.gguf"
    convert(folder, out, outtype=outtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = edgelm.load(str(out), threads=2, n_ctx=256)
    worst = 0.0
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        got = model.logits(ids)
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0].numpy()
        assert got.shape == want.shape
        assert (got.argmax(-1) == want.argmax(-1)).all(), prompt
        worst = max(worst, float(np.abs(got - want).max()))
    model.close()
    print(f"{name} {outtype}: top-1 equal everywhere, max |dlogit| {worst:.5f}")
    assert worst < 0.05


def test_tiny_metadata(tiny, tmp_path):
    out = tmp_path / "m.gguf"
    convert(tiny("llama-headdim-rope3"), out, outtype="f16")
    g = GGUFFile(out)
    assert g.metadata["llama.attention.key_length"] == 64
    assert g.metadata["llama.rope.dimension_count"] == 64
    assert "rope_freqs.weight" in g.tensors and "output.weight" in g.tensors
    out2 = tmp_path / "t.gguf"
    convert(tiny("qwen2-mha-tied"), out2, outtype="f16")
    g2 = GGUFFile(out2)
    assert g2.metadata["general.architecture"] == "qwen2"
    assert "output.weight" not in g2.tensors and "blk.0.attn_q.bias" in g2.tensors
    tokens = g2.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == 49155 and tokens[-1] == "[PAD49154]"
    assert list(g2.metadata["tokenizer.ggml.token_type"][-3:]) == [5, 5, 5]


def test_sharded_checkpoint_is_read_through_its_index(tiny):
    folder = tiny("mistral-gqa4-sharded")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("*.safetensors"))) > 1


@pytest.mark.parametrize("name", ["llama-tied-gqa2", "qwen2-mha-tied"])
def test_tiny_llama_cpp_file_loads_in_llama_cpp(name, tiny, tmp_path, llama_cpp):
    """--llama-cpp on rows of 128 (not a multiple of 256): every K type falls back to Q5_0/Q8_0."""
    out = tmp_path / "q.gguf"
    result = convert(tiny(name), out, llama_cpp=True)
    assert set(result.types.values()) <= {"F32", "Q5_0", "Q8_0"}
    ref = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=2, verbose=False, logits_all=True)
    model = edgelm.load(str(out), threads=2, n_ctx=128)
    ids = model.tokenize(PROMPTS[0], add_bos=False)
    ref.eval(ids)
    a, b = model.logits(ids), np.array(ref.scores[:len(ids)])
    print(f"{name} --llama-cpp: edgelm vs llama.cpp max |dlogit| {np.abs(a - b).max():.4f}")
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.8
    model.close()
    ref.close()


@pytest.mark.parametrize("preset,kinds", [("q4_k_m", {"F32", "Q4_K", "Q6_K"}),
                                          ("q3_k_m", {"F32", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})])
def test_k_quant_presets_write_what_llama_cpp_writes(preset, kinds, tiny, tmp_path, llama_cpp):
    """On rows that are multiples of 256, ``--llama-cpp PRESET`` picks the K-quant of every tensor
    that llama.cpp's own quantizer picks for the same model, and llama.cpp runs the file as edgelm
    does."""
    import ctypes

    folder = tiny("llama-rows256")
    ours = convert(folder, tmp_path / f"{preset}.gguf", llama_cpp=preset).path
    f16 = convert(folder, tmp_path / "f16.gguf", outtype="f16").path
    theirs = tmp_path / "theirs.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q3_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M}[preset]
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    a, b = GGUFFile(ours), GGUFFile(theirs)
    types = {n: t.ggml_type.name for n, t in a.tensors.items()}
    assert types == {n: t.ggml_type.name for n, t in b.tensors.items()}
    assert set(types.values()) == kinds
    # llama.cpp quantized the f16 file, we the bf16 checkpoint: the same values here (bf16 -> f16
    # is exact for these weights), so every block must come out byte for byte the same
    differ = [n for n in a.tensors if not np.array_equal(a.tensor_bytes(n), b.tensor_bytes(n))]
    assert not differ, differ

    ref = llama_cpp.Llama(model_path=str(ours), n_ctx=128, n_threads=2, verbose=False, logits_all=True)
    model = edgelm.load(str(ours), threads=2, n_ctx=128)
    ids = model.tokenize(PROMPTS[0] + " " + PROMPTS[2], add_bos=False)
    ref.eval(ids)
    x, y = model.logits(ids), np.array(ref.scores[:len(ids)])
    print(f"{preset}: edgelm vs llama.cpp max |dlogit| {np.abs(x - y).max():.4f}, "
          f"top-1 equal {(x.argmax(-1) == y.argmax(-1)).mean():.0%}")
    assert (x.argmax(-1) == y.argmax(-1)).mean() >= 0.8
    model.close()
    ref.close()


def test_bf16_is_exact_and_q8_0_is_close(tiny, tmp_path):
    from edgelm.runtime.quants import dequantize

    folder = tiny("mistral-gqa4-sharded")
    files = {}
    for outtype in ("f32", "bf16", "q8_0"):
        files[outtype] = GGUFFile(convert(folder, tmp_path / f"{outtype}.gguf", outtype=outtype).path)
    ref = files["f32"]
    for name, info in ref.tensors.items():
        want = np.asarray(ref.tensor(name))
        for outtype in ("bf16", "q8_0"):
            t = files[outtype].tensors[name]
            got = dequantize(files[outtype].tensor_bytes(name), t.ggml_type, t.np_shape)
            if want.ndim == 1:
                assert t.ggml_type.name == "F32"
            elif outtype == "bf16":
                assert t.ggml_type.name == "BF16" and np.array_equal(got, want), name  # bf16 source: no rounding
            else:
                assert t.ggml_type.name == "Q8_0", name
                assert np.abs(got - want).max() <= np.abs(want).max() / 127, name
    model = edgelm.load(str(files["bf16"].path), threads=2, n_ctx=64)
    same = edgelm.load(str(ref.path), threads=2, n_ctx=64)
    ids = [1, 2, 3, 400, 5000, 49000]
    assert np.allclose(model.logits(ids), same.logits(ids), atol=1e-4)
    model.close()
    same.close()
