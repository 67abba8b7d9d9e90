"""The CPU backend: numba kernels running directly on the memory-mapped GGUF blocks."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..kernels.forward import (
    C_BIAS, C_DIM, C_FLOAT_ACT, C_HEAD_DIM, C_HEADS, C_HIDDEN, C_KV_HEADS, C_LAYERS, C_NEOX, C_ROPE_DIM,
    C_VOCAB,
    forward_worker,
    head_worker,
)
from ..kernels.attention import QUERY_BLOCK, V_PARTS, padded_slots
from ..kernels.ggml_math import rope_table
from ..kernels.qdispatch import AFFINE_Q3, AFFINE_Q4, SUPPORTED_TYPES, W_FIELDS
from ..kernels.threads import ThreadTeam
from ..models.base import BIAS_SLOTS, ModelArgs, layer_tensor_name
from . import affine
from .errors import ModelFormatError
from .gguf import GGUFFile
from .backend import check_forward
from .kv_cache import KVCache, KVSpec, SlotKVCache
from .quants import GGMLType

# Projections in the order of kernels.forward's S_* slots, with (rows, cols) as functions of args.
_PROJECTIONS = (
    ("attn_q", lambda a: (a.q_dim, a.dim)),
    ("attn_k", lambda a: (a.kv_dim, a.dim)),
    ("attn_v", lambda a: (a.kv_dim, a.dim)),
    ("attn_output", lambda a: (a.dim, a.q_dim)),
    ("ffn_gate", lambda a: (a.hidden_dim, a.dim)),
    ("ffn_up", lambda a: (a.hidden_dim, a.dim)),
    ("ffn_down", lambda a: (a.dim, a.hidden_dim)),
)
MAX_BATCH = 128  # tokens per forward call; longer prompts are evaluated in chunks


def rope_tables(positions: np.ndarray, args: ModelArgs) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [n, rope_dim // 2] for the given positions, computed the way ggml does
    (``ggml_math.rope_table``): the same float32 angles and libm's cosf/sinf, so rotations are
    bit-identical to llama.cpp's at every position."""
    half = args.rope_dim // 2
    theta_scale = np.float32(args.rope_theta) ** (np.float32(-2.0) / np.float32(args.rope_dim))
    factors = np.ones(half, np.float32) if args.rope_freq_factors is None else \
        np.ascontiguousarray(np.asarray(args.rope_freq_factors, dtype=np.float32)[:half])
    cos = np.empty((len(positions), half), dtype=np.float32)
    sin = np.empty_like(cos)
    rope_table(np.asarray(positions, dtype=np.int64), np.float32(theta_scale), factors, cos, sin)
    return cos, sin


