"""Where edgelm keeps its files: ``$EDGELM_HOME`` or the platform's user cache directory."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


def edgelm_home() -> Path:
    """Root of edgelm's cache (models, compiled kernels). Override with ``EDGELM_HOME``."""
    env = os.environ.get("EDGELM_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgelm"


def models_dir() -> Path:
    return edgelm_home() / "models"


def numba_cache_dir() -> Path:
    """Compiled-kernel cache, one folder per version of the kernel sources.

    numba invalidates a cached function only when *its own* source file changes, not when a
    kernel it inlines from another module does; keying the folder on all kernel sources makes
    a stale forward pass impossible.
    """
    kernels = Path(__file__).resolve().parent.parent / "kernels"
    digest = hashlib.sha1()
    for src in sorted(kernels.glob("*.py")):
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    return edgelm_home() / "numba-cache" / digest.hexdigest()[:16]
