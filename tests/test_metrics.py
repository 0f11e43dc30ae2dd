"""Photo-z metrics against known answers."""

import numpy as np
import pytest
from scipy import stats

from popflow import metrics


def test_point_metrics_known_values():
    z_spec = np.zeros(5)
    z_phot = np.array([-0.02, -0.01, 0.0, 0.01, 0.5])
    m = metrics.photoz_metrics(z_phot, z_spec)
    assert m["bias"] == pytest.approx(0.0)
    # |e - median| = 0.02, 0.01, 0, 0.01, 0.5 -> median 0.01
    assert m["sigma_nmad"] == pytest.approx(1.4826 * 0.01)
    assert m["outlier_frac"] == pytest.approx(0.2)
    # IQR of e = 0.01 - (-0.01) = 0.02 -> sigma_IQR = 0.02/1.349, 3 sigma < 0.06 so the cut is 0.06
    assert m["sigma_iqr"] == pytest.approx(0.02 / 1.349)
    assert m["rail_outlier_threshold"] == pytest.approx(0.06)
    assert m["rail_outlier_frac"] == pytest.approx(0.2)
    assert "pit_ks" not in m


def test_scaled_errors_divide_by_one_plus_z():
    e = metrics.scaled_errors([1.1, 3.0], [1.0, 2.0])
    np.testing.assert_allclose(e, [0.05, 1.0 / 3.0])


def test_gaussian_nmad_matches_sigma():
    rng = np.random.default_rng(0)
    e = rng.normal(0.01, 0.03, 200_000)
    # NMAD and sigma_IQR of a Gaussian estimate sigma; sampling error ~ 1.3 sigma/sqrt(n) ~ 1e-4
    assert metrics.sigma_nmad(e) == pytest.approx(0.03, abs=5e-4)
    assert metrics.sigma_iqr(e) == pytest.approx(0.03, abs=5e-4)
    assert metrics.bias(e) == pytest.approx(0.01, abs=5e-4)


def test_failed_fits_are_counted_not_scored():
    m = metrics.photoz_metrics(np.array([0.5, np.nan, 0.52]), np.array([0.5, 0.5, 0.5]))
    assert m["n"] == 2 and m["n_missing"] == 1
    with pytest.raises(ValueError, match="z_spec"):
        metrics.photoz_metrics(np.array([0.5]), np.array([np.nan]))


