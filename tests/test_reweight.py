"""Importance reweighting: exactness on a conjugate Gaussian, ESS and k-hat, laziness, the store round trip."""

import numpy as np
import pytest

from popflow.reweight import kish_ess, log_importance_weights, normalize_log_weights, pareto_khat


def _gauss_logpdf(x, mu, sd):
    return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)


# --- the functional core --------------------------------------------------------------------------


def test_conjugate_gaussian_reweighting_is_exact():
    """y_g ~ N(x_g, 1); old prior N(0, 3^2), new prior N(1, 1). Both posteriors are Gaussian with known moments."""
    rng = np.random.default_rng(1)
    n_gal, n_chain, n_draw = 40, 4, 2000
    y = rng.uniform(-3.0, 3.0, n_gal)
    v_old = 1.0 / (1.0 / 9.0 + 1.0)
    m_old = v_old * y
    v_new = 1.0 / (1.0 + 1.0)
    m_new = v_new * (y + 1.0)
    x = m_old[:, None, None] + np.sqrt(v_old) * rng.normal(size=(n_gal, n_chain, n_draw))
    lw = normalize_log_weights(log_importance_weights(_gauss_logpdf(x, 1.0, 1.0), _gauss_logpdf(x, 0.0, 3.0)))
    w = np.exp(np.asarray(lw, np.float64))
    np.testing.assert_allclose(w.sum(axis=(1, 2)), 1.0, rtol=1e-4)
    mean = np.sum(w * x, axis=(1, 2))
    var = np.sum(w * (x - mean[:, None, None]) ** 2, axis=(1, 2))
    # Monte Carlo standard errors of self-normalised importance sampling (delta method, Owen 2013 ch. 9):
    # se^2(mean) = sum w^2 (x - mean)^2, se^2(var) = sum w^2 ((x - mean)^2 - var)^2.
    se_mean = np.sqrt(np.sum(w**2 * (x - mean[:, None, None]) ** 2, axis=(1, 2)))
    se_var = np.sqrt(np.sum(w**2 * ((x - mean[:, None, None]) ** 2 - var[:, None, None]) ** 2, axis=(1, 2)))
    z_mean = (mean - m_new) / se_mean
    z_var = (var - v_new) / se_var
    # 40 galaxies: |z| > 4.5 has probability 40 * 7e-6 under the null; a wrong weight (sign, missing
    # normalisation, old instead of new prior) moves the means by >= 0.5 sd, i.e. > 20 standard errors.
    assert np.max(np.abs(z_mean)) < 4.5 and np.max(np.abs(z_var)) < 4.5
    # The z-scores must also be calibrated as a set: their rms is 1 +- 0.11 (1 / sqrt(2 * 40)) under the null.
    assert 0.65 < np.sqrt(np.mean(z_mean**2)) < 1.35
    ess = np.asarray(kish_ess(lw))
    # |y| < 3 keeps the two posteriors overlapping: hundreds of effective draws at worst
    assert np.all((ess > 200) & (ess < n_chain * n_draw)), ess.min()


def test_ess_edge_cases():
    n = 4 * 50
    flat = np.zeros((3, 4, 50), np.float32)
    np.testing.assert_allclose(kish_ess(flat), n, rtol=1e-5)
    one = np.full((1, 4, 50), -np.inf, np.float32)
    one[0, 2, 7] = 3.0
    np.testing.assert_allclose(kish_ess(one), 1.0, rtol=1e-6)
    dead = np.full((1, 4, 50), -np.inf, np.float32)
    assert kish_ess(dead)[0] == 0.0
    assert np.all(np.asarray(normalize_log_weights(dead)) == -np.inf)
    nan = flat.copy()
    nan[1, 0, 0] = np.nan
    ess = np.asarray(kish_ess(nan))
    assert np.isnan(ess[1]) and np.isfinite(ess[[0, 2]]).all()
    # A draw the old prior excludes cannot be in its chain: the galaxy is marked NaN, not silently kept.
    lw = log_importance_weights(np.zeros((1, 2, 3)), np.array([[[0.0, -np.inf, 0.0], [0.0, 0.0, 0.0]]]))
    assert np.isnan(kish_ess(lw)[0])


