"""popflow.cosmology against astropy (the cosmology bagpipes uses internally)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from astropy.cosmology import FlatLambdaCDM

from popflow import cosmology

Z = np.array([1e-3, 5e-3, 0.1, 0.5, 1.0, 2.0, 3.0, 6.0, 10.0])
ASTROPY = FlatLambdaCDM(H0=cosmology.H0, Om0=cosmology.OMEGA_M)


def test_numpy_path_matches_astropy():
    np.testing.assert_allclose(cosmology.t_univ(Z), ASTROPY.age(Z).value, rtol=1e-10)
    np.testing.assert_allclose(cosmology.luminosity_distance(Z), ASTROPY.luminosity_distance(Z).value, rtol=1e-10)
    np.testing.assert_allclose(cosmology.distance_modulus(Z), ASTROPY.distmod(Z).value, atol=1e-8)
    assert isinstance(cosmology.t_univ(1.0), np.floating)


def test_jax_path_is_jittable_and_float32_accurate():
    dm = jax.jit(cosmology.distance_modulus)(jnp.asarray(Z))
    assert dm.dtype == jnp.float32
    # float32 rounding of a ~45 mag number and of the quadrature sum: a few 1e-6 mag
    np.testing.assert_allclose(np.asarray(dm), ASTROPY.distmod(Z).value, atol=2e-5)
    t = jax.vmap(cosmology.t_univ)(jnp.asarray(Z))
    np.testing.assert_allclose(np.asarray(t), ASTROPY.age(Z).value, rtol=1e-6)


def test_z_zero_edge():
    assert cosmology.luminosity_distance(0.0) == 0.0
    assert cosmology.distance_modulus(0.0) == -np.inf
    assert float(cosmology.distance_modulus(jnp.zeros(()))) == -np.inf
    assert cosmology.t_univ(0.0) == pytest.approx(ASTROPY.age(0).value, rel=1e-12)
