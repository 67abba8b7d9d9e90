"""The MLX backend: the ``Backend`` protocol on MLX (Metal on Apple silicon, its CPU build elsewhere).

Weights are converted once at load (``kernels/mlx_weights``: exact for Q4_0/Q4_1/Q8_0/Q5_x/
Q4_K/Q5_K and the converter's affine INT4/INT3, re-quantized for Q6_K/Q3_K), the forward pass
is ``kernels/mlx_forward``, and the KV cache ``runtime/mlx_cache``. Everything else -- tokenizer,
sampling, generation, apps -- is shared with the numba backend.
"""
from __future__ import annotations

import importlib.util
import mmap
import platform
from typing import Sequence

import numpy as np

from ..models.base import BIAS_SLOTS, ModelArgs, layer_tensor_name
from . import affine
from .errors import EdgeLMError, ModelFormatError
from .gguf import GGUFFile
from .backend import check_forward
from .kv_cache import KVCache, KVSpec
from .quants import GGMLType

MAX_BATCH = 128          # tokens per pass into a streaming cache (its ring's spare slots)
MAX_BATCH_UNBOUNDED = 512  # tokens per pass otherwise
INSTALL_HINT = "pip install 'edgelm[mlx]'  (on Linux this installs MLX's CPU build, mlx[cpu])"


class BackendUnavailableError(EdgeLMError, RuntimeError):
    """The requested backend cannot run here (its package is missing)."""


def mlx_available() -> bool:
    """Whether ``mlx.core`` can be imported."""
    if importlib.util.find_spec("mlx") is None:
        return False
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        return False
    return True


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def resolve_backend(name: str) -> str:
    """"numba" or "mlx" for ``name`` in ("auto", "numba", "mlx"): auto picks MLX on Apple silicon
    when mlx is importable, numba elsewhere; "mlx" without mlx raises BackendUnavailableError."""
    if name == "auto":
        return "mlx" if is_apple_silicon() and mlx_available() else "numba"
    if name == "mlx":
        if not mlx_available():
            raise BackendUnavailableError(f"the MLX backend needs the mlx package, which is not installed: {INSTALL_HINT}")
        return name
    if name == "numba":
        return name
    raise ValueError(f"unknown backend {name!r}; choose auto, numba or mlx")


def _arrays(obj) -> list:
    """Every MLX array held by a weights dataclass (for ``mx.eval``)."""
    import mlx.core as mx

    out = []
    for value in vars(obj).values():
        if isinstance(value, mx.array):
            out.append(value)
        elif hasattr(value, "__dict__"):
            out += _arrays(value)
    return out


