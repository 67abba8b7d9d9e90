"""``edgelm bench --speculative``: speculative decoding against plain decoding, prompt by prompt.

Two fixed prompt sets, greedy, 128 new tokens each (``--decode-tokens``):

* chat: short chat-style requests (the everyday case, where drafts come from the model itself);
* summarize: "summarize this text" over WikiText-2 paragraphs (where the answer quotes its input
  and prompt lookup shines).

Every prompt runs plain (``off``) and then each speculative mode asked for, in one process, back
to back, best of ``--repeats``; the table gives decode tok/s of each, the speedup, the acceptance
rate and the mean accepted length per verification round. Greedy output is checked identical.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.speculative import SpecStats

CHAT_PROMPTS = (
    "Write a short poem about the sea.",
    "What are three good habits for staying healthy?",
    "Explain what a black hole is in simple words.",
    "Write a Python function that checks whether a number is prime.",
    "Give me a recipe for pancakes.",
    "What is the difference between weather and climate?",
    "List five countries in Europe and their capitals.",
    "Tell me a fun fact about octopuses.",
    "How do I write a good cover letter?",
    "Describe a sunset to someone who has never seen one.",
)


@dataclass(frozen=True)
class SpecRun:
    mode: str
    tok_s: float
    tokens: int
    spec: SpecStats  # the run's drafting counters (acceptance_rate, mean_accepted)
    text: str


def summarize_prompts(text_file: Path, n: int = 5, words: int = 180) -> list[str]:
    """``n`` "summarize this" requests over consecutive WikiText paragraphs of about ``words`` words."""
    paras = [p.strip() for p in text_file.read_text(encoding="utf-8").split("\n")
             if len(p.split()) > 60 and not p.strip().startswith("=")]
    out = []
    for p in paras[:n]:
        body = " ".join(p.split()[:words])
        out.append(f"Summarize the following text in a few sentences.\n\n{body}")
    return out


def greedy_outputs(model, text_file: Path, tokens: int = 128) -> dict[str, list[tuple[list[int], list[int]]]]:
    """The bench's prompts run greedily with plain decoding: {"chat": [...], "summarize": [...]}
    of (prompt ids, generated ids) -- what ``tools/lookup_odds.py`` and ``tools/spec_bound.py``
    replay drafters against."""
    out: dict[str, list[tuple[list[int], list[int]]]] = {}
    for name, prompts in (("chat", list(CHAT_PROMPTS)), ("summarize", summarize_prompts(text_file))):
        out[name] = []
        for prompt in prompts:
            "".join(model.chat([{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0.0,
                               speculative="off"))
            history, n = list(model._history), model.last_stats.prompt_tokens  # all but the last token
            out[name].append((history[:n], history[n:]))
    return out


def _run(model, prompt: str, mode: str, tokens: int) -> SpecRun:
    text = "".join(model.chat([{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0.0,
                              speculative=mode))
    s = model.last_stats
    steps = s.generated_tokens - 1  # tokens after the first (decode_s starts once it is known)
    return SpecRun(mode, steps / s.decode_s if s.decode_s > 0 else 0.0, s.generated_tokens,
                   dataclasses.replace(s.spec), text)


def bench_prompt(model, prompt: str, modes: tuple[str, ...], tokens: int, repeats: int) -> dict[str, Any]:
    best: dict[str, SpecRun] = {}
    for _ in range(repeats):
        for mode in ("off",) + modes:  # interleaved, so drifting machine load hits every mode alike
            r = _run(model, prompt, mode, tokens)
            if mode not in best or r.tok_s > best[mode].tok_s:
                best[mode] = r
    plain = best["off"]
    row: dict[str, Any] = {"prompt": prompt[:60], "tokens": plain.tokens, "off_tok_s": round(plain.tok_s, 1)}
    for mode in modes:
        r = best[mode]
        row[mode] = {"tok_s": round(r.tok_s, 1), "speedup": round(r.tok_s / plain.tok_s, 3) if plain.tok_s else None,
                     "acceptance": round(r.spec.acceptance_rate, 3), "mean_accepted": round(r.spec.mean_accepted, 2),
                     "identical": r.text == plain.text}
    return row


def run(model, text_file: Path, modes: tuple[str, ...], tokens: int = 128, repeats: int = 1,
        progress: bool = True) -> dict[str, Any]:
    """The whole benchmark: {"chat": [rows], "summarize": [rows], "summary": {...}}."""
    import sys

    report: dict[str, Any] = {"load_average": os.getloadavg()[0], "modes": list(modes), "decode_tokens": tokens,
                              "calibration": None}
    cal = model.calibration()
    if cal is not None:
        report["calibration"] = {"skip": list(cal.skip), "agreement": cal.agreement, "draft_cost": cal.draft_cost,
                                 "draft_len": cal.draft_len, "predicted_speedup": cal.speedup, "pays": cal.pays}
    for name, prompts in (("chat", list(CHAT_PROMPTS)), ("summarize", summarize_prompts(text_file))):
        rows = []
        for i, p in enumerate(prompts):
            if progress:
                print(f"  {name} {i + 1}/{len(prompts)}", file=sys.stderr, flush=True)
            rows.append(bench_prompt(model, p, modes, tokens, repeats))
        report[name] = rows
    report["summary"] = {
        name: {mode: {"mean_speedup": round(sum(r[mode]["speedup"] for r in report[name]) / len(report[name]), 3),
                      "min_speedup": min(r[mode]["speedup"] for r in report[name]),
                      "all_identical": all(r[mode]["identical"] for r in report[name])}
               for mode in modes}
        for name in ("chat", "summarize")}
    return report


def format_report(report: dict[str, Any]) -> str:
    modes = report["modes"]
    lines = []
    for name in ("chat", "summarize"):
        lines.append(f"\n{name} prompts ({report['decode_tokens']} tokens, greedy)")
        head = "| prompt | plain tok/s | " + " | ".join(
            f"{m} tok/s | {m} speedup | {m} accepted | {m} mean len" for m in modes) + " |"
        lines += [head, "|" + "---|" * (2 + 4 * len(modes))]
        for r in report[name]:
            cells = [r["prompt"].replace("\n", " ")[:40], f"{r['off_tok_s']:.1f}"]
            for m in modes:
                c = r[m]
                cells += [f"{c['tok_s']:.1f}", f"{c['speedup']:.2f}x" + ("" if c["identical"] else " (DIFFERS)"),
                          f"{c['acceptance']:.0%}", f"{c['mean_accepted']:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        for m in modes:
            s = report["summary"][name][m]
            lines.append(f"{m}: mean {s['mean_speedup']:.2f}x, min {s['min_speedup']:.2f}x, "
                         f"output identical: {s['all_identical']}")
    return "\n".join(lines)


def cmd_bench_speculative(model, args) -> int:
    mode = args.speculative
    modes = ("self", "lookup", "auto") if mode == "auto" else (mode,)
    if "self" in modes and model.calibration() is None:
        model.calibration(create=True)
    report = run(model, args.text_file, modes, args.decode_tokens, args.repeats)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
