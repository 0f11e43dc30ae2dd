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


def test_correlated_16d_gaussian_batched_over_100_targets():
    """100 independent ensembles (as 100 'galaxies', each with its own mean) sample a correlated 16-D Gaussian
    with the pure stretch move; the pooled standardised draws must have the right mean and covariance."""
    d, g, w = 16, 100, 32
    rng = np.random.default_rng(0)
    a = rng.normal(size=(d, d))
    shear = np.eye(d)
    shear[1, 0] = 3.0  # x1 += 3 x0: one strong correlation, still positive definite
    cov = shear @ (a @ a.T / d + 0.3 * np.eye(d)) @ shear.T
    prec = np.linalg.inv(cov).astype(np.float32)
    mu = (3 * rng.normal(size=(g, 1, d))).astype(np.float32)  # one target per galaxy

    def log_prob(x):
        r = x - mu
        return -0.5 * jnp.einsum("...i,ij,...j->...", r, prec, r)

    x0 = mu + 1.0 + 0.1 * rng.normal(size=(g, w, d))  # start off-centre in a small ball
    tr = _run(log_prob, x0, 1500, 1500, 15)
    ch = np.asarray(tr.positions, np.float64) - mu[:, :, None, :]  # (g, w, n, d), centred on each target
    tau = float(np.max(sampler.autocorr_time(ch)))  # in draws, worst parameter
    n_eff = g * w * ch.shape[2] / tau
    assert n_eff > 800, f"too few effective samples ({n_eff:.0f}) for the tolerances below"
    s = ch.reshape(-1, d)
    mean, c = s.mean(0), np.cov(s.T)
    # Monte Carlo standard errors from n_eff (Gaussian formulas): se(mean_i) = sqrt(C_ii / n_eff),
    # se(C_ij) = sqrt((C_ii C_jj + C_ij^2) / n_eff). 5 se over 16 + 136 checks: false-alarm rate < 1e-4;
    # dropping the z^(d-1) factor shrinks the variances by far more than 5 se here.
    se_mean = np.sqrt(np.diag(cov) / n_eff)
    assert np.all(np.abs(mean) < 5 * se_mean), mean / se_mean
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n_eff)
    assert np.all(np.abs(c - cov) < 5 * se_cov), (c - cov) / se_cov
    assert 0.1 < float(np.mean(tr.acceptance_rate)) < 0.8


def test_banana_target_batched_over_100_targets_with_mixed_moves():
    """x1 ~ N(0, 1), x2 | x1 ~ N(x1^2, 0.5^2): E x2 = 1, Var x2 = 0.25 + 2 = 2.25, Var x1 = 1 (stretch + DE moves)."""
    g, w = 100, 8

    def log_prob(x):
        return -0.5 * x[..., 0] ** 2 - 0.5 * ((x[..., 1] - x[..., 0] ** 2) / 0.5) ** 2

    x0 = np.random.default_rng(1).normal(size=(g, w, 2)) * 0.1 + np.array([0.5, 0.0])
    tr = _run(log_prob, x0, 1000, 4000, 4, de_prob=0.5)
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
    # quantiles too: P(x2 < 0) = P(x1^2 + 0.5 e < 0), by quadrature; se of a fraction sqrt(p (1 - p) / n_eff)
    p0 = integrate.quad(lambda t: math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi) * 0.5 * math.erfc(t * t / 0.5 / math.sqrt(2)), -8, 8)[0]
    assert abs(np.mean(x2 < 0) - p0) < 5 * math.sqrt(p0 * (1 - p0) / n_eff)


