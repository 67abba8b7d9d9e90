"""edgelm: an on-device LLM inference runtime for CPUs and Apple silicon.

    >>> import edgelm
    >>> model = edgelm.load("smollm2-135m-instruct")
    >>> for piece in model.generate("The capital of France is", max_tokens=16):
    ...     print(piece, end="")
"""
from __future__ import annotations

import os as _os

# numba caches compiled kernels next to their source by default, which is not writable in a
# system-wide install. Point it at the user cache before numba is imported anywhere.
from .runtime.paths import numba_cache_dir as _numba_cache_dir

_os.environ.setdefault("NUMBA_CACHE_DIR", str(_numba_cache_dir()))

__version__ = "0.1.0"


def load(model: str = "smollm2-135m-instruct", threads: int | None = None, n_ctx: int | None = None,
         **kv):
    """Load a model by short name (see ``edgelm.models.registry``) or GGUF path; returns a ``Model``.

    KV cache options (``edgelm.runtime.model.load``): ``kv_bits`` 16|8|4, ``kv_bits_k``,
    ``kv_bits_v``, ``kv_window`` (StreamingLLM rolling window, None = off) and ``n_sink``.
    """
    from .runtime.model import load as _load

    return _load(model, threads=threads, n_ctx=n_ctx, **kv)


__all__ = ["load", "__version__"]