class NumbaBackend:
    """Evaluates a llama-family model with the compiled forward pass of ``kernels.forward``."""

    name = "numba"

    def __init__(self, gguf: GGUFFile, args: ModelArgs, threads: int, activations: str = "int8"):
        """``activations``: "int8" (default) rounds the inputs of the block-format products to 8 bits
        per 32 as llama.cpp's CPU backend does -- logits equal llama.cpp's bit for bit; "float32"
        multiplies them unrounded (exact weights, float32 sums: closer to exact arithmetic,
        perplexity 25.22 vs 25.40 on the default model, and slower), the reference the MLX
        backend is held to."""
        if activations not in ("int8", "float32"):
            raise ValueError(f"activations must be 'int8' or 'float32', got {activations!r}")
        self.gguf = gguf
        self.args = args
        self.team = ThreadTeam(threads)
        self._blob = np.asarray(gguf.buffer).view(np.uint8)
        self._affine_bits = affine.tensor_bits(gguf)
        self._wtab = np.stack([
            np.stack([self._table_row(layer_tensor_name(l, slot), *shape(args)) for slot, shape in _PROJECTIONS])
            for l in range(args.n_layers)
        ])
        emb = self._table_row("token_embd.weight", args.vocab_size, args.dim)
        out = emb if args.tied_output else self._table_row("output.weight", args.vocab_size, args.dim)
        self._gtab = np.stack([emb, out])
        self._norms = np.stack([
            np.stack([self._vector(layer_tensor_name(l, "attn_norm"), args.dim),
                      self._vector(layer_tensor_name(l, "ffn_norm"), args.dim)])
            for l in range(args.n_layers)
        ])
        self._out_norm = self._vector("output_norm.weight", args.dim)
        bias_len = args.q_dim + 2 * args.kv_dim
        if args.qkv_bias:
            self._bias = np.stack([
                np.concatenate([self._vector(layer_tensor_name(l, s, "bias"), n)
                                for s, n in zip(BIAS_SLOTS, (args.q_dim, args.kv_dim, args.kv_dim))])
                for l in range(args.n_layers)
            ])
        else:
            self._bias = np.zeros((args.n_layers, bias_len), dtype=np.float32)
        self._icfg = np.zeros(11, dtype=np.int64)
        for key, value in ((C_DIM, args.dim), (C_LAYERS, args.n_layers), (C_HEADS, args.n_heads),
                           (C_KV_HEADS, args.n_kv_heads), (C_HEAD_DIM, args.head_dim),
                           (C_HIDDEN, args.hidden_dim), (C_VOCAB, args.vocab_size),
                           (C_ROPE_DIM, args.rope_dim), (C_NEOX, int(args.rope_neox)),
                           (C_BIAS, int(args.qkv_bias)), (C_FLOAT_ACT, int(activations == "float32"))):
            self._icfg[key] = value
        self._eps = np.float32(args.rms_eps)
        self._buffers: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}
        self._skip_masks: dict[frozenset[int], np.ndarray] = {}

    # ---- weights ----
    def _table_row(self, name: str, rows: int, cols: int) -> np.ndarray:
        """The weight-table row (qdispatch's W_* columns) of tensor ``name``, checked."""
        info = self.gguf.tensors.get(name)
        if info is None:
            raise ModelFormatError(f"{self.gguf.path.name}: missing tensor {name!r}")
        if affine.is_affine(self.gguf, name):
            t = affine.affine_tensor(self.gguf, name, self._affine_bits)
            if (t.rows, t.cols) != (rows, cols):
                raise ModelFormatError(f"{self.gguf.path.name}: affine tensor {name!r} is {t.rows} x {t.cols}, "
                                       f"expected {rows} x {cols}")
            code = AFFINE_Q4 if t.bits == 4 else AFFINE_Q3
            return np.array([t.offset, t.nbytes, code, rows, cols, t.scales_offset, t.biases_offset,
                             t.group_size], dtype=np.int64)
        if info.shape[0] != cols or info.n_rows != rows:
            raise ModelFormatError(
                f"{self.gguf.path.name}: tensor {name!r} has shape {tuple(info.shape)}, expected ({cols}, {rows})")
        if int(info.ggml_type) not in SUPPORTED_TYPES:
            raise ModelFormatError(
                f"{self.gguf.path.name}: tensor {name!r} has type {GGMLType(info.ggml_type).name}, "
                f"which the CPU kernels do not support")
        row = np.zeros(W_FIELDS, dtype=np.int64)
        row[:5] = (info.offset, info.nbytes, int(info.ggml_type), rows, cols)
        return row

    def _vector(self, name: str, length: int) -> np.ndarray:
        if name not in self.gguf.tensors:
            raise ModelFormatError(f"{self.gguf.path.name}: missing tensor {name!r}")
        vec = np.ascontiguousarray(self.gguf.tensor(name), dtype=np.float32).reshape(-1)
        if vec.shape[0] != length:
            raise ModelFormatError(f"{self.gguf.path.name}: tensor {name!r} has {vec.shape[0]} values, expected {length}")
        return vec

    @property
    def weights_nbytes(self) -> int:
        return sum(t.nbytes for t in self.gguf.tensors.values())

    # ---- evaluation ----
    def new_cache(self, n_ctx: int, spec: KVSpec = KVSpec()) -> SlotKVCache:
        a = self.args
        return SlotKVCache(a.n_layers, a.n_kv_heads, a.head_dim, n_ctx, spec, max_batch=MAX_BATCH)

    def _scratch(self, n: int, slots: int) -> tuple[np.ndarray, ...]:
        """Activation buffers for an n-token pass (cached for the decode shape n == 1)."""
        key = (n, slots)
        bufs = self._buffers.get(key)
        if bufs is None:
            a, f32 = self.args, np.float32
            bufs = (np.zeros((n, a.dim), f32), np.zeros((n, a.dim), f32),        # x, xb
                    np.zeros((n, a.q_dim), f32), np.zeros((n, a.q_dim), f32),    # q, qs
                    np.zeros((n, a.kv_dim), f32),                                # k
                    np.zeros((n, a.kv_dim), f32), np.zeros((n, a.q_dim), f32),   # v, att
                    np.zeros((n, a.dim), f32),                                   # tmp
                    np.zeros((n, a.hidden_dim), f32), np.zeros((n, a.hidden_dim), f32),  # hb, hb2
                    np.zeros((self.team.nthreads, min(n, QUERY_BLOCK), padded_slots(slots)), f32),  # scores
                    np.zeros((self.team.nthreads, QUERY_BLOCK, a.head_dim + 1), f32),  # gaq
                    np.zeros((self.team.nthreads, 2, a.head_dim), f32),           # gdm
                    np.zeros((self.team.nthreads, QUERY_BLOCK + 1), np.int32),    # gdone
                    np.zeros((self.team.nthreads, QUERY_BLOCK, (V_PARTS + 1) * a.head_dim), f32))  # vacc
            if n == 1:
                self._buffers[key] = bufs
        return bufs

    def forward(self, tokens: Sequence[int], cache: KVCache, logits_from: int | None = None,
                skip_layers: frozenset[int] = frozenset()) -> np.ndarray:
        toks, logits_from = check_forward(tokens, cache, logits_from, self.args.vocab_size)
        n = len(toks)
        if n == 0:
            return np.zeros((0, self.args.vocab_size), dtype=np.float32)
        _check_own_cache(cache)
        skip = self._skip_mask(skip_layers)
        out = np.empty((n - logits_from, self.args.vocab_size), dtype=np.float32)
        for c0 in range(0, n, MAX_BATCH):
            c1 = min(n, c0 + MAX_BATCH)
            lf = min(max(logits_from - c0, 0), c1 - c0)
            start, end = max(c0, logits_from), max(c1, logits_from)
            self._forward_chunk(toks[c0:c1], cache, lf, out[start - logits_from:end - logits_from], skip)
        return out

    def forward_lazy(self, tokens: Sequence[int], cache: KVCache) -> "LazyLogits":
        """``forward(tokens, cache, logits_from=0)`` with the output head run only for the rows
        that are read (see ``Backend.forward_lazy``); at most ``MAX_BATCH`` tokens."""
        toks, _ = check_forward(tokens, cache, 0, self.args.vocab_size)
        n = len(toks)
        if not 0 < n <= MAX_BATCH:
            raise ValueError(f"forward_lazy takes 1 to {MAX_BATCH} tokens, got {n}")
        _check_own_cache(cache)
        xn = self._forward_chunk(toks, cache, 0, np.empty((0, self.args.vocab_size), np.float32),
                                 self._skip_mask(frozenset()), head=False)
        return LazyLogits(self, xn)

    def head(self, xn: np.ndarray) -> np.ndarray:
        """Logits [n, vocab] of final-normed rows ``xn`` [n, dim] (``forward_lazy``'s rows)."""
        logits = np.empty((xn.shape[0], self.args.vocab_size), dtype=np.float32)
        self.team.run(head_worker, self._blob, self._gtab, self._icfg, xn, logits)
        return logits

    def _skip_mask(self, skip_layers: frozenset[int]) -> np.ndarray:
        """uint8 [n_layers] mask of the layers to skip (cached per set: a draft step allocates nothing)."""
        mask = self._skip_masks.get(skip_layers)
        if mask is None:
            bad = [l for l in skip_layers if not 0 <= l < self.args.n_layers]
            if bad:
                raise ValueError(f"skip_layers: layer {bad[0]} outside [0, {self.args.n_layers})")
            mask = np.zeros(self.args.n_layers, dtype=np.uint8)
            mask[list(skip_layers)] = 1
            self._skip_masks[frozenset(skip_layers)] = mask
        return mask

    def _forward_chunk(self, toks: np.ndarray, cache: SlotKVCache, logits_from: int, logits: np.ndarray,
                       skip: np.ndarray, head: bool = True) -> np.ndarray | None:
        """One pass of at most MAX_BATCH tokens; without ``head``, returns a copy of the final-
        normed rows of tokens logits_from .. n-1 instead of writing their logits."""
        n = len(toks)
        pos0 = cache.reserve(n)
        positions = np.arange(pos0, pos0 + n)
        cos, sin = rope_tables(positions, self.args)
        sink_pos = cache.sink_positions(positions)
        cos_s, sin_s = (cos, sin) if sink_pos is None else rope_tables(sink_pos, self.args)
        x, xb, q, qs, *rest = self._scratch(n, cache.slots)
        self.team.run(forward_worker, self._blob, self._wtab, self._gtab, self._norms, self._bias,
                      self._out_norm, self._icfg, self._eps, skip, toks, pos0, cos, sin, cos_s, sin_s,
                      cache.k, cache.v, cache.rk, cache.rv, cache.kvcfg(sink_pos is not None), cache.pending_slots,
                      cache.slot_pos, x, xb, q, qs, *rest, logits_from, int(head), logits)
        cache.update(n)
        return None if head else xb[:n - logits_from].copy()

    def close(self) -> None:
        self.team.close()