def test_pareto_khat_recovers_tail_index():
    """Weights with a Pareto(alpha) tail have k = 1/alpha (Vehtari et al. 2024)."""
    rng = np.random.default_rng(2)
    for alpha in (1.0, 2.0, 4.0):
        w = rng.pareto(alpha, size=(50, 4, 1000)) + 1.0
        k = np.asarray(pareto_khat(np.log(w)))
        # Per galaxy k-hat has sd ~0.1 at 4000 draws (tail of 190); the mean of 50 has sd ~0.015,
        # plus the prior's shrinkage towards 0.5 (10 pseudo-draws of 190): 0.06 leaves > 3 sd.
        assert abs(k.mean() - 1.0 / alpha) < 0.06, (alpha, k.mean())
    bounded = np.asarray(pareto_khat(np.log(rng.uniform(size=(20, 4, 1000)))))
    assert np.all(bounded < 0.0)
    flat = np.zeros((2, 4, 100))
    assert np.all(np.asarray(pareto_khat(flat)) == -np.inf)
    assert np.all(np.asarray(pareto_khat(flat - np.inf)) == np.inf)
    with pytest.raises(ValueError, match="tail"):
        pareto_khat(np.zeros((1, 2, 5)))


# --- stores and lazy views --------------------------------------------------------------------------

import hashlib  # noqa: E402
import re  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import xarray as xr  # noqa: E402
from jax.scipy.special import ndtr  # noqa: E402
from scipy import stats  # noqa: E402

from popflow import summary  # noqa: E402
from popflow.params import Parameter, ParameterSpace  # noqa: E402
from popflow.pipeline import open_posterior, write_posterior_tree  # noqa: E402
from popflow.reweight import materialize_weights, reweighted  # noqa: E402

XZ_SPACE = ParameterSpace((Parameter("x", -10.0, 10.0, "", "a Gaussian coordinate"),
                           Parameter("redshift", 0.0, 6.0, "", "redshift")))


class TruncNormalPrior:
    """Independent normals truncated to the box, normalised over it (a prior with known density)."""

    def __init__(self, space, mu, sd):
        self.space, self.mu, self.sd = space, np.asarray(mu, np.float32), np.asarray(sd, np.float32)
        self.id = hashlib.sha256(repr((space.id, self.mu.tolist(), self.sd.tolist())).encode()).hexdigest()[:16]

    def log_prob(self, theta):
        theta = jnp.asarray(theta, jnp.float32)
        a, b = (self.space.lower - self.mu) / self.sd, (self.space.upper - self.mu) / self.sd
        lp = -0.5 * ((theta - self.mu) / self.sd) ** 2 - jnp.log(self.sd * np.sqrt(2 * np.pi)) - jnp.log(ndtr(b) - ndtr(a))
        return jnp.where(self.space.in_bounds(theta), jnp.sum(lp, -1), -jnp.inf)

    def truncnorm(self, i, mu=None, sd=None):
        mu = self.mu[i] if mu is None else mu
        sd = self.sd[i] if sd is None else sd
        lo, hi = self.space.lower[i], self.space.upper[i]
        return stats.truncnorm((lo - mu) / sd, (hi - mu) / sd, loc=mu, scale=sd)


def write_store(path, theta, log_prior, prior_id, space, chunk):
    """A posterior store in the layout of popflow.pipeline (galaxy ids from 1000)."""
    write_posterior_tree(path, theta, space.names, {"log_prior": log_prior}, prior_id=prior_id,
                         galaxy_id=np.arange(theta.shape[0]) + 1000, chunk=chunk)
    return path


