"""The ``edgelm`` command: pull, generate, chat, perplexity, bench, serve, convert.

Every command that needs a model resolves ``--model`` (short name or GGUF path) first, pulling a
known model into the cache on first use, then loads it with :func:`edgelm.load`. Errors the user
can fix (unknown model, missing file, context overflow, bad sampling values) print one line to
stderr and exit with status 1; set ``EDGELM_DEBUG=1`` to get the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import edgelm

from ..models.registry import DEFAULT_MODEL, REGISTRY, pull, resolve
from ..runtime.errors import ContextOverflowError, EdgeLMError
from ..runtime.kv_cache import DEFAULT_RESIDUAL
from ..runtime.governor import POWER_MODES, choose_threads
from ..kernels.kvquant import KV_BITS
from ..runtime.perplexity import combine_segments, iter_perplexity, iter_streaming_perplexity
from ..runtime.sampling import SamplingParams
from ..runtime.speculative import SPECULATIVE_MODES
from . import bench, chat, serve
from . import convert as convert_cmd

if TYPE_CHECKING:
    from ..runtime.model import Model

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

# CLI flag destination -> keyword of Model.generate/chat. Only flags the user gave are passed, so
# the runtime stays the one owner of the defaults.
BACKENDS = ("auto", "numba", "mlx")
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "stop")


def model_arguments() -> argparse.ArgumentParser:
    """Parent parser of the flags every model-loading command takes."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"short name ({', '.join(sorted(REGISTRY))}) or GGUF path (default: %(default)s)")
    p.add_argument("--threads", "-t", type=int, default=None, help="compute threads (default: physical cores)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="numba (CPU kernels), mlx (pip install 'edgelm[mlx]'), or auto: mlx on Apple "
                        "silicon when installed, else numba (default: %(default)s)")
    g = p.add_argument_group("resource governor")
    g.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="e.g. 1.5GB or 800MiB: pick the KV bits and window that fit, refuse if none does")
    g.add_argument("--power", choices=POWER_MODES, default="auto",
                   help="efficiency uses half the cores; auto does so on battery (default: %(default)s)")
    g = p.add_argument_group("KV cache")
    g.add_argument("--kv-bits", type=int, choices=KV_BITS, default=16,
                   help="bits of cached keys and values (default: %(default)s)")
    g.add_argument("--kv-bits-k", type=int, choices=KV_BITS, help="bits of keys (default: --kv-bits)")
    g.add_argument("--kv-bits-v", type=int, choices=KV_BITS, help="bits of values (default: --kv-bits)")
    g.add_argument("--kv-window", type=int, default=None, metavar="N",
                   help="StreamingLLM: keep the N most recent tokens plus the sinks, evict older ones")
    g.add_argument("--n-sink", type=int, default=4, help="attention-sink tokens kept with --kv-window (default: %(default)s)")
    g.add_argument("--kv-residual", type=int, default=DEFAULT_RESIDUAL, metavar="N",
                   help="quantized cache: tokens kept at 16 bits after their key group of 32 fills (default: %(default)s)")
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--speculative", choices=SPECULATIVE_MODES, nargs="?", const="auto", default=None,
                   help="draft tokens and verify them in one pass: self (the model with layers skipped), "
                        "lookup (n-grams of the prompt), auto (either, only where it pays), off "
                        "(default: auto; `bench --speculative [MODE]` benchmarks it against off)")
    return p


