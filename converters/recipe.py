"""Which ggml type each tensor gets, for ``--outtype`` and for ``--llama-cpp``.

``--llama-cpp [q4_k_m|q3_k_m]`` follows llama.cpp's preset of that name
(``llama_tensor_get_type`` in ``llama-quant.cpp``, without an importance matrix) so the file has
the types llama.cpp itself would write. In both:

* 1-D tensors (norms, biases) stay F32;
* the output head -- or ``token_embd`` when the head is tied to it -- is Q6_K, or Q8_0 when its
  rows are not a multiple of 256.

Q4_K_M (the default): ``attn_v`` and ``ffn_down`` get Q6_K in the layers ``use_more_bits`` picks
(the first and last eighth, and every third layer between); everything else is Q4_K.

Q3_K_M: ``attn_v`` is Q5_K in the first two layers and Q4_K after; ``ffn_down`` Q5_K in the
first sixteenth of the layers and Q4_K after; ``attn_output`` Q4_K; everything else (q, k, gate,
up, an untied ``token_embd``) Q3_K.

A K-quant needs rows that are a multiple of 256 weights; otherwise llama.cpp falls back to a
32-weight legacy type: Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..runtime.quants import QK_K, GGMLType

# gguf LlamaFileType codes for general.file_type.
FILE_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32, "q3_k_m": 12, "q4_k_m": 15}
LLAMA_CPP_PRESETS = ("q4_k_m", "q3_k_m")
OUTTYPES: dict[str, GGMLType] = {
    "f32": GGMLType.F32, "f16": GGMLType.F16, "bf16": GGMLType.BF16, "q8_0": GGMLType.Q8_0,
}
K_FALLBACK: dict[GGMLType, GGMLType] = {
    GGMLType.Q3_K: GGMLType.Q4_0, GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0,
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


def llama_cpp_type(site: TensorSite, preset: str = "q4_k_m") -> GGMLType:
    """Type of ``site`` under llama.cpp's ``preset`` (q4_k_m or q3_k_m), with its row-length
    fallbacks."""
    if preset not in LLAMA_CPP_PRESETS:
        raise ValueError(f"unknown llama.cpp preset {preset!r}; known: {', '.join(LLAMA_CPP_PRESETS)}")
    if len(site.shape) < 2:
        return GGMLType.F32
    row = site.shape[-1]
    is_head = site.name == "output.weight" or (site.tied_output and site.name == "token_embd.weight")
    if is_head:
        return GGMLType.Q6_K if row % QK_K == 0 else GGMLType.Q8_0
    kind = site.name.split(".")[-2] if site.layer is not None else ""
    if preset == "q4_k_m":
        t = GGMLType.Q4_K
        if kind in ("attn_v", "ffn_down") and use_more_bits(site.layer, site.n_layers):
            t = GGMLType.Q6_K
    else:
        t = GGMLType.Q3_K
        if kind == "attn_v":
            t = GGMLType.Q5_K if site.layer < 2 else GGMLType.Q4_K
        elif kind == "ffn_down":
            t = GGMLType.Q5_K if site.layer < site.n_layers // 16 else GGMLType.Q4_K
        elif kind == "attn_output":
            t = GGMLType.Q4_K
    if row % QK_K:
        t = K_FALLBACK[t]
        if row % 32:
            raise ValueError(f"{site.name}: rows of {row} weights fit no ggml quantized type")
    return t


# --- affine INT4/INT3 recipes (``--bits``) -------------------------------------------------------


@dataclass(frozen=True)
class Affine:
    """A tensor stored in the affine format: packed ``bits``-bit words plus f16 scales/biases."""

    bits: int
    group_size: int


AFFINE_RECIPES: dict[str, str] = {
    "uniform": "every 2-D weight at --bits; the embedding/output head in Q8_0",
    "mixed": "as uniform, plus attn_v and ffn_down one notch up in llama.cpp's use_more_bits layers "
             "(3 -> 4 bits affine in groups of at least 64; 4 -> Q6_K, Q8_0 where rows are not multiples "
             "of 256) [default]",
    "mixed-all": "as mixed, but attn_v and ffn_down one notch up in every layer",
    "mixed-l": "as mixed-all, and attn_output too (like llama.cpp's Q3_K_L): only q, k, gate, up at --bits",
    "mixed-s": "by measured sensitivity: attn_v and ffn_down one notch up in every layer, ffn_up in the "
               "last 3/8 of the layers; attn_output stays at --bits",
}
DEFAULT_AFFINE_RECIPE = "mixed"


NOTCH_GROUP = 64  # a notched-up 4-bit tensor's group size, where its rows allow it


def _notch_up(bits: int, group_size: int, row: int) -> GGMLType | Affine:
    """One step more precision: 3 -> 4-bit affine; above that a llama.cpp 6/8-bit type.

    The 4-bit tensors of a 3-bit file take groups of 64 (mlx-lm's default) even when the 3-bit
    ones use 32: 4.5 bits per weight instead of 5.0, so a ``mixed-l`` INT3 g32 file stays smaller
    than llama.cpp's Q3_K_S. (On SmolLM2, whose weights come from a Q4_1 file, 4-bit groups of 32
    would reproduce the source nearly exactly and flatter the recipe; groups of 64 do not.)
    """
    if bits < 4:
        g = max(group_size, NOTCH_GROUP)
        return Affine(bits + 1, g if row % g == 0 else group_size)
    return GGMLType.Q6_K if row % QK_K == 0 else GGMLType.Q8_0


def affine_type(site: TensorSite, bits: int, group_size: int, recipe: str) -> GGMLType | Affine:
    """Type of ``site`` under ``--bits``/``--recipe``, like llama.cpp's _M presets and mlx-lm's mixed recipes.

    The head (or tied embedding) is the most sensitive tensor and a lookup table for the
    embedding, so it stays Q8_0 (F16 when rows are not multiples of 32). Raises ValueError when
    the group size does not divide a row of an affine tensor.
    """
    if recipe not in AFFINE_RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(AFFINE_RECIPES)}")
    if len(site.shape) < 2:
        return GGMLType.F32
    row = site.shape[-1]
    if site.name in ("token_embd.weight", "output.weight"):
        return GGMLType.Q8_0 if row % 32 == 0 else GGMLType.F16
    t: GGMLType | Affine = Affine(bits, group_size)
    if site.layer is not None and site.name.endswith(("attn_v.weight", "ffn_down.weight")):
        if recipe in ("mixed-all", "mixed-l") or (recipe == "mixed" and use_more_bits(site.layer, site.n_layers)):
            t = _notch_up(bits, group_size, row)
    if site.layer is not None and recipe == "mixed-l" and site.name.endswith("attn_output.weight"):
        t = _notch_up(bits, group_size, row)
    if site.layer is not None and recipe == "mixed-s":
        # SmolLM2 at INT4 g64 with GPTQ, each class alone (F16 elsewhere), perplexity 25.23 +:
        # attn_v 1.28, ffn_down 0.70, ffn_up 0.54 (layers 0-9 0.18, 10-19 0.09, 20-29 0.27),
        # ffn_gate 0.36, attn_q + attn_k 0.27, attn_output 0.11 -- per megabyte a notch up buys
        # most on attn_v, ffn_down and the late ffn_up, least on attn_output.
        if site.name.endswith(("attn_v.weight", "ffn_down.weight")) or (
                site.name.endswith("ffn_up.weight") and site.layer >= site.n_layers - 3 * site.n_layers // 8):
            t = _notch_up(bits, group_size, row)
    if isinstance(t, Affine) and row % group_size:
        raise ValueError(f"{site.name}: rows of {row} weights are not a multiple of --group-size {group_size}")
    return t
