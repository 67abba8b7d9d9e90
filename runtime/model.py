"""The public Python API: ``load`` a GGUF model and generate text from it.

    model = edgelm.load("smollm2-135m-instruct")
    for piece in model.chat([{"role": "user", "content": "Hi!"}], max_tokens=64):
        print(piece, end="", flush=True)

A ``Model`` keeps one KV cache for generation and remembers which tokens it holds: a new
prompt that starts with the same tokens (the next turn of a chat, a retry) only evaluates
what is new.
"""
from __future__ import annotations

import ctypes
import gc
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import psutil

from ..kernels.kvquant import row_bytes
from ..models import ModelArgs, model_args
from ..models.registry import resolve
from .chat_template import ChatTemplate
from .errors import ContextOverflowError
from .generate import GenerationStats, generate_tokens
from .governor import plan_memory
from .kv_cache import DEFAULT_RESIDUAL, KVSpec, reuse_prefix
from .gguf import GGUFFile
from .numba_backend import NumbaBackend
from .sampling import Sampler, SamplingParams, stream_text
from .spec_calibrate import Calibration, calibrate, calibration_text, load_calibration, save_calibration
from .speculative import LookupOdds, PassCosts, SelfDrafter, Speculator, check_mode
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .backend import Backend
    from .chat import ChatSession


def release_free_memory() -> None:
    """Hand memory freed while loading (the tokenizer's build tables) back to the OS.

    glibc keeps freed heap pages resident until ``malloc_trim``; after a load they are several
    MB that the process would otherwise carry for its whole life. A no-op elsewhere.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass


def default_threads() -> int:
    """Physical cores: a second hyper-thread per core only adds contention to these kernels."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _kernels_cached() -> bool:
    """Whether the compiled forward pass is in numba's disk cache (else the first call compiles)."""
    from numba.core import config

    from ..kernels import forward

    base = Path(config.CACHE_DIR) if config.CACHE_DIR else Path(forward.__file__).parent / "__pycache__"
    return any(base.glob("**/forward.forward_worker*.nbi"))


