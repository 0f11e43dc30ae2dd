"""The data model: exact likelihood values against scipy, masking, zero points, floors, validation."""

import math

import jax
import numpy as np
import pytest
from scipy import integrate, stats

from popflow.datamodel import LOG_FLOOR_PER_MAG, DataModel
from tests.toymodel import ToyEmulator


def _data(seed=0, n_gal=7, n_band=5):
    rng = np.random.default_rng(seed)
    model = rng.uniform(0.5, 50.0, (n_gal, n_band)).astype(np.float32)
    err = rng.uniform(0.5, 3.0, (n_gal, n_band)).astype(np.float32)
    flux = (model + err * rng.normal(size=model.shape) * 3).astype(np.float32)  # some fluxes go negative
    mask = rng.uniform(size=model.shape) > 0.2
    return model, flux, err, mask


def _sigma(model_zp, err, floor):
    return np.sqrt(err.astype(np.float64) ** 2 + (floor * model_zp) ** 2)


def test_gaussian_matches_scipy_with_zero_points_and_floor():
    model, flux, err, mask = _data()
    zp = np.array([1.0, 1.05, 0.9, 1.2, 0.97])
    floor = np.array([0.0, 0.02, 0.05, 0.1, 0.3])
    dm = DataModel(zp, floor)
    mu = model * zp
    ref = np.where(mask, stats.norm.logpdf(flux, mu, _sigma(mu, err, floor)), 0.0).sum(-1)
    got = np.asarray(dm.log_likelihood(model, flux, err, mask))
    assert (flux[mask] < 0).any(), "the test data must include negative fluxes"
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-4)  # float32 arithmetic on O(10-100) sums


def test_student_t_matches_scipy():
    model, flux, err, mask = _data(1)
    dm = DataModel(np.ones(5), np.full(5, 0.05), student_t_nu=3.0)
    sig = _sigma(model, err, 0.05)
    ref = np.where(mask, stats.t.logpdf(flux, 3.0, loc=model, scale=sig), 0.0).sum(-1)
    np.testing.assert_allclose(np.asarray(dm.log_likelihood(model, flux, err, mask)), ref, rtol=2e-6, atol=1e-4)


def test_likelihood_is_normalised_over_the_data_even_with_a_model_dependent_floor():
    """The log-sigma terms are kept: integral over the observed flux of exp(log L) is 1."""
    dm = DataModel([1.3], [0.2])
    model = np.float32(40.0)
    f = lambda x: math.exp(float(dm.log_likelihood(np.array([model]), np.array([x], np.float32), np.array([2.0], np.float32), np.array([True]))))  # noqa: E731
    total, _ = integrate.quad(f, -200, 300, points=[52.0], limit=200)
    assert total == pytest.approx(1.0, abs=1e-4)


def test_masked_bands_contribute_nothing_even_when_nan():
    model, flux, err, mask = _data(2)
    dm = DataModel.default(5, error_floor=0.03)
    flux_nan = np.where(mask, flux, np.nan).astype(np.float32)
    err_nan = np.where(mask, err, np.nan).astype(np.float32)
    a = np.asarray(dm.log_likelihood(model, flux_nan, err_nan, mask))
    b = np.asarray(dm.log_likelihood(model, flux, err, mask))
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    # a band dropped from the arrays gives the same value as the band masked
    keep = np.array([True, False, True, True, True])
    m2 = mask.copy()
    m2[:, 1] = False
    dm4 = DataModel.default(4, error_floor=0.03)
    np.testing.assert_allclose(
        np.asarray(dm.log_likelihood(model, flux, err, m2)),
        np.asarray(dm4.log_likelihood(model[:, keep], flux[:, keep], err[:, keep], mask[:, keep])),
        rtol=1e-6,
    )
    # no usable band at all: log L = 0 exactly (the posterior is the prior)
    assert float(dm.log_likelihood(model[0], flux[0], err[0], np.zeros(5, bool))) == 0.0


