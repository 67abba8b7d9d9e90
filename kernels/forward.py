"""The llama-family forward pass as one compiled function per worker thread.

Like llama2.c's ``forward``, the whole pass reads top to bottom: embedding, then per layer
RMSNorm -> Q/K/V -> RoPE -> attention over the KV cache -> output projection -> residual ->
RMSNorm -> SiLU-gated MLP -> residual, then the final norm and the output head.

Every thread runs this same function on its share of the work (rows of each weight matrix,
(token, head) pairs of the attention) and the threads meet at spin barriers between steps
that depend on each other's results. A decode step is therefore one call per thread into
compiled code -- no Python dispatch per layer or per operation, and no numba parallel-region
launch (tens of microseconds each) per matrix-vector product.

``n`` tokens are processed at once: n == 1 is a decode step (matrix-vector kernels), n > 1 is
prompt prefill or batched speculative verification (matrix-matrix kernels, which read each
weight row once for all n tokens).

No kernel is compiled with fastmath, and none may be (``tests/test_kernel_flags.py``).
fastmath lets LLVM reassociate sums, and how it does so depends on the code a kernel is
compiled into: numba links every callee into its caller's module and optimizes the two
together, so the same attention kernel rounded one way in the process that compiled it and
another way when loaded from numba's disk cache (prefill logits differed from the 25th token
on, and greedy text with it). Every rounding is explicit instead -- and chosen to be
llama.cpp's: RMSNorm, RoPE, SiLU, the attention and the int8-activation products compute what
ggml's CPU backend computes, bit for bit (``ggml_math``; README "Agreement with llama.cpp").
"""
from __future__ import annotations

from numba import njit

from .attention import QUERY_BLOCK, attend_block, group_end
from .ggml_math import rmsnorm_scale, rope_pair, round_f16, silu
from .kvquant import KV_GROUP, hadamard_groups, store_key_group, store_row
from .lowlevel import spin_barrier
# Column layout of the int64 weight tables (one row per tensor): qdispatch's W_* columns.
from .qdispatch import W_COLS, W_OFFSET, W_ROWS, W_TYPE, dequantize_rows_t, matmul_float_t, matmul_t, matvec_t  # noqa: F401
# Per-layer slots (order of models.base.LAYER_SLOTS, minus the two norms held as float32).
S_Q, S_K, S_V, S_O, S_GATE, S_UP, S_DOWN = 0, 1, 2, 3, 4, 5, 6
# Integer hyperparameters (icfg) -- see runtime/numba_backend.py, which fills them.
(C_DIM, C_LAYERS, C_HEADS, C_KV_HEADS, C_HEAD_DIM, C_HIDDEN, C_VOCAB, C_ROPE_DIM, C_NEOX, C_BIAS,
 C_FLOAT_ACT) = range(11)
# The KV cache's description of one pass (kvcfg) -- see runtime/kv_cache.py, which fills it.
K_KBITS, K_VBITS, K_SINKS, K_WINDOW, K_SLOTS, K_SINK_QUERIES, K_RESIDUAL, K_RECENT = range(8)


@njit(nogil=True, inline="always", cache=True)
def _share(total, tid, nthr):
    """[start, end) of thread ``tid``'s share of ``total`` items."""
    return total * tid // nthr, total * (tid + 1) // nthr


@njit(nogil=True, cache=True)
def _project(blob, wt, X, out, n, tid, nthr, float_act):
    """out[:n, rows] = X[:n] @ W.T for this thread's rows of W (described by table row ``wt``);
    ``float_act``: float32 activations (``matmul_float_t``) instead of llama.cpp's int8 ones."""
    r0, r1 = _share(wt[W_ROWS], tid, nthr)
    if float_act:
        matmul_float_t(blob, wt, X[:n], out[:n], r0, r1)
    elif n == 1:
        matvec_t(blob, wt, X[0], out[0], r0, r1)
    else:
        matmul_t(blob, wt, X[:n], out[:n], r0, r1)
    return r0, r1