def kv_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The KV cache keywords of ``edgelm.load`` from the flags of :func:`model_arguments`."""
    return {"kv_bits": args.kv_bits, "kv_bits_k": args.kv_bits_k, "kv_bits_v": args.kv_bits_v,
            "kv_window": args.kv_window, "n_sink": args.n_sink, "kv_residual": args.kv_residual}


def sampling_arguments() -> argparse.ArgumentParser:
    """Parent parser of the sampling (and context size) flags shared by ``generate`` and ``chat``."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampling (defaults: the runtime's)")
    g.add_argument("--max-tokens", "-n", type=int, help="maximum tokens to generate")
    g.add_argument("--temperature", "--temp", type=float, help="0 means greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repeat-penalty", type=float)
    g.add_argument("--seed", type=int, help="seed of the sampler, for reproducible output")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ctx", type=int, default=None, help="context size in tokens (default: the runtime's)")
    return p


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling keywords the user set, ready for ``Model.generate``/``ChatSession.send``.

    They are validated here, so that a bad value fails at once rather than after loading the model.
    """
    kwargs = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    SamplingParams(**{k: v for k, v in kwargs.items() if k not in ("max_tokens", "stop")})  # raises ValueError
    if kwargs.get("max_tokens", 0) < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {kwargs['max_tokens']}")
    return kwargs


def load_model(args: argparse.Namespace, n_ctx: int | None = None, kv_caches: int = 1) -> "Model":
    """Resolve ``--model`` (pulling a known name on first use) and load it within the governor's
    limits (``--memory-budget``, ``--power``)."""
    path = resolve(args.model)
    threads = choose_threads(args.threads, args.power).threads
    return edgelm.load(path, threads=threads, n_ctx=n_ctx, memory_budget=args.memory_budget,
                       kv_caches=kv_caches, speculative=args.speculative or "auto", backend=args.backend,
                       **kv_kwargs(args))


def cmd_pull(args: argparse.Namespace) -> int:
    """``edgelm pull``: fetch (or verify the cached copy of) a known model; print its path."""
    print(pull(args.name))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """``edgelm generate``: stream the completion of the prompt to stdout."""
    sampling = sampling_kwargs(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = load_model(args, n_ctx=args.ctx)
    out = sys.stdout
    for piece in model.generate(prompt, **sampling):
        out.write(piece)
        out.flush()  # stream: the user sees every piece as soon as it is decoded
    out.write("\n")
    out.flush()
    if args.stats:
        print(chat.format_generation_stats(model.last_stats), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """``edgelm chat``: the REPL of :mod:`edgelm.apps.chat`."""
    sampling = sampling_kwargs(args)
    model = load_model(args, n_ctx=args.ctx)
    return chat.run_chat(model, system=args.system, sampling=sampling)


def cmd_perplexity(args: argparse.Namespace) -> int:
    """``edgelm perplexity``: llama.cpp's chunked perplexity of a text file (or --streaming)."""
    text = Path(args.file).read_text(encoding="utf-8")
    if args.streaming:
        return streaming_perplexity(args, text)
    model = load_model(args, n_ctx=args.ctx)
    tokens = model.tokenize(text, add_bos=True)
    bos_id = model_bos_id(model)
    # Like llama-perplexity: running values on one line, the final estimate after it. With --json
    # stdout carries only the JSON document, so the progress goes to stderr.
    progress = sys.stderr if args.json else sys.stdout
    print(f"perplexity: {len(tokens)} tokens, context {args.ctx}, "
          f"{'all' if args.chunks <= 0 else args.chunks} chunks", file=sys.stderr)
    result = None
    for result in iter_perplexity(model.logits, tokens, args.ctx, args.chunks, bos_id):
        progress.write(f"[{result.chunks}]{result.ppl:.4f},")
        progress.flush()
    assert result is not None
    progress.write("\n")
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_err:.5f}")
        print(f"({result.tokens_scored} tokens scored in {result.seconds:.1f} s)", file=sys.stderr)
    return 0


EARLY_RSS_TOKENS = 2000


