"""A process that compiles the kernels computes exactly what a process that loads them computes.

numba compiles the kernels on first use and caches them on disk; every later launch loads them.
Both must give the same logits bit for bit, or a user's first chat differs from every later one
(it did, while some kernels were fastmath: see ``tests/test_kernel_flags.py``). Two fresh
processes share an empty numba cache directory: the first compiles everything, the second loads
it. The probe covers prefill and decoding, the 16-bit and the quantized KV cache, and the weight
types of the default model and of llama.cpp's Q4_K_M (whose prefill takes the K-quant GEMM).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

def probe(eval_file: str, paths: list[str]) -> dict[str, np.ndarray]:
    """Prefill and decode logits of each file with 16-, 8- and 4-bit KV caches."""
    import edgelm
    from edgelm.runtime.kv_cache import KVSpec

    out = {}
    text = open(eval_file, encoding="utf-8").read()[5000:9000]
    for name, path in zip(("q4_1", "q4_k_m"), paths):
        m = edgelm.load(path, threads=2, n_ctx=256, speculative="off")
        ids = m.tokenize(text)[:160]  # more than 128 (one prefill chunk) and 32 (one key group)
        for bits in (16, 8, 4):
            cache = m.backend.new_cache(256, KVSpec(bits_k=bits, bits_v=bits)) if bits < 16 else m.backend.new_cache(256)
            logits = m.backend.forward(ids, cache, logits_from=0)
            steps = [logits[-1]]
            for _ in range(3):
                steps.append(m.backend.forward([int(steps[-1].argmax())], cache)[0])
            out[f"{name}-{bits}-prefill"], out[f"{name}-{bits}-decode"] = logits, np.array(steps)
        m.close()
    return out


def _in_subprocess(tmp_path, cache_dir, name, eval_file, paths) -> dict[str, np.ndarray]:
    out = tmp_path / f"{name}.npz"
    code = (f"import sys, numpy as np; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_determinism import probe; np.savez(sys.argv[1], **probe(sys.argv[2], sys.argv[3:]))")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    run = subprocess.run([sys.executable, "-c", code, str(out), str(eval_file), *map(str, paths)],
                         env=env, timeout=1200, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(np.load(out))


def test_compiled_and_cached_kernels_compute_the_same_bits(tmp_path, default_gguf, requantized_gguf):
    from conftest import SHARED_DATA
    from edgelm.kernels.forward import forward_worker

    eval_file = SHARED_DATA / "wikitext-2-eval.txt"
    paths = [str(default_gguf), str(requantized_gguf("q4_k_m"))]
    if forward_worker.stats.cache_misses:
        # This process compiled the forward pass (a clean checkout: CI): compare it with a
        # process that loads what it compiled -- no second compile needed.
        fresh = probe(str(eval_file), paths)
        cache = os.environ["NUMBA_CACHE_DIR"]
    else:
        cache = tmp_path / "numba-cache"  # an empty cache: the first process compiles everything
        fresh = _in_subprocess(tmp_path, cache, "fresh", eval_file, paths)
        assert any(cache.rglob("*.nbi")), "the first process should have written numba's cache"
    cached = _in_subprocess(tmp_path, cache, "cached", eval_file, paths)
    differ = [k for k in fresh if not np.array_equal(fresh[k], cached[k])]
    assert not differ, f"compiled vs cached kernels differ in {differ}"
