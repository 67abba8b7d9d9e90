"""No fastmath kernel may call a strict (non-fastmath) compiled kernel.

numba compiles a callee the first time a caller needs it, inside the *caller's* target context:
a strict kernel first reached from a fastmath caller is compiled with fastmath. Which caller
came first then decides the kernel's rounding, and a process that compiled the kernels from
scratch computed different logits from one that loaded them from numba's disk cache (see
``kernels/forward.py``). Functions inlined at the numba-IR level (``inline="always"``) are
compiled as part of their caller anyway, so they are allowed.
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


def test_fastmath_kernels_call_only_fastmath_or_inlined_kernels():
    dispatchers = _dispatchers()
    fast = [(n, d) for n, d in dispatchers.values() if _fastmath(d)]
    assert fast, "expected some fastmath kernels (attention, KV cache, RMSNorm)"
    bad = []
    for name, d in fast:
        glb = d.py_func.__globals__
        for ref in d.py_func.__code__.co_names:
            callee = glb.get(ref)
            if not isinstance(callee, CPUDispatcher):
                continue
            if _fastmath(callee) or callee.targetoptions.get("inline") == "always":
                continue
            bad.append(f"{name} -> {callee.py_func.__module__}.{ref}")
    assert not bad, "fastmath kernels calling strict kernels: " + ", ".join(bad)


def test_the_forward_pass_and_weight_kernels_are_strict():
    from edgelm.kernels import forward, qdispatch, quant_affine, quant_legacy

    for d in (forward.forward_worker, forward._project, forward._rope, qdispatch.matvec_t,
              qdispatch.matmul_t, quant_affine.matvec_affine3, quant_legacy.matvec_q4_1):
        assert not _fastmath(d), d.py_func.__name__
