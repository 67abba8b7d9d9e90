"""The one error class of the converter: every problem with the input names the file and what is wrong."""
from __future__ import annotations

from ..runtime.errors import EdgeLMError


class ConversionError(EdgeLMError, ValueError):
    """A checkpoint the converter cannot turn into a GGUF, or an output it cannot write.

    The message always names the offending file (or tensor and file) and the problem, so that
    the command line can print it as is.
    """