@njit(nogil=True, cache=True)
def _rmsnorm_rows(x, weight, eps, out, i0, i1):
    """out[i] = x[i] / rms(x[i]) * weight for rows i in [i0, i1), rounded as ggml's RMS_NORM
    then MUL: (x * scale) * weight."""
    d = x.shape[1]
    for i in range(i0, i1):
        scale = rmsnorm_scale(x[i], d, eps)
        for j in range(d):
            out[i, j] = x[i, j] * scale * weight[j]


@njit(nogil=True, cache=True)
def _rope(vec, base, cos, sin, rope_dim, neox):
    """Rotate vec[base : base + rope_dim] in place (cos/sin: [rope_dim // 2] for this position),
    rounded as ggml's ``rotate_pairs`` (``ggml_math.rope_pair``)."""
    half = rope_dim // 2
    if neox:  # pairs (j, j + half)
        for j in range(half):
            vec[base + j], vec[base + j + half] = rope_pair(vec[base + j], vec[base + j + half], cos[j], sin[j])
    else:  # adjacent pairs (2j, 2j + 1)
        for j in range(half):
            vec[base + 2 * j], vec[base + 2 * j + 1] = rope_pair(vec[base + 2 * j], vec[base + 2 * j + 1],
                                                                 cos[j], sin[j])


@njit(nogil=True, inline="always", cache=True)
def _round_query_f16(vec, base, hd):
    """Round one head's query to float16 values: ggml's attention multiplies it with the F16
    keys as an F16 vector (``mul_mat`` converts it to the keys' type)."""
    for j in range(hd):
        vec[base + j] = round_f16(vec[base + j])


