"""Throughput of the weight kernels: ``python -m edgelm.kernels.microbench``.

For each ggml type and weight shape (default: the three matrix shapes of SmolLM2-135M, rows x
cols = 1536x576, 576x1536, 49152x576) it times ``qdispatch.matvec`` and ``qdispatch.matmul``
(``--n`` tokens) on random valid blocks and prints GFLOP/s (2 * rows * cols * n / time) and
GB/s (weight bytes / time). Each thread repeats the kernel on its share of the rows inside one
compiled loop, so the figures exclude Python and thread-launch overhead; the best of three
timings is reported. By default the weights stay in cache between calls (kernel speed);
``--cold`` cycles through copies larger than the caches, as decoding a whole model does.

    python -m edgelm.kernels.microbench --types q4_1,q8_0 --ops matvec --threads 1 --json
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
from numba import njit

from .qdispatch import SUPPORTED_TYPES, matmul, matvec, row_nbytes

DEFAULT_SHAPES = ((1536, 576), (576, 1536), (49152, 576))
COLD_BYTES = 256 << 20  # --cold: weight copies cycled through, well beyond the last-level cache
# f16 fields (byte offset in the block) holding a K-quant's super-block scales; every other
# byte of a K-quant block is a valid quant or sub-scale whatever its value
_K_SCALE_FIELDS = {
    GGMLQuantizationType.Q4_K: (0, 2),
    GGMLQuantizationType.Q5_K: (0, 2),
    GGMLQuantizationType.Q6_K: (208,),
    GGMLQuantizationType.Q3_K: (108,),
}


def type_name(gtype: int) -> str:
    """``12`` -> ``"q4_k"``."""
    return GGMLQuantizationType(gtype).name.lower()


def random_weights(gtype: int, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid raw rows (uint8, rows * row_nbytes) of ggml type ``gtype``.

    Float and legacy types quantize standard-normal weights with ``gguf.quants``; K-quants
    (which gguf cannot quantize) get random bytes with super-block scales in [1e-3, 1e-2)."""
    qtype = GGMLQuantizationType(gtype)
    if qtype in _K_SCALE_FIELDS:
        per_block, block_bytes = GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, size=(rows * cols // per_block, block_bytes), dtype=np.uint8)
        for off in _K_SCALE_FIELDS[qtype]:
            scales = rng.uniform(1e-3, 1e-2, size=blocks.shape[0]).astype(np.float16)
            blocks[:, off:off + 2] = scales.view(np.uint8).reshape(-1, 2)
        return blocks.reshape(-1)
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    return np.ascontiguousarray(quants.quantize(W, qtype)).view(np.uint8).reshape(-1)


@njit(nogil=True, cache=True)
def _repeat_matvec(ws, gtype, cols, x, out, r0, r1, reps):
    for i in range(reps):
        matvec(ws[i % ws.shape[0]], gtype, cols, x, out, r0, r1)


@njit(nogil=True, cache=True)
def _repeat_matmul(ws, gtype, cols, X, out, r0, r1, reps):
    for i in range(reps):
        matmul(ws[i % ws.shape[0]], gtype, cols, X, out, r0, r1)


def time_kernel(gtype: int, rows: int, cols: int, n: int, threads: int = 1, min_time: float = 0.2,
                repeats: int = 3, seed: int = 0, cold: bool = False) -> float:
    """Best seconds per call of matvec (``n == 0``) or matmul with ``n`` tokens.

    ``cold``: cycle through copies of the weights totalling ``COLD_BYTES``, so that every call
    streams them from DRAM as a decode step does (a model is larger than the caches)."""
    rng = np.random.default_rng(seed)
    w = random_weights(gtype, rows, cols, rng)
    ws = np.stack([w] * (max(2, -(-COLD_BYTES // w.nbytes)) if cold else 1))
    bounds = [(rows * t // threads, rows * (t + 1) // threads) for t in range(threads)]
    if n == 0:
        x = rng.standard_normal(cols).astype(np.float32)
        out = np.zeros(rows, np.float32)

        def run(r0: int, r1: int, reps: int) -> None:
            _repeat_matvec(ws, gtype, cols, x, out, r0, r1, reps)
    else:
        X = rng.standard_normal((n, cols)).astype(np.float32)
        out2 = np.zeros((n, rows), np.float32)

        def run(r0: int, r1: int, reps: int) -> None:
            _repeat_matmul(ws, gtype, cols, X, out2, r0, r1, reps)

    with ThreadPoolExecutor(threads) as pool:
        def timed(reps: int) -> float:
            t0 = time.perf_counter()
            for f in [pool.submit(run, r0, r1, reps) for r0, r1 in bounds]:
                f.result()
            return time.perf_counter() - t0

        timed(1)  # compile / warm caches
        reps = 1
        while (elapsed := timed(reps)) < min_time / 4:
            reps *= 4
        reps = max(1, int(reps * min_time / max(elapsed, 1e-9)))
        return min(timed(reps) / reps for _ in range(repeats))


def run_benchmarks(types: list[int], ops: list[str], ns: list[int], shapes: list[tuple[int, int]],
                   threads: int, min_time: float, cold: bool = False) -> list[dict]:
    """Time every (type, op, shape) and return one result dict per measurement."""
    results = []
    for gtype in types:
        for rows, cols in shapes:
            runs = ([0] if "matvec" in ops else []) + (ns if "matmul" in ops else [])
            for n in runs:
                sec = time_kernel(gtype, rows, cols, n, threads, min_time, cold=cold)
                results.append({
                    "type": type_name(gtype), "op": "matvec" if n == 0 else f"matmul n={n}",
                    "rows": rows, "cols": cols, "n": max(n, 1), "threads": threads, "cold": cold, "seconds": sec,
                    "gflops": 2.0 * rows * cols * max(n, 1) / sec / 1e9,
                    "gbps": rows * row_nbytes(gtype, cols) / sec / 1e9,
                })
    return results


def format_table(results: list[dict]) -> str:
    lines = [f"{'type':<6} {'op':<13} {'shape':>11} {'GFLOP/s':>8} {'GB/s':>7} {'us/call':>9}"]
    for r in results:
        lines.append(f"{r['type']:<6} {r['op']:<13} {r['rows']:>5}x{r['cols']:<5} {r['gflops']:>8.1f} "
                     f"{r['gbps']:>7.2f} {r['seconds'] * 1e6:>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default=",".join(type_name(t) for t in sorted(SUPPORTED_TYPES)),
                   help="comma-separated ggml type names (default: all supported)")
    p.add_argument("--ops", default="matvec,matmul", help="matvec and/or matmul")
    p.add_argument("--n", default="8,512", help="token counts for matmul")
    p.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in DEFAULT_SHAPES), help="ROWSxCOLS,...")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per timing")
    p.add_argument("--cold", action="store_true", help="stream the weights from DRAM (decode-like)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    types = [int(GGMLQuantizationType[name.strip().upper()]) for name in args.types.split(",")]
    unsupported = [type_name(t) for t in types if t not in SUPPORTED_TYPES]
    if unsupported:
        p.error(f"unsupported types: {', '.join(unsupported)}")
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    results = run_benchmarks(types, args.ops.split(","), [int(v) for v in args.n.split(",")], shapes,
                             args.threads, args.min_time, args.cold)
    print(json.dumps(results, indent=1) if args.json else format_table(results))


if __name__ == "__main__":
    main()