def _check_own_cache(cache: KVCache) -> None:
    if not isinstance(cache, SlotKVCache):
        raise TypeError(f"the numba backend needs its own cache (new_cache()), got {type(cache).__name__}")


class LazyLogits:
    """The logits rows of a ``forward_lazy`` pass, each computed when first read.

    Rows are computed in chunks of ``HEAD_CHUNK``: the first read of row j computes rows j ..
    j + 3 together. The output head (49152 x 576 on the default model) is bound by reading its
    matrix, not by arithmetic: a pass over it for one row costs ~0.22 of a decoding step, for
    four rows ~0.33, for eight ~0.65 (``tools/pass_costs.py``). Computing row 0 alone and the
    rest later reads the matrix twice whenever the first draft is accepted -- most rounds --
    while a chunk of four costs one read; past the chunk, a rejected draft saves the rest.
    """

    HEAD_CHUNK = 4

    def __init__(self, backend: NumbaBackend, xn: np.ndarray):
        self._backend = backend
        self._xn = xn                                  # f32 [n, dim] final-normed rows
        self._rows: list[np.ndarray | None] = [None] * len(xn)
        self.computed = 0                              # rows whose logits were computed

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, j: int) -> np.ndarray:
        if not -len(self._rows) <= j < len(self._rows):
            raise IndexError(f"row {j} of {len(self._rows)}")
        j %= len(self._rows)
        if self._rows[j] is None:
            j1 = min(len(self._rows), j + self.HEAD_CHUNK)
            logits = self._backend.head(self._xn[j:j1])
            for i in range(j, j1):
                if self._rows[i] is None:
                    self._rows[i] = logits[i - j]
                    self.computed += 1
        return self._rows[j]