def _conjugate_store(tmp_path, n_gal=30, n_chain=4, n_draw=1000, chunk=8):
    """Draws of x | y ~ N(y, 1) and z | y_z ~ N(y_z, 0.3), posteriors truncated to the box, under the old prior."""
    rng = np.random.default_rng(5)
    old = TruncNormalPrior(XZ_SPACE, [0.0, 2.0], [3.0, 3.0])
    new = TruncNormalPrior(XZ_SPACE, [1.0, 1.0], [1.0, 0.5])
    y = np.stack([rng.uniform(-2, 2, n_gal), rng.uniform(0.3, 2.0, n_gal)], -1)
    noise = np.array([1.0, 0.3])

    def posterior(prior, g, i):
        prec = 1 / noise[i] ** 2 + 1 / prior.sd[i] ** 2
        mu = (y[g, i] / noise[i] ** 2 + prior.mu[i] / prior.sd[i] ** 2) / prec
        return prior.truncnorm(i, mu, 1 / np.sqrt(prec))

    theta = np.stack([np.stack([posterior(old, g, i).rvs((n_chain, n_draw), random_state=rng) for i in range(2)], -1)
                      for g in range(n_gal)]).astype(np.float32)
    path = write_store(tmp_path / "post.zarr", theta, np.asarray(old.log_prob(theta)), old.id, XZ_SPACE, chunk)
    return path, old, new, lambda g, i: posterior(new, g, i)


def test_reweighted_view_matches_analytic_posterior(tmp_path):
    path, old, new, truth = _conjugate_store(tmp_path)
    assert open_posterior(path, prior=old)["summary"].identical(open_posterior(path)["summary"])  # same prior: stored view
    view = open_posterior(path, prior=new)
    assert view.attrs["prior_id"] == old.id and view.attrs["weights_prior_id"] == new.id
    w = view["weights"][new.id].to_dataset(inherit=False).compute()
    s = view["summary"].to_dataset(inherit=False).compute()
    ess = w["ess"].values
    assert np.all(ess > 300), ess.min()
    for i, name in enumerate(XZ_SPACE.names):
        q = s[f"{name}_q"].values  # (galaxy, 5)
        for j, p in enumerate(summary.QUANTILES[1:4], start=1):  # 16, 50, 84 %
            exact = np.array([truth(g, i).ppf(p) for g in range(len(ess))])
            dens = np.array([truth(g, i).pdf(e) for g, e in zip(range(len(ess)), exact)])
            # asymptotic sd of a sample quantile from ESS effective draws: sqrt(p (1 - p) / ESS) / pdf;
            # 4.5 sd over 30 galaxies x 3 quantiles x 2 parameters: false alarm < 1e-3
            se = np.sqrt(p * (1 - p) / ess) / dens
            assert np.all(np.abs(q[:, j] - exact) < 4.5 * se), (name, p, np.max(np.abs(q[:, j] - exact) / se))
    # p(z) is the weighted histogram: its mean matches the analytic posterior mean of z within MC error
    z_mean = np.sum(s["pz"].values * summary.Z_GRID * summary.Z_STEP, axis=1)
    exact = np.array([truth(g, 1).mean() for g in range(len(ess))])
    sd = np.array([truth(g, 1).std() for g in range(len(ess))])
    assert np.all(np.abs(z_mean - exact) < 4.5 * sd / np.sqrt(ess) + summary.Z_STEP / 2)