class Model:
    """A loaded model: tokenizer, chat template, backend and a generation KV cache."""

    def __init__(self, path: Path, gguf: GGUFFile, args: ModelArgs, threads: int, n_ctx: int,
                 kv: KVSpec = KVSpec(), speculative: str = "auto", backend: "Backend | None" = None):
        self.path = path
        self.gguf = gguf
        self.args = args
        self.arch = args.arch
        self.name = str(gguf.metadata.get("general.name", path.stem))
        self.threads = threads
        self.n_ctx = n_ctx
        self.kv = kv
        self.n_vocab = args.vocab_size
        self.tokenizer = Tokenizer.from_metadata(gguf.metadata)
        self.template = ChatTemplate.from_metadata(gguf.metadata, self.tokenizer)
        self.backend = backend if backend is not None else NumbaBackend(gguf, args, threads)
        self.cache = self.backend.new_cache(n_ctx, kv)
        self._history: list[int] = []  # the tokens of the sequence self.cache holds, in order
        self.speculative = check_mode(speculative)
        self._calibration: Calibration | None = None
        self._calibration_read = False
        self._lookup_odds = LookupOdds()             # prompt lookup's acceptance, learned across calls
        self._pass_costs: PassCosts | None = None     # verification pass costs, learned likewise
        self.last_stats = GenerationStats()

    # ---- tokens ----
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_bos`` adds the model's BOS if it uses one;
        ``special`` parses special-token text such as ``<|im_start|>``."""
        return self.tokenizer.encode(text, add_special=add_bos, parse_special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 logits ``[len(ids), n_vocab]`` of ``ids`` evaluated in a fresh context (with
        the model's KV cache kind: a streaming one evaluates any length)."""
        ids = list(ids)
        if self.kv.window is None and len(ids) > self.n_ctx:
            raise ContextOverflowError(len(ids), self.n_ctx)
        return self.backend.forward(ids, self.backend.new_cache(max(len(ids), 1), self.kv), logits_from=0)

    # ---- generation ----
    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] | None = None,
                 speculative: str | None = None) -> Iterator[str]:
        """Stream the completion of ``prompt`` (text, or token ids) as text pieces.

        ``speculative`` ("off", "self", "lookup", "auto"; default: the model's, see ``load``)
        chooses how tokens are drafted and verified; the output is the same either way (greedy:
        token for token; sampling: in distribution).
        """
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, seed=seed)
        mode = self.speculative if speculative is None else check_mode(speculative)
        return self._complete(ids, params, max_tokens, stop or (), mode)

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> Iterator[str]:
        """Stream the assistant's reply to ``messages`` (``{"role", "content"}`` dicts)."""
        text = self.template.render(messages, add_generation_prompt=True)
        return self.generate(self.tokenize(text, add_bos=True, special=True), **kwargs)

    def chat_session(self, system: str | None = None) -> "ChatSession":
        """A conversation that keeps its history (and KV cache) across turns."""
        from .chat import ChatSession

        return ChatSession(self, system)

    def calibration(self, create: bool = False) -> Calibration | None:
        """The self-speculative drafter's skip set for this model file (``runtime.spec_calibrate``):
        cached on disk; with ``create``, searched now (about half a minute) when missing."""
        if self._calibration is None and not self._calibration_read:  # once: a miss hashes 2 MiB
            self._calibration = load_calibration(self.path)
            self._calibration_read = True
        if self._calibration is None and create:
            cal = calibrate(self.backend, lambda text: self.tokenize(text, add_bos=True), calibration_text())
            save_calibration(self.path, cal)
            self._calibration = cal
        return self._calibration

    def _speculator(self, mode: str, ids: list[int]) -> Speculator | None:
        if mode == "off":
            return None
        drafter, k = None, 4
        cal = self.calibration(create=mode == "self")
        if cal is not None and cal.skip and (mode == "self" or (mode == "auto" and cal.pays)):
            drafter, k = SelfDrafter(frozenset(cal.skip)), max(1, cal.draft_len)
        if self._pass_costs is None:  # what lookup learns is kept across this model's generations
            self._pass_costs = PassCosts(cal.verify_cost if cal is not None else None)
        return Speculator(mode, drafter, ids, self_draft=k, odds=self._lookup_odds, costs=self._pass_costs)

    def _complete(self, ids: list[int], params: SamplingParams, max_tokens: int,
                  stop: Sequence[str], speculative: str = "off") -> Iterator[str]:
        if not ids:
            raise ValueError("empty prompt: nothing to continue from")
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        params.validate()
        if self.kv.window is None and len(ids) > self.n_ctx:
            raise ContextOverflowError(len(ids), self.n_ctx)
        return self._stream(ids, params, max_tokens, stop, speculative)

    def _reuse_prefix(self, ids: list[int]) -> int:
        """Trim the cache to the longest prefix it shares with ``ids``; returns its length."""
        return reuse_prefix(self.cache, self._history, ids)

    def _stream(self, ids: list[int], params: SamplingParams, max_tokens: int,
                stop: Sequence[str], speculative: str = "off") -> Iterator[str]:
        stats = self.last_stats = GenerationStats(prompt_tokens=len(ids), _t0=time.perf_counter())
        cpu0 = time.process_time()
        stats.cached_tokens = self._reuse_prefix(ids)
        spec = self._speculator(speculative, ids)
        if spec is not None:
            spec.stats = stats.spec
        tokens = generate_tokens(self.backend, self.cache, ids[stats.cached_tokens:], self._history,
                                 Sampler(params, self.n_vocab), max_tokens, self.tokenizer.eog_ids, stats,
                                 spec)
        try:
            yield from stream_text(tokens, self.tokenizer.stream_decoder(), stop,
                                   lambda: setattr(stats, "finish_reason", "stop"))
        finally:
            tokens.close()
            stats.cpu_s = time.process_time() - cpu0

    # ---- resources ----
    def memory_stats(self) -> dict[str, int]:
        return {
            "rss_bytes": psutil.Process().memory_info().rss,
            "kv_bytes": self.cache.nbytes,
            "kv_tokens": self.cache.held,
            "kv_evicted": self.cache.evicted,
            "kv_bits": f"{self.kv.bits_k}/{self.kv.bits_v}" if self.kv.bits_k != self.kv.bits_v else self.kv.bits_k,
            "kv_window": self.kv.window,
            "n_sink": self.kv.n_sink,
            "weights_bytes": self.backend.weights_nbytes,
            "n_ctx": self.n_ctx,
            "tokens": self.cache.offset,
        }

    def close(self) -> None:
        self.backend.close()

    def __repr__(self) -> str:
        return f"Model({self.name!r}, arch={self.arch}, threads={self.threads}, n_ctx={self.n_ctx}, kv={self.kv})"


