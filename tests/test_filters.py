"""Filter curves: name resolution, effective wavelengths, zero points, errors."""

import numpy as np
import pytest

from popflow.filters import (AB_ZERO_POINT_NJY, Filter, UnknownFilterError, available_filters, load_filter,
                             load_filters, read_filter_file)


def test_sedpy_name_matches_sedpy_effective_wavelength():
    from sedpy.observate import Filter as SedpyFilter

    f = load_filter("sdss_r0")
    assert f.source == "sedpy"
    assert f.wavelength.dtype == np.float64
    # same curve, same definition (mean log wavelength): agreement to integration round-off
    assert f.effective_wavelength == pytest.approx(SedpyFilter("sdss_r0").wave_effective, rel=1e-6)


def test_speclite_name_and_lsst_r_band_location():
    f = load_filter("lsst2023-r")
    assert f.source == "speclite"
    # LSST r spans roughly 5400-7000 A; its effective wavelength is near 6200 A
    assert 6000 < f.effective_wavelength < 6400
    assert 6000 < f.pivot_wavelength < 6400


def test_ab_zero_point_flambda_against_known_value():
    # 3631 Jy at the SDSS r pivot (~6175 A) is 2.85e-9 erg/s/cm2/A (3631e-23 * c / lam^2)
    f = load_filter("sdss_r0")
    assert f.ab_zero_point_njy == AB_ZERO_POINT_NJY == 3.631e12
    assert f.ab_zero_point_flambda == pytest.approx(3631e-23 * 2.99792458e18 / f.pivot_wavelength**2)
    assert f.ab_zero_point_flambda == pytest.approx(2.85e-9, rel=0.01)


def test_two_column_file_and_search_path(tmp_path, monkeypatch):
    wave = np.linspace(4000.0, 6000.0, 51)
    trans = np.exp(-0.5 * ((wave - 5000.0) / 300.0) ** 2)
    folder = tmp_path / "curves"
    folder.mkdir()
    np.savetxt(folder / "mybox.res", np.column_stack([wave, trans]), header="wavelength transmission")

    by_path = load_filter(str(folder / "mybox.res"))
    np.testing.assert_array_equal(by_path.wavelength, wave)
    np.testing.assert_allclose(by_path.transmission, trans, rtol=1e-12)
    # symmetric Gaussian in lambda: the log-mean wavelength sits just below the centre
    assert by_path.effective_wavelength == pytest.approx(5000.0, rel=0.01)

    by_arg = load_filter("mybox", search_path=[folder])
    assert by_arg.sha256 == by_path.sha256

    monkeypatch.setenv("POPFLOW_FILTER_PATH", f"/nonexistent:{folder}")
    assert load_filter("mybox").sha256 == by_path.sha256


def test_search_path_takes_precedence_over_packages(tmp_path):
    np.savetxt(tmp_path / "sdss_r0.dat", np.column_stack([[5000.0, 6000.0, 7000.0], [0.0, 1.0, 0.0]]))
    assert load_filter("sdss_r0", search_path=str(tmp_path)).wavelength.size == 3
    assert load_filter("sdss_r0").source == "sedpy"


def test_sha256_distinguishes_curves():
    a, b = load_filters(["sdss_r0", "sdss_g0"])
    assert a.sha256 != b.sha256
    assert load_filter("sdss_r0").sha256 == a.sha256


def test_unknown_filter_lists_close_names():
    with pytest.raises(KeyError) as err:
        load_filter("lsst_baseline_rr")
    msg = str(err.value)
    assert "lsst_baseline_rr" in msg and "lsst_baseline_r" in msg
    with pytest.raises(ValueError, match="lsst2023-r"):  # also a ValueError, close speclite names
        load_filter("lsst2023_r")
    assert issubclass(UnknownFilterError, KeyError)


def test_bad_curve_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("5000 0.5\n4000 0.7\n")
    with pytest.raises(ValueError, match="bad.txt.*strictly increasing"):
        read_filter_file(bad)
    one = tmp_path / "onecol.txt"
    one.write_text("5000\n6000\n")
    with pytest.raises(ValueError, match="onecol.txt.*two columns"):
        load_filter(str(one))


def test_filter_arrays_are_read_only():
    f = Filter("box", [1000.0, 2000.0, 3000.0], [0.0, 1.0, 0.0])
    with pytest.raises(ValueError):
        f.wavelength[0] = 5.0


def test_available_filters_has_both_sources():
    names = available_filters()
    assert "cfht_megacam_us_9301" in names["sedpy"]
    assert "hsc2017-g" in names["speclite"]


def test_zcosmos_g_plus_from_shared_folder(shared_data):
    f = load_filter("g_subaru.res", search_path=[shared_data / "zcosmos_bright" / "filters"])
    assert 4500 < f.effective_wavelength < 4900  # Subaru g+ is centred near 4750 A
