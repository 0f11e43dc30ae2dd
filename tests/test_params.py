import jax
import jax.numpy as jnp
import numpy as np
import pytest

from popflow.params import DEFAULT_SPACE, ParameterSpace


def test_default_space_matches_design():
    s = DEFAULT_SPACE
    assert s.dim == 14
    assert s.names[0] == "log_mass" and s.names[-1] == "redshift"
    assert s["redshift"].lower == 0 and s["redshift"].upper == 6
    assert s["log_zstar"].lower == pytest.approx(-1.98)


def test_latent_round_trip_and_bounds():
    s = DEFAULT_SPACE
    phi = jax.random.normal(jax.random.PRNGKey(0), (1000, s.dim)) * 2.0
    theta = s.from_latent(phi)
    assert bool(jnp.all(s.in_bounds(theta)))
    # float32 probit inverse loses precision in the tails; |phi| < 4 keeps 1e-3.
    back = s.to_latent(theta)
    ok = jnp.abs(phi) < 4
    np.testing.assert_allclose(np.asarray(back)[np.asarray(ok)], np.asarray(phi)[np.asarray(ok)], atol=2e-3)


def test_log_jacobian_matches_autodiff():
    s = DEFAULT_SPACE
    phi = jax.random.normal(jax.random.PRNGKey(1), (s.dim,))
    jac = jax.jacfwd(s.from_latent)(phi)
    expected = np.linalg.slogdet(np.asarray(jac, dtype=np.float64))[1]
    assert float(s.log_jacobian(phi)) == pytest.approx(expected, rel=1e-5)


def test_standard_normal_latent_is_uniform_in_box():
    # A standard normal in latent space maps to the uniform density on the box,
    # so log N(phi) - log_jacobian(phi) must equal -log(volume) everywhere.
    s = DEFAULT_SPACE
    phi = jax.random.normal(jax.random.PRNGKey(2), (50, s.dim))
    log_n = jnp.sum(jax.scipy.stats.norm.logpdf(phi), axis=-1)
    np.testing.assert_allclose(np.asarray(log_n - s.log_jacobian(phi)), -s.log_volume, rtol=1e-5)


def test_check_names_offending_parameter():
    s = DEFAULT_SPACE
    theta = np.tile((s.lower + s.upper) / 2, (3, 1))
    theta[2, s.index("dust2")] = -1
    with pytest.raises(ValueError, match=r"dust2 = -1.0 at row 2"):
        s.check(theta)
    with pytest.raises(KeyError, match="unknown parameter 'mass'"):
        s.index("mass")


def test_serialisation_and_id():
    s = DEFAULT_SPACE
    s2 = ParameterSpace.from_dict(s.to_dict())
    assert s2 == s and s2.id == s.id
    assert s.subset(["redshift", "log_mass"]).id != s.id
