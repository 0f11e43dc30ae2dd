"""Catalogue ingest: four formats round trip, validation errors, stores, band sets, zCOSMOS via the CLI."""

import re

import numpy as np
import pytest
import yaml
from astropy.table import Table

from popflow.catalog import (available_bandsets, describe_store, ingest, load_bandset, mag_to_njy,
                             open_catalog)
from popflow.cli import main
from popflow.filters import load_filters

BANDSET = {
    "name": "toy",
    "id_column": "objid",
    "extra_columns": {"z_spec": "zspec"},
    "bands": {
        "g": {"column": "mag_g", "error": "magerr_g", "unit": "AB mag", "filter": "sdss_g0"},
        "r": {"column": "mag_r", "error": "magerr_r", "unit": "AB mag", "filter": "sdss_r0"},
        "i": {"column": "flux_i", "error": "fluxerr_i", "unit": "uJy", "filter": "sdss_i0"},
    },
}


def make_table(n=23, seed=0) -> Table:
    """A small table: mags with -99/99/-99.9/NaN sentinels, a uJy band with negative fluxes."""
    rng = np.random.default_rng(seed)
    t = Table()
    t["objid"] = np.arange(1000, 1000 + n, dtype=np.int64)[::-1]
    for b in "gr":
        t[f"mag_{b}"] = rng.uniform(18, 26, n)
        t[f"magerr_{b}"] = rng.uniform(0.01, 0.3, n)
    t["mag_g"][[1, 5]] = [-99.0, 99.0]
    t["magerr_g"][[1, 5]] = [-99.0, 99.0]
    t["mag_r"][[2, 9]] = [-99.9, np.nan]
    t["flux_i"] = rng.normal(2.0, 1.5, n)  # uJy; some negative
    t["fluxerr_i"] = rng.uniform(0.1, 0.5, n)
    t["flux_i"][7] = np.inf
    t["zspec"] = rng.uniform(0, 2, n)
    return t


def write_table(t: Table, path, fmt):
    if fmt == "hdf5":
        t.write(path, path="data", format="hdf5")
    elif fmt == "csv":
        t.write(path, format="ascii.csv")
    elif fmt == "parquet":
        t.to_pandas().to_parquet(path, row_group_size=5)  # row groups not aligned with Zarr chunks
    else:
        t.write(path, format="fits")


def bandset_file(tmp_path, **changes):
    d = yaml.safe_load(yaml.safe_dump(BANDSET, sort_keys=False))
    for key, value in changes.items():
        d[key] = value
    path = tmp_path / "bands.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@pytest.mark.parametrize("fmt,suffix", [("fits", ".fits"), ("csv", ".csv"), ("hdf5", ".h5"),
                                        ("parquet", ".parquet")])
def test_round_trip_each_format(tmp_path, fmt, suffix):
    t = make_table()
    table = tmp_path / f"toy{suffix}"
    write_table(t, table, fmt)
    out = ingest(table, bandset_file(tmp_path), tmp_path / "cat.zarr", chunk_size=7, progress=False)
    ds = open_catalog(out)

    assert ds.sizes == {"galaxy": 23, "band": 3}
    assert list(ds.band.values) == ["g", "r", "i"]
    assert ds.attrs["filters"] == ["sdss_g0", "sdss_r0", "sdss_i0"]
    assert ds.attrs["flux_unit"] == "nJy" and ds.attrs["source_format"] == fmt
    assert ds.flux.dtype == np.float32 and ds.flux.chunks[0] == (7, 7, 7, 2)
    np.testing.assert_array_equal(ds.galaxy_id.values, np.asarray(t["objid"]))

    expected_mask = np.ones((23, 3), bool)
    expected_mask[[1, 5], 0] = False
    expected_mask[[2, 9], 1] = False
    expected_mask[7, 2] = False
    np.testing.assert_array_equal(ds.mask.values, expected_mask)

    expected = np.empty((23, 3))
    expected_err = np.empty((23, 3))
    for j, b in enumerate("gr"):
        m, e = np.asarray(t[f"mag_{b}"]), np.asarray(t[f"magerr_{b}"])
        expected[:, j] = 10 ** (-0.4 * (m - 31.4))
        expected_err[:, j] = 0.4 * np.log(10) * expected[:, j] * e
    expected[:, 2] = np.asarray(t["flux_i"]) * 1e3
    expected_err[:, 2] = np.asarray(t["fluxerr_i"]) * 1e3
    flux, err = ds.flux.values, ds.flux_err.values
    # float32 storage: relative agreement to a few float32 ulps
    np.testing.assert_allclose(flux[expected_mask], expected[expected_mask], rtol=3e-7)
    np.testing.assert_allclose(err[expected_mask], expected_err[expected_mask], rtol=3e-7)
    assert np.isnan(flux[~expected_mask]).all() and np.isnan(err[~expected_mask]).all()
    assert (flux[:, 2] < 0).any()  # negative fluxes are kept
    np.testing.assert_allclose(ds.z_spec.values, np.asarray(t["zspec"]), rtol=1e-7)


