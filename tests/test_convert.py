"""edgelm convert on the real SmolLM2-135M-Instruct checkpoint: logits, tokenizer, llama.cpp.

Oracles: transformers' logits on the same safetensors; the HF tokenizer's ids; the original
GGUF's metadata (llama.cpp's own converter wrote it); llama.cpp's quantizer's choice of types
(the ``requantized_gguf`` Q4_K_M file); llama-cpp-python running the ``--llama-cpp`` file.
"""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

import edgelm
from edgelm.converters.convert import convert
from edgelm.runtime.gguf import GGUFFile
from greedy_oracle import greedy_agreement

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nWhat are three tips for staying healthy?<|im_end|>\n<|im_start|>assistant\n",
    "In 1987, 12 of the 345 members voted for the 2nd amendment.",
]
HARD_STRINGS = [
    "", " ", "  leading and trailing  ", "\n\n\ttabs\tand\r\nnewlines\n", "12345678901234567890",
    "3.14159 + 2.71828 = 5.85987", "naïve café, Zürich — “quotes” «guillemets»", "日本語のテキストと中文",
    "emoji 🦙🚀 and ZWJ 👩‍👩‍👧", "<|im_start|>user\nhi<|im_end|>", "don't won't it's I'M we'LL",
    "x" * 300, "`code` {braces} [brackets] (parens) <angle>", "\u00a0non-breaking\u2009thin spaces",
]


@pytest.fixture(scope="module")
def converted(smollm2_hf, tmp_path_factory):
    """SmolLM2 converted to F32, F16 and --llama-cpp (q4_k_m and q3_k_m), with the time each took."""
    out = tmp_path_factory.mktemp("smollm2-gguf")
    files, seconds = {}, {}
    for kind in ("f32", "f16", "llama-cpp", "q3_k_m"):
        t0 = time.perf_counter()
        path = out / f"smollm2.{kind}.gguf"
        preset = {"llama-cpp": "q4_k_m", "q3_k_m": "q3_k_m"}.get(kind, False)
        convert(smollm2_hf, path, outtype="f16" if preset else kind, llama_cpp=preset)
        seconds[kind] = time.perf_counter() - t0
        files[kind] = path
    print("\nconversion time: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return files, seconds


@pytest.fixture(scope="module")
def hf_model(smollm2_hf):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_hf):
    return transformers.AutoTokenizer.from_pretrained(smollm2_hf)


def test_conversion_is_fast(converted):
    _, seconds = converted
    assert seconds["f16"] < 120 and seconds["llama-cpp"] < 120


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_logits_match_transformers(kind, converted, hf_model, hf_tokenizer):
    model = edgelm.load(str(converted[0][kind]), threads=2, n_ctx=512)
    worst = 0.0
    for prompt in PROMPTS:
        ids = hf_tokenizer(prompt)["input_ids"]
        got = model.logits(ids)
        with torch.no_grad():
            want = hf_model(torch.tensor([ids])).logits[0].numpy()
        assert (got.argmax(-1) == want.argmax(-1)).all(), prompt
        worst = max(worst, float(np.abs(got - want).max()))
    print(f"{kind}: top-1 equal at every position of {len(PROMPTS)} prompts; max |dlogit| {worst:.4f}")
    model.close()
    assert worst < 0.1


def test_metadata_matches_llama_cpp_converter(converted, default_gguf):
    """The original GGUF was written by llama.cpp's converter: hyperparameters and tokenizer agree."""
    ours = GGUFFile(converted[0]["f16"]).metadata
    theirs = GGUFFile(default_gguf).metadata
    keys = [k for k in theirs if k.startswith(("llama.", "tokenizer.")) and k != "tokenizer.ggml.add_space_prefix"]
    assert len(keys) > 15
    for key in keys:
        a, b = ours[key], theirs[key]
        same = np.array_equal(np.asarray(a), np.asarray(b)) if isinstance(b, (list, np.ndarray)) else a == b
        assert same, key
    assert ours["tokenizer.ggml.pre"] == "smollm"


@pytest.mark.parametrize("name", ["calib", "eval", "hard"])
def test_tokenizer_reproduces_hf_ids(name, converted, hf_tokenizer, calib_text, eval_text):
    model = edgelm.load(str(converted[0]["f16"]), threads=1, n_ctx=64)
    texts = {"calib": [calib_text], "eval": [eval_text], "hard": HARD_STRINGS}[name]
    for text in texts:
        want = hf_tokenizer(text, add_special_tokens=True)["input_ids"]
        assert model.tokenize(text, add_bos=True, special=True) == want, text[:80]
    model.close()


