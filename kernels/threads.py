"""A team of threads that run one compiled worker function together.

Thread 0 is the caller; threads 1..n-1 are persistent pool threads. Each runs the same
``nogil`` numba function with its own ``tid``; inside, the workers synchronize with a spin
barrier on a shared int64 array. Python is entered once per thread per call, so the per-call
cost is a few tens of microseconds however many operations the worker performs.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np


class ThreadTeam:
    """Runs ``fn(tid, nthreads, sync, *args)`` on ``nthreads`` threads at once."""

    def __init__(self, nthreads: int):
        if nthreads < 1:
            raise ValueError(f"threads must be >= 1, got {nthreads}")
        self.nthreads = nthreads
        self._pool = ThreadPoolExecutor(nthreads - 1, thread_name_prefix="edgelm") if nthreads > 1 else None
        self._sync = np.zeros(16, dtype=np.int64)  # barrier state (see kernels.lowlevel.spin_barrier)

    def run(self, fn: Callable[..., Any], *args: Any) -> None:
        # A worker must never raise once others may wait at a barrier: inputs are validated
        # in Python before this call, so the compiled code has no failure path.
        self._sync[:] = 0
        futures = [self._pool.submit(fn, t, self.nthreads, self._sync, *args) for t in range(1, self.nthreads)] \
            if self._pool else []
        try:
            fn(0, self.nthreads, self._sync, *args)
        finally:
            for f in futures:
                f.result()

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown(wait=True)
            self._pool = None
