"""The batched ensemble sampler on targets with known answers, and its diagnostics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from popflow import sampler


def _keys(n, seed=0):
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.arange(n))


def _run(log_prob, x0, n_burn, n_steps, thin, seed=0, de_prob=0.0):
    g = x0.shape[0]

    @jax.jit
    def go(x0):
        st = sampler.init(x0, log_prob)
        if n_burn:
            st, _ = sampler.run(_keys(g, seed), st, log_prob, n_burn, thin=n_burn, de_prob=de_prob)
        return sampler.run(_keys(g, seed + 1), st, log_prob, n_steps, thin=thin, de_prob=de_prob)[1]

    return go(jnp.asarray(x0, jnp.float32))


def test_correlated_gaussian_moments_within_monte_carlo_error():
    """8 independent ensembles (as 8 'galaxies') sample a 4-D correlated Gaussian with the pure stretch move."""
    d, g, w = 4, 8, 16
    rng = np.random.default_rng(0)
    a = rng.normal(size=(d, d))
    cov = a @ a.T / d + 0.3 * np.eye(d)
    cov[0, 1] = cov[1, 0] = 0.9 * np.sqrt(cov[0, 0] * cov[1, 1])  # one strong correlation
    prec = np.linalg.inv(cov).astype(np.float32)
    mu = rng.normal(size=d).astype(np.float32) * 3

    def log_prob(x):
        r = x - mu
        return -0.5 * jnp.einsum("...i,ij,...j->...", r, prec, r)

    x0 = mu + 2.0 + 0.1 * rng.normal(size=(g, w, d))  # start off-centre in a small ball
    tr = _run(log_prob, x0, 1000, 4000, 4)
    ch = np.asarray(tr.positions, np.float64)  # (g, w, n, d)
    tau = float(np.max(sampler.autocorr_time(ch)))  # in draws, worst parameter and ensemble
    n_eff = g * w * ch.shape[2] / tau
    assert n_eff > 2000, f"too few effective samples ({n_eff:.0f}) for the tolerances below"
    s = ch.reshape(-1, d)
    mean, c = s.mean(0), np.cov(s.T)
    # Monte Carlo standard errors from n_eff (Gaussian formulas): se(mean_i) = sqrt(C_ii / n_eff),
    # se(C_ij) = sqrt((C_ii C_jj + C_ij^2) / n_eff). 4.5 se over 4 + 10 checks: false-alarm rate < 1e-4;
    # dropping the z^(d-1) factor shrinks the variances by ~40% (> 10 se here).
    se_mean = np.sqrt(np.diag(cov) / n_eff)
    assert np.all(np.abs(mean - mu) < 4.5 * se_mean), (mean - mu) / se_mean
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n_eff)
    assert np.all(np.abs(c - cov) < 4.5 * se_cov), (c - cov) / se_cov
    assert 0.2 < float(np.mean(tr.acceptance_rate)) < 0.8


def test_banana_target_with_mixed_moves():
    """x1 ~ N(0, 1), x2 | x1 ~ N(x1^2, 0.5^2): E x2 = 1, Var x2 = 0.25 + 2 = 2.25, Var x1 = 1 (stretch + DE moves)."""
    g, w = 8, 8

    def log_prob(x):
        return -0.5 * x[..., 0] ** 2 - 0.5 * ((x[..., 1] - x[..., 0] ** 2) / 0.5) ** 2

    x0 = np.random.default_rng(1).normal(size=(g, w, 2)) * 0.1 + np.array([0.5, 0.0])
    tr = _run(log_prob, x0, 1000, 8000, 4, de_prob=0.5)
    ch = np.asarray(tr.positions, np.float64)
    tau = float(np.max(sampler.autocorr_time(ch)))
    n_eff = g * w * ch.shape[2] / tau
    x1, x2 = ch[..., 0].ravel(), ch[..., 1].ravel()
    # se of a mean sqrt(var / n_eff); of a variance sqrt((m4 - var^2) / n_eff) with the exact 4th central
    # moments (x1: 3; x2 = x1^2 + e: E(x2 - 1)^4 = 60 + 6 * 2 * 0.25 + 3 * 0.25^2 = 63.19). 5 se: x2's heavy tail
    # makes its variance estimate the noisiest.
    assert abs(x1.mean()) < 5 * math.sqrt(1 / n_eff)
    assert abs(x2.mean() - 1.0) < 5 * math.sqrt(2.25 / n_eff)
    assert abs(x1.var() - 1.0) < 5 * math.sqrt(2 / n_eff)
    assert abs(x2.var() - 2.25) < 5 * math.sqrt((63.19 - 2.25**2) / n_eff)


@pytest.mark.parametrize("d", [3, 6])
def test_stretch_acceptance_includes_the_z_power_d_minus_1_factor(d):
    """On a flat target every stretch proposal is accepted with probability min(1, z^(d-1)), z ~ g(z) on [1/2, 2]."""
    g_norm = 2 * (math.sqrt(2) - math.sqrt(0.5))
    expected = integrate.quad(lambda z: min(1.0, z ** (d - 1)) / math.sqrt(z) / g_norm, 0.5, 2.0, points=[1.0])[0]
    x0 = np.random.default_rng(2).normal(size=(200, 2 * d, d))
    tr = _run(lambda x: jnp.zeros(x.shape[:-1]), x0, 0, 20, 20)
    rate = float(np.mean(tr.acceptance_rate))
    # 200 * 2d * 20 >= 24000 Bernoulli trials: se <= 0.003; without the factor the rate would be 1
    assert rate == pytest.approx(expected, abs=0.015)
    assert expected < 0.85


def test_aux_follows_accept_decisions_and_galaxies_are_independent_of_batch():
    def log_prob(x):
        return -0.5 * jnp.sum(x**2, -1), {"twice": 2.0 * x[..., 0]}

    x0 = np.random.default_rng(3).normal(size=(5, 6, 3)).astype(np.float32)

    def go(x0):
        st = sampler.init(x0, log_prob)
        return sampler.run(_keys(x0.shape[0]), st, log_prob, 30, thin=3)[1]

    big, small = go(x0), go(x0[:2])
    np.testing.assert_array_equal(np.asarray(big.aux["twice"]), 2.0 * np.asarray(big.positions[..., 0]))
    np.testing.assert_allclose(np.asarray(big.log_prob), -0.5 * np.sum(np.asarray(big.positions) ** 2, -1), rtol=1e-5)
    # galaxy g's chain depends on its own key and start only, not on the batch it sits in
    np.testing.assert_array_equal(np.asarray(big.positions[:2]), np.asarray(small.positions))
    assert big.positions.shape == (5, 6, 10, 3)


def test_autocorrelation_time_of_ar1_chains():
    """AR(1) with coefficient rho has integrated time (1 + rho) / (1 - rho) = 9 for rho = 0.8."""
    rng = np.random.default_rng(4)
    rho, w, n = 0.8, 32, 4000
    x = np.zeros((w, n, 1))
    e = rng.normal(size=(w, n, 1)) * math.sqrt(1 - rho**2)
    x[:, 0] = rng.normal(size=(w, 1))
    for t in range(1, n):
        x[:, t] = rho * x[:, t - 1] + e[:, t]
    tau = float(sampler.autocorr_time(x)[0])
    # 32 x 4000 draws = 14000 tau: the windowed estimate is within a few per cent (bias + noise)
    assert tau == pytest.approx(9.0, rel=0.1)
    # white noise: tau = 1
    assert float(sampler.autocorr_time(rng.normal(size=(w, n, 1)))[0]) == pytest.approx(1.0, abs=0.1)


def test_split_rhat_flags_disagreeing_walkers():
    rng = np.random.default_rng(5)
    iid = rng.normal(size=(16, 400, 2))
    assert np.all(np.asarray(sampler.split_rhat(iid)) < 1.02)
    shifted = iid.copy()
    shifted[:8] += 2.0  # half the walkers 2 sd away: R-hat = sqrt(1 + 1) = 1.41
    assert np.all(np.asarray(sampler.split_rhat(shifted)) > 1.3)
    drift = iid + np.linspace(0, 2, 400)[None, :, None]  # a trend within each walker: the split catches it
    assert np.all(np.asarray(sampler.split_rhat(drift)) > 1.1)
    stuck = iid.copy()
    stuck[:] = rng.normal(size=(16, 1, 2))  # walkers that never move (float32 rounding may leave a tiny variance)
    assert np.all(np.asarray(sampler.split_rhat(stuck)) > 100)


def test_init_rejects_too_few_walkers():
    with pytest.raises(ValueError, match="walkers"):
        sampler.init(jnp.zeros((1, 4, 3)), lambda x: jnp.zeros(x.shape[:-1]))
