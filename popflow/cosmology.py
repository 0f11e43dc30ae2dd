"""The one cosmology of popflow: flat Lambda-CDM, H0 = 70 km/s/Mpc, Omega_m = 0.3.

This is the cosmology bagpipes uses internally (``bagpipes.utils.cosmo =
astropy FlatLambdaCDM(H0=70, Om0=0.3)``, no radiation), so the training sets
(:mod:`popflow.sps`), the continuity SFH bin edges (which need the age of the
Universe t_univ(z)) and the emulators' distance modulus all agree. It is not
WMAP9 (the pop-cosmos/Prospector choice): the offline SPS fixes it.

Pure functions of redshift, shape (...) -> (...): given a JAX array (or a
tracer, inside jit/vmap) they compute in ``jax.numpy`` (float32: 1e-6 relative
precision); given NumPy arrays or Python floats they compute in NumPy float64
and return NumPy (the simulator's per-model path, no JAX dispatch). Checked
against astropy in tests/test_cosmology.py.

- Age: closed form for flat LCDM without radiation,
  t(z) = 2 / (3 H0 sqrt(Omega_L)) asinh( sqrt(Omega_L / Omega_m) (1 + z)^(-3/2) ).
- Comoving distance: D_C = c/H0 int_0^z dz'/E(z'), E = sqrt(Omega_m (1+z)^3 + Omega_L),
  by 32-point Gauss-Legendre quadrature on [0, z] (the integrand is smooth;
  the quadrature error is below float32 rounding for z <= 10).
- Luminosity distance D_L = (1 + z) D_C; distance modulus DM = 5 log10(D_L / 10 pc),
  which is -inf at z = 0 (callers floor z; see popflow.sps.Z_MIN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["H0", "OMEGA_M", "OMEGA_L", "C_KM_S", "HUBBLE_TIME_GYR", "HUBBLE_DISTANCE_MPC", "DESCRIPTION",
           "t_univ", "comoving_distance", "luminosity_distance", "distance_modulus"]

H0 = 70.0
"""Hubble constant, km/s/Mpc."""
OMEGA_M = 0.3
"""Matter density today (flat: Omega_L = 1 - Omega_m; radiation neglected, as in bagpipes)."""
OMEGA_L = 1.0 - OMEGA_M
C_KM_S = 299792.458
HUBBLE_TIME_GYR = 977.7922216807891 / H0
"""1/H0 in Gyr (977.79 Gyr km/s/Mpc divided by H0)."""
HUBBLE_DISTANCE_MPC = C_KM_S / H0
"""c/H0 in Mpc."""
DESCRIPTION = {"name": "FlatLambdaCDM", "H0": H0, "Om0": OMEGA_M, "Tcmb0": 0.0,
               "note": "bagpipes' internal cosmology (astropy FlatLambdaCDM(H0=70, Om0=0.3))"}
"""The cosmology as a JSON-able dict, recorded in training stores and artifacts."""

_GL_X, _GL_W = np.polynomial.legendre.leggauss(32)


def _as_array(z):
    """(namespace, array): JAX float32 for JAX arrays and tracers, NumPy float64 otherwise."""
    if isinstance(z, jax.Array):
        return jnp, jnp.asarray(z, jnp.float32)
    return np, np.asarray(z, np.float64)


def t_univ(z):
    """Age of the Universe at redshift ``z`` in Gyr; shape (...) -> (...)."""
    xp, z = _as_array(z)
    x = np.sqrt(OMEGA_L / OMEGA_M) * (1.0 + z) ** -1.5
    return (2.0 / (3.0 * np.sqrt(OMEGA_L))) * HUBBLE_TIME_GYR * xp.arcsinh(x)


def comoving_distance(z):
    """Line-of-sight comoving distance in Mpc; shape (...) -> (...)."""
    xp, z = _as_array(z)
    half = 0.5 * z[..., None]
    nodes = half * (xp.asarray(_GL_X, z.dtype) + 1.0)  # Gauss-Legendre nodes mapped from [-1, 1] to [0, z]
    inv_e = 1.0 / xp.sqrt(OMEGA_M * (1.0 + nodes) ** 3 + OMEGA_L)
    return HUBBLE_DISTANCE_MPC * half[..., 0] * xp.sum(xp.asarray(_GL_W, z.dtype) * inv_e, axis=-1)


def luminosity_distance(z):
    """Luminosity distance in Mpc; shape (...) -> (...). Zero at z = 0."""
    xp, z = _as_array(z)
    return (1.0 + z) * comoving_distance(z)


def distance_modulus(z):
    """DM(z) = 5 log10(D_L / 10 pc) in mag; shape (...) -> (...); -inf at z = 0."""
    xp, z = _as_array(z)
    with np.errstate(divide="ignore"):
        return 5.0 * xp.log10(luminosity_distance(z)) + 25.0
