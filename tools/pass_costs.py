"""What a speculative verification pass costs, and where: layers against output head.

For n = 1, 2, 4, 5, 8 tokens, after a 200-token context, each over a plain one-token step
(median of 15):

* full: ``forward(logits_from=0)``, every row's logits;
* lazy, all rows read: ``forward_lazy`` with every row read (what an accepted round pays);
* lazy, row 0 read: a round whose first draft is rejected;
* no head: the layers alone (``logits_from=n``).

The difference between "full" and "no head" is the output head for n rows: bound by reading
its matrix, it costs about as much for four rows as for one (``LazyLogits.HEAD_CHUNK``).

    python tools/pass_costs.py [--model M] [--threads N]
"""
from __future__ import annotations

import argparse
from functools import partial

import edgelm
from edgelm.runtime.spec_calibrate import _median_time

median_time = partial(_median_time, reps=15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    m = edgelm.load(args.model, threads=args.threads, speculative="off")
    be = m.backend
    cache = be.new_cache(512)
    be.forward(list(range(100, 300)), cache)

    def full(n: int) -> None:
        be.forward(list(range(5, 5 + n)), cache, logits_from=0)
        cache.trim(n)

    def lazy(n: int, read: int) -> None:
        rows = be.forward_lazy(list(range(5, 5 + n)), cache)
        for j in range(read):
            rows[j]
        cache.trim(n)

    def no_head(n: int) -> None:
        be.forward(list(range(5, 5 + n)), cache, logits_from=n)
        cache.trim(n)

    full(1)
    plain = median_time(lambda: full(1))
    print(f"plain step: {plain * 1e3:.2f} ms; costs over it:")
    print("| tokens | full | lazy, all rows read | lazy, row 0 read | no head |")
    print("|---|---|---|---|---|")
    for n in (1, 2, 4, 5, 8):
        cells = [median_time(lambda: full(n)), median_time(lambda: lazy(n, n)),
                 median_time(lambda: lazy(n, 1)), median_time(lambda: no_head(n))]
        print(f"| {n} | " + " | ".join(f"{c / plain:.2f}" for c in cells) + " |")
    m.close()


if __name__ == "__main__":
    main()
