"""Decode tok/s after prompts of several lengths, per KV-cache kind, through ``backend.forward``
(no sampling, no server): the before/after table in README, "Speed and memory". Compare two
builds by running it on each in one session (this machine's noise moves absolute figures by
20-40% between runs).

usage: python tools/decode_depth.py [MODEL] [THREADS]
"""
import sys
import time

import edgelm
from edgelm.apps.bench import DEFAULT_TEXT
from edgelm.runtime.kv_cache import KVSpec

DEPTHS = (64, 512, 1536)
STEPS, REPEATS = 16, 5


def main() -> None:
    model = edgelm.load(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct",
                        threads=int(sys.argv[2]) if len(sys.argv) > 2 else 2, n_ctx=2048)
    backend = model.backend
    ids = model.tokenize(DEFAULT_TEXT.read_text(encoding="utf-8")[:40000])[:DEPTHS[-1] + STEPS]
    for name, spec in (("16-bit", KVSpec()), ("8-bit", KVSpec(8, 8)), ("4-bit", KVSpec(4, 4))):
        cache, done, row = backend.new_cache(2048, spec), 0, []
        for depth in DEPTHS:
            for s in range(done, depth, 256):  # the prompt, in passes of at most 256 tokens
                backend.forward(ids[s:min(depth, s + 256)], cache)
            done, best = depth, float("inf")
            for _ in range(REPEATS):  # best of REPEATS runs of STEPS one-token steps
                t = time.perf_counter()
                for k in range(STEPS):
                    backend.forward([ids[depth + k]], cache)
                best = min(best, (time.perf_counter() - t) / STEPS)
                cache.trim(STEPS)
            row.append(f"after {depth}: {1 / best:6.1f}")
        print(f"{name:7s} decode tok/s  " + "  ".join(row))
    model.close()


if __name__ == "__main__":
    main()
