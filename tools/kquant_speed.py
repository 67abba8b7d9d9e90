"""Q4_K / Q6_K kernels side by side, one thread: the float-activation ones (kernels/quant_k.py,
used by the float32 mode) and the Q8_K ones (kernels/quant_k8.py, the default).

    python tools/kquant_speed.py
"""
import numpy as np, time
from edgelm.kernels import quant_k, quant_k8
from edgelm.kernels.microbench import random_weights
rng = np.random.default_rng(0)
for name, gt, old, new, oldm, newm in (("q4_k", 12, quant_k.matvec_q4_k, quant_k8.matvec_q4_k8, quant_k.matmul_q4_k, quant_k8.matmul_q4_k8),
                           ("q6_k", 14, quant_k.matvec_q6_k, quant_k8.matvec_q6_k8, quant_k.matmul_q6_k, quant_k8.matmul_q6_k8)):
    rows, cols = 2048, 1536
    w = random_weights(gt, rows, cols, rng); w.setflags(write=False)
    x = rng.standard_normal(cols).astype(np.float32); out = np.zeros(rows, np.float32)
    for label, f in (("float", old), ("q8k", new)):
        f(w, cols, x, out, 0, rows)
        best = 1e9
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(20): f(w, cols, x, out, 0, rows)
            best = min(best, (time.perf_counter() - t) / 20)
        print(f"{name} matvec {label}: {best*1e6:.0f} us  {2*rows*cols/best/1e9:.1f} GFLOP/s")
    X = rng.standard_normal((64, cols)).astype(np.float32); O = np.zeros((64, rows), np.float32)
    for label, f in (("float", oldm), ("q8k", newm)):
        f(w, cols, X, O, 0, rows)
        t = time.perf_counter(); f(w, cols, X, O, 0, rows); dt = time.perf_counter() - t
        print(f"{name} matmul64 {label}: {dt*1e3:.1f} ms  {2*64*rows*cols/dt/1e9:.1f} GFLOP/s")