@pytest.mark.parametrize("kind,preset,want", [
    ("llama-cpp", "q4_k_m", {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}),
    # rows of 576: Q3_K falls back to Q4_0, Q4_K to Q5_0, Q5_K to Q5_1; the 1,536-wide ffn_down
    # is a real K-quant (Q5_K in layer 0, Q4_K after)
    ("q3_k_m", "q3_k_m", {"F32", "Q4_0", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q8_0"}),
])
def test_llama_cpp_file_types_match_llama_cpp_quantizer(kind, preset, want, converted, requantized_gguf):
    ours = GGUFFile(converted[0][kind]).tensors
    theirs = GGUFFile(requantized_gguf(preset)).tensors
    assert set(ours) == set(theirs)
    assert {n: t.ggml_type.name for n, t in ours.items()} == {n: t.ggml_type.name for n, t in theirs.items()}
    assert {t.ggml_type.name for t in ours.values()} == want


@pytest.mark.parametrize("kind", ["llama-cpp", "q3_k_m"])
def test_llama_cpp_file_runs_in_both_engines(kind, converted, llama_cpp):
    path = str(converted[0][kind])
    ours = edgelm.load(path, threads=2, n_ctx=512)
    ref = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=2, verbose=False, logits_all=True)
    _, prefixes = greedy_agreement(ours, ref, PROMPTS, 32)
    print(f"--llama-cpp {kind} file: characters in common with llama.cpp's greedy text: {prefixes}")
    ours.close()
    ref.close()
    # Both engines round activations to 8 bits in quantized products: a near-tie may flip.
    assert sum(p >= 8 for p in prefixes) >= 4


def test_peak_rss_of_a_conversion_is_under_1gb(smollm2_hf, tmp_path):
    out = tmp_path / "rss.gguf"
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking pytest process.
    code = ("import sys; from edgelm.apps.cli import main; rc = main(sys.argv[1:]); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]); sys.exit(rc)")
    for extra in ([], ["--llama-cpp"], ["--llama-cpp", "q3_k_m"]):
        proc = subprocess.run([sys.executable, "-c", code, "convert", str(smollm2_hf), "-o", str(out),
                               "--quiet", *extra], capture_output=True, text=True, check=True)
        peak_mb = int(proc.stdout.split()[-1]) / 1024
        print(f"peak RSS converting SmolLM2 {extra or ['--outtype', 'f16']}: {peak_mb:.0f} MB")
        assert peak_mb < 1024
        assert out.exists() and not list(tmp_path.glob("*.tmp-*"))


def test_weights_are_laid_out_as_llama_cpp_writes_them(converted, default_gguf):
    """Every tensor, Q/K permutation included, equals the original GGUF's up to bf16 rounding.

    The fixture's safetensors hold the original Q4_1 weights dequantized (with transformers
    undoing llama.cpp's Q/K permutation) and rounded to bf16; converting must redo exactly that
    permutation.
    """
    from edgelm.runtime.quants import dequantize

    ours, theirs = GGUFFile(converted[0]["f32"]), GGUFFile(default_gguf)
    assert set(ours.tensors) == set(theirs.tensors)
    for name, info in theirs.tensors.items():
        want = dequantize(theirs.tensor_bytes(name), info.ggml_type, info.np_shape)
        got = np.asarray(ours.tensor(name))
        assert got.shape == want.shape, name
        assert np.allclose(got, want, rtol=2 ** -8, atol=1e-30), name


def test_f16_file_runs_in_llama_cpp_like_transformers(converted, hf_model, hf_tokenizer, llama_cpp):
    """llama.cpp reads the unquantized file as its own converter's: logits follow transformers'."""
    ref = llama_cpp.Llama(model_path=str(converted[0]["f16"]), n_ctx=512, n_threads=2, verbose=False,
                          logits_all=True)
    agree, total, worst = 0, 0, 0.0
    for prompt in PROMPTS:
        ids = hf_tokenizer(prompt)["input_ids"]
        ref.reset()
        ref.eval(ids)
        got = np.array(ref.scores[:len(ids)], dtype=np.float32)
        with torch.no_grad():
            want = hf_model(torch.tensor([ids])).logits[0].numpy()
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(ids)
        worst = max(worst, float(np.abs(got - want).max()))
    ref.close()
    print(f"llama.cpp on the F16 file vs transformers: top-1 equal at {agree}/{total} positions, "
          f"max |dlogit| {worst:.3f}")
    assert agree >= 0.95 * total and worst < 1.0
