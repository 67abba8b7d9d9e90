"""Affine group quantization: ``w ~= s * q + b`` per group of ``group_size`` values of a row.

Two quantizers produce ``(q uint8 [rows, cols], scales f16 [rows, groups], biases f16)``:

* :func:`quantize_rtn` -- round to nearest with a searched clipping range per group. Plain
  min-max (what ``mx.quantize`` does) wastes levels on outliers; we try a grid of ranges shrunk
  towards the group's midpoint, keep the one with the lowest squared error, then refit ``s`` and
  ``b`` by least squares for the chosen ``q`` (and re-round). Errors are measured with scales and
  biases already rounded to f16, as the file stores them, so the result is never worse than
  min-max (which is the first candidate).
* :func:`quantize_gptq` -- GPTQ (Frantar et al. 2022): columns are quantized left to right and
  each column's error is spread over the columns not yet quantized, weighted by the inverse
  Hessian ``H = X^T X`` of the layer's calibration inputs. Group parameters are fitted (with the
  same clip search) when the sweep reaches a group, on the already-compensated weights.
"""
from __future__ import annotations

import numpy as np

_CHUNK_ELEMENTS = 1 << 20  # weights searched at once: the grid's temporaries stay ~ tens of MB
SHRINKS = tuple(float(x) for x in np.linspace(0.98, 0.70, 15))  # clip ranges tried after min-max
_REFITS = 2


def _round_params(s: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f16 rounding (what the file stores); a zero scale would divide by zero, use the tiniest."""
    s16 = s.astype(np.float16)
    s16 = np.where(s16 == 0, np.float16(6e-8), s16)
    return s16.astype(np.float32), b.astype(np.float16).astype(np.float32)


def _assign(x: np.ndarray, s: np.ndarray, b: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest level per value and the squared error per group (x [..., G], s/b [..., 1])."""
    q = np.clip(np.rint((x - b) / s), 0, qmax)
    err = np.square(q * s + b - x).sum(axis=-1)
    return q, err


def fit_groups(x: np.ndarray, bits: int, search: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize groups ``x`` [..., G] (float32): ``(q float32 [..., G], s [..., 1], b [..., 1])``.

    ``s`` and ``b`` are float32 holding f16-exact values. ``search=False`` is plain min-max.
    """
    qmax = (1 << bits) - 1
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    s, b = _round_params((hi - lo) / qmax, lo)
    q, err = _assign(x, s, b, qmax)
    if not search:
        return q, s, b
    mid, half = (hi + lo) * 0.5, (hi - lo) * 0.5
    for shrink in SHRINKS:
        s2, b2 = _round_params(2 * shrink * half / qmax, mid - shrink * half)
        q2, err2 = _assign(x, s2, b2, qmax)
        better = err2 < err
        q, s, b, err = (np.where(better[..., None], q2, q), np.where(better[..., None], s2, s),
                        np.where(better[..., None], b2, b), np.where(better, err2, err))
    for _ in range(_REFITS):
        # Least-squares s, b for the chosen levels (a line through the points (q, x)).
        qm, xm = q.mean(axis=-1, keepdims=True), x.mean(axis=-1, keepdims=True)
        var = np.square(q - qm).sum(axis=-1, keepdims=True)
        cov = ((q - qm) * (x - xm)).sum(axis=-1, keepdims=True)
        ok = var > 0
        s_fit = np.where(ok, cov / np.where(ok, var, 1), s)
        s_fit = np.where(s_fit > 0, s_fit, s)
        s2, b2 = _round_params(s_fit, xm - s_fit * qm)
        q2, err2 = _assign(x, s2, b2, qmax)
        better = err2 < err
        q, s, b, err = (np.where(better[..., None], q2, q), np.where(better[..., None], s2, s),
                        np.where(better[..., None], b2, b), np.where(better, err2, err))
    return q, s, b


def quantize_rtn(w: np.ndarray, bits: int, group_size: int, search: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 ``w`` [rows, cols] -> ``(q uint8, scales f16, biases f16)``, in row chunks."""
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"rows of {cols} values are not a multiple of the group size {group_size}")
    n_groups = cols // group_size
    q = np.empty((rows, cols), dtype=np.uint8)
    scales = np.empty((rows, n_groups), dtype=np.float16)
    biases = np.empty((rows, n_groups), dtype=np.float16)
    step = max(1, _CHUNK_ELEMENTS // cols)
    for r in range(0, rows, step):
        x = np.asarray(w[r:r + step], dtype=np.float32).reshape(-1, n_groups, group_size)
        qc, s, b = fit_groups(x, bits, search)
        q[r:r + step] = qc.reshape(-1, cols)
        scales[r:r + step] = s[..., 0]
        biases[r:r + step] = b[..., 0]
    return q, scales, biases


def quantize_gptq(w: np.ndarray, hessian: np.ndarray, bits: int, group_size: int,
                  block_size: int = 128, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of ``w`` [rows, cols] given ``hessian`` [cols, cols] (sum of x x^T over calibration inputs).

    ``block_size`` must be a multiple of ``group_size`` so a group never straddles two blocks
    (its parameters are fitted on the block's up-to-date copy).
    """
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"rows of {cols} values are not a multiple of the group size {group_size}")
    block_size = max(group_size, block_size - block_size % group_size)
    qmax = (1 << bits) - 1
    W = w.astype(np.float64).copy()
    H = hessian.astype(np.float64).copy()
    dead = np.diag(H) == 0  # inputs never active: any value is free, quantize zeros there
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(cols)] += damp * np.mean(np.diag(H))
    # Upper Cholesky factor of H^-1: row i holds the update coefficients for column i (GPTQ eq. 4).
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    q = np.empty((rows, cols), dtype=np.uint8)
    n_groups = cols // group_size
    scales = np.empty((rows, n_groups), dtype=np.float16)
    biases = np.empty((rows, n_groups), dtype=np.float16)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        s = b = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                g = col // group_size
                _, s32, b32 = fit_groups(W1[:, i:i + group_size].astype(np.float32)[:, None, :], bits)
                s, b = s32[:, 0, 0].astype(np.float64), b32[:, 0, 0].astype(np.float64)
                scales[:, g], biases[:, g] = s, b
            x = W1[:, i]
            qc = np.clip(np.rint((x - b) / s), 0, qmax)
            q[:, col] = qc
            err = (x - (qc * s + b)) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return q, scales, biases