def test_open_catalog_is_lazy(tmp_path):
    t = make_table()
    write_table(t, tmp_path / "t.parquet", "parquet")
    ds = open_catalog(ingest(tmp_path / "t.parquet", bandset_file(tmp_path), tmp_path / "c.zarr", progress=False))
    import dask.array as da

    assert isinstance(ds.flux.data, da.Array) and isinstance(ds.mask.data, da.Array)
    assert float(ds.flux.sel(band="g").isel(galaxy=0)) == pytest.approx(
        10 ** (-0.4 * (t["mag_g"][0] - 31.4)), rel=3e-7)


def test_mag_to_njy_matches_definition():
    f, e = mag_to_njy(np.array([31.4, 21.4, 23.9]), np.array([0.1, 0.1, 0.0]))
    np.testing.assert_allclose(f, [1.0, 1e4, 1000.0], rtol=1e-12)  # 23.9 AB = 1 uJy
    np.testing.assert_allclose(e, 0.4 * np.log(10) * 0.1 * f * [1, 1, 0])


def ingest_bad(tmp_path, t, bandset=None, fmt="csv", **kw):
    path = tmp_path / f"bad.{ 'csv' if fmt == 'csv' else 'parquet'}"
    write_table(t, path, fmt)
    return ingest(path, bandset or bandset_file(tmp_path), tmp_path / "bad.zarr", chunk_size=5, progress=False,
                  **kw)


@pytest.mark.parametrize("bad", [0.0, -0.2, np.nan])
def test_non_positive_or_nan_error_names_column_and_row(tmp_path, bad):
    t = make_table()
    t["magerr_r"][12] = bad
    with pytest.raises(ValueError, match=r"bad\.csv.*'magerr_r'.*row 12"):
        ingest_bad(tmp_path, t)
    assert not (tmp_path / "bad.zarr").exists()  # the partial store is removed


def test_duplicate_ids_name_both_rows(tmp_path):
    t = make_table()
    t["objid"][17] = t["objid"][3]
    with pytest.raises(ValueError, match=r"'objid'.*duplicate id 1019 in rows 3 and 17"):
        ingest_bad(tmp_path, t)


def test_unknown_filter_names_band_and_close_names(tmp_path):
    bands = dict(BANDSET["bands"])
    bands["r"] = {**bands["r"], "filter": "sdss_rr0"}
    with pytest.raises(ValueError, match=r"band 'r'.*sdss_rr0.*sdss_r0"):
        ingest_bad(tmp_path, make_table(), bandset_file(tmp_path, bands=bands))


def test_magnitudes_that_are_fluxes_are_a_unit_mismatch(tmp_path):
    t = make_table()
    t["mag_r"][14] = 2512.0  # an nJy flux in a magnitude column
    with pytest.raises(ValueError, match=r"'mag_r', row 14.*unit mismatch"):
        ingest_bad(tmp_path, t)


def test_flux_band_holding_magnitudes_is_a_unit_mismatch(tmp_path):
    t = make_table(n=60)
    t["flux_i"] = np.random.default_rng(1).uniform(18, 25, 60)  # magnitudes declared as uJy
    t["fluxerr_i"] = 0.05
    path = tmp_path / "t.parquet"
    write_table(t, path, "parquet")
    with pytest.raises(ValueError, match=r"'flux_i'.*like AB magnitudes.*'uJy'"):
        ingest(path, bandset_file(tmp_path), tmp_path / "x.zarr", chunk_size=100, progress=False)


