"""Zero-point and error-floor calibration recovers offsets injected into toy photometry."""

import json

import jax
import numpy as np
import pytest

from popflow import calibrate as cal
from popflow.datamodel import DataModel
from tests.toymodel import ToyEmulator, UniformPrior, simulate_photometry

GROUPS = (("log_mass",), tuple(f"logsfr_ratio_{i}" for i in range(1, 7)))
TRUE_ZP = np.array([1.06, 0.96, 1.0, 1.03, 0.95, 1.02])


def _mock(n=150, extra_scatter_band=None, seed=1):
    """Toy galaxies from the 2-direction family the calibration fits (mass, tied SFH slope)."""
    emu, prior = ToyEmulator(), UniformPrior()
    sp = emu.space
    rng = np.random.default_rng(seed)
    ref = cal.prior_median(jax.random.PRNGKey(5), prior)
    theta = np.tile(ref, (n, 1))
    theta[:, sp.index("log_mass")] = rng.uniform(9.5, 11.5, n)
    slope = rng.uniform(-1, 1, n)
    for i in range(1, 7):
        theta[:, sp.index(f"logsfr_ratio_{i}")] = slope
    theta[:, sp.index("redshift")] = rng.uniform(0.1, 2.5, n)
    flux, err, mask = simulate_photometry(emu, theta, 30.0, seed=seed + 1)
    if extra_scatter_band is not None:
        flux[:, extra_scatter_band] *= 1 + 0.05 * rng.normal(size=n)
    return emu, prior, ref, theta, flux * TRUE_ZP, err, mask


@pytest.fixture(scope="module")
def calibrated():
    emu, prior, ref, theta, flux, err, mask = _mock(extra_scatter_band=2)
    dm, report = cal.calibrate(jax.random.PRNGKey(0), flux, err, mask, theta[:, -1], emulator=emu, prior=prior, n_iter=1,
                               fit_kwargs=dict(groups=GROUPS, reference=ref, n_cand=128, n_steps=300))
    return dm, report


def test_injected_zero_points_are_recovered(calibrated):
    dm, report = calibrated
    truth_mag = -2.5 * np.log10(TRUE_ZP / np.exp(np.mean(np.log(TRUE_ZP))))  # geometric mean 1, as calibrated
    # S/N 30 (0.036 mag) on 150 galaxies with 4 residual degrees of freedom each: the median offset is
    # known to ~0.036 * 1.25 / sqrt(150 * 4/6) ~ 0.005 mag; band r carries an extra 5% scatter.
    np.testing.assert_allclose(report["zero_point_mag"], truth_mag, atol=0.015)
    np.testing.assert_allclose(-2.5 * np.log10(dm.zero_points), truth_mag, atol=0.015)


def test_error_floor_finds_injected_scatter(calibrated):
    dm, _ = calibrated
    floor = np.asarray(dm.error_floor)
    # 5% extra scatter in r; NMAD of 150 residuals is uncertain by ~ 1.3/sqrt(150) ~ 11% of the total
    assert 0.03 < floor[2] < 0.075
    others = np.delete(floor, 2)
    assert np.all(others < 0.03)
    assert np.all(floor >= 0.4 * np.log(10) * 0.01 - 1e-9)  # never below the emulator's floor (0.01 mag)


def test_zero_point_update_is_median_ratio():
    flux = np.array([[10.0, 20.0], [11.0, 40.0], [12.0, 1.0]])
    err = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])  # last galaxy's band 1 is S/N 1: excluded
    model = np.array([[10.0, 20.0], [10.0, 20.0], [10.0, 20.0]])
    ratio, n = cal.zero_point_update(flux, err, np.ones((3, 2), bool), model, [1.0, 1.0], min_galaxies=2)
    np.testing.assert_allclose(ratio, [1.1, 1.5])
    np.testing.assert_array_equal(n, [3, 2])


def test_error_floor_zero_when_errors_explain_residuals():
    rng = np.random.default_rng(3)
    model = np.full((4000, 1), 100.0)
    err = np.full((4000, 1), 5.0)
    flux = model + err * rng.normal(size=model.shape)
    floor, nmad0 = cal.error_floor(flux, err, np.ones_like(flux, bool), model, [1.0])
    # the NMAD of 4000 unit normals is 1 +- 0.02, so a floor of at most sqrt(0.04) x 5% = 0.01 can appear
    assert floor[0] < 0.015 and nmad0[0] == pytest.approx(1.0, abs=0.05)
    # 10% multiplicative scatter on top: floor^2 + 0.05^2 = total^2 -> floor ~ 0.10
    flux2 = model * (1 + 0.1 * rng.normal(size=model.shape)) + err * rng.normal(size=model.shape)
    floor2, _ = cal.error_floor(flux2, err, np.ones_like(flux, bool), model, [1.0])
    assert floor2[0] == pytest.approx(0.10, abs=0.01)  # NMAD of 4000 draws: ~2% relative error


def test_datamodel_json_round_trip(tmp_path):
    dm = DataModel([1.02, 0.98], [0.01, 0.03])
    path = cal.save_datamodel(tmp_path / "dm.json", dm, {"filters": ["a", "b"], "bands": ["A", "B"]})
    assert DataModel.from_dict(json.loads(path.read_text())) == dm
    assert cal.load_datamodel(path, filters=["a", "b"]) == dm
    with pytest.raises(ValueError, match="filters"):
        cal.load_datamodel(path, filters=["b", "a"])


def test_groups_must_name_parameters():
    emu, prior = ToyEmulator(), UniformPrior()
    with pytest.raises(ValueError, match="not_a_param"):
        cal.fit_fixed_z(jax.random.PRNGKey(0), np.ones((2, 6)), np.ones((2, 6)), np.ones((2, 6), bool), np.ones(2),
                        emulator=emu, prior=prior, datamodel=DataModel.from_emulator(emu),
                        reference=np.zeros(emu.space.dim), groups=(("not_a_param",),))
