"""The MLX backend (runtime/mlx_backend): logits and greedy text against the numba backend on
real models, every KV cache kind, trimming, and its errors.

MLX's Linux CPU build is single-threaded reference code (about 1 GMAC/s here), so the real-model
comparisons run a subset of the issue's criteria by default -- ``EDGELM_MLX_POSITIONS`` wikitext
positions (default 256; half as many for the INT4/INT3 files) and ``EDGELM_MLX_GREEDY_TOKENS``
greedy tokens for each of the 5 prompts (default 16) -- to keep these tests within about two minutes. Greedy continuations are
compared with numba's float32 mode (see ``Pair``), for the default model and the INT4/INT3 files. The full criteria (2,048 positions,
64 tokens) are the same tests with ``EDGELM_MLX_POSITIONS=2048 EDGELM_MLX_GREEDY_TOKENS=64``;
their figures are in the README.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'edgelm[mlx]'; mlx[cpu] on Linux)")

import edgelm  # noqa: E402
from edgelm.models import model_args  # noqa: E402
from edgelm.runtime.errors import ContextOverflowError  # noqa: E402
from edgelm.runtime.gguf import GGUFFile  # noqa: E402
from edgelm.runtime.kv_cache import KVSpec, SlotKVCache  # noqa: E402
from edgelm.runtime.mlx_backend import MLXBackend  # noqa: E402
from edgelm.runtime.mlx_cache import MLXKVCache  # noqa: E402
from edgelm.runtime.numba_backend import NumbaBackend  # noqa: E402
from edgelm.runtime.tokenizer import Tokenizer  # noqa: E402
from reference_forward import ReferenceLlama, streaming_reference_logits  # noqa: E402
from tiny_models import TinyConfig, write_tiny_model  # noqa: E402
from vocab_factory import read_metadata  # noqa: E402

POSITIONS = int(os.environ.get("EDGELM_MLX_POSITIONS", "256"))
GREEDY_TOKENS = int(os.environ.get("EDGELM_MLX_GREEDY_TOKENS", "16"))
PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three laws of thermodynamics state that",
    "<|im_start|>user\nGive me three tips for sleeping well.<|im_end|>\n<|im_start|>assistant\n",
)


class Pair:
    """One GGUF file under both backends; numba with float32 activations (MLX, like llama.cpp's
    Metal backend, does not round activations to 8 bits, and any two engines that round them
    differently agree at only ~97% top-1 on this model: see the README)."""

    def __init__(self, path):
        self.gguf = GGUFFile(path)
        self.args = model_args(self.gguf.metadata, set(self.gguf.tensors), self.gguf.tensor)
        self.mlx = MLXBackend(self.gguf, self.args)
        self.numba = NumbaBackend(self.gguf, self.args, 2, activations="float32")
        self.tokenizer = Tokenizer.from_metadata(self.gguf.metadata)

    def close(self):
        self.numba.close()


@pytest.fixture(scope="module")
def default_pair(default_gguf):
    p = Pair(default_gguf)
    yield p
    p.close()


def wikitext_chunks(pair: Pair, text: str, positions: int, ctx: int = 512) -> list[list[int]]:
    """``positions`` tokens of the eval text in chunks of at most ``ctx``, each starting with BOS
    (as chunked perplexity evaluates them)."""
    ids = pair.tokenizer.encode(text[: positions * 8], add_special=False)
    bos = pair.tokenizer.encode("", add_special=True)
    chunks, at = [], 0
    while positions > 0:
        n = min(ctx, positions) - len(bos)
        chunks.append(bos + ids[at:at + n])
        at, positions = at + n, positions - n - len(bos)
    return chunks


def agreement(pair: Pair, chunks: list[list[int]]) -> tuple[float, float]:
    """(top-1 agreement, max |logit difference|) of MLX against numba's float32 logits."""
    same, total, worst = 0, 0, 0.0
    for ids in chunks:
        a = pair.mlx.forward(ids, pair.mlx.new_cache(len(ids)), logits_from=0)
        b = pair.numba.forward(ids, pair.numba.new_cache(len(ids)), logits_from=0)
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ids)
        worst = max(worst, float(np.abs(a - b).max()))
    return same / total, worst


