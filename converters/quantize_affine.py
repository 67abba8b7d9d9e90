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


def refit_groups(w: np.ndarray, q: np.ndarray, scales: np.ndarray, biases: np.ndarray, hessian: np.ndarray,
                 group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-solve every group's scale and bias for fixed levels ``q``, minimizing the output error
    ``(w - w_hat) H (w - w_hat)^T`` of each row (``w_hat = s q + b`` per group).

    GPTQ chooses the levels with error compensation, but the group parameters it quantizes
    against were fitted before (to the weights, not to the output); for fixed levels the best
    parameters solve a small linear system per row (2 unknowns per group; the groups of a row are
    coupled through H). A row keeps its old parameters unless the f16-rounded new ones are better.
    """
    rows, cols = w.shape
    n_groups = cols // group_size
    W, Q, H = w.astype(np.float64), q.astype(np.float64), hessian.astype(np.float64)
    grouped = lambda a: a.reshape(*a.shape[:-1], n_groups, group_size).sum(-1)  # noqa: E731
    HW = W @ H                                                   # [rows, cols]
    rhs = np.empty((rows, 2 * n_groups))
    rhs[:, 0::2], rhs[:, 1::2] = grouped(Q * HW), grouped(HW)
    lhs = np.empty((rows, 2 * n_groups, 2 * n_groups))
    for g in range(n_groups):
        cols_g = slice(g * group_size, (g + 1) * group_size)
        P = Q[:, cols_g] @ H[cols_g, :]                          # [rows, cols]: H_{., g} q_g
        h1 = H[cols_g, :].sum(0)                                 # [cols]:       H_{., g} 1
        lhs[:, 0::2, 2 * g], lhs[:, 1::2, 2 * g] = grouped(Q * P), grouped(P)
        lhs[:, 0::2, 2 * g + 1], lhs[:, 1::2, 2 * g + 1] = grouped(Q * h1), grouped(h1)[None, :]
    ridge = 1e-9 * np.trace(lhs, axis1=1, axis2=2)[:, None] / (2 * n_groups)
    lhs[:, np.arange(2 * n_groups), np.arange(2 * n_groups)] += ridge
    theta = np.linalg.solve(lhs, rhs[..., None])[..., 0]
    s_new, b_new = theta[:, 0::2].astype(np.float16), theta[:, 1::2].astype(np.float16)

    def row_error(s16: np.ndarray, b16: np.ndarray) -> np.ndarray:
        d = W - (Q.reshape(rows, n_groups, group_size) * s16.astype(np.float64)[..., None]
                 + b16.astype(np.float64)[..., None]).reshape(rows, cols)
        return ((d @ H) * d).sum(1)

    ok = np.isfinite(theta).all(1) & np.isfinite(s_new.astype(np.float32)).all(1) \
        & np.isfinite(b_new.astype(np.float32)).all(1)
    better = ok & (row_error(s_new, b_new) < row_error(scales, biases))
    return np.where(better[:, None], s_new, scales), np.where(better[:, None], b_new, biases)


def quantize_gptq(w: np.ndarray, hessian: np.ndarray, bits: int, group_size: int,
                  block_size: int = 128, damp: float = 0.1, act_order: bool = True, refit: bool = True
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of ``w`` [rows, cols] given ``hessian`` [cols, cols] (sum of x x^T over calibration inputs).

    ``act_order`` (the default) sweeps the columns by decreasing ``H[j, j]`` -- the inputs that
    carry the most energy first, while many columns are left to absorb their error -- with
    "static" groups: every group's scale and bias are fitted (with the RTN clip search) on the
    original weights before the sweep, since a group's columns are no longer visited together.
    Without it, columns go left to right and a group is fitted when the sweep reaches it, on the
    already-compensated weights (``block_size`` is then rounded to a multiple of ``group_size``).
    ``refit`` finally re-solves the group parameters for the chosen levels (:func:`refit_groups`).
    ``damp`` (times the mean of diag H, added to the diagonal) regularizes H; on SmolLM2 INT4
    perplexity was 26.34 at 0.003, 26.33 at 0.01 and 26.26 for 0.05 to 0.25.
    """
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"rows of {cols} values are not a multiple of the group size {group_size}")
    qmax = (1 << bits) - 1
    n_groups = cols // group_size
    W = w.astype(np.float64).copy()
    H = hessian.astype(np.float64).copy()
    dead = np.diag(H) == 0  # inputs never active: any value is free, quantize zeros there
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(cols)] += damp * np.mean(np.diag(H))
    scales = np.empty((rows, n_groups), dtype=np.float16)
    biases = np.empty((rows, n_groups), dtype=np.float16)
    if act_order:
        _, s_all, b_all = fit_groups(W.astype(np.float32).reshape(rows, n_groups, group_size), bits)
        scales[:], biases[:] = s_all[..., 0], b_all[..., 0]
        s_all, b_all = s_all[..., 0].astype(np.float64), b_all[..., 0].astype(np.float64)
        perm = np.argsort(-np.diag(H), kind="stable")
    else:
        block_size = max(group_size, block_size - block_size % group_size)
        perm = np.arange(cols)
    W0, H0 = W, H
    W, H = W[:, perm], H[np.ix_(perm, perm)]
    # Upper Cholesky factor of H^-1: row i holds the update coefficients for column i (GPTQ eq. 4).
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    q = np.empty((rows, cols), dtype=np.uint8)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // group_size
            if act_order:
                s, b = s_all[:, g], b_all[:, g]
            elif col % group_size == 0:
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
    if refit:
        scales, biases = refit_groups(W0, q, scales, biases, H0, group_size)
    return q, scales, biases
