"""``edgelm bench``: edgelm and llama-cpp-python side by side on the same GGUF and thread count.

Each engine is launched twice, each time in a fresh process (``apps/bench_worker.py``) whose numba
kernel cache is a new empty directory shared by both launches:

1. the *cold* launch compiles every kernel (empty cache) and only measures start-up;
2. the *warm* launch loads the kernels from that cache, measures start-up again, then prefill
   (a ``--prefill-tokens`` prompt from the eval text), greedy decode (``--decode-tokens`` after a
   short prompt, and after a ``--decode-depth`` one), time to first token, CPU-seconds per
   generated token and peak RSS, taking the best of ``--repeats`` runs of every timed section.

llama.cpp has no JIT, so its two launches differ only by noise; they are measured the same way so
that the columns mean the same thing. The OS page cache holds the model file in both cases.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..models.registry import resolve
from ..runtime.kv_cache import DEFAULT_RESIDUAL

MIB = 1024 * 1024
# The held-out WikiText-2 text shipped with the repository (see /work/shared/data/README.md).
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-eval.txt"
ENGINES = ("edgelm", "llama.cpp")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")
BUSY_LOAD = 0.5  # load average per benchmark thread above which we warn that figures are skewed


@dataclass(frozen=True)
class BenchConfig:
    """What every worker is asked to run."""

    model: Path
    threads: int
    ctx: int = 1024
    text_file: Path = DEFAULT_TEXT
    prefill_tokens: int = 512
    decode_tokens: int = 128
    decode_depth: int = 512  # also decode after a prompt this long (0: no)
    repeats: int = 3
    kv_bits_k: int = 16  # edgelm's KV cache (llama.cpp keeps its default f16 cache)
    kv_bits_v: int = 16
    kv_window: int | None = None
    n_sink: int = 4
    kv_residual: int = DEFAULT_RESIDUAL
    memory_budget: str | None = None  # edgelm's governor (--memory-budget)
    backend: str = "auto"  # edgelm's backend (--backend)

    def __post_init__(self) -> None:
        if self.decode_depth < 0 or self.decode_depth + self.decode_tokens > self.ctx:
            raise ValueError(f"--decode-depth {self.decode_depth} plus --decode-tokens {self.decode_tokens} "
                             f"must fit in --ctx {self.ctx}")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    scale: float = 1.0  # divide the raw value by this for display
    fmt: str = "{:.2f}"


METRICS = (
    Metric("prefill_tok_s", "prefill tok/s", True, fmt="{:.1f}"),
    Metric("decode_tok_s", "decode tok/s", True, fmt="{:.1f}"),
    Metric("deep_decode_tok_s", "decode tok/s, long prompt", True, fmt="{:.1f}"),
    Metric("ttft_s", "time to first token (s)", False, fmt="{:.3f}"),
    Metric("cold_start_s", "cold start (s)", False),
    Metric("warm_start_s", "warm start (s)", False),
    Metric("peak_rss_bytes", "peak RSS (MiB)", False, scale=MIB, fmt="{:.1f}"),
    Metric("cpu_s_per_token", "CPU s / generated token", False, fmt="{:.4f}"),
    Metric("kv_bytes", "KV cache after decode (MiB)", False, scale=MIB, fmt="{:.2f}"),
    Metric("joules_per_token", "energy J / generated token", False, fmt="{:.4f}"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` flags (``--model`` and ``--threads`` come from the CLI's common parent)."""
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--no-llama-cpp", action="store_true", help="benchmark edgelm only")
    p.add_argument("--ctx", type=int, default=BenchConfig.ctx, help="context size (default: %(default)s)")
    p.add_argument("--text-file", type=Path, default=DEFAULT_TEXT, help="text the prompts are cut from")
    p.add_argument("--prefill-tokens", type=int, default=BenchConfig.prefill_tokens)
    p.add_argument("--decode-tokens", type=int, default=BenchConfig.decode_tokens)
    p.add_argument("--decode-depth", type=int, default=BenchConfig.decode_depth,
                   help="also time decoding after a prompt of this many tokens (default: %(default)s; 0: no)")
    p.add_argument("--repeats", type=int, default=BenchConfig.repeats, help="best of N (default: %(default)s)")


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def run_worker(engine: str, config: BenchConfig, numba_cache: Path, startup_only: bool = False) -> dict:
    """Run one engine in a fresh process with ``NUMBA_CACHE_DIR=numba_cache``; its JSON result."""
    cmd = [sys.executable, "-m", "edgelm.apps.bench_worker", "--engine", engine,
           "--model", str(config.model), "--threads", str(config.threads), "--ctx", str(config.ctx),
           "--text-file", str(config.text_file), "--prefill-tokens", str(config.prefill_tokens),
           "--decode-tokens", str(config.decode_tokens), "--decode-depth", str(config.decode_depth),
           "--repeats", str(config.repeats),
           "--kv-bits-k", str(config.kv_bits_k), "--kv-bits-v", str(config.kv_bits_v),
           "--n-sink", str(config.n_sink), "--kv-residual", str(config.kv_residual)]
    if config.kv_window is not None:
        cmd += ["--kv-window", str(config.kv_window)]
    if config.memory_budget is not None:
        cmd += ["--memory-budget", str(config.memory_budget)]
    if engine == "edgelm" and config.backend != "auto":
        cmd += ["--backend", config.backend]
    if startup_only:
        cmd.append("--startup-only")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(numba_cache)}
    launched_at = time.time()
    proc = subprocess.run([*cmd, "--launched-at", repr(launched_at)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} benchmark worker failed: {_error_line(proc.stderr)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _error_line(stderr: str) -> str:
    """The exception line of a traceback (numba appends context lines after it), else the last line."""
    lines = stderr.strip().splitlines() or ["(no output)"]
    errors = [line for line in lines if _EXCEPTION_LINE.match(line)]
    return (errors or lines)[-1]


def bench_engine(engine: str, config: BenchConfig) -> dict:
    """Cold launch (start-up only) then warm launch (everything) of one engine; merged figures."""
    with tempfile.TemporaryDirectory(prefix="edgelm-bench-kernels-") as cache:
        cold = run_worker(engine, config, Path(cache), startup_only=True)
        warm = run_worker(engine, config, Path(cache))
    warm["cold_start_s"] = cold["startup_s"]
    warm["warm_start_s"] = warm.pop("startup_s")
    return warm


def ratios(ours: dict, theirs: dict) -> dict[str, float | None]:
    """ours/theirs for every metric both engines reported (None where theirs is zero)."""
    out: dict[str, float | None] = {}
    for m in METRICS:
        a, b = ours.get(m.key), theirs.get(m.key)
        if a is not None and b is not None:
            out[m.key] = a / b if b else None
    return out


def format_table(results: dict[str, dict], ratio: dict[str, float | None] | None) -> str:
    """The side-by-side table printed on stdout."""
    engines = [e for e in ENGINES if e in results]
    header = ["metric", *engines] + (["ours/theirs", "better"] if ratio is not None else [])
    rows = [header]
    for m in METRICS:
        row = [m.label]
        for e in engines:
            value = results[e].get(m.key)
            row.append("-" if value is None else m.fmt.format(value / m.scale))
        if ratio is not None:
            r = ratio.get(m.key)
            row += ["-" if r is None else f"{r:.2f}", "higher" if m.higher_is_better else "lower"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join(lines)


def describe(config: BenchConfig, results: dict[str, dict]) -> str:
    """The lines above the table: what was run."""
    versions = ", ".join(f"{e} {results[e]['version']}" for e in ENGINES if e in results)
    decode = results["edgelm"].get("decode_tokens", config.decode_tokens)
    energy = results["edgelm"].get("energy")
    energy = energy if isinstance(energy, str) else f"RAPL, {energy['counter']}" if energy else "not measured"
    backend = results["edgelm"].get("backend")
    versions += f" ({backend} backend)" if backend else ""
    deep = f" (and after a {config.decode_depth}-token one)" if config.decode_depth else ""
    return (f"model {config.model.name}, {config.threads} threads, ctx {config.ctx}; {versions}\n"
            f"prefill {config.prefill_tokens} tokens, decode {decode} tokens greedy after a "
            f"short prompt{deep}, best of {config.repeats}; energy: {energy}")


def run_bench(config: BenchConfig, with_llama_cpp: bool) -> dict:
    """Benchmark edgelm (and llama.cpp if asked and installed); the JSON document ``--json`` prints."""
    load = os.getloadavg()[0]  # other work on the machine skews every figure, llama.cpp's most
    results = {"edgelm": bench_engine("edgelm", config)}
    note = None
    if with_llama_cpp:
        if llama_cpp_available():
            results["llama.cpp"] = bench_engine("llama.cpp", config)
        else:
            note = "llama-cpp-python is not installed: no comparison (pip install llama-cpp-python)"
    ratio = ratios(results["edgelm"], results["llama.cpp"]) if "llama.cpp" in results else None
    return {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(config).items()},
            "load_average": load, "results": results, "ratios": ratio, "note": note}


def cmd_bench(args: argparse.Namespace) -> int:
    """Handler of ``edgelm bench``."""
    if not args.text_file.is_file():
        raise FileNotFoundError(f"benchmark text {args.text_file} not found; pass --text-file")
    from ..runtime.governor import choose_threads  # edgelm's own default (and --power), for both engines

    if args.speculative is not None:  # speculative against plain decoding, in this process
        from . import bench_spec
        from .cli import load_model

        return bench_spec.cmd_bench_speculative(load_model(args, n_ctx=args.ctx), args)

    config = BenchConfig(model=resolve(args.model), threads=choose_threads(args.threads, args.power).threads,
                         ctx=args.ctx, text_file=args.text_file, prefill_tokens=args.prefill_tokens,
                         decode_tokens=args.decode_tokens, decode_depth=args.decode_depth, repeats=args.repeats,
                         kv_bits_k=args.kv_bits_k or args.kv_bits, kv_bits_v=args.kv_bits_v or args.kv_bits,
                         kv_window=args.kv_window, n_sink=args.n_sink, kv_residual=args.kv_residual,
                         memory_budget=args.memory_budget, backend=args.backend)
    report = run_bench(config, with_llama_cpp=not args.no_llama_cpp)
    if report["note"]:
        print(f"note: {report['note']}", file=sys.stderr)
    if report["load_average"] > BUSY_LOAD * config.threads:
        print(f"warning: the machine was busy (load average {report['load_average']:.1f} on "
              f"{os.cpu_count()} CPUs): the figures are unreliable", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(describe(config, report["results"]))
        print(format_table(report["results"], report["ratios"]))
    return 0
