"""512-token prefill through ``backend.forward``, best of 5: the figure the README's kernel
notes compare between checkouts (run it in each, alternating; absolute times drift here).

    python tools/prefill_speed.py [--model M] [--tokens 512]
"""
from __future__ import annotations

import argparse
import time

import edgelm
from edgelm.apps.bench import DEFAULT_TEXT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    m = edgelm.load(args.model, threads=args.threads, speculative="off")
    ids = m.tokenize(DEFAULT_TEXT.read_text(encoding="utf-8")[:20 * args.tokens * 4])[:args.tokens]
    best = float("inf")
    for _ in range(5):
        cache = m.backend.new_cache(len(ids) + 1)
        t = time.perf_counter()
        m.backend.forward(ids, cache)
        best = min(best, time.perf_counter() - t)
    print(f"prefill {len(ids)} tokens: {len(ids) / best:.1f} tok/s")
    m.close()


if __name__ == "__main__":
    main()