def streaming_perplexity(args: argparse.Namespace, text: str) -> int:
    """``edgelm perplexity --streaming``: one pass over the text (repeated up to --max-tokens)
    through the model's KV cache, perplexity per --segment tokens."""
    import psutil

    from ..runtime.model import release_free_memory

    model = load_model(args)
    tokens = model.tokenize(text, add_bos=True)
    if args.max_tokens:
        body = tokens[1:] if tokens[:1] == model.tokenize("", add_bos=True) else tokens
        while len(tokens) < args.max_tokens:
            tokens = tokens + body
        tokens = tokens[:args.max_tokens]
    if model.kv.window is None and len(tokens) > model.n_ctx:
        raise ContextOverflowError(len(tokens), model.n_ctx)  # (a --kv-window streams past it)
    cache = model.backend.new_cache(model.n_ctx, model.kv)
    process = psutil.Process()
    progress = sys.stderr if args.json else sys.stdout
    print(f"streaming perplexity: {len(tokens)} tokens, KV {model.kv}", file=sys.stderr)
    segments, early_rss = [], []

    def rss_mb() -> float:
        # Memory in use, not allocator slack: freed activation/logit buffers stay in glibc's heap
        # (tens of MB, going up and down with batch sizes) until trimmed.
        release_free_memory()
        return process.memory_info().rss / 2**20

    def feed(ids: list[int]):
        if not early_rss and cache.offset >= EARLY_RSS_TOKENS:  # the baseline of "RSS stays flat"
            early_rss.append(rss_mb())  # (between batches, like the per-segment samples)
        return model.backend.forward(ids, cache, logits_from=0)

    for seg in iter_streaming_perplexity(feed, tokens, args.segment,
                                         rss_fn=rss_mb):
        segments.append(seg)
        progress.write(f"[{seg.start}] ppl {seg.ppl:.4f}, {seg.tok_s:.0f} tok/s ({seg.cpu_tok_s:.0f} per "
                       f"CPU-s), RSS {seg.rss_mb:.1f} MB, {cache.evicted} evicted\n")
        progress.flush()
    result = {"ppl": combine_segments(segments), "tokens": len(tokens), "evicted": cache.evicted,
              "kv": {"bits_k": model.kv.bits_k, "bits_v": model.kv.bits_v, "window": model.kv.window,
                     "n_sink": model.kv.n_sink, "cache_bytes": cache.nbytes},
              "segments": [{"start": s.start, "ppl": s.ppl} for s in segments],
              "rss_mb": [s.rss_mb for s in segments], "tok_s": [s.tok_s for s in segments],
              "cpu_tok_s": [s.cpu_tok_s for s in segments],
              f"rss_mb_after_{EARLY_RSS_TOKENS}": early_rss[0] if early_rss else None}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"Final estimate: PPL = {result['ppl']:.4f} over {len(tokens)} tokens, {cache.evicted} evicted")
    return 0


def model_bos_id(model: "Model") -> int | None:
    """The BOS id if the model adds BOS to a prompt (then every perplexity chunk starts with it)."""
    # Tokenizing the empty string with add_bos=True yields exactly what the model prepends.
    prefix = model.tokenize("", add_bos=True)
    return prefix[0] if prefix else None


def build_parser() -> argparse.ArgumentParser:
    """The ``edgelm`` argument parser; each subcommand sets ``handler``."""
    parser = argparse.ArgumentParser(prog="edgelm", description="On-device LLM inference (GGUF models on CPUs).")
    parser.add_argument("--version", action="version", version=f"edgelm {edgelm.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common, sampling = model_arguments(), sampling_arguments()

    p = sub.add_parser("pull", help="download a known model into the cache and print its path")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL, help="model name (default: %(default)s)")
    p.set_defaults(handler=cmd_pull)

    p = sub.add_parser("generate", parents=[common, sampling], help="stream a completion of a prompt")
    p.add_argument("prompt", help='prompt text ("-" reads it from stdin)')
    p.add_argument("--stats", action="store_true", help="print timings to stderr afterwards")
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("chat", parents=[common, sampling], help="interactive chat (/reset, /stats, /quit)")
    p.add_argument("--system", help="system prompt")
    p.set_defaults(handler=cmd_chat)

    p = sub.add_parser("perplexity", parents=[common], help="perplexity of a text file (llama.cpp's method)")
    p.add_argument("--file", "-f", required=True, help="UTF-8 text file")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default: %(default)s)")
    p.add_argument("--chunks", type=int, default=-1, help="chunks to evaluate (default: all)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--streaming", action="store_true",
                   help="one pass through the KV cache (use --kv-window) instead of chunks")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="--streaming: tokens to evaluate (the text is repeated to reach them)")
    p.add_argument("--segment", type=int, default=10000, help="--streaming: tokens per reported segment")
    p.set_defaults(handler=cmd_perplexity)

    p = sub.add_parser("bench", parents=[common], help="speed and memory, side by side with llama.cpp")
    bench.add_arguments(p)
    p.set_defaults(handler=bench.cmd_bench)

    p = sub.add_parser("serve", parents=[common], help="OpenAI-compatible HTTP server (see docs/serve.md)")
    serve.add_arguments(p)
    p.set_defaults(handler=serve.cmd_serve)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint folder to GGUF")
    convert_cmd.add_arguments(p)
    p.set_defaults(handler=convert_cmd.cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgelm`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``edgelm generate ... | head``): not an error worth a message.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except (EdgeLMError, ValueError, OSError, RuntimeError) as exc:
        # ValueError covers ModelNotFound and ContextOverflowError; OSError a missing --file;
        # RuntimeError a failed pull. All are the user's to fix, so no traceback.
        if os.environ.get("EDGELM_DEBUG"):
            raise
        print(f"edgelm: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
