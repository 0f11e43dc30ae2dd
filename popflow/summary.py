"""Per-galaxy posterior summaries from MCMC draws (pure NumPy).

From draws ``samples`` (n_gal, n_chain, n_draw, dim) in physical coordinates,
with optional per-draw ``weights`` (n_gal, n_chain, n_draw) (importance weights
after reweighting; None means equal weights), :func:`summarize` computes:

- ``<name>_q`` (n_gal, 5): quantiles :data:`QUANTILES` = 2.5, 16, 50, 84, 97.5 %
  of every parameter. Quantiles invert the weighted empirical CDF with the
  midpoint rule: the k-th sorted draw sits at cumulative probability
  ``(W_k - w_k / 2) / W``, linear in between, clamped at the ends. With equal
  weights this is NumPy's ``method="hazen"``, so weighted and unweighted
  summaries are the same estimator.
- ``pz`` (n_gal, n_z): p(z) as a normalised histogram of the redshift draws on
  the fixed grid :data:`Z_EDGES` (0 to 6 in steps of 0.01, the redshift box of
  DESIGN.md); a density in 1/z units, ``sum(pz) * 0.01 = 1``. A histogram, not
  a KDE: it is exact for any weights, needs no bandwidth and its bins are the
  grid everyone integrates over.
- ``z_median`` (n_gal,): the 50 % quantile of redshift; ``z_mode`` (n_gal,): the
  centre of the highest p(z) bin.

Draws that are not finite, or have zero weight, are ignored; a galaxy with no
usable draw (an unusable galaxy, flagged by the fit) gets NaN everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["QUANTILES", "Z_EDGES", "Z_GRID", "weighted_quantiles", "redshift_histogram", "summarize",
           "summary_dataset"]

QUANTILES = np.array([0.025, 0.16, 0.5, 0.84, 0.975])
Z_STEP = 0.01
Z_EDGES = np.round(np.arange(0.0, 6.0 + Z_STEP / 2, Z_STEP), 10)
"""p(z) bin edges: 0, 0.01, ..., 6.0 (600 bins)."""
Z_GRID = 0.5 * (Z_EDGES[1:] + Z_EDGES[:-1])
"""p(z) bin centres: 0.005, 0.015, ..., 5.995."""


def _draw_weights(x: np.ndarray, weights) -> np.ndarray:
    """Non-negative float64 weights shaped like ``x`` (rows, draws), zero where ``x`` is not finite."""
    w = np.ones(x.shape) if weights is None else np.broadcast_to(np.asarray(weights, np.float64), x.shape)
    if np.any(w < 0):
        raise ValueError("weights must be non-negative")
    return np.where(np.isfinite(x) & np.isfinite(w), w, 0.0)


def _float_array(x) -> np.ndarray:
    """x as float32 or float64 (its own precision when it is either: float32 sorts several times faster)."""
    x = np.asarray(x)
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)


def weighted_quantiles(x, q=QUANTILES, weights=None) -> np.ndarray:
    """Quantiles along the last axis: x (..., n) with weights (..., n) or None -> (..., len(q)) float64.

    Midpoint rule on the weighted empirical CDF (module docstring); NaN for rows
    with no finite, positively weighted value. Without weights, the draws are
    sorted once and each quantile interpolates between two order statistics.
    """
    x = _float_array(x)
    q = np.asarray(q, np.float64)
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    if weights is None:
        out = _equal_weight_quantiles(x, q)
    else:
        w = np.reshape(np.broadcast_to(weights, lead + x.shape[-1:]), x.shape)
        out = _weighted_quantiles(x, q, _draw_weights(x, w))
    return out.reshape(lead + (q.size,))


def _equal_weight_quantiles(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """x (rows, n) -> (rows, len(q)): the k-th of the row's n_ok finite draws sits at (k + 1/2) / n_ok."""
    finite = np.isfinite(x)
    xs = np.sort(np.where(finite, x, np.nan), axis=-1)  # NaN last
    n_ok = finite.sum(axis=-1)[:, None]
    pos = q[None, :] * n_ok - 0.5
    top = np.maximum(n_ok - 1, 0)
    lo = np.clip(np.floor(pos), 0, top).astype(np.intp)
    hi = np.minimum(lo + 1, top)
    t = np.clip(pos - lo, 0.0, 1.0)
    x_lo = np.take_along_axis(xs, lo, axis=-1).astype(np.float64)
    x_hi = np.take_along_axis(xs, hi, axis=-1).astype(np.float64)
    return np.where(n_ok > 0, x_lo + t * (x_hi - x_lo), np.nan)


