"""Model architectures (one small module per family) and the registry of known model files."""
from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, Mapping

from ..runtime.errors import UnsupportedArchitectureError
from . import llama, qwen2
from .base import ModelArgs

ARCHITECTURES: dict[str, ModuleType] = {}
for _module in (llama, qwen2):
    for _name in (_module.NAME, *_module.ALIASES):
        ARCHITECTURES[_name] = _module


def model_args(meta: Mapping[str, Any], tensor_names: set[str], read_tensor: Callable) -> ModelArgs:
    """Dispatch on ``general.architecture`` to the family module that reads its hyperparameters."""
    arch = str(meta.get("general.architecture", ""))
    module = ARCHITECTURES.get(arch)
    if module is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {arch!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return module.model_args(meta, tensor_names, read_tensor)


__all__ = ["ARCHITECTURES", "ModelArgs", "model_args"]
