"""edgelm against exact float64 arithmetic on the default model: an oracle independent of
llama.cpp for the forward pass. Both engines round activations to 8 bits inside quantized dot
products (edgelm exactly as llama.cpp does, tests/test_vs_llamacpp.py), which keeps either at
~97% top-1 and ~0.17 mean |dlogit| from the exact result on this small model."""
from __future__ import annotations

import numpy as np
import pytest

import edgelm
from reference_forward import ReferenceLlama

N = 512


@pytest.fixture(scope="module")
def reference(default_gguf, eval_text):
    model = edgelm.load(default_gguf, threads=2, n_ctx=N)
    ids = model.tokenize(eval_text[:6000])[:N]
    exact = ReferenceLlama(default_gguf).logits(ids)
    yield model, ids, exact
    model.close()


def test_prefill_stays_near_float64_reference(reference):
    model, ids, exact = reference
    got = model.logits(ids)
    agree = float((got.argmax(-1) == exact.argmax(-1)).mean())
    err = np.abs(got - exact)
    print(f"prefill vs float64: top-1 {agree:.4f}, mean |dlogit| {err.mean():.4f}, max {err.max():.4f}")
    assert agree >= 0.95
    assert err.mean() < 0.25


def test_decode_stays_near_float64_reference(reference, llama_cpp, default_gguf):
    """Decoding rounds activations to 8 bits like llama.cpp: as close to exact as llama.cpp is."""
    model, ids, exact = reference
    n = 128
    cache = model.backend.new_cache(n)
    got = np.stack([model.backend.forward([t], cache)[0] for t in ids[:n]])
    ref = llama_cpp.Llama(model_path=str(default_gguf), n_ctx=N, n_batch=512, n_threads=2,
                          logits_all=True, verbose=False)
    ref.eval(list(ids[:n]))
    theirs = np.array(ref.scores[:n], dtype=np.float32)
    ref.close()
    ours_top1 = float((got.argmax(-1) == exact[:n].argmax(-1)).mean())
    theirs_top1 = float((theirs.argmax(-1) == exact[:n].argmax(-1)).mean())
    ours_err, theirs_err = np.abs(got - exact[:n]).mean(), np.abs(theirs - exact[:n]).mean()
    print(f"vs float64 over {n} tokens: edgelm decode top-1 {ours_top1:.4f} mean |d| {ours_err:.4f}; "
          f"llama.cpp top-1 {theirs_top1:.4f} mean |d| {theirs_err:.4f}")
    assert ours_err < 1.25 * theirs_err
    assert ours_top1 >= theirs_top1 - 0.03
