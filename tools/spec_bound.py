"""The most speculative decoding could gain on the bench's prompts: an oracle's speedup.

``edgelm bench --speculative`` measures what the drafters achieve. This asks what *any* policy
over the same drafts could achieve at best: an oracle that knows, at every position of the
model's greedy output, how many of a drafter's proposals the model would accept, and picks the
plan of plain steps and verification passes that takes the least time (dynamic programming over
the positions). A real decoder only guesses what the oracle knows, so it can never do better.

Drafters bounded, on the model's own greedy outputs for the bench's chat and summarize prompts:

* ``lookup``: our matcher (``LookupDrafter``, the latest occurrence of the last 2-3 tokens);
* ``lookup-any``: every earlier occurrence of the last token (1-gram and longer), the one whose
  continuation is right for longest -- a bound on every prompt-lookup matcher;
* ``self``: the model with the first s layers of the calibration's ranking skipped, best s.
  Generous: a draft at position i is counted right when the skipped model, given the *full*
  model's cache of the text so far, picks the model's token -- no draft ever suffers from
  earlier drafts' approximate keys -- and a draft step costs head + (1 - head)(L - s)/L;
* ``both``: at every position the better of ``lookup-any`` and ``self``.

Times are in plain decoding steps: a pass of n tokens costs v(n), measured here by
``measure_costs`` (``--costs calibration`` takes the shipped calibration's), and, for
comparison, v(n) = 1 -- a device where a step is bound by reading the weights, so verifying
n tokens costs one step (the premise of self-speculative decoding).

    python tools/spec_bound.py [--model M] [--tokens 128] [--costs measured|calibration]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import edgelm
from edgelm.apps.bench import DEFAULT_TEXT
from edgelm.apps.bench_spec import greedy_outputs
from edgelm.runtime.spec_calibrate import _greedy, measure_costs
from edgelm.runtime.speculative import MAX_DRAFT, LookupDrafter

SKIP_SIZES = (1, 2, 3, 4, 6, 8, 12)


def oracle_time(*drafters: tuple[Sequence[int], Callable[[int], float]]) -> float:
    """Least time, in plain steps, to produce n tokens when each drafter (runs, pass_cost)
    offers at position i a pass with k <= runs[i] drafts, costing pass_cost(k) and yielding
    k + 1 tokens; a plain step (1) yields one."""
    n = len(drafters[0][0])
    best = [0.0] * (n + 1)
    for i in range(n - 1, -1, -1):
        t = 1.0 + best[i + 1]
        for runs, pass_cost in drafters:
            for k in range(1, min(runs[i], MAX_DRAFT, n - 1 - i) + 1):
                t = min(t, pass_cost(k) + best[i + k + 1])
        best[i] = t
    return best[0]


def right_run(proposal: Sequence[int], out: Sequence[int], i: int) -> int:
    """How many of ``proposal`` equal out[i], out[i + 1], ... in order."""
    r = 0
    while r < len(proposal) and i + r < len(out) and proposal[r] == out[i + r]:
        r += 1
    return r


def lookup_runs(prompt: Sequence[int], out: Sequence[int]) -> list[int]:
    d = LookupDrafter()
    d.reset(prompt)
    runs = []
    for i, tok in enumerate(out):
        runs.append(right_run(d.draft(MAX_DRAFT), out, i))
        d.extend([tok])
    return runs


def lookup_any_runs(prompt: Sequence[int], out: Sequence[int]) -> list[int]:
    h = list(prompt)
    runs = []
    for i, tok in enumerate(out):
        last = h[-1]
        runs.append(max((right_run(h[j + 1:j + 1 + MAX_DRAFT], out, i)
                         for j in range(len(h) - 1) if h[j] == last), default=0))
        h.append(tok)
    return runs


def self_agree(backend, prompt: Sequence[int], out: Sequence[int], skip: frozenset[int]) -> np.ndarray:
    """agree[i]: the model with ``skip`` skipped, on the full model's cache of prompt + out[:i],
    picks out[i]."""
    seq = list(prompt) + list(out)
    cache = backend.new_cache(len(seq) + 1)
    backend.forward(seq[:len(prompt) - 1], cache, logits_from=len(prompt) - 1)
    agree = np.zeros(len(out), dtype=bool)
    for i in range(len(out)):
        pos = len(prompt) - 1 + i
        agree[i] = int(np.argmax(backend.forward([seq[pos]], cache, logits_from=0, skip_layers=skip)[0])) == out[i]
        cache.trim(1)
        backend.forward([seq[pos]], cache, logits_from=1)  # the full model's keys for this token
    return agree


def runs_of(agree: np.ndarray) -> list[int]:
    runs = [0] * (len(agree) + 1)
    for i in range(len(agree) - 1, -1, -1):
        runs[i] = runs[i + 1] + 1 if agree[i] else 0
    return runs[:-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--text-file", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--costs", choices=("measured", "calibration"), default="measured")
    args = ap.parse_args()
    m = edgelm.load(args.model, speculative="off")
    backend, n_layers = m.backend, m.backend.args.n_layers
    head, v = measure_costs(backend)
    if args.costs == "calibration":
        v = m.calibration().verify_cost
    print(f"pass costs v(n), n = 1..{MAX_DRAFT + 1}: " + ", ".join(f"{c:.2f}" for c in v) + f"; head {head:.2f}")
    sets = greedy_outputs(m, args.text_file, args.tokens)
    # Rank layers as the calibration does, on these outputs: agreement with each alone skipped.
    pairs = [p for s in sets.values() for p in s]

    def batch_agreement(skip: frozenset[int]) -> float:
        hits = sum(int((_greedy(backend, list(p) + list(o), len(p), skip)[:len(o)] == np.array(o)).sum())
                   for p, o in pairs)
        return hits / sum(len(o) for _, o in pairs)

    order = sorted(range(n_layers), key=lambda l: -batch_agreement(frozenset([l])))
    print("layers ranked by single-skip agreement:", order[:max(SKIP_SIZES)])
    lookup = {name: [lookup_runs(p, o) for p, o in ps] for name, ps in sets.items()}
    lookup_any = {name: [lookup_any_runs(p, o) for p, o in ps] for name, ps in sets.items()}
    self_runs = {(name, s): [runs_of(self_agree(backend, p, o, frozenset(order[:s]))) for p, o in ps]
                 for name, ps in sets.items() for s in SKIP_SIZES}
    for costs_name, vv in (("this machine", v), ("v(n) = 1", [1.0] * len(v))):
        print(f"\n### oracle speedup over plain decoding, pass costs: {costs_name}")
        print("| prompts | tokens | lookup | lookup-any | self (best s) | both |")
        print("|---|---|---|---|---|---|")
        verify = lambda k, vv=vv: vv[k]  # noqa: E731
        for name, ps in sets.items():
            total = sum(len(o) for _, o in ps)
            t_lookup = sum(oracle_time((r, verify)) for r in lookup[name])
            t_any = sum(oracle_time((r, verify)) for r in lookup_any[name])
            best_self, best_both = (float("inf"), 0), float("inf")
            for s in SKIP_SIZES:
                c = head + (1.0 - head) * (n_layers - s) / n_layers
                cost = lambda k, c=c, vv=vv: k * c + vv[k]  # noqa: E731
                t_self = sum(oracle_time((r, cost)) for r in self_runs[name, s])
                best_self = min(best_self, (t_self, s))
                best_both = min(best_both, sum(oracle_time((a, verify), (r, cost))
                                               for a, r in zip(lookup_any[name], self_runs[name, s])))
            print(f"| {name} | {total} | {total / t_lookup:.2f}x | {total / t_any:.2f}x | "
                  f"{total / best_self[0]:.2f}x (s = {best_self[1]}) | {total / best_both:.2f}x |")
        for name in sets:
            agree = [float(np.mean([r > 0 for rs in self_runs[name, s] for r in rs])) for s in SKIP_SIZES]
            print(f"{name}: self-draft agreement by s = {SKIP_SIZES}: " + ", ".join(f"{a:.2f}" for a in agree))
    m.close()


if __name__ == "__main__":
    main()
