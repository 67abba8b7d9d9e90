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

import numpy as np

_PROBE = r"""
import sys, numpy as np, edgelm
from edgelm.runtime.kv_cache import KVSpec
out = {}
text = open(sys.argv[1]).read()[5000:9000]
for name, path in zip(("q4_1", "q4_k_m"), sys.argv[3:]):
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
np.savez(sys.argv[2], **out)
"""


def _run(tmp_path, cache_dir, out, paths, eval_file):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    run = subprocess.run([sys.executable, "-c", _PROBE, str(eval_file), str(out), *map(str, paths)],
                         env=env, timeout=1200, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return np.load(out)


def test_compiled_and_cached_kernels_compute_the_same_bits(tmp_path, default_gguf, requantized_gguf):
    from conftest import SHARED_DATA

    eval_file = SHARED_DATA / "wikitext-2-eval.txt"
    paths = (default_gguf, requantized_gguf("q4_k_m"))
    cache = tmp_path / "numba-cache"
    fresh = _run(tmp_path, cache, tmp_path / "fresh.npz", paths, eval_file)
    assert any(cache.rglob("*.nbi")), "the first process should have written numba's cache"
    cached = _run(tmp_path, cache, tmp_path / "cached.npz", paths, eval_file)
    differ = [k for k in fresh.files if not np.array_equal(fresh[k], cached[k])]
    assert not differ, f"compiled vs cached kernels differ in {differ}"