def test_independence_move_restores_the_weights_of_separated_modes():
    """Two well-separated 4-D Gaussian modes with weights 0.3 / 0.7 (sd 1 and 0.5, 12 sd apart) and every walker
    started in the light one: stretch moves alone never leave it; adding the independence move with a
    mixture proposal at the modes (deliberately wrong weights 0.5 / 0.5, widths 1.2 x the truth) must give
    P(mode 2) = 0.7 — the move's acceptance ratio, not the proposal's weights, sets the mode weights."""
    g, w, d = 50, 16, 4
    m1, m2 = np.zeros(d), np.full(d, 6.0)
    s1, s2, w2 = 1.0, 0.5, 0.7

    def log_prob(x):
        l1 = math.log(1 - w2) - d * math.log(s1) - 0.5 * jnp.sum((x - m1) ** 2, -1) / s1**2
        l2 = math.log(w2) - d * math.log(s2) - 0.5 * jnp.sum((x - m2) ** 2, -1) / s2**2
        return jnp.logaddexp(l1, l2)

    eye = np.broadcast_to(np.eye(d), (g, 2, d, d))
    sd = np.broadcast_to(1.2 * np.array([[s1] * d, [s2] * d]), (g, 2, d))
    mix = sampler.Mixture(jnp.asarray(np.broadcast_to(np.stack([m1, m2]), (g, 2, d)), jnp.float32), jnp.asarray(eye, jnp.float32),
                          jnp.asarray(sd, jnp.float32), jnp.zeros((g, 2)))
    x0 = jnp.asarray(np.random.default_rng(6).normal(size=(g, w, d)), jnp.float32)  # all in mode 1

    @jax.jit
    def go(x0, ind_prob):
        st = sampler.init(x0, log_prob)
        st, _ = sampler.run(_keys(g, 0), st, log_prob, 200, thin=200, mixture=mix, ind_prob=ind_prob)
        return sampler.run(_keys(g, 1), st, log_prob, 400, thin=4, mixture=mix, ind_prob=ind_prob)[1]

    stuck = np.asarray(go(x0, 0.0).positions)
    # which mode: the coordinates' mean is 6 of its sd (0.5) from the midpoint 3 in mode 1, 12 in mode 2
    assert np.mean(stuck.mean(-1) > 3.0) == 0.0  # stretch moves never cross 12 sd of empty space
    ch = np.asarray(go(x0, 0.3).positions)
    in2 = (ch.mean(-1) > 3.0).astype(np.float64)
    tau = float(np.max(sampler.autocorr_time(in2[..., None])))  # worst galaxy, in draws
    n_eff = in2.size / tau
    # binomial se from the effective sample size; 5 se keeps the false-alarm rate < 1e-6; equal weights (0.5)
    # would sit > 20 se away
    assert abs(in2.mean() - w2) < 5 * math.sqrt(w2 * (1 - w2) / n_eff), (in2.mean(), n_eff)
    # and within mode 2 the spread is the target's (sd 0.5), not the proposal's (0.6)
    x2 = ch[..., 1][ch.mean(-1) > 3.0]
    assert abs(x2.std() - s2) < 5 * s2 / math.sqrt(2 * n_eff * w2)


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

    @jax.jit  # one compilation per batch size (eager scans and ops would each compile on their own)
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


def test_ensemble_rhat_flags_disagreeing_or_drifting_ensembles():
    rng = np.random.default_rng(5)
    iid = rng.normal(size=(2, 16, 200, 2))  # 2 ensembles x 16 walkers x 200 draws
    assert np.all(np.asarray(sampler.ensemble_rhat(iid)) < 1.02)
    shifted = iid.copy()
    shifted[1] += 1.0  # the second ensemble 1 sd away (e.g. stuck in another mode)
    assert np.all(np.asarray(sampler.ensemble_rhat(shifted)) > 1.1)
    wide = iid.copy()
    wide[1] *= 2.0  # same centre, twice the spread: the folded R-hat catches it
    assert np.all(np.asarray(sampler.ensemble_rhat(wide)) > 1.05)
    drift = iid + np.linspace(0, 2, 200)[:, None]  # both ensembles drift together: the time split catches it
    assert np.all(np.asarray(sampler.ensemble_rhat(drift)) > 1.1)
    # a monotonic transform changes nothing (rank normalisation)
    np.testing.assert_allclose(np.asarray(sampler.ensemble_rhat(np.exp(shifted))), np.asarray(sampler.ensemble_rhat(shifted)), rtol=1e-5)
    # many walkers agreeing within each ensemble do not hide a disagreement between ensembles
    assert sampler.ensemble_rhat(shifted[None]).shape == (1, 2)


def test_init_rejects_too_few_walkers():
    with pytest.raises(ValueError, match="walkers"):
        sampler.init(jnp.zeros((1, 4, 3)), lambda x: jnp.zeros(x.shape[:-1]))