def greedy(backend, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy continuation, evaluated as Model.generate does (prompt batch, then one token at a time)."""
    cache = backend.new_cache(len(prompt_ids) + n)
    if len(prompt_ids) > 1:
        backend.forward(prompt_ids[:-1], cache)
    logits = backend.forward(prompt_ids[-1:], cache)[0]
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = backend.forward(out[-1:], cache)[0]
    return out


# ---------------------------------------------------------------------------------------------
# the default model against numba


def test_default_model_logits_match_numba(default_pair, eval_text):
    top1, worst = agreement(default_pair, wikitext_chunks(default_pair, eval_text, POSITIONS))
    print(f"default model, {POSITIONS} positions: top-1 agreement {top1:.4f}, max |dlogit| {worst:.3f}")
    assert top1 >= 0.99


def float32_choices(backend, prompt_ids: list[int], continuation: list[int]) -> np.ndarray:
    """The greedy choice at every step of ``continuation``, teacher-forced, from one batched
    float32 pass."""
    ids = prompt_ids + continuation[:-1]
    logits = backend.forward(ids, backend.new_cache(len(ids)), logits_from=len(prompt_ids) - 1)
    return logits.argmax(-1)


def assert_greedy_identical(pair, prompts=PROMPTS) -> None:
    """For every prompt, MLX's greedy continuation, decoded token by token as generation does,
    is numba's (float32 mode, also token by token) -- and, teacher-forced in one batched numba
    pass, each of its tokens is that pass's choice too, so the text does not depend on how the
    tokens were batched."""
    for prompt in prompts:
        ids = pair.tokenizer.encode(prompt, add_special=True, parse_special=True)
        got = greedy(pair.mlx, ids, GREEDY_TOKENS)
        want = greedy(pair.numba, ids, GREEDY_TOKENS)
        assert got == want, (prompt, pair.tokenizer.decode(got), pair.tokenizer.decode(want))
        assert got == float32_choices(pair.numba, ids, got).tolist()


def test_default_model_greedy_matches_numba_float32(default_pair):
    """Greedy text identical to numba's float32 mode. (numba's default int8 activations
    reproduce llama.cpp's CPU backend instead; their continuations split from any float32 one at
    near-ties -- see the README's "MLX backend" section.)"""
    assert_greedy_identical(default_pair)


@pytest.mark.parametrize("bits", [4, 3])
def test_affine_models_match_numba(bits, affine_gguf, eval_text):
    pair = Pair(affine_gguf(bits, 64))
    try:
        assert {w.bits for lw in pair.mlx.weights.layers for w in (lw.q, lw.down)} == {bits}
        top1, worst = agreement(pair, wikitext_chunks(pair, eval_text, POSITIONS // 2))
        print(f"affine INT{bits}: top-1 agreement {top1:.4f}, max |dlogit| {worst:.3f}")
        assert top1 >= 0.99
        # two prompts in CI (MLX's CPU build decodes at ~5 tok/s); all five with the full criteria
        assert_greedy_identical(pair, PROMPTS if GREEDY_TOKENS >= 64 else PROMPTS[:2])
    finally:
        pair.close()


@pytest.fixture(scope="session")
def affine_gguf(default_gguf):
    from test_affine import write_affine_copy

    from edgelm.runtime.paths import edgelm_home

    def make(bits: int, group_size: int):
        out = edgelm_home() / "test-models" / f"smollm2-135m-instruct.affine-int{bits}-g{group_size}.v1.gguf"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(f".{os.getpid()}.tmp")
            try:
                write_affine_copy(default_gguf, tmp, bits, group_size)
                tmp.replace(out)
            finally:
                tmp.unlink(missing_ok=True)
        return out

    return make


# ---------------------------------------------------------------------------------------------
# tiny models: architectures against the float64 reference, cache kinds, trimming


TINY = {
    "llama-gqa-tied-f32": TinyConfig(),
    "qwen2-bias-untied-q8_0": TinyConfig(arch="qwen2", tied=False, wtype="Q8_0", rope_theta=1e6),
    "llama-int3-g32-mixed": TinyConfig(wtype="AFFINE", affine_bits=3, affine_group=32, tied=False,
                                       affine_bits_by_slot=(("ffn_down", 4), ("output", 4))),
}


@pytest.fixture(scope="module")
def tokenizer_meta(default_gguf):
    return read_metadata(default_gguf)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_meta):
    made = {}

    def get(name: str):
        if name not in made:
            path = write_tiny_model(tmp_path_factory.mktemp("mlx") / f"{name}.gguf", TINY[name], tokenizer_meta)
            g = GGUFFile(path)
            made[name] = (path, MLXBackend(g, model_args(g.metadata, set(g.tensors), g.tensor)))
        return made[name]

    return get


IDS = [int(t) for t in np.random.default_rng(1).integers(0, 49152, size=40)]


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_models_match_reference(name, tiny):
    path, backend = tiny(name)
    if TINY[name].arch == "llama":
        want = ReferenceLlama(path).logits(IDS)
    else:  # the float64 reference covers llama only: qwen2 against numba's float32 batched pass
        g = GGUFFile(path)
        numba = NumbaBackend(g, backend.args, 1, activations="float32")
        want = numba.forward(IDS, numba.new_cache(64), logits_from=0)
        numba.close()
    batch = backend.forward(IDS, backend.new_cache(64), logits_from=0)
    cache = backend.new_cache(64)
    steps = np.concatenate([backend.forward(IDS[:7], cache, logits_from=0)]
                           + [backend.forward([t], cache) for t in IDS[7:]])
    scale = np.abs(want).max()
    # float32 against float64; quantized products sum s * sum(q x) + b * sum(x), whose terms
    # cancel more than a dense product's
    tol = 1e-4 if TINY[name].wtype == "F32" else 1e-3
    for got in (batch, steps):
        err = np.abs(got - want).max()
        print(f"{name}: max |dlogit| {err:.2e} (logit scale {scale:.1f})")
        assert err < tol * scale, name


@pytest.mark.parametrize("bits_k,bits_v,tol", [(8, 8, 0.01), (4, 4, 0.1), (8, 4, 0.1), (16, 4, 0.1)])
def test_quantized_caches(bits_k, bits_v, tol, tiny):
    _, backend = tiny("llama-gqa-tied-f32")
    want = backend.forward(IDS, backend.new_cache(64), logits_from=0)
    cache = backend.new_cache(64, KVSpec(bits_k=bits_k, bits_v=bits_v))
    got = np.concatenate([backend.forward(IDS[:9], cache, logits_from=0)]
                         + [backend.forward([t], cache) for t in IDS[9:]])
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"KV {bits_k}/{bits_v}: max relative logit error {err:.2e}")
    assert err < tol
    a = backend.args
    groups = a.head_dim // 32  # an f16 scale and bias per 32 values
    per_head = {16: 2 * a.head_dim, 8: a.head_dim + 4 * groups, 4: a.head_dim // 2 + 4 * groups}
    assert cache.nbytes == len(IDS) * a.n_layers * a.n_kv_heads * (per_head[bits_k] + per_head[bits_v])
    assert cache.nbytes < backend.new_cache(64).bytes_per_token * len(IDS)


@pytest.mark.parametrize("window,n_sink", [(8, 4), (11, 2), (6, 0)])
def test_streaming_cache_matches_streamingllm_reference(window, n_sink, tiny):
    """Token by token through a window with sinks, past many evictions: the paper's definition
    (keys re-rotated to their index in the cache each step), in float64."""
    path, backend = tiny("llama-gqa-tied-f32")
    want = streaming_reference_logits(ReferenceLlama(path), IDS, window, n_sink)
    a, spec = backend.args, KVSpec(window=window, n_sink=n_sink)

    def small_ring() -> MLXKVCache:  # 5 spare ring slots (not 128): evictions start early
        return MLXKVCache(a.n_layers, a.n_kv_heads, a.head_dim, 8, spec, max_batch=5)

    cache = small_ring()
    got = np.stack([backend.forward([t], cache)[0] for t in IDS])
    assert cache.held == n_sink + window + 5 and cache.evicted == len(IDS) - cache.held
    # (keys and values are cached at 16 bits: float16 rounding against float64)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
    # batches into the same kind of cache give what one token at a time gives
    batch_cache = small_ring()
    batched = np.concatenate([backend.forward(IDS[i:i + 5], batch_cache, logits_from=0) for i in range(0, len(IDS), 5)])
    assert np.abs(batched - got).max() < 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("spec", [KVSpec(), KVSpec(window=16, n_sink=4)], ids=str)
def test_long_inputs_go_in_chunks(spec, tiny):
    """A pass takes at most 512 tokens (128 into a streaming cache); longer ones are split,
    and every logit row comes back in place."""
    _, backend = tiny("llama-gqa-tied-f32")
    ids = [int(t) for t in np.random.default_rng(2).integers(0, 49152, size=600)]
    whole = backend.forward(ids, backend.new_cache(600, spec), logits_from=540)  # rows from chunk 2 (or 5)
    cache = backend.new_cache(600, spec)
    for i in range(0, 500, 100):
        backend.forward(ids[i:i + 100], cache)
    tail = backend.forward(ids[500:], cache, logits_from=40)
    assert whole.shape == (60, backend.args.vocab_size)
    np.testing.assert_allclose(whole, tail, rtol=1e-4, atol=1e-4 * np.abs(tail).max())


@pytest.mark.parametrize("spec", [KVSpec(), KVSpec(bits_k=4, bits_v=8), KVSpec(window=10, n_sink=3),
                                  KVSpec(bits_k=8, bits_v=8, window=10, n_sink=3)], ids=str)
def test_trim_is_exact_and_counts_like_the_numba_cache(spec, tiny):
    _, backend = tiny("llama-gqa-tied-f32")
    a = backend.args
    cache = backend.new_cache(64, spec)
    twin = SlotKVCache(a.n_layers, a.n_kv_heads, a.head_dim, 64, spec, max_batch=128)
    for i in range(0, 30, 6):  # 5 batches of 6: past the window
        backend.forward(IDS[i:i + 6], cache)
        twin.reserve(6), twin.update(6)
    if not spec.quantized:  # (the numba cache caps trim by its 16-bit copies of recent tokens)
        assert cache.max_trim == twin.max_trim
    assert (cache.offset, cache.held, cache.evicted) == (twin.offset, twin.held, twin.evicted)
    n = min(cache.max_trim, 5)
    assert n >= 3
    ref = backend.forward(IDS[30:34], cache, logits_from=0)
    assert cache.trim(4 + n) == min(4 + n, cache.max_trim)
    dropped = 4 + n
    redo = IDS[34 - dropped:34]
    again = backend.forward(redo, cache, logits_from=0)[-4:]
    np.testing.assert_array_equal(again, ref)  # bit for bit: the cache holds what it held
    assert cache.offset == 34


@pytest.mark.parametrize("spec", [KVSpec(window=8, n_sink=2), KVSpec(window=5, n_sink=0), KVSpec(),
                                  KVSpec(bits_k=8, bits_v=4, window=40, n_sink=3)], ids=str)
def test_cache_bookkeeping_equals_slot_cache(spec):
    """Random reserve/update/trim sequences: the same counters, max_trim and slots as SlotKVCache."""
    rng = np.random.default_rng(3)
    ours = MLXKVCache(1, 1, 32, 400, spec, max_batch=4)
    twin = SlotKVCache(1, 1, 32, 400, spec, max_batch=4)
    for _ in range(300):
        if rng.random() < 0.3:
            n = min(int(rng.integers(0, 7)), twin.max_trim)  # (see below)
            assert ours.trim(n) == twin.trim(n)
        else:
            n = int(rng.integers(1, 5))
            assert ours.reserve(n) == twin.reserve(n)
            np.testing.assert_array_equal(ours._pending, twin.pending_slots)
            ours.update(n), twin.update(n)
        assert (ours.offset, ours.held, ours.evicted) == (twin.offset, twin.held, twin.evicted)
        if not spec.quantized:  # (SlotKVCache caps a quantized cache's max_trim at max_batch)
            assert ours.max_trim == twin.max_trim
        np.testing.assert_array_equal(ours.slot_pos, twin.slot_pos[:ours.slots])
    assert ours.evicted > 0 or spec.window is None


# ---------------------------------------------------------------------------------------------
# the public API, apps and errors


@pytest.fixture(scope="module")
def mlx_model(default_gguf):
    m = edgelm.load(str(default_gguf), n_ctx=256, backend="mlx")
    yield m
    m.close()


def test_load_chat_and_stats(mlx_model):
    assert mlx_model.backend.name == "mlx"
    text = "".join(mlx_model.chat([{"role": "user", "content": "Say hi."}], max_tokens=6, temperature=0.0))
    assert text and mlx_model.last_stats.generated_tokens > 0
    stats = mlx_model.memory_stats()
    assert stats["kv_tokens"] > 0 and stats["kv_bytes"] > 0 and stats["weights_bytes"] > 0
    # the next turn reuses the cached prefix (trim + append through the protocol)
    for _ in mlx_model.chat([{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0.0):
        pass
    assert mlx_model.last_stats.cached_tokens > 0


def test_bad_inputs(mlx_model):
    b = mlx_model.backend
    with pytest.raises(ValueError, match="outside the vocabulary"):
        b.forward([1, 10**6], b.new_cache(8))
    with pytest.raises(ValueError, match="logits_from"):
        b.forward([1, 2], b.new_cache(8), logits_from=3)
    with pytest.raises(ContextOverflowError):
        b.forward(list(range(9)), b.new_cache(8))
    with pytest.raises(TypeError, match="its own cache"):
        b.forward([1], SlotKVCache(1, 1, 64, 8))
    assert b.forward([], b.new_cache(8)).shape == (0, b.args.vocab_size)
    assert b.forward([1, 2], b.new_cache(8), logits_from=2).shape == (0, b.args.vocab_size)
    with pytest.raises(ValueError, match="at most 128"):
        b.new_cache(8, KVSpec(window=16)).reserve(129)


def test_skip_layers_is_a_cheaper_draft(mlx_model):
    b = mlx_model.backend
    ids = mlx_model.tokenize("The capital of France is")
    full = b.forward(ids, b.new_cache(32), logits_from=0)
    draft = b.forward(ids, b.new_cache(32), logits_from=0, skip_layers=frozenset(range(10, 20)))
    assert draft.shape == full.shape and not np.array_equal(draft, full)
    rows = b.forward_lazy(ids, b.new_cache(32))  # speculative verification's pass: every row
    assert all(np.array_equal(rows[j], full[j]) for j in range(len(ids)))


def test_cli_generate_with_mlx_backend(default_gguf, capsys):
    from edgelm.apps.cli import main

    assert main(["generate", "--backend", "mlx", "--model", str(default_gguf), "--ctx", "64",
                 "-n", "4", "--temperature", "0", "The capital of France is"]) == 0
    assert capsys.readouterr().out.strip()
