"""How often a prompt-lookup draft is right, by the length of the match behind it: the data
behind ``runtime.spec_lookup.LookupOdds.PRIOR``.

Runs the bench's prompts (``edgelm bench --speculative``: 10 chat, 5 summarize) greedily with
plain decoding, then replays each output through a ``LookupDrafter``: at every generated
position with a match, is the token the match proposes the one the model produced? Prints the
hit rate per band of match lengths (``LookupOdds``' bands).

    python tools/lookup_odds.py [--model M] [--tokens 128]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import edgelm
from edgelm.apps.bench import DEFAULT_TEXT
from edgelm.apps.bench_spec import greedy_outputs
from edgelm.runtime.speculative import LookupDrafter, LookupOdds

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--text-file", type=Path, default=DEFAULT_TEXT)
    args = ap.parse_args()
    m = edgelm.load(args.model, speculative="off")
    bands = LookupOdds.BANDS
    odds = LookupOdds()  # only for its banding of lengths
    for name, pairs in greedy_outputs(m, args.text_file, args.tokens).items():
        hits = [0] * len(bands)
        tries = [0] * len(bands)
        positions = 0
        for ids, out in pairs:
            d = LookupDrafter()
            d.reset(ids)
            for tok in out:
                cont, length = d.match(1)
                if cont:
                    b = odds._band(length)
                    tries[b] += 1
                    hits[b] += cont[0] == tok
                positions += 1
                d.extend([tok])
        print(f"\n{name}: {positions} generated positions, {sum(tries)} with a match")
        print("| match length | positions | draft right |")
        print("|---|---|---|")
        for i, e in enumerate(bands):
            hi = f"-{bands[i + 1] - 1}" if i + 1 < len(bands) else "+"
            rate = f"{hits[i] / tries[i]:.0%}" if tries[i] else "-"
            print(f"| {e}{hi} | {tries[i]} | {rate} |")
    m.close()


if __name__ == "__main__":
    main()