@njit(nogil=True, cache=True)
def forward_worker(tid, nthr, sync,
                   blob, wtab, gtab, norms, bias, out_norm, icfg, eps, skip,
                   tokens, pos0, cos, sin, cos_s, sin_s, kcache, vcache, rkcache, rvcache, kvcfg,
                   slots, slot_pos, x, xb, q, qs, k, v, att, tmp, hb, hb2, scores, gaq, gdm,
                   gdone, vacc, logits_from, head, logits):
    """Thread ``tid`` of ``nthr``'s part of one forward pass over ``n = len(tokens)`` tokens.

    blob:   uint8  [file size]            the memory-mapped GGUF (weights are views into it)
    wtab:   int64  [n_layers, 7, W_FIELDS]  qdispatch's table rows (offset, nbytes, type, rows, cols,
                                          affine scales/biases offsets, group size) of Q K V O gate up down
    gtab:   int64  [2, W_FIELDS]          token_embd and output head
    norms:  f32    [n_layers, 2, dim]     attention and MLP RMSNorm weights
    bias:   f32    [n_layers, q_dim + 2 kv_dim]  Q/K/V biases (zeros when the model has none)
    skip:   uint8  [n_layers]             1: the layer is skipped (the residual stream passes it
                                          unchanged and its cache rows are not written) -- the
                                          self-speculative drafter (runtime/speculative)
    tokens: int64  [n]; their counters (positions in the sequence) are pos0 .. pos0 + n - 1
    cos/sin: f32   [n, rope_dim // 2]     rotation of each token's counter
    cos_s/sin_s: f32 [n, rope_dim // 2]   rotation of each query for the attention sinks
    kcache: uint8  [n_layers, n_kv_heads, slots, 2 hd] 16-bit key rows, or at kbits < 16
                   [n_layers, n_kv_heads, slots // 32, key group bytes] key groups (kvquant)
    vcache: uint8  [n_layers, n_kv_heads, slots, row bytes]  value rows at vbits
    rkcache/rvcache: uint8 [n_layers, n_kv_heads, n_recent, 2 hd]  16-bit copies of recent tokens
                   (row counter % n_recent) in a quantized cache; n_recent == 0 otherwise
    kvcfg:  int64  [8]                    kbits, vbits, n_sink, window, slots in use, sink queries?,
                                          residual, n_recent (kernels/attention)
    slots:  int64  [n]                    cache slot of each token; slot_pos: int64 [slots] counters
    x, xb:  f32    [n, dim]               residual stream, normed copy
    q, qs:  f32    [n, q_dim];  k, v: f32 [n, kv_dim];  att: f32 [n, q_dim]
    tmp:    f32    [n, dim];    hb, hb2: f32 [n, hidden]
    scores: f32    [nthr, QUERY_BLOCK, n_ctx]  per-thread attention scratch
    gaq: f32 [nthr, QUERY_BLOCK, hd + 1]; gdm: f32 [nthr, 2, hd]; gdone: int32 [nthr, QUERY_BLOCK + 1];
    vacc: f32 [nthr, QUERY_BLOCK, (V_PARTS + 1) hd]  attention scratch (kernels/attention)
    head:   1: the output head writes logits; 0: the pass stops after the final norm, leaving
            the normed rows of tokens logits_from .. n-1 in xb[:n - logits_from] (``head_worker``
            projects them later, as lazily evaluated speculative verification wants)
    logits: f32    [n - logits_from, vocab]  written for tokens logits_from .. n-1 (when head)
    """
    n = tokens.shape[0]
    dim, n_layers = icfg[C_DIM], icfg[C_LAYERS]
    n_heads, n_kv, hd = icfg[C_HEADS], icfg[C_KV_HEADS], icfg[C_HEAD_DIM]
    rope_dim, neox, has_bias = icfg[C_ROPE_DIM], icfg[C_NEOX] != 0, icfg[C_BIAS] != 0
    fa = icfg[C_FLOAT_ACT] != 0
    kbits, vbits, n_sink, window = kvcfg[K_KBITS], kvcfg[K_VBITS], kvcfg[K_SINKS], kvcfg[K_WINDOW]
    n_slots, sink_queries = kvcfg[K_SLOTS], kvcfg[K_SINK_QUERIES] != 0
    residual, n_recent = kvcfg[K_RESIDUAL], kvcfg[K_RECENT]
    # Key groups this pass completes (each is quantized once, after all its rows are written).
    completed = 0
    if kbits != 16:
        for i in range(n):
            if pos0 + i == group_end(pos0 + i, n_sink):
                completed += 1
    q_dim, kv_dim = n_heads * hd, n_kv * hd
    group = n_heads // n_kv
    n_blocks = (n + QUERY_BLOCK - 1) // QUERY_BLOCK
    t0, t1 = _share(n, tid, nthr)

    # Embedding lookup: this thread's tokens.
    for i in range(t0, t1):
        dequantize_rows_t(blob, gtab[0], tokens[i], tokens[i] + 1, x[i:i + 1])
    spin_barrier(sync, nthr)

    for layer in range(n_layers):
        if skip[layer]:
            continue
        wl = wtab[layer]
        kc, vc, rk, rv = kcache[layer], vcache[layer], rkcache[layer], rvcache[layer]

        # ---- attention ----
        _rmsnorm_rows(x, norms[layer, 0], eps, xb, t0, t1)
        spin_barrier(sync, nthr)
        qr0, qr1 = _project(blob, wl[S_Q], xb, q, n, tid, nthr, fa)
        kr0, kr1 = _project(blob, wl[S_K], xb, k, n, tid, nthr, fa)
        vr0, vr1 = _project(blob, wl[S_V], xb, v, n, tid, nthr, fa)
        if has_bias:
            b = bias[layer]
            for i in range(n):
                for r in range(qr0, qr1):
                    q[i, r] += b[r]
                for r in range(kr0, kr1):
                    k[i, r] += b[q_dim + r]
                for r in range(vr0, vr1):
                    v[i, r] += b[q_dim + kv_dim + r]
        spin_barrier(sync, nthr)

        # RoPE on this thread's (token, head) pairs; keys and values go into their cache slots
        # (and, in a quantized cache, 16-bit copies into the recent rows).
        a0, a1 = _share(n * n_kv, tid, nthr)
        for item in range(a0, a1):
            i, h = item // n_kv, item % n_kv
            _rope(k[i], h * hd, cos[i], sin[i], rope_dim, neox)
            if n_recent > 0:
                r = (pos0 + i) % n_recent
                store_row(rk[h, r], 16, k[i], h * hd, hd)
                store_row(rv[h, r], 16, v[i], h * hd, hd)
            if kbits == 16:
                store_row(kc[h, slots[i]], 16, k[i], h * hd, hd)
            if vbits != 16:  # quantized value rows are stored in the Hadamard basis (kvquant)
                hadamard_groups(v[i], h * hd, hd)
            store_row(vc[h, slots[i]], vbits, v[i], h * hd, hd)
        a0, a1 = _share(n * n_heads, tid, nthr)
        for item in range(a0, a1):
            i, h = item // n_heads, item % n_heads
            if sink_queries:
                for j in range(hd):
                    qs[i, h * hd + j] = q[i, h * hd + j]
                _rope(qs[i], h * hd, cos_s[i], sin_s[i], rope_dim, neox)
                _round_query_f16(qs[i], h * hd, hd)
            _rope(q[i], h * hd, cos[i], sin[i], rope_dim, neox)
            _round_query_f16(q[i], h * hd, hd)
        spin_barrier(sync, nthr)
        if completed > 0:  # quantize the key groups whose last token this pass wrote
            item = 0
            for i in range(n):
                c = pos0 + i
                if c != group_end(c, n_sink):
                    continue
                first = c // KV_GROUP * KV_GROUP if c < n_sink else c - (KV_GROUP - 1)
                for h in range(n_kv):
                    if item % nthr == tid:
                        store_key_group(kc[h, slots[i] // KV_GROUP], kbits, rk[h], first, c - first + 1,
                                        n_recent, hd)
                    item += 1
            spin_barrier(sync, nthr)

        # Attention: (query block, head) items dealt round-robin, since later blocks see more
        # keys and cost more.
        for item in range(tid, n_blocks * n_heads, nthr):
            blk, h = item // n_heads, item % n_heads
            i0 = blk * QUERY_BLOCK
            attend_block(q, qs if sink_queries else q, att, i0, min(n, i0 + QUERY_BLOCK), h, hd,
                         kc, vc, rk, rv, kbits, vbits, h // group, pos0, slot_pos, n_slots, n_sink,
                         window, residual, n_recent, scores[tid], gaq[tid], gdm[tid], gdone[tid],
                         vacc[tid])
        spin_barrier(sync, nthr)

        r0, r1 = _project(blob, wl[S_O], att, tmp, n, tid, nthr, fa)
        for i in range(n):
            for r in range(r0, r1):
                x[i, r] += tmp[i, r]
        spin_barrier(sync, nthr)

        # ---- MLP ----
        _rmsnorm_rows(x, norms[layer, 1], eps, xb, t0, t1)
        spin_barrier(sync, nthr)
        r0, r1 = _project(blob, wl[S_GATE], xb, hb, n, tid, nthr, fa)
        _project(blob, wl[S_UP], xb, hb2, n, tid, nthr, fa)
        for i in range(n):
            for r in range(r0, r1):
                hb[i, r] = silu(hb[i, r]) * hb2[i, r]  # ggml's SWIGLU
        spin_barrier(sync, nthr)
        r0, r1 = _project(blob, wl[S_DOWN], hb, tmp, n, tid, nthr, fa)
        for i in range(n):
            for r in range(r0, r1):
                x[i, r] += tmp[i, r]
        spin_barrier(sync, nthr)

    # ---- output head, for tokens logits_from .. n-1 ----
    n_out = n - logits_from
    if n_out > 0:
        o0, o1 = _share(n_out, tid, nthr)
        _rmsnorm_rows(x[logits_from:], out_norm, eps, xb, o0, o1)
        spin_barrier(sync, nthr)
        if head:
            _project(blob, gtab[1], xb, logits, n_out, tid, nthr, fa)
    spin_barrier(sync, nthr)


@njit(nogil=True, cache=True)
def head_worker(tid, nthr, sync, blob, gtab, icfg, xn, logits):
    """Thread ``tid``'s rows of the output head for normed rows ``xn`` [n, dim] (left by a
    ``forward_worker`` pass with head == 0): logits [n, vocab], bit for bit what that pass would
    have written (matvec and matmul round each token alike)."""
    _project(blob, gtab[1], xn, logits, xn.shape[0], tid, nthr, icfg[C_FLOAT_ACT] != 0)
