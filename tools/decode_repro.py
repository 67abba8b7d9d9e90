"""Dump decode-path and prefill logits of a model, to compare runs (e.g. a fresh numba compile
against a cached one; see README, "Affine INT4/INT3 (--bits)").

usage: python tools/decode_repro.py MODEL OUT.npy [THREADS]
       d=$(mktemp -d); NUMBA_CACHE_DIR=$d python tools/decode_repro.py M a.npy   # compiles
       NUMBA_CACHE_DIR=$d python tools/decode_repro.py M b.npy                   # loads the cache
       python -c "import numpy as np; a, b = np.load('a.npy'), np.load('b.npy'); print(abs(a - b).max(1))"
Rows 0-5 are six one-token decode steps after a batched prefill, the rest one prefill pass.
"""
import sys

import numpy as np

import edgelm

m = edgelm.load(sys.argv[1], threads=int(sys.argv[3]) if len(sys.argv) > 3 else 2, speculative="off")
ids = m.tokenize("The capital of France is Paris, and the capital of Germany is")
cache = m.backend.new_cache(64)
m.backend.forward(ids[:-1], cache)
decode = np.stack([m.backend.forward([t], cache)[0] for t in ids[-1:] + ids[:5]])
prefill = m.backend.forward(ids, m.backend.new_cache(64), logits_from=0)
np.save(sys.argv[2], np.concatenate([decode, prefill]))