class MLXBackend:
    """Evaluates a llama-family model with MLX (see the module docstring)."""

    name = "mlx"

    def __init__(self, gguf: GGUFFile, args: ModelArgs, threads: int | None = None):
        import mlx.core as mx

        from ..kernels.mlx_forward import LayerWeights, Rope, Weights

        self._mx = mx
        self.gguf, self.args = gguf, args
        self._affine_bits = affine.tensor_bits(gguf)
        a = args
        layers = []
        for l in range(a.n_layers):
            m = lambda slot, rows, cols: self._matrix(layer_tensor_name(l, slot), rows, cols)  # noqa: E731
            v = lambda slot, n, kind="weight": self._vector(layer_tensor_name(l, slot, kind), n)  # noqa: E731
            biases = ([v(s, n, "bias") for s, n in zip(BIAS_SLOTS, (a.q_dim, a.kv_dim, a.kv_dim))]
                      if a.qkv_bias else [None, None, None])
            layers.append(LayerWeights(
                attn_norm=v("attn_norm", a.dim), ffn_norm=v("ffn_norm", a.dim),
                q=m("attn_q", a.q_dim, a.dim), k=m("attn_k", a.kv_dim, a.dim), v=m("attn_v", a.kv_dim, a.dim),
                o=m("attn_output", a.dim, a.q_dim), gate=m("ffn_gate", a.hidden_dim, a.dim),
                up=m("ffn_up", a.hidden_dim, a.dim), down=m("ffn_down", a.dim, a.hidden_dim),
                bias_q=biases[0], bias_k=biases[1], bias_v=biases[2]))
            mx.eval(_arrays(layers[-1]))  # materialize layer by layer: one tensor's transient copy at a time
        embed = self._matrix("token_embd.weight", a.vocab_size, a.dim)
        output = embed if a.tied_output else self._matrix("output.weight", a.vocab_size, a.dim)
        self.weights = Weights(embed, output, self._vector("output_norm.weight", a.dim), layers)
        self.rope = Rope(args)
        self._release_file_pages()

    def _release_file_pages(self) -> None:
        """Drop the mapped file's pages from this process: the weights now live in MLX's
        memory, and holding both would count them twice (pages come back if read again)."""
        mm = getattr(self.gguf.buffer, "_mmap", None)
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except OSError:
                pass

    # ---- weights ----
    def _matrix(self, name: str, rows: int, cols: int):
        from ..kernels.mlx_weights import convert_affine, convert_blocks

        info = self.gguf.tensors.get(name)
        if info is None:
            raise ModelFormatError(f"{self.gguf.path.name}: missing tensor {name!r}")
        if affine.is_affine(self.gguf, name):
            t = affine.affine_tensor(self.gguf, name, self._affine_bits)
            if (t.rows, t.cols) != (rows, cols):
                raise ModelFormatError(f"{self.gguf.path.name}: affine tensor {name!r} is {t.rows} x {t.cols}, "
                                       f"expected {rows} x {cols}")
            s_name, b_name = affine.companions(name)
            words = self.gguf.tensor_bytes(name).view("<u4").reshape(rows, -1)
            scales = self.gguf.tensor_bytes(s_name).view("<f2").reshape(rows, -1)
            biases = self.gguf.tensor_bytes(b_name).view("<f2").reshape(rows, -1)
            return convert_affine(words, scales, biases, t.bits, t.group_size)
        if info.shape[0] != cols or info.n_rows != rows:
            raise ModelFormatError(
                f"{self.gguf.path.name}: tensor {name!r} has shape {tuple(info.shape)}, expected ({cols}, {rows})")
        try:
            return convert_blocks(self.gguf.tensor_bytes(name), info.ggml_type, rows, cols)
        except NotImplementedError:
            raise ModelFormatError(f"{self.gguf.path.name}: tensor {name!r} has type "
                                   f"{GGMLType(info.ggml_type).name}, which the MLX backend does not support") from None

    def _vector(self, name: str, length: int):
        if name not in self.gguf.tensors:
            raise ModelFormatError(f"{self.gguf.path.name}: missing tensor {name!r}")
        vec = np.ascontiguousarray(self.gguf.tensor(name), dtype=np.float32).reshape(-1)
        if vec.shape[0] != length:
            raise ModelFormatError(f"{self.gguf.path.name}: tensor {name!r} has {vec.shape[0]} values, expected {length}")
        return self._mx.array(vec)

    @property
    def weights_nbytes(self) -> int:
        """Bytes of the weights as MLX holds them (the converted form, not the file)."""
        return self.weights.nbytes

    # ---- evaluation ----
    def new_cache(self, n_ctx: int, spec: KVSpec = KVSpec()):
        from .mlx_cache import MLXKVCache

        a = self.args
        return MLXKVCache(a.n_layers, a.n_kv_heads, a.head_dim, n_ctx, spec, max_batch=MAX_BATCH)

    def forward(self, tokens: Sequence[int], cache: KVCache, logits_from: int | None = None,
                skip_layers: frozenset[int] | None = None) -> np.ndarray:
        """See ``Backend.forward``; ``skip_layers`` leaves those layers out (a self-speculative
        draft: their cache rows for these tokens are not written)."""
        from .mlx_cache import MLXKVCache

        toks, logits_from = check_forward(tokens, cache, logits_from, self.args.vocab_size)
        n = len(toks)
        if n == 0:
            return np.zeros((0, self.args.vocab_size), dtype=np.float32)
        if not isinstance(cache, MLXKVCache):
            raise TypeError(f"the mlx backend needs its own cache (new_cache()), got {type(cache).__name__}")
        skip = frozenset(skip_layers or ())
        step = MAX_BATCH if cache.spec.window is not None else MAX_BATCH_UNBOUNDED
        out = np.empty((n - logits_from, self.args.vocab_size), dtype=np.float32)
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            lf = min(max(logits_from - c0, 0), c1 - c0)
            start = max(c0, logits_from)
            logits = self._forward_chunk(toks[c0:c1], cache, lf, skip)
            out[start - logits_from:start - logits_from + logits.shape[0]] = logits
        return out

    def forward_lazy(self, tokens: Sequence[int], cache: KVCache) -> np.ndarray:
        """See ``Backend.forward_lazy``: MLX evaluates the whole graph at once, so every row."""
        return self.forward(tokens, cache, logits_from=0)

    def _forward_chunk(self, toks: np.ndarray, cache, logits_from: int, skip: frozenset[int]) -> np.ndarray:
        from ..kernels.mlx_forward import forward

        mx = self._mx
        n = len(toks)
        pos0 = cache.reserve(n)
        positions = np.arange(pos0, pos0 + n)
        logits = forward(self.weights, self.args, self.rope, mx.array(toks.astype(np.int32)), cache, pos0,
                         positions, logits_from, skip)
        state = [a for layer in (*cache.keys, *cache.values) for a in layer]
        mx.eval(*state, *([] if logits is None else [logits]))
        cache.update(n)
        if logits is None:
            return np.zeros((0, self.args.vocab_size), dtype=np.float32)
        return np.array(logits, copy=False)

    def close(self) -> None:
        pass
