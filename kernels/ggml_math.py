"""The scalar arithmetic of llama.cpp's CPU backend (ggml-cpu on x86 AVX2), reproduced bit for bit.

A decode step of edgelm computes the same float32 operations in the same order as llama.cpp's
one-token evaluation (``n_batch=1``) of the same GGUF file, so both engines produce identical
logits and identical greedy text (``tests/test_vs_llamacpp.py``). Each op below names the ggml
function it reproduces; ``tests/test_ggml_math.py`` checks each one against tensors dumped from
llama.cpp's own graph (``cb_eval``), and small differences matter: 8-bit activation rounding
in every matrix product turns one differing last bit into a visibly different logit a few
layers later, and at a near-tie into a different token.

* ``expf`` -- ``ggml_v_expf`` (vec.h), one lane of it: ggml's softmax and SiLU use this
  polynomial, not libm's ``expf``.
* ``silu`` -- ``ggml_v_silu``: x / (1 + expf(-x)).
* ``rmsnorm_scale`` -- ``ggml_compute_forward_rms_norm_f32``: the squares (rounded to float32)
  are summed in float64 in element order; mean and 1/sqrt in float32.
* ``rope_table`` -- ``ggml_rope_cache_init``: angle_i = pos * s^i formed by repeated float32
  multiplication, then libm ``cosf``/``sinf`` (numba's ``math.cos`` on float32 *is* libm's
  ``cosf``; NumPy's vectorized float32 ``np.cos`` differs from it in ~15% of cases).
* ``rope_pair`` -- ``rotate_pairs`` as GCC compiles it (``-ffp-contract=fast``): two FMAs.
* ``round_f16`` -- float32 -> float16 -> float32 (round to nearest even), as ggml converts
  queries and softmax probabilities for its F16 attention products.

Everything here is strict IEEE arithmetic with explicit FMAs, so it rounds the same wherever
numba inlines it (no fastmath anywhere, ``tests/test_kernel_flags.py``).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .quant_simd import sfma


@intrinsic
def _f32_bits(typingctx, x):
    """The IEEE bits of a float32 as int32."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, i):
    """The float32 whose IEEE bits are the int32 ``i``."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def round_f16(typingctx, x):
    """float32 -> nearest-even float16 -> float32 (``_mm256_cvtps_ph(x, 0)`` and back)."""
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.float32), codegen


_F = np.float32
# ggml_v_expf's constants (ARM optimized-routines' expf): 1.5 * 2^23 for round-to-integer,
# log2(e), ln(2) split in two, and the degree-5 polynomial of exp on [-ln2/2, ln2/2].
_SHIFTER = _F(float.fromhex("0x1.8p23"))
_LOG2E = _F(float.fromhex("0x1.715476p+0"))
_LN2_HI = _F(float.fromhex("0x1.62e4p-1"))
_LN2_LO = _F(float.fromhex("0x1.7f7d1cp-20"))
_C0 = _F(float.fromhex("0x1.0e4020p-7"))
_C1 = _F(float.fromhex("0x1.573e2ep-5"))
_C2 = _F(float.fromhex("0x1.555e66p-3"))
_C3 = _F(float.fromhex("0x1.fffdb6p-2"))
_C4 = _F(float.fromhex("0x1.ffffecp-1"))
_ONE_BITS = np.int32(0x3F800000)
_BIAS_NEG = np.int32(-0x7E000000)  # 0x82000000 as int32
_BIAS_127 = np.int32(0x7F000000)


@njit(nogil=True, inline="always", cache=True)
def expf(x):
    """exp(x) in float32 exactly as one lane of ggml's ``ggml_v_expf`` (AVX2/FMA build).

    x = n ln2 + b with n = round(x log2 e); exp(x) = 2^n (1 + j(b)). Inputs with |n| > 126
    take the scaled path (2^n split in two factors so the result under/overflows gracefully);
    -inf gives 0 (a masked attention score), large x gives inf."""
    z = sfma(x, _LOG2E, _SHIFTER)
    n = z - _SHIFTER
    b = sfma(-n, _LN2_LO, sfma(-n, _LN2_HI, x))
    e = _f32_bits(z) << 23
    k = _bits_f32(e + _ONE_BITS)
    u = b * b
    j = sfma(sfma(sfma(_C0, b, _C1), u, sfma(_C2, b, _C3)), u, _C4 * b)
    an = abs(n)
    if not an > _F(126.0):
        return sfma(j, k, k)
    g = _BIAS_NEG if n <= _F(0.0) else np.int32(0)
    s1 = _bits_f32(g + _BIAS_127)
    if an > _F(192.0):
        return s1 * s1
    s2 = _bits_f32(e - g)
    return sfma(s2, j, s2) * s1


@njit(nogil=True, inline="always", cache=True)
def silu(x):
    """x * sigmoid(x) as ``ggml_v_silu``: x / (1 + expf(-x))."""
    return x / (_F(1.0) + expf(_F(0.0) - x))


@njit(nogil=True, inline="always", cache=True)
def rmsnorm_scale(x, n, eps):
    """1 / sqrt(mean(x[:n]^2) + eps) as ``ggml_compute_forward_rms_norm_f32``: float32 squares
    summed in float64 in element order (a sequential chain, ~2 ns per element: the price of
    llama.cpp's rounding)."""
    ss = 0.0
    for j in range(n):
        ss += np.float64(x[j] * x[j])
    mean = np.float32(ss / n)
    return _F(1.0) / np.sqrt(mean + eps)


@njit(nogil=True, cache=True)
def rope_table(positions, theta_scale, freq_factors, cos, sin):
    """cos/sin[i, j] of angle positions[i] * theta_scale^j / freq_factors[j] (``ggml_rope_cache_init``
    with no YaRN: the power is formed by repeated float32 multiplication, as ggml does).

    positions: int64 [n]; theta_scale: float32; freq_factors: f32 [half] (ones when the model
    has none); cos, sin: f32 [n, half]."""
    half = cos.shape[1]
    for i in range(positions.shape[0]):
        theta = np.float32(positions[i])
        for j in range(half):
            a = theta / freq_factors[j]
            cos[i, j] = math.cos(a)
            sin[i, j] = math.sin(a)
            theta = theta * theta_scale


@njit(nogil=True, inline="always", cache=True)
def rope_pair(x0, x1, c, s):
    """(x0, x1) rotated by the angle with cosine c and sine s, rounded as ggml's
    ``rotate_pairs``: x0 c - x1 s and x0 s + x1 c, each one FMA over a rounded product."""
    return sfma(x0, c, -(x1 * s)), sfma(x0, s, x1 * c)
