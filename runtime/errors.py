"""Exceptions users of the public API can catch."""
from __future__ import annotations


class EdgeLMError(Exception):
    """Base class of edgelm's own errors."""


class ContextOverflowError(EdgeLMError, ValueError):
    """The prompt (plus what is already cached) does not fit in the context window."""

    def __init__(self, needed: int, n_ctx: int, what: str = "prompt"):
        self.needed, self.n_ctx = needed, n_ctx
        super().__init__(
            f"{what} needs {needed} tokens but the context holds {n_ctx}; "
            f"shorten it, load the model with a larger n_ctx, or stream past it with a KV window "
            f"(kv_window=N, --kv-window N)"
        )


class UnsupportedArchitectureError(EdgeLMError, ValueError):
    """The GGUF's ``general.architecture`` has no implementation here."""


class ModelFormatError(EdgeLMError, ValueError):
    """The GGUF is well-formed but lacks tensors or hyperparameters the architecture needs."""


class InsufficientMemoryError(EdgeLMError, MemoryError):
    """Loading would need more memory than is available (or than the --memory-budget allows)."""

    def __init__(self, message: str, needed: int, limit: int):
        self.needed, self.limit = needed, limit
        super().__init__(message)
