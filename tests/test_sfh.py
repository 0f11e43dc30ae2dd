"""The continuity SFH shared by the simulator and the spectral emulator's inputs."""

import jax.numpy as jnp
import numpy as np

from popflow import cosmology
from popflow.sfh import AGE_EPS, bin_edges_myr, log_mass_fractions


def test_bin_edges_follow_the_definition_at_every_redshift():
    z = np.array([1e-3, 0.5, 2.0, 6.0])
    edges = bin_edges_myr(z)
    assert edges.shape == (4, 8) and edges.dtype == np.float64
    for row, zi in zip(edges, z):
        t = 1e3 * float(cosmology.t_univ(zi))
        expect = np.concatenate([[0.0, 30.0], np.geomspace(100.0, 0.85 * t, 5), [(1 - AGE_EPS) * t]])
        np.testing.assert_allclose(row, expect, rtol=1e-12)
        assert np.all(np.diff(row) > 0) and row[-1] < t  # no star older than the Universe
    # the JAX path (float32) agrees to float32 precision
    np.testing.assert_allclose(np.asarray(bin_edges_myr(jnp.asarray(z, jnp.float32))), edges, rtol=2e-6)


def test_mass_fractions_sum_to_one_and_follow_the_ratios():
    rng = np.random.default_rng(0)
    r = rng.uniform(-5, 5, (200, 6))
    z = rng.uniform(1e-3, 6, 200)
    lf = log_mass_fractions(r, z)
    np.testing.assert_allclose(np.sum(10.0**lf, -1), 1.0, rtol=1e-12)
    dt = np.diff(bin_edges_myr(z), axis=-1)
    # log SFR_i - log SFR_(i+1) = logsfr_ratio_i: mass ratios of neighbouring bins
    np.testing.assert_allclose(lf[:, :-1] - lf[:, 1:], r + np.log10(dt[:, :-1] / dt[:, 1:]), atol=1e-10)
    # constant SFR: fractions are the bin widths over the total
    flat = log_mass_fractions(np.zeros((1, 6)), np.array([1.0]))
    width = np.diff(bin_edges_myr(1.0))
    np.testing.assert_allclose(10.0 ** flat[0], width / width.sum(), rtol=1e-12)
    jx = np.asarray(log_mass_fractions(jnp.asarray(r, jnp.float32), jnp.asarray(z, jnp.float32)))
    np.testing.assert_allclose(jx, lf, atol=2e-4)  # float32 over a 10-dex range
