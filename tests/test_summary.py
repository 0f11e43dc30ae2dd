"""Per-galaxy summaries: quantiles (weighted and not), p(z) on the fixed grid, point redshifts, NaN handling."""

import numpy as np
import pytest

from popflow.params import DEFAULT_SPACE
from popflow.summary import QUANTILES, Z_EDGES, Z_GRID, redshift_histogram, summarize, summary_dataset, weighted_quantiles

NAMES = DEFAULT_SPACE.names
IZ = DEFAULT_SPACE.index("redshift")


def test_grid_is_fixed_and_documented():
    assert Z_EDGES[0] == 0.0 and Z_EDGES[-1] == 6.0 and len(Z_GRID) == 600
    np.testing.assert_allclose(np.diff(Z_EDGES), 0.01, atol=1e-12)
    np.testing.assert_allclose(QUANTILES, [0.025, 0.16, 0.5, 0.84, 0.975])


def test_unweighted_quantiles_are_numpys_hazen():
    x = np.random.default_rng(0).normal(size=(7, 3, 41))
    np.testing.assert_allclose(weighted_quantiles(x), np.moveaxis(np.quantile(x, QUANTILES, axis=-1, method="hazen"), 0, -1),
                               rtol=0, atol=1e-12)


def test_zero_weights_drop_draws_and_scale_does_not_matter():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 60))
    w = rng.uniform(0.5, 2.0, size=x.shape)
    w[:, ::2] = 0.0
    np.testing.assert_allclose(weighted_quantiles(x, weights=w), weighted_quantiles(x[:, 1::2], weights=w[:, 1::2]), atol=1e-12)
    np.testing.assert_allclose(weighted_quantiles(x, weights=w), weighted_quantiles(x, weights=7.5 * w), atol=1e-12)
    # equal positive weights on the kept half are the unweighted estimator on that half
    np.testing.assert_allclose(weighted_quantiles(x, weights=(w > 0).astype(float)), weighted_quantiles(x[:, 1::2]), atol=1e-12)


def test_importance_weights_move_quantiles_to_the_target():
    # draws from N(0, 1) weighted by N(1, 1) / N(0, 1) = exp(x - 1/2): the weighted quantiles are N(1, 1)'s.
    # n = 20000, Kish ESS ~ n / e ~ 7400; the standard error of a median is ~1.25 / sqrt(ESS) ~ 0.015 and
    # of the 2.5/97.5 % quantiles ~0.03, so 0.1 is a > 3-sigma bound at this fixed seed.
    from scipy.stats import norm

    x = np.random.default_rng(2).normal(size=(1, 20000))
    q = weighted_quantiles(x, weights=np.exp(x - 0.5))[0]
    np.testing.assert_allclose(q, 1.0 + norm.ppf(QUANTILES), atol=0.1)


def test_histogram_normalised_and_mode():
    z = np.concatenate([np.full((1, 30), 1.234), np.random.default_rng(3).uniform(0, 6, size=(1, 30))])
    pz = redshift_histogram(z)
    np.testing.assert_allclose(pz.sum(axis=1) * 0.01, 1.0)
    assert pz[0, 123] == pytest.approx(100.0)  # all mass in bin [1.23, 1.24): density 1 / 0.01


def test_summarize_shapes_weights_and_nan_galaxies():
    rng = np.random.default_rng(4)
    lo, hi = DEFAULT_SPACE.lower, DEFAULT_SPACE.upper
    s = lo + (hi - lo) * rng.uniform(size=(3, 4, 25, len(NAMES)))
    s[..., IZ] = rng.normal(2.0, 0.05, size=(3, 4, 25))
    s[1] = np.nan  # an unusable galaxy: no draws
    out = summarize(s.astype(np.float32), NAMES)
    assert out["redshift_q"].shape == (3, 5) and out["pz"].shape == (3, 600) and out["z_mode"].shape == (3,)
    assert all(v.dtype == np.float32 for v in out.values())
    assert np.isnan(out["z_median"][1]) and np.isnan(out["z_mode"][1]) and np.isnan(out["pz"][1]).all()
    assert np.isnan(out["log_mass_q"][1]).all()
    np.testing.assert_allclose(out["z_median"][[0, 2]], np.quantile(s[[0, 2], ..., IZ].reshape(2, -1), 0.5, axis=1, method="hazen"),
                               rtol=1e-6)
    assert np.all(np.abs(out["z_mode"][[0, 2]] - 2.0) < 0.1)  # 100 draws of N(2, 0.05): the peak bin is near 2
    # weights flow through: all weight on chain 0 = the summary of chain 0 alone
    w = np.zeros((3, 4, 25))
    w[:, 0] = 1.0
    np.testing.assert_allclose(summarize(s, NAMES, weights=w)["dust2_q"][[0, 2]], summarize(s[:, :1], NAMES)["dust2_q"][[0, 2]],
                               rtol=1e-6)
    ds = summary_dataset(out, galaxy_id=[10, 11, 12])
    assert ds["pz"].dims == ("galaxy", "z_grid") and ds["redshift_q"].dims == ("galaxy", "quantile")
    assert ds["galaxy_id"].values.tolist() == [10, 11, 12]


def test_bad_inputs():
    with pytest.raises(ValueError, match="non-negative"):
        weighted_quantiles(np.zeros((1, 3)), weights=np.array([[1.0, -1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"\(n_gal, n_chain, n_draw, 14\)"):
        summarize(np.zeros((2, 3, 14)), NAMES)