def load(model: str | os.PathLike = "smollm2-135m-instruct", threads: int | None = None,
         n_ctx: int | None = None, kv_bits: int = 16, kv_bits_k: int | None = None,
         kv_bits_v: int | None = None, kv_window: int | None = None, n_sink: int = 4,
         kv_residual: int = DEFAULT_RESIDUAL, memory_budget: int | str | None = None,
         kv_caches: int = 1, speculative: str = "auto", backend: str = "auto") -> Model:
    """Load a model by short name or GGUF path (pulling a known default on first use).

    ``kv_bits`` (16, 8 or 4) sets how keys and values are cached; ``kv_bits_k``/``kv_bits_v``
    override it for one of them. ``kv_window=N`` turns on StreamingLLM eviction: ``n_sink`` first
    tokens plus the ``N`` most recent are kept, and a conversation can go on past ``n_ctx``.
    A quantized cache keeps each token at 16 bits until its key group of 32 is complete and
    ``kv_residual`` tokens beyond (KIVI's full-precision residual).

    Before loading, the governor checks that weights, ``kv_caches`` full KV caches and the runtime
    fit in available memory (``InsufficientMemoryError`` otherwise); ``memory_budget`` (bytes or
    "1.5GB") makes it pick the largest KV cache kind, no larger than the one asked for, that fits.

    ``speculative`` is the default decoding mode of ``generate``/``chat`` (``runtime.speculative``):
    "auto" drafts by prompt lookup, and with skipped layers when the model's calibration (made
    once by a "self" run) predicts a speedup, and pauses drafting whenever it does not pay;
    "self" and "lookup" force one drafter; "off" decodes one token per pass.

    ``backend``: "numba" (the CPU kernels), "mlx" (MLX: Metal on Apple silicon, its CPU build
    elsewhere; needs ``pip install 'edgelm[mlx]'``) or "auto" (MLX on Apple silicon when mlx is
    installed, numba elsewhere).
    """
    from .mlx_backend import resolve_backend

    check_mode(speculative)
    backend = resolve_backend(backend)
    kv = KVSpec(bits_k=kv_bits if kv_bits_k is None else kv_bits_k,
                bits_v=kv_bits if kv_bits_v is None else kv_bits_v, window=kv_window, n_sink=n_sink,
                residual=kv_residual)
    path = resolve(model)
    gguf = GGUFFile(path)
    args = model_args(gguf.metadata, set(gguf.tensors), gguf.tensor)
    threads = threads or default_threads()
    n_ctx = int(n_ctx or min(args.context_length, 8192))
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be positive, got {n_ctx}")
    kv = plan_memory(path.stat().st_size, args.n_layers, args.n_kv_heads, args.head_dim, n_ctx, kv,
                     memory_budget, kv_caches).spec
    if backend == "numba" and not _kernels_cached():
        print("edgelm: compiling CPU kernels (first launch only, about a minute)...", file=sys.stderr, flush=True)
    if kv.bits_k != 16 or kv.bits_v != 16:
        row_bytes(min(kv.bits_k, kv.bits_v), args.head_dim)  # a quantized cache needs head_dim % 32 == 0
    engine = None
    if backend == "mlx":
        from .mlx_backend import MLXBackend

        engine = MLXBackend(gguf, args, threads)
    m = Model(path, gguf, args, threads, n_ctx, kv, speculative, backend=engine)
    m.backend.forward([0], m.backend.new_cache(1))  # compile (or load from the disk cache) now, not mid-reply
    release_free_memory()
    return m