def test_materialized_weights_equal_lazy_and_resume(tmp_path):
    path, old, new, _ = _conjugate_store(tmp_path, n_gal=20, n_draw=100)
    lazy = open_posterior(path, prior=new)["weights"][new.id].to_dataset(inherit=False).compute()
    first = materialize_weights(path, new, progress=False, log=lambda *a: None)
    assert first["n_chunks"] == 3 and first["chunks_done_now"] == 3
    group = f"weights/{new.id}"
    stored = xr.open_zarr(path, group=group, consolidated=False).compute()
    for name in lazy.data_vars:
        np.testing.assert_array_equal(stored[name].values, lazy[name].values, err_msg=name)
    # an interrupted run: chunk 1's data half-written and its marker unset -> only chunk 1 is redone
    import zarr

    zarr.open_array(path, path=f"{group}/ess", mode="r+")[8:12] = np.nan
    zarr.open_array(path, path=f"{group}/chunk_done", mode="r+")[1] = 0
    again = materialize_weights(path, new, progress=False, log=lambda *a: None)
    assert again["chunks_done_now"] == 1
    np.testing.assert_array_equal(xr.open_zarr(path, group=group, consolidated=False)["ess"].values, lazy["ess"].values)
    # a complete group is used as it is by the view (no recomputation: its arrays are the stored ones)
    view = open_posterior(path, prior=new)
    np.testing.assert_array_equal(view["summary"]["z_median"].values, lazy["z_median"].values)
    assert materialize_weights(path, new, progress=False, log=lambda *a: None)["chunks_done_now"] == 0


def test_reweighting_errors(tmp_path):
    path, old, new, _ = _conjugate_store(tmp_path, n_gal=4, n_draw=50, chunk=4)
    with pytest.raises(ValueError, match="nothing to reweight"):
        materialize_weights(path, old, progress=False)
    from popflow.params import DEFAULT_SPACE

    with pytest.raises(ValueError, match="log_mass"):
        open_posterior(path, prior=TruncNormalPrior(DEFAULT_SPACE, np.zeros(14), np.ones(14)))
    tree = open_posterior(path)
    with pytest.raises(ValueError, match="already a view"):
        reweighted(reweighted(tree, new), old)
    tree.attrs.pop("prior_id")
    with pytest.raises(ValueError, match="prior_id"):
        reweighted(tree, new)