def test_unknown_unit_names_band(tmp_path):
    bands = dict(BANDSET["bands"])
    bands["i"] = {**bands["i"], "unit": "furlongs"}
    with pytest.raises(ValueError, match=r"band 'i'.*unknown unit 'furlongs'"):
        load_bandset(bandset_file(tmp_path, bands=bands))


def test_empty_table(tmp_path):
    with pytest.raises(ValueError, match=r"bad\.csv.*empty"):
        ingest_bad(tmp_path, make_table()[:0])


def test_missing_column_lists_close_names(tmp_path):
    t = make_table()
    t.rename_column("magerr_g", "magerr_gg")
    with pytest.raises(ValueError, match=r"column 'magerr_g' \(band g error\) not found.*magerr_gg"):
        ingest_bad(tmp_path, t)


def test_non_numeric_value_names_row(tmp_path):
    path = tmp_path / "t.csv"
    write_table(make_table(), path, "csv")
    lines = path.read_text().splitlines()
    fields = lines[1 + 8].split(",")
    fields[1] = "abc"  # mag_g of data row 8
    lines[1 + 8] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"'mag_g', row 8: non-numeric value 'abc'"):
        ingest(path, bandset_file(tmp_path), tmp_path / "c.zarr", chunk_size=5, progress=False)