def _gaussian_population(n_gal, seed):
    """Exact Gaussian p(z) per galaxy, with the truth drawn from it (calibrated by construction)."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(0.2, 2.0, n_gal)
    sig = rng.uniform(0.02, 0.2, n_gal)
    truth = rng.normal(mu, sig)
    return rng, mu, sig, truth


def test_calibrated_samples_give_uniform_pit_and_nominal_coverage():
    n_gal, n_samp = 4000, 400
    rng, mu, sig, truth = _gaussian_population(n_gal, 1)
    samples = rng.normal(mu[:, None], sig[:, None], (n_gal, n_samp))
    m = metrics.photoz_metrics(z_spec=truth, samples=samples)
    # KS: the 1% critical value for n = 4000 is 1.63/sqrt(n) = 0.026; the PIT of 400 samples
    # is discrete in steps of 1/400, which adds at most 0.0025.
    assert m["pit_ks"] < 0.029
    # coverage is binomial: sd = sqrt(p(1-p)/n) = 0.0074 (68%) and 0.0034 (95%); allow 3 sd
    # plus the 1/400 discreteness of the sample quantiles.
    assert m["coverage_68"] == pytest.approx(0.68, abs=3 * 0.0074 + 0.005)
    assert m["coverage_95"] == pytest.approx(0.95, abs=3 * 0.0034 + 0.005)


def test_miscalibrated_samples_are_detected():
    n_gal, n_samp = 2000, 200
    rng, mu, sig, truth = _gaussian_population(n_gal, 2)
    samples = rng.normal(mu[:, None], 0.5 * sig[:, None], (n_gal, n_samp))  # overconfident by 2x
    m = metrics.photoz_metrics(z_spec=truth, samples=samples)
    # a p(z) half as wide covers P(|x| < 0.5 sigma) = 0.38 instead of 0.68
    assert m["coverage_68"] == pytest.approx(0.383, abs=0.04)
    assert m["pit_ks"] > 0.1


def test_grid_pit_and_crps_match_closed_form_gaussian():
    n_gal = 1000
    rng, mu, sig, truth = _gaussian_population(n_gal, 3)
    z = np.linspace(-1.0, 4.0, 2501)  # covers every mu +- 6 sigma, so no truncation
    pz = stats.norm.pdf(z[None, :], mu[:, None], sig[:, None])
    pit = metrics.pit_from_grid(z, pz, truth)
    # linear interpolation of the CDF between nodes 0.002 apart: error <= dz^2 max|p'| / 8 ~ 5e-4 at sigma = 0.02
    np.testing.assert_allclose(pit, stats.norm.cdf(truth, mu, sig), atol=1e-3)
    w = (truth - mu) / sig
    exact = sig * (w * (2 * stats.norm.cdf(w) - 1) + 2 * stats.norm.pdf(w) - 1 / np.sqrt(np.pi))
    crps = metrics.crps_from_grid(z, pz, truth)
    # trapezoid on a 0.002 grid resolving sigma >= 0.02 in >= 10 steps: relative error ~(dz/sigma)^2/12 ~ 1e-3
    np.testing.assert_allclose(crps, exact, rtol=5e-3, atol=1e-5)
    m = metrics.photoz_metrics(mu, truth, z_grid=z, pz=pz)
    assert m["pit_ks"] < 1.63 / np.sqrt(n_gal)  # 1% critical value
    assert m["crps"] == pytest.approx(np.mean(exact), rel=2e-3)


def test_sample_crps_converges_to_closed_form():
    rng = np.random.default_rng(4)
    mu, sig = np.array([1.0, 0.5]), np.array([0.1, 0.05])
    truth = np.array([1.05, 0.3])
    samples = rng.normal(mu[:, None], sig[:, None], (2, 40_000))
    w = (truth - mu) / sig
    exact = sig * (w * (2 * stats.norm.cdf(w) - 1) + 2 * stats.norm.pdf(w) - 1 / np.sqrt(np.pi))
    # Monte Carlo error of the empirical-CDF CRPS with 4e4 draws is ~sigma/sqrt(n) ~ 5e-4 sigma
    np.testing.assert_allclose(metrics.crps_from_samples(samples, truth), exact, rtol=1e-2)


def test_crps_of_point_mass_is_distance():
    samples = np.full((1, 10), 0.4)
    assert metrics.crps_from_samples(samples, np.array([0.7]))[0] == pytest.approx(0.3)
    z = np.linspace(0, 1, 101)
    pz = np.zeros((1, 101))
    pz[0, 40] = 1.0  # a triangle of half-width 0.01 centred at 0.4: CRPS = 1.1 - E|X - X'|/2 = 1.0977
    # the trapezoid rule on the 0.01 grid resolves the triangle's CDF only to ~1e-3 in the integral
    assert metrics.crps_from_grid(z, pz, np.array([1.5]))[0] == pytest.approx(1.0977, abs=2e-3)


def test_weights_equal_to_duplicating_samples():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 7))
    counts = rng.integers(0, 4, size=(3, 7))
    counts[:, 0] += 1
    dup = [np.repeat(x[i], counts[i]) for i in range(3)]
    truth = np.array([0.1, -0.3, 0.0])
    for i in range(3):
        c_w = metrics.crps_from_samples(x[i:i + 1], truth[i:i + 1], counts[i:i + 1].astype(float))
        c_d = metrics.crps_from_samples(dup[i][None], truth[i:i + 1])
        np.testing.assert_allclose(c_w, c_d, rtol=1e-12)
        p_w = metrics.pit_from_samples(x[i:i + 1], truth[i:i + 1], counts[i:i + 1].astype(float))
        p_d = metrics.pit_from_samples(dup[i][None], truth[i:i + 1])
        np.testing.assert_allclose(p_w, p_d, rtol=1e-12)


def test_nan_draws_of_unusable_galaxy_are_missing():
    samples = np.array([[0.5, 0.6, 0.55], [np.nan, np.nan, np.nan]])
    m = metrics.photoz_metrics(z_spec=np.array([0.55, 0.3]), samples=samples)
    assert m["n"] == 1 and m["n_missing"] == 1
    assert np.isfinite(m["crps"])


def test_ks_and_cvm_statistics_match_scipy():
    u = np.random.default_rng(6).uniform(size=500) ** 1.2
    assert metrics.ks_uniform(u) == pytest.approx(stats.kstest(u, "uniform").statistic)
    assert metrics.cvm_uniform(u) == pytest.approx(stats.cramervonmises(u, "uniform").statistic)


def test_plots_are_written(tmp_path):
    rng = np.random.default_rng(7)
    z = rng.uniform(0, 1.5, 500)
    p1 = metrics.plot_zphot_zspec(z + rng.normal(0, 0.03, 500), z, tmp_path / "zz.png", title="toy")
    p2 = metrics.plot_pit(rng.uniform(size=500), tmp_path / "pit.png")
    for p in (p1, p2):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _toy_stores(tmp_path, n=300, seed=8):
    """A catalogue (ingested from an SDSS-MGS-format table) and a posterior store with calibrated Gaussian draws."""
    import xarray as xr

    from popflow.catalog import ingest

    rng = np.random.default_rng(seed)
    z_spec = rng.uniform(0.02, 0.3, n)
    mags = rng.uniform(16, 18, (n, 5))
    errs = np.full((n, 5), 0.02)
    cols = np.column_stack([z_spec, mags, mags[:, :4] - mags[:, 1:], errs, errs[:, :4]])
    table = tmp_path / "mgs.txt"
    np.savetxt(table, cols, header="zs u g r i z", fmt="%.6f")
    cat = tmp_path / "cat.zarr"
    ingest(table, bands="sdss_mgs", out=cat)
    sig = 0.02
    centre = z_spec + sig * rng.normal(size=n)  # posterior centre scattered by its own width: calibrated
    draws = centre[:, None, None] + sig * rng.normal(size=(n, 4, 100))
    draws[5] = np.nan  # an unusable galaxy
    post = xr.Dataset({"redshift": (("galaxy", "chain", "draw"), draws.astype(np.float32))},
                      coords={"galaxy_id": ("galaxy", np.arange(n, dtype=np.int64))})
    tree = xr.DataTree.from_dict({"/": xr.Dataset(attrs={"catalog": str(cat), "prior_id": "toy"}), "/posterior": post})
    store = tmp_path / "post.zarr"
    tree.to_zarr(store, consolidated=False)
    return store, cat, z_spec


def test_evaluate_posterior_store_and_cli(tmp_path, capsys):
    from popflow.cli import main

    store, cat, z_spec = _toy_stores(tmp_path)
    m = metrics.evaluate_posterior(store, out_dir=tmp_path / "plots")
    assert m["n"] == 299 and m["n_missing"] == 1
    # centres scattered by sigma = 0.02 around z in [0.02, 0.3]: NMAD ~ 0.02/(1 + z) ~ 0.018
    assert 0.013 < m["sigma_nmad"] < 0.023
    # the draws are calibrated: 68% coverage within 4 binomial sd (0.027) of nominal
    assert abs(m["coverage_68"] - 0.68) < 0.11
    assert all(p.endswith(".png") for p in m["plots"])
    rc = main(["evaluate", str(store), "--plots", str(tmp_path / "cli"), "--json", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "sigma_nmad" in out and (tmp_path / "cli" / "pit.png").exists()
    rc = main(["evaluate", str(store), "--truth", "not_there"])
    assert rc == 2 and "not_there" in capsys.readouterr().err