def _weighted_quantiles(x: np.ndarray, q: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x (rows, n), float64 weights w (rows, n) >= 0, zero at non-finite x -> (rows, len(q)).

    One argsort per row; only the cumulative weights are laid out in sorted order, the draws
    themselves are looked up at the two order statistics each quantile interpolates between.
    """
    order = np.argsort(np.where(w > 0, x, np.inf), axis=-1)  # zero-weight draws sort last, never interpolated between
    ws = np.take_along_axis(w, order, axis=-1)
    total = ws.sum(axis=-1, keepdims=True)
    c = np.cumsum(ws, axis=-1)
    ws *= 0.5
    c -= ws
    with np.errstate(invalid="ignore", divide="ignore"):
        c /= total  # (rows, n): midpoint cumulative probabilities, non-decreasing in [0, 1]
    c[total[:, 0] == 0] = 0.0
    n_pos = (ws > 0).sum(axis=-1)[:, None]
    below = np.stack([(c < p).sum(axis=-1) for p in q], axis=-1)  # per row, the cumulative positions below each q
    hi = np.minimum(below, np.maximum(n_pos - 1, 0))
    lo = np.maximum(hi - 1, 0)
    c_lo, c_hi = np.take_along_axis(c, lo, -1), np.take_along_axis(c, hi, -1)

    def sorted_draw(k):  # the k-th smallest positively weighted draw of each row
        return np.take_along_axis(x, np.take_along_axis(order, k, -1), -1).astype(np.float64)

    x_lo, x_hi = sorted_draw(lo), sorted_draw(hi)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(c_hi > c_lo, (q - c_lo) / (c_hi - c_lo), 1.0)
        out = np.where(q <= c[:, :1], sorted_draw(np.zeros_like(lo[:, :1])), x_lo + np.clip(t, 0.0, 1.0) * (x_hi - x_lo))
    return np.where(n_pos > 0, out, np.nan)


def redshift_histogram(z, weights=None, edges=Z_EDGES) -> np.ndarray:
    """Normalised p(z) histogram per row: z (n_gal, n) -> (n_gal, len(edges) - 1), density in 1/z.

    Draws outside [edges[0], edges[-1]] are ignored; NaN rows for galaxies without usable draws.
    """
    z = np.asarray(z, np.float64)
    w = _draw_weights(z, weights)
    n_gal, n_bins = z.shape[0], len(edges) - 1
    inside = (z >= edges[0]) & (z <= edges[-1])
    w = np.where(inside, w, 0.0)
    b = np.clip(np.searchsorted(edges, np.where(inside, z, edges[0]), side="right") - 1, 0, n_bins - 1)
    flat = np.bincount((np.arange(n_gal)[:, None] * n_bins + b).ravel(), weights=w.ravel(), minlength=n_gal * n_bins)
    hist = flat.reshape(n_gal, n_bins)
    total = hist.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hist / (total * np.diff(edges)), np.nan)


def summarize(samples, names: Sequence[str], weights=None, redshift: str = "redshift") -> dict[str, np.ndarray]:
    """Summaries of draws: samples (n_gal, n_chain, n_draw, dim) physical, weights (n_gal, n_chain, n_draw) or None.

    Returns float32 arrays: ``<name>_q`` (n_gal, 5) for every name, ``pz`` (n_gal, 600) on
    :data:`Z_GRID`, ``z_median`` and ``z_mode`` (n_gal,).
    """
    samples = np.asarray(samples)
    if samples.ndim != 4 or samples.shape[-1] != len(names):
        raise ValueError(f"samples must be (n_gal, n_chain, n_draw, {len(names)}), got {samples.shape}")
    n_gal, dim = samples.shape[0], samples.shape[-1]
    flat = samples.reshape(n_gal, -1, dim)
    w = None if weights is None else np.asarray(weights).reshape(n_gal, -1)
    q = weighted_quantiles(np.moveaxis(flat, -1, 1), QUANTILES, None if w is None else w[:, None, :])
    out = {f"{name}_q": q[:, i].astype(np.float32) for i, name in enumerate(names)}
    iz = list(names).index(redshift)
    pz = redshift_histogram(flat[..., iz], w)
    mode = np.where(np.isfinite(pz[:, 0]), Z_GRID[np.argmax(np.nan_to_num(pz, nan=-1.0), axis=1)], np.nan)
    out.update(pz=pz.astype(np.float32), z_median=out[f"{redshift}_q"][:, 2].copy(), z_mode=mode.astype(np.float32))
    return out


def summary_dataset(summary: dict[str, np.ndarray], galaxy_id=None):
    """Wrap :func:`summarize` output as an xarray Dataset with dims (galaxy, quantile | z_grid)."""
    import xarray as xr

    data = {}
    for k, v in summary.items():
        dims = ("galaxy", "quantile") if k.endswith("_q") else ("galaxy", "z_grid") if k == "pz" else ("galaxy",)
        data[k] = (dims, v)
    coords = {"quantile": QUANTILES, "z_grid": Z_GRID.astype(np.float32)}
    if galaxy_id is not None:
        coords["galaxy_id"] = ("galaxy", np.asarray(galaxy_id))
    return xr.Dataset(data, coords=coords)
