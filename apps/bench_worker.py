"""One engine's benchmark, run by ``apps/bench.py`` in a fresh process; prints one JSON object.

Running each engine in its own process keeps the figures clean: peak RSS is the process's own,
start-up includes interpreter, imports, model load and (for edgelm) compiling or loading the numba
kernels, and neither engine's threads or allocator state disturb the other.

Both engines run the same protocol (:class:`Engine`): a fresh context, a prompt, greedy decoding of
``n`` tokens, with the same definitions of the timings:

* ``ttft_s``: from the call until the first new token is known (prompt evaluation + sampling);
* ``decode_s`` over ``decode_steps`` single-token forward passes after that (after a short
  prompt, and with ``--decode-depth N`` also after an N-token one);
* ``cpu_s``: process CPU time (all threads) over the whole call.

    python -m edgelm.apps.bench_worker --engine edgelm --model M.gguf --threads 2 --text-file F
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class RunTiming:
    """Timings of one prompt + greedy-decode call (definitions in the module docstring)."""

    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    decode_steps: int
    decode_s: float
    cpu_s: float

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


class Engine(Protocol):
    name: str
    version: str

    def tokenize(self, text: str) -> list[int]: ...

    def run(self, ids: Sequence[int], n_new: int) -> RunTiming: ...


class EdgelmEngine:
    """edgelm, timed by its own ``Model.last_stats`` (which uses the definitions above)."""

    name = "edgelm"

    def __init__(self, path: Path, threads: int, n_ctx: int, **kv: Any):
        import edgelm

        self.version = edgelm.__version__
        # plain decoding, as llama.cpp does here (`edgelm bench --speculative` times speculation)
        self.model = edgelm.load(path, threads=threads, n_ctx=n_ctx, speculative="off", **kv)

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_bos=True)

    def run(self, ids: Sequence[int], n_new: int) -> RunTiming:
        for _ in self.model.generate(list(ids), max_tokens=n_new, temperature=0.0, top_k=1):
            pass
        s = self.model.last_stats
        return RunTiming(prompt_tokens=len(ids), generated_tokens=s.generated_tokens, ttft_s=s.ttft_s,
                         decode_steps=s.decode_steps, decode_s=s.decode_s, cpu_s=s.cpu_s)


class LlamaCppEngine:
    """llama-cpp-python: prompt via ``Llama.eval``, then one ``eval`` per greedily chosen token."""

    name = "llama.cpp"

    def __init__(self, path: Path, threads: int, n_ctx: int, **kv: Any):
        import llama_cpp  # its default f16 KV cache (the kv options are edgelm's)

        self.version = llama_cpp.__version__
        self._llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads,
                                   n_ctx=n_ctx, n_batch=512, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def tokenize(self, text: str) -> list[int]:
        # add_bos=True asks for BOS only if the model's vocabulary says to add one, as edgelm does.
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True)

    def _greedy(self) -> int:
        # The high-level Llama keeps no logits without logits_all (which would make llama.cpp
        # compute the output head for every prompt position); read the last row from the C API.
        logits = np.ctypeslib.as_array(self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1),
                                       shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def run(self, ids: Sequence[int], n_new: int) -> RunTiming:
        self.llm.reset()  # the next eval drops the whole KV cache: a fresh context
        cpu0, t0 = time.process_time(), time.perf_counter()
        self.llm.eval(list(ids))
        token = self._greedy()
        t_first = time.perf_counter()
        for _ in range(n_new - 1):
            self.llm.eval([token])
            token = self._greedy()
        t_end = time.perf_counter()
        return RunTiming(prompt_tokens=len(ids), generated_tokens=n_new, ttft_s=t_first - t0,
                         decode_steps=n_new - 1, decode_s=t_end - t_first, cpu_s=time.process_time() - cpu0)


ENGINES: dict[str, Callable[..., Engine]] = {
    EdgelmEngine.name: EdgelmEngine,
    LlamaCppEngine.name: LlamaCppEngine,
}

DECODE_PROMPT_TOKENS = 16  # "after a short prompt": the decode runs start from this many tokens


@dataclass(frozen=True)
class Prompts:
    """Token prompts of the timed runs, one per repeat."""

    prefill: list[list[int]]  # ``prefill_tokens`` each
    decode: list[list[int]]  # ``DECODE_PROMPT_TOKENS`` each
    warmup: list[int]
    deep: list[list[int]] = field(default_factory=list)  # ``decode_depth`` each (none: not measured)


def prompts(engine: Engine, text: str, prefill_tokens: int, repeats: int, decode_depth: int = 0) -> Prompts:
    """Consecutive windows of ``text`` (in the engine's own tokenizer), a different one per run.

    Every run gets a prompt it has not seen: edgelm reuses the KV cache of a shared prompt prefix
    (as llama.cpp's server does), so repeating one prompt would time a 1-token prefill.
    ``decode_depth`` > 0 adds ``repeats`` prompts of that many tokens, for decoding after a long
    prompt (attention then reads the whole cache on every step, as in a long chat).
    """
    window = max(prefill_tokens, DECODE_PROMPT_TOKENS)
    needed = 2 * repeats * window + repeats * decode_depth + DECODE_PROMPT_TOKENS
    # ~4 characters per token in English; 8 leaves ample margin without tokenizing a whole book.
    ids = engine.tokenize(text[:needed * 8])
    if len(ids) < needed:
        raise ValueError(f"the benchmark text gives only {len(ids)} tokens; {needed} are needed")
    windows = [ids[i * window:(i + 1) * window] for i in range(2 * repeats)]
    after = 2 * repeats * window
    deep = [ids[after + i * decode_depth:after + (i + 1) * decode_depth]
            for i in range(repeats if decode_depth else 0)]
    return Prompts(prefill=[w[:prefill_tokens] for w in windows[:repeats]],
                   decode=[w[:DECODE_PROMPT_TOKENS] for w in windows[repeats:]],
                   warmup=ids[-DECODE_PROMPT_TOKENS:], deep=deep)


def measure(engine: Engine, prompts: Prompts, decode_tokens: int) -> dict:
    """Best-of-repeats prefill, decode and first-token figures (the machine is noisy)."""
    from ..runtime.governor import RaplReader, energy_report

    prefill = min((engine.run(ids, 1) for ids in prompts.prefill), key=lambda r: r.ttft_s)
    rapl = RaplReader()  # package energy over the decode runs, where the machine exposes it
    decode_runs = [engine.run(ids, decode_tokens) for ids in prompts.decode]
    joules = rapl.joules()
    decode = max(decode_runs, key=lambda r: r.decode_tok_s)
    energy = energy_report(rapl, joules, sum(r.generated_tokens for r in decode_runs))
    kv_bytes = getattr(getattr(engine, "model", None), "cache", None)
    deep = max((engine.run(ids, decode_tokens) for ids in prompts.deep), key=lambda r: r.decode_tok_s,
               default=None)
    return {
        "decode_depth": deep.prompt_tokens if deep else None,
        "deep_decode_tok_s": deep.decode_tok_s if deep else None,
        "joules_per_token": energy["joules_per_token"] if isinstance(energy, dict) else None,
        "energy": energy,
        "kv_bytes": kv_bytes.nbytes if kv_bytes is not None else None,
        "prefill_tokens": prefill.prompt_tokens,
        "prefill_tok_s": prefill.prompt_tokens / prefill.ttft_s,
        "decode_tokens": decode.generated_tokens,
        "decode_tok_s": decode.decode_tok_s,
        "ttft_s": min(r.ttft_s for r in decode_runs),
        "cpu_s_per_token": min(r.cpu_s / r.generated_tokens for r in decode_runs if r.generated_tokens),
        "decode_runs": [asdict(r) for r in decode_runs],
    }


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # Linux reports KiB


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=sorted(ENGINES), required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--ctx", type=int, required=True)
    p.add_argument("--text-file", type=Path, required=True)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-depth", type=int, default=0, help="also decode after a prompt this long (0: no)")
    p.add_argument("--launched-at", type=float, default=None,
                   help="time.time() of the parent just before it started this process")
    p.add_argument("--startup-only", action="store_true", help="measure start-up, then exit")
    p.add_argument("--kv-bits-k", type=int, default=16)
    p.add_argument("--kv-bits-v", type=int, default=16)
    p.add_argument("--kv-window", type=int, default=None)
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--kv-residual", type=int, default=None)  # None: edgelm's default (no edgelm import here)
    p.add_argument("--memory-budget", default=None)
    p.add_argument("--backend", default=None, help="edgelm's backend (default: edgelm's auto)")
    args = p.parse_args(argv)
    if args.decode_depth + args.decode_tokens > args.ctx:
        p.error(f"--decode-depth {args.decode_depth} plus --decode-tokens {args.decode_tokens} must fit in --ctx {args.ctx}")

    text = args.text_file.read_text(encoding="utf-8")
    t_load = time.perf_counter()
    kv = {"kv_bits_k": args.kv_bits_k, "kv_bits_v": args.kv_bits_v, "kv_window": args.kv_window,
          "n_sink": args.n_sink, "memory_budget": args.memory_budget}
    if args.kv_residual is not None:
        kv["kv_residual"] = args.kv_residual
    if args.backend is not None:
        if args.engine != "edgelm":
            p.error("--backend is edgelm's option")
        kv["backend"] = args.backend
    engine = ENGINES[args.engine](args.model, args.threads, args.ctx, **kv)
    load_s = time.perf_counter() - t_load
    runs = prompts(engine, text, args.prefill_tokens, args.repeats, args.decode_depth)
    # Start-up ends with the first token of a short prompt: for edgelm that includes compiling
    # (cold) or loading (warm) the numba kernels of both the multi-token and one-token paths.
    engine.run(runs.warmup, 2)
    launched_at = args.launched_at
    result = {
        "engine": engine.name,
        "version": engine.version,
        "threads": args.threads,
        **({"backend": engine.model.backend.name} if hasattr(engine, "model") else {}),
        "load_s": load_s,
        "startup_s": time.time() - launched_at if launched_at is not None else None,
    }
    if not args.startup_only:
        result.update(measure(engine, runs, args.decode_tokens))
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