def test_zero_points_and_floor_change_the_likelihood_as_they_should():
    model, flux, err, mask = _data(3)
    mask[:] = True
    base = DataModel.default(5)
    # a zero point of 1.1 on the model flux is the same as a model 10% brighter
    zp = DataModel([1.1] * 5, [0.0] * 5)
    np.testing.assert_allclose(np.asarray(zp.log_likelihood(model, flux, err, mask)),
                               np.asarray(base.log_likelihood(1.1 * model, flux, err, mask)), rtol=1e-6)
    # the best zero point of data generated with zp = 1.1 is near 1.1, not 1
    rng = np.random.default_rng(0)
    data = (1.1 * model + 0.01 * err * rng.normal(size=model.shape)).astype(np.float32)
    grid = np.linspace(0.9, 1.3, 41)
    ll = [float(DataModel([g] * 5, [0.0] * 5).log_likelihood(model, data, 0.01 * err, mask).sum()) for g in grid]
    assert grid[int(np.argmax(ll))] == pytest.approx(1.1, abs=0.011)
    # a floor widens the likelihood: a 5-sigma outlier costs less with a 20% floor
    far = (model + 5 * err).astype(np.float32)
    assert np.all(np.asarray(DataModel.default(5, 0.2).log_likelihood(model, far, err, mask))
                  > np.asarray(base.log_likelihood(model, far, err, mask)))


def test_per_field_zero_points_select_rows_by_field():
    model, flux, err, mask = _data(4)
    table = np.array([[1.0, 1.0, 1.0, 1.0, 1.0], [1.2, 0.8, 1.1, 1.0, 0.95]])
    dm = DataModel(table, [0.02] * 5)
    field = np.array([0, 1, 1, 0, 1, 0, 0])
    got = np.asarray(dm.log_likelihood(model, flux, err, mask, field))
    for g in range(len(field)):
        one = DataModel(table[field[g]], [0.02] * 5)
        assert got[g] == pytest.approx(float(one.log_likelihood(model[g], flux[g], err[g], mask[g])), rel=1e-6)
    # broadcasting over walkers, as in the fit: model (n_gal, n_walk, n_band), field (n_gal, 1)
    mw = np.repeat(model[:, None], 3, axis=1)
    lw = np.asarray(jax.jit(dm.log_likelihood)(mw, flux[:, None], err[:, None], mask[:, None], field[:, None]))
    np.testing.assert_allclose(lw, np.repeat(got[:, None], 3, axis=1), rtol=1e-6)
    with pytest.raises(ValueError, match="field"):
        dm.log_likelihood(model, flux, err, mask)


def test_validation_names_galaxy_and_band():
    model, flux, err, mask = _data(5)
    mask[:] = True
    dm = DataModel.default(5)
    dm.validate(flux, err, mask)
    bad = err.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"galaxy 3, band 2"):
        dm.validate(flux, bad, mask)
    bad[3, 2] = -1.0
    with pytest.raises(ValueError, match=r"not positive.*galaxy 3, band 2"):
        dm.validate(flux, bad, mask)
    # the same entries masked are fine, and so is a galaxy with no usable band
    m2 = mask.copy()
    m2[3, 2] = False
    m2[5] = False
    dm.validate(flux, bad, m2)
    with pytest.raises(ValueError, match="bands"):
        DataModel.default(4).validate(flux, err, mask)
    with pytest.raises(ValueError, match=r"field index 2 at galaxy 1"):
        DataModel(np.ones((2, 5)), np.zeros(5)).validate(flux, err, mask, field=np.array([0, 2, 0, 0, 0, 0, 0]))


