"""Which ggml type each tensor gets, for ``--outtype`` and for ``--llama-cpp``.

``--llama-cpp`` follows llama.cpp's Q4_K_M preset (``llama_tensor_get_type`` in
``llama-quant.cpp``, without an importance matrix) so the file has the types llama.cpp itself
would write:

* 1-D tensors (norms, biases) stay F32;
* the output head -- or ``token_embd`` when the head is tied to it -- is Q6_K, or Q8_0 when its
  rows are not a multiple of 256;
* ``attn_v`` and ``ffn_down`` get Q6_K in the layers ``use_more_bits`` picks (the first and last
  eighth, and every third layer between), Q4_K elsewhere;
* everything else is Q4_K.

A K-quant needs rows that are a multiple of 256 weights; otherwise llama.cpp falls back to a
32-weight legacy type: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..runtime.quants import QK_K, GGMLType

# gguf LlamaFileType codes for general.file_type.
FILE_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32, "llama-cpp": 15}  # 15: MOSTLY_Q4_K_M
OUTTYPES: dict[str, GGMLType] = {
    "f32": GGMLType.F32, "f16": GGMLType.F16, "bf16": GGMLType.BF16, "q8_0": GGMLType.Q8_0,
}
K_FALLBACK: dict[GGMLType, GGMLType] = {
    GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0,
}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M presets."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class TensorSite:
    """What the recipe needs to know about one tensor."""

    name: str            # GGUF name, e.g. "blk.3.attn_v.weight"
    shape: tuple[int, ...]  # NumPy order: (rows, row length)
    layer: int | None
    n_layers: int
    tied_output: bool


def outtype_type(site: TensorSite, outtype: str) -> GGMLType:
    """Type for ``--outtype``: 1-D tensors stay F32; 2-D ones take the requested type.

    Q8_0 needs rows that are a multiple of 32; other rows fall back to F16, as llama.cpp's
    converter does.
    """
    if len(site.shape) < 2:
        return GGMLType.F32
    t = OUTTYPES[outtype]
    if t is GGMLType.Q8_0 and site.shape[-1] % 32:
        return GGMLType.F16
    return t


def llama_cpp_type(site: TensorSite) -> GGMLType:
    """Type of ``site`` under llama.cpp's Q4_K_M recipe, with its row-length fallbacks."""
    if len(site.shape) < 2:
        return GGMLType.F32
    row = site.shape[-1]
    is_head = site.name == "output.weight" or (site.tied_output and site.name == "token_embd.weight")
    if is_head:
        return GGMLType.Q6_K if row % QK_K == 0 else GGMLType.Q8_0
    t = GGMLType.Q4_K
    if site.layer is not None and site.name.endswith(("attn_v.weight", "ffn_down.weight")):
        if use_more_bits(site.layer, site.n_layers):
            t = GGMLType.Q6_K
    if row % QK_K:
        t = K_FALLBACK[t]
        if row % 32:
            raise ValueError(f"{site.name}: rows of {row} weights fit no ggml quantized type")
    return t