def test_half_written_store_is_refused(tmp_path):
    import zarr

    write_table(make_table(), tmp_path / "t.fits", "fits")
    out = ingest(tmp_path / "t.fits", bandset_file(tmp_path), tmp_path / "c.zarr", progress=False)
    zarr.open_group(out, mode="r+").attrs["popflow_complete"] = False  # as if ingest had been killed
    with pytest.raises(ValueError, match=r"c\.zarr is incomplete.*--overwrite"):
        open_catalog(out)
    assert "INCOMPLETE" in describe_store(out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        ingest(tmp_path / "t.fits", bandset_file(tmp_path), out, progress=False)
    ingest(tmp_path / "t.fits", bandset_file(tmp_path), out, overwrite=True, progress=False)
    assert open_catalog(out).sizes["galaxy"] == 23


def test_row_numbers_as_ids_and_cli_extra(tmp_path, capsys):
    write_table(make_table(), tmp_path / "t.parquet", "parquet")
    bs = bandset_file(tmp_path, id_column=None, extra_columns={})
    rc = main(["ingest", str(tmp_path / "t.parquet"), "--bands", str(bs), "--out", str(tmp_path / "c.zarr"),
               "--extra", "z_spec=zspec", "--chunk-size", "10"])
    assert rc == 0
    ds = open_catalog(tmp_path / "c.zarr")
    np.testing.assert_array_equal(ds.galaxy_id.values, np.arange(23))
    assert "z_spec" in ds
    rc = main(["ingest", str(tmp_path / "t.parquet"), "--bands", str(bs), "--out", str(tmp_path / "c.zarr")])
    assert rc == 2 and "already exists" in capsys.readouterr().err


def test_shipped_bandsets_load_and_resolve_filters():
    names = available_bandsets()
    assert {"lsst", "sdss", "cfhtls", "hsc", "zcosmos_bright", "rail_dc2", "sdss_mgs"} <= set(names)
    for name in names:
        bs = load_bandset(name)
        assert bs.name == name
        if name != "zcosmos_bright":  # its curves live on the filter search path (../shared)
            load_filters(bs.filters)
    assert load_bandset("lsst").filters == tuple(f"lsst_baseline_{b}" for b in "ugrizy")
    assert load_bandset("hsc").band_names == tuple("grizy")
    with pytest.raises(ValueError, match="unknown band set 'lsts'.*lsst"):
        load_bandset("lsts")


def test_zcosmos_ingest_and_info_counts(shared_data, tmp_path, capsys):
    import pandas as pd

    folder = shared_data / "zcosmos_bright"
    out = tmp_path / "zcosmos.zarr"
    rc = main(["ingest", str(folder / "zcosmos_bright_public.csv"), "--bands", "zcosmos_bright",
               "--filter-path", str(folder / "filters"), "--out", str(out)])
    assert rc == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "galaxy=13821, band=10" in info

    # independent count from the CSV: missing where the magnitude is -99/-99.9/99/NaN or the error is -1
    # (COSMOS upper limit) or a sentinel
    df = pd.read_csv(folder / "zcosmos_bright_public.csv")
    cols = {"u": "u", "B": "b", "V": "v", "g": "g", "r": "r", "i": "i", "z": "z", "ic": "ic", "J": "j", "Ks": "k"}
    for band, c in cols.items():
        m, e = df[f"{c}_photzi25"].to_numpy(), df[f"e{c}_photzi25"].to_numpy()
        missing = ~np.isfinite(m) | np.isin(m, [99, -99, -99.9]) | np.isin(e, [-1, 99, -99, -99.9])
        row = re.search(rf"^\s+{band}\s+\S+\s+AB mag\s+(\d+)", info, flags=re.M)
        assert row is not None, f"band {band} missing from info output"
        assert int(row.group(1)) == missing.sum(), band
    ds = open_catalog(out)
    assert ds.attrs["filters"][3] == "g_subaru"
    np.testing.assert_array_equal(ds.galaxy_id.values, df["id_zcosmos"].to_numpy())
    np.testing.assert_allclose(ds.z_spec.values, df["zpec"].to_numpy(), rtol=1e-6)


def test_fits_scaled_columns_use_astropy(tmp_path):
    # unsigned ids are stored with TZERO: the reader must apply it (astropy's memmap path)
    t = make_table()
    t["objid"] = np.arange(23, dtype=np.uint32) + np.uint32(4_000_000_000)
    t.write(tmp_path / "u.fits")
    ds = open_catalog(ingest(tmp_path / "u.fits", bandset_file(tmp_path), tmp_path / "u.zarr", chunk_size=10,
                             progress=False))
    np.testing.assert_array_equal(ds.galaxy_id.values, np.asarray(t["objid"], dtype=np.int64))
    np.testing.assert_allclose(ds.z_spec.values, np.asarray(t["zspec"]), rtol=1e-7)


def test_describe_posterior_store(tmp_path):
    import xarray as xr

    post = xr.Dataset({name: (("galaxy", "chain", "draw"), np.zeros((4, 2, 3), np.float32))
                       for name in ("log_mass", "redshift")},
                      coords={"chain": np.arange(2), "draw": np.arange(3)})
    tree = xr.DataTree.from_dict({"/posterior": post, "/sample_stats": xr.Dataset({"rhat": ("galaxy", np.ones(4))})})
    tree.attrs = {"prior_id": "abc123", "emulator_id": "def456", "chunks_complete": [True, False, True]}
    tree.to_zarr(tmp_path / "post.zarr", consolidated=False)
    text = describe_store(tmp_path / "post.zarr")
    assert "galaxy=4, chain=2, draw=3" in text
    assert "parameters: log_mass, redshift" in text
    assert "prior_id: abc123" in text and "emulator_id: def456" in text
    assert "chunks_complete: 2 of 3" in text


def test_every_shipped_bandset_is_served_by_a_shipped_emulator():
    """A catalogue ingested with a shipped band set must be fittable with the shipped emulators:
    its filter identifiers (the curves) are among the emulator's outputs."""
    import json

    from popflow.artifacts import resolve_artifact

    emulator_for = {"lsst": "lsst", "rail_dc2": "lsst", "sdss": "sdss", "sdss_mgs": "sdss",
                    "cfhtls": "cfhtls", "hsc": "hsc", "zcosmos_bright": "zcosmos_bright"}
    for bandset, emulator in emulator_for.items():
        meta = json.loads((resolve_artifact(emulator, "emulators") / "model.json").read_text())
        missing = set(load_bandset(bandset).filters) - set(meta["filters"])
        assert not missing, f"band set {bandset}: filters {missing} not in emulator {emulator}"
