"""The 7-bin continuity star-formation history (Leja et al. 2019): bin edges and mass fractions.

One definition shared by the simulator (:mod:`popflow.sps`, NumPy float64) and
the spectral emulator's inputs (JAX float32); like :mod:`popflow.cosmology`,
the functions compute in ``jax.numpy`` when given a JAX array or tracer and in
NumPy otherwise.

Bins in lookback time: 0-30 Myr, 30-100 Myr, four bins log-spaced from 100 Myr
to 0.85 t_univ(z), and [0.85, 1] t_univ(z), the oldest edge capped at
``(1 - AGE_EPS) t_univ(z)`` (bagpipes returns a zero stellar spectrum, with
only a warning, if any star formed before the Big Bang). popflow's
``logsfr_ratio_i`` is log10 SFR(bin i) / SFR(bin i+1), bin 1 the youngest, so
with SFR constant inside each bin the mass formed in bin i is

    M_i ∝ dt_i 10**(sum_{j >= i} logsfr_ratio_j)     (the oldest bin: dt_7)
"""

from __future__ import annotations

import numpy as np

from popflow import cosmology

__all__ = ["N_BINS", "AGE_EPS", "bin_edges_myr", "log_mass_fractions"]

N_BINS = 7
AGE_EPS = 1e-3
"""The oldest SFH edge is (1 - AGE_EPS) t_univ(z), safely younger than the Universe."""


def bin_edges_myr(z):
    """Bin edges in lookback time, Myr, ascending; z (...) -> (..., 8)."""
    xp, z = cosmology._as_array(z)
    t_myr = 1e3 * cosmology.t_univ(z)
    frac = xp.asarray(np.linspace(0.0, 1.0, 5), z.dtype)
    inner = 100.0 * (0.85 * t_myr[..., None] / 100.0) ** frac  # geomspace(100, 0.85 t, 5)
    young = xp.broadcast_to(xp.asarray([0.0, 30.0], z.dtype), z.shape + (2,))
    return xp.concatenate([young, inner, ((1.0 - AGE_EPS) * t_myr)[..., None]], axis=-1)


def log_mass_fractions(log_sfr_ratios, z):
    """log10 of the fraction of the mass formed in each bin, youngest first.

    ``log_sfr_ratios`` (..., 6), ``z`` (...) -> (..., 7); the fractions sum to 1.
    """
    xp, z = cosmology._as_array(z)
    r = xp.asarray(log_sfr_ratios, z.dtype)
    log_dt = xp.log10(xp.diff(bin_edges_myr(z), axis=-1))
    # log10 SFR_i relative to the oldest bin: reverse cumulative sum of the ratios, then 0 for bin 7
    log_sfr = xp.concatenate([xp.flip(xp.cumsum(xp.flip(r, -1), -1), -1), xp.zeros_like(r[..., :1])], axis=-1)
    log_m = log_sfr + log_dt
    peak = xp.max(log_m, axis=-1, keepdims=True)
    return log_m - peak - xp.log10(xp.sum(10.0 ** (log_m - peak), axis=-1, keepdims=True))
