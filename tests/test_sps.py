"""The bagpipes simulator and the training-set generator (popflow.sps)."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("bagpipes")

from popflow import cosmology  # noqa: E402
from popflow.params import DEFAULT_SPACE as S  # noqa: E402
from popflow.sps import proposal  # noqa: E402
from popflow.sps.bagpipes_model import (  # noqa: E402
    MAG_CAP,
    Z_MIN,
    _quiet,
    get_simulator,
    model_components,
    sfh_bin_edges,
)
from popflow.sps.generate import open_training_set, simulate  # noqa: E402

FILTERS = tuple(f"sdss_{b}0" for b in "ugriz")


@pytest.fixture(scope="module")
def sim():
    """One simulator for the module (building one takes seconds); shared with simulate() via the cache."""
    return get_simulator(FILTERS, ())


def _theta(**kw):
    """A mid-box point with some parameters set."""
    t = (S.lower + 0.5 * (S.upper - S.lower)).astype(np.float32)
    t[S.index("redshift")] = 1.0
    for k, v in kw.items():
        t[S.index(k)] = v
    return t


def test_sfh_bins_follow_the_age_of_the_universe():
    for z in (Z_MIN, 0.5, 3.0, 6.0):
        e = sfh_bin_edges(z)
        t = 1e3 * cosmology.t_univ(z)
        assert e.shape == (8,) and np.all(np.diff(e) > 0)
        assert e[0] == 0 and e[1] == 30 and e[2] == 100
        assert e[6] == pytest.approx(0.85 * t, rel=1e-12) and e[7] < t
        assert np.allclose(np.diff(np.log(e[2:7])), np.log(e[3] / e[2]))  # log-spaced middle bins


def test_bins_older_than_the_universe_are_guarded(sim):
    # the pitfall: an oldest bin edge beyond t_univ(z) makes bagpipes return a zero spectrum
    comps = model_components(_theta(redshift=6.0))
    comps["continuity"]["bin_edges"][-1] = 1.05e3 * cosmology.t_univ(6.0)
    with _quiet():
        sim._model.update(comps)
    assert sim._model.sfh.unphysical and not np.any(sim._model.spectrum_full)
    # the simulator's own bins at z = 6 with every bit of mass in the oldest bin give a real spectrum
    old = _theta(redshift=6.0, **{f"logsfr_ratio_{i}": -5.0 for i in range(1, 7)})
    m = sim.magnitudes(old)[0]
    assert not sim._model.sfh.unphysical
    assert np.isfinite(m).all() and m[FILTERS.index("sdss_z0")] < 70  # z band (rest 1270 A) is not blocked


def test_redshift_floor(sim):
    with pytest.raises(ValueError, match="Z_MIN"):
        sim.magnitudes(_theta(redshift=0.0))
    with pytest.raises(ValueError, match="Z_MIN"):
        model_components(_theta(redshift=0.5 * Z_MIN))
    m = sim.magnitudes(np.stack([_theta(redshift=Z_MIN), _theta(redshift=2 * Z_MIN)]))
    assert np.all(np.isfinite(m)) and np.all(m < MAG_CAP)
    # unit-mass m - DM(z) is smooth to the floor: doubling z changes it by the tiny K-correction only
    # (a flux-scale error at the floor, such as a wrong D_L, would show up as >> 0.01 mag)
    absm = m - cosmology.distance_modulus(np.array([Z_MIN, 2 * Z_MIN]))[:, None]
    assert np.max(np.abs(absm[0] - absm[1])) < 0.01


def test_out_of_bounds_rejected_with_the_parameter_named(sim):
    with pytest.raises(ValueError, match="dust2"):
        sim.magnitudes(_theta(dust2=4.5))
    with pytest.raises(ValueError, match="logsfr_ratio_3"):
        model_components(_theta(logsfr_ratio_3=-6.0))
    with pytest.raises(ValueError, match="expected 14"):
        sim.magnitudes(np.zeros((2, 13)))


def test_mass_scaling_and_log_mass_ignored(sim):
    a = sim.magnitudes(np.stack([_theta(log_mass=7.0), _theta(log_mass=12.5)]))
    np.testing.assert_array_equal(a[0], a[1])  # unit-mass magnitudes do not depend on log_mass
    comps = model_components(_theta())
    with _quiet():
        sim._model.update(comps)
        unit = sim._model.spectrum_full.copy()
        comps["continuity"]["massformed"] = 1.0
        sim._model.update(comps)
    # bagpipes' spectrum is linear in the mass formed, so m(log_mass + 1) = m - 2.5 exactly
    # (atol: values ~1e-286 far below the IGM-absorbed Lyman continuum lose digits to denormals)
    np.testing.assert_allclose(sim._model.spectrum_full, 10.0 * unit, rtol=1e-10, atol=1e-30 * unit.max())


def test_photometry_is_photon_counting_ab(sim):
    z = 0.7
    obs = sim._wave * (1 + z)
    fnu_njy = 3631e9 * 10 ** (-0.4 * 20.0)  # a flat 20th-magnitude AB source
    flam = fnu_njy * 1e-32 * 2.99792458e18 / obs**2
    np.testing.assert_allclose(sim._photometry_njy(flam, z), fnu_njy, rtol=1e-10)


def test_agrees_with_bagpipes_own_photometry(sim):
    theta = proposal.draw(np.random.default_rng(5), 8, "uniform", z_min=0.3, z_max=5.0)
    ours = sim.magnitudes(theta)
    z = theta[:, S.index("redshift")].astype(np.float64)
    for i, row in enumerate(theta):
        with _quiet():
            sim._model.update(model_components(row))
        # bagpipes' filter integration (its filters resampled twice onto the R = 100 grid) on the same spectrum
        dl = cosmology.luminosity_distance(z[i]) * 3.085677581e24
        spec = sim._model.spectrum_full * sim._model.lum_flux / (4 * np.pi * dl**2)
        mujy = sim._model.filter_set.get_photometry(spec, z[i], unit_conv="cgs_to_mujy")
        ref = 23.9 - 2.5 * np.log10(np.maximum(mujy, 1e-40))
        ok = ours[i] < 60  # bands with real flux
        # tolerance: bagpipes' coarser double resampling of the curves differs from the native-curve
        # integration by up to ~0.01 mag (measured max 0.010 over 40 prior draws, median 5e-4)
        np.testing.assert_allclose(ours[i][ok], ref[ok], atol=0.03)


def test_proposals_cover_the_box_deterministically():
    draws = {}
    for kind in proposal.PROPOSALS:
        a = draws[kind] = proposal.draw(np.random.default_rng(1), 2000, kind, z_min=Z_MIN)
        b = proposal.draw(np.random.default_rng(1), 2000, kind, z_min=Z_MIN)
        np.testing.assert_array_equal(a, b)
        assert a.shape == (2000, S.dim) and a.dtype == np.float32
        assert np.all(S.in_bounds(a)) and a[:, S.index("redshift")].min() >= np.float32(Z_MIN)
        d2 = a[:, S.index("dust2")]
        # truncated, not clipped: no pile-up at the bound (clipping a N(0.3, 1) would put ~38% at 0)
        assert np.mean(d2 == 0.0) < 0.01
    r_w, r_p = (np.abs(draws[k][:, S.index("logsfr_ratio_1")]) for k in ("wide", "prior"))
    # the wide proposal puts far more models at extreme SFR ratios than the prior (about 22% vs 2%
    # beyond |r| = 2 in expectation; with 2000 draws, ~440 vs ~40: many sigma apart)
    assert np.mean(r_w > 2) > 3 * np.mean(r_p > 2)
    with pytest.raises(ValueError, match="unknown proposal"):
        proposal.draw(np.random.default_rng(0), 3, "flat", z_min=Z_MIN)


def test_resumed_generation_equals_uninterrupted(sim, tmp_path):
    kw = dict(n=5, seed=3, chunk_size=2, filters=FILTERS, workers=1, progress=False)
    full = open_training_set(simulate(tmp_path / "full.zarr", **kw))
    simulate(tmp_path / "resumed.zarr", max_chunks=1, **kw)
    part = open_training_set(tmp_path / "resumed.zarr")
    assert part.chunk_done.values.tolist() == [True, False, False]
    assert np.isnan(part.mag_unit.values[2:]).all()  # unfinished rows read back as NaN, never as data
    resumed = open_training_set(simulate(tmp_path / "resumed.zarr", **kw))
    assert resumed.chunk_done.values.all()
    for var in ("theta", "mag_unit", "is_validation"):
        np.testing.assert_array_equal(resumed[var].values, full[var].values)
    assert np.isfinite(full.mag_unit.values).all()
    assert full.attrs["filters"] == list(FILTERS) and len(full.attrs["filter_sha256"]) == len(FILTERS)
    assert full.attrs["cosmology"]["H0"] == cosmology.H0
    # the stored magnitudes are the simulator's
    np.testing.assert_array_equal(full.mag_unit.values, sim.magnitudes(full.theta.values))
    with pytest.raises(ValueError, match="n_models"):
        simulate(tmp_path / "resumed.zarr", **{**kw, "n": 6})


def test_bagpipes_only_imported_inside_sps(monkeypatch):
    root = Path(__file__).resolve().parents[1] / "popflow"
    offenders = [p for p in root.rglob("*.py") if "bagpipes" in p.read_text() and "import bagpipes" in p.read_text()
                 and root / "sps" not in p.parents]
    assert offenders == []
    # without bagpipes, importing popflow.sps says how to install it
    for name in [m for m in sys.modules if m == "popflow.sps" or m.startswith("popflow.sps.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bagpipes", None)
    with pytest.raises(ImportError, match=r"popflow\[sps\]"):
        importlib.import_module("popflow.sps")
