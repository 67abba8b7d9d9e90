"""No compiled kernel uses fastmath.

fastmath lets LLVM reassociate floating-point sums, and how it does depends on the code a
kernel ends up compiled into: numba compiles a callee when a caller first needs it and links it
into the caller's module, where the two are optimized together. Which kernel was compiled first,
and whether the process compiled the kernels or loaded them from numba's disk cache, then
decided the rounding -- logits (and greedy text) differed between a first run and later runs.
``tests/test_determinism.py`` checks the consequence end to end.
"""
from __future__ import annotations

import importlib
import pkgutil

from numba.core.registry import CPUDispatcher

import edgelm.kernels as kernels_pkg


def _dispatchers() -> dict[int, tuple[str, CPUDispatcher]]:
    found = {}
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        if info.name.startswith("mlx"):
            continue  # the MLX backend's modules need mlx and hold no numba kernels
        mod = importlib.import_module(f"edgelm.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, CPUDispatcher):
                found[id(obj)] = (f"{obj.py_func.__module__}.{name}", obj)
    return found


def _fastmath(d: CPUDispatcher) -> bool:
    return bool(d.targetoptions.get("fastmath"))


def test_no_kernel_is_fastmath():
    dispatchers = _dispatchers()
    assert len(dispatchers) > 30, "expected the package's numba kernels"
    fast = sorted(n for n, d in dispatchers.values() if _fastmath(d))
    assert not fast, "fastmath kernels: " + ", ".join(fast)