def test_serialisation_magnitude_floor_and_hashing():
    dm = DataModel.from_magnitude_floor([0.01, 0.02, 0.05], zero_points=[1.0, 1.1, 0.9], student_t_nu=5)
    np.testing.assert_allclose(dm.error_floor, np.array([0.01, 0.02, 0.05]) * 0.4 * np.log(10))
    assert LOG_FLOOR_PER_MAG == pytest.approx(0.921, abs=1e-3)
    again = DataModel.from_dict(dm.to_dict())
    assert again == dm and hash(again) == hash(dm)
    emu = ToyEmulator(error_floor=0.03)
    assert DataModel.from_emulator(emu).error_floor == pytest.approx((0.03 * LOG_FLOOR_PER_MAG,) * len(emu.bands))
    with pytest.raises(ValueError, match="positive"):
        DataModel([1.0, 0.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="bands"):
        DataModel([1.0, 1.0], [0.0])


def test_rest_frame_correction_samples_the_bands_rest_wavelengths():
    dm = DataModel([1.0, 1.0], [0.0, 0.0], band_wavelength=[4000.0, 8000.0], rest_wavelength=[1000.0, 2000.0, 4000.0],
                   rest_offset=[0.3, 0.1, -0.2])
    # z = 1: the bands sample 2000 A (node value 0.1) and 4000 A (-0.2); z = 3: 1000 A and 2000 A; z = 0: 4000 A and
    # beyond the last node (held at its value); z = sqrt(2) - 1: 2828 A, halfway in log between nodes (their mean)
    got = np.asarray(dm.rest_correction(np.array([1.0, 3.0, 0.0, 2 ** 0.5 - 1.0])))
    np.testing.assert_allclose(got, [[0.1, -0.2], [0.3, 0.1], [-0.2, -0.2], [-0.05, -0.2]], atol=1e-5)
    assert DataModel([1.0, 1.0], [0.0, 0.0]).rest_correction(np.array([1.0])) == 0.0
    again = DataModel.from_dict(dm.to_dict())
    assert again == dm and hash(again) == hash(dm)
    assert "rest_offset" not in DataModel([1.0], [0.0]).to_dict()  # older data-model JSON stays as it was
    with pytest.raises(ValueError, match="band_wavelength"):
        DataModel([1.0, 1.0], [0.0, 0.0], rest_wavelength=[1000.0, 2000.0], rest_offset=[0.0, 0.0])
    with pytest.raises(ValueError, match="both or neither"):
        DataModel([1.0, 1.0], [0.0, 0.0], band_wavelength=[4000.0, 8000.0], rest_offset=[0.0, 0.0])
    with pytest.raises(ValueError, match="increasing"):
        DataModel([1.0, 1.0], [0.0, 0.0], band_wavelength=[4000.0, 8000.0], rest_wavelength=[2000.0, 1000.0], rest_offset=[0.0, 0.0])


def test_pytree_numbers_are_traced_structure_is_static():
    """A jitted function of a DataModel compiles once per structure; new numbers give new results."""
    calls = []

    @jax.jit
    def total(dm, model, data, err, mask):
        calls.append(1)  # runs only when tracing
        return dm.log_likelihood(model, data, err, mask).sum()

    model, data, err = np.full((4, 3), 100.0), np.full((4, 3), 110.0), np.full((4, 3), 5.0)
    mask = np.ones((4, 3), bool)
    a, b = DataModel([1.0, 1.0, 1.0], [0.01] * 3), DataModel([1.1, 1.0, 0.9], [0.05] * 3)
    assert a.structure == b.structure
    for dm in (a, b):
        np.testing.assert_allclose(float(total(dm, model, data, err, mask)), float(dm.log_likelihood(model, data, err, mask).sum()), rtol=1e-6)
    assert len(calls) == 1
    rest = DataModel([1.0] * 3, [0.01] * 3, None, [4000.0, 6000.0, 8000.0], [3000.0, 5000.0], [0.1, -0.1])
    per_field = DataModel([[1.0] * 3, [1.1] * 3], [0.01] * 3)
    assert len({a.structure, rest.structure, per_field.structure, DataModel([1.0] * 3, [0.01] * 3, 4.0).structure}) == 4