def test_opening_a_large_store_with_a_new_prior_reads_no_chunk(tmp_path, monkeypatch):
    """1e5 galaxies, written as metadata only (unwritten chunks): opening reweighted must not touch a chunk."""
    import dask.array as da
    from zarr.storage import LocalStore

    n_gal, n_chain, n_draw, chunk = 100_000, 8, 16, 1000
    dims = ("galaxy", "chain", "draw")
    old = TruncNormalPrior(XZ_SPACE, [0.0, 2.0], [3.0, 3.0])
    new = TruncNormalPrior(XZ_SPACE, [1.0, 1.0], [1.0, 0.5])
    lazy = lambda *shape: da.full((n_gal,) + shape, np.nan, dtype=np.float32, chunks=(chunk,) + shape)  # noqa: E731
    tree = xr.DataTree.from_dict({
        "/": xr.Dataset({"chunk_done": ("chunk", da.ones(n_gal // chunk, np.int8, chunks=1))},
                        coords={"galaxy_id": ("galaxy", da.arange(n_gal, chunks=chunk))}, attrs={"prior_id": old.id}),
        "/posterior": xr.Dataset({n: (dims, lazy(n_chain, n_draw)) for n in XZ_SPACE.names}),
        "/sample_stats": xr.Dataset({"log_prior": (dims, lazy(n_chain, n_draw))}),
        "/summary": xr.Dataset({"z_median": ("galaxy", lazy()), "pz": (("galaxy", "z_grid"), lazy(summary.Z_GRID.size))},
                               coords={"z_grid": summary.Z_GRID.astype(np.float32)}),
    })
    path = tmp_path / "big.zarr"
    tree.to_zarr(path, mode="w", consolidated=False, compute=False)

    reads = []
    original = LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        if re.search(r"(^|/)c(/\d+)+$", key):  # a chunk key (Zarr v3 default encoding), not metadata
            reads.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", counting_get)
    plain = open_posterior(path)
    index_reads = list(reads)  # xarray loads index coordinates (here z_grid) to build pandas indexes
    assert all(k.startswith("summary/z_grid/") for k in index_reads), index_reads
    view = open_posterior(path, prior=new)
    assert reads[len(index_reads):] == index_reads  # the reweighted view read exactly what the plain view reads
    assert view["weights"][new.id]["log_weight"].shape == (n_gal, n_chain, n_draw)
    assert plain.attrs["prior_id"] == old.id
    # asking for one galaxy reads one chunk of each input, nothing else
    reads.clear()
    view["weights"][new.id]["ess"].isel(galaxy=slice(0, 5)).compute()
    assert reads and all(k.endswith("/c/0/0/0") for k in reads), reads


class RedshiftTiltedPrior:
    """Uniform on the box except redshift, whose density falls as exp(-z / scale), normalised on [lo, hi].

    A 'retrained' prior as cheap to compile as the toy UniformPrior (the fits below dominate this file's cost).
    """

    def __init__(self, scale: float = 0.7):
        from tests.toymodel import UniformPrior

        self.base = UniformPrior()
        self.space, self.scale = self.base.space, float(scale)
        self.id = f"ztilt{scale}-{self.space.id}"
        self._iz = self.space.index("redshift")
        self._lo, self._hi = float(self.space.lower[self._iz]), float(self.space.upper[self._iz])

    def _log_tilt(self, z):
        """log of the redshift density relative to uniform on [lo, hi]."""
        width, s = self._hi - self._lo, self.scale
        return np.log(width) - (z - self._lo) / s - np.log(-s * np.expm1(-width / s))

    def log_prob(self, theta):
        theta = jnp.asarray(theta, jnp.float32)
        return self.base.log_prob(theta) + self._log_tilt(theta[..., self._iz])

    def log_prob_latent(self, phi):
        return self.base.log_prob_latent(phi) + self._log_tilt(self.space.from_latent(phi)[..., self._iz])

    def sample(self, key, n: int):
        import jax

        theta = self.base.sample(key, n)
        u = jax.random.uniform(jax.random.fold_in(key, 1), (n,))
        z = self._lo - self.scale * jnp.log1p(-u * -np.expm1(-(self._hi - self._lo) / self.scale))  # inverse CDF
        return theta.at[:, self._iz].set(z)


def test_tilted_prior_is_normalised():
    """The test prior below: its redshift density integrates to 1 and its latent density includes the Jacobian."""
    prior = RedshiftTiltedPrior()
    z = np.linspace(0.0, 6.0, 60001)
    dens = np.exp(prior._log_tilt(z)) / 6.0
    np.testing.assert_allclose(np.trapezoid(dens, z), 1.0, rtol=1e-6)
    phi = np.random.default_rng(0).normal(size=(5, prior.space.dim)).astype(np.float32)
    theta = prior.space.from_latent(phi)
    np.testing.assert_allclose(prior.log_prob_latent(phi), prior.log_prob(theta) + prior.space.log_jacobian(phi), rtol=1e-5)


def test_refit_below_ess_refits_only_low_ess_galaxies(tmp_path, capsys):
    """The loop's last steps through the CLI: `popflow reweight`, then `popflow fit --refit-below-ess`.

    The store has the pipeline's layout and identity attributes, but its draws under the broad (uniform)
    prior are written directly, spread around each galaxy's true parameters with a redshift width that
    differs from galaxy to galaxy (so the ESS under the new prior does too): only the re-fit runs the
    sampler, which keeps this test to one compilation. Tiny sampler settings and 12 galaxies: checked is
    the bookkeeping (which galaxies are re-fitted, where their draws and summaries go, that the re-fit
    samples the new prior), not the quality of the chains.
    """
    from popflow.catalog import ingest, open_catalog
    from popflow.cli import main
    from popflow.datamodel import DataModel
    from popflow.fit import FitSettings
    from popflow.mock import simulate_catalog
    from popflow.reweight import refit_low_ess
    from tests.toymodel import ToyEmulator, UniformPrior

    emulator, old, new = ToyEmulator(), UniformPrior(), RedshiftTiltedPrior()
    n_gal, chunk, settings = 12, 6, FitSettings(n_walkers=28, n_burn=20, n_draws=8, thin=2, init="top", n_init=256)
    table = simulate_catalog(seed=2, n=n_gal, emulator=emulator, prior=new, bands="lsst")
    table.to_parquet(tmp_path / "mock.parquet")
    cat = ingest(tmp_path / "mock.parquet", bands="lsst", out=tmp_path / "cat.zarr", progress=False)
    space = old.space
    truth = np.stack([table[f"true_{n}"].to_numpy() for n in space.names], -1)
    rng = np.random.default_rng(3)
    shape = (n_gal, settings.n_walkers, settings.n_draws, space.dim)
    theta = truth[:, None, None, :] + 0.02 * (space.upper - space.lower) * rng.normal(size=shape)
    iz = space.index("redshift")
    theta[..., iz] = truth[:, None, None, iz] + np.linspace(0.02, 1.0, n_gal)[:, None, None] * rng.normal(size=shape[:3])
    theta = np.clip(theta, space.lower + 1e-4, space.upper - 1e-4).astype(np.float32)
    path = write_store(tmp_path / "post.zarr", theta, np.asarray(old.log_prob(theta)), old.id, space, chunk)
    import zarr

    root = zarr.open_group(path, mode="r+")
    usable = root.create_array("sample_stats/usable", shape=(n_gal,), chunks=(chunk,), dtype=bool,
                               dimension_names=["galaxy"])
    usable[:] = True
    selected = emulator.select(tuple(open_catalog(cat).attrs["filters"]))
    root.attrs.update({"emulator_id": emulator.id, "catalog_sha256": open_catalog(cat).attrs["source_sha256"],
                       "datamodel": DataModel.from_emulator(selected).to_dict(), "settings": settings.to_dict(),
                       "seed": 0, "chunk_size": chunk})

    spec = "tests.test_reweight:RedshiftTiltedPrior"
    assert main(["reweight", str(path), "--prior", spec, "--no-progress"]) == 0
    assert "complete (2 chunks, 2 computed now)" in capsys.readouterr().out
    ess = open_posterior(path, prior=new)["weights"][new.id]["ess"].values
    threshold = float(np.median(ess))
    assert main(["fit", str(cat), "--out", str(path), "--prior", spec, "--refit-below-ess", str(threshold),
                 "--emulator", "tests.toymodel:ToyEmulator", "--no-progress"]) == 0
    expected = np.flatnonzero(ess < threshold)
    assert f"re-fitted {len(expected)} galaxies" in capsys.readouterr().out
    assert 0 < len(expected) < len(ess)
    view = open_posterior(path, prior=new)
    w = view["weights"][new.id]
    np.testing.assert_array_equal(np.flatnonzero(w["refitted"].values), expected)
    refit = xr.open_zarr(path, group=f"refit/{new.id}", consolidated=False)
    np.testing.assert_array_equal(refit["galaxy_index"].values, expected)
    draws = np.stack([refit[n].values for n in new.space.names], -1)
    np.testing.assert_allclose(refit["log_prior"].values, np.asarray(new.log_prob(draws)), atol=1e-3)  # drawn under new
    zmed = view["summary"]["z_median"].values
    np.testing.assert_array_equal(zmed[expected], summary.summarize(draws, new.space.names)["z_median"])
    # the galaxies left alone keep their reweighted summaries
    rest = np.setdiff1d(np.arange(n_gal), expected)
    weighted = summary.summarize(theta[rest], space.names, weights=np.exp(w["log_weight"].values[rest]))
    np.testing.assert_allclose(zmed[rest], weighted["z_median"], rtol=1e-6)
    # a second call finds the re-fit complete and does nothing
    assert refit_low_ess(path, cat, new, threshold, emulator=emulator, progress=False, log=lambda *a: None)["n_refitted"] == 0
